"""Engine: the cached forward equals the plain forward, batching changes nothing, the scheduler admits,
queues, retires and aborts correctly, sampling parameters do what they say."""

from __future__ import annotations

import threading

import jsonschema
import pytest
import torch
from serve_util import tiny_engine, tiny_model

from openk2.serve.cache import ContextLengthError
from openk2.serve.engine import Engine, EngineFullError
from openk2.serve.forward import CachedForward
from openk2.serve.sampling import SamplingParams, sample
from openk2.tokenizer.tokenizer import K2Tokenizer

GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)


def plain_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding with the full forward pass over the whole sequence each step (no cache)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


@pytest.fixture(scope="module")
def engine() -> Engine:
    return tiny_engine(max_batch=4, max_seq_len=256)


def prompts(tok: K2Tokenizer) -> list[list[int]]:
    texts = ["hello world", "a", "The quick brown fox jumps over", "tools: [1, 2, 3]", "zz top", "MLA cache"]
    return [tok.encode(t) for t in texts]


def test_greedy_equals_plain_forward(engine):
    ps = prompts(engine.tokenizer)
    outs = engine.generate(ps, GREEDY)  # 6 prompts through 4 slots: queueing and slot reuse too
    for p, out in zip(ps, outs):
        assert out.completions[0].token_ids == plain_greedy(engine.model, p, 16)
        assert out.completions[0].finish_reason == "length"


def test_batched_equals_one_at_a_time(engine):
    ps = prompts(engine.tokenizer)
    params = SamplingParams(max_tokens=12, temperature=0.8, top_k=40, top_p=0.9, seed=7, ignore_eos=True)
    together = [o.completions[0].token_ids for o in engine.generate(ps, params)]
    alone = [engine.generate([p], params)[0].completions[0].token_ids for p in ps]
    assert together == alone
    unseeded = SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True)
    a, b = engine.generate([ps[0], ps[0]], unseeded)
    assert a.completions[0].token_ids != b.completions[0].token_ids


def test_n_copies_in_scattered_slots_match_plain_forward(engine):
    """Two requests with n=2 admitted together: their prompts are prefilled once each into slots 0
    and 2 (not contiguous) and copied to 1 and 3; every copy decodes like the plain forward."""
    ps = prompts(engine.tokenizer)[2:4]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, n=2)
    for p, out in zip(ps, engine.generate(ps, params)):
        assert [c.token_ids for c in out.completions] == [plain_greedy(engine.model, p, 8)] * 2


def test_unfolded_absorbed_path_matches_plain_forward(engine):
    """The path large models take (W_uk / W_uv as separate batched matmuls, not folded)."""
    eng = Engine(engine.model, engine.tokenizer, max_batch=4, max_seq_len=256)
    assert eng.forward.attn[0].fold  # tiny: folding does not grow the weights much
    eng.forward = CachedForward(eng.model, eng.cache, fold=False)
    ps = prompts(engine.tokenizer)[:5]
    for p, out in zip(ps, eng.generate(ps, GREEDY)):
        assert out.completions[0].token_ids == plain_greedy(engine.model, p, 16)


def test_sampler_draws_from_the_distribution():
    """The exponential race draws each token with its softmax probability (unseeded rows share one
    noise draw), and top-k / top-p cuts are respected."""
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0]]).expand(40000, -1)
    n = logits.shape[0]
    params = [SamplingParams(temperature=0.8)] * n
    tokens, _ = sample(logits, params, [None] * n, [None] * n, torch.Generator().manual_seed(0))
    freq = torch.bincount(torch.tensor(tokens), minlength=5).float() / n
    torch.testing.assert_close(freq, torch.softmax(logits[0] / 0.8, -1), atol=0.01, rtol=0)
    params = [SamplingParams(temperature=1.0, top_k=2)] * n
    tokens, _ = sample(logits, params, [None] * n, [None] * n, torch.Generator().manual_seed(1))
    assert set(tokens) == {0, 1}
    params = [SamplingParams(temperature=1.0, top_p=0.5)] * n  # token 0 alone has p = 0.61
    assert set(sample(logits, params, [None] * n, [None] * n)[0]) == {0}


def test_bf16_engine_greedy_matches_plain_forward():
    model = tiny_model(seed=3).to(torch.bfloat16)
    eng = Engine(model, K2Tokenizer.byte_level(), max_batch=2, max_seq_len=128)
    p = eng.tokenizer.encode("bfloat16 cache")
    assert eng.cache.kv.dtype == torch.bfloat16
    out = eng.generate([p], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0]
    assert out.completions[0].token_ids == plain_greedy(model, p, 6)


def test_cache_holds_only_the_latent(engine):
    cfg = engine.config
    assert engine.cache.kv.shape[-1] == cfg.kv_lora_rank + cfg.qk_rope_head_dim
    assert engine.cache.bytes_per_token == cfg.num_hidden_layers * cfg.kv_cache_dim * 4


def test_n_logprobs_and_seed(engine):
    p = engine.tokenizer.encode("sample me")
    params = SamplingParams(max_tokens=8, n=3, seed=11, logprobs=True, top_logprobs=3, ignore_eos=True)
    out = engine.generate([p], params)[0]
    assert [c.index for c in out.completions] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.completions}) > 1  # the n choices differ
    again = engine.generate([p], params)[0]
    assert [c.token_ids for c in again.completions] == [c.token_ids for c in out.completions]
    with torch.no_grad():
        logits = engine.model(torch.tensor([p]))[0, -1].float()
    first = out.completions[0].logprobs[0]
    expected = torch.log_softmax(logits, -1)
    assert first.logprob == pytest.approx(float(expected[first.token_id]), abs=1e-4)
    assert [t for t, _ in first.top] == expected.topk(3).indices.tolist()


def test_stop_strings_and_tokens(engine):
    p = engine.tokenizer.encode("stop test")
    raw = dict(max_tokens=16, temperature=0, ignore_eos=True, skip_special_tokens=False)
    free = engine.generate([p], SamplingParams(**raw))[0].completions[0]
    stop = free.text[5:7]
    assert len(stop) == 2
    out = engine.generate([p], SamplingParams(**raw, stop=[stop]))[0]
    c = out.completions[0]
    assert c.finish_reason == "stop" and c.text == free.text[: free.text.find(stop)]
    tok = free.token_ids[3]
    out = engine.generate(
        [p], SamplingParams(max_tokens=16, temperature=0, stop_token_ids=[tok], ignore_eos=True)
    )
    c = out[0].completions[0]
    assert c.finish_reason == "stop" and c.token_ids == free.token_ids[: free.token_ids.index(tok) + 1]


def test_streamed_text_equals_final_text(engine):
    events = []
    p = engine.tokenizer.encode("stream")
    params = SamplingParams(max_tokens=20, temperature=0, stop=["zz"], ignore_eos=True)
    out = engine.submit(p, params, on_event=events.append)
    while not out.finished:
        engine.step()
    assert "".join(e.text for e in events) == out.completions[0].text
    assert [t for e in events for t in e.token_ids] == out.completions[0].token_ids
    assert events[-1].finish_reason == out.completions[0].finish_reason


def test_json_schema_constraint(engine):
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "size": {"enum": ["S", "M", "L"]}},
        "required": ["ok", "size"],
        "additionalProperties": False,
    }
    params = SamplingParams(
        max_tokens=60, temperature=1.0, seed=0, grammar=engine.grammars.json_schema(schema)
    )
    out = engine.generate([engine.tokenizer.encode("json please")] * 3, params)
    import json

    for o in out:
        assert o.completions[0].finish_reason == "stop"
        jsonschema.validate(json.loads(o.completions[0].text), schema)


def test_limits_give_clear_errors(engine):
    with pytest.raises(ContextLengthError, match="context is 256 tokens"):
        engine.submit(list(range(200)), SamplingParams(max_tokens=100))
    with pytest.raises(ValueError, match="temperature"):
        engine.submit([1, 2], SamplingParams(temperature=3.0))
    with pytest.raises(ValueError, match="top_p"):
        engine.submit([1, 2], SamplingParams(top_p=1.5))  # 0 is allowed: greedy
    with pytest.raises(ValueError, match="token ids"):
        engine.submit([1, 10**6], SamplingParams())
    with pytest.raises(ValueError, match="cache slots"):
        engine.submit([1, 2], SamplingParams(n=5, max_tokens=4))
    small = Engine(engine.model, engine.tokenizer, max_batch=1, max_seq_len=64, max_queue=1)
    small.submit([1, 2], GREEDY)
    with pytest.raises(EngineFullError, match="queue is full"):
        small.submit([1, 2], GREEDY)


def test_abort_frees_the_slot(engine):
    eng = Engine(engine.model, engine.tokenizer, max_batch=1, max_seq_len=256).start()
    try:
        long = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
        first = eng.submit([5, 6, 7], long)
        second = eng.submit([8, 9], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
        eng.abort(first.request_id)
        done = threading.Event()
        while not second.finished:
            done.wait(0.01)
        assert first.completions[0].finish_reason == "abort"
        assert len(first.completions[0].token_ids) < 200
        assert second.completions[0].finish_reason == "length"
        assert eng.stats()["running"] == 0
    finally:
        eng.stop()


def test_load_weights_syncs_a_new_model(engine):
    eng = Engine(tiny_model(seed=1, max_positions=256), engine.tokenizer, max_batch=2, max_seq_len=256)
    p = engine.tokenizer.encode("weights")
    before = eng.generate([p], GREEDY)[0].completions[0].token_ids
    seconds = eng.load_weights(engine.model)
    after = eng.generate([p], GREEDY)[0].completions[0].token_ids
    assert seconds >= 0 and after == plain_greedy(engine.model, p, 16) and before != after
    with pytest.raises(ValueError, match="missing"):
        eng.load_weights({"norm.weight": torch.ones(64)})


@pytest.mark.slow
def test_compiled_decode_matches_eager(engine):
    """`compile=True`: the torch.compile'd decode step gives the eager engine's tokens, greedy and
    seeded, alone (the single-sequence graph) and batched with mixed lengths (the batch graph),
    from a one-token prompt up; and after `load_weights` it decodes with the new weights (the graphs
    read the weights at every call, they did not bake them in)."""
    fast = Engine(
        tiny_model(seed=1, max_positions=256), engine.tokenizer, max_batch=4, max_seq_len=256, compile=True
    )
    assert fast.forward.compiled and fast.stats()["compiled"]
    fast.load_weights(engine.model)
    ps = prompts(engine.tokenizer)  # includes the one-token prompt "a"
    sampled = SamplingParams(max_tokens=12, temperature=0.8, top_k=40, seed=3, ignore_eos=True)
    for params in (GREEDY, sampled):
        want = [o.completions[0].token_ids for o in engine.generate(ps, params)]
        assert [o.completions[0].token_ids for o in fast.generate(ps, params)] == want
        assert fast.generate([ps[1]], params)[0].completions[0].token_ids == want[1]
    # the compiled step's logits agree with the eager ones closely, not just in their argmax
    with torch.inference_mode():
        tokens, pos = torch.tensor([5, 6, 7]), torch.tensor([3, 9, 4])
        eager = CachedForward(engine.model, fast.cache)
        logits = fast.forward.decode(tokens, pos, 10)
        torch.testing.assert_close(logits, eager.decode(tokens, pos, 10), atol=1e-4, rtol=1e-4)


def test_compile_without_a_cxx_compiler_fails_at_start_with_a_clear_error(engine):
    """No working C++ compiler: the engine refuses to start (not a crash at the first request), and
    says what to do. Inductor's on-disk cache is off so that the compiler is really needed."""
    import torch._inductor.config as inductor_config

    with inductor_config.patch({"cpp.cxx": ("/nonexistent/g++",), "fx_graph_cache": False}):
        with pytest.raises(RuntimeError, match=r"InvalidCxxCompiler.*drop --compile"):
            Engine(tiny_model(max_positions=64), engine.tokenizer, max_batch=2, max_seq_len=64, compile=True)
