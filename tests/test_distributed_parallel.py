"""Distributed training on CPU with gloo: every layout must reproduce the single-process run.

Each test launches 2 or 4 real processes (torch.multiprocessing, gloo) and trains the tiny preset
(4 layers so pp=2 x 2 virtual stages has a layer per chunk) with MuonClip (QK-Clip tau set low enough
that heads are clipped) and aux-loss-free bias updates, and compares against one process:

* losses of every step within rtol 1e-5 (float32; only the summation order differs),
* every parameter and buffer after the last step within atol 1e-4, 0.5% of one lr-0.02 step
  (distributed Muon == Muon; Muon matrices agree to ~1e-6),
* a run saved under one layout and resumed under another continues with the same losses.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from openk2.checkpoint import load_model
from openk2.config import ModelConfig
from openk2.distributed import checkpoint
from openk2.distributed.dist_muon import DistributedMuon
from openk2.distributed.launch import spawn
from openk2.distributed.mesh import Mesh, ParallelConfig
from openk2.distributed.parallelize import ParallelModel, lm_loss
from openk2.distributed.pipeline import split_layers
from openk2.model.transformer import Transformer
from openk2.optim.balance import update_routing_bias_
from openk2.optim.muon import MuonClip

# After STEPS steps of lr 0.02: Muon matrices agree to ~1e-6; AdamW's m / sqrt(v) amplifies
# summation-order noise in near-zero gradients (LM head), so parameters agree within 0.5% of one step.
PARAM_ATOL = 1e-4
TAU = 0.08  # the tiny model's max logits are ~0.07-0.1: some heads are clipped every step
LR = 0.02
STEPS = 4
BATCH, SEQ = 4, 16


def config() -> ModelConfig:
    c = ModelConfig.from_preset("tiny")
    c.num_hidden_layers = 4
    return c


def data(steps: int = STEPS) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    t = torch.randint(0, config().vocab_size, (steps, BATCH, SEQ + 1), generator=g)
    return t[..., :-1], t[..., 1:]


def reference(steps: int = STEPS) -> tuple[list[float], dict[str, torch.Tensor], int]:
    """One process, no openk2.distributed code: the numbers every layout must reproduce."""
    torch.manual_seed(0)
    model = Transformer(config())
    model.record_stats(True)
    opt = MuonClip(model, lr=LR, qk_clip_tau=TAU, ns_dtype=torch.float32)
    x, y = data(steps)
    losses, clipped = [], 0
    for i in range(steps):
        loss = lm_loss(model(x[i]), y[i])
        (loss + model.aux_loss()).backward()
        losses.append(loss.item())
        clipped += opt.step()
        update_routing_bias_(model, rate=0.01)
        opt.zero_grad()
    return losses, model.state_dict(), clipped


def train_steps(pm: ParallelModel, opt: DistributedMuon, steps: range) -> list[float]:
    x, y = data()
    out = []
    for i in steps:
        loss = pm.forward_backward(x[i], y[i])
        pm.reduce_stats()
        opt.step()
        for ch in pm.chunks:
            update_routing_bias_(ch, rate=0.01)
        opt.zero_grad()
        out.append(loss.item())
    return out


def setup(layout: dict) -> tuple[ParallelModel, DistributedMuon]:
    torch.manual_seed(0)
    pm = ParallelModel(Transformer(config()), Mesh.build(ParallelConfig(**layout)))
    return pm, DistributedMuon(pm, lr=LR, qk_clip_tau=TAU, ns_dtype=torch.float32)


def worker_train(rank: int, world: int, layout: dict, out: str) -> None:
    pm, opt = setup(layout)
    losses = train_steps(pm, opt, range(STEPS))
    checkpoint.save(out, pm, opt, step=STEPS)
    if rank == 0:
        Path(out, "losses.json").write_text(json.dumps(losses))


def worker_resume(rank: int, world: int, layout: dict, save_layout: dict, out: str, stop: int) -> None:
    """With save_layout: train steps [0, stop) and save (then the processes exit, as a killed run
    would). Without: load that checkpoint under `layout` and train the remaining steps."""
    pm, opt = setup(layout)
    if save_layout is None:
        meta = checkpoint.load(out, pm, opt)
        losses = train_steps(pm, opt, range(meta["step"], STEPS))
        if rank == 0:
            Path(out, "resumed.json").write_text(json.dumps(losses))
    else:
        train_steps(pm, opt, range(stop))
        checkpoint.save(out, pm, opt, step=stop)


def world(layout: dict) -> int:
    return layout.get("pp", 1) * layout.get("dp", 1) * layout.get("ep", 1)


@pytest.fixture(scope="module")
def ref():
    return reference()


LAYOUTS = [
    pytest.param(dict(dp=2), id="dp2"),
    pytest.param(dict(ep=2), id="ep2"),
    pytest.param(dict(pp=2), id="pp2"),
    pytest.param(dict(pp=2, virtual_stages=2), id="pp2-interleaved"),
    pytest.param(dict(dp=2, ep=2), id="ep2xdp2", marks=pytest.mark.slow),
    pytest.param(dict(pp=2, ep=2, microbatches=2), id="pp2xep2", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_matches_single_process(layout, ref, tmp_path):
    losses_ref, state_ref, clipped = ref
    assert clipped > 0, "QK-Clip must be exercised"
    spawn(worker_train, world(layout), layout, str(tmp_path))
    losses = json.loads((tmp_path / "losses.json").read_text())
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(losses_ref), rtol=1e-5, atol=0)
    # Distributed Muon (ZeRO-1, Newton-Schulz on gathered matrices) == single-process Muon: every
    # parameter and routing bias after the last step, gathered to full tensors by the checkpoint.
    state, _, meta = checkpoint.read_full(tmp_path)
    assert meta["step"] == STEPS and meta["layout"]["pp"] == layout.get("pp", 1)
    assert state.keys() == state_ref.keys()
    for name, t in state_ref.items():
        torch.testing.assert_close(state[name], t, rtol=0, atol=PARAM_ATOL, msg=name)


@pytest.mark.parametrize(
    "first,second",
    [
        pytest.param(dict(ep=2), dict(), id="ep2-to-1"),
        pytest.param(dict(), dict(ep=2), id="1-to-ep2"),
        pytest.param(dict(pp=2), dict(dp=2), id="pp2-to-dp2"),
    ],
)
def test_resume_under_other_layout(first, second, ref, tmp_path):
    losses_ref = ref[0]
    stop = 2
    if world(first) == 1:
        worker_resume(0, 1, first, first, str(tmp_path), stop)
    else:
        spawn(worker_resume, world(first), first, first, str(tmp_path), stop)
    if world(second) == 1:
        worker_resume(0, 1, second, None, str(tmp_path), stop)
    else:
        spawn(worker_resume, world(second), second, None, str(tmp_path), stop)
    resumed = json.loads((tmp_path / "resumed.json").read_text())
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(losses_ref[stop:]), rtol=1e-5, atol=0)


def test_export_hf(tmp_path):
    pm, opt = setup({})
    train_steps(pm, opt, range(1))
    checkpoint.save(tmp_path / "ckpt", pm, opt, step=1)
    checkpoint.export_hf(tmp_path / "ckpt", tmp_path / "hf")
    loaded = load_model(tmp_path / "hf")
    for name, t in pm.chunks[0].state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], t, rtol=0, atol=0, msg=name)


def test_split_layers_and_bad_layouts():
    assert [list(r) for r in split_layers(7, 3)] == [[0, 1], [2, 3, 4], [5, 6]]
    sizes = [len(r) for r in split_layers(61, 16)]  # K2: 61 layers, pp=16
    assert sum(sizes) == 61 and max(sizes) - min(sizes) == 1 and sizes[0] == sizes[-1] == 3
    with pytest.raises(ValueError, match="cannot cut"):
        split_layers(3, 4)
    with pytest.raises(ValueError, match="processes were launched"):
        ParallelConfig(pp=2, ep=2).validate(world_size=2)
    with pytest.raises(ValueError, match="must be >= 1"):
        ParallelConfig(ep=0).validate()
    with pytest.raises(FileNotFoundError, match="meta.json"):
        checkpoint.read_full("/nonexistent")
