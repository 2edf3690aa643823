"""The shipped MCP server: a thin MCP front over the tool runtime (`openk2.tools`).

It exists so that the tool repository imports tools from something that runs (over stdio, with the
`mcp` SDK, exactly as it would import any third-party server), and so that trajectories for coding
tasks execute for real. The tools, their schemas and their behaviour are `openk2.tools.toolset`'s;
this module only maps MCP calls onto one `ToolSession` (one workspace, one persistent interpreter).
A refused call comes back as an MCP tool error.

    python -m openk2.data.mcp_server [--workspace DIR | --keep]

Without --workspace the server makes its own workspace (a tmpfs with a quota, removed on exit unless
--keep). With --workspace DIR it acts in DIR (a directory you own; there is no quota then).
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
from dataclasses import replace

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import Tool as MCPTool

from openk2.tools.interpreter import INTERPRETER_LIMITS
from openk2.tools.toolset import SHELL_LIMITS, TOOL_SPECS, ToolSession
from openk2.tools.workspace import Workspace


class _Server(MCPServer):
    """Lists each tool with exactly the schema the in-process tools use."""

    async def list_tools(self) -> list[MCPTool]:
        return [
            MCPTool(name=name, description=spec["description"], input_schema=spec["parameters"])
            for name, spec in TOOL_SPECS.items()
        ]


def _tool_function(session: ToolSession, name: str):
    def call(**arguments) -> str:
        text, is_error = session.call(name, arguments)
        if is_error:
            raise ToolError(text.removeprefix("Error: "))
        return text

    props, required = TOOL_SPECS[name]["parameters"]["properties"], TOOL_SPECS[name]["parameters"]["required"]
    call.__signature__ = inspect.Signature(
        [
            inspect.Parameter(
                k,
                inspect.Parameter.KEYWORD_ONLY,
                annotation=str,
                default=inspect.Parameter.empty if k in required else props[k].get("default", ""),
            )
            for k in props
        ],
        return_annotation=str,
    )
    call.__name__ = name
    return call


def build_server(session: ToolSession) -> MCPServer:
    server = _Server(
        "openk2-workspace",
        instructions=f"Tools acting inside the workspace {session.path}.",
        log_level="WARNING",
    )
    for name, spec in TOOL_SPECS.items():
        server.add_tool(_tool_function(session, name), name=name, description=spec["description"])
    return server


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workspace", help="an existing directory the tools act in (default: a fresh one)")
    parser.add_argument("--keep", action="store_true", help="keep the fresh workspace on exit")
    parser.add_argument("--wall-seconds", type=float, default=None, help="wall-clock limit of one call")
    args = parser.parse_args(argv)
    if args.workspace is not None and not os.path.isdir(args.workspace):
        parser.error(f"--workspace {args.workspace} is not a directory")
    ws = Workspace(path=args.workspace) if args.workspace else Workspace(keep=args.keep)
    if args.wall_seconds is not None and args.wall_seconds <= 0:
        parser.error("--wall-seconds must be positive")
    limits = {}
    if args.wall_seconds is not None:
        limits = {
            "shell_limits": replace(SHELL_LIMITS, wall_seconds=args.wall_seconds),
            "interpreter_limits": replace(INTERPRETER_LIMITS, wall_seconds=args.wall_seconds),
        }
    with ToolSession(ws, **limits) as session:
        print(f"openk2 MCP server: workspace {session.path}", file=sys.stderr)
        try:
            build_server(session).run("stdio")
        finally:
            ws.close()


if __name__ == "__main__":
    main()
