"""The bad-input matrix (issues 18 and 23): every subcommand, run as a real `python -m openk2`
subprocess, with the mistakes a user makes first. Each must end with exactly one `error: ...` line on
stderr, the documented exit status (2: usage, 1: runtime, 130: Ctrl-C), no traceback, and no file
that existed before changed. The subprocesses run in parallel; the whole matrix is one test."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from serve_util import tiny_model

from openk2.checkpoint import save_model
from openk2.checkpoint.store import save_checkpoint
from openk2.tokenizer.tokenizer import K2Tokenizer

REPO = Path(__file__).resolve().parents[1]
RL_CONFIG = REPO / "configs" / "rl" / "arithmetic_tiny.json"


def _snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A working directory holding what the bad inputs point at."""
    root = tmp_path_factory.mktemp("world")
    model = tiny_model(max_positions=256)
    save_model(model, root / "ckpt")
    K2Tokenizer.byte_level().save_pretrained(root / "ckpt")
    save_checkpoint(root / "run", 1, model, K2Tokenizer.byte_level(), {"step": 1})
    shutil.copytree(root / "ckpt", root / "truncated")
    shard = next((root / "truncated").glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:1000])
    shutil.copytree(root / "ckpt", root / "badconfig")
    (root / "badconfig" / "config.json").write_text('{"hidden_size": 64,')
    (root / "afile").write_text("an ordinary file\n")
    (root / "full").mkdir()
    (root / "full" / "keep.txt").write_text("already here\n")
    (root / "chat.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    rl = json.loads(RL_CONFIG.read_text())
    (root / "rl_unknown_env.json").write_text(json.dumps({**rl, "envs": [{"name": "nope"}]}))
    (root / "rl_wrong_type.json").write_text(json.dumps({**rl, "steps": "twenty"}))
    (root / "opts_unknown.toml").write_text('promt = "x"\n')
    (root / "opts_type.toml").write_text('max-new-tokens = "many"\n')
    (root / "opts_broken.toml").write_text("prompt = \n")
    return root


def _busy_port() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    return s


# (case id, arguments, exit status, text the error line contains)
CASES: list[tuple[str, list[str], int, str]] = [
    # missing or broken files
    ("sample-missing", ["sample", "nowhere"], 2, "neither a checkpoint"),
    ("sample-truncated", ["sample", "truncated"], 1, "truncated"),
    ("serve-truncated", ["serve", "truncated", "--port", "0"], 1, "truncated"),
    ("serve-bad-config-json", ["serve", "badconfig", "--port", "0"], 1, "not valid JSON"),
    ("chat-missing", ["chat", "--model", "nowhere"], 2, "neither a checkpoint"),
    ("info-missing-model", ["info", "--model", "nowhere"], 2, "nowhere"),
    ("info-unknown-preset", ["info", "--preset", "foo"], 2, "unknown preset 'foo'"),
    ("plan-unknown-preset", ["plan", "--preset", "foo"], 2, "unknown preset 'foo'"),
    ("tokenizer-missing", ["tokenizer", "info", "--tokenizer", "nowhere"], 2, "nowhere"),
    ("export-into-nonempty-dir", ["export", "ckpt", "full"], 2, "not empty"),
    ("export-onto-a-file", ["export", "run", "afile"], 2, "afile"),
    ("export-missing", ["export", "nowhere", "out-x"], 2, "neither a checkpoint"),
    ("eval-missing-model", ["eval", "gym", "--model", "nowhere"], 2, "neither a checkpoint"),
    ("eval-compare-missing", ["eval", "compare", "nowhere.json"], 2, "nowhere.json"),
    ("sft-missing-data", ["sft", "nowhere.jsonl", "--init", "ckpt"], 2, "nowhere.jsonl"),
    ("sft-init-not-checkpoint", ["sft", "chat.jsonl", "--init", "afile"], 2, "afile"),
    (
        "synth-missing-input",
        ["synth", "rephrase", "--input", "nowhere.txt", "--out", "r.jsonl", "--model", "ckpt"],
        2,
        "nowhere.txt",
    ),  # fmt: skip
    (
        "synth-missing-tools",
        ["synth", "trajectories", "--tools", "nowhere.jsonl", "--scripted", "--out", "t.jsonl"],
        2,
        "nowhere.jsonl",
    ),  # fmt: skip
    ("synth-out-is-dir", ["synth", "tools", "--out", "full", "--no-synthetic"], 2, "is a directory"),
    (
        "train-out-dir-is-file",
        ["train", "--preset", "tiny", "--out-dir", "afile", "--steps", "1"],
        2,
        "afile",
    ),
    ("rl-missing-config", ["rl", "nowhere.json"], 2, "nowhere.json"),
    ("rl-unknown-env", ["rl", "rl_unknown_env.json", "--out-dir", "rl-out"], 2, "unknown environment 'nope'"),
    ("rl-wrong-type", ["rl", "rl_wrong_type.json"], 2, "rl_wrong_type.json"),
    ("rl-steps-0", ["rl", str(RL_CONFIG), "--steps", "0"], 2, "steps"),
    ("rl-init-not-checkpoint", ["rl", str(RL_CONFIG), "--init", "afile", "--out-dir", "rl-out"], 2, "afile"),
    # wrong types and out-of-range numbers
    ("train-steps-0", ["train", "--preset", "tiny", "--steps", "0", "--out-dir", "new-run"], 2, "steps"),
    ("train-steps-word", ["train", "--steps", "ten"], 2, "invalid int value: 'ten'"),
    ("sample-max-new-tokens-0", ["sample", "ckpt", "--max-new-tokens", "0"], 2, "--max-new-tokens"),
    ("sample-temperature-word", ["sample", "ckpt", "--temperature", "hot"], 2, "invalid float value"),
    ("chat-max-tokens-0", ["chat", "ckpt", "--max-tokens", "0"], 2, "--max-tokens"),
    ("serve-port-range", ["serve", "ckpt", "--port", "99999"], 2, "--port"),
    ("serve-bad-dtype", ["serve", "ckpt", "--dtype", "float64"], 2, "invalid choice"),
    ("eval-max-tokens-0", ["eval", "gym", "--model", "ckpt", "--max-tokens", "0"], 2, "--max-tokens"),
    (
        "eval-both-sources",
        ["eval", "gym", "--model", "ckpt", "--endpoint", "http://127.0.0.1:9/v1"],
        2,
        "exactly one",
    ),  # fmt: skip
    ("eval-bad-url", ["eval", "toolcall", "--endpoint", "ftp://x"], 2, "http(s) URL"),
    ("tokenizer-vocab-small", ["tokenizer", "train", "--vocab-size", "10", "--out", "tok"], 2, ">= 512"),
    ("synth-no-model", ["synth", "rephrase", "--input", "afile", "--out", "r.jsonl"], 2, "exactly one"),
    ("sample-two-models", ["sample", "ckpt", "--model", "run"], 2, "give the model once"),
    ("unknown-command", ["fly"], 2, "invalid choice"),
    ("unknown-flag", ["info", "--colour"], 2, "unrecognized arguments"),
    # --config FILE
    ("config-unknown-key", ["sample", "ckpt", "--config", "opts_unknown.toml"], 2, "unknown key 'promt'"),
    (
        "config-wrong-type",
        ["sample", "ckpt", "--config", "opts_type.toml"],
        2,
        "key 'max-new-tokens' expects an integer, got 'many'",
    ),  # fmt: skip
    ("config-broken", ["sample", "ckpt", "--config", "opts_broken.toml"], 2, "not valid TOML"),
    ("config-missing", ["serve", "ckpt", "--config", "nowhere.toml"], 2, "no such file"),
]
if not torch.cuda.is_available():
    CASES.append(
        ("train-device-cuda", ["train", "--preset", "tiny", "--device", "cuda"], 2, "CUDA is not available")
    )
    CASES.append(("sft-device-cuda", ["sft", "chat.jsonl", "--init", "ckpt", "--device", "cuda"], 2, "CUDA"))


def _openk2(cwd: Path, args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "openk2", *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def _check(case: str, out: subprocess.CompletedProcess, status: int, needle: str) -> list[str]:
    """What is wrong with one case's outcome (empty when it is right)."""
    problems = []
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    if out.returncode != status:
        problems.append(f"exit {out.returncode}, expected {status}")
    if len(lines) != 1 or not lines[0].startswith("error: "):
        problems.append(f"stderr is not one 'error:' line: {out.stderr[-600:]!r}")
    elif needle not in lines[0]:
        problems.append(f"{needle!r} not in {lines[0]!r}")
    if "Traceback" in out.stderr + out.stdout:
        problems.append("a traceback")
    return [f"{case}: {p}" for p in problems]


@pytest.mark.slow
def test_bad_input_matrix(world):
    before = _snapshot(world)
    busy = _busy_port()
    cases = CASES + [
        ("serve-busy-port", ["serve", "ckpt", "--port", str(busy.getsockname()[1])], 1, "in use")
    ]
    try:
        with ThreadPoolExecutor(max(2, os.cpu_count() or 2)) as pool:
            outs = list(pool.map(lambda c: _openk2(world, c[1]), cases))
    finally:
        busy.close()
    problems = [
        p for (case, _, status, needle), out in zip(cases, outs) for p in _check(case, out, status, needle)
    ]
    busy_out = outs[-1]
    if "openk2 serve:" in busy_out.stdout:
        problems.append("serve-busy-port: printed the serving summary before failing")
    assert not problems, "\n".join(problems)
    assert _snapshot(world) == before, "a failed command changed an existing file"
    assert not (world / "rl-out").exists() and not (world / "new-run").exists()


@pytest.mark.slow
def test_export_of_a_run_dir_works(world, tmp_path):
    out = _openk2(world, ["export", "run", str(tmp_path / "exported")])
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    assert (tmp_path / "exported" / "config.json").is_file()
    assert (tmp_path / "exported" / "tiktoken.model").is_file()
    again = _openk2(world, ["export", "run", str(tmp_path / "exported")])  # re-export: one line
    assert _check("re-export", again, 2, "not empty") == []


@pytest.mark.slow
def test_ctrl_c_is_one_line_and_exit_130(world, tmp_path):
    """SIGINT in the middle of `synth trajectories`: one line, status 130, what was done is kept."""
    tools = _openk2(world, ["synth", "tools", "--out", str(tmp_path / "tools.jsonl"), "--no-synthetic"])
    assert tools.returncode == 0, tools.stderr
    out_file = tmp_path / "traj.jsonl"
    cmd = [sys.executable, "-m", "openk2", "synth", "trajectories", "--tools", str(tmp_path / "tools.jsonl")]
    cmd += ["--scripted", "--out", str(out_file), "--agents", "8", "--tasks-per-agent", "50"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out_file.exists() and out_file.stat().st_size) and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 130 and errors == ["error: interrupted"], stderr[-1000:]
    assert "Traceback" not in stderr + stdout
    assert out_file.read_text().strip()  # the finished trajectories stay
