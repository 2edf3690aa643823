"""The sandbox launcher: runs as root between the parent (`openk2.tools.sandbox`) and the untrusted
program, in the fork-exec gap, and sets up namespaces, mounts, rlimits, the uid and seccomp.

Stdlib only and imported with `python -I -S` by the parent (not run as a script, so its bytecode is
cached): its start-up time is paid by every sandboxed call.
"""

import json
import os
import signal
import sys

SETUP_FAILED = 125  # launcher exit status when the sandbox itself could not be set up
SETUP_MARKER = "openk2-sandbox-setup:"


CLONE_NEWNS, CLONE_NEWNET, CLONE_NEWPID, CLONE_NEWUSER = 0x00020000, 0x40000000, 0x20000000, 0x10000000
CLONE_NEWIPC, CLONE_NEWUTS = 0x08000000, 0x04000000
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


def load_libc():
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    return libc, ctypes


def _check(ctypes, rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(libc, ctypes, src, target, fstype, flags, data=None) -> None:
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
    """New net, mount, PID, IPC (no SysV/POSIX IPC shared with the host) and UTS namespaces;
    everything read-only except the workspace; private dirs hidden."""
    libc, ctypes = load_libc()
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
    _check(ctypes, libc.unshare(flags), "unshare")
    mount(libc, ctypes, None, "/", None, MS_REC | MS_PRIVATE)
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
        mount(libc, ctypes, "tmpfs", hidden, "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,mode=755")
    for path, fd in binds.items():
        os.makedirs(path, exist_ok=True)
        mount(libc, ctypes, f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
        os.close(fd)
    wd = spec["workdir"]
    for point, flags in _mount_points():
        if point == wd or point.startswith(wd + "/"):
            flags |= MS_NOSUID | MS_NODEV
        else:
            flags |= MS_RDONLY | MS_NOSUID
        try:
            mount(libc, ctypes, None, point, None, MS_REMOUNT | MS_BIND | flags)
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
    libc, ctypes = load_libc()
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
        libc, ctypes = load_libc()
        mount(libc, ctypes, "proc", "/proc", "proc", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
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
                    libc, ctypes = load_libc()
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


def main(spec_json: str) -> None:
    _launch(json.loads(spec_json))
