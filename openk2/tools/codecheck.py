"""Check a function against its tests so that the function cannot game the check.

Two sandboxed processes, each in its own workspace and under its own uid and PID namespace:
- the candidate's process runs prompt + completion and answers calls of the entry point;
- the checker's process runs the trusted prompt + test code, with `candidate` a proxy that sends the
  arguments and receives the return value as plain data (`plaindata`), then decides pass or fail.
The parent relays lines between them and never interprets a value. So an object whose `__eq__` is
always True never reaches the checker (only builtin values cross, rebuilt on the checker's side),
exiting early or printing anything proves nothing (the verdict is written by the checker, on its own
pipe), and there is no nonce or test file the candidate could read: the tests live only in the
checker's process.
"""

from __future__ import annotations

import json
import os
import selectors
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from openk2.tools.launcher import SETUP_MARKER
from openk2.tools.sandbox import SandboxError, SandboxLimits, python_argv, reason_of, stop
from openk2.tools.workspace import Workspace

MAX_LINE = 4 << 20
_PLAINDATA = (Path(__file__).parent / "plaindata.py").read_text()

_CANDIDATE = r"""
import os, sys, json
_rin = os.fdopen(os.dup(0), "r", encoding="utf-8")
_rout = os.fdopen(os.dup(1), "w", encoding="utf-8")
os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
os.dup2(2, 1)  # the candidate's prints go to stderr, never to the reply channel
_setup = json.loads(_rin.readline())
_failure = None
try:
    _ns = {"__name__": "candidate"}
    exec(compile(_setup["program"], "<candidate>", "exec"), _ns)
    _fn = _ns[_setup["entry_point"]]
except BaseException as e:
    _failure = f"loading the candidate failed: {type(e).__name__}: {e}"[:1000]
for _line in _rin:
    if _failure is not None:
        _reply = {"error": _failure}
    else:
        try:
            _reply = {"value": encode(_fn(*decode(json.loads(_line)["args"])))}
        except BaseException as e:
            _reply = {"error": f"{type(e).__name__}: {e}"[:1000]}
    _rout.write(json.dumps(_reply) + "\n")
    _rout.flush()
"""

_CHECKER = r"""
import os, sys, json
_rin = os.fdopen(os.dup(0), "r", encoding="utf-8")
_rout = os.fdopen(os.dup(1), "w", encoding="utf-8")
os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
os.dup2(2, 1)


class CandidateFailed(Exception):
    pass


def candidate(*args):
    _rout.write(json.dumps({"args": encode(list(args))}) + "\n")
    _rout.flush()
    line = _rin.readline()
    if not line:
        raise CandidateFailed("the candidate's process is gone")
    reply = json.loads(line)
    if not isinstance(reply, dict):
        raise CandidateFailed("malformed reply")
    if "error" in reply:
        raise CandidateFailed(str(reply["error"]))
    return decode(reply["value"])


_setup = json.loads(_rin.readline())
try:
    _ns = {"__name__": "checker"}
    exec(compile(_setup["prompt"], "<prompt>", "exec"), _ns)
    _ns[_setup["entry_point"]] = candidate  # tests may call the function by its own name too
    exec(compile(_setup["test"], "<test>", "exec"), _ns)
    _ns["check"](candidate)
    _verdict = {"passed": True, "reason": None}
except AssertionError:
    _verdict = {"passed": False, "reason": "AssertionError"}
except CandidateFailed as e:
    _verdict = {"passed": False, "reason": "error: " + str(e)[:300]}
except BaseException as e:
    _verdict = {"passed": False, "reason": f"error: {type(e).__name__}: {e}"[:300]}
_rout.write(json.dumps({"verdict": _verdict}) + "\n")
_rout.flush()
"""

CANDIDATE_SOURCE = _PLAINDATA + _CANDIDATE
CHECKER_SOURCE = _PLAINDATA + _CHECKER


@dataclass
class CheckResult:
    passed: bool
    reason: str | None  # None when passed; else AssertionError, error: ..., wall_timeout, cpu_limit, ...
    stderr: str = ""  # the candidate's output (its prints and errors)
    duration_s: float = 0.0


class _Side:
    """One sandboxed process of the check: its own workspace, pipes and a bounded stderr."""

    def __init__(self, source: str, limits: SandboxLimits):
        self.ws = Workspace(quota_mb=max(16, 2 * limits.file_size_mb))
        try:
            self.proc = self.ws.spawn(python_argv(source), limits)
        except BaseException:
            self.ws.close()
            raise
        self.stderr = bytearray()
        self.buf = bytearray()
        self._drain = threading.Thread(target=self._read_stderr, daemon=True)
        self._drain.start()

    def _read_stderr(self) -> None:
        for chunk in iter(lambda: self.proc.stderr.read1(65536), b""):
            if len(self.stderr) < 65536:
                self.stderr += chunk

    def send(self, line: bytes) -> bool:
        try:
            self.proc.stdin.write(line.rstrip(b"\n") + b"\n")
            self.proc.stdin.flush()
            return True
        except (BrokenPipeError, OSError):
            return False

    def read_line(self, deadline: float) -> bytes | None:
        """The next line, or None at EOF; TimeoutError past the deadline."""
        fd = self.proc.stdout.fileno()
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in self.buf:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                if not sel.select(timeout=min(left, 0.5)):
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:
                    return None
                self.buf += chunk
                if len(self.buf) > MAX_LINE:
                    return None
        line, _, rest = bytes(self.buf).partition(b"\n")
        self.buf = bytearray(rest)
        return line

    def close(self) -> int:
        code = stop(self.proc)
        self._drain.join(timeout=1)
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                f.close()
            except OSError:
                pass
        self.ws.close()
        return code


def check_function(
    program: str, entry_point: str, prompt: str, test: str, limits: SandboxLimits
) -> CheckResult:
    """Run `check(candidate)` from `test` (with `prompt`'s helpers) against `entry_point` of `program`."""
    start = time.monotonic()
    deadline = start + limits.wall_seconds
    candidate = _Side(CANDIDATE_SOURCE, limits)
    try:
        checker = _Side(CHECKER_SOURCE, limits)
    except BaseException:
        candidate.close()
        raise
    verdict: dict | None = None
    timed_out = False
    try:
        candidate.send(json.dumps({"program": program, "entry_point": entry_point}).encode())
        checker.send(json.dumps({"prompt": prompt, "test": test, "entry_point": entry_point}).encode())
        while verdict is None:
            line = checker.read_line(deadline)
            if line is None:
                break
            try:
                msg = json.loads(line)
            except ValueError:
                break
            if isinstance(msg, dict) and "verdict" in msg:
                verdict = msg["verdict"]
                break
            answer = candidate.read_line(deadline) if candidate.send(line) else None
            if answer is None:
                answer = json.dumps({"error": "the candidate's process is gone"}).encode()
            checker.send(answer)
    except TimeoutError:
        timed_out = True
    finally:
        cand_code = candidate.close()
        checker_code = checker.close()
    cand_err = candidate.stderr.decode("utf-8", "replace")
    for side in (candidate, checker):
        if side.stderr.startswith(SETUP_MARKER.encode()):
            raise SandboxError(side.stderr.decode(errors="replace").strip())
    duration = time.monotonic() - start
    if timed_out:
        return CheckResult(False, "wall_timeout", cand_err, duration)
    if verdict is None:
        why = reason_of(checker_code, checker.stderr.decode(errors="replace"), False)
        return CheckResult(False, f"checker_failed:{why}", cand_err, duration)
    if verdict.get("passed") is True:
        return CheckResult(True, None, cand_err, duration)
    reason = str(verdict.get("reason") or "failed")
    if "process is gone" in reason and cand_code not in (0, None, -9):
        reason = reason_of(cand_code, cand_err, False) or reason
    return CheckResult(False, reason, cand_err, duration)


def check_many(jobs: list[dict], limits: SandboxLimits, workers: int = 2) -> list[CheckResult]:
    """check_function over dicts of its keyword arguments, `workers` checks at a time."""
    workers = max(1, min(workers, os.cpu_count() or 1, len(jobs) or 1))
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda job: check_function(**job, limits=limits), jobs))
