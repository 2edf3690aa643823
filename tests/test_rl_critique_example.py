"""Worked example 3 (experiments/rl_critique.py) end to end in --quick mode: SFT, held-out critic
accuracy, an RL run with the self-critic, win rates, results.json, the plot and the checkpoint."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from openk2.checkpoint import load_model

REPO = Path(__file__).resolve().parents[1]


def _example():
    spec = importlib.util.spec_from_file_location("rl_critique", REPO / "experiments" / "rl_critique.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # ~20 s on an idle core: an SFT, an RL run and the win rates, each tiny
def test_critique_example_quick(tmp_path):
    example = _example()
    results = example.main(["--quick", "--out", str(tmp_path / "ex")])
    written = json.loads((tmp_path / "ex" / "results.json").read_text())
    assert written["win_rate_vs_start"] == results["win_rate_vs_start"]
    assert (tmp_path / "ex" / "rl_critique.png").stat().st_size > 10_000
    for kind in ("greedy", "sampled"):
        for judge, (mean, std) in written["win_rate_vs_start"][kind].items():
            assert 0.0 <= mean <= 1.0 and std == 0.0, judge  # one seed in --quick
        # the starting policy against itself, greedy: identical responses, every judge says 0.5
    assert set(written["noise_floor_start_vs_start"]["greedy"][j] for j in ("oracle", "start_critic")) == {
        0.5
    }
    curve = written["curves"][0]
    assert [h["step"] for h in curve] == [0, 1] and "eval/arithmetic_rubric/reward" in curve[-1]
    assert load_model(tmp_path / "ex" / "sft_checkpoint").config.max_position_embeddings == 384
