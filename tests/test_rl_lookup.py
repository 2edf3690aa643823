"""The `lookup` environment (facts only a tool sees), its episodes through the rollout worker, the
clipping of tool replies in small `tool_tokens` budgets, and experiments/rl_tool_use.py end to end.

Rollout tests drive the real worker, chat template, tool-call parser and environment with a scripted
policy (`ScriptedEngine` from test_rl_multiturn), so the trajectories are known."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_rl_multiturn import TOK, ScriptedEngine, _call

from openk2.rl.env import make_env
from openk2.rl.rollout import CLIP_MARKER, SHORT_CLIP_MARKER, Budget, RolloutWorker
from openk2.tokenizer.chat import encode_chat

ROOT = Path(__file__).resolve().parent.parent


def _task(seed: int = 0, split: str = "train"):
    env = make_env("lookup")
    return env, env.sample_tasks(1, seed=seed, split=split)[0]


def _assistant(content: str = "", calls: list | None = None) -> dict:
    return {"role": "assistant", "content": content, **({"tool_calls": calls} if calls else {})}


# ---------------------------------------------------------------------------------------------- env
def test_tasks_hide_the_table_and_the_splits_are_disjoint():
    env = make_env("lookup", table_size=5)
    train, test = env.sample_tasks(50, seed=1), env.sample_tasks(20, seed=1, split="test")
    for t in train + test:
        table, key = t.metadata["table"], t.metadata["key"]
        assert len(table) == 5 and table[key] == t.answer and re.fullmatch(r"[1-9]\d\d", t.answer)
        prompt = json.dumps(t.messages)
        assert key in prompt and all(v not in prompt for v in table.values())  # only the tool knows
        assert [tool["function"]["name"] for tool in t.tools] == ["lookup"]
    assert not {t.metadata["key"] for t in train} & {t.metadata["key"] for t in test}
    assert len({json.dumps(t.metadata["table"]) for t in train}) == 50  # a fresh table per task
    with pytest.raises(ValueError):
        make_env("lookup", table_size=30, key_len=1)


def test_key_alphabet():
    env = make_env("lookup", key_len=2, alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    keys = [k for t in env.sample_tasks(20, seed=0) for k in t.metadata["table"]]
    assert all(re.fullmatch(r"[A-Z]{2}", k) for k in keys)
    assert all(
        re.fullmatch(r"[a-z]{3}", k) for t in make_env("lookup").sample_tasks(5) for k in t.metadata["table"]
    )
    for bad in ("", "aa", "a-b", ["a", "b"]):
        with pytest.raises(ValueError, match="alphabet"):
            make_env("lookup", alphabet=bad)
    with pytest.raises(ValueError, match="table_size"):
        make_env("lookup", table_size=5, key_len=1, alphabet="0123")


def test_verifier_accepts_the_value_only():
    env, task = _task()
    v = task.answer
    for text, ok in [(v, 1), (f" {v}\n", 1), (f"\\boxed{{{v}}}", 1), (f"Answer: {v}", 1), ("", 0),
                     (str(int(v) + 1), 0), (f"{v}{v}", 0), (task.metadata["key"], 0)]:  # fmt: skip
        assert env.verify(task, text) == ok, text
    assert env.evaluate(task, None)[0] == 0.0  # malformed output never raises


def test_step_runs_the_tool_and_scores_the_answer():
    env, task = _task()
    key, other = task.metadata["key"], next(k for k in task.metadata["table"] if k != task.metadata["key"])
    env.reset(task=task)
    r = env.step(_assistant(calls=[_call("lookup", {"key": "zzzz"}, 0), _call("lookup", {"key": other}, 1)]))
    assert not r.done and r.reward == 0.0
    assert [m["tool_call_id"] for m in r.messages] == ["functions.lookup:0", "functions.lookup:1"]
    assert json.loads(r.messages[0]["content"]) == {"error": "no key 'zzzz'"}
    assert r.messages[1]["content"] == task.metadata["table"][other]  # a real lookup in the task's table
    # botched calls come back as errors the model can read, never exceptions
    r = env.step(
        _assistant(
            calls=[
                _call("lookup", '{"key": ', 0),
                _call("search", {"key": key}, 1),
                _call("lookup", {"k": 1}, 2),
            ]
        )
    )
    errors = [json.loads(m["content"])["error"] for m in r.messages]
    assert "not valid JSON" in errors[0] and "unknown tool" in errors[1] and "invalid arguments" in errors[2]
    r = env.step(_assistant(calls=[_call("lookup", {"key": key}, 0)]))
    assert r.messages[0]["content"] == task.answer
    r = env.step(_assistant(task.answer))
    assert r.done and r.reward == 1.0 and r.info["lookups"] == ["zzzz", other, key]
    with pytest.raises(RuntimeError):
        env.step(_assistant("again"))
    # a wrong answer, and the turn limit, end the episode with 0
    env.reset(task=task)
    r = env.step(_assistant("123" if task.answer != "123" else "124"))
    assert r.done and r.reward == 0.0 and r.info["reason"].startswith("wrong")
    env = make_env("lookup", max_turns=2)
    env.reset(task=task)
    env.step(_assistant(calls=[_call("lookup", {"key": key}, 0)]))
    r = env.step(_assistant(calls=[_call("lookup", {"key": key}, 0)]))
    assert r.done and r.reward == 0.0 and r.info["reason"] == "turn limit reached"


# ---------------------------------------------------------------------------------------------- episodes
def _worker(script, budget: Budget, k: int = 2):
    env = make_env("lookup")
    return RolloutWorker(ScriptedEngine(script), {"lookup": env}, {"lookup": budget}, k, None, 0.5)


def _solver(task, first_calls=None):
    def script(context: str, turn: int) -> dict:
        if turn == 0:
            return _assistant(calls=first_calls or [_call("lookup", {"key": task.metadata["key"]}, 0)])
        # answer with what the tool said (the last tool reply in the context)
        return _assistant(task.answer if task.answer in context.split("<|im_system|>tool")[-1] else "0")

    return script


def test_lookup_episode_through_the_rollout_worker():
    env, task = _task()
    worker = _worker(_solver(task), Budget(turn_tokens=64, max_turns=3, tool_tokens=96))
    (group,) = worker.rollout([("lookup", task)], temperature=1.0, seed=0)
    for s in group.samples:
        assert s.finish_reason == "stop" and s.reward == 1.0, s.info
        assert s.episode.turns == 2 and s.episode.tool_calls == 1 and s.text == task.answer
        assert s.episode.env.lookups == [task.metadata["key"]]  # the tool ran in the episode's own env
        full = encode_chat(TOK, s.episode.messages, tools=task.tools)
        assert s.prompt_ids + s.response_ids == full.ids
        assert s.loss_mask == [int(m) for m in full.assistant_mask[len(s.prompt_ids) :]]


def _appended_runs(mask: list[int]) -> list[int]:
    runs, n = [], 0
    for m in mask + [1]:
        if m == 0:
            n += 1
        elif n:
            runs, n = runs + [n], 0
    return runs


def test_small_tool_budgets_clip_with_a_marker_that_fits_or_say_which_budget_is_short():
    """A tool reply over `tool_tokens` is clipped to fit, marker included: the long marker when it
    fits, else the short one; markers never nest, and their counts are the original text's. When even
    the short marker cannot fit, the cut names `tool_tokens`, not a full context (which the engine's
    context here is not)."""
    env, task = _task()
    key = task.metadata["key"]
    wrong = "q" * 120  # an unknown key: its error message echoes it, a long reply
    calls = [_call("lookup", {"key": wrong}, 0), _call("lookup", {"key": key}, 1)]
    error_tokens = len(TOK.encode(json.dumps({"error": f"no key {wrong!r}"})))

    # roomy: the long error is clipped with the full marker, the value stays whole, the episode succeeds
    worker = _worker(_solver(task, calls), Budget(turn_tokens=256, max_turns=3, tool_tokens=200))
    (group,) = worker.rollout([("lookup", task)], temperature=1.0, seed=0)
    s = group.samples[0]
    assert s.reward == 1.0, s.info
    replies = [m["content"] for m in s.episode.messages if m["role"] == "tool"]
    assert replies[1] == task.answer
    assert replies[0].count("output truncated") == 1 and f"of {error_tokens} tokens shown]" in replies[0]
    assert max(_appended_runs(s.loss_mask)) <= 200

    # small: the full marker alone (~45 byte tokens) does not fit next to the template; the short one does
    one_call = [_call("lookup", {"key": wrong}, 0)]
    marker_tokens = len(TOK.encode(CLIP_MARKER.format(shown=0, total=error_tokens)))
    for tool_tokens in (75, 90):
        worker = _worker(
            _solver(task, one_call), Budget(turn_tokens=256, max_turns=3, tool_tokens=tool_tokens)
        )
        (group,) = worker.rollout([("lookup", task)], temperature=1.0, seed=0)
        s = group.samples[0]
        assert not s.truncated and s.episode.turns == 2, s.info  # clipped, not cut
        (reply,) = [m["content"] for m in s.episode.messages if m["role"] == "tool"]
        shown = int(re.search(r"\[cut (\d+)/(\d+)\]$", reply).group(1))
        assert (
            reply.endswith(SHORT_CLIP_MARKER.format(shown=shown, total=error_tokens))
            and "truncated" not in reply
        )
        assert reply.startswith(json.dumps({"error": f"no key {wrong!r}"})[:shown])
        runs = _appended_runs(s.loss_mask)
        assert runs[0] <= tool_tokens < runs[0] - len(TOK.encode(reply)) + marker_tokens
        assert s.prompt_ids + s.response_ids == encode_chat(TOK, s.episode.messages, tools=task.tools).ids

    # too small for even the template and the short marker: cut, and the reason names tool_tokens
    worker = _worker(_solver(task, one_call), Budget(turn_tokens=256, max_turns=3, tool_tokens=40))
    (group,) = worker.rollout([("lookup", task)], temperature=1.0, seed=0)
    s = group.samples[0]
    assert s.truncated and s.reward == -0.5
    assert s.info["truncated"].startswith("tool_tokens=40 cannot hold the tool reply"), s.info


# ---------------------------------------------------------------------------------------------- the example
@pytest.mark.slow
def test_rl_tool_use_example_quick(tmp_path):
    """experiments/rl_tool_use.py --quick end to end: SFT, held-out evaluation of whole episodes, two
    RL runs with the multi-turn trainer, results.json and the plots."""
    proc = subprocess.run(
        [sys.executable, "experiments/rl_tool_use.py", "--quick", "--threads", "1", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,  # ~65 CPU-s; wall time on a loaded machine is many times that
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["ns_dtype"] == "float32" and r["task"]["env"] == "lookup"
    assert len(r["post_rl"]) == 2 and len(r["gain_greedy"]) == 2
    assert len(r["post_sft"]["sampled"]) == 2 and 0.0 <= r["post_sft"]["greedy"] <= 1.0
    assert r["time_s"]["cpu_total"] > 0 and "avx512_bf16" in r["machine"]
    for seed in (0, 1):
        records = [
            json.loads(x) for x in (tmp_path / f"rl_seed{seed}" / "metrics.jsonl").read_text().splitlines()
        ]
        steps = [x for x in records if x.get("kind") == "rl" and x["step"] > 0]
        assert [x["step"] for x in steps] == [1, 2]
        assert all(len(x["episodes"]) == 4 for x in steps)  # 2 prompts x K = 2 episodes, logged
        assert (tmp_path / f"rl_seed{seed}.png").stat().st_size > 0
    assert (tmp_path / "rl_tool_use.png").stat().st_size > 0


def test_lookup_copy_probe_quick(tmp_path):
    """experiments/lookup_copy_probe.py --quick: per-token loss of every assistant token (the key's
    characters among them) and the attention of every head at the two copying positions; a bad
    alphabet is one usage error, no traceback."""
    script = [sys.executable, "experiments/lookup_copy_probe.py", "--quick"]
    proc = subprocess.run(
        [*script, "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((tmp_path / "lookup_copy_probe.json").read_text())
    key = r["example"]["key"]
    assert re.fullmatch(r"[A-Z]{2}", key) and r["chance_nats"] == pytest.approx(math.log(26))
    tokens = "".join(x["token"] for x in r["per_token_loss"])
    assert f'{{"key": "{key}"}}' in tokens and tokens.endswith(r["example"]["value"] + "<|im_end|>")
    assert all(x["nll"] >= 0 for x in r["per_token_loss"])
    heads = [(h["predicts"], h["layer"], h["head"]) for h in r["attention"]]
    assert len(heads) == len(set(heads)) == 2 * 2 * 4  # both positions x 2 layers x 4 heads
    assert all(len(h["top"]) == 3 and 0 <= h["top"][0]["weight"] <= 1 for h in r["attention"])
    assert (tmp_path / "lookup_copy_probe.png").stat().st_size > 1000
    bad = subprocess.run([*script, "--alphabet", "a-b", "--out", str(tmp_path / "bad")], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert (
        bad.stderr.strip().splitlines()[-1].endswith("alphabet must be distinct letters or digits, got 'a-b'")
    )
    assert not (tmp_path / "bad").exists()
