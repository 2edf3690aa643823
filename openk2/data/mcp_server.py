"""A real MCP server with real tools: sandboxed Python and shell, and file access inside one workspace.

It exists so that the tool repository imports tools from something that runs (over stdio, with the
`mcp` SDK, exactly as it would import any third-party server), and so that trajectories for coding
tasks execute for real instead of being imagined by the tool simulator. Every tool stays inside the
workspace directory: Python and shell go through `openk2.sandbox` (no network, CPU / memory / file
size limits, writes confined to the workspace), and the file tools resolve paths and refuse any that
leave it (`..`, absolute paths, symlinks pointing out).

    python -m openk2.data.mcp_server --workspace DIR
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

from openk2.sandbox import SandboxLimits, SandboxResult, run_command, run_python

MAX_READ_CHARS = 64_000
LIMITS = SandboxLimits(cpu_seconds=5, wall_seconds=10.0, memory_mb=512, file_size_mb=16)


def _inside(workspace: Path, path: str) -> Path:
    """The resolved path, or ToolError (reported to the model, not a crash) when it leaves the workspace."""
    if not isinstance(path, str) or not path:
        raise ToolError("path must be a non-empty string relative to the workspace")
    target = (workspace / path).resolve()
    if not target.is_relative_to(workspace):
        raise ToolError(f"path {path!r} is outside the workspace")
    return target


def _report(result: SandboxResult) -> str:
    """What a model should see of a sandboxed run: exit status, why it stopped, and the output."""
    return json.dumps(
        {
            "returncode": result.returncode,
            "stopped_by": result.reason,
            "stdout": result.stdout[-8000:],
            "stderr": result.stderr[-4000:],
        },
        ensure_ascii=False,
    )


def build_server(workspace: str | os.PathLike, limits: SandboxLimits = LIMITS) -> MCPServer:
    ws = Path(workspace).resolve()
    if not ws.is_dir():
        raise ValueError(f"workspace {ws} is not a directory")
    server = MCPServer(
        "openk2-workspace", instructions=f"Tools acting inside the workspace {ws}.", log_level="WARNING"
    )

    @server.tool()
    def python(code: str) -> str:
        """Run a Python 3 program in a sandbox (no network, 5 s CPU, 512 MB) with the workspace as the
        working directory; returns its exit status, stdout and stderr as JSON."""
        # The sandbox runs the code as workspace/main.py: keep a user's own main.py out of harm's way.
        own = ws / "main.py"
        saved = own.read_bytes() if own.is_file() else None
        try:
            return _report(run_python(code, limits=limits, workspace=ws))
        finally:
            if saved is None:
                own.unlink(missing_ok=True)
            else:
                own.write_bytes(saved)

    @server.tool()
    def shell(command: str) -> str:
        """Run a POSIX shell command line in a sandbox (no network, 5 s CPU) inside the workspace;
        returns its exit status, stdout and stderr as JSON."""
        return _report(run_command(["sh", "-c", command], limits=limits, workspace=ws))

    @server.tool()
    def read_file(path: str) -> str:
        """Read a UTF-8 text file, given by its path relative to the workspace."""
        target = _inside(ws, path)
        if not target.is_file():
            raise ToolError(f"no such file: {path}")
        text = target.read_text(errors="replace")
        return text if len(text) <= MAX_READ_CHARS else text[:MAX_READ_CHARS] + "\n[truncated]"

    @server.tool()
    def write_file(path: str, content: str) -> str:
        """Create or overwrite a text file (path relative to the workspace); returns the bytes written."""
        target = _inside(ws, path)
        if len(content.encode()) > limits.file_size_mb << 20:
            raise ToolError(f"content is larger than the {limits.file_size_mb} MB file limit")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content)
        return f"wrote {len(content.encode())} bytes to {target.relative_to(ws)}"

    @server.tool()
    def list_files(path: str = ".") -> str:
        """List the files under a directory of the workspace (recursively, relative paths, at most 500)."""
        root = _inside(ws, path)
        if not root.is_dir():
            raise ToolError(f"no such directory: {path}")
        files = sorted(str(p.relative_to(ws)) for p in root.rglob("*") if p.is_file())
        return "\n".join(files[:500]) or "(empty)"

    return server


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workspace", required=True, help="directory the tools may read and write")
    args = parser.parse_args(argv)
    build_server(args.workspace).run("stdio")


if __name__ == "__main__":
    main()
