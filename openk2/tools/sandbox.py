"""Run untrusted code (model answers, tool commands) in a real subprocess that cannot hurt the host.

Why each piece exists:
- A launcher (this file run as a script, stdlib only) does the privileged setup between fork and exec,
  so the parent never needs `preexec_fn`, which is unsafe once threads exist.
- Namespaces (we must be root): a fresh network namespace whose only interface, loopback, is down, so
  TCP, UDP, DNS and abstract Unix sockets (scoped per network namespace) reach nothing; a PID namespace
  whose init reaps orphans and whose death takes every leftover process with it; a private mount
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

SETUP_FAILED = 125  # launcher exit status when the sandbox itself could not be set up
SETUP_MARKER = "openk2-sandbox-setup:"
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
        [sys.executable, "-I", "-S", __file__, json.dumps({"probe": True})],
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
        [sys.executable, "-I", "-S", __file__, json.dumps(spec)],
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
    if proc.poll() is None and not timed_out:
        try:
            proc.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            pass
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


# ----------------------------------------------------------------------------------------------------
# Launcher side: runs as root between the parent and the untrusted program. Stdlib only.

CLONE_NEWNS, CLONE_NEWNET, CLONE_NEWPID, CLONE_NEWUSER = 0x00020000, 0x40000000, 0x20000000, 0x10000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
AF_UNIX = 1

# Syscall numbers by machine: the ones refused outright, clone (flags checked), socket (domain checked).
# x86_64: ptrace 101, add_key 248, request_key 249, keyctl 250, unshare 272, perf_event_open 298,
# setns 308, bpf 321, userfaultfd 323, io_uring_setup/enter/register 425-427, clone 56, clone3 435,
# socket 41. aarch64 uses the generic table.
SECCOMP_TABLES = {
    "x86_64": {
        "arch": 0xC000003E,
        "deny": [101, 248, 249, 250, 272, 298, 308, 321, 323, 425, 426, 427],
        "clone": 56,
        "clone3": 435,
        "socket": 41,
        "x32": True,
    },
    "aarch64": {
        "arch": 0xC00000B7,
        "deny": [117, 217, 218, 219, 97, 241, 268, 280, 282, 425, 426, 427],
        "clone": 220,
        "clone3": 435,
        "socket": 198,
        "x32": False,
    },
}


def _seccomp_program(table: dict) -> list[tuple[int, int, int, int]]:
    """A classic-BPF seccomp filter as (code, jt, jf, k) instructions."""
    ld_w_abs, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    allow, kill = 0x7FFF0000, 0x80000000
    eperm, enosys = 0x00050000 | 1, 0x00050000 | 38
    deny = table["deny"]
    prog: list[tuple[int, int, int, int]] = [(ld_w_abs, 0, 0, 4)]  # arch
    prog.append((jeq, 1, 0, table["arch"]))
    prog.append((ret, 0, 0, kill))
    prog.append((ld_w_abs, 0, 0, 0))  # syscall number
    if table["x32"]:
        prog.append((jge, 0, 1, 0x40000000))
        prog.append((ret, 0, 0, eperm))
    for nr in deny:
        prog.append((jeq, 0, 1, nr))
        prog.append((ret, 0, 0, eperm))
    prog.append((jeq, 0, 1, table["clone3"]))  # glibc falls back to clone, whose flags we can read
    prog.append((ret, 0, 0, enosys))
    prog.append((jeq, 0, 4, table["clone"]))
    prog.append((ld_w_abs, 0, 0, 16))  # args[0], low 32 bits: clone flags
    prog.append((jset, 0, 1, CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWNS | CLONE_NEWPID))
    prog.append((ret, 0, 0, eperm))
    prog.append((ret, 0, 0, allow))
    prog.append((jeq, 0, 3, table["socket"]))
    prog.append((ld_w_abs, 0, 0, 16))  # args[0]: the address family
    prog.append((jeq, 0, 1, AF_UNIX))
    prog.append((ret, 0, 0, eperm))
    prog.append((ret, 0, 0, allow))
    return prog


def _install_seccomp() -> None:
    import ctypes
    import platform

    table = SECCOMP_TABLES.get(platform.machine())
    if table is None:
        raise OSError(f"no seccomp syscall table for {platform.machine()}")
    prog = _seccomp_program(table)

    class SockFilter(ctypes.Structure):
        _fields_ = [
            ("code", ctypes.c_ushort),
            ("jt", ctypes.c_ubyte),
            ("jf", ctypes.c_ubyte),
            ("k", ctypes.c_uint),
        ]

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]

    filters = (SockFilter * len(prog))(*[SockFilter(*ins) for ins in prog])
    fprog = SockFprog(len(prog), filters)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"seccomp: {os.strerror(err)}")


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
    # Hold the directories that must stay reachable before hiding their parents.
    keep = [p for p in spec["keep"] if any(p.startswith(h + "/") for h in spec["hide"])]
    binds = {p: os.open(p, os.O_PATH | os.O_DIRECTORY) for p in dict.fromkeys(keep)}
    # A mount of the parent's namespace cannot be bound from here, so open the workspace by its host
    # path (a root-only directory no sandbox sees) and check it is the very directory the parent opened.
    ws_fd = os.open(spec["host_path"], os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW)
    given, found = os.fstat(spec["workspace_fd"]), os.fstat(ws_fd)
    if (given.st_dev, given.st_ino) != (found.st_dev, found.st_ino):
        raise OSError(f"workspace {spec['host_path']} is not the directory the parent opened")
    os.close(spec["workspace_fd"])
    binds[spec["workdir"]] = ws_fd
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
            if point in ("/", *spec["hide"]):
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


def _drop_privileges(uid: int) -> None:
    libc, ctypes = _libc()
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
        _drop_privileges(spec["uid"])
        _install_seccomp()
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
            if spec.get("probe"):
                probe = os.fork()
                if probe == 0:  # seccomp must be installable too
                    libc, ctypes = _libc()
                    _check(ctypes, libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
                    _install_seccomp()
                    os._exit(0)
                _, status = os.waitpid(probe, 0)
                os._exit(0 if status == 0 else SETUP_FAILED)
        except Exception as e:
            _fail_setup(e)
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
        os.fchdir(spec["workspace_fd"])
        os.close(spec["workspace_fd"])
        _set_limits(spec["limits"])
    except Exception as e:
        _fail_setup(e)
    _exec_program(spec)


if __name__ == "__main__":
    _launch(json.loads(sys.argv[1]))
