"""Synthesis runs real tools in one workspace per episode: `openk2 synth trajectories --concurrency 8`
gives tool outputs identical to `--concurrency 1` with the same seeds (issue 14: with one shared
workspace, 0 of 31 python results were right at concurrency 8)."""

import json
import subprocess
import sys

import pytest

from openk2.data.tools import Tool, save_tools
from openk2.tools import isolation
from openk2.tools.toolset import TOOL_SPECS

pytestmark = pytest.mark.skipif(isolation() != "namespaces", reason="the tools need kernel isolation (root)")


def _run(tmp_path, tools, concurrency: int) -> dict[str, list]:
    out = tmp_path / f"traj-{concurrency}.jsonl"
    cmd = [sys.executable, "-m", "openk2.cli", "synth", "trajectories", "--scripted", "--tools", str(tools),
           "--agents", "2", "--tools-per-agent", "4", "--tasks-per-agent", "5", "--seed", "3",
           "--concurrency", str(concurrency), "--out", str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    out = {}
    for r in records:
        args = {c["id"]: c["function"]["arguments"] for m in r["messages"] for c in m.get("tool_calls") or []}
        out[r["meta"]["task"]] = [
            (m["tool_call_id"], args[m["tool_call_id"]], m["content"])
            for m in r["messages"]
            if m["role"] == "tool"
        ]
    return out


@pytest.mark.slow
def test_tool_outputs_do_not_depend_on_concurrency(tmp_path):
    real = [
        Tool(name, spec["description"], spec["parameters"], "mcp:openk2", "real", "openk2")
        for name, spec in TOOL_SPECS.items()
        if name in ("python", "shell", "write_file", "read_file")
    ]
    tools = tmp_path / "tools.jsonl"
    save_tools(real, tools)
    serial, parallel = _run(tmp_path, tools, 1), _run(tmp_path, tools, 8)
    assert serial == parallel and len(serial) >= 6
    python = [
        (json.loads(a)["code"], json.loads(c))
        for calls in serial.values()
        for i, a, c in calls
        if ".python:" in i
    ]
    assert len(python) >= 3, "too few python calls were exercised"
    for code, result in python:  # e.g. print(99 * 19) -> 1881: each result is its own episode's, and right
        a, b = code.removeprefix("print(").removesuffix(")").split(" * ")
        assert result["stdout"] == f"{int(a) * int(b)}\n", (code, result)
