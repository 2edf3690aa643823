"""Run untrusted code (model answers, tool commands) in a real subprocess that cannot hurt the host.

Why each piece exists:
- A launcher (this file run as a script, stdlib only) does the privileged setup between fork and exec
  so the parent never needs `preexec_fn`, which is unsafe once threads exist (evaluation runs in a
  thread pool).
- Namespaces (when we are root): a fresh network namespace whose only interface, loopback, is down,
  so even 127.0.0.1 is unreachable; a PID namespace whose init reaps orphans and whose death takes
  every leftover process with it; a private mount namespace where every mount is read-only except
  the workspace, mounted at /tmp/workspace; /root, /home, /work and /tmp are hidden behind empty tmpfs
  (the Python prefix is bound back so the interpreter still runs).
- A per-run unprivileged uid: root ignores RLIMIT_NPROC, a fresh uid does not, so a fork bomb stops
  at `max_processes`; dropping root also drops every capability, so the code cannot undo the mounts,
  and every process the run left behind can be found by uid and killed.
- rlimits for CPU seconds, address space and file size; a wall clock enforced by the parent, which
  kills the whole session and then every process still owned by the run's uid.
- Fallback when namespaces are not permitted (not root, or a kernel without them): Python audit hooks
  in the child refuse sockets, writes outside the workspace, process creation and ctypes. That guard is
  weaker (native extensions can bypass it) and `network_isolation()` says which one is in force.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

SETUP_FAILED = 125  # launcher exit status when the sandbox itself could not be set up
SETUP_MARKER = "openk2-sandbox-setup:"
HIDDEN_DIRS = ("/root", "/home", "/work", "/tmp")
WORKDIR = "/tmp/workspace"  # where the workspace appears inside the mount namespace
UID_BASE = 200_000


class SandboxError(RuntimeError):
    """The sandbox could not be set up (a host problem, not a problem of the code being run)."""


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
    """'namespaces' if the launcher can unshare net+mount and drop to another uid, else 'audit-hook'."""
    if os.geteuid() != 0:
        return "audit-hook"
    spec = {"probe": True}
    proc = subprocess.run(
        [sys.executable, "-I", "-S", __file__, json.dumps(spec)], capture_output=True, text=True, timeout=30
    )
    return "namespaces" if proc.returncode == 0 else "audit-hook"


def network_isolation() -> str:
    """How network access is blocked for sandboxed code: 'netns' (empty network namespace, a kernel
    guarantee) or 'audit-hook' (Python-level guard; bypassable by native code)."""
    return "netns" if _isolation_mode() == "namespaces" else "audit-hook"


def file_isolation() -> str:
    """How writes outside the workspace are blocked: 'readonly-mounts' or 'audit-hook'."""
    return "readonly-mounts" if _isolation_mode() == "namespaces" else "audit-hook"


_uid_counter = itertools.count()
_uid_lock = threading.Lock()


def _next_uid() -> int:
    """A uid no other live run of this process uses; pids spread concurrent processes apart."""
    with _uid_lock:
        n = next(_uid_counter)
    return UID_BASE + (os.getpid() % 4096) * 256 + n % 256


def _pids_of_uid(uid: int) -> list[int]:
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


def _kill_uid(uid: int) -> None:
    """Kill every live process owned by the run's uid (escaped daemons, fork-bomb leftovers)."""
    for _ in range(100):
        pids = _pids_of_uid(uid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)


def _scrubbed_env(workspace: Path, extra: dict[str, str] | None) -> dict[str, str]:
    env = {
        "PATH": f"{os.path.dirname(sys.executable)}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(workspace),
        "TMPDIR": str(workspace),
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    env.update(extra or {})
    return env


def _reason(returncode: int, stderr: str, timed_out: bool) -> str | None:
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


def run_command(
    argv: list[str],
    *,
    limits: SandboxLimits = SandboxLimits(),
    workspace: Path | None = None,
    stdin: str | None = None,
    env: dict[str, str] | None = None,
    files: dict[str, str] | None = None,
) -> SandboxResult:
    """Run argv (argv[0] looked up on the sandbox PATH) with the workspace as cwd.

    `files` are written into the workspace first. A temporary workspace is removed afterwards; a
    given one is kept (and handed to the run's uid)."""
    if not argv or not all(isinstance(a, str) for a in argv):
        raise ValueError(f"argv must be a non-empty list of strings, got {argv!r}")
    own_workspace = workspace is None
    ws = Path(tempfile.mkdtemp(prefix="openk2-sbx-")) if own_workspace else Path(workspace).resolve()
    if not ws.is_dir():
        raise ValueError(f"workspace {ws} is not a directory")
    uid = _next_uid()
    mode = _isolation_mode()
    try:
        for name, text in (files or {}).items():
            path = (ws / name).resolve()
            if not path.is_relative_to(ws):
                raise ValueError(f"file {name!r} would land outside the workspace")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        stdin_path = ws / ".stdin"
        stdin_path.write_text(stdin or "")
        workdir = Path(WORKDIR) if mode == "namespaces" else ws
        program = shutil.which(argv[0], path=_scrubbed_env(workdir, env)["PATH"]) or argv[0]
        spec = {
            "argv": [program, *argv[1:]],
            "env": _scrubbed_env(workdir, env),
            "workspace": str(ws),
            "workdir": str(workdir),
            "uid": uid,
            "limits": asdict(limits),
            "mode": mode,
            "hide": [d for d in HIDDEN_DIRS if os.path.isdir(d)],
            "keep": [os.path.realpath(sys.base_prefix), os.path.realpath(sys.prefix)],
        }
        with open(stdin_path, "rb") as stdin_file:
            return _supervise(spec, stdin_file, limits, uid if mode == "namespaces" else None)
    finally:
        if mode == "namespaces":
            _kill_uid(uid)
        if own_workspace:
            shutil.rmtree(ws, ignore_errors=True)
        else:
            (ws / ".stdin").unlink(missing_ok=True)


def run_python(
    code: str,
    *,
    limits: SandboxLimits = SandboxLimits(),
    workspace: Path | None = None,
    stdin: str | None = None,
    env: dict[str, str] | None = None,
    files: dict[str, str] | None = None,
) -> SandboxResult:
    """Run Python source as `python -I main.py` inside the sandbox."""
    if not isinstance(code, str):
        raise TypeError(f"code must be str, got {type(code).__name__}")
    files = {**(files or {}), "main.py": code}
    argv = [sys.executable, "-I", "-B", "main.py"]
    if _isolation_mode() != "namespaces":
        argv = [sys.executable, "-I", "-B", "-c", _AUDIT_GUARD, "main.py"]
    return run_command(argv, limits=limits, workspace=workspace, stdin=stdin, env=env, files=files)


def _supervise(spec: dict, stdin_file, limits: SandboxLimits, uid: int | None) -> SandboxResult:
    """Start the launcher, collect bounded output, enforce the wall clock, kill what is left."""
    start = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-I", "-S", __file__, json.dumps(spec)],
        stdin=stdin_file,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        close_fds=True,
    )
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
            break  # the main process is gone; a leftover holding the pipes open is killed below
        for key, _ in sel.select(timeout=0.05):
            chunk = os.read(key.fd, 65536)
            if not chunk:
                sel.unregister(key.fileobj)
                continue
            buf = buffers[key.fileobj]
            buf += chunk[: max(0, limits.max_output_bytes - len(buf))]
    if uid is not None:
        _kill_uid(uid)  # kills the namespace's PID 1 (and so all of it); the launcher then reaps it
    try:
        returncode = proc.wait(timeout=5 if uid is not None else 0.01)
    except subprocess.TimeoutExpired:
        returncode = None
    if returncode is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        returncode = proc.wait()
    sel.close()
    for stream in buffers:
        stream.close()
    duration = time.monotonic() - start
    stdout = buffers[proc.stdout].decode("utf-8", "replace")
    stderr = buffers[proc.stderr].decode("utf-8", "replace")
    if returncode == SETUP_FAILED and stderr.startswith(SETUP_MARKER):
        raise SandboxError(stderr.strip())
    return SandboxResult(
        returncode=returncode if not timed_out else -signal.SIGKILL,
        stdout=stdout,
        stderr=stderr,
        timed_out=timed_out,
        reason=_reason(returncode, stderr, timed_out),
        duration_s=duration,
    )


# Fallback guard, run in the child before the program when namespaces are unavailable.
_AUDIT_GUARD = r"""
import os, sys
_ws = os.path.realpath(os.getcwd())
_WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_DENY = {"socket.__new__", "socket.connect", "socket.bind", "socket.sendto", "socket.getaddrinfo",
         "os.fork", "os.forkpty", "os.posix_spawn", "os.exec", "os.system", "subprocess.Popen",
         "os.kill", "os.killpg", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "os.chdir"}
_PATHS = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.symlink",
          "os.link", "os.truncate", "os.utime", "shutil.rmtree", "shutil.copyfile", "shutil.move"}
def _inside(p):
    if isinstance(p, int):
        return True
    p = os.path.realpath(os.fsdecode(p))
    return p == _ws or p.startswith(_ws + os.sep) or p == os.devnull
def _hook(event, args):
    if event in _DENY:
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "open":
        path, mode, flags = args
        writing = (mode is not None and any(c in str(mode) for c in "wax+")) or (flags or 0) & _WRITE
        if writing and path is not None and not _inside(path):
            raise PermissionError(f"sandbox: write outside the workspace: {path}")
    elif event in _PATHS and not all(_inside(a) for a in args[:2] if isinstance(a, (str, bytes))):
        raise PermissionError(f"sandbox: {event} outside the workspace")
sys.addaudithook(_hook)
import runpy
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


# ----------------------------------------------------------------------------------------------------
# Launcher side: runs as root between the parent and the untrusted program. Stdlib only.

CLONE_NEWNS, CLONE_NEWNET, CLONE_NEWPID = 0x00020000, 0x40000000, 0x20000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
PR_SET_NO_NEW_PRIVS = 38


def _libc():
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    return libc, ctypes


def _check(ctypes, rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(libc, ctypes, src, target, fstype, flags, data=None) -> None:
    enc = lambda s: None if s is None else os.fsencode(s)  # noqa: E731
    _check(ctypes, libc.mount(enc(src), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


def _mount_points() -> list[tuple[str, int]]:
    """(mount point, flags to keep) for every mount, parents first."""
    keep = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC}
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            point = fields[4].encode().decode("unicode_escape")  # octal escapes such as \040
            flags = sum(v for k, v in keep.items() if k in fields[5].split(","))
            out.append((point, flags))
    return out


def _isolate(spec: dict) -> None:
    """New net, mount and PID namespaces; everything read-only except the workspace; private dirs hidden."""
    libc, ctypes = _libc()
    _check(ctypes, libc.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID), "unshare")
    _mount(libc, ctypes, None, "/", None, MS_REC | MS_PRIVATE)
    if spec.get("probe"):
        return
    ws = spec["workspace"]
    # Hold the directories that must stay reachable before hiding their parents.
    keep = [p for p in spec["keep"] if any(p.startswith(h + "/") for h in spec["hide"])]
    binds = {p: os.open(p, os.O_PATH | os.O_DIRECTORY) for p in dict.fromkeys(keep)}
    binds[spec["workdir"]] = os.open(ws, os.O_PATH | os.O_DIRECTORY)
    for hidden in spec["hide"]:
        _mount(libc, ctypes, "tmpfs", hidden, "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,mode=755")
    for path, fd in binds.items():
        os.makedirs(path, exist_ok=True)
        _mount(libc, ctypes, f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
        os.close(fd)
    wd = spec["workdir"]
    for point, flags in _mount_points():
        if point == wd or point.startswith(wd + "/"):
            flags |= MS_NOSUID | MS_NODEV
        else:
            flags |= MS_RDONLY | MS_NOSUID
        try:
            _mount(libc, ctypes, None, point, None, MS_REMOUNT | MS_BIND | flags)
        except OSError:
            if point in ("/", "/tmp", "/dev/shm", *spec["hide"]):
                raise


def _set_limits(limits: dict) -> None:
    import resource

    mb = 1 << 20
    cpu = int(limits["cpu_seconds"])
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (limits["memory_mb"] * mb, limits["memory_mb"] * mb))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits["file_size_mb"] * mb, limits["file_size_mb"] * mb))
    resource.setrlimit(resource.RLIMIT_NPROC, (limits["max_processes"], limits["max_processes"]))
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits["max_open_files"], limits["max_open_files"]))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _drop_privileges(uid: int, workspace: str) -> None:
    libc, ctypes = _libc()
    for root, dirs, names in os.walk(workspace):
        for name in [*dirs, *names]:
            os.lchown(os.path.join(root, name), uid, uid)
    os.chown(workspace, uid, uid)
    os.chmod(workspace, 0o700)
    _check(ctypes, libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)


def _fail_setup(e: Exception) -> None:
    """Report a setup failure distinctly from a failure of the program."""
    sys.stderr.write(f"{SETUP_MARKER} {type(e).__name__}: {e}\n")
    sys.stderr.flush()
    os._exit(SETUP_FAILED)


def _exec_program(spec: dict) -> None:
    try:
        os.execve(spec["argv"][0], spec["argv"], spec["env"])
    except OSError as e:
        sys.stderr.write(f"cannot execute {spec['argv'][0]}: {e}\n")
        os._exit(127)


def _init(spec: dict, status_fd: int) -> None:
    """PID 1 of the run's PID namespace: start the program, reap every orphan, report the program's wait
    status. When this process exits the kernel kills whatever is left in the namespace."""
    try:
        libc, ctypes = _libc()
        _mount(libc, ctypes, "proc", "/proc", "proc", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
        os.chdir(spec["workdir"])
        _set_limits(spec["limits"])
        _drop_privileges(spec["uid"], spec["workdir"])
        program = os.fork()
    except Exception as e:
        _fail_setup(e)
    if program == 0:
        os.close(status_fd)
        _exec_program(spec)
    while True:
        pid, status = os.waitpid(-1, 0)
        if pid == program:
            os.write(status_fd, str(status).encode())
            os._exit(0)


def _exit_like(status: int) -> None:
    """Leave the launcher the way the program left, so the parent sees its exit code or signal."""
    if os.WIFSIGNALED(status):
        import resource

        sig = os.WTERMSIG(status)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1)


def _launch(spec: dict) -> None:
    if spec.get("probe") or spec["mode"] == "namespaces":
        try:
            _isolate(spec)
        except Exception as e:
            _fail_setup(e)
        if spec.get("probe"):
            os._exit(0)
        read_fd, write_fd = os.pipe()
        init = os.fork()  # the first child of unshare(CLONE_NEWPID) is PID 1 of the new namespace
        if init == 0:
            os.close(read_fd)
            _init(spec, write_fd)
        os.close(write_fd)
        _, status = os.waitpid(init, 0)
        reported = os.read(read_fd, 64)
        _exit_like(int(reported) if reported else status)
    try:
        os.chdir(spec["workdir"])
        _set_limits(spec["limits"])
    except Exception as e:
        _fail_setup(e)
    _exec_program(spec)


if __name__ == "__main__":
    _launch(json.loads(sys.argv[1]))
