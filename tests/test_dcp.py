"""Sharded checkpoints (`--checkpoint-format sharded`, torch.distributed.checkpoint) and the
shard-aware streamed loader, end to end under `torchrun --nproc-per-node 2` on CPU/gloo.

The corpus is JSONL, so it goes through memory-mapped token shards and every rank reads only its rows
(`StreamingLoader.shard_`). The reference is the uninterrupted single-process run on the same corpus;
a run saved sharded under ep=2 and resumed under another layout (one process, or pp=2) must log the
same losses (rtol 1e-5; why that tolerance: tests/test_distributed_train.py), which holds only if
every rank saw the same tokens at the same step and the weights and Muon/AdamW state came back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_distributed_train import COMMON, assert_same_run, single, torchrun

from openk2.checkpoint import load_model
from openk2.checkpoint.sharded import SHARDED_DIR, is_sharded, read_model_state, read_optimizer_state
from openk2.checkpoint.store import (
    STATE_FILE,
    latest_checkpoint,
    list_checkpoints,
    load_trainer_state,
    verify_checkpoint,
)
from openk2.train.loop import TrainConfig, build_optimizer

SHARDED = ("--checkpoint-format", "sharded")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("dcp")
    rng = np.random.default_rng(1)
    words = ["the", "king", "queen", "said", "to", "his", "her", "and", "of", "a", "crown", "sword"]
    path = root / "corpus.jsonl"
    with open(path, "w") as f:
        for _ in range(24):
            f.write(json.dumps({"text": " ".join(rng.choice(words, 100)) + "."}) + "\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OPENK2_CACHE", str(root / "cache"))  # in-process runs and the torchrun children
        yield str(path)


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    single(corpus, out)
    return out


@pytest.mark.slow
def test_sharded_ep2_resumes_in_one_process_and_under_pp2(corpus, reference, tmp_path):
    run = tmp_path / "run"
    torchrun(corpus, run, "--ep", "2", "--stop-at", "2", *SHARDED)
    ckpt = latest_checkpoint(run)
    assert [p.name for p in list_checkpoints(run)] == ["step-0000002"] and is_sharded(ckpt)
    # written by both ranks (one .distcp file each), no safetensors, no optimizer in the trainer state
    assert len(list((ckpt / SHARDED_DIR).glob("*.distcp"))) == 2
    assert not list(ckpt.glob("*.safetensors"))
    state = load_trainer_state(ckpt)
    assert "optimizer" not in state and state["step"] == 2 and state["data"]["position"] > 0
    verify_checkpoint(ckpt)  # the manifest covers the shards
    # the layout-independent content equals the single-format checkpoint of the reference run at the
    # same step: weights and optimizer state assembled from the two ranks' shards
    ref_run = tmp_path / "ref"
    single(corpus, ref_run, stop_at=2)
    ref_ckpt = latest_checkpoint(ref_run)
    weights = read_model_state(ckpt)
    ref_model = load_model(ref_ckpt, dtype=torch.float32)
    for name, t in ref_model.state_dict().items():
        torch.testing.assert_close(weights[name], t, rtol=0, atol=1e-5, msg=name)
    optim = read_optimizer_state(ckpt)
    ref_opt = build_optimizer(ref_model, TrainConfig(**COMMON))
    ref_opt.load_state_dict(load_trainer_state(ref_ckpt)["optimizer"])
    assert len(optim) == len(ref_opt.state)
    for name, p in ref_model.named_parameters():
        for key, v in ref_opt.state[p].items():
            got = optim[name][key]
            if isinstance(v, torch.Tensor):
                torch.testing.assert_close(got.view_as(v), v, rtol=1e-3, atol=1e-5, msg=f"{name}.{key}")
            else:
                assert int(got) == v

    # resume under another layout: one process (no torchrun), and pp=2 under torchrun
    one = tmp_path / "one"
    os.replace(run, one)
    subprocess.run(["cp", "-r", str(one), str(run)], check=True)
    assert single(corpus, one)["steps"] == 4
    assert_same_run(one, reference)
    torchrun(corpus, run, "--pp", "2", "--microbatches", "2", *SHARDED)
    assert_same_run(run, reference)


@pytest.mark.slow
def test_single_process_checkpoint_resumes_sharded_under_ep2_then_exports(corpus, reference, tmp_path):
    single(corpus, tmp_path, stop_at=2)  # the full format, from one process
    torchrun(corpus, tmp_path, "--ep", "2", *SHARDED)
    assert_same_run(tmp_path, reference)
    final = latest_checkpoint(tmp_path)
    assert is_sharded(final) and not (final / STATE_FILE).stat().st_size > 1 << 20
    # the single-directory HF export is a separate step that reads the shards
    out = tmp_path / "hf"
    r = subprocess.run([sys.executable, "-m", "openk2.cli", "export", str(tmp_path), str(out)],
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    exported = load_model(out, dtype=torch.float32).state_dict()
    ref = load_model(latest_checkpoint(reference), dtype=torch.float32).state_dict()
    for name, t in ref.items():
        torch.testing.assert_close(exported[name], t.to(exported[name].dtype), rtol=0, atol=1e-2, msg=name)


def test_crash_during_a_sharded_save_leaves_no_checkpoint(corpus, tmp_path, monkeypatch):
    """The shards go into the temporary directory; a failure before the rename leaves nothing that
    resume would pick (the single-process variant of the same save path)."""
    from openk2.checkpoint import store

    def boom(tmp: Path) -> None:
        (tmp / SHARDED_DIR).mkdir()
        (tmp / SHARDED_DIR / "__0_0.distcp").write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        store.save_checkpoint(tmp_path, 3, None, None, {"step": 3}, write_model=boom)
    assert list_checkpoints(tmp_path) == [] and list((tmp_path / "checkpoints").iterdir()) == []


def test_device_cuda_missing_is_one_line_on_every_rank(corpus, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    args = [f"--{k.replace('_', '-')}={v}" for k, v in COMMON.items()]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "openk2.cli", "train", "--corpus", corpus, "--out-dir", str(tmp_path), *args, "--ep", "2",
           "--device", "cuda", "--no-progress", "--no-tensorboard"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    # each rank that gets there prints the line; torchrun SIGTERMs the other rank as soon as the first
    # one exits, so under load the slower rank may be stopped before it prints its own
    assert 1 <= len(errors) <= 2 and all("CUDA is not available" in e for e in errors), r.stderr[-2000:]
    # the only traceback is torchrun's own report that its children failed (ChildFailedError), not
    # one from a worker: nothing in openk2 raised through
    assert r.stderr.count("Traceback") == 1 and "ChildFailedError" in r.stderr
    assert "openk2/" not in r.stderr.split("Traceback")[1].split("ChildFailedError")[0]


def worker_save_ep2_dp2(rank: int, world: int, out: str) -> None:
    """dp=2 x ep=2: expert optimizer state is a dp slice inside an ep slice. Train 2 steps, save
    sharded, and keep this rank's gathered (full_state) view for the check."""
    from openk2 import ModelConfig, Transformer
    from openk2.distributed import checkpoint as dckpt
    from openk2.distributed.dist_muon import DistributedMuon
    from openk2.distributed.mesh import Mesh, ParallelConfig
    from openk2.distributed.parallelize import ParallelModel

    torch.manual_seed(0)
    pm = ParallelModel(Transformer(ModelConfig.from_preset("tiny")), Mesh.build(ParallelConfig(dp=2, ep=2)))
    opt = DistributedMuon(pm, lr=0.01, ns_dtype=torch.float32)
    ids = torch.randint(0, 512, (4, 17), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        opt.zero_grad()
        pm.forward_backward(ids[:, :-1], ids[:, 1:])
        pm.reduce_stats()
        opt.step()
    dckpt.save(out, pm, opt, step=2)
    full = opt.full_state()
    torch.save({"ep_rank": pm.mesh.ep_rank, "state": full, "model": pm.chunks[0].state_dict()},
               Path(out) / f"rank{rank}.pt")  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ep2_dp2_shards_assemble_to_every_ranks_state(tmp_path):
    from openk2.distributed.expert_parallel import is_expert_param
    from openk2.distributed.launch import spawn

    spawn(worker_save_ep2_dp2, 4, str(tmp_path))
    assert len(list((tmp_path / SHARDED_DIR).glob("*.distcp"))) == 4
    model, optim = read_model_state(tmp_path), read_optimizer_state(tmp_path)
    for rank in range(4):
        blob = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        e = blob["ep_rank"]
        for name, t in blob["model"].items():
            n = t.shape[0]
            want = model[name][e * n : (e + 1) * n] if is_expert_param(name) else model[name]
            torch.testing.assert_close(want, t, rtol=0, atol=0, msg=name)
        for name, entry in blob["state"].items():
            for key, v in entry.items():
                got = optim[name][key]
                if not isinstance(v, torch.Tensor):
                    assert int(got) == v
                    continue
                n = v.numel()
                part = got[e * n : (e + 1) * n] if is_expert_param(name) else got
                torch.testing.assert_close(part.view_as(v), v, rtol=0, atol=0, msg=f"{name}.{key}")
