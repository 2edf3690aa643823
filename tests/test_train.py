"""The pre-training loop: bit-identical resume, NaN handling, checkpoints, schedules, data, loss."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from openk2 import ModelConfig, Transformer
from openk2.checkpoint import load_model
from openk2.checkpoint.store import latest_checkpoint, list_checkpoints, load_trainer_state
from openk2.train.data import PackedLoader, segment_ids_from_eos
from openk2.train.logging import read_metrics
from openk2.train.loop import (
    TrainConfig,
    Trainer,
    TrainingDiverged,
    build_optimizer,
    causal_lm_loss,
    pretrain,
)
from openk2.train.schedule import Schedule


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENK2_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    words = ["the", "king", "queen", "said", "to", "his", "her", "and", "of", "a", "crown", "sword"]
    docs = [" ".join(rng.choice(words, 400)) + "." for _ in range(6)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(docs))
    return str(path)


def tiny_cfg(corpus, out_dir, **kw) -> TrainConfig:
    base = dict(preset="tiny", corpus=corpus, out_dir=str(out_dir), steps=6, batch_size=2, seq_len=32,
                grad_accum=2, lr=0.01, warmup_steps=2, eval_every=3, eval_batches=1, save_every=2,
                keep_checkpoints=10, progress=False, tensorboard=False, threads=1)  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def train_losses(run_dir) -> dict[int, float]:
    """step -> loss; a step logged twice (a killed run redone after resume) keeps its last record."""
    return {m["step"]: m["loss"] for m in read_metrics(run_dir) if m.get("kind") == "train"}


def test_resume_gives_bit_identical_losses(corpus, tmp_path):
    full = pretrain(tiny_cfg(corpus, tmp_path / "full"))
    assert full["steps"] == 6
    pretrain(tiny_cfg(corpus, tmp_path / "split", stop_at=3))  # "killed" after step 3 ...
    assert [p.name for p in list_checkpoints(tmp_path / "split")] == ["step-0000002", "step-0000003"]
    pretrain(tiny_cfg(corpus, tmp_path / "split"))  # ... and resumed from its last checkpoint
    a, b = train_losses(tmp_path / "full"), train_losses(tmp_path / "split")
    assert list(a) == list(range(1, 7)) and a == b  # exact float equality, every step
    evals = lambda d: [m["loss"] for m in read_metrics(d) if m.get("kind") == "eval"]  # noqa: E731
    assert evals(tmp_path / "full") == evals(tmp_path / "split")
    # the final weights (incl. the routing bias buffers) are identical too
    wa = load_model(latest_checkpoint(tmp_path / "full"), dtype=torch.float32).state_dict()
    wb = load_model(latest_checkpoint(tmp_path / "split"), dtype=torch.float32).state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_resume_after_sigkill(corpus, tmp_path):
    """A real kill -9 in the middle of training; the resumed run's losses equal an uninterrupted one's."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = [sys.executable, "-m", "openk2.cli", "train", "--preset", "tiny", "--corpus", corpus,
            "--steps", "10", "--batch-size", "2", "--seq-len", "32", "--lr", "0.01", "--warmup-steps", "2",
            "--save-every", "2", "--eval-every", "5", "--eval-batches", "1", "--threads", "1",
            "--no-progress", "--no-tensorboard", "--no-sample"]  # fmt: skip
    subprocess.run(args + ["--out-dir", str(tmp_path / "full")], check=True, env=env, capture_output=True)
    proc = subprocess.Popen(args + ["--out-dir", str(tmp_path / "killed")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 300
    while time.time() < deadline and (tmp_path / "killed" / "checkpoints" / "step-0000004").exists() is False:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = latest_checkpoint(tmp_path / "killed")
    assert done is not None and load_trainer_state(done)["step"] < 10
    subprocess.run(args + ["--out-dir", str(tmp_path / "killed")], check=True, env=env, capture_output=True)
    assert train_losses(tmp_path / "full") == train_losses(tmp_path / "killed")


def test_nan_loss_stops_with_clear_message_and_keeps_checkpoint(corpus, tmp_path):
    model = Transformer(ModelConfig.from_preset("tiny"))
    cfg = tiny_cfg(corpus, tmp_path / "nan")
    trainer = Trainer(model, build_optimizer(model, cfg), Schedule("wsd", 6, 2), cfg)
    ids = torch.randint(0, 256, (2, 33))
    from openk2.train.data import Batch

    batch = Batch(ids[:, :-1], ids[:, 1:])
    trainer.train_step([batch])
    with torch.no_grad():
        model.layers["1"].self_attn.kv_b_proj.weight[0, 0] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TrainingDiverged, match="step 2: loss nan"):
        trainer.train_step([batch])
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) or torch.isnan(before[k]).any() for k in before)
    assert trainer.step == 1

    # end to end: an absurd learning rate blows the run up; the CLI says so, exits 1, checkpoints stay
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = tmp_path / "blowup"
    r = subprocess.run(
        [sys.executable, "-m", "openk2.cli", "train", "--preset", "tiny", "--corpus", corpus, "--out-dir",
         str(out), "--steps", "30", "--batch-size", "2", "--seq-len", "32", "--lr", "1e12", "--warmup-steps",
         "0", "--grad-clip", "1e30", "--save-every", "1", "--no-progress", "--no-tensorboard",
         "--threads", "1"],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 1, r.stdout + r.stderr
    assert "training diverged" in r.stderr and "last good checkpoint" in r.stderr
    good = latest_checkpoint(out)
    assert good is not None and str(good) in r.stderr
    load_model(good)  # intact and loadable


def test_causal_lm_loss_mask():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    targets = torch.randint(0, 11, (2, 5))
    full = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    assert torch.allclose(causal_lm_loss(logits, targets), full)
    mask = torch.zeros(2, 5)
    mask[0, 2] = mask[1, 4] = 1
    expected = (
        torch.nn.functional.cross_entropy(logits[0, 2:3], targets[0, 2:3])
        + torch.nn.functional.cross_entropy(logits[1, 4:5], targets[1, 4:5])
    ) / 2
    assert torch.allclose(causal_lm_loss(logits, targets, mask), expected)
    assert torch.allclose(causal_lm_loss(logits.bfloat16(), targets, mask.bool()), expected, atol=2e-2)


def test_schedules():
    wsd = Schedule("wsd", total_steps=100, warmup_steps=10, decay_fraction=0.2, min_ratio=0.1)
    assert wsd(0) == pytest.approx(0.1) and wsd(9) == 1.0
    assert wsd(50) == 1.0 and wsd(79) == 1.0
    assert wsd(80) == 1.0 and wsd(99) == pytest.approx(0.1)
    assert all(wsd(i) >= wsd(i + 1) for i in range(10, 99))
    cos = Schedule("cosine", total_steps=100, warmup_steps=10, min_ratio=0.0)
    assert cos(10) == 1.0 and cos(99) == pytest.approx(0.0, abs=1e-12)
    assert cos(54) == pytest.approx(0.5 * (1 + math.cos(math.pi * 44 / 89)))
    with pytest.raises(ValueError, match="unknown schedule"):
        Schedule("linear")


def test_packed_loader_resumes_and_masks_documents():
    tokens = np.arange(1000, dtype=np.int32)
    a = PackedLoader(tokens, batch_size=3, seq_len=16, seed=1)
    first = [a.next_batch() for _ in range(25)]  # crosses an epoch boundary (62 windows)
    b = PackedLoader(tokens, batch_size=3, seq_len=16, seed=1)
    for _ in range(10):
        b.next_batch()
    c = PackedLoader(tokens, batch_size=3, seq_len=16, seed=1)
    c.load_state_dict(b.state_dict())
    for x in first[10:]:
        y = c.next_batch()
        assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.targets, y.targets)
    assert torch.equal(first[0].targets[:, :-1], first[0].input_ids[:, 1:])
    with pytest.raises(ValueError, match="data changed"):
        PackedLoader(tokens[:500], 3, 16, seed=1).load_state_dict(b.state_dict())
    seg = segment_ids_from_eos(torch.tensor([[5, 9, 5, 5, 9, 5]]), eos_id=9)
    assert seg.tolist() == [[0, 0, 1, 1, 1, 2]]


def test_cli_errors_are_clear(corpus, tmp_path):
    cli = [sys.executable, "-m", "openk2.cli"]
    r = subprocess.run(cli + ["train", "--corpus", str(tmp_path / "nope"), "--out-dir", str(tmp_path / "x")],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 2 and "unknown corpus" in r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "openk2.cli", "sample", str(tmp_path)], capture_output=True, text=True
    )
    assert r.returncode == 2 and "neither a checkpoint" in r.stderr


def test_metrics_are_jsonl(corpus, tmp_path):
    pretrain(tiny_cfg(corpus, tmp_path / "m", steps=2, save_every=100))
    lines = (tmp_path / "m" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(x) for x in lines]
    assert records[0]["kind"] == "config"
    train = [r for r in records if r["kind"] == "train"]
    assert {"loss", "lr", "grad_norm", "max_logit", "imbalance", "tokens_per_s"} <= set(train[0])
    assert (tmp_path / "m" / "curves.png").stat().st_size > 1000


def test_memory_options_keep_gradients():
    """Recomputation is exact; FP8 (e4m3, 1x128 tiles) activation storage is close; both switch off."""
    from openk2.train.memory import MemoryOptions, apply_memory_options, dequantize_fp8, quantize_fp8

    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny"))
    ids = torch.randint(0, 512, (2, 33))

    def grads(opts):
        apply_memory_options(model, opts)
        model.zero_grad()
        causal_lm_loss(model(ids[:, :-1]), ids[:, 1:]).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    base = grads(MemoryOptions())
    recomputed = grads(MemoryOptions(recompute=True))
    assert all(torch.equal(base[k], recomputed[k]) for k in base)
    fp8 = grads(MemoryOptions(fp8_activations=True))
    experts = "layers.1.mlp.experts.up_proj"
    assert not torch.equal(base[experts], fp8[experts])  # the FP8 path really ran
    for k in base:
        assert (base[k] - fp8[k]).norm() <= 0.1 * base[k].norm() + 1e-12, k
    assert all(torch.equal(base[k], v) for k, v in grads(MemoryOptions()).items())
    x = torch.randn(3, 300) * torch.logspace(-3, 3, 300)  # tiles keep small and large values apart
    q, scale, n = quantize_fp8(x)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (3, 3, 128) and scale.shape == (3, 3, 1)
    assert ((dequantize_fp8(q, scale, n, torch.float32) - x).abs() <= 0.07 * x.abs().amax(-1, True)).all()


# ---------------------------------------------------------------------------------------- run lifecycle
def test_runs_never_mix(corpus, tmp_path, capsys):
    """--no-resume on a run refuses (nothing changed) unless --overwrite, which moves the old run
    aside; a finished run says so; a different model is refused; changed settings warn."""
    from openk2.train.run import RunError

    run = tmp_path / "run"
    pretrain(tiny_cfg(corpus, run, steps=2, save_every=1))
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(RunError, match="already holds a run.*--overwrite"):
        pretrain(tiny_cfg(corpus, run, steps=2), resume=False)
    with pytest.raises(RunError, match=r"already at step 2/2; use --steps larger or --no-resume"):
        pretrain(tiny_cfg(corpus, run, steps=2))
    bigger = tmp_path / "bigger.json"
    config = ModelConfig.from_preset("tiny").to_hf_dict()
    bigger.write_text(json.dumps({**config, "intermediate_size": 96}))
    with pytest.raises(RunError, match="different model \\(intermediate_size 128 there, 96 here\\)"):
        pretrain(tiny_cfg(corpus, run, steps=3, model_config=str(bigger)))
    with pytest.raises(RunError, match="is a file"):
        pretrain(tiny_cfg(corpus, run / "metrics.jsonl", steps=3))
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # nothing changed

    capsys.readouterr()
    out = pretrain(tiny_cfg(corpus, run, steps=3, lr=0.02))  # extends the run, and says what differs
    err = capsys.readouterr().err
    assert out["steps"] == 3 and "lr 0.01 -> 0.02" in err and "steps 2 -> 3" in err
    run_id = load_trainer_state(latest_checkpoint(run))["run_id"]

    pretrain(tiny_cfg(corpus, run, steps=1), resume=False, overwrite=True)
    (aside,) = tmp_path.glob("run.old-*")
    assert load_trainer_state(latest_checkpoint(aside))["run_id"] == run_id  # the old run, whole
    assert [p.name for p in list_checkpoints(run)] == ["step-0000001"]
    assert load_trainer_state(latest_checkpoint(run))["run_id"] != run_id
    assert [m["step"] for m in read_metrics(run) if m.get("kind") == "train"] == [1]


def test_model_config_file_and_default_out_dir(corpus, tmp_path, monkeypatch, capsys):
    """`--model-config` takes an HF config.json (here a DeepSeek-V3-typed one); the default run
    directory is runs/<preset or config name>; the start-up summary and log lines are printed."""
    assert TrainConfig(preset="tiny").validate().out_dir == "runs/tiny"
    config = {**ModelConfig.from_preset("tiny").to_hf_dict(), "model_type": "deepseek_v3"}
    (tmp_path / "my_v3.json").write_text(json.dumps(config))
    monkeypatch.chdir(tmp_path)
    cfg = tiny_cfg(corpus, "x", steps=2, model_config="my_v3.json", log_every=1)
    cfg.out_dir = None
    assert cfg.validate().out_dir == "runs/my_v3"
    flags = ["--corpus", corpus, "--steps", "2", "--batch-size", "2", "--seq-len", "32", "--threads", "1",
             "--log-every", "1", "--no-progress", "--no-tensorboard", "--no-sample"]  # fmt: skip
    code, out, err = train_cli(["--model-config", "my_v3.json", *flags], capsys)
    assert code == 0, err
    assert "parameters" in out and "activated per token" in out and "Newton-Schulz in" in out
    assert "output runs/my_v3 (new run" in out
    assert "step 1/2  loss " in out and "tok/s" in out and "ETA" in out
    saved = json.loads((tmp_path / "runs/my_v3/checkpoints/step-0000002/config.json").read_text())
    assert saved["model_type"] == "deepseek_v3"
    (tmp_path / "bad.json").write_text(json.dumps({**config, "hidden_size": "wide"}))
    code, out, err = train_cli(["--model-config", "bad.json", *flags], capsys)
    assert code == 2 and err.count("\n") == 1 and "key 'hidden_size' expects int, got 'wide'" in err, err
    assert not (tmp_path / "runs" / "bad").exists()


def train_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """`openk2 train ARGV` in this process: (exit code, stdout, stderr)."""
    import argparse

    from openk2.train import cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    capsys.readouterr()
    code = cli.run(parser.parse_args(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_invalid_utf8_corpus_warns_or_refuses(tmp_path):
    from openk2.train.data import check_utf8

    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\u00e9 na\u00efve ".encode("latin-1") * 50)
    assert "100 bytes of invalid UTF-8 in 1 file(s)" in check_utf8(str(path))
    with pytest.raises(ValueError, match="refused by --strict-utf8"):
        check_utf8(str(path), strict=True)
    path.write_text("caf\u00e9 " * 50)
    assert check_utf8(str(path)) is None


@pytest.mark.slow
def test_sigterm_saves_and_resume_is_bit_exact(corpus, tmp_path):
    """SIGTERM mid-run: the step finishes, a checkpoint is written, the command exits 143 with one
    line; resuming gives the uninterrupted run's losses and weights exactly."""
    full = tmp_path / "full"
    pretrain(tiny_cfg(corpus, full, steps=40, save_every=1000, eval_every=1000))
    run = tmp_path / "term"
    flags = "--steps 40 --batch-size 2 --seq-len 32 --grad-accum 2 --lr 0.01 --warmup-steps 2 "
    flags += "--eval-every 1000 --eval-batches 1 --save-every 1000 --keep-checkpoints 10 --threads 1 "
    flags += "--no-progress --no-tensorboard --no-sample"
    args = [sys.executable, "-m", "openk2.cli", "train", "--preset", "tiny", "--corpus", corpus, "--out-dir",
            str(run), *flags.split()]  # fmt: skip
    proc = subprocess.Popen(args, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.time() + 300
    while time.time() < deadline and len(train_losses(run) if (run / "metrics.jsonl").exists() else {}) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and "SIGTERM: stopped at step" in err
    (ckpt,) = list_checkpoints(run)
    stopped = load_trainer_state(ckpt)["step"]
    assert 3 <= stopped < 40 and not list((run / "checkpoints").glob(".tmp-*"))
    pretrain(tiny_cfg(corpus, run, steps=40, save_every=1000, eval_every=1000))
    assert train_losses(full) == train_losses(run)
    wa = load_model(latest_checkpoint(full), dtype=torch.float32).state_dict()
    wb = load_model(latest_checkpoint(run), dtype=torch.float32).state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_jsonl_corpus_streams_from_shards_and_resumes_bit_exact(corpus, tmp_path):
    """A JSONL corpus goes through memory-mapped token shards; a run stopped at step 3 and resumed
    continues at the exact token: the same losses as an uninterrupted run."""
    docs = Path(corpus).read_text().split("\n\n")
    data = tmp_path / "jsonl"
    data.mkdir()
    with open(data / "part-0.jsonl", "w") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}) + "\n")
    full = pretrain(tiny_cfg(str(data), tmp_path / "full"))
    assert full["steps"] == 6
    assert any((tmp_path / "cache" / "shards").rglob("shard-00000.bin"))
    pretrain(tiny_cfg(str(data), tmp_path / "split", stop_at=3))
    pretrain(tiny_cfg(str(data), tmp_path / "split"))
    assert train_losses(tmp_path / "full") == train_losses(tmp_path / "split")
