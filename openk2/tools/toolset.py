"""The tools, one schema each, and a session that runs them in its own workspace.

    with ToolSession() as tools:
        text, is_error = tools.call("python", {"code": "x = 6 * 7\nx"})

The same `TOOL_SPECS` and `ToolSession.call` serve the agent and synthesis in-process and the shipped
MCP server (`openk2.data.mcp_server`), so a tool behaves identically however it is reached. Calls in
one session are serialised by the workspace's lock; sessions never share a workspace.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import jsonschema

from openk2.tools.interpreter import INTERPRETER_LIMITS, Interpreter
from openk2.tools.sandbox import SandboxError, SandboxLimits, SandboxResult
from openk2.tools.workspace import DEFAULT_QUOTA_MB, Workspace, WorkspaceError

MAX_READ_CHARS = 64_000
SHELL_LIMITS = SandboxLimits(cpu_seconds=5, wall_seconds=10.0, memory_mb=512, file_size_mb=16)


def _schema(properties: dict, required: list[str]) -> dict:
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


# Portable file names only, and bounded: a weak model constrained by this schema cannot wander off
# into an endless or unprintable path.
_PATH = {
    "type": "string",
    "description": "path relative to the workspace",
    "pattern": "^[A-Za-z0-9_. /-]{1,128}$",
}

TOOL_SPECS: dict[str, dict] = {
    "python": {
        "description": "Run Python code in a persistent, sandboxed interpreter (no network) whose working "
        "directory is the workspace. Variables and imports survive between calls; the value of a final "
        "expression is printed. Returns JSON with returncode, stdout and stderr.",
        "parameters": _schema({"code": {"type": "string", "description": "Python source to run"}}, ["code"]),
    },
    "shell": {
        "description": "Run a POSIX shell command line in a sandbox (no network, 5 s CPU) inside the "
        "workspace. Returns JSON with returncode, stdout and stderr.",
        "parameters": _schema(
            {"command": {"type": "string", "description": "shell command line"}}, ["command"]
        ),
    },
    "read_file": {
        "description": "Read a UTF-8 text file of the workspace.",
        "parameters": _schema({"path": _PATH}, ["path"]),
    },
    "write_file": {
        "description": "Create or overwrite a text file in the workspace (parent directories are created).",
        "parameters": _schema(
            {"path": _PATH, "content": {"type": "string", "description": "the text"}}, ["path", "content"]
        ),
    },
    "list_files": {
        "description": "List the files under a directory of the workspace, recursively (at most 500).",
        "parameters": _schema({"path": {**_PATH, "default": "."}}, []),
    },
    "edit_file": {
        "description": "Replace one exact occurrence of old_text with new_text in a workspace file.",
        "parameters": _schema(
            {
                "path": _PATH,
                "old_text": {"type": "string", "description": "text that occurs exactly once"},
                "new_text": {"type": "string", "description": "its replacement"},
            },
            ["path", "old_text", "new_text"],
        ),
    },
    "plot": {
        "description": "Draw with matplotlib (pyplot is available as plt; variables of the python tool are "
        "visible) and save the current figure as a PNG in the workspace. Returns the path and a short "
        "description of the figure.",
        "parameters": _schema(
            {
                "code": {"type": "string", "description": "matplotlib code that draws the figure"},
                "path": {
                    "type": "string",
                    "description": "PNG path relative to the workspace",
                    "default": "plot.png",
                },
            },
            ["code"],
        ),
    },
}


def openai_tools(names: list[str] | None = None) -> list[dict]:
    """The tools in OpenAI `tools=[...]` shape."""
    return [
        {"type": "function", "function": {"name": n, **TOOL_SPECS[n]}} for n in (names or list(TOOL_SPECS))
    ]


def _report(result: SandboxResult) -> str:
    return json.dumps(
        {
            "returncode": result.returncode,
            "stopped_by": result.reason,
            "stdout": result.stdout[-8000:],
            "stderr": result.stderr[-4000:],
        },
        ensure_ascii=False,
    )


@dataclass
class ToolError(Exception):
    """A call the tool refused (bad arguments, bad path): reported to the model, not a crash."""

    message: str

    def __str__(self) -> str:
        return self.message


class ToolSession:
    """A workspace, its persistent interpreter and the tools acting in it."""

    def __init__(
        self,
        workspace: Workspace | None = None,
        quota_mb: int = DEFAULT_QUOTA_MB,
        keep: bool = False,
        shell_limits: SandboxLimits = SHELL_LIMITS,
        interpreter_limits: SandboxLimits = INTERPRETER_LIMITS,
        allow_unisolated: bool = False,
    ):
        self.workspace = workspace if workspace is not None else Workspace(quota_mb=quota_mb, keep=keep)
        self.own_workspace = workspace is None
        self.shell_limits = shell_limits
        self.allow_unisolated = allow_unisolated
        self.interpreter = Interpreter(self.workspace, interpreter_limits, allow_unisolated)

    def __enter__(self) -> ToolSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.interpreter.close()
        if self.own_workspace:
            self.workspace.close()

    @property
    def path(self) -> str:
        return str(self.workspace.path)

    def call(self, name: str, arguments: dict) -> tuple[str, bool]:
        """(text for the model, is_error)."""
        with self.workspace.lock:  # one call at a time in a session
            try:
                return self._dispatch(name, arguments), False
            except (ToolError, WorkspaceError, SandboxError) as e:
                return f"Error: {e}", True
            except OSError as e:  # e.g. ENOSPC: the workspace's quota is full
                return f"Error: {e.strerror or e}", True

    def _dispatch(self, name: str, args: dict) -> str:
        if name not in TOOL_SPECS:
            raise ToolError(f"unknown tool {name!r}; tools: {', '.join(TOOL_SPECS)}")
        if not isinstance(args, dict):
            raise ToolError("arguments must be a JSON object")
        try:  # the one schema, enforced here as it is by a constrained server
            jsonschema.validate(args, TOOL_SPECS[name]["parameters"])
        except jsonschema.ValidationError as e:
            where = "/".join(map(str, e.absolute_path))
            raise ToolError(
                f"{name}: invalid arguments{' at ' + where if where else ''}: {e.message[:300]}"
            ) from None
        return getattr(self, f"_tool_{name}")(**args)

    def _tool_python(self, code: str) -> str:
        reply = self.interpreter.run(code)
        return json.dumps(
            {
                "returncode": 0 if reply.get("ok") else 1,
                "stopped_by": reply.get("stopped_by"),
                "stdout": str(reply.get("stdout", ""))[-8000:],
                "stderr": str(reply.get("stderr", ""))[-4000:],
            },
            ensure_ascii=False,
        )

    def _tool_shell(self, command: str) -> str:
        return _report(
            self.workspace.run(
                ["sh", "-c", command], limits=self.shell_limits, allow_unisolated=self.allow_unisolated
            )
        )

    def _tool_read_file(self, path: str) -> str:
        text = self.workspace.read_text(path, limit=MAX_READ_CHARS * 4)
        return text if len(text) <= MAX_READ_CHARS else text[:MAX_READ_CHARS] + "\n[truncated]"

    def _tool_write_file(self, path: str, content: str) -> str:
        data = content.encode()
        if len(data) > self.shell_limits.file_size_mb << 20:
            raise ToolError(f"content is larger than the {self.shell_limits.file_size_mb} MB file limit")
        try:
            n = self.workspace.write_bytes(path, data)
        except OSError as e:
            raise ToolError(f"cannot write {path}: {e.strerror}") from None
        return f"wrote {n} bytes to {path}"

    def _tool_list_files(self, path: str = ".") -> str:
        return "\n".join(self.workspace.list_files(path)) or "(empty)"

    def _tool_edit_file(self, path: str, old_text: str, new_text: str) -> str:
        n = self.workspace.edit_text(path, old_text, new_text)
        return f"edited {path} ({n} bytes)"

    def _tool_plot(self, code: str, path: str = "plot.png") -> str:
        if not path.endswith(".png"):
            raise ToolError("plot path must end in .png")
        from openk2.tools.workspace import split_relative

        split_relative(path)
        reply = self.interpreter.plot(code, path)
        if not reply.get("ok"):
            raise ToolError(f"plot failed: {str(reply.get('stderr', ''))[-2000:]}")
        return json.dumps({"path": reply["path"], "description": reply["description"]}, ensure_ascii=False)
