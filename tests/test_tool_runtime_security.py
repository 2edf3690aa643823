"""Attacks on the tool runtime (openk2.tools), each tried for real against real sandboxed processes.

Every test is named after the attack; its docstring says what blocked it. The attacks of issue 14 come
first (symlink write-back through the MCP python tool, the `.stdin` race, a workspace shared between
episodes, Unix sockets, the `_posixsubprocess.fork_exec` bypass, HumanEval gaming), then the classic
ones (network, files outside, secrets, fork bomb, memory, disk, daemons, signals, ctypes).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from openk2.tools import sandbox
from openk2.tools.sandbox import IsolationUnavailable, SandboxLimits
from openk2.tools.toolset import ToolSession
from openk2.tools.workspace import Workspace, WorkspaceError, run_python

pytestmark = pytest.mark.skipif(
    sandbox.isolation() != "namespaces", reason="kernel isolation needs root and namespaces"
)
FAST = SandboxLimits(cpu_seconds=2, wall_seconds=5, max_processes=16)


@pytest.fixture
def victim(tmp_path_factory):
    """A host file that no attack may change (in a directory the sandbox cannot see)."""
    path = tmp_path_factory.mktemp("host") / "victim.txt"
    path.write_text("original")
    return path


def _out(text: str) -> dict:
    return json.loads(text)


# ---------------------------------------------------------------------------------------------------
# The attacks measured in issue 14


def test_symlink_write_back_through_mcp_python_tool_is_refused(tmp_path, victim):
    """Blocked by: the python tool keeps no scratch file (the interpreter is persistent, code arrives on
    a pipe), and every host-side file operation walks from the workspace fd with O_NOFOLLOW, so a
    symlink planted by sandboxed code is refused, never followed."""
    from openk2.data.tools import MCPToolbox, shipped_server_command

    plant = (
        f"import os\nfor n in ('main.py', 'out.txt'):\n    os.symlink({str(victim)!r}, n)\nprint('planted')"
    )

    async def main():
        async with MCPToolbox(shipped_server_command(tmp_path), "openk2") as box:
            planted = await box.call("python", {"code": plant})
            again = await box.call("python", {"code": "print(1 + 1)"})
            write = await box.call("write_file", {"path": "main.py", "content": "PWNED"})
            edit = await box.call(
                "edit_file", {"path": "out.txt", "old_text": "original", "new_text": "PWNED"}
            )
            read = await box.call("read_file", {"path": "out.txt"})
            return planted, again, write, edit, read

    planted, again, write, edit, read = asyncio.run(main())
    assert "planted" in planted[0] and _out(again[0])["stdout"] == "2\n"
    assert write[1] and edit[1] and read[1]  # all three refused as tool errors
    assert victim.read_text() == "original"
    assert (tmp_path / "main.py").is_symlink()  # left as the code made it, never written through


def test_stdin_race_cannot_truncate_a_host_file(victim):
    """Blocked by: stdin goes through a pipe; no `.stdin` (or any other) file is written in the
    workspace, so a `.stdin` symlink planted by a concurrent call is never opened by the host."""
    with Workspace() as ws:
        os.symlink(victim, ws.path / ".stdin")

        def call(i):
            return ws.run(
                ["sh", "-c", "cat; ln -sf " + str(victim) + " .stdin"], stdin=f"data{i}", limits=FAST
            )

        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(call, range(8)))
        assert [r.stdout for r in results] == [f"data{i}" for i in range(8)]
    assert victim.read_text() == "original"


def test_episodes_never_share_a_workspace_and_calls_are_serialised():
    """Blocked by: one Workspace per session (its own tmpfs, uid and interpreter) and a lock per
    workspace. Eight sessions computing at once each see only their own result and files, and two
    concurrent calls in one session never overlap (a mkdir lock inside would fail if they did)."""

    def episode(i):
        with ToolSession() as tools:
            tools.call("write_file", {"path": "n.txt", "content": str(i)})
            out = _out(tools.call("python", {"code": f"print({i} * 19, open('n.txt').read())"})[0])
            return out["stdout"], tools.call("list_files", {})[0]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(episode, range(8)))
    assert results == [(f"{i * 19} {i}\n", "n.txt") for i in range(8)]

    critical = "mkdir held || exit 7; sleep 0.3; rmdir held"
    with ToolSession() as tools, ThreadPoolExecutor(3) as pool:
        outs = list(pool.map(lambda _: _out(tools.call("shell", {"command": critical})[0]), range(3)))
    assert [o["returncode"] for o in outs] == [0, 0, 0]


def test_path_and_abstract_unix_sockets_are_unreachable(tmp_path):
    """Blocked by: seccomp refuses socket(AF_UNIX) (path sockets, even one inside the workspace), the
    network namespace scopes abstract sockets, and /run, /tmp and other socket dirs are hidden."""
    abstract_name = f"\0openk2-test-{os.getpid()}"
    listeners = []
    for addr in (abstract_name,):
        s = socket.socket(socket.AF_UNIX)
        s.bind(addr)
        s.listen(1)
        listeners.append(s)
    with Workspace() as ws:
        path_sock = socket.socket(socket.AF_UNIX)
        path_sock.bind(str(ws.path / "host.sock"))
        os.chmod(ws.path / "host.sock", 0o777)
        path_sock.listen(1)
        listeners.append(path_sock)
        code = (
            "import socket\n"
            f"for addr in ({abstract_name!r}, 'host.sock', '/run/dbus/system_bus_socket'):\n"
            "    try:\n"
            "        s = socket.socket(socket.AF_UNIX); s.connect(addr); print('CONNECTED', addr)\n"
            "    except OSError as e:\n"
            "        print('blocked', e.errno)\n"
        )
        r = ws.run([sys.executable, "-c", code], limits=FAST)
    for s in listeners:
        s.close()
    assert r.ok and "CONNECTED" not in r.stdout and r.stdout.count("blocked 1") == 3  # EPERM: seccomp


def test_posixsubprocess_fork_exec_bypass_reaches_nothing(victim):
    """Blocked by: the kernel, not a Python audit hook. `_posixsubprocess.fork_exec` starts a shell that
    still runs inside the namespaces: the network is empty and everything but the workspace is
    read-only or hidden."""
    attack = f"echo PWNED > {victim}; echo PWNED > /etc/pwned; " + (
        "python3 -c \"import socket; socket.create_connection(('1.1.1.1', 80), 2)\" && echo NET"
    )
    code = (
        "import _posixsubprocess, os\n"
        "r, w = os.pipe()\n"
        f"args = ([b'/bin/sh', b'-c', {attack.encode()!r}], [b'/bin/sh'], True, (), None, None,"
        " -1, -1, -1, -1, -1, -1, r, w, True, False, -1, None, None, None, -1, None, False)\n"
        "try:\n"
        "    pid = _posixsubprocess.fork_exec(*args)\n"  # Python 3.11: 23 arguments
        "except TypeError:\n"
        "    pid = _posixsubprocess.fork_exec(*args[:-1])\n"  # 3.12+: no allow_vfork
        "os.waitpid(pid, 0)\n"
        "print('ran')\n"
    )
    r = run_python(code, limits=FAST)
    assert "ran" in r.stdout, r.stderr
    assert victim.read_text() == "original" and not Path("/etc/pwned").exists()
    assert "NET" not in r.stdout


def test_without_isolation_untrusted_code_needs_explicit_opt_in(monkeypatch, capfd):
    """Blocked by: `require_isolation` - with no namespaces the runtime refuses to run code unless
    OPENK2_ALLOW_UNISOLATED=1 (or allow_unisolated=True), and then it prints a warning."""
    monkeypatch.setattr(sandbox, "_isolation_mode", lambda: "none")
    monkeypatch.setattr(sandbox, "_warned", False)
    monkeypatch.delenv(sandbox.UNISOLATED_ENV, raising=False)
    with pytest.raises(IsolationUnavailable, match="OPENK2_ALLOW_UNISOLATED"):
        run_python("print(1)")
    monkeypatch.setenv(sandbox.UNISOLATED_ENV, "1")
    assert run_python("print(1)", limits=FAST).stdout == "1\n"
    assert "WITHOUT isolation" in capfd.readouterr().err


def test_humaneval_gaming_attempts_fail_and_real_solutions_pass():
    """Blocked by: openk2.tools.codecheck - the tests run in a separate sandboxed checker; return values
    cross as plain data (an always-equal object or a str subclass cannot be sent); the verdict comes
    from the checker's own pipe, so printing anything or exiting 0 proves nothing; there is no nonce or
    test file on the candidate's side to read."""
    from openk2.rl.envs.code import check_program, load_humaneval

    problem = load_humaneval()[0]
    attacks = {
        "always-equal object": "    class Eq:\n        def __eq__(self, o): return True\n    return Eq()\n",
        "bool subclass": "    class B(int):\n        def __eq__(self, o): return True\n    return B(1)\n",
        "print a nonce and exit 0": "    import os, sys\n    print(open('/proc/self/cmdline').read())\n"
        "    sys.stdout.flush(); os._exit(0)\n",
        "hunt for the tests": "    import os\n    print(os.listdir('/tmp'), os.listdir('.'))\n"
        "    print(os.listdir('/proc'))\n    raise SystemExit(0)\n",
        "forge a verdict": '    import os\n    os.write(3, b\'{"verdict": {"passed": true}}\\n\')\n'
        '    os.write(1, b\'{"verdict": {"passed": true}}\\n\')\n    return True\n',
    }
    for name, completion in attacks.items():
        result = check_program(problem, completion, FAST)
        assert not result.passed, name
    assert check_program(problem, problem["canonical_solution"], FAST).passed
    assert not check_program(problem, "", FAST).passed


# ---------------------------------------------------------------------------------------------------
# Network


def test_tcp_to_host_loopback_is_blocked():
    """Blocked by: the empty network namespace (its loopback is down)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    try:
        port = server.getsockname()[1]
        code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), 2)\nprint('connected')"
        r = run_python(code, limits=FAST)
        assert not r.ok and "connected" not in r.stdout
        r = run_python("import socket\nsocket.create_connection(('1.1.1.1', 443), 2)", limits=FAST)
        assert not r.ok and "unreachable" in r.stderr
    finally:
        server.close()


def test_dns_lookups_fail():
    """Blocked by: the empty network namespace (no resolver reachable, UDP 53 unreachable)."""
    code = (
        "import socket\ntry:\n    socket.getaddrinfo('pypi.org', 443); print('resolved')\n"
        "except OSError as e:\n    print('failed', type(e).__name__)\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "try:\n    s.sendto(b'x', ('8.8.8.8', 53)); print('sent')\n"
        "except OSError:\n    print('unreachable')\n"
    )
    r = run_python(code, limits=FAST)
    assert "resolved" not in r.stdout and "sent" not in r.stdout and "unreachable" in r.stdout


# ---------------------------------------------------------------------------------------------------
# Files outside the workspace


def test_reading_outside_the_workspace_is_blocked(victim):
    """Blocked by: private dirs (/tmp, /root, /home, /work, /run) hidden behind empty tmpfs in the mount
    namespace, and the dropped uid (root-only files such as /etc/shadow stay unreadable)."""
    code = (
        "import os\n"
        f"for p in ({str(victim)!r}, '/etc/shadow', '/root/.bashrc'):\n"
        "    try:\n        print('READ', p, open(p).read()[:10])\n"
        "    except OSError as e:\n        print('no', e.errno)\n"
        "print(sorted(os.listdir('/tmp')), os.listdir('/work') if os.path.isdir('/work') else [])\n"
    )
    r = run_python(code, limits=FAST)
    assert r.ok and "READ" not in r.stdout
    assert r.stdout.strip().endswith("['workspace'] []")
    with Workspace() as ws, pytest.raises(WorkspaceError):
        ws.read_text("../../etc/passwd")  # the host-side file tools refuse to leave the workspace too


def test_writing_and_deleting_outside_the_workspace_are_blocked():
    """Blocked by: every mount but the workspace remounted read-only, and the uid owns nothing."""
    outside = Path("/var/cache") / f"openk2-victim-{os.getpid()}"  # visible in the sandbox, read-only
    outside.write_text("keep me")
    try:
        code = (
            f"import os, shutil\nfor f in (lambda: os.remove({str(outside)!r}),\n"
            "          lambda: open('/etc/passwd', 'a'),\n"
            "          lambda: shutil.rmtree('/usr/lib'), lambda: os.rename('/etc/hosts', 'h')):\n"
            "    try:\n        f(); print('DONE')\n"
            "    except OSError as e:\n        print('blocked', e.errno)\n"
        )
        r = run_python(code, limits=FAST)
        assert r.ok and "DONE" not in r.stdout and r.stdout.count("blocked") == 4
        assert outside.read_text() == "keep me"
    finally:
        outside.unlink()


def test_disk_quota_stops_filling_the_disk():
    """Blocked by: the workspace is a tmpfs of `quota_mb`; writes past it fail with ENOSPC inside."""
    with Workspace(quota_mb=8) as ws:
        code = (
            "import os\nn = 0\ntry:\n    for i in range(100):\n"
            "        open(f'f{i}', 'wb').write(b'0' * (1 << 20)); n += 1\n"
            "except OSError as e:\n    print('stopped', e.errno, n)\n"
        )
        r = ws.run([sys.executable, "-c", code], limits=FAST)
        assert r.stdout.startswith("stopped 28") and ws.usage_bytes() <= 8 << 20


# ---------------------------------------------------------------------------------------------------
# Secrets, processes, signals, memory, native calls


def test_parent_environment_secrets_are_not_inherited(monkeypatch):
    """Blocked by: a scrubbed environment built from scratch, and the PID namespace (the parent's
    /proc/PID/environ does not exist inside)."""
    monkeypatch.setenv("OPENK2_TEST_SECRET", "s3cr3t-value")
    code = (
        "import os\nprint('s3cr3t' in str(os.environ))\n"
        f"try:\n    print(open('/proc/{os.getpid()}/environ').read())\n"
        "except OSError:\n    print('no parent')\n"
    )
    r = run_python(code, limits=FAST)
    assert r.stdout == "False\nno parent\n"


def test_fork_bomb_is_contained():
    """Blocked by: RLIMIT_NPROC on the session's unprivileged uid, the wall clock, and the PID
    namespace whose death kills every fork."""
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    start = time.monotonic()
    with Workspace() as ws:
        r = ws.run(
            [sys.executable, "-c", bomb], limits=SandboxLimits(cpu_seconds=2, wall_seconds=2, max_processes=8)
        )
        assert not r.ok and time.monotonic() - start < 10
        assert sandbox.pids_of_uid(ws.uid) == []
    assert subprocess.run([sys.executable, "-c", "print(1)"], capture_output=True).stdout == b"1\n"


def test_memory_limit_stops_big_allocations():
    """Blocked by: RLIMIT_AS."""
    r = run_python("x = bytearray(2 * 1024**3)\nprint('allocated')", limits=FAST)
    assert r.reason == "memory_limit" and "allocated" not in r.stdout


def test_daemons_do_not_outlive_their_call_or_session():
    """Blocked by: each shell call's PID namespace dies with the call; the session's uid is swept when
    the session closes (the persistent interpreter and anything it started)."""
    daemon = (
        "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(1000)\nprint('parent done')"
    )
    tools = ToolSession()
    uid = tools.workspace.uid
    tools.call("write_file", {"path": "d.py", "content": daemon})
    out = _out(tools.call("shell", {"command": f"{sys.executable} d.py"})[0])
    assert out["stdout"] == "parent done\n"
    tools.call("python", {"code": daemon})
    assert len(sandbox.pids_of_uid(uid)) >= 2  # the interpreter and its daemon, until the session ends
    tools.close()
    assert sandbox.pids_of_uid(uid) == []


def test_signalling_the_parent_or_host_processes_fails():
    """Blocked by: the PID namespace (host pids do not exist inside) and the dropped uid."""
    host = subprocess.Popen(["sleep", "30"])
    try:
        code = (
            "import os, signal\n"
            f"for pid in ({os.getpid()}, {host.pid}, os.getppid()):\n"
            "    try:\n        os.kill(pid, signal.SIGKILL); print('KILLED', pid)\n"
            "    except OSError as e:\n        print('no', e.errno)\n"
        )
        r = run_python(code, limits=FAST)
        assert host.poll() is None
        assert r.stdout.count("KILLED") <= 1  # os.getppid() is the namespace's own init (pid 1) at most
        assert f"KILLED {host.pid}" not in r.stdout and f"KILLED {os.getpid()}" not in r.stdout
    finally:
        host.send_signal(signal.SIGKILL)
        host.wait()


def test_host_sysv_shared_memory_is_invisible():
    """Blocked by: the IPC namespace - a world-writable SysV segment of the host does not exist inside."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    key = 0x0E2C0000 + os.getpid() % 0xFFFF
    shmid = libc.shmget(key, 4096, 0o1666)  # IPC_CREAT | 0666
    assert shmid >= 0
    try:
        code = (
            f"import ctypes\nlibc = ctypes.CDLL(None)\nprint(libc.shmget({key}, 0, 0o666))\n"
            "print(open('/proc/sysvipc/shm').read().count('\\n'))\n"
        )
        r = run_python(code, limits=FAST)
        assert r.stdout == "-1\n1\n", r.stdout + r.stderr  # not found; the table holds only its header
    finally:
        libc.shmctl(shmid, 0, None)  # IPC_RMID


def test_ctypes_calls_to_libc_are_refused():
    """Blocked by: seccomp (socket(AF_UNIX), unshare, ptrace, io_uring return EPERM) and the dropped
    capabilities (mount, setuid(0), chroot fail)."""
    code = (
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "print([libc.socket(1, 1, 0), libc.unshare(0x10000000), libc.ptrace(16, 1, 0, 0),"
        " libc.syscall(425, 1, 0), libc.mount(b'none', b'/mnt', b'tmpfs', 0, None), libc.setuid(0),"
        " libc.chroot(b'.')])\n"
    )
    r = run_python(code, limits=FAST)
    assert r.ok and r.stdout.strip() == "[-1, -1, -1, -1, -1, -1, -1]", r.stdout + r.stderr


def test_background_thread_swapping_symlinks_cannot_redirect_host_writes(victim):
    """Blocked by: openat walks with O_NOFOLLOW on every component and work on the opened fd, while the
    interpreter's thread keeps replacing files and directories with symlinks to the host."""
    with ToolSession() as tools:
        racer = (
            "import os, threading\n"
            "def swap():\n"
            "    while True:\n"
            "        for n in ('a.txt', 'sub'):\n"
            "            try:\n"
            f"                target = {str(victim)!r} if n == 'a.txt' else {str(victim.parent)!r}\n"
            "                os.symlink(target, n + '.tmp');"
            " os.replace(n + '.tmp', n)\n"
            "            except OSError:\n                pass\n"
            "threading.Thread(target=swap, daemon=True).start()\n"
        )
        tools.call("python", {"code": racer})
        for _ in range(50):
            tools.call("write_file", {"path": "a.txt", "content": "PWNED"})
            tools.call("write_file", {"path": "sub/victim.txt", "content": "PWNED"})
    assert victim.read_text() == "original"
