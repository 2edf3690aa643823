"""Worked example 3 (experiments/rl_critique.py) end to end in --quick mode, and the shipped
self-critique config taking a step from the checkpoint that example writes."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from openk2.checkpoint import load_model
from openk2.rl.trainer import RLConfig, RLTrainer

REPO = Path(__file__).resolve().parents[1]


def _example():
    spec = importlib.util.spec_from_file_location("rl_critique", REPO / "experiments" / "rl_critique.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # ~20 s on an idle core: an SFT, an RL run and the win rates, each tiny
def test_critique_example_quick_and_the_shipped_config(tmp_path):
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

    # the shipped config: the example's rubrics, and one step from the example's checkpoint
    config = RLConfig.load(REPO / "configs" / "rl" / "mixed_critique_tiny.toml")
    assert asdict(config.critique) == asdict(example.CRITIQUE)
    config = replace(
        config,
        model=str(tmp_path / "ex" / "sft_checkpoint"),
        steps=1,
        eval_tasks=4,
        out_dir=str(tmp_path / "rl"),
    ).validate()
    history = RLTrainer(config, log_fn=None).train()
    # a barely trained policy does not stop within step_tokens = 8: its samples pause
    assert history[-1]["step"] == 1 and history[-1]["paused"] > 0
