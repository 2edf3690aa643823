"""Resumable RL runs: an `openk2 rl` process killed with SIGKILL mid-run and resumed by the same
command ends with the same weights, bit for bit, as a run never interrupted (CPU, fixed seeds, partial
rollouts paused across the checkpoint, PTX mixing so every step moves the weights); its checkpoints
load in `openk2 sample` and `openk2 serve`; the trainer state holds only what a weights-only load
reads, and anything but an openk2 dataclass in it is refused."""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from serve_util import MODEL, LiveServer

from openk2.checkpoint import load, resolve_checkpoint, save_model
from openk2.checkpoint.store import STATE_FILE, list_checkpoints, load_trainer_state
from openk2.client.factory import make_backend
from openk2.client.types import ChatRequest
from openk2.rl.env import make_env
from openk2.rl.rollout import Group, Sample
from openk2.rl.state import from_plain, to_plain
from openk2.rl.trainer import RLConfig, RLTrainer
from openk2.serve.cli import load_engine
from openk2.train.sample import generate_text

STEPS = 4


def _config(tmp_path: Path) -> Path:
    rows = [
        {"messages": [{"role": "user", "content": f"{a}+{b}="}, {"role": "assistant", "content": str(a + b)}]}
        for a in range(4)
        for b in range(4)
    ]
    ptx = tmp_path / "ptx.jsonl"
    ptx.write_text("\n".join(json.dumps(r) for r in rows))
    config = {
        "envs": [{"name": "arithmetic", "kwargs": {"max_digits": 1, "ops": "+"}, "max_tokens": 8}],
        "model_overrides": {"num_hidden_layers": 2},
        "steps": STEPS,
        "save_every": 2,
        "eval_every": 3,  # one evaluation between the checkpoints, one at the end
        "eval_tasks": 2,
        "prompts_per_step": 2,
        "samples_per_prompt": 2,
        "updates_per_step": 2,
        "step_tokens": 3,  # partial rollout: samples are paused across iterations (and checkpoints)
        "ptx_data": str(ptx),
        "ptx_weight": 1.0,
        "ptx_batch": 4,
        "lr": 0.01,
        "threads": 1,
        "seed": 3,
    }
    path = tmp_path / "rl.json"
    path.write_text(json.dumps(config))
    return path


def _rl(config: Path, out: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "openk2.cli", "rl", str(config), "--out-dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load(path, dtype=None)[0].state_dict()


@pytest.mark.slow  # three RL runs, two of them `openk2 rl` subprocesses (~40 s on 2 busy cores)
def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path):
    config = _config(tmp_path)
    killed = tmp_path / "killed"
    proc = _rl(config, killed)
    deadline = time.time() + 240
    try:
        while not list_checkpoints(killed):
            assert proc.poll() is None, f"openk2 rl ended before its first checkpoint: {proc.stderr.read()}"
            assert time.time() < deadline, "no checkpoint within 240 s"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    first = list_checkpoints(killed)[-1]
    saved_at = load_trainer_state(first)["step"]
    assert saved_at < STEPS, "the kill landed after the run ended"
    state = load_trainer_state(first)
    assert from_plain(state["rollout_worker"])["pending"], (
        "no rollout was paused at the checkpoint: the test would not cover them"
    )
    start = _weights(first)

    resumed = _rl(config, killed)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    assert f"resuming {first}" in out

    uninterrupted = {**json.loads(config.read_text()), "out_dir": str(tmp_path / "reference")}
    reference = RLTrainer(RLConfig.from_dict(uninterrupted), log_fn=None)
    reference.train()
    mine, theirs = _weights(killed), _weights(tmp_path / "reference")
    assert mine.keys() == theirs.keys()
    differ = [k for k in mine if not torch.equal(mine[k], theirs[k])]
    assert not differ, f"{len(differ)} tensors differ after resume, e.g. {differ[:3]}"
    assert any(not torch.equal(start[k], mine[k]) for k in mine), "the resumed steps did not train"
    # every step after the checkpoint is in metrics.jsonl once more, now from the resumed process
    steps = [json.loads(x).get("step") for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert STEPS in steps


def test_rl_checkpoints_load_in_sample_serve_and_eval(tmp_path):
    """The final and a per-step checkpoint of an RL run (model, tokenizer, trainer state) load with
    openk2.checkpoint.load, and through what `openk2 sample`, `openk2 serve` (a real HTTP server over
    the run directory answers a request) and `openk2 eval` (its in-process backend) load them with.
    `openk2 sample` as a subprocess on an RL run: test_rl_trainer.py::test_openk2_rl_command."""
    cfg = json.loads(_config(tmp_path).read_text())
    run = tmp_path / "run"
    overrides = {"steps": 2, "save_every": 1, "eval_every": 2, "out_dir": str(run), "keep_checkpoints": 5}
    RLTrainer(RLConfig.from_dict({**cfg, **overrides}), log_fn=None).train()
    checkpoints = list_checkpoints(run)
    assert [load_trainer_state(c)["step"] for c in checkpoints] == [1, 2]
    for path in (run, *checkpoints):
        model, tok = load(path)
        assert tok.vocab_size == model.config.vocab_size == 512
    assert generate_text(str(run), "1+1=", max_new_tokens=3).startswith("1+1=")
    engine = load_engine(str(resolve_checkpoint(run)), max_batch=2, max_seq_len=128, dtype=None)
    with LiveServer(engine) as server:
        body = {"model": MODEL, "prompt": "2+2=", "max_tokens": 3}
        r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
    backend = make_backend(model=str(checkpoints[0]), max_batch=2)
    try:
        reply = backend.chat(ChatRequest([{"role": "user", "content": "3+4="}], max_tokens=3))
        assert reply.error is None and reply.finish_reason in ("stop", "length")
    finally:
        backend.close()


def test_trainer_state_is_weights_only_and_round_trips_paused_rollouts(tmp_path):
    """The state a checkpoint stores loads with torch.load(weights_only=True) and gives back the
    paused groups as they were; a tag naming anything but an openk2 dataclass is refused."""
    cfg = json.loads(_config(tmp_path).read_text())
    trainer = RLTrainer(RLConfig.from_dict({**cfg, "out_dir": str(tmp_path / "run")}), log_fn=None)
    trainer.step(1)
    assert trainer.worker.pending
    path = tmp_path / STATE_FILE
    torch.save(trainer.state_dict(), path)
    state = torch.load(path, weights_only=True)
    assert from_plain(state["rollout_worker"])["pending"] == trainer.worker.pending
    group = Group("arithmetic", trainer.worker.pending[0].task, [Sample([1, 2], [3], [-0.5])], started=0)
    assert from_plain(to_plain([group, (1, "x")])) == [group, (1, "x")]
    with pytest.raises(ValueError, match="not an openk2 class"):
        from_plain({"__dataclass__": "subprocess.Popen", "args": ["true"]})
    with pytest.raises(ValueError, match="not an openk2 dataclass"):
        from_plain({"__dataclass__": "openk2.rl.trainer.RLTrainer"})
    with pytest.raises(TypeError, match="cannot store a set"):
        to_plain({"a": {1, 2}})


def test_a_paused_episodes_environment_round_trips():
    """A multi-turn episode owns its environment (the shop world mid-episode): it comes back from
    the plain form with its world, and the episode goes on from there."""
    env = make_env("tool_use", failure_rate=0.0)
    task = env.sample_tasks(1, seed=5)[0]
    env.reset(task=task)
    pid = next(iter(task.metadata["products"]))
    arguments = json.dumps({"product_id": pid, "quantity": 1})
    call = {"id": "c0", "type": "function", "function": {"name": "add_to_cart", "arguments": arguments}}
    assert not env.step({"role": "assistant", "content": "", "tool_calls": [call]}).done
    assert env.world.cart == {pid: 1}
    state = torch.load(
        _saved({"episode_env": to_plain(env), "rng": to_plain(random.Random(7))}), weights_only=True
    )
    back = from_plain(state["episode_env"])
    assert type(back) is type(env) and vars(back).keys() == vars(env).keys()
    assert back.world == env.world and back.task == env.task and back.turns == env.turns
    assert from_plain(state["rng"]).random() == random.Random(7).random()
    # the restored episode continues: the cart it had is checked out by the next call
    checkout = {"id": "c1", "type": "function", "function": {"name": "view_cart", "arguments": "{}"}}
    replies = [back.step({"role": "assistant", "content": "", "tool_calls": [checkout]}), env.step(
        {"role": "assistant", "content": "", "tool_calls": [checkout]})]  # fmt: skip
    assert replies[0].messages == replies[1].messages and pid in json.dumps(replies[0].messages)
    with pytest.raises(ValueError, match="not an openk2 environment"):
        from_plain({"__object__": "openk2.rl.weight_sync.WeightPusher", "attributes": {}})


def _saved(obj) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def test_paused_multi_turn_episodes_resume_exactly(tmp_path):
    """tool_use episodes paused mid-turn (step_tokens) across a save: a trainer restored from the saved
    weights and the weights-only state (episodes with their own shop worlds) takes the next steps to
    the same weights, bit for bit, as one that never stopped."""
    ptx = json.loads(_config(tmp_path).read_text())["ptx_data"]
    env = {"name": "tool_use", "kwargs": {"failure_rate": 0.0}, "max_tokens": 40, "max_turns": 3,
           "tool_tokens": 128, "tool_choice": "view_cart"}  # fmt: skip
    cfg = {"envs": [env], "model_overrides": {"max_position_embeddings": 2048}, "prompts_per_step": 1,
           "samples_per_prompt": 2, "eval_tasks": 1, "step_tokens": 10, "ptx_data": ptx, "ptx_weight": 1.0,
           "ptx_batch": 3, "lr": 0.01, "engine_batch": 4, "out_dir": None}  # fmt: skip

    def trainer() -> RLTrainer:
        return RLTrainer(RLConfig.from_dict(cfg), log_fn=None)

    straight = trainer()
    for step in (1, 2, 3):
        straight.step(step)
    stopped = trainer()
    stopped.step(1)
    assert any(s.episode is not None for g in stopped.worker.pending for s in g.samples)
    torch.save(stopped.state_dict(), tmp_path / STATE_FILE)
    save_model(stopped.model, tmp_path / "ckpt")
    resumed = trainer()
    resumed.load(tmp_path / "ckpt", torch.load(tmp_path / STATE_FILE, weights_only=True))
    for step in (2, 3):
        resumed.step(step)
    mine, theirs = resumed.model.state_dict(), straight.model.state_dict()
    assert [k for k in mine if not torch.equal(mine[k], theirs[k])] == []
