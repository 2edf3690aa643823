"""The experiments under experiments/ run end to end (in their seconds-long `--quick` form) and write
their JSON and PNG where they are told, never into docs/ unless asked with `--docs`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ("qk_clip", "muon_vs_adamw", "sparsity", "heads")


def docs_state(name: str) -> tuple[set[str], dict[str, int]]:
    """The names in docs/, and the modification times of the experiment's committed result files."""
    docs = ROOT / "docs"
    own = [docs / f"{name}.json", docs / f"{name}.png"]
    return {p.name for p in docs.iterdir()}, {p.name: p.stat().st_mtime_ns for p in own if p.exists()}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_quick_run_writes_json_and_png_into_out(name, tmp_path):
    before = docs_state(name)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / f"{name}.py"), "--quick", "--out", str(tmp_path / "o")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    result = json.loads((tmp_path / "o" / f"{name}.json").read_text())
    assert (tmp_path / "o" / f"{name}.png").stat().st_size > 1000
    assert result["command"].startswith(f"python experiments/{name}.py --quick")
    assert result["environment"]["threads"] == 1 and result["environment"]["newton_schulz_dtype"] == "float32"
    assert result["runs"] and all(r["cpu_seconds"] > 0 for r in result["runs"].values())
    for r in result["runs"].values():  # held-out curve from step 0 to the end, every loss finite
        assert r["eval_tokens"][0] == 0 and r["eval_tokens"][-1] == r["tokens"][-1]
        assert all(0 < x < 10 for x in r["eval_loss"] + r["loss"])
    assert docs_state(name) == before, "an experiment wrote into docs/ without --docs"
    assert not (tmp_path / "runs").exists()  # --out was honoured


def test_default_output_is_runs_and_docs_needs_the_flag(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "experiments"))
    from harness import parser, setup

    monkeypatch.chdir(tmp_path)
    p = parser("sparsity", "doc")
    assert setup(p.parse_args([])) == Path("runs/sparsity")
    assert (tmp_path / "runs" / "sparsity").is_dir()
    assert setup(p.parse_args(["--docs"])) == ROOT / "docs"


def test_write_json_is_atomic(tmp_path):
    """Results and the progress files experiments resume from are replaced whole: a write that fails
    (here: an object JSON cannot hold) leaves the previous file readable and no temporary behind."""
    sys.path.insert(0, str(ROOT / "experiments"))
    from harness import write_json

    path = tmp_path / "cells.json"
    write_json(path, [{"tau": 0.01, "gain": 0.1}])
    assert json.loads(path.read_text()) == [{"tau": 0.01, "gain": 0.1}]
    with pytest.raises(TypeError):
        write_json(path, [{"tau": 0.01}, {"gain": object()}])
    assert json.loads(path.read_text()) == [{"tau": 0.01, "gain": 0.1}]
    write_json(path, {"done": 2}, indent=None)
    assert path.read_text() == '{"done": 2}\n' and [p.name for p in tmp_path.iterdir()] == ["cells.json"]


def test_experiment_results_are_consistent():
    """The experiments' controlled variables: sparsity holds the activated parameters fixed,
    heads leave the latent cache size unchanged (checked on the configs, no training)."""
    sys.path.insert(0, str(ROOT / "experiments"))
    from heads import k2_attention_layer
    from sparsity import model_for

    from openk2.model.size import count_parameters, flops_per_token, kv_cache_bytes_per_token

    experts = (8, 16, 32, 64)
    counts = [count_parameters(model_for(n, 32)) for n in experts]
    # what a token touches differs only by the router's N x 64 weights in each of the 2 MoE layers (3%
    # at N = 64); the total grows with N
    assert [c.activated - counts[0].activated for c in counts] == [2 * (n - 8) * 64 for n in experts]
    assert counts[-1].activated < 1.05 * counts[0].activated and counts[-1].total > 3 * counts[0].total
    flops = [flops_per_token(model_for(n, 32), 128)["forward"] for n in (8, 64)]
    assert abs(flops[1] - flops[0]) < 0.05 * flops[0]
    caches = {h: kv_cache_bytes_per_token(k2_attention_layer(h, 1024)) for h in (64, 128)}
    assert caches[64]["mla_latent"] == caches[128]["mla_latent"] == 2 * (512 + 64)
    assert caches[128]["multi_head"] == 2 * caches[64]["multi_head"]
