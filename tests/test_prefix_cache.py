"""Prefix caching: outputs with the cache equal outputs without it, token for token (greedy, seeded
sampling with n > 1, constrained tool calls, concurrent requests, a prompt that is entirely a cached
prefix, eviction under a tiny budget, new weights), and the server reports its hit rate in /metrics."""

from __future__ import annotations

import json
import threading

import httpx
import openai
import pytest
import torch
from serve_util import MODEL, LiveServer, tiny_model

from openk2.serve.cli import add_arguments
from openk2.serve.engine import Engine
from openk2.serve.prefix_cache import PrefixCache
from openk2.serve.sampling import SamplingParams
from openk2.tokenizer.chat import encode_chat
from openk2.tokenizer.tokenizer import K2Tokenizer

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": name,
            "description": f"{name} what the user asks about",
            "parameters": {
                "type": "object",
                "properties": {"query": {"type": "string"}, "limit": {"type": "integer"}},
                "required": ["query"],
            },
        },
    }
    for name in ("search", "lookup")
]
SYSTEM = "You are a careful assistant. Answer briefly, call a tool when one helps, never guess."
QUESTIONS = ["What is 2+2?", "hi", "Find the population of Lyon", "Translate 'chat' to English", "?"]
GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=5)


@pytest.fixture(scope="module")
def tok():
    return K2Tokenizer.byte_level()


def chat_prompts(tok: K2Tokenizer, system: str = SYSTEM) -> list[list[int]]:
    """A long shared system prompt and tool list, different user turns (~600 tokens, byte level)."""
    return [
        encode_chat(
            tok, [{"role": "system", "content": system}, {"role": "user", "content": q}], TOOLS, True
        ).ids
        for q in QUESTIONS
    ]


def engine(model, tok, prefix_cache_tokens: int, **kw) -> Engine:
    return Engine(model, tok, max_batch=4, max_seq_len=1024, prefix_cache_tokens=prefix_cache_tokens, **kw)


def tokens(outs) -> list[list[list[int]]]:
    return [[c.token_ids for c in o.completions] for o in outs]


def test_cached_prefill_logits_equal_full_prefill(model, tok):
    """The forward alone: a prompt run after its restored prefix gives the full prefill's logits."""
    plain, cached = engine(model, tok, 0), engine(model, tok, 4096)
    first, second = chat_prompts(tok)[:2]
    params = SamplingParams(max_tokens=1, temperature=0, logprobs=True, top_logprobs=5)
    cached.generate([first], params)
    restored = cached.prefix_cache.hit_tokens
    a, b = plain.generate([second], params)[0], cached.generate([second], params)[0]
    assert cached.prefix_cache.hit_tokens - restored > 500  # the shared system prompt + tools
    for x, y in zip(a.completions[0].logprobs[0].top, b.completions[0].logprobs[0].top):
        assert x[0] == y[0] and x[1] == pytest.approx(y[1], abs=1e-4)


def test_greedy_seeded_and_n_equal_uncached(model, tok):
    plain, cached = engine(model, tok, 0), engine(model, tok, 4096)
    ps = chat_prompts(tok)
    seeded = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.95, seed=3, n=2, ignore_eos=True)
    for params in (GREEDY, seeded):
        want = tokens(plain.generate(ps, params))
        assert tokens(cached.generate(ps, params)) == want  # 5 prompts, 4 slots: later ones hit
        assert tokens(cached.generate(ps, params)) == want  # every prompt's prefix cached now
    stats = cached.stats()
    assert stats["prefix_cache_hit_tokens"] > 0.7 * stats["prefix_cache_queried_tokens"] / 2


def test_constrained_tool_call_equals_uncached(model, tok):
    plain, cached = engine(model, tok, 0), engine(model, tok, 4096)
    ps = chat_prompts(tok)
    grammar = plain.grammars.tool_calls(TOOLS, name="search")
    params = SamplingParams(max_tokens=60, temperature=1.0, seed=1, grammar=grammar)
    want = tokens(plain.generate(ps[:3], params))
    cached.generate(ps[3:], GREEDY)  # warm the shared prefix
    assert tokens(cached.generate(ps[:3], params)) == want
    assert cached.prefix_cache.hit_tokens > 0


def test_prompt_entirely_a_cached_prefix(model, tok):
    """A prompt whose every block is cached still runs its last token (whose logits pick the first
    new one); block-aligned and not, shorter and longer than one block."""
    plain, cached = engine(model, tok, 0), engine(model, tok, 4096, prefix_block_size=8)
    base = chat_prompts(tok)[0]
    ps = [base[:64], base[:64], base[:67], base[:67], base[:8], base[:8], base[:1], base[:1]]
    for p in ps:  # one at a time, so each sees what the one before stored
        assert tokens(cached.generate([p], GREEDY)) == tokens(plain.generate([p], GREEDY))
    # hits: 64 again (63 tokens may be reused: 7 blocks), 67 twice (8 blocks each), 8 and 1 never
    assert cached.prefix_cache.hit_tokens == 56 + 64 + 64


def test_concurrent_requests_on_the_engine_thread(model, tok):
    """Requests submitted from several threads at once, the engine running in the background, with a
    cache too small for both system prompts' blocks (eviction while they run)."""
    plain, cached = engine(model, tok, 0), engine(model, tok, 768).start()
    try:
        ps = chat_prompts(tok) + chat_prompts(tok, "A second persona. " + SYSTEM)
        params = [SamplingParams(max_tokens=8, temperature=0.7, seed=i, ignore_eos=True) for i in range(10)]
        want = tokens(plain.generate(ps, params))
        outs: list = [None] * len(ps)

        def client(i: int) -> None:
            out = cached.submit(ps[i], params[i])
            while not out.finished:
                threading.Event().wait(0.01)
            outs[i] = out

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(ps))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert tokens(outs) == want
        assert cached.prefix_cache.evictions > 0 and cached.prefix_cache.hit_tokens > 0
    finally:
        cached.stop()


def test_eviction_under_a_tiny_budget(model, tok):
    """Three blocks for prompts of many: least recently used leaves go first, the pool never grows,
    and outputs stay equal to the uncached engine's."""
    plain, cached = engine(model, tok, 0), engine(model, tok, 24, prefix_block_size=8)
    prefix = cached.prefix_cache
    ps = [tok.encode(f"shared prefix xx {i} and a tail of some length {i * 7}") for i in range(6)]
    ps += ps[::-1]
    for p in ps:
        assert tokens(cached.generate([p], GREEDY)) == tokens(plain.generate([p], GREEDY))
        assert prefix.used_blocks <= prefix.num_blocks == 3
    assert prefix.evictions > 0 and prefix.hit_tokens > 0
    # the invariant eviction relies on: every cached block's parent is cached too
    keys = {block: key for key, block in prefix._block.items()}
    assert all(parent == -1 or parent in keys for parent, _ in keys.values())


def test_new_weights_clear_the_cache(model, tok):
    """After load_weights the cached rows are stale: outputs must equal an engine on the new weights."""
    cached = engine(tiny_model(seed=5), tok, 4096)
    ps = chat_prompts(tok)
    cached.generate(ps, GREEDY)
    assert cached.prefix_cache.used_blocks > 0
    other = tiny_model(seed=6)
    cached.load_weights(other)
    assert cached.prefix_cache.used_blocks == 0
    assert tokens(cached.generate(ps, GREEDY)) == tokens(engine(other, tok, 0).generate(ps, GREEDY))
    cached.clear_prefix_cache()
    assert cached.prefix_cache.used_blocks == 0


def test_bad_sizes_are_clear_errors(model, tok):
    with pytest.raises(ValueError, match="prefix_cache_tokens must be >= 0"):
        engine(model, tok, -1)
    with pytest.raises(ValueError, match="holds no block"):
        engine(model, tok, 4)
    assert engine(model, tok, 0).prefix_cache is None
    assert isinstance(engine(model, tok, 16).prefix_cache, PrefixCache)
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args(["m", "--no-prefix-cache"]).prefix_cache_tokens == 0
    assert parser.parse_args(["m", "--prefix-cache-tokens", "512"]).prefix_cache_tokens == 512
    assert parser.parse_args(["m"]).prefix_cache_tokens is None
    with pytest.raises(SystemExit):
        parser.parse_args(["m", "--prefix-cache-tokens", "-3"])


def test_server_reports_the_hit_rate_and_answers_as_uncached(model, tok):
    """Two chats with the same system prompt and tools through the official client: the second one's
    prefix comes from the cache (/metrics says so), and both replies equal an uncached server's."""
    messages = [
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}] for q in QUESTIONS[:2]
    ]
    replies = {}
    for size in (0, 4096):
        eng = engine(model, tok, size).start()
        try:
            with LiveServer(eng) as srv:
                client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x")
                replies[size] = [
                    client.chat.completions.create(
                        model=MODEL, messages=m, tools=TOOLS, max_tokens=12, temperature=0, seed=0
                    ).choices[0]
                    for m in messages
                ]
                metrics = httpx.get(srv.url + "/metrics", timeout=10).text
        finally:
            eng.stop()
        if size:
            lines = dict(
                line.rsplit(" ", 1) for line in metrics.splitlines() if line.startswith("openk2_prefix")
            )
            assert float(lines["openk2_prefix_cache_hit_rate"]) > 0.3
            assert float(lines["openk2_prefix_cache_hit_tokens_total"]) > 500
        else:
            assert "openk2_prefix_cache" not in metrics
    dump = [[json.dumps(c.message.model_dump(), sort_keys=True) for c in replies[size]] for size in (0, 4096)]
    assert dump[0] == dump[1]


def test_restored_rows_are_the_computed_ones(model, tok):
    """The rows copied into a slot are bit-equal to the rows the full prefill of the same prefix wrote
    (the cache stores exactly what the model computed, in the cache's dtype)."""
    cached = engine(model, tok, 4096)
    p = chat_prompts(tok)[0]
    cached.generate([p], SamplingParams(max_tokens=1, temperature=0))
    full = cached.cache.kv[:, 0, : len(p)].clone()
    n = cached.prefix_cache.restore(p, 3)
    assert n == (len(p) - 1) // 16 * 16
    assert torch.equal(cached.cache.kv[:, 3, :n], full[:, :n])
