"""The server under hostile input and as an operator runs it: a real uvicorn on 127.0.0.1 (and one real
`openk2 serve` subprocess), driven by httpx and the official `openai` client.

Covered: a hypothesis fuzz over the request bodies we serve (never a 5xx), poisoned requests among
valid ones (the valid ones complete), faults injected into one request inside the engine (only that
request fails, the loop keeps serving), disconnects during a generation that cannot finish in time
(its slot is free within a second), nested JSON, /metrics against the requests sent, models.retrieve,
/tokenize and /detokenize, the body limit, the request deadline, CORS only when asked, 405's Allow,
and SIGTERM after all of it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from serve_util import MODEL, LiveServer, free_port, tiny_model

from openk2.checkpoint import save_model
from openk2.serve.engine import Engine
from openk2.serve.sampling import SamplingParams
from openk2.tokenizer.tokenizer import K2Tokenizer

USER = [{"role": "user", "content": "Tell me about the weather."}]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
LONG = 8192  # cache slot length of the servers whose generations must outlast a test's deadline


def make_engine(max_batch: int = 4, max_seq_len: int = 512, **options) -> Engine:
    return Engine(
        tiny_model(0, max_seq_len),
        K2Tokenizer.byte_level(),
        max_batch=max_batch,
        max_seq_len=max_seq_len,
        **options,
    )


@pytest.fixture(scope="module")
def server():
    with LiveServer(make_engine(max_batch=4, max_seq_len=LONG), api_key="sekret") as srv:
        yield srv


def auth() -> dict:
    return {"Authorization": "Bearer sekret"}


def client_for(srv: LiveServer, key: str = "sekret") -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0)


def health(srv: LiveServer) -> dict:
    return httpx.get(srv.url + "/health", timeout=10).json()


def wait_idle(srv: LiveServer, seconds: float = 20) -> dict:
    deadline = time.time() + seconds
    while True:
        h = health(srv)
        if (h["running"] == 0 and h["waiting"] == 0) or time.time() > deadline:
            return h
        time.sleep(0.02)


def post_raw(srv: LiveServer, path: str, content: bytes, timeout: float = 60) -> httpx.Response:
    headers = {"Content-Type": "application/json", **auth()}
    return httpx.post(srv.url + path, content=content, headers=headers, timeout=timeout)


def assert_openai_error(r: httpx.Response, status: int | None = None, param: str | None = None) -> dict:
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    if status is not None:
        assert r.status_code == status, (r.status_code, r.text[:300])
    assert r.headers["content-type"].startswith("application/json"), r.headers
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"] and "type" in err and "code" in err
    if param is not None:
        assert err["param"] == param, err
    return err


def metric_samples(srv: LiveServer) -> dict[tuple, float]:
    """{(sample name, sorted labels): value} from /metrics, through prometheus_client's own parser."""
    r = httpx.get(srv.url + "/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


# ------------------------------------------------------------------------------------------- fuzzing
# The spec of the bodies we serve: each field's valid values. The fuzzer sends valid bodies with one
# field replaced by poison (any JSON value, huge integers, NaN, deep nesting) or poisoned deep inside.
TEXT = st.text(max_size=12)
MESSAGE = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["system", "user", "assistant"]),
        "content": st.one_of(
            TEXT,
            st.none(),
            st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}), max_size=2),
        ),
    },
    optional={"name": TEXT, "tool_call_id": TEXT},
)
SAMPLING = {
    "max_tokens": st.integers(1, 24),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.01, 1),
    "top_k": st.integers(-1, 50),
    "seed": st.integers(-(2**63), 2**63 - 1),
    "stop": st.one_of(TEXT, st.lists(TEXT, max_size=3)),
    "n": st.integers(1, 3),
    "stream": st.booleans(),
    "ignore_eos": st.booleans(),
    "presence_penalty": st.just(0),
    "user": TEXT,
}
CHAT = {
    **SAMPLING,
    "messages": st.lists(MESSAGE, min_size=1, max_size=3),
    "logprobs": st.booleans(),
    "top_logprobs": st.integers(0, 5),
    "tools": st.just([WEATHER_TOOL]),
    "tool_choice": st.one_of(
        st.sampled_from(["auto", "none", "required"]),
        st.just({"type": "function", "function": {"name": "get_weather"}}),
    ),
    "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"}]),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "max_completion_tokens": st.integers(1, 24),
}
COMPLETION = {
    **SAMPLING,
    "prompt": st.one_of(
        TEXT, st.lists(TEXT, min_size=1, max_size=2), st.lists(st.integers(0, 255), min_size=1, max_size=8)
    ),
    "echo": st.booleans(),
    "logprobs": st.integers(0, 5),
    "suffix": st.none(),
    "best_of": st.just(1),
}
TOKENIZE = {
    "prompt": TEXT,
    "messages": st.lists(MESSAGE, min_size=1, max_size=2),
    "add_special_tokens": st.booleans(),
    "add_generation_prompt": st.booleans(),
    "return_token_strs": st.booleans(),
    "tools": st.just([WEATHER_TOOL]),
}
DETOKENIZE = {"tokens": st.lists(st.integers(0, 511), max_size=8)}
SPECS = {
    "/v1/chat/completions": CHAT,
    "/v1/completions": COMPLETION,
    "/tokenize": TOKENIZE,
    "/detokenize": DETOKENIZE,
}
JSON_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
POISON = st.one_of(
    JSON_VALUE,
    st.sampled_from([2**64, -(2**64), 2**63, 10**40, -1, 0, "", [], {}, True, float("nan"), float("inf")]),
    st.integers(65, 400).map(lambda depth: json.loads("[" * depth + "]" * depth)),
)


@st.composite
def mutated(draw, valid: st.SearchStrategy):
    """A valid value with one part deep inside it (a list item, a dict value) replaced by poison."""
    value = draw(valid)
    if not isinstance(value, (dict, list)) or not value:
        return draw(POISON)
    value = json.loads(json.dumps(value))
    node = value
    while True:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        key = draw(st.sampled_from(keys))
        child = node[key]
        if isinstance(child, (dict, list)) and child and draw(st.booleans()):
            node = child
            continue
        node[key] = draw(POISON)
        return value


@st.composite
def request_bodies(draw) -> tuple[str, bytes]:
    """(path, body bytes): a valid body (a random subset of the spec's fields, valid values) with one
    thing poisoned: a field replaced by poison or poisoned inside, the model, an unknown key, or the
    body itself (not an object, not JSON). The valid body alone is sent too, now and then."""
    path = draw(st.sampled_from(sorted(SPECS)))
    spec = SPECS[path]
    body = {"model": MODEL}
    for key in sorted(spec):
        if draw(st.booleans()):
            body[key] = draw(spec[key])
    if path in ("/v1/chat/completions", "/v1/completions"):
        key = "messages" if path == "/v1/chat/completions" else "prompt"
        body.setdefault(key, draw(spec[key]))
    # fields that go together (each alone is a correct 400, tested elsewhere)
    if "top_logprobs" in body:
        body["logprobs"] = True
    if "stream_options" in body:
        body["stream"] = True
    if "tool_choice" in body and path == "/v1/chat/completions":
        body["tools"] = [WEATHER_TOOL]
    if path == "/v1/completions" and "logprobs" in body:
        body.pop("echo", None)
    if path == "/tokenize" and "messages" in body:
        body.pop("prompt", None)
    target = draw(st.sampled_from([*sorted(spec), "model", "unknown key", "no model", "body", "none"]))
    if target in spec:
        body[target] = draw(st.one_of(POISON, mutated(spec[target])))
    elif target == "model":
        body["model"] = draw(POISON)
    elif target == "no model":
        del body["model"]
    elif target == "unknown key":
        body[draw(st.text(min_size=1, max_size=8))] = draw(POISON)
    elif target == "body":
        return path, draw(st.one_of(st.binary(max_size=40), POISON.map(lambda v: json.dumps(v).encode())))
    return path, json.dumps(body, allow_nan=True).encode()


@pytest.fixture(scope="module")
def fuzz_server():
    with LiveServer(make_engine(max_batch=4, max_seq_len=512, request_timeout=30)) as srv:
        yield srv


def check_stream(r: httpx.Response) -> None:
    lines = [line for line in r.text.splitlines() if line]
    assert lines[-1] == "data: [DONE]", lines[-3:]
    for line in lines[:-1]:
        assert line.startswith("data: ") and isinstance(json.loads(line[6:]), dict), line[:200]


@settings(
    max_examples=int(os.environ.get("OPENK2_FUZZ_EXAMPLES", "70")),
    deadline=None,
    database=None,
    derandomize=True,  # the same bodies every run, so CI is reproducible (OPENK2_FUZZ_EXAMPLES for more)
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(request=request_bodies())
def test_fuzzed_request_bodies_never_get_a_5xx(fuzz_server, request):
    path, content = request
    t0 = time.perf_counter()
    r = httpx.post(
        fuzz_server.url + path, content=content, headers={"Content-Type": "application/json"}, timeout=60
    )
    assert time.perf_counter() - t0 < 30, "a fuzzed request took more than 30 s"
    assert r.status_code < 500, (path, content[:300], r.status_code, r.text[:300])
    if r.status_code >= 400:
        assert_openai_error(r)
    elif r.headers["content-type"].startswith("text/event-stream"):
        check_stream(r)
    else:
        assert isinstance(r.json(), dict)


def test_the_fuzzed_server_is_healthy_afterwards(fuzz_server):
    """Runs after the fuzz test (file order): nothing left running, and a plain request still works."""
    h = wait_idle(fuzz_server)
    assert h["status"] == "ok" and h["running"] == 0 and h["waiting"] == 0
    reply = client_for(fuzz_server, "x").chat.completions.create(model=MODEL, messages=USER, max_tokens=4)
    assert reply.choices[0].finish_reason in ("stop", "length")
    samples = metric_samples(fuzz_server)
    five_xx = [
        k
        for k, v in samples.items()
        if k[0] == "openk2_http_requests_total" and dict(k[1])["status"].startswith("5") and v
    ]
    assert not five_xx
    answered: dict[tuple[str, str], float] = {}
    for (name, labels), value in samples.items():
        if name == "openk2_http_requests_total":
            key = (dict(labels)["route"], dict(labels)["status"][0])
            answered[key] = answered.get(key, 0) + value
    print("fuzzed requests answered, by (route, status class):", answered)
    # the fuzz reached generation (valid-enough bodies) as well as the checks
    assert answered.get(("/v1/chat/completions", "2"), 0) > 1 and answered.get(("/v1/completions", "2"), 0)


# ------------------------------------------------------------------------------------------- poison
POISONED_BODIES = [
    ({"model": MODEL, "messages": USER, "seed": 2**64}, "seed"),
    ({"model": MODEL, "messages": USER, "seed": -(2**63) - 1}, "seed"),
    ({"model": MODEL, "messages": USER, "max_tokens": "ten"}, "max_tokens"),
    ({"model": MODEL, "messages": "hello"}, "messages"),
    ({"model": MODEL, "messages": USER, "top_k": 2**70}, "top_k"),
    ({"model": MODEL, "messages": USER, "n": 2**64}, "n"),
]


def test_poisoned_requests_among_valid_ones(server):
    """Twelve valid chat requests in flight together with poisoned ones (a seed past 2^64, bad types,
    NaN, nested JSON, a huge top_k): every poisoned one gets a 4xx naming its parameter, every valid
    one completes, and the engine is idle afterwards."""
    client = client_for(server)

    def valid(i: int):
        return client.chat.completions.create(
            model=MODEL,
            messages=USER,
            max_tokens=16,
            seed=i,
            temperature=1.0,
            extra_body={"ignore_eos": True},
        )

    def poisoned(body_param):
        body, param = body_param
        return body_param, post_raw(server, "/v1/chat/completions", json.dumps(body).encode())

    raw_poison = [
        b'{"model": "%s", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}'
        % MODEL.encode(),
        b'{"model": "%s", "messages": [{"role": "user", "content": "x"}], "top_p": Infinity}'
        % MODEL.encode(),
        b'{"model": "%s", "messages": ' % MODEL.encode() + b"[" * 50000 + b"]" * 50000 + b"}",
        b'{"model": "%s", "max_tokens": 1' % MODEL.encode() + b"0" * 5000 + b"}",
    ]
    with ThreadPoolExecutor(24) as pool:
        good = [pool.submit(valid, i) for i in range(12)]
        bad = [pool.submit(poisoned, bp) for bp in POISONED_BODIES]
        raw = [pool.submit(post_raw, server, "/v1/chat/completions", c) for c in raw_poison]
        for f in bad:
            (body, param), r = f.result()
            assert_openai_error(r, 400, param)
        for f in raw:
            assert_openai_error(f.result(), 400)
        for f in good:
            reply = f.result()
            assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 16
    assert wait_idle(server)["running"] == 0


def test_a_failure_inside_the_engine_fails_only_its_request():
    """Faults that pass the API's checks but raise inside the engine: a banned token id outside the
    vocabulary (set after submission), a callback that raises, a prefill that raises for one prompt.
    Each fails its own request ("error", or "abort" for a gone caller); the others in the same batch
    complete, and the engine thread serves on and stops cleanly."""
    engine = make_engine(max_batch=4, max_seq_len=256)
    params = SamplingParams(max_tokens=6, ignore_eos=True, temperature=0)
    # 1. at admission, without the thread: a banned token id outside the vocabulary
    a = engine.submit([1, 2, 3], params)
    poison = SamplingParams(max_tokens=6, ignore_eos=True)
    b = engine.submit([4, 5, 6], poison)
    poison.banned_token_ids = [10**9]  # past validation: as if a bug let it through
    c = engine.submit([7, 8, 9], params)
    while not (a.finished and b.finished and c.finished):
        engine.step()
    assert [x.finish_reason for x in b.completions] == ["error"] and "IndexError" in b.error
    assert a.completions[0].finish_reason == c.completions[0].finish_reason == "length"
    assert len(a.completions[0].token_ids) == 6

    # 2. with the thread: a prefill that raises for one prompt only, in a batch with others
    real_prefill = engine.forward.prefill

    def flaky_prefill(ids, lengths, slots):
        if (ids == 66).any():
            raise RuntimeError("injected prefill fault")
        return real_prefill(ids, lengths, slots)

    engine.forward.prefill = flaky_prefill
    engine.start()
    try:
        events = []

        def broken_callback(ev):
            events.append(ev)
            raise RuntimeError("injected callback fault")

        outs = [engine.submit([10 + i, 11, 12], params) for i in range(2)]
        bad_prefill = engine.submit([66, 66, 66], params)
        bad_callback = engine.submit([13, 14, 15], params, on_event=broken_callback)
        for out in [*outs, bad_prefill, bad_callback]:
            deadline = time.time() + 30
            while not out.finished and time.time() < deadline:
                time.sleep(0.01)
            assert out.finished
        assert [o.completions[0].finish_reason for o in outs] == ["length", "length"]
        assert bad_prefill.completions[0].finish_reason == "error" and "injected" in bad_prefill.error
        assert bad_callback.completions[0].finish_reason == "abort" and len(events) == 1
        # the loop is still serving
        again = engine.generate([[20, 21, 22]], params)[0]
        assert again.completions[0].finish_reason == "length"
    finally:
        stopper = threading.Thread(target=engine.stop)
        stopper.start()
        stopper.join(timeout=20)
        assert not stopper.is_alive(), "engine.stop() hung"
    assert engine.stats()["running"] == 0 and engine.stats()["waiting"] == 0


# ------------------------------------------------------------------------------------------- disconnects
def test_disconnect_during_a_long_generation_frees_its_slot_within_a_second(server):
    """A non-streamed request for 8000 tokens (ignore_eos: it cannot finish before the client gives
    up after 1.5 s) on the server with an API key, i.e. behind the auth middleware: once the client
    disconnects, the slot is free within a second and the request ended with "abort"."""
    assert wait_idle(server)["running"] == 0
    before = metric_samples(server).get(("openk2_completions_total", (("finish_reason", "abort"),)), 0)
    body = {"model": MODEL, "messages": USER, "max_tokens": LONG - 200, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", json=body, headers=auth(), timeout=1.5)
    gone = time.perf_counter()
    while health(server)["running"] and time.perf_counter() - gone < 5:
        time.sleep(0.01)
    freed_after = time.perf_counter() - gone
    assert freed_after < 1.0, f"the slot was freed {freed_after:.2f} s after the disconnect"
    deadline = time.time() + 5
    while time.time() < deadline:
        after = metric_samples(server).get(("openk2_completions_total", (("finish_reason", "abort"),)), 0)
        if after == before + 1:
            break
        time.sleep(0.05)
    assert after == before + 1


# ------------------------------------------------------------------------------------------- bodies
def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/tokenize"])
def test_nested_json_is_a_4xx_openai_error(server, path):
    for depth in (65, 900, 100_000):
        r = post_raw(server, path, b'{"model": "%s", "messages": ' % MODEL.encode() + nested(depth) + b"}")
        assert "nests deeper" in assert_openai_error(r, 400)["message"]
    # a tool schema nested right up to the limit is no 500 either (schema check, grammar)
    deep_schema: dict = {"type": "string"}
    for _ in range(28):
        deep_schema = {"type": "object", "properties": {"x": deep_schema}}
    tool = {"type": "function", "function": {"name": "f", "parameters": deep_schema}}
    body = {"model": MODEL, "messages": USER, "tools": [tool], "tool_choice": "required", "max_tokens": 4}
    r = post_raw(server, "/v1/chat/completions", json.dumps(body).encode())
    assert r.status_code < 500, r.text[:300]


def test_completions_with_too_many_choices_are_refused(server):
    """Hundreds of prompts (or prompts x n over the cap) in one request are a 400, not a queue hog."""
    many = {"model": MODEL, "prompt": ["hi"] * 500, "max_tokens": 1}
    assert (
        "at most 64 prompts"
        in assert_openai_error(post_raw(server, "/v1/completions", json.dumps(many).encode()), 400)["message"]
    )
    product = {"model": MODEL, "prompt": ["hi"] * 8, "n": 9, "max_tokens": 1}
    err = assert_openai_error(
        post_raw(server, "/v1/completions", json.dumps(product).encode()), 400, "prompt"
    )
    assert "8 x 9" in err["message"]
    ok = client_for(server).completions.create(model=MODEL, prompt=["hi"] * 16, n=4, max_tokens=1)
    assert len(ok.choices) == 64


def test_malformed_bodies_are_4xx_json(server):
    for content in [b"", b"{", b"\xff\xfe", b"[1, 2]", b'"text"', b"null", b'{"model": NaN}', b"{}"]:
        for path in ("/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize"):
            assert_openai_error(post_raw(server, path, content))


def test_body_limit_is_413_before_reading():
    with LiveServer(make_engine(max_batch=1, max_seq_len=256), max_body_bytes=10_000) as srv:
        small = {"model": MODEL, "prompt": "hello", "max_tokens": 2}
        assert httpx.post(srv.url + "/v1/completions", json=small).status_code == 200
        big = {"model": MODEL, "prompt": "x" * 20_000, "max_tokens": 2}
        err = assert_openai_error(httpx.post(srv.url + "/v1/completions", json=big), 413)
        assert err["code"] == "request_too_large" and "10000" in err["message"]

        def chunks():  # no Content-Length: the limit is found while reading
            for _ in range(40):
                yield b"x" * 1000

        r = httpx.post(srv.url + "/tokenize", content=chunks(), headers={"Content-Type": "application/json"})
        assert_openai_error(r, 413)
        assert (
            metric_samples(srv)[
                ("openk2_http_requests_total", (("route", "/v1/completions"), ("status", "413")))
            ]
            == 1
        )


def test_big_bodies_are_tokenised_off_the_event_loop(server):
    """A 3.5 MB prompt takes a good fraction of a second to tokenise: /health keeps answering
    meanwhile (tokenising on the event loop would hold every other request for all of it)."""
    prompt = "the latent cache holds " * 150_000
    latencies: list[float] = []
    stop = threading.Event()

    def poll():
        with httpx.Client(timeout=10) as h:
            while not stop.is_set():
                t0 = time.perf_counter()
                h.get(server.url + "/health")
                latencies.append(time.perf_counter() - t0)
                time.sleep(0.01)

    poller = threading.Thread(target=poll)
    poller.start()
    time.sleep(0.1)
    t0 = time.perf_counter()
    r = post_raw(server, "/tokenize", json.dumps({"prompt": prompt}).encode())
    took = time.perf_counter() - t0
    stop.set()
    poller.join()
    assert r.status_code == 200 and r.json()["count"] == len(prompt)
    assert max(latencies) < max(0.25, took / 2), (max(latencies), took)


# ------------------------------------------------------------------------------------------- endpoints
def test_models_retrieve(server):
    client = client_for(server)
    model = client.models.retrieve(MODEL)
    assert model.id == MODEL and model.object == "model"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-9")
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"


def test_tokenize_and_detokenize_agree_with_usage(server):
    client = client_for(server)
    prompt = "Once upon a time"
    r = httpx.post(
        server.url + "/tokenize", json={"prompt": prompt, "return_token_strs": True}, headers=auth()
    )
    tok = r.json()
    done = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1)
    assert tok["count"] == len(tok["tokens"]) == done.usage.prompt_tokens and tok["max_model_len"] == LONG
    assert "".join(tok["token_strs"]) == prompt
    back = httpx.post(
        server.url + "/detokenize", json={"model": MODEL, "tokens": tok["tokens"]}, headers=auth()
    )
    assert back.json() == {"prompt": prompt}
    chat = httpx.post(
        server.url + "/tokenize",
        json={"model": MODEL, "messages": USER, "tools": [WEATHER_TOOL]},
        headers=auth(),
    )
    reply = client.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER_TOOL], max_tokens=1)
    assert chat.json()["count"] == reply.usage.prompt_tokens
    assert_openai_error(
        httpx.post(server.url + "/detokenize", json={"tokens": [1, 10**9]}, headers=auth()), 400, "tokens"
    )
    assert_openai_error(
        httpx.post(server.url + "/tokenize", json={"model": "gpt-9", "prompt": "x"}, headers=auth()),
        404,
        "model",
    )
    assert httpx.post(server.url + "/tokenize", json={"prompt": "x"}).status_code == 401  # the key guards it


def test_405_carries_allow(server):
    r = httpx.get(server.url + "/v1/chat/completions", headers=auth())
    assert_openai_error(r, 405)
    assert r.headers["allow"] == "POST"
    r = httpx.post(server.url + "/v1/models", headers=auth())
    assert_openai_error(r, 405)
    assert r.headers["allow"] == "GET"


def test_no_cors_headers_without_the_flag(server):
    r = httpx.get(server.url + "/health", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers
    r = httpx.options(
        server.url + "/v1/chat/completions",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert "access-control-allow-origin" not in r.headers


def test_request_timeout_ends_the_request_and_frees_its_slots():
    with LiveServer(make_engine(max_batch=2, max_seq_len=LONG, request_timeout=1.0)) as srv:
        body = {"model": MODEL, "messages": USER, "max_tokens": LONG - 200, "ignore_eos": True}
        t0 = time.perf_counter()
        r = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=30)
        assert time.perf_counter() - t0 < 5
        assert assert_openai_error(r, 408)["code"] == "request_timeout"
        assert wait_idle(srv, 2)["running"] == 0
        with httpx.stream(
            "POST", srv.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=30
        ) as s:
            lines = [line for line in s.iter_lines() if line]
        assert lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2][6:])["error"]["code"] == "request_timeout"
        assert wait_idle(srv, 2)["running"] == 0
        samples = metric_samples(srv)
        assert samples[("openk2_completions_total", (("finish_reason", "timeout"),))] == 2


def test_metrics_match_the_requests_sent():
    with LiveServer(make_engine(max_batch=4, max_seq_len=512)) as srv:
        client = client_for(srv, "x")
        usages = []
        for i in range(3):
            r = client.chat.completions.create(
                model=MODEL, messages=USER, max_tokens=5 + i, extra_body={"ignore_eos": True}
            )
            usages.append(r.usage)
        r = client.completions.create(model=MODEL, prompt=["ab", "cde"], max_tokens=3, n=2)
        usages.append(r.usage)
        streamed = client.chat.completions.create(
            model=MODEL, messages=USER, max_tokens=4, stream=True, stream_options={"include_usage": True}
        )
        usages.append(list(streamed)[-1].usage)
        for _ in range(2):
            with pytest.raises(openai.BadRequestError):
                client.chat.completions.create(model=MODEL, messages=USER, temperature=7)
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="gpt-9", messages=USER)
        httpx.post(srv.url + "/tokenize", json={"prompt": "abc"})
        engine_requests = 3 + 2 + 1  # the completions request is two engine requests (two prompts)
        deadline = time.time() + 10
        while True:  # the engine's observer runs just after the last event reaches the client
            m = metric_samples(srv)
            if m[("openk2_request_latency_seconds_count", ())] == engine_requests or time.time() > deadline:
                break
            time.sleep(0.05)

        def requests(route: str, status: int) -> float:
            return m.get(("openk2_http_requests_total", (("route", route), ("status", str(status)))), 0)

        assert requests("/v1/chat/completions", 200) == 4
        assert requests("/v1/completions", 200) == 1
        assert requests("/v1/chat/completions", 400) == 2
        assert requests("/v1/chat/completions", 404) == 1
        assert requests("/tokenize", 200) == 1
        assert m[("openk2_prompt_tokens_total", ())] == sum(u.prompt_tokens for u in usages)
        assert m[("openk2_completion_tokens_total", ())] == sum(u.completion_tokens for u in usages)
        assert m[("openk2_time_to_first_token_seconds_count", ())] == engine_requests
        assert m[("openk2_request_latency_seconds_count", ())] == engine_requests
        assert m[("openk2_time_to_first_token_seconds_bucket", (("le", "+Inf"),))] == engine_requests
        assert sum(v for k, v in m.items() if k[0] == "openk2_completions_total") == 3 + 4 + 1
        assert m[("openk2_running_sequences", ())] == 0 and m[("openk2_waiting_requests", ())] == 0
        assert m[("openk2_cache_slots", ())] == 4


# ------------------------------------------------------------------------------------------- the CLI
@pytest.mark.slow
def test_openk2_serve_flags_and_sigterm(tmp_path):
    """`openk2 serve` with --cors-origin, --max-body-bytes, --request-timeout and --max-queue: CORS
    headers for the allowed origin, 413 past the limit, 408 past the deadline, a poisoned seed
    answered 400, and SIGTERM ends the process promptly even with a generation in flight."""
    save_model(tiny_model(seed=0, max_positions=LONG), tmp_path / "ckpt")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "openk2.cli", "serve", str(tmp_path / "ckpt"), "--port", str(port)]
    cmd += [
        "--served-model-name",
        MODEL,
        "--max-batch",
        "2",
        "--max-seq-len",
        str(LONG),
        "--log-level",
        "warning",
    ]
    cmd += ["--cors-origin", "https://app.example", "--max-body-bytes", "50000"]
    cmd += ["--request-timeout", "1.5", "--max-queue", "4"]
    proc = subprocess.Popen(
        cmd,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 90
        while True:
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "openk2 serve did not come up"
            time.sleep(0.2)
        r = httpx.get(url + "/v1/models", headers={"Origin": "https://app.example"})
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        pre = httpx.options(
            url + "/v1/chat/completions",
            headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"},
        )
        assert pre.status_code == 200 and "POST" in pre.headers["access-control-allow-methods"]
        r = httpx.get(url + "/v1/models", headers={"Origin": "https://other.example"})
        assert "access-control-allow-origin" not in r.headers
        r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "x" * 60_000})
        assert_openai_error(r, 413)
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=USER, seed=2**64)
        assert e.value.body["param"] == "seed"
        assert (
            client.chat.completions.create(model=MODEL, messages=USER, max_tokens=3).usage.completion_tokens
            <= 3
        )
        long = {"model": MODEL, "messages": USER, "max_tokens": LONG - 200, "ignore_eos": True}
        r = httpx.post(url + "/v1/chat/completions", json=long, timeout=30)
        assert assert_openai_error(r, 408)["code"] == "request_timeout"
        # SIGTERM with a generation in flight: uvicorn drains it (the deadline ends it), then exits
        # (uvicorn re-raises the signal once shut down, hence -SIGTERM)
        in_flight: list[httpx.Response] = []
        pending = threading.Thread(
            target=lambda: in_flight.append(httpx.post(url + "/v1/chat/completions", json=long, timeout=30))
        )
        pending.start()
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) in (0, -signal.SIGTERM)
        pending.join(timeout=10)
        assert assert_openai_error(in_flight[0], 408)["code"] == "request_timeout"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
