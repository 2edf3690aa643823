"""The policy in another process: the trainer pushes its weights into a real `openk2 serve` subprocess
(`POST /weights`, openk2.rl.weight_sync) and the server then computes the trainer's log-probs; bad
pushes (wrong token, corrupt or misshapen payloads, NaN, too large) are refused with a 4xx and change
nothing; the engine checks a whole update before copying any of it; and the RL rollout worker runs
through the server with `RemoteEngine`."""

from __future__ import annotations

import httpx
import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from serve_util import LiveServer, free_port, serve_process, tiny_engine, tiny_model

from openk2.checkpoint import load, save_model
from openk2.model.transformer import Transformer
from openk2.optim.muon import MuonClip
from openk2.rl.env import make_env
from openk2.rl.loss import masked_lm_loss
from openk2.rl.rollout import RolloutWorker
from openk2.rl.weight_sync import RemoteEngine, WeightPusher, WeightSyncError, weights_payload
from openk2.serve.api import create_app
from openk2.serve.engine import Engine, WeightUpdateError
from openk2.serve.sampling import SamplingParams
from openk2.tokenizer import K2Tokenizer

TOKEN = "sync-secret"
# fp32 on both sides; the server's absorbed-MLA cached forward and the training forward sum in another
# order, so per-token log-probs agree to rounding (measured max |diff| ~1e-6), not bit for bit
LOGPROB_TOL = 1e-5


def _greedy_logprobs(base: str, prompt: list[int], tokens: int = 8) -> tuple[list[int], torch.Tensor]:
    body = {"model": "m", "prompt": prompt, "max_tokens": tokens, "temperature": 0, "logprobs": 0,
            "return_token_ids": True, "ignore_eos": True}  # fmt: skip
    r = httpx.post(base + "/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    return choice["token_ids"], torch.tensor(choice["logprobs"]["token_logprobs"], dtype=torch.float64)


def _model_logprobs(model: Transformer, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """The model's log-probs of `tokens` after `prompt` (teacher forcing, training forward)."""
    model.eval()
    with torch.no_grad():
        ids = torch.tensor([prompt + tokens])
        lp = torch.log_softmax(model(ids)[0].double(), -1)
    return torch.stack([lp[len(prompt) - 1 + i, t] for i, t in enumerate(tokens)])


def _optimizer_step(model: Transformer, prompt: list[int]) -> None:
    """One real MuonClip step on a language-model loss: every matrix moves."""
    model.train()
    optimizer = MuonClip(model, lr=0.02, adamw_lr=0.01, weight_decay=0.0)
    ids = torch.tensor([prompt * 3])
    masked_lm_loss(model(ids), ids, torch.ones_like(ids, dtype=torch.bool)).backward()
    optimizer.step()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "policy"
    save_model(tiny_model(seed=0), path)
    K2Tokenizer.byte_level().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def server(checkpoint):
    """One `openk2 serve` subprocess with the endpoint on, shared by the tests (each first pushes the
    weights it expects)."""
    args = ("--weight-update-token", TOKEN, "--max-batch", "8", "--served-model-name", "m")
    with serve_process(checkpoint, *args) as base:
        yield base


@pytest.mark.slow  # one `openk2 serve` subprocess start (~20 s on 2 busy cores), shared
def test_push_makes_the_server_compute_the_trainers_logprobs(checkpoint, server):
    """A real `openk2 serve` subprocess; the trainer takes an optimizer step and pushes: the server's
    greedy tokens and log-probs become the trainer's (to LOGPROB_TOL) and differ from before. Bad
    pushes are refused with a 4xx naming the problem and leave the outputs unchanged."""
    tok = K2Tokenizer.byte_level()
    prompt = tok.encode("12+30=")
    trainer, _ = load(checkpoint, dtype=torch.float32)
    base = server
    root = base.removesuffix("/v1")
    pusher = WeightPusher(base, TOKEN)
    start = pusher.push(trainer).version  # the checkpoint's weights, whatever ran before
    tokens0, lp0 = _greedy_logprobs(base, prompt)
    torch.testing.assert_close(lp0, _model_logprobs(trainer, prompt, tokens0), atol=LOGPROB_TOL, rtol=0)

    _optimizer_step(trainer, prompt)
    stats = pusher.push(trainer)
    assert stats.version == start + 1 and stats.bytes > 4 * sum(p.numel() for p in trainer.parameters())
    assert stats.seconds > 0 and stats.gbps > 0 and 0 <= stats.load_s <= stats.send_s
    tokens1, lp1 = _greedy_logprobs(base, prompt)
    mine = _model_logprobs(trainer, prompt, tokens1)
    torch.testing.assert_close(lp1, mine, atol=LOGPROB_TOL, rtol=0)
    # the push changed the served policy: the old model's log-probs of these tokens are far off
    assert (_model_logprobs_of_checkpoint(checkpoint, prompt, tokens1) - lp1).abs().max() > 1e-2

    def refused(body: bytes, headers: dict | None = None) -> httpx.Response:
        h = {"Authorization": f"Bearer {TOKEN}"} if headers is None else headers
        r = httpx.post(root + "/weights", content=body, headers=h, timeout=60)
        assert 400 <= r.status_code < 500, (r.status_code, r.text)
        return r

    good = weights_payload(trainer)
    assert refused(good, {"Authorization": "Bearer wrong"}).status_code == 401
    assert refused(good, {}).status_code == 401
    assert refused(b"").status_code == 400
    corrupt = refused(good[: len(good) // 2])
    assert corrupt.status_code == 400 and "not a safetensors file" in corrupt.json()["error"]["message"]
    state = {k: v.detach().clone() for k, v in trainer.state_dict().items()}
    name = next(k for k, v in state.items() if v.dim() == 2 and v.shape[0] > 1)
    small = min((k for k, v in state.items() if v.is_floating_point()), key=lambda k: state[k].numel())
    for bad, message in [
        ({**state, name: state[name][:-1]}, f"{name}: shape"),
        ({**state, name: torch.full_like(state[name], float("nan"))}, "NaN"),
        ({**state, small: state[small].double()}, f"{small}: dtype float64"),
        ({**state, "model.extra.weight": torch.zeros(2)}, "unknown weight names"),
        ({k: v for k, v in state.items() if k != name}, "weights missing"),
    ]:
        r = refused(save_safetensors(bad))
        assert r.status_code == 422 and message in r.json()["error"]["message"], r.text
    too_big = refused(b"\0" * (len(good) + 2**20))
    assert too_big.status_code == 413
    # nothing above changed the served weights
    again, lp_again = _greedy_logprobs(base, prompt)
    assert again == tokens1 and torch.equal(lp_again, lp1)
    assert pusher.push(trainer).version == start + 2
    with pytest.raises(WeightSyncError, match="refused \\(401\\)"):
        WeightPusher(base, "wrong").push(trainer)


def _model_logprobs_of_checkpoint(checkpoint, prompt, tokens):
    model, _ = load(checkpoint, dtype=torch.float32)
    return _model_logprobs(model, prompt, tokens)


@pytest.mark.slow  # one `openk2 serve` subprocess start (~20 s on 2 busy cores), shared
def test_remote_engine_rolls_out_through_the_server(checkpoint, server):
    """RolloutWorker on a RemoteEngine: K samples per prompt come back with token ids, per-token
    log-probs and finish reasons, scored by the environment; its load_weights pushes."""
    tok = K2Tokenizer.byte_level()
    model, _ = load(checkpoint, dtype=torch.float32)
    engine = RemoteEngine(server, tok, weight_token=TOKEN, max_parallel=4)
    sync_s = engine.load_weights(model)
    assert sync_s > 0 and engine.last_sync.bytes > 0
    env = make_env("arithmetic", max_digits=1, ops="+")
    worker = RolloutWorker(engine, {"arithmetic": env}, {"arithmetic": 5}, 3)
    groups = worker.rollout([("arithmetic", t) for t in env.sample_tasks(2, seed=1)], 1.0, seed=0)
    assert len(groups) == 2
    for g in groups:
        for s in g.samples:
            assert s.response_ids and len(s.engine_logprobs) == len(s.response_ids)
            assert s.finish_reason in ("stop", "length") and all(lp <= 0 for lp in s.engine_logprobs)
    # greedy through the server = greedy through a local engine on the same weights
    local = Engine(model, tok, max_batch=2, max_seq_len=256)
    params = SamplingParams(max_tokens=6, temperature=0, logprobs=True, ignore_eos=True)
    prompt = tok.encode("7+8=")
    remote_out, local_out = engine.generate([prompt], params)[0], local.generate([prompt], params)[0]
    assert remote_out.completions[0].token_ids == local_out.completions[0].token_ids
    engine.close()
    with pytest.raises(WeightSyncError, match="unreachable"):
        RemoteEngine(f"http://127.0.0.1:{free_port()}", tok, weight_token=TOKEN)


@pytest.mark.slow  # shares the server above
def test_rl_trainer_rolls_out_on_the_server_and_pushes_after_every_step(
    checkpoint, server, tmp_path, monkeypatch
):
    """`rollout_server` in the RL config: rollouts run on the server, the trainer's weights are pushed
    after the step (sync_s, sync_bytes, sync_gbps logged), and the server then serves them."""
    from openk2.rl.trainer import RLConfig, RLTrainer

    monkeypatch.setenv("OPENK2_WEIGHT_UPDATE_TOKEN", TOKEN)
    env = {"name": "arithmetic", "kwargs": {"max_digits": 1, "ops": "+"}, "max_tokens": 6}
    config = RLConfig.from_dict({"envs": [env], "model": str(checkpoint), "rollout_server": server,
                                 "prompts_per_step": 3, "samples_per_prompt": 4, "eval_tasks": 2,
                                 "lr": 0.02, "out_dir": str(tmp_path / "run")})  # fmt: skip
    trainer = RLTrainer(config, log_fn=None)
    assert isinstance(trainer.engine, RemoteEngine)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    rec = trainer.step(1)
    assert rec["groups"] == 3 and rec["sync_s"] > 0 and rec["sync_gbps"] > 0
    assert rec["sync_bytes"] == trainer.engine.last_sync.bytes
    if rec["signal_groups"]:
        assert any(not torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())
    prompt = K2Tokenizer.byte_level().encode("4+4=")
    tokens, lp = _greedy_logprobs(server, prompt)
    torch.testing.assert_close(lp, _model_logprobs(trainer.model, prompt, tokens), atol=LOGPROB_TOL, rtol=0)
    with pytest.raises(ValueError, match="rollout_server must be an http"):
        RLConfig.from_dict({"envs": [env], "rollout_server": "localhost:8000"})


def test_engine_checks_a_whole_update_before_copying_any_of_it():
    """Engine.load_weights: a payload with one bad tensor late in the dict changes no weight; a good
    one in bfloat16 is cast and applied."""
    engine = tiny_engine(max_batch=2, max_seq_len=64)
    before = {k: v.clone() for k, v in engine.model.state_dict().items()}
    new = {k: v + 0.5 if v.is_floating_point() else v for k, v in tiny_model(seed=1).state_dict().items()}
    last = list(new)[-1]
    for bad, message in [
        ({**new, last: new[last].unsqueeze(0)}, "shape"),
        ({**new, last: new[last] * float("inf")}, "NaN or infinite"),
        ({**new, last: new[last].to(torch.int32)}, "dtype int32"),
        ("not a dict", "dict of tensors"),
    ]:
        with pytest.raises(WeightUpdateError, match=message):
            engine.load_weights(bad)
        assert all(torch.equal(v, before[k]) for k, v in engine.model.state_dict().items())
    engine.load_weights({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in new.items()})
    after = engine.model.state_dict()
    assert all(
        torch.equal(after[k], v.to(torch.bfloat16).float()) for k, v in new.items() if v.is_floating_point()
    )
    # the payload format round-trips the trainer's tensors bit for bit
    model = tiny_model(seed=2)
    back = load_safetensors(weights_payload(model))
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())


def test_pushes_during_generation_land_between_steps():
    """Requests running while weights are pushed (twice at once, in threads) all finish normally, the
    pushes apply one after the other, and later requests decode with the last weights."""
    import threading
    import time

    engine = tiny_engine(max_batch=4, max_seq_len=256)
    new = tiny_model(seed=3)
    prompt = engine.tokenizer.encode("1+2=")
    body = {"model": "openk2-test", "prompt": prompt, "max_tokens": 200, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}  # fmt: skip
    with LiveServer(engine, weight_update_token=TOKEN) as server:
        results: dict[str, httpx.Response] = {}

        def call(name: str, **kw) -> None:
            results[name] = httpx.post(server.url + kw.pop("path"), timeout=120, **kw)

        headers = {"Authorization": f"Bearer {TOKEN}"}
        payload = weights_payload(new)
        gen = {"path": "/v1/completions", "json": body}
        push = {"path": "/weights", "content": payload, "headers": headers}
        threads = [threading.Thread(target=call, args=(f"gen{i}",), kwargs=dict(gen)) for i in range(2)]
        for t in threads:
            t.start()
        deadline = time.time() + 60
        while engine.stats()["running"] < 2 and time.time() < deadline:  # both are decoding
            time.sleep(0.005)
        pushes = [threading.Thread(target=call, args=(f"push{i}",), kwargs=dict(push)) for i in range(2)]
        for t in pushes:
            t.start()
        for t in threads + pushes:
            t.join()
        assert all(r.status_code == 200 for r in results.values()), {k: r.text for k, r in results.items()}
        assert sorted(results[f"push{i}"].json()["version"] for i in range(2)) == [1, 2]
        assert all(len(results[f"gen{i}"].json()["choices"][0]["token_ids"]) == 200 for i in range(2))
        after = httpx.post(server.url + "/v1/completions", json={**body, "max_tokens": 8}, timeout=60).json()
    local = Engine(new.eval(), engine.tokenizer, max_batch=1, max_seq_len=256)
    expected = local.generate([prompt], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    assert after["choices"][0]["token_ids"] == expected.completions[0].token_ids


def test_weights_endpoint_is_off_without_a_token():
    engine = tiny_engine(max_batch=2, max_seq_len=64)
    with LiveServer(engine) as server:
        r = httpx.post(server.url + "/weights", content=weights_payload(engine.model), timeout=30)
        assert r.status_code == 404
    with pytest.raises(ValueError, match="must not be empty"):
        create_app(engine, "m", weight_update_token=" ")
