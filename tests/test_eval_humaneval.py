"""HumanEval through the harness's sandbox: canonical solutions pass, empty ones fail (the harness is
checked, not a model), through the CLI, and through an endpoint in both chat and completion mode."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from eval_util import FakeOpenAI

from openk2.client import EndpointBackend
from openk2.eval import humaneval
from openk2.eval.harness import ResultStore
from openk2.rl.envs.code import load_humaneval


def _run(tmp_path, backend=None, **cfg):
    config = humaneval.HumanEvalConfig(**cfg)
    return humaneval.run(backend, config, ResultStore(tmp_path, "humaneval", "x", cfg), progress=False)


def test_reference_solutions_first_problems(tmp_path):
    canonical = _run(tmp_path / "c", reference="canonical", limit=16)
    empty = _run(tmp_path / "e", reference="empty", limit=16)
    assert canonical["metrics"]["pass@1"] == 1.0
    assert empty["metrics"]["pass@1"] == 0.0
    assert all(s["reason"] is not None for r in empty["records"] for s in r["samples"])


@pytest.mark.slow
def test_reference_solutions_all_164(tmp_path):
    """The acceptance check: all of HumanEval, canonical 1.0 and empty 0.0 (~20 s each on 2 cores)."""
    canonical = _run(tmp_path / "c", reference="canonical")
    assert canonical["metrics"]["problems"] == len(load_humaneval()) == 164
    assert canonical["metrics"]["pass@1"] == 1.0, [r["id"] for r in canonical["records"] if not r["correct"]]
    assert _run(tmp_path / "e", reference="empty")["metrics"]["pass@1"] == 0.0


def test_pass_at_k_with_several_samples(tmp_path):
    result = _run(tmp_path, reference="canonical", limit=3, n_samples=4, ks=(1, 4))
    assert result["metrics"]["pass@1"] == result["metrics"]["pass@4"] == 1.0
    assert result["metrics"]["samples"] == 12
    with pytest.raises(ValueError, match="k <= n_samples"):
        humaneval.HumanEvalConfig(n_samples=2, ks=(5,)).validate()
    with pytest.raises(ValueError, match="temperature"):
        humaneval.HumanEvalConfig(n_samples=2, ks=(1,)).validate()


def test_cli_reference(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "openk2.cli",
        "eval",
        "humaneval",
        "--reference",
        "canonical",
        "--limit",
        "4",
    ]
    out = subprocess.run(
        cmd + ["--out", str(tmp_path), "--no-progress"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "| pass@1" in out.stdout and "1.0000" in out.stdout
    (path,) = tmp_path.glob("humaneval-reference-canonical-*.json")  # label: name + config hash
    saved = json.loads(path.read_text())
    assert saved["metrics"]["pass@1"] == 1.0 and len(saved["records"]) == 4
    bad = subprocess.run(cmd[:5], capture_output=True, text=True, timeout=60)  # no model, no reference
    assert bad.returncode == 2 and "--model" in bad.stderr


@pytest.mark.parametrize("mode", ["chat", "completion"])
def test_endpoint_returning_canonical_code(tmp_path, mode):
    with FakeOpenAI() as fake:
        backend = EndpointBackend(fake.url, timeout=10, max_retries=0)
        result = _run(tmp_path, backend, mode=mode, limit=6)
    assert result["metrics"]["pass@1"] == 1.0 and result["metrics"]["backend_errors"] == 0


def test_endpoint_failures_count_as_failed_samples(tmp_path):
    with FakeOpenAI() as fake:
        problems = load_humaneval()[:4]
        fake.faults = {problems[1]["prompt"]: "500", problems[3]["prompt"]: "json"}
        backend = EndpointBackend(fake.url, timeout=10, max_retries=0)
        result = _run(tmp_path, backend, limit=4)
    assert result["metrics"]["pass@1"] == 0.5 and result["metrics"]["backend_errors"] == 2
    reasons = [r["samples"][0]["reason"] for r in result["records"]]
    assert reasons[0] is None and reasons[1].startswith("backend: http_500")
    assert reasons[3].startswith("backend: malformed_json")


def test_a_reply_without_code_is_kept_in_the_results(tmp_path):
    """A chat reply that holds no code block fails as `no_code_block`, and the result still shows
    what the model wrote (`reply`), so a zero score can be read."""
    with FakeOpenAI() as fake:
        problems = load_humaneval()[:2]
        del fake.canonical[problems[1]["prompt"]]  # the fake model answers "Sure." to this one
        backend = EndpointBackend(fake.url, timeout=10, max_retries=0)
        result = _run(tmp_path, backend, limit=2)
    good, bad = (r["samples"][0] for r in result["records"])
    assert good["passed"] and good["reply"].startswith("Here it is:\n```python")
    assert bad == {"passed": False, "reason": "no_code_block", "completion": None, "reply": "Sure."}
    saved = json.loads(next(tmp_path.rglob("*.json")).read_text())
    assert saved["records"][1]["samples"][0]["reply"] == "Sure."
