"""The endpoint backend and the tool-call conformance suite against a scripted OpenAI-compatible server:
metrics match what the script implies, streamed and plain answers are reassembled alike, and timeouts,
500s and malformed JSON are recorded as failures while the run completes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from eval_util import VALID_ARGS, FakeOpenAI

from openk2.client import ChatRequest, EndpointBackend
from openk2.eval.harness import ResultStore
from openk2.eval.toolcall_conformance import ConformanceConfig, check_call, load_cases, run


@pytest.fixture(scope="module")
def fake():
    with FakeOpenAI() as server:
        yield server


@pytest.fixture(autouse=True)
def _reset(fake):
    fake.faults, fake.bad_args, fake.slow_seconds = {}, set(), 3.0


def test_suite_is_well_formed():
    cases = load_cases()
    assert 20 <= len(cases) <= 40
    kinds = {json.dumps(c.get("tool_choice")) for c in cases}
    assert {'"auto"', '"none"', '"required"', "null"} <= kinds and any("function" in k for k in kinds)
    for c in cases:
        for t in c["tools"] or []:  # every shipped schema is itself valid, and VALID_ARGS fit it
            name = t["function"]["name"]
            ok, why = check_call({"name": name, "arguments": json.dumps(VALID_ARGS[name])}, c["tools"])
            assert ok, (c["id"], why)
        if c["expect"]["tool"] is not None:
            assert c["expect"]["tool"] in {t["function"]["name"] for t in c["tools"]}


def test_check_call_reasons():
    params = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    tools = [{"type": "function", "function": {"name": "f", "parameters": params}}]
    assert check_call({"name": "f", "arguments": '{"n": 3}'}, tools) == (True, None)
    assert "not offered" in check_call({"name": "g", "arguments": '{"n": 3}'}, tools)[1]
    assert "not JSON" in check_call({"name": "f", "arguments": '{"n": 3'}, tools)[1]
    assert "not a JSON object" in check_call({"name": "f", "arguments": "[3]"}, tools)[1]
    assert "schema" in check_call({"name": "f", "arguments": '{"n": "three"}'}, tools)[1]


def _expected(cases, bad_args=frozenset()):
    """What the scripted server does, in metric form."""
    tp = fp = fn = tn = 0
    valid = calls = 0
    for c in cases:
        called = bool(c["tools"]) and c.get("tool_choice") != "none" and c["messages"][-1]["role"] == "user"
        want = c["expect"]["call"]
        tp, fp, fn, tn = (
            tp + (want and called),
            fp + (called and not want),
            fn + (want and not called),
            tn + (not want and not called),
        )
        if called:
            choice = c.get("tool_choice")
            name = (
                choice["function"]["name"] if isinstance(choice, dict) else c["tools"][0]["function"]["name"]
            )
            calls += 1
            valid += name not in bad_args
    return tp, fp, fn, tn, valid / calls


def test_conformance_metrics_match_the_script(fake, tmp_path):
    fake.bad_args = {"send_email", "book_flight"}
    backend = EndpointBackend(fake.url, timeout=10, max_retries=0)
    assert backend.model == "fake-model"  # read from /v1/models
    result = run(backend, ConformanceConfig(), ResultStore(tmp_path, "toolcall", "fake", {}), progress=False)
    m = result["metrics"]
    tp, fp, fn, tn, schema = _expected(load_cases(), fake.bad_args)
    assert m["trigger_confusion"] == {"tp": tp, "fp": fp, "fn": fn, "tn": tn}
    assert m["trigger_precision"] == pytest.approx(tp / (tp + fp))
    assert m["trigger_recall"] == pytest.approx(tp / (tp + fn))
    p, r = tp / (tp + fp), tp / (tp + fn)
    assert m["trigger_f1"] == pytest.approx(2 * p * r / (p + r))
    assert m["schema_accuracy"] == pytest.approx(schema) and schema < 1
    assert m["errors"] == 0 and m["stream_errors"] == 0
    assert m["stream_agreement"] == 1.0  # chunked SSE reassembles to the plain answer
    # the script calls the named or the first tool, which is the expected one wherever one is named
    assert m["tool_accuracy"] == 1.0
    # the script ignores nothing: tool_choice none/required/named are all honoured
    assert m["tool_choice_compliance"] == 1.0
    bad = [r for r in result["records"] if any(not c["valid"] for c in r["calls"])]
    assert bad and all("schema" in c["why"] for r in bad for c in r["calls"])


def test_failures_are_recorded_and_the_run_completes(fake, tmp_path):
    # Paris -> 500, Berlin -> body that is not JSON, Madrid -> slower than the timeout, Tokyo -> bad stream
    fake.faults = {"Paris": "500", "Berlin": "json", "Madrid": "slow", "Tokyo": "stream"}
    fake.slow_seconds = 2.0
    backend = EndpointBackend(fake.url, model="fake-model", timeout=0.5, max_retries=1, concurrency=4)
    result = run(backend, ConformanceConfig(), ResultStore(tmp_path, "toolcall", "fake", {}), progress=False)
    recs = {r["id"]: r for r in result["records"]}
    assert len(recs) == len(load_cases())
    assert recs["auto-weather"]["error"].startswith("http_500")
    assert recs["required-weather"]["error"].startswith("malformed_json")
    assert recs["named-weather"]["error"].startswith("timeout")
    assert recs["auto-parallel"]["error"] is None
    assert recs["auto-parallel"]["stream_error"].startswith("malformed_json")
    assert recs["auto-parallel"]["stream_agrees"] is False
    m = result["metrics"]
    failed = [r for r in recs.values() if r["error"] is not None]
    assert m["errors"] == len(failed) >= 4
    # a failed request is wrong behaviour: an expected call that errored is a miss
    assert m["trigger_confusion"]["fn"] >= sum(r["expect"]["call"] for r in failed)
    assert m["tool_choice_compliance"] < 1


def test_stream_parse_of_tool_call_deltas(fake):
    backend = EndpointBackend(fake.url, timeout=10, max_retries=0)
    case = next(c for c in load_cases() if c["id"] == "named-event")
    plain, streamed = backend.chat_many(
        [ChatRequest(case["messages"], case["tools"], case["tool_choice"], stream=s) for s in (False, True)]
    )
    assert plain.error is None and streamed.error is None
    assert [(c.name, json.loads(c.arguments)) for c in streamed.tool_calls] == [
        ("create_event", VALID_ARGS["create_event"])
    ]
    assert streamed.finish_reason == plain.finish_reason == "tool_calls"
    assert streamed.message()["tool_calls"][0]["function"]["name"] == "create_event"


def test_unreachable_endpoint_is_an_error_not_a_crash(tmp_path):
    backend = EndpointBackend("http://127.0.0.1:9/v1", model="m", timeout=1, max_retries=0)
    [res] = backend.chat_many([ChatRequest([{"role": "user", "content": "hi"}])])
    assert res.error.startswith("connection_error")
    with pytest.raises(ValueError, match="http"):
        EndpointBackend("127.0.0.1:8000")


def test_cli_toolcall_against_endpoint_with_failures(fake, tmp_path):
    fake.faults = {"Paris": "500", "Berlin": "json"}
    cmd = [
        sys.executable,
        "-m",
        "openk2.cli",
        "eval",
        "toolcall",
        "--endpoint",
        fake.url,
        "--out",
        str(tmp_path),
    ]
    cmd += ["--timeout", "5", "--retries", "0", "--no-progress", "--name", "fake"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "| trigger_f1" in out.stdout and "| schema_accuracy" in out.stdout
    result = json.loads((tmp_path / "toolcall-fake.json").read_text())
    assert result["metrics"]["errors"] >= 2 and len(result["records"]) == len(load_cases())
    assert (tmp_path / "toolcall-fake.md").read_text().startswith("**toolcall**")
