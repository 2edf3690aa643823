"""The tool runtime (layer 3): sandboxed processes, one workspace per session, the tools themselves
(python, shell, files, plot) with one schema each, and code checking a candidate cannot game."""

from openk2.tools.sandbox import (
    IsolationUnavailable,
    SandboxError,
    SandboxLimits,
    SandboxResult,
    isolation,
    require_isolation,
)
from openk2.tools.workspace import Workspace, WorkspaceError, run_command, run_python

__all__ = [
    "IsolationUnavailable",
    "SandboxError",
    "SandboxLimits",
    "SandboxResult",
    "Workspace",
    "WorkspaceError",
    "isolation",
    "require_isolation",
    "run_command",
    "run_python",
]
