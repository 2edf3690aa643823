"""Multi-turn RL rollouts (tool use): the context is the chat template's rendering of the whole
conversation, tools really run, only sampled tokens are in the loss, budgets end episodes with the
truncation penalty, paused episodes resume across iterations (and after a pickle round trip), and
`openk2 rl` runs a tool-use config end to end.

Most tests drive the rollout worker with a scripted policy (`ScriptedEngine`: the engine's interface,
answering with a fixed assistant turn per turn index) so the trajectories are known; the environment,
template, parser, budgets and loss are the real ones. The end-to-end tests use the real engine and a
tiny random model."""

import json
import pickle
import subprocess
import sys

import pytest
import torch

from openk2.config import ModelConfig
from openk2.model.transformer import Transformer
from openk2.rl.env import make_env
from openk2.rl.loss import k15_loss, masked_sequence_logprobs, pack_sequences
from openk2.rl.rollout import CLIP_MARKER, Budget, RolloutWorker
from openk2.rl.trainer import RLConfig, RLTrainer
from openk2.serve.engine import Completion, RequestOutput
from openk2.serve.sampling import TokenLogprob
from openk2.tokenizer import K2Tokenizer
from openk2.tokenizer.chat import encode_chat, encode_continuation

TOK = K2Tokenizer.byte_level()


def _call(name: str, arguments, index: int) -> dict:
    args = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return {
        "id": f"functions.{name}:{index}",
        "type": "function",
        "function": {"name": name, "arguments": args},
    }


def _turn_tokens(message: dict) -> list[int]:
    """The canonical tokens of an assistant message (what the template renders after the generation
    prompt, through its closing <|im_end|>)."""
    head = encode_chat(TOK, [{"role": "user", "content": "x"}], add_generation_prompt=True).ids
    full = encode_chat(TOK, [{"role": "user", "content": "x"}, message]).ids
    assert full[: len(head)] == head
    return full[len(head) :]


class ScriptedEngine:
    """The engine's `generate` interface with a scripted policy: `script(task_request, turn)` gives
    the assistant message of each turn. A request continues the current turn where the context left
    it (a resumed partial rollout), and stops at max_tokens like the engine ("length")."""

    def __init__(self, script, max_seq_len: int = 8192):
        self.tokenizer, self.script, self.max_seq_len = TOK, script, max_seq_len
        self.requests = 0
        self.gen_prompt = encode_chat(TOK, [], add_generation_prompt=True).ids

    def generate(self, prompts, params):
        outs = []
        for prompt, sp in zip(prompts, params):
            assert len(prompt) + sp.max_tokens - 1 <= self.max_seq_len, "a request the engine would refuse"
            self.requests += 1
            turn = prompt.count(TOK.im_assistant_id) - 1
            start = max(i for i in range(len(prompt)) if prompt[i] == TOK.im_assistant_id) + len(
                self.gen_prompt
            )
            tokens = _turn_tokens(self.script(TOK.decode(prompt), turn))[len(prompt) - start :]
            ids = tokens[: sp.max_tokens]
            reason = "stop" if len(ids) == len(tokens) else "length"
            lps = [TokenLogprob(t, -0.5, []) for t in ids]
            outs.append(RequestOutput("r", prompt, [Completion(0, ids, "", lps, reason)]))
        return outs


def _named_task():
    env = make_env("tool_use", failure_rate=0.0, max_turns=12)
    task = next(t for t in env.sample_tasks(40, seed=3) if t.metadata["kind"] == "named")
    return env, task


def _shopper(task):
    """A policy that solves a `named` task in 4 turns: search, add to cart, checkout, reply."""
    (pid, qty), name = next(iter(task.answer["items"].items())), task.metadata["products"]
    name = name[pid]["name"]

    def script(context: str, turn: int) -> dict:
        calls = [
            [_call("search_products", {"query": name}, 0)],
            [_call("add_to_cart", {"product_id": pid, "quantity": qty}, 1)],
            [_call("checkout", {"payment_method": "card"}, 2)],
        ]
        if turn < 3:
            return {"role": "assistant", "content": "", "tool_calls": calls[turn]}
        return {"role": "assistant", "content": "Done: your order is placed."}

    return script


def _worker(script, budget=None, step_tokens=None, k=2, max_seq_len=8192, env=None):
    env = env or make_env("tool_use", failure_rate=0.0, max_turns=12)
    budget = budget or Budget(turn_tokens=200, max_turns=6, tool_tokens=1024)
    engine = ScriptedEngine(script, max_seq_len)
    return RolloutWorker(engine, {"tool_use": env}, {"tool_use": budget}, k, step_tokens, 0.5), engine


# ---------------------------------------------------------------------------------------------- template
def test_continuation_equals_full_template_rendering():
    tools = make_env("tool_use").sample_tasks(1, seed=0)[0].tools
    prompt = [{"role": "system", "content": "s"}, {"role": "user", "content": "buy a mug"}]
    assistant = {"role": "assistant", "content": "Looking.", "tool_calls": [_call("view_cart", {}, 0)]}
    appended = [
        {"role": "tool", "tool_call_id": "functions.view_cart:0", "content": '{"items": []}'},
        {"role": "user", "content": "and now?"},
    ]
    head = encode_chat(TOK, prompt, tools=tools, add_generation_prompt=True)
    cont = encode_continuation(TOK, prompt + [assistant], appended, tools=tools)
    full = encode_chat(TOK, prompt + [assistant] + appended, tools=tools, add_generation_prompt=True)
    assert head.ids + _turn_tokens(assistant) + cont.ids == full.ids
    assert not any(cont.assistant_mask)  # tool results and user turns are never the assistant's
    # no generation prompt: the bare appended turns
    bare = encode_continuation(TOK, prompt + [assistant], appended, tools=tools, add_generation_prompt=False)
    assert (
        bare.ids == cont.ids[: len(bare.ids)]
        and cont.ids[len(bare.ids) :] == encode_chat(TOK, [], add_generation_prompt=True).ids
    )
    # the thinking template drops earlier reasoning once a plain assistant turn follows: no continuation
    thought = {
        "role": "assistant",
        "content": "",
        "reasoning_content": "hmm",
        "tool_calls": assistant["tool_calls"],
    }
    with pytest.raises(ValueError, match="changes how the earlier turns render"):
        encode_continuation(
            TOK, prompt + [thought, appended[0]], [{"role": "assistant", "content": "ok"}], variant="thinking"
        )


# ---------------------------------------------------------------------------------------------- episodes
def test_episode_runs_tools_and_its_context_is_the_template_rendering():
    env, task = _named_task()
    worker, engine = _worker(_shopper(task))
    (group,) = worker.rollout([("tool_use", task)], temperature=1.0, seed=0)
    for s in group.samples:
        ep = s.episode
        assert s.finish_reason == "stop" and s.reward == 1.0, s.info
        assert ep.turns == 4 and ep.tool_calls == 3 and s.info["turns"] == 4 and s.info["tool_calls"] == 3
        assert ep.env.world.orders[0]["items"] == task.answer["items"]  # the tools really ran
        tool_msgs = [m for m in ep.messages if m["role"] == "tool"]
        assert len(tool_msgs) == 3 and "results" in tool_msgs[0]["content"]
        # the context is the template's rendering of the whole conversation, token for token, and the
        # loss mask is exactly the template's assistant mask
        full = encode_chat(TOK, ep.messages, tools=task.tools)
        assert s.prompt_ids + s.response_ids == full.ids
        assert s.loss_mask == [int(m) for m in full.assistant_mask[len(s.prompt_ids) :]]
        assert len(s.engine_logprobs) == sum(s.loss_mask) == ep.generated
        assert 0 < sum(s.loss_mask) < len(s.loss_mask)  # tool outputs are in the context, not the loss
        assert s.text == "Done: your order is placed."
    assert engine.requests == 8  # 2 episodes x 4 turns
    # each episode ran in its own copy of the environment
    assert len({id(s.episode.env) for s in group.samples} | {id(worker.envs["tool_use"])}) == 3


def test_botched_tool_calls_score_zero_with_a_reason():
    env, task = _named_task()

    def script(context, turn):
        if turn == 0:
            return {
                "role": "assistant",
                "content": "",
                "tool_calls": [_call("checkout", '{"payment_method": car', 0)],
            }
        if turn == 1:
            return {
                "role": "assistant",
                "content": "",
                "tool_calls": [_call("launch_rocket", {"to": "moon"}, 1)],
            }
        if turn == 2:  # markers in the wrong places, an id without a name
            return {"role": "assistant", "content": "<|tool_call_end|>??<|tool_call_begin|>weird@id"}
        return {"role": "assistant", "content": "I could not do it."}

    worker, _ = _worker(script)
    (group,) = worker.rollout([("tool_use", task)], temperature=1.0, seed=0)
    for s in group.samples:
        assert s.finish_reason == "stop" and s.reward == 0.0
        assert s.info["reason"] == "0 orders placed, the goal is one"
        errors = " ".join(s.info["tool_call_errors"])
        assert "JSON" in errors and "launch_rocket" in errors
        results = [json.loads(m["content"]) for m in s.episode.messages if m["role"] == "tool"]
        assert "not valid JSON" in results[0]["error"] and "unknown tool" in results[1]["error"]
        # turn 3's stray markers parse as a call with an unreadable id, which the parser drops: a plain
        # answer, so the episode ends there
        assert s.episode.turns == 3 and any("dropped" in e for e in s.info["tool_call_errors"])


def test_budgets_per_turn_per_episode_and_turns_truncate_with_the_penalty():
    env, task = _named_task()
    forever = lambda context, turn: {  # noqa: E731  (never answers: calls view_cart every turn)
        "role": "assistant",
        "content": "",
        "tool_calls": [_call("view_cart", {}, turn)],
    }
    turn_len = len(_turn_tokens(forever("", 0)))
    cases = {
        "the turn budget is spent": Budget(turn_tokens=turn_len + 5, max_turns=3),
        "the turn's token budget is spent": Budget(turn_tokens=turn_len - 1, max_turns=3),
        "the episode's token budget is spent": Budget(
            turn_tokens=turn_len + 5, max_turns=9, episode_tokens=turn_len * 2 + 3
        ),
    }
    for why, budget in cases.items():
        worker, _ = _worker(forever, budget=budget)
        (group,) = worker.rollout([("tool_use", task)], temperature=1.0, seed=0)
        for s in group.samples:
            assert s.truncated and s.reward == -0.5 and s.info["truncated"] == why, (why, s.info)
            assert s.info["reason"] == "truncated"
            assert s.episode.generated <= budget.episode and s.episode.turns <= budget.max_turns
    # the environment's own turn limit is not a truncation: reward 0 with its reason
    worker, _ = _worker(forever, env=make_env("tool_use", failure_rate=0.0, max_turns=2))
    (group,) = worker.rollout([("tool_use", task)], temperature=1.0, seed=0)
    assert all(s.finish_reason == "stop" and s.reward == 0.0 for s in group.samples)
    assert group.samples[0].info["reason"] == "turn limit reached"


def test_long_tool_outputs_are_clipped_with_a_marker_and_a_full_context_cuts_the_episode():
    env, task = _named_task()

    def script(context, turn):
        if turn < 2:  # an empty query matches every product: a long result
            return {
                "role": "assistant",
                "content": "",
                "tool_calls": [_call("search_products", {"query": ""}, turn)],
            }
        return {"role": "assistant", "content": "ok"}

    worker, _ = _worker(script, budget=Budget(turn_tokens=100, max_turns=5, tool_tokens=200))
    (group,) = worker.rollout([("tool_use", task)], temperature=1.0, seed=0)
    s = group.samples[0]
    assert s.finish_reason == "stop" and s.episode.turns == 3
    tool_msgs = [m for m in s.episode.messages if m["role"] == "tool"]
    assert all("output truncated" in m["content"] for m in tool_msgs)
    assert CLIP_MARKER.split("{")[0] in tool_msgs[0]["content"]
    assert s.prompt_ids + s.response_ids == encode_chat(TOK, s.episode.messages, tools=task.tools).ids
    # appended blocks (tool result + generation prompt) stay within tool_tokens
    mask = s.loss_mask
    runs, n = [], 0
    for m in mask + [1]:
        if m == 0:
            n += 1
        elif n:
            runs, n = runs + [n], 0
    assert runs and max(runs) <= 200
    # an engine context that the tool output would overflow: clipped to fit, then the context is full
    prompt_len = len(s.prompt_ids)
    first_turn = len(_turn_tokens(script("", 0)))
    worker, _ = _worker(
        script,
        budget=Budget(turn_tokens=100, max_turns=5, tool_tokens=4000),
        max_seq_len=prompt_len + first_turn + 150,
    )
    (group,) = worker.rollout([("tool_use", task)], temperature=1.0, seed=0)
    s = group.samples[0]
    assert s.truncated and s.reward == -0.5  # no crash: the episode is cut
    # the engine's limit: prompt + max_tokens - 1 rows (the last sampled token is never fed back)
    assert len(s.prompt_ids) + len(s.response_ids) - 1 <= prompt_len + first_turn + 150
    assert "output truncated" in s.episode.messages[-1]["content"]


def test_partial_rollout_pauses_mid_turn_and_between_turns_and_survives_a_pickle():
    env, task = _named_task()
    one_go, _ = _worker(_shopper(task))
    (expected,) = one_go.rollout([("tool_use", task)], temperature=1.0, seed=0)
    partial, _ = _worker(_shopper(task), step_tokens=37)
    done, new, iterations = [], [("tool_use", task)], 0
    while not done:
        done = partial.rollout(new, temperature=1.0, seed=0)
        new, iterations = [], iterations + 1
        if iterations == 3:  # a checkpoint here: the paused state round-trips through pickle
            assert partial.pending and all(s.finish_reason is None for s in partial.pending[0].samples)
            state = pickle.loads(pickle.dumps(partial.state_dict()))
            partial, _ = _worker(_shopper(task), step_tokens=37)
            partial.load_state_dict(state)
    total = len(expected.samples[0].engine_logprobs)
    assert iterations == -(-total // 37)  # ceil: every iteration samples exactly step_tokens
    (got,) = done
    for a, b in zip(expected.samples, got.samples):
        assert a.response_ids == b.response_ids and a.loss_mask == b.loss_mask
        assert a.reward == b.reward == 1.0 and b.segments == iterations
        assert b.episode.env.world.orders == a.episode.env.world.orders


# ---------------------------------------------------------------------------------------------- loss
def test_tool_output_and_user_tokens_get_zero_gradient():
    """d loss / d logits on a real multi-turn trajectory: zero at every position whose next token is
    a prompt, tool-output or user token, nonzero at every position that predicts a sampled token."""
    env, task = _named_task()
    worker, _ = _worker(_shopper(task))
    (group,) = worker.rollout([("tool_use", task)], temperature=1.0, seed=0)
    samples = group.samples
    # add a user turn to one trajectory, through the template, outside the loss
    s = samples[1]
    extra = encode_continuation(
        TOK, s.episode.messages, [{"role": "user", "content": "thanks!"}], tools=task.tools
    )
    s.response_ids += extra.ids + _turn_tokens({"role": "assistant", "content": "welcome"})
    s.loss_mask += [0] * len(extra.ids) + [1] * (len(s.response_ids) - len(s.loss_mask) - len(extra.ids))
    batch = pack_sequences(
        [x.prompt_ids for x in samples],
        [x.response_ids for x in samples],
        loss_masks=[x.loss_mask for x in samples],
    )
    config = ModelConfig.from_preset("tiny")
    config.max_position_embeddings = batch["input_ids"].shape[1]
    torch.manual_seed(0)
    model = Transformer(config)
    logits = model(batch["input_ids"]).detach().requires_grad_(True)
    logp = masked_sequence_logprobs(logits, batch["input_ids"], batch["response_mask"])
    logp_old = logp.detach() - torch.tensor([0.3, -0.2])  # off-policy, as in a later update
    k15_loss(logp, logp_old, torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), tau=0.1).backward()
    grad = logits.grad.abs().sum(-1)  # (B, T)
    for i, x in enumerate(samples):
        target = torch.tensor([0] * len(x.prompt_ids) + x.loss_mask, dtype=torch.bool)[1:]
        g = grad[i, : len(target)]
        assert bool((g[~target] == 0).all()), "a context token got gradient"
        assert bool((g[target] > 0).all()), "a sampled token got no gradient"
        assert int((~target).sum()) > len(x.prompt_ids)  # tool outputs are really there
    assert bool(
        (grad[0, len(samples[0].prompt_ids) + len(samples[0].response_ids) - 1 :] == 0).all()
    )  # padding


# ---------------------------------------------------------------------------------------------- trainer
TOOL_CONFIG = {
    "envs": [
        {
            "name": "tool_use",
            "kwargs": {"failure_rate": 0.0},
            "max_tokens": 40,
            "max_turns": 3,
            "tool_tokens": 128,
            "tool_choice": "view_cart",  # a random model never calls a tool unless its first turn is forced
        }
    ],
    "model": "tiny",
    "model_overrides": {"max_position_embeddings": 2048},
    "prompts_per_step": 1,
    "engine_batch": 2,  # cache slots: K = 2 episodes at a time
    "samples_per_prompt": 2,
    "eval_tasks": 1,
    "eval_every": 100,
    "steps": 2,
}


def test_trainer_multi_turn_step_with_several_updates(monkeypatch):
    """The trainer's step on multi-turn episodes: masked batch, updates_per_step = 2 (the second
    update sees log pi_theta != log pi_old, so tau acts), per-episode log records."""
    env, task = _named_task()
    envs = [{"name": "tool_use", "kwargs": {"failure_rate": 0.0}, "max_tokens": 200, "max_turns": 5}]
    config = RLConfig.from_dict(
        {
            **TOOL_CONFIG,
            "envs": envs,
            "out_dir": None,
            "updates_per_step": 2,
            "lr": 0.01,
            "model_overrides": {"max_position_embeddings": 4096},
        }  # fmt: skip
    )
    trainer = RLTrainer(config, log_fn=None)
    script = _shopper(task)

    def botched(context, turn):
        return {"role": "assistant", "content": "", "tool_calls": [_call("nope", "{", 0)]}

    engine = ScriptedEngine(script, trainer.engine.max_seq_len)

    def generate(prompts, params):  # sample 0 of the group solves the task, sample 1 botches it
        outs = []
        for i, (p, sp) in enumerate(zip(prompts, params)):
            first_turn = p.count(TOK.im_assistant_id) == 1
            engine.script = botched if "nope" in TOK.decode(p) or (first_turn and i == 1) else script
            outs += engine.generate([p], [sp])
        return outs

    trainer.worker.engine = type(
        "E",
        (),
        {"tokenizer": TOK, "max_seq_len": trainer.engine.max_seq_len, "generate": staticmethod(generate)},
    )()
    monkeypatch.setattr(trainer, "draw_tasks", lambda: [("tool_use", task)])
    before = [p.detach().clone() for p in trainer.model.parameters()]
    rec = trainer.step(1)
    assert rec["groups"] == 1 and len(rec["episodes"]) == 2
    assert [e["reward"] for e in rec["episodes"]] == [1.0, -0.5], rec["episodes"]
    assert rec["signal_groups"] == 1 and rec["episodes"][1]["tool_call_errors"] > 0
    assert all(e["turns"] >= 1 and e["tool_calls"] >= 1 for e in rec["episodes"])
    assert rec["log_ratio"] > 0  # the second update's pi_theta moved away from pi_old
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    solved = rec["episodes"][0]
    assert rec["length"] == sum(e["sampled_tokens"] for e in rec["episodes"]) / 2  # only sampled tokens
    assert solved["appended_tokens"] > 3 * 11  # three tool results (and generation prompts) in the context


def test_model_context_too_short_for_the_prompts_is_a_config_error():
    from openk2.train.config import ConfigError

    config = RLConfig.from_dict({**TOOL_CONFIG, "out_dir": None, "model_overrides": {}})
    with pytest.raises(ConfigError, match="the prompts need .* tokens but the model has 256 positions"):
        RLTrainer(config, log_fn=None)
    envs = [{**TOOL_CONFIG["envs"][0], "tool_choice": "launch_rocket"}]
    with pytest.raises(ConfigError, match="tool_choice must be 'auto', 'required' or one of its tools"):
        RLTrainer(RLConfig.from_dict({**TOOL_CONFIG, "envs": envs, "out_dir": None}), log_fn=None)
    envs = [{**TOOL_CONFIG["envs"][0], "episode_tokens": 0}]
    with pytest.raises(ConfigError, match="episode_tokens must be >= 1"):
        RLConfig.from_dict({**TOOL_CONFIG, "envs": envs, "out_dir": None})


@pytest.mark.slow
def test_openk2_rl_with_the_tool_use_environment(tmp_path):
    """`openk2 rl` on a tool_use config, tiny random model, 2 steps: the engine's context holds the
    prompt (it crashed with ContextLengthError before), the first turn's forced tool call really runs
    and its result joins the context, episodes are logged with turns and tool-call counts, rewards
    are computed, the held-out evaluation runs whole episodes."""
    cfg = tmp_path / "rl.json"
    cfg.write_text(json.dumps({**TOOL_CONFIG, "out_dir": str(tmp_path / "run")}))
    proc = subprocess.run(
        [sys.executable, "-m", "openk2.cli", "rl", str(cfg)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r.get("kind") == "rl" and r["step"] > 0]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert len(r["episodes"]) == 2 and {"turns", "tool_calls", "reward", "reason"} <= set(
            r["episodes"][0]
        )
        for e in r["episodes"]:
            assert isinstance(e["reward"], float) and e["reason"]
            assert e["turns"] >= 1 and e["tool_calls"] >= 1 and e["appended_tokens"] > 20  # the tool ran
        assert r["tool_calls"] >= 1 and r["turns"] >= 1
        # the engine's recorded log-probs of the sampled tokens equal the trainer's masked sum over the
        # whole multi-turn context (tool results included as context): the mask is aligned
        assert r["engine_logprob_gap"] < 1e-3
    evals = [r for r in records if "eval/tool_use/reward" in r]
    assert evals and evals[0]["eval/tool_use/tool_calls"] >= 1


def test_environment_bugs_and_short_contexts_end_episodes_without_a_crash():
    from openk2.rl.envs.tool_use import ToolUseEnv
    from openk2.serve.engine import Engine

    env, task = _named_task()

    class Raising(ToolUseEnv):
        def step(self, message):
            raise KeyError("boom")

    class Garbage(ToolUseEnv):
        def step(self, message):
            result = super().step(message)
            result.messages = [{"role": "robot", "content": 3}]
            return result

    worker, _ = _worker(_shopper(task), env=Raising(failure_rate=0.0))
    (group,) = worker.rollout([("tool_use", task)], temperature=1.0, seed=0)
    assert all(s.finish_reason == "error" and s.reward == 0.0 for s in group.samples)
    assert group.samples[0].info["reason"] == "env_error: KeyError: 'boom'"
    worker, _ = _worker(_shopper(task), env=Garbage(failure_rate=0.0))
    (group,) = worker.rollout([("tool_use", task)], temperature=1.0, seed=0)
    s = group.samples[0]
    assert s.truncated and s.info["truncated"] == "the environment's reply cannot be rendered"
    assert "content must be a string" in s.info["append_error"]
    # single-turn: a budget longer than the engine's context is cut at the context, a prompt longer
    # than the context is cut before decoding; neither raises ContextLengthError
    arith = make_env("arithmetic", max_digits=1, ops="+")
    (t,) = arith.sample_tasks(1, seed=0)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny")).eval()
    n = len(
        encode_chat(TOK, [{"role": "system", "content": ""}, *t.messages], add_generation_prompt=True).ids
    )
    for max_seq_len, why in [
        (n + 3, "the context is full"),
        (n - 5, "the prompt does not fit the engine's context"),
    ]:
        engine = Engine(model, TOK, max_batch=4, max_seq_len=max_seq_len)
        worker = RolloutWorker(engine, {"arithmetic": arith}, {"arithmetic": 50}, 2, truncation_penalty=0.5)
        (group,) = worker.rollout([("arithmetic", t)], temperature=1.0, seed=0)
        for s in group.samples:
            assert s.finish_reason in ("length", "stop")
            if s.truncated:
                assert s.info["truncated"] == why and s.reward == -0.5
                assert len(s.prompt_ids) + len(s.response_ids) - 1 <= max_seq_len or not s.response_ids
        assert any(s.truncated for s in group.samples)  # a random model rarely stops in 4 tokens
        assert why.startswith("the context") or all(s.truncated and not s.response_ids for s in group.samples)
