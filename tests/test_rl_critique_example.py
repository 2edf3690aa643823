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
    # how the critic answers, whatever the labels: the share of "A" and the range of its probability
    for letters in [written["critic_letters_start"], *written["critic_letters_final"]]:
        if written["heldout_pairs"]["all"]:
            assert 0.0 <= letters["share_a"] <= 1.0 and 0.0 < letters["p_a_min"] <= letters["p_a_max"] < 1.0
        else:
            assert letters is None


def test_rubric_env_grades_the_rubric_and_shares_the_split():
    from openk2.rl.env import make_env
    from openk2.rl.envs.arithmetic import PRAISE

    env = make_env("arithmetic_rubric", max_digits=2, ops="+")
    plain = make_env("arithmetic", max_digits=2, ops="+")
    task = env.sample_tasks(1, seed=3)[0]
    assert task.messages[-1]["content"].startswith("What is ")
    right, wrong = str(task.answer), str(task.answer + 1)
    assert [env.verify(task, t) for t in (right, PRAISE + right, wrong, PRAISE + wrong, "no")] == [
        1,
        0.5,
        0,
        0,
        0,
    ]
    # a problem held out of `arithmetic` is held out of `arithmetic_rubric` too
    held_out = {t.messages[-1]["content"] for t in plain.sample_tasks(50, seed=0, split="test")}
    for t in env.sample_tasks(50, seed=0, split="train"):
        assert f"{t.metadata['a']}+{t.metadata['b']}=" not in held_out


def test_critique_table_in_an_rl_config(tmp_path):
    from openk2.rl.trainer import RLConfig
    from openk2.train.config import ConfigError

    envs = [{"name": "arithmetic_rubric", "max_tokens": 8, "reward": "critique"}]
    config = RLConfig.from_dict({"envs": envs, "critique": {"core": ["Correct."], "max_pairs_per_group": 2}})
    assert config.critique.core == ["Correct."] and config.critique.max_pairs_per_group == 2
    assert config.critique.prescriptive  # K2's default prescriptive rubrics stay unless replaced
    with pytest.raises(ConfigError, match="critique.*unknown keys \\['rubric'\\]"):
        RLConfig.from_dict({"envs": envs, "critique": {"rubric": "x"}})
