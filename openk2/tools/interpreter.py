"""A persistent Python interpreter per session: state (variables, imports, open figures) survives between
calls, as in K2's IPython tool.

Why not a Jupyter kernel: ipykernel is not installed here, and a kernel talks to its client over ZMQ
sockets (TCP or Unix domain), which the sandbox blocks by design (empty network namespace, seccomp
refusing AF_UNIX). Our own small protocol over the process's stdin/stdout pipes needs no socket: the
inside half is `repl_server.py`, started once per session in the session's sandbox and workspace.

A call that runs past its wall time kills the interpreter; the next call starts a fresh one (and says
that the state was lost).
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import threading
import time
from pathlib import Path

from openk2.tools.launcher import SETUP_MARKER
from openk2.tools.sandbox import SandboxError, SandboxLimits, stop
from openk2.tools.workspace import Workspace

REPL_SOURCE = (Path(__file__).parent / "repl_server.py").read_text()
MAX_REPLY_BYTES = 1 << 20
# RLIMIT_CPU counts a process's whole life, so the long-lived interpreter gets a session budget;
# each call is bounded by the wall clock.
INTERPRETER_LIMITS = SandboxLimits(cpu_seconds=600, wall_seconds=30.0, memory_mb=1024, file_size_mb=64)


class Interpreter:
    def __init__(
        self, workspace: Workspace, limits: SandboxLimits = INTERPRETER_LIMITS, allow_unisolated: bool = False
    ):
        self.workspace = workspace
        self.limits = limits
        self.allow_unisolated = allow_unisolated
        self.proc: subprocess.Popen | None = None
        self.restarted = False
        self._stderr = bytearray()

    def _start(self) -> None:
        self.proc = self.workspace.spawn(
            [sys.executable, "-I", "-B", "-c", REPL_SOURCE],
            self.limits,
            allow_unisolated=self.allow_unisolated,
        )
        self._stderr = bytearray()
        threading.Thread(target=self._drain_stderr, args=(self.proc,), daemon=True).start()

    def _drain_stderr(self, proc: subprocess.Popen) -> None:
        for chunk in iter(lambda: proc.stderr.read1(65536), b""):
            if len(self._stderr) < 65536:
                self._stderr += chunk

    def close(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            for f in (self.proc.stdin, self.proc.stdout):
                try:
                    f.close()
                except OSError:
                    pass
            self.proc = None

    def request(self, req: dict, timeout: float | None = None) -> dict:
        """Send one request; the reply dict, or {"ok": False, "stopped_by": ...} when the interpreter died
        or ran out of time (it is then restarted on the next call)."""
        with self.workspace.lock:
            fresh = self.proc is None
            if fresh:
                self._start()
            timeout = timeout or self.limits.wall_seconds
            try:
                self.proc.stdin.write((json.dumps(req) + "\n").encode())
                self.proc.stdin.flush()
            except (BrokenPipeError, OSError):
                pass
            try:
                line, why = self._read_line(timeout)
            except BaseException:  # e.g. Ctrl-C: a late reply would answer the next request; start over
                self.close()
                raise
            if line is None:
                self.close()
                if why == "setup" or (fresh and self._stderr.startswith(SETUP_MARKER.encode())):
                    raise SandboxError(self._stderr.decode(errors="replace").strip())
                tail = self._stderr.decode(errors="replace")[-2000:]
                return {
                    "ok": False,
                    "stopped_by": why,
                    "stdout": "",
                    "stderr": f"{tail}\n[the interpreter stopped ({why}); its state is lost, "
                    "the next call starts a fresh one]",
                }
            try:
                reply = json.loads(line)
                if not isinstance(reply, dict):
                    raise ValueError
            except ValueError:
                self.close()
                return {
                    "ok": False,
                    "stopped_by": "protocol",
                    "stdout": "",
                    "stderr": "[garbled reply; interpreter restarted]",
                }
            return reply

    def _read_line(self, timeout: float) -> tuple[bytes | None, str]:
        fd = self.proc.stdout.fileno()
        buf = bytearray()
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None, "wall_timeout"
                if not sel.select(timeout=min(left, 0.5)):
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:
                    code = self.proc.wait()
                    return None, "setup" if code == 125 else f"exited:{code}"
                buf += chunk
                if b"\n" in buf:
                    return bytes(buf.split(b"\n", 1)[0]), ""
                if len(buf) > MAX_REPLY_BYTES:
                    return None, "reply_too_large"

    def run(self, code: str, timeout: float | None = None) -> dict:
        return self.request({"code": code}, timeout)

    def plot(self, code: str, path: str, timeout: float | None = None) -> dict:
        return self.request({"plot": code, "path": path}, timeout)
