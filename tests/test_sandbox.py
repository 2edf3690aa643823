"""Each sandbox limit is proven by running code that breaks it in a real subprocess."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from openk2 import sandbox
from openk2.sandbox import SandboxLimits, run_command, run_python

FAST = SandboxLimits(cpu_seconds=2, wall_seconds=4, max_processes=16)


def _uid_processes() -> list[str]:
    """Live or zombie processes under the uids this test process hands out (other processes' sandboxes
    running at the same time use other uids)."""
    first = sandbox.UID_BASE + (os.getpid() % 4096) * 256
    out = subprocess.run(["ps", "-eo", "uid=,pid=,stat=,cmd="], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if first <= int(line.split()[0]) < first + 256]


@pytest.fixture(params=["native", "audit-hook"])
def mode(request, monkeypatch):
    """Run a test under the mode in force here and under the forced fallback guard."""
    if request.param == "audit-hook":
        monkeypatch.setattr(sandbox, "_isolation_mode", lambda: "audit-hook")
    return request.param


def test_runs_code_and_captures_output():
    r = run_python("import sys\nprint(sys.stdin.read().upper())\nprint('err', file=sys.stderr)", stdin="abc")
    assert r.ok and r.reason is None
    assert r.stdout == "ABC\n" and r.stderr == "err\n"
    assert r.duration_s < 5


def test_exit_code_and_signal_are_reported():
    assert run_python("raise SystemExit(3)").returncode == 3
    r = run_python("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")
    assert r.returncode == -9 and not r.ok


def test_reports_which_isolation_is_in_force():
    assert sandbox.network_isolation() in ("netns", "audit-hook")
    if os.geteuid() == 0:  # this container permits namespaces; CI as root must get the real mechanism
        assert sandbox.network_isolation() == "netns"
        assert sandbox.file_isolation() == "readonly-mounts"


def test_network_is_blocked(mode):
    # A real listener on the host's loopback: reachable from here, not from the sandbox.
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), 2)\nprint('connected')"
        r = run_python(code, limits=FAST)
        assert not r.ok and "connected" not in r.stdout
        r = run_python("import socket\nprint(socket.getaddrinfo('pypi.org', 443))", limits=FAST)
        assert not r.ok
    finally:
        server.close()


def test_infinite_loop_is_killed_by_cpu_limit(mode):
    r = run_python("while True:\n    pass", limits=SandboxLimits(cpu_seconds=1, wall_seconds=10))
    assert r.reason == "cpu_limit" and not r.timed_out
    assert r.duration_s < 5


def test_big_allocation_fails(mode):
    r = run_python("x = bytearray(2 * 1024**3)\nprint('allocated')", limits=FAST)
    assert r.reason == "memory_limit" and "allocated" not in r.stdout


def test_writing_a_100mb_file_fails(mode, tmp_path):
    r = run_python("open('big.bin', 'wb').write(b'0' * (100 << 20))", limits=FAST, workspace=tmp_path)
    assert r.reason == "file_size_limit"
    assert (tmp_path / "big.bin").stat().st_size <= FAST.file_size_mb << 20


def test_writes_are_confined_to_the_workspace(mode, tmp_path):
    target = Path("/tmp") / f"outside-{os.getpid()}-{mode}"
    code = f"open('inside.txt', 'w').write('ok')\nopen({str(target)!r}, 'w').write('escaped')"
    r = run_python(code, limits=FAST, workspace=tmp_path)
    assert not r.ok and not target.exists()
    assert (tmp_path / "inside.txt").read_text() == "ok"
    r = run_python(f"import os\nos.remove({str(tmp_path / 'inside.txt')!r})\nos.mkdir('/tmp/newdir-{mode}')")
    assert not r.ok and not Path(f"/tmp/newdir-{mode}").exists()


@pytest.mark.skipif(sandbox.file_isolation() != "readonly-mounts", reason="needs namespaces")
def test_private_directories_are_hidden_and_root_is_dropped():
    code = (
        "import os\nprint(os.getuid(), os.listdir('/work') if os.path.isdir('/work') else [])\nos.kill(1, 9)"
    )
    r = run_python(code, limits=FAST)
    uid, listing = r.stdout.split(" ", 1)
    assert int(uid) >= sandbox.UID_BASE and listing.strip() == "[]"
    r = run_python("import subprocess\nsubprocess.run(['mount', '-o', 'remount,rw', '/'], check=True)")
    assert not r.ok


def test_sleep_forever_is_killed_by_wall_time(mode):
    r = run_python("import time\ntime.sleep(1000)", limits=SandboxLimits(wall_seconds=1.5))
    assert r.timed_out and r.reason == "wall_timeout"
    assert r.duration_s < 4


@pytest.mark.skipif(sandbox.file_isolation() != "readonly-mounts", reason="needs namespaces")
def test_fork_bomb_is_contained_and_host_is_fine():
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    start = time.monotonic()
    r = run_python(bomb, limits=SandboxLimits(cpu_seconds=2, wall_seconds=2, max_processes=8))
    assert not r.ok and time.monotonic() - start < 10
    assert _uid_processes() == []  # nothing left running (or as zombie) under any sandbox uid
    assert subprocess.run([sys.executable, "-c", "print(1)"], capture_output=True).stdout == b"1\n"


@pytest.mark.skipif(sandbox.file_isolation() != "readonly-mounts", reason="needs namespaces")
def test_daemonized_children_do_not_survive_the_run():
    code = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(1000)\nprint('parent done')"
    r = run_python(code, limits=FAST)
    assert r.ok and r.stdout == "parent done\n"
    assert _uid_processes() == []


def test_output_is_bounded():
    r = run_python(
        "while True:\n    print('x' * 10000)", limits=SandboxLimits(cpu_seconds=1, max_output_bytes=4096)
    )
    assert len(r.stdout) == 4096 and not r.ok


def test_run_command_and_files():
    r = run_command(["sh", "-c", "cat data.txt; ls"], files={"data.txt": "hello\n"})
    assert r.ok and r.stdout.startswith("hello\n") and "data.txt" in r.stdout
    with pytest.raises(ValueError):
        run_command(["cat"], files={"../escape.txt": "x"})
    with pytest.raises(ValueError):
        run_command([])
    with pytest.raises(ValueError):
        SandboxLimits(cpu_seconds=0)


def test_concurrent_runs_do_not_interfere():
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda i: run_python(f"print({i} * 2)"), range(8)))
    assert [r.stdout.strip() for r in results] == [str(i * 2) for i in range(8)]
