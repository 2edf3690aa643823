"""The shipped arithmetic RL config and the RL experiments run as documented: `openk2 rl
configs/rl/arithmetic_tiny.json --init CKPT` from a checkpoint (and says so on the console when no group
has reward spread), and experiments/rl_worked_example.py and experiments/rl_tau.py end to end in their
`--quick` mode, writing under the given directory and not into docs/."""

import json
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from openk2.checkpoint import load_model, save_model
from openk2.config import ModelConfig
from openk2.model.transformer import Transformer
from openk2.rl.trainer import RLConfig, RLTrainer
from openk2.tokenizer import K2Tokenizer

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "rl" / "arithmetic_tiny.json"


def test_shipped_arithmetic_config_pins_newton_schulz():
    """The shipped config parses, and pins the Newton-Schulz precision (its curve in docs/rl.md then
    reproduces on CPUs with and without bf16 units)."""
    config = RLConfig.load(CONFIG)
    assert config.ns_dtype in ("float32", "bfloat16")
    assert config.eval_every <= config.steps and config.eval_tasks >= 100


def never_stopping_checkpoint(path: Path) -> Path:
    """A `tiny` checkpoint whose every next token is "7" or "8", so it never closes its answer: every
    sample is truncated and scores the same (the case of a checkpoint that is not warmed up for the
    task). Only one hidden dimension reaches the LM head, and it maps to those two tokens."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny"))
    tokenizer = K2Tokenizer.byte_level()
    with torch.no_grad():
        model.norm.weight.zero_()
        model.norm.weight[0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[tokenizer.encode("7")[0], 0] = 100.0
        model.lm_head.weight[tokenizer.encode("8")[0], 0] = -100.0
    save_model(model, path)
    tokenizer.save_pretrained(path, model_max_length=model.config.max_position_embeddings)
    return path


def test_shipped_arithmetic_config_runs_from_a_checkpoint_and_warns_without_spread(tmp_path, capsys):
    """The shipped config from a checkpoint (its held-out set cut to 8 tasks to keep the test fast), on
    the console as `openk2 rl` prints it: a checkpoint that never answers gets the same reward on every
    sample, and the console says that no group had reward spread (a line for the step, and a summary)."""
    ckpt = never_stopping_checkpoint(tmp_path / "ckpt")
    config = replace(
        RLConfig.load(CONFIG), model=str(ckpt), steps=2, eval_tasks=8, out_dir=str(tmp_path / "run")
    )
    trainer = RLTrainer(config)  # logs with print, as the command does
    history = trainer.train()
    lines = capsys.readouterr().out.splitlines()
    assert [h["signal_groups"] for h in history if "signal_groups" in h] == [0, 0]
    assert all(h["truncation"] == 1.0 and h["drift"] == 0.0 for h in history if "drift" in h)
    step_warnings = [x for x in lines if "no group has reward spread" in x]
    assert step_warnings[0].startswith("warning: step 1: no group has reward spread (all samples of each")
    assert lines[-1] == "warning: 2 of 2 steps had no reward spread in any group"
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["config"]["ns_dtype"] == config.ns_dtype == "float32"


@pytest.mark.slow
def test_worked_example_and_tau_experiment_quick(tmp_path):
    """Both experiments end to end in --quick mode into tmp_path: results, plots and an SFT checkpoint
    that loads; nothing written to docs/ without --docs. SIGTERM during an RL run stops the whole
    script (after the run driver's checkpoint), not just that run."""
    docs = REPO / "docs"
    before = {p: p.stat().st_mtime_ns for p in docs.rglob("*") if p.is_file()}
    ex = tmp_path / "example"
    run = subprocess.run(
        [sys.executable, "experiments/rl_worked_example.py", "--quick", "--out", str(ex)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((ex / "results.json").read_text())
    assert results["ns_dtype"] == "float32" and results["threads"] == 1
    assert len(results["post_rl"]) == len(results["gain_greedy"]) == 2
    assert results["cpu_s"]["total"] > results["cpu_s"]["sft"] > 0
    assert "cpu features" in results["machine"]
    for name in ("rl_worked_example.png", "rl_seed0.png", "rl_seed1.png"):
        assert (ex / name).stat().st_size > 1000
    sft = load_model(ex / "sft_checkpoint", dtype=torch.float32)  # the `--init` of the shipped config
    assert sum(p.numel() for p in sft.parameters()) > 0

    tau = tmp_path / "tau"
    run = subprocess.run(
        [sys.executable, "experiments/rl_tau.py", "--quick", "--init", str(ex / "sft_checkpoint"),
         "--out", str(tau)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    table = json.loads((tau / "rl_tau.json").read_text())["table"]
    assert [(r["tau"], r["updates_per_step"]) for r in table] == [(0.01, 1), (0.01, 4)]
    assert (tau / "rl_tau.png").stat().st_size > 1000
    assert "| tau | updates/step |" in (tau / "rl_tau.md").read_text()
    after = {p: p.stat().st_mtime_ns for p in docs.rglob("*") if p.is_file()}
    assert after == before

    stop = tmp_path / "stop"
    shutil.copytree(ex / "sft_checkpoint", stop / "sft_checkpoint")
    proc = subprocess.Popen(
        [sys.executable, "-u", "experiments/rl_worked_example.py", "--reuse-sft", "--out", str(stop),
         "--sft-steps", "20", "--rl-steps", "50", "--seeds", "2", "--eval-tasks", "16"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    seen = []
    for line in proc.stdout:  # the first RL step of seed 0 is done: the run loop holds the signal
        seen.append(line)
        if " rl0 step=1 " in line:
            proc.send_signal(signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, "".join(seen) + out + err[-3000:]
    assert re.search(r"rl seed 0: SIGTERM, stopped", err) and "Traceback" not in err, err[-3000:]
    assert (stop / "rl_seed0").is_dir() and not (stop / "rl_seed1").exists()
    assert list((stop / "rl_seed0" / "checkpoints").glob("step-*")) and not (stop / "results.json").exists()
