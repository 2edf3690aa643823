"""Run untrusted code (model answers, tool commands) in a real subprocess that cannot hurt the host.

Why each piece exists:
- A launcher (`launcher.py`, stdlib only) does the privileged setup between fork and exec,
  so the parent never needs `preexec_fn`, which is unsafe once threads exist.
- Namespaces (we must be root): a fresh network namespace whose only interface, loopback, is down, so
  TCP, UDP, DNS and abstract Unix sockets (scoped per network namespace) reach nothing; a PID namespace
  whose init reaps orphans and whose death takes every leftover process with it; an IPC namespace
  (no SysV shared memory, semaphores or message queues shared with the host); a private mount
  namespace where every mount is read-only except the workspace, which appears at /tmp/workspace, and
  /root, /home, /work, /tmp, /run, /var/tmp and /dev/shm are hidden behind empty tmpfs (the Python
  prefix is bound back so the interpreter still runs).
- A seccomp filter refuses socket(AF_UNIX) (a path socket somewhere still visible cannot be reached),
  io_uring (it can open sockets without the socket syscall), new namespaces, ptrace, bpf, perf events
  and the kernel keyring.
- The workspace's unprivileged uid: root ignores RLIMIT_NPROC, a fresh uid does not, so a fork bomb stops
  at `max_processes`; dropping root also drops every capability, so the code cannot undo the mounts,
  and cannot signal or read the parent.
- rlimits for CPU seconds, address space, file size and open files; a wall clock enforced by the
  parent, which kills the launcher's process group (and so the PID namespace) when it runs out.

Where namespaces are not permitted (not root, or a kernel without them) there is no isolation at all:
only the rlimits apply. Running untrusted code then needs an explicit opt-in (`allow_unisolated=True`
or OPENK2_ALLOW_UNISOLATED=1) and prints a warning; without it `IsolationUnavailable` is raised.
"""

from __future__ import annotations

import functools
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from openk2.tools.launcher import SETUP_FAILED, SETUP_MARKER

# `python -I -S` cannot import openk2; the launcher module is imported from its own directory.
_HERE = str(Path(__file__).parent)
LAUNCHER = [
    sys.executable,
    "-I",
    "-S",
    "-c",
    f"import sys; sys.path.insert(0, {_HERE!r}); import launcher; launcher.main(sys.argv[1])",
]

HIDDEN_DIRS = ("/root", "/home", "/work", "/tmp", "/run", "/var/tmp", "/dev/shm", "/mnt", "/media", "/srv")
WORKDIR = "/tmp/workspace"  # where the workspace appears inside the mount namespace
UID_BASE = 200_000
UNISOLATED_ENV = "OPENK2_ALLOW_UNISOLATED"


class SandboxError(RuntimeError):
    """The sandbox could not be set up (a host problem, not a problem of the code being run)."""


class IsolationUnavailable(SandboxError):
    """Kernel isolation is not available here and running unisolated was not explicitly allowed."""


@dataclass(frozen=True)
class SandboxLimits:
    cpu_seconds: int = 5  # RLIMIT_CPU per process: SIGXCPU at the limit, SIGKILL one second later
    wall_seconds: float = 10.0  # enforced by the parent on the whole run
    memory_mb: int = 512  # RLIMIT_AS per process
    file_size_mb: int = 16  # RLIMIT_FSIZE: the largest file a process may write
    max_processes: int = 32  # RLIMIT_NPROC for the run's uid (threads count too)
    max_open_files: int = 256  # RLIMIT_NOFILE
    max_output_bytes: int = 1 << 20  # stdout and stderr are each truncated to this

    def __post_init__(self):
        for name in ("cpu_seconds", "wall_seconds", "memory_mb", "file_size_mb", "max_processes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SandboxLimits.{name} must be positive, got {getattr(self, name)}")


@dataclass
class SandboxResult:
    returncode: int
    stdout: str
    stderr: str
    timed_out: bool
    reason: str | None  # None on success; else wall_timeout, cpu_limit, memory_limit, file_size_limit, ...
    duration_s: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


# ----------------------------------------------------------------------------------------------------
# Parent side


@functools.lru_cache(maxsize=1)
def _isolation_mode() -> str:
    """'namespaces' if the launcher can unshare net+mount+pid, install seccomp and drop root; else 'none'."""
    if os.geteuid() != 0:
        return "none"
    proc = subprocess.run(
        [*LAUNCHER, json.dumps({"probe": True})],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return "namespaces" if proc.returncode == 0 else "none"


def isolation() -> str:
    """What isolates sandboxed code here: 'namespaces' (net, mount and PID namespaces, seccomp, another
    uid) or 'none' (rlimits only; running then needs an explicit opt-in)."""
    return _isolation_mode()


_warned = False


def require_isolation(allow_unisolated: bool = False) -> str:
    """The isolation mode, or IsolationUnavailable when there is none and no explicit opt-in."""
    global _warned
    mode = _isolation_mode()
    if mode == "namespaces":
        return mode
    if not (allow_unisolated or os.environ.get(UNISOLATED_ENV) == "1"):
        raise IsolationUnavailable(
            "kernel isolation (namespaces, needs root) is unavailable here; untrusted code would run "
            f"with the host's rights. Set {UNISOLATED_ENV}=1 to run it anyway."
        )
    if not _warned:
        _warned = True
        print(
            "WARNING: openk2 is running untrusted code WITHOUT isolation (no namespaces): it can read and "
            "write your files and reach the network. Only rlimits apply.",
            file=sys.stderr,
        )
    return mode


def python_argv(source: str) -> list[str]:
    """Run our own Python source in the sandbox, starting fast: `-S` skips site's .pth processing
    (~0.1 s per start here), and the site-packages directories are put on sys.path directly, so
    installed packages (numpy, matplotlib) still import."""
    import site

    prelude = f"import sys\nsys.path.extend({site.getsitepackages()!r})\n"
    return [sys.executable, "-I", "-S", "-B", "-c", prelude + source]


def pids_of_uid(uid: int) -> list[int]:
    """Live (not zombie) processes owned by uid."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                status = f.read()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        zombie = fields.get("State", "").strip().startswith("Z")
        if int(fields.get("Uid", "-1 0").split()[0]) == uid and not zombie:
            pids.append(int(entry))
    return pids


def kill_uid(uid: int) -> None:
    """Kill every live process owned by uid (what a session left behind)."""
    for _ in range(100):
        pids = pids_of_uid(uid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)


def scrubbed_env(workdir: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The whole environment of sandboxed code: nothing of the parent's (no secrets) is inherited."""
    env = {
        "PATH": f"{os.path.dirname(sys.executable)}:/usr/local/bin:/usr/bin:/bin",
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
        "MPLBACKEND": "Agg",
        "MPLCONFIGDIR": f"{workdir}/.matplotlib",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    env.update(extra or {})
    return env


def reason_of(returncode: int, stderr: str, timed_out: bool) -> str | None:
    if timed_out:
        return "wall_timeout"
    if returncode == 0:
        return None
    if returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        return "cpu_limit" if returncode == -signal.SIGXCPU else "killed"
    if "MemoryError" in stderr or "Cannot allocate memory" in stderr:
        return "memory_limit"
    if "File too large" in stderr or returncode == -signal.SIGXFSZ:
        return "file_size_limit"
    if returncode < 0:
        return f"signal:{signal.Signals(-returncode).name}"
    return "nonzero_exit"


def launch(
    argv: list[str],
    *,
    workspace_fd: int,
    host_path: str,
    uid: int,
    limits: SandboxLimits,
    env: dict[str, str] | None = None,
    allow_unisolated: bool = False,
) -> subprocess.Popen:
    """Start argv in the sandbox with the workspace (given by an open directory fd) as cwd; stdin,
    stdout and stderr are pipes. The caller owns the process: read, write, then `stop(proc)`."""
    if not argv or not all(isinstance(a, str) for a in argv):
        raise ValueError(f"argv must be a non-empty list of strings, got {argv!r}")
    mode = require_isolation(allow_unisolated)
    workdir = WORKDIR if mode == "namespaces" else host_path
    full_env = scrubbed_env(workdir, env)
    program = shutil.which(argv[0], path=full_env["PATH"]) or argv[0]
    spec = {
        "argv": [program, *argv[1:]],
        "env": full_env,
        "workspace_fd": workspace_fd,
        "host_path": host_path,
        "workdir": workdir,
        "uid": uid,
        "limits": asdict(limits),
        "mode": mode,
        "hide": [d for d in HIDDEN_DIRS if os.path.isdir(d) and not os.path.islink(d)],
        "keep": [os.path.realpath(sys.base_prefix), os.path.realpath(sys.prefix)],
    }
    return subprocess.Popen(
        [*LAUNCHER, json.dumps(spec)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        close_fds=True,
        pass_fds=(workspace_fd,),
    )


def _group_alive(pgid: int) -> bool:
    """Whether a live (not zombie) process is still in the process group."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


def stop(proc: subprocess.Popen, timeout: float = 5.0) -> int:
    """Kill the launcher's process group (launcher and the namespace's init: the kernel then kills every
    process in the PID namespace), reap it, and wait until the namespace is gone (its init stays in the
    group until every process inside has died); returns the launcher's exit status."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    code = proc.wait()
    deadline = time.monotonic() + timeout
    while _group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    return code


def supervise(proc: subprocess.Popen, stdin: bytes, limits: SandboxLimits) -> SandboxResult:
    """Feed stdin through the pipe, collect bounded output, enforce the wall clock, kill what is left."""
    start = time.monotonic()

    def feed():
        try:
            proc.stdin.write(stdin)
        except (BrokenPipeError, OSError):
            pass
        finally:
            try:
                proc.stdin.close()
            except OSError:
                pass

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    buffers = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    sel = selectors.DefaultSelector()
    for stream in buffers:
        sel.register(stream, selectors.EVENT_READ)
    timed_out = False
    deadline = start + limits.wall_seconds
    exited_at = None
    while sel.get_map():
        now = time.monotonic()
        if now > deadline:
            timed_out = proc.poll() is None
            break
        if exited_at is None and proc.poll() is not None:
            exited_at = now
        if exited_at is not None and now - exited_at > 0.5:
            break
        for key, _ in sel.select(timeout=0.05):
            chunk = os.read(key.fd, 65536)
            if not chunk:
                sel.unregister(key.fileobj)
                continue
            buf = buffers[key.fileobj]
            buf += chunk[: max(0, limits.max_output_bytes - len(buf))]
    if proc.poll() is None and not timed_out:  # outputs closed, program still running: wait for it
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
    returncode = proc.poll()
    stop(proc)
    if returncode is None:
        returncode = proc.returncode
    sel.close()
    for stream in buffers:
        stream.close()
    feeder.join(timeout=1)
    stdout = buffers[proc.stdout].decode("utf-8", "replace")
    stderr = buffers[proc.stderr].decode("utf-8", "replace")
    if returncode == SETUP_FAILED and stderr.startswith(SETUP_MARKER):
        raise SandboxError(stderr.strip())
    return SandboxResult(
        returncode=returncode if not timed_out else -signal.SIGKILL,
        stdout=stdout,
        stderr=stderr,
        timed_out=timed_out,
        reason=reason_of(returncode, stderr, timed_out),
        duration_s=time.monotonic() - start,
    )
