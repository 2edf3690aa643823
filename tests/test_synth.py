"""Synthesis pipelines against scripted models: rephrasing, tool evolution, agents/tasks, trajectories."""

import asyncio
import json
import subprocess
import sys

import pytest

from openk2.client import ChatResult, LLMClient, Rejected, ScriptedBackend, ToolCallOut
from openk2.data.agents import Agent, Rubric, Task, make_agents, template_tasks
from openk2.data.rephrase import Embedder, RephraseArgs, rephrase_document, split_chunks
from openk2.data.tools import EvolveArgs, Tool, deduplicate, evolve_tools, validate_tool
from openk2.data.trajectories import EpisodeConfig, Judge, LLMAgent, OracleAgent, ToolSimulator, run_episode
from openk2.tokenizer.chat import render

DOC = (
    "The Eiffel Tower was completed in 1889 for the World's Fair in Paris. It is 330 metres tall.\n\n"
    "Gustave Eiffel's company designed and built the tower. It was the tallest structure in the world "
    "until the Chrysler Building was finished in 1930."
)


def test_split_chunks_respects_limits():
    text = "\n\n".join(f"Paragraph {i}. " + "word " * 40 for i in range(10))
    chunks = split_chunks(text, 500)
    assert all(len(c) <= 500 for c in chunks) and len(chunks) > 1
    assert "".join(c.replace("\n\n", "") for c in chunks) == text.strip().replace("\n\n", "")


@pytest.fixture(scope="module")
def embedder():
    return Embedder()


def test_rephrase_keeps_faithful_rejects_drift_and_chains_context(embedder):
    seen = []

    def faithful(r):
        prompt = r.messages[-1]["content"]
        seen.append(prompt)
        src = prompt.split("SOURCE:\n", 1)[1].split("\n\nAnswer with", 1)[0]
        return src.replace("was completed", "was finished").replace("It is", "The tower is")

    client = LLMClient(ScriptedBackend(faithful))
    args = RephraseArgs(chunk_chars=120)
    out = asyncio.run(rephrase_document(client, "d1", DOC, args, embedder))
    assert out["chunks"] == len(seen) >= 2 and min(out["similarity"]) > 0.75 and out["fidelity"] == "minilm"
    assert "was finished in 1889" in out["text"]
    # Every chunk after the first sees the previous *rewritten* chunk.
    assert "continue from it seamlessly" in seen[1] and "was finished" in seen[1].split("SOURCE:")[0]

    drift = LLMClient(ScriptedBackend(lambda r: "Bananas are an excellent source of potassium for athletes."))
    with pytest.raises(Rejected, match="drift"):
        asyncio.run(rephrase_document(drift, "d2", DOC, args, embedder))


def test_rephrase_judge_and_math_mode(embedder):
    def model(r):
        prompt = r.messages[-1]["content"]
        if prompt.startswith("Does the REWRITE"):
            return '{"faithful": false, "reason": "changed a date"}'
        assert "learning notes" in prompt and "translate" in prompt
        return prompt.split("SOURCE:\n", 1)[1].split("\n\nAnswer with", 1)[0]

    client = LLMClient(ScriptedBackend(model))
    with pytest.raises(Rejected, match="judge_unfaithful"):
        asyncio.run(rephrase_document(client, "m", DOC, RephraseArgs(mode="math", judge=True), embedder))
    truncated = LLMClient(ScriptedBackend(lambda r: ChatResult("cut", finish_reason="length")))
    with pytest.raises(Rejected, match="truncated"):
        asyncio.run(rephrase_document(truncated, "t", DOC, RephraseArgs(), Embedder(lexical=True)))


def _tool(name, desc="Look up something useful.", props=None, required=None):
    props = props if props is not None else {"q": {"type": "string"}}
    return Tool(name, desc, {"type": "object", "properties": props, "required": required or []}, "synthetic")


def test_validate_and_deduplicate():
    validate_tool(_tool("find_thing"))
    for bad, reason in [
        (_tool("bad name!"), "bad_name"),
        (_tool("x", desc="short"), "no_description"),
        (_tool("x", required=["missing"]), "required_not_in_properties"),
        (Tool("x", "A fine description.", {"type": "array"}, "synthetic"), "parameters_not_object"),
        (_tool("x", props={"q": {"description": "no type"}}), "untyped_parameter"),
    ]:
        with pytest.raises(Rejected, match=reason):
            validate_tool(bad)
    kept, dropped = deduplicate(
        [_tool("find_thing"), _tool("Find-Thing"), _tool("lookup", "Look up something useful!")]
    )
    assert [t.name for t in kept] == ["find_thing"] and dropped == 2


def test_evolve_tools_hierarchy_with_rejections():
    def model(r):
        p = r.messages[-1]["content"]
        if p.startswith("Category:"):
            return "Here you go: " + json.dumps(["alpha app", "beta app"])
        if "beta app" in p:
            return "sorry, no"  # no JSON: rejected and counted
        schema = {"type": "object", "properties": {"title": {"type": "string"}}, "required": ["title"]}
        good = {"name": "make_note", "description": "Create a note with a title.", "parameters": schema}
        bad = {"name": "oops", "description": "Missing its schema entirely."}
        return json.dumps([good, bad, dict(good)])

    client = LLMClient(ScriptedBackend(model))
    tools = asyncio.run(
        evolve_tools(client, EvolveArgs(categories=2, domains_per_category=2, tools_per_domain=3))
    )
    assert [t.name for t in tools] == ["make_note"]  # valid, and duplicates across domains removed
    assert tools[0].category in ("productivity", "finance") and tools[0].domain == "alpha app"
    rej = client.stats.rejected
    assert (
        rej["tools:no_json"] == 2 and rej["tools:parameters_not_object"] == 2 and rej["tools:duplicate"] >= 1
    )


WEATHER = _tool(
    "get_weather", "Current weather for a city.", {"city": {"type": "string"}}, required=["city"]
)  # fmt: skip
BOOK = _tool(
    "book_table",
    "Book a restaurant table.",
    {"name": {"type": "string"}, "people": {"type": "integer"}},
    ["name"],
)


def test_tool_simulator_is_seeded_validates_and_keeps_state():
    def outcomes(seed):
        sim = ToolSimulator(None, seed, error_rate=0.3, partial_rate=0.2, edge_rate=0.2)
        return [sim.draw() for _ in range(200)]

    a = outcomes(1)
    assert a == outcomes(1) and a != outcomes(2)
    assert {"success", "error", "partial", "edge"} == set(a)
    assert abs(a.count("error") / 200 - 0.3) < 0.1
    sim = ToolSimulator(None, 0, error_rate=0, partial_rate=0, edge_rate=0)
    bad = json.loads(asyncio.run(sim.call(BOOK, {"people": 2})))
    assert "invalid arguments" in bad["error"]
    asyncio.run(sim.call(BOOK, {"name": "Ada"}))
    asyncio.run(sim.call(BOOK, {"name": "Bob"}))
    assert [r["name"] for r in sim.state["book_table"]] == ["Ada", "Bob"]


def _task(expected=("get_weather",)):
    return Task(
        "t1",
        "a",
        "What's the weather in Oslo?",
        "simple",
        Rubric(["reports the weather"], list(expected), ["Oslo"]),
    )


def test_llm_episode_passes_and_is_k2_renderable():
    agent = Agent("a", "You help with weather.", [WEATHER, BOOK])

    def model(r):
        system = r.messages[0]["content"] if r.messages[0]["role"] == "system" else ""
        if system.startswith("You play a user"):
            return "[DONE]" if len(r.messages) > 2 else "Hi, what's the weather in Oslo?"
        if system.startswith("You simulate the backend"):
            return '{"result": {"temp_c": 3, "sky": "snow"}, "state": {"lookups": 1}}'
        if system.startswith("You grade"):
            return '{"score": 9, "reason": "correct"}'
        if r.messages[-1]["role"] == "tool":
            return "It is 3 °C and snowing in Oslo."
        return ChatResult("", [ToolCallOut("x", "get_weather", '{"city": "Oslo"}')], "tool_calls")

    client = LLMClient(ScriptedBackend(model))
    cfg = EpisodeConfig(error_rate=0, partial_rate=0, edge_rate=0)
    rec = asyncio.run(run_episode(_task(), agent, LLMAgent(client), client, Judge(client), cfg))
    roles = [m["role"] for m in rec["messages"]]
    assert roles == ["system", "user", "assistant", "tool", "assistant"]
    assert rec["messages"][2]["tool_calls"][0]["id"] == "functions.get_weather:0"
    assert rec["meta"]["judge_score"] == 9 and rec["meta"]["tool_outcomes"] == ["success"]
    text = render(rec["messages"], rec["tools"])
    assert "<|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>" in text
    assert "## Return of functions.get_weather:0" in text

    # The same agent behaviour fails a rubric that expects a booking, and a low judge score rejects.
    with pytest.raises(Rejected, match="tool_pattern"):
        asyncio.run(run_episode(_task(("book_table",)), agent, LLMAgent(client), client, Judge(client), cfg))
    strict = Judge(client, threshold=10)
    with pytest.raises(Rejected, match="judge_score"):
        asyncio.run(run_episode(_task(), agent, LLMAgent(client), client, strict, cfg))


def test_oracle_agent_retries_injected_failures():
    agent = make_agents([WEATHER, BOOK], 1, tools_per_agent=2)[0]
    tasks = template_tasks(agent, 12, seed=0, multi_step=0.5)
    assert {t.difficulty for t in tasks} == {"simple", "multi-step"}
    cfg = EpisodeConfig(error_rate=0.5, partial_rate=0, edge_rate=0)
    recs = [asyncio.run(run_episode(t, agent, OracleAgent(), None, Judge(None), cfg)) for t in tasks]
    outcomes = [o for r in recs for o in r["meta"]["tool_outcomes"]]
    assert "error" in outcomes  # failures were injected ...
    retried = [r for r in recs if any("trying once more" in (m.get("content") or "") for m in r["messages"])]
    assert retried  # ... and the agent retried
    for r in recs:  # every plan step was called, with K2 ids counting across the conversation
        ids = [c["id"] for m in r["messages"] for c in m.get("tool_calls") or []]
        assert [int(i.rsplit(":", 1)[1]) for i in ids] == list(range(len(ids)))


def test_cli_scripted_trajectories_end_to_end(tmp_path):
    tools = tmp_path / "tools.jsonl"
    tools.write_text("".join(json.dumps(t.__dict__) + "\n" for t in [WEATHER, BOOK]))
    out = tmp_path / "traj.jsonl"
    cmd = [sys.executable, "-m", "openk2.cli", "synth", "trajectories", "--scripted", "--tools", str(tools),
           "--agents", "2", "--tasks-per-agent", "3", "--out", str(out)]  # fmt: skip
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert "trajectories: accepted / rejected" in first.stdout
    n = len(out.read_text().splitlines())
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)  # resumes: nothing to do
    assert again.returncode == 0 and "skipped=6" in again.stdout
    assert len(out.read_text().splitlines()) == n
