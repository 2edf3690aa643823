"""Local checkpoints through the engine, and the conformance suite against the project's own server
(`openk2 serve`, a real subprocess) on a tiny random checkpoint.

A random model never opens a tool-call section by itself, so every call it makes in these tests is
one that constrained decoding forced: with constraints on, all of them must validate (schema accuracy
1.0); with them off, the suite reports what the model really does (here: no calls at all)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from eval_util import save_tiny_checkpoint
from serve_util import serve_process

from openk2.client import ChatRequest, LocalBackend
from openk2.eval.harness import ResultStore
from openk2.eval.toolcall_conformance import check_call, load_cases

FORCED = ["required", "named", "none"]  # the cases where tool_choice decides (+ "none": must not call)
MAX_TOKENS = 2048  # enough for the longest argument object the suite's bounded schemas allow


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-eval")
    save_tiny_checkpoint(path, max_positions=8192)
    return path


def test_local_backend_named_call_is_valid_and_streams_alike(ckpt):
    backend = LocalBackend(ckpt, max_batch=4)
    case = next(c for c in load_cases() if c["id"] == "named-thermostat")
    plain, streamed, free = backend.chat_many(
        [
            ChatRequest(case["messages"], case["tools"], case["tool_choice"], max_tokens=256),
            ChatRequest(case["messages"], case["tools"], case["tool_choice"], max_tokens=256, stream=True),
            ChatRequest([{"role": "user", "content": "hi"}], max_tokens=8),
        ]
    )
    assert plain.error is None and [c.name for c in plain.tool_calls] == ["set_thermostat"]
    call = plain.tool_calls[0]
    assert check_call({"name": call.name, "arguments": call.arguments}, case["tools"]) == (True, None)
    assert [(c.name, c.arguments) for c in streamed.tool_calls] == [(call.name, call.arguments)]
    assert free.error is None and not free.tool_calls
    too_long = backend.chat_many([ChatRequest([{"role": "user", "content": "x" * 9000}], max_tokens=8)])[0]
    assert too_long.error.startswith("context_length") and "context" in too_long.error


def test_local_backend_runs_gym_and_humaneval(ckpt, tmp_path):
    from openk2.eval import gym, humaneval

    backend = LocalBackend(ckpt, max_batch=8)
    cfg = gym.GymConfig(envs=["arithmetic", "tool_use"], n_tasks=2, max_tokens=12, max_turns=2)
    result = gym.run(backend, cfg, ResultStore(tmp_path, "gym", "tiny", {}), progress=False)
    assert [r["env"] for r in result["records"]] == ["arithmetic"] * 2 + ["tool_use"] * 2
    assert all(r["reason"] is not None and not r["reason"].startswith("backend") for r in result["records"])
    assert all(r["response"] for r in result["records"] if r["env"] == "arithmetic")  # the model did answer
    hcfg = humaneval.HumanEvalConfig(mode="completion", limit=2, max_tokens=12)
    result = humaneval.run(backend, hcfg, ResultStore(tmp_path, "humaneval", "tiny", {}), progress=False)
    samples = [s for r in result["records"] for s in r["samples"]]
    assert len(samples) == 2 and all(s["completion"] for s in samples)
    assert result["metrics"]["pass@1"] == 0.0 and result["metrics"]["backend_errors"] == 0


def _serve_and_run_conformance(ckpt, out_dir, name: str, *serve_args: str, max_tokens: int) -> dict:
    """Start the real `openk2 serve` on ckpt, run `openk2 eval toolcall` against it, return the result."""
    with serve_process(ckpt, *serve_args) as url:
        cmd = [sys.executable, "-m", "openk2.cli", "eval", "toolcall", "--endpoint", url, "--only", *FORCED]
        cmd += ["--max-tokens", str(max_tokens), "--out", str(out_dir), "--name", name, "--no-progress"]
        cmd += ["--timeout", "300", "--batch-size", "16"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stderr
    return json.loads((out_dir / f"toolcall-{name}.json").read_text())


@pytest.mark.slow
def test_conformance_against_own_server_constrained_on_and_off(ckpt, tmp_path):
    on = _serve_and_run_conformance(ckpt, tmp_path, "own-server", max_tokens=MAX_TOKENS)
    m = on["metrics"]
    print("constrained (own server):", json.dumps({k: v for k, v in m.items() if k != "trigger_confusion"}))
    assert m["errors"] == 0 and m["forced_calls"] >= 13
    assert m["schema_accuracy"] == 1.0 and m["schema_accuracy_forced"] == 1.0
    assert m["tool_choice_compliance"] == 1.0 and m["truncated_responses"] == 0
    assert m["stream_agreement"] == 1.0

    # Off: the same server with `--no-constrained-tools`; the figure is whatever the model does
    # (a random model: no calls, so tool_choice is not complied with).
    off = _serve_and_run_conformance(
        ckpt, tmp_path, "own-server-unconstrained", "--no-constrained-tools", max_tokens=256
    )
    m = off["metrics"]
    print("unconstrained (own server):", json.dumps({k: v for k, v in m.items() if k != "trigger_confusion"}))
    assert m["errors"] == 0 and m["cases"] == on["metrics"]["cases"]
    assert m["tool_choice_compliance"] < 1.0  # nothing forces the model any more
    assert m["calls"] == 0 or m["schema_accuracy"] is not None  # reported, not assumed
