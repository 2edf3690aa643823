"""The GPU code paths, exercised on the CPU where torch allows it.

* Experts as grouped GEMMs (`torch._grouped_mm`, taken on CUDA in bf16) equal the per-expert loop,
  forward and backward: torch runs the same op on the CPU in float32.
* bf16 autocast in the distributed trainer (`--precision bf16`, the default on CUDA): the same
  `autocast_context` rule as the one-process trainer; on the CPU it really computes in bf16.
* Activation offload is a CUDA-only context; on the CPU it is the identity.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext

import pytest
import torch

from openk2 import ModelConfig, Transformer
from openk2.distributed import device
from openk2.distributed.device import autocast_context
from openk2.distributed.mesh import Mesh, ParallelConfig
from openk2.model import moe
from openk2.train.data import Batch
from openk2.train.distributed import DistributedTrainer
from openk2.train.loop import TrainConfig, make_schedule
from openk2.train.memory import MemoryOptions, activation_context


def test_grouped_experts_equal_the_loop_forward_and_backward(monkeypatch):
    torch.manual_seed(0)
    experts = moe.Experts(4, 16, 8)
    for w in (experts.gate_proj, experts.up_proj, experts.down_proj):
        torch.nn.init.normal_(w, std=0.2)
    counts = [3, 0, 5, 2]  # an expert without rows, as routing produces
    x = torch.randn(sum(counts), 16)
    grad = torch.randn(sum(counts), 16)
    results = {}
    for mode in ("loop", "grouped"):
        monkeypatch.setattr(moe, "EXPERT_MATMUL", mode)
        experts.zero_grad()
        xi = x.clone().requires_grad_()
        y = experts(xi, counts)
        y.backward(grad)
        results[mode] = (y.detach(), xi.grad, [p.grad.clone() for p in experts.parameters()])
    (y0, gx0, gw0), (y1, gx1, gw1) = results["loop"], results["grouped"]
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx1, gx0, rtol=1e-5, atol=1e-6)
    for a, b in zip(gw1, gw0):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_grouped_is_chosen_only_for_cuda_bf16(monkeypatch):
    monkeypatch.setattr(moe, "EXPERT_MATMUL", "auto")
    w = torch.zeros(2, 4, 4)
    assert not moe.use_grouped_mm(torch.zeros(3, 4), w)  # CPU: the loop
    assert not moe.use_grouped_mm(torch.zeros(3, 4), w.bfloat16())  # CPU bf16: the loop too
    monkeypatch.setattr(moe, "EXPERT_MATMUL", "grouped")
    assert moe.use_grouped_mm(torch.zeros(3, 4), w)


def test_autocast_rule_and_offload_context_on_cpu(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(device, "_this_cpu_has_bf16", lambda: False)  # an AVX2 CPU: auto is fp32
    assert isinstance(autocast_context(cpu, "auto"), nullcontext)
    assert isinstance(autocast_context(cpu, "fp32"), nullcontext)
    with autocast_context(cpu, "bf16"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with warnings.catch_warnings():  # "CUDA is not available ... Disabling autocast" on this machine
        warnings.simplefilter("ignore", UserWarning)
        assert isinstance(autocast_context(cuda, "auto"), torch.autocast)
    with pytest.raises(ValueError, match="unknown precision"):
        autocast_context(cpu, "fp16")
    assert isinstance(activation_context(MemoryOptions(offload=True), cpu), nullcontext)


def _trainer(precision: str) -> DistributedTrainer:
    torch.manual_seed(0)
    cfg = TrainConfig(preset="tiny", steps=2, warmup_steps=1, precision=precision, ns_dtype="float32")
    return DistributedTrainer(Transformer(ModelConfig.from_preset("tiny")), Mesh(ParallelConfig(), 0),
                              make_schedule(cfg), cfg)  # fmt: skip


def test_distributed_trainer_trains_under_bf16_autocast_on_cpu():
    ids = torch.randint(0, 512, (4, 33), generator=torch.Generator().manual_seed(0))
    batch = Batch(ids[:, :-1], ids[:, 1:], None, None)
    seen: list[torch.dtype] = []
    runs = {}
    for precision in ("fp32", "bf16"):
        trainer = _trainer(precision)
        attn = trainer.pm.chunks[0].layers["0"].self_attn
        hook = attn.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
        runs[precision] = [trainer.train_step([batch])["loss"] for _ in range(2)]
        hook.remove()
        assert all(p.dtype == torch.float32 for p in trainer.params)  # fp32 master weights and state
    assert seen == [torch.float32] * 2 + [torch.bfloat16] * 2
    # the same training, to bf16's precision; and it learns (second step below the first)
    torch.testing.assert_close(torch.tensor(runs["bf16"]), torch.tensor(runs["fp32"]), rtol=2e-2, atol=0)
    assert runs["bf16"][1] < runs["bf16"][0]


@pytest.mark.slow
def test_torchrun_pp2_under_bf16_autocast_matches_one_process(tmp_path, monkeypatch):
    """The pipeline under bf16 autocast (stages send in the parameters' dtype): the same run as one
    process with `--precision bf16`, to bf16's precision."""
    from test_distributed_train import losses, single, torchrun

    monkeypatch.setenv("OPENK2_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(["the king said to the queen of the crown and the sword"] * 300))
    single(str(corpus), tmp_path / "one", precision="bf16")
    torchrun(str(corpus), tmp_path / "pp2", "--pp", "2", "--microbatches", "2", "--precision", "bf16")
    got, ref = losses(tmp_path / "pp2"), losses(tmp_path / "one")
    assert got.keys() == ref.keys()
    keys = sorted(ref)
    torch.testing.assert_close(torch.tensor([got[k] for k in keys]), torch.tensor([ref[k] for k in keys]),
                               rtol=2e-3, atol=0)  # fmt: skip
