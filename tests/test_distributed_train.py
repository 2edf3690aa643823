"""`openk2 train` under torchrun: the same run as one process, and checkpoints any layout resumes.

Each test launches `torchrun --standalone --nproc-per-node 2 -m openk2.cli train ...` (two real gloo
processes) on the tiny preset and compares its metrics.jsonl with a single-process run of the same
seed and global batch. Newton-Schulz and the step run in float32 (`--ns-dtype float32`,
`--precision fp32`, as `auto` would pick bf16 on a bf16-capable CPU): with K2's bf16, a
summation-order difference of one ulp in a gradient can flip a bf16 rounding and the runs drift apart
by ~1e-4 within a few steps, which says nothing about the distributed code. QK-Clip's tau is set
to 0.08, below the tiny model's max logits (~0.07-0.1), so heads are clipped in some steps. Tolerances:

* losses (train and eval) of every step within rtol 1e-5 (observed: <= 1.1e-7 for ep=2 and pp=2);
* weights of the final checkpoint within atol 1e-5 (observed 1.6e-6 on the AdamW-updated LM head,
  <= 5e-7 elsewhere).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from openk2 import ModelConfig, Transformer
from openk2.checkpoint import load_model
from openk2.checkpoint.store import latest_checkpoint, list_checkpoints, load_trainer_state
from openk2.train.logging import read_metrics
from openk2.train.loop import TrainConfig, causal_lm_loss, pretrain

RTOL = 1e-5
WEIGHT_ATOL = 1e-5
COMMON = dict(preset="tiny", steps=4, batch_size=4, seq_len=32, lr=0.01, warmup_steps=2, eval_every=2,
              eval_batches=1, save_every=2, keep_checkpoints=10, threads=1, ns_dtype="float32",
              precision="fp32", qk_clip_tau=0.08)  # fmt: skip


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("dtrain")
    rng = np.random.default_rng(0)
    words = ["the", "king", "queen", "said", "to", "his", "her", "and", "of", "a", "crown", "sword"]
    path = root / "corpus.txt"
    path.write_text("\n\n".join(" ".join(rng.choice(words, 400)) + "." for _ in range(6)))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OPENK2_CACHE", str(root / "cache"))  # in-process runs and the torchrun children
        yield str(path)


def single(corpus: str, out_dir, **kw) -> dict:
    """The single-process run, in this process."""
    cfg = TrainConfig(
        **{**COMMON, **kw}, corpus=corpus, out_dir=str(out_dir), progress=False, tensorboard=False
    )
    return pretrain(cfg)


def torchrun(corpus: str, out_dir, *layout: str, **kw) -> subprocess.CompletedProcess:
    args = [f"--{k.replace('_', '-')}={v}" for k, v in {**COMMON, **kw}.items()]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "openk2.cli", "train", "--corpus", corpus, "--out-dir", str(out_dir), *args, *layout,
           "--no-progress", "--no-tensorboard", "--no-sample"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def losses(run_dir) -> dict[tuple[str, int], float]:
    """(kind, step) -> loss; a step logged twice (redone after a resume) keeps its last record."""
    return {
        (m["kind"], m["step"]): m["loss"] for m in read_metrics(run_dir) if m["kind"] in ("train", "eval")
    }


def assert_same_run(run_dir, ref_dir) -> None:
    got, ref = losses(run_dir), losses(ref_dir)
    assert got.keys() == ref.keys() and len(ref) == 6  # 4 train steps, 2 evals
    keys = sorted(ref)
    torch.testing.assert_close(
        torch.tensor([got[k] for k in keys]), torch.tensor([ref[k] for k in keys]), rtol=RTOL, atol=0
    )


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    single(corpus, out)
    assert sum(m.get("heads_clipped", 0) for m in read_metrics(out)) > 0, "QK-Clip must be exercised"
    return out


@pytest.mark.parametrize("layout", [["--ep", "2"], ["--pp", "2", "--microbatches", "2"]], ids=["ep2", "pp2"])
def test_torchrun_matches_single_process(layout, corpus, reference, tmp_path):
    r = torchrun(corpus, tmp_path, *layout)
    assert r.stdout.count("trained 4 steps") == 1  # only rank 0 reports
    assert_same_run(tmp_path, reference)
    config = read_metrics(tmp_path)[0]
    assert config["kind"] == "config" and config["layout"]["world_size"] == 2
    # The checkpoint is the single-process format: the same files, optimizer state and weights.
    ckpt, ref_ckpt = latest_checkpoint(tmp_path), latest_checkpoint(reference)
    assert sorted(p.name for p in ckpt.iterdir()) == sorted(p.name for p in ref_ckpt.iterdir())
    state, ref_state = load_trainer_state(ckpt), load_trainer_state(ref_ckpt)
    assert (
        state["step"] == 4 and state["data"] == ref_state["data"] and state["tokens"] == ref_state["tokens"]
    )
    opt, ref_opt = state["optimizer"]["state"], ref_state["optimizer"]["state"]
    assert opt.keys() == ref_opt.keys()
    for i in ref_opt:
        for k, v in ref_opt[i].items():
            if isinstance(v, torch.Tensor):
                torch.testing.assert_close(opt[i][k], v, rtol=1e-3, atol=1e-5, msg=f"{i}.{k}")
            else:
                assert opt[i][k] == v
    weights = load_model(ckpt, dtype=torch.float32).state_dict()
    ref_weights = load_model(ref_ckpt, dtype=torch.float32).state_dict()
    for name, t in ref_weights.items():
        torch.testing.assert_close(weights[name], t, rtol=0, atol=WEIGHT_ATOL, msg=name)


def test_ep2_run_stopped_midway_resumes_in_one_process(corpus, reference, tmp_path):
    torchrun(corpus, tmp_path, "--ep", "2", "--stop-at", "2")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000002"]
    # servable as is: `openk2 sample` on the distributed run's checkpoint
    r = subprocess.run([sys.executable, "-m", "openk2.cli", "sample", str(tmp_path), "--prompt", "the king",
                        "--max-new-tokens", "8"], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0 and r.stdout.startswith("the king"), r.stderr[-2000:]
    summary = single(corpus, tmp_path)  # the same command without torchrun picks it up
    assert summary["steps"] == 4
    assert_same_run(tmp_path, reference)


@pytest.mark.slow
def test_single_process_run_resumes_under_pp2(corpus, reference, tmp_path):
    single(corpus, tmp_path, stop_at=2)
    torchrun(corpus, tmp_path, "--pp", "2", "--microbatches", "2")
    assert_same_run(tmp_path, reference)


@pytest.mark.slow
def test_ep2_checkpoint_resumes_under_pp2_with_grad_accum(corpus, tmp_path):
    ref = tmp_path / "ref"
    single(corpus, ref, grad_accum=2, batch_size=2)
    run = tmp_path / "run"
    torchrun(corpus, run, "--ep", "2", "--stop-at", "2", grad_accum=2, batch_size=2)
    torchrun(corpus, run, "--pp", "2", "--microbatches", "2", grad_accum=2, batch_size=2)
    assert_same_run(run, ref)


def test_layout_errors_are_clear(corpus, tmp_path):
    r = subprocess.run([sys.executable, "-m", "openk2.cli", "train", "--preset", "tiny", "--corpus", corpus,
                        "--out-dir", str(tmp_path), "--ep", "2"], capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 2 and "needs 2 processes: launch with `torchrun" in r.stderr
    from openk2.distributed.mesh import ParallelConfig
    from openk2.train.distributed import resolve_layout

    assert resolve_layout(ParallelConfig(ep=2, dp=0), world=4).dp == 2
    with pytest.raises(ValueError, match="cannot be split"):
        resolve_layout(ParallelConfig(pp=3, dp=0), world=2)
    with pytest.raises(ValueError, match="processes were launched"):
        resolve_layout(ParallelConfig(pp=2, dp=2), world=2)
    with pytest.raises(ValueError, match="ns_dtype"):
        TrainConfig(ns_dtype="float16").validate()


def worker_idle_experts(rank: int, world: int, out: str) -> None:
    """ep=2 where no token is routed to rank 1's experts: the backward all-to-alls must still pair up."""
    from openk2.distributed.dist_muon import DistributedMuon
    from openk2.distributed.mesh import Mesh, ParallelConfig
    from openk2.distributed.parallelize import ParallelModel

    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny"))
    for blk in model.layers.values():
        if hasattr(blk.mlp, "gate"):
            blk.mlp.gate.e_score_correction_bias[4:] = -1e3  # experts 4-7 live on rank 1
    pm = ParallelModel(model, Mesh.build(ParallelConfig(ep=2)))
    ids = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(0))
    loss = pm.forward_backward(ids[:, :-1], ids[:, 1:])
    DistributedMuon(pm, lr=0.01).step()
    if rank == 0:
        torch.save(loss, out)


@pytest.mark.timeout(120)
def test_expert_parallel_with_idle_experts(tmp_path):
    from openk2.distributed.launch import spawn

    spawn(worker_idle_experts, 2, str(tmp_path / "loss.pt"))
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny"))
    for blk in model.layers.values():
        if hasattr(blk.mlp, "gate"):
            blk.mlp.gate.e_score_correction_bias[4:] = -1e3
    ids = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(0))
    ref = causal_lm_loss(model(ids[:, :-1]), ids[:, 1:])
    torch.testing.assert_close(torch.load(tmp_path / "loss.pt"), ref.detach(), rtol=1e-5, atol=0)
