"""The shipped MCP server, imported over stdio with the `mcp` SDK, as any third-party server would be."""

import asyncio
import json

import jsonschema
import pytest

from openk2.data.tools import MCPToolbox, shipped_server_command, validate_tool
from openk2.tools import isolation
from openk2.tools.toolset import TOOL_SPECS

pytestmark = pytest.mark.skipif(isolation() != "namespaces", reason="the tools need kernel isolation (root)")


def test_import_list_convert_and_call(tmp_path):
    async def main():
        async with MCPToolbox(shipped_server_command(tmp_path), "openk2") as box:
            tools = await box.list_tools()
            ran = await box.call("python", {"code": "x = 6 * 7\nprint(x)"})
            kept = await box.call("python", {"code": "x + 1"})  # the interpreter persists
            wrote = await box.call("write_file", {"path": "notes/a.txt", "content": "hello"})
            read = await box.call("read_file", {"path": "notes/a.txt"})
            escape = await box.call("read_file", {"path": "../outside.txt"})
            shell = await box.call("shell", {"command": "cat notes/a.txt"})
            return tools, ran, kept, wrote, read, escape, shell

    tools, ran, kept, wrote, read, escape, shell = asyncio.run(main())
    assert {t.name for t in tools} == set(TOOL_SPECS)
    for t in tools:
        validate_tool(t)  # a usable repository entry
        assert t.parameters == TOOL_SPECS[t.name]["parameters"]  # one schema, in-process and over MCP
        spec = t.to_openai()
        assert spec["type"] == "function" and spec["function"]["name"] == t.name
        jsonschema.Draft202012Validator.check_schema(spec["function"]["parameters"])
        assert t.real and t.source == "mcp:openk2"
    text, is_error = ran
    assert not is_error and json.loads(text)["stdout"] == "42\n"  # ran for real, in the sandbox
    assert json.loads(kept[0])["stdout"] == "43\n"
    assert not wrote[1] and (tmp_path / "notes" / "a.txt").read_text() == "hello"
    assert read == ("hello", False)
    assert escape[1] and "leaves the workspace" in escape[0]
    assert json.loads(shell[0])["stdout"] == "hello"
    assert not (tmp_path / "main.py").exists()  # the python tool leaves no scratch file behind


def test_python_tool_is_sandboxed():
    code = (
        "import socket\n"
        "try:\n"
        "    socket.create_connection(('127.0.0.1', 9), timeout=1); print('connected')\n"
        "except Exception as e:\n"
        "    print('blocked', type(e).__name__)\n"
    )

    async def main():
        async with MCPToolbox(shipped_server_command(wall_seconds=3), "openk2") as box:
            net = await box.call("python", {"code": code})
            spin = await box.call("python", {"code": "while True: pass"})
            return net, spin

    net, spin = asyncio.run(main())
    assert "blocked" in json.loads(net[0])["stdout"]
    assert json.loads(spin[0])["stopped_by"] == "wall_timeout"
