"""The tool runtime's ordinary behaviour, proven in real subprocesses: output and exit status, each
limit, workspaces and their file operations, the persistent interpreter and the tools. The attacks are
in tests/test_tool_runtime_security.py."""

import json
import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from openk2.tools import sandbox
from openk2.tools.sandbox import SandboxLimits
from openk2.tools.toolset import TOOL_SPECS, ToolSession, openai_tools
from openk2.tools.workspace import Workspace, WorkspaceError, run_command, run_python

pytestmark = pytest.mark.skipif(sandbox.isolation() != "namespaces", reason="needs root and namespaces")
FAST = SandboxLimits(cpu_seconds=2, wall_seconds=4, max_processes=16)


def test_runs_code_and_captures_output():
    r = run_python("import sys\nprint(sys.stdin.read().upper())\nprint('err', file=sys.stderr)", stdin="abc")
    assert r.ok and r.reason is None
    assert r.stdout == "ABC\n" and r.stderr == "err\n"


def test_exit_code_and_signal_are_reported():
    assert run_python("raise SystemExit(3)").returncode == 3
    r = run_python("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")
    assert r.returncode == -9 and not r.ok


def test_reports_which_isolation_is_in_force():
    if os.geteuid() == 0:  # this container permits namespaces; CI as root must get the real mechanism
        assert sandbox.isolation() == "namespaces"


def test_infinite_loop_is_killed_by_cpu_limit():
    r = run_python("while True:\n    pass", limits=SandboxLimits(cpu_seconds=1, wall_seconds=10))
    assert r.reason == "cpu_limit" and not r.timed_out and r.duration_s < 5


def test_sleep_forever_is_killed_by_wall_time():
    r = run_python("import time\ntime.sleep(1000)", limits=SandboxLimits(wall_seconds=1.5))
    assert r.timed_out and r.reason == "wall_timeout" and r.duration_s < 4


def test_writing_a_100mb_file_fails():
    with Workspace() as ws:
        r = run_python("open('big.bin', 'wb').write(b'0' * (100 << 20))", limits=FAST, workspace=ws)
        assert r.reason == "file_size_limit"
        assert (ws.path / "big.bin").stat().st_size <= FAST.file_size_mb << 20


def test_output_is_bounded():
    r = run_python(
        "while True:\n    print('x' * 10000)",
        limits=SandboxLimits(cpu_seconds=1, wall_seconds=2, max_output_bytes=4096),
    )
    assert len(r.stdout) == 4096 and not r.ok


def test_run_command_files_and_bad_input():
    r = run_command(["sh", "-c", "cat data.txt; ls"], files={"data.txt": "hello\n"})
    assert r.ok and r.stdout == "hello\ndata.txt\n"  # no scratch file (.stdin, main.py) in the workspace
    with pytest.raises(WorkspaceError):
        run_command(["cat"], files={"../escape.txt": "x"})
    with pytest.raises(ValueError):
        run_command([])
    with pytest.raises(ValueError):
        SandboxLimits(cpu_seconds=0)


def test_concurrent_runs_do_not_interfere():
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda i: run_python(f"print({i} * 2)"), range(6)))
    assert [r.stdout.strip() for r in results] == [str(i * 2) for i in range(6)]


def test_workspace_file_operations_and_lifetime(tmp_path):
    ws = Workspace(quota_mb=4)
    path = ws.path
    assert ws.write_text("a/b/c.txt", "one two") == 7
    assert ws.edit_text("a/b/c.txt", "two", "three") == 9 and ws.read_text("a/b/c.txt") == "one three"
    with pytest.raises(WorkspaceError, match="occurs 0 times"):
        ws.edit_text("a/b/c.txt", "four", "x")
    os.symlink("/etc/passwd", path / "link")
    os.mkfifo(path / "fifo")
    assert ws.list_files() == ["a/b/c.txt", "fifo", "link (symlink)"]
    for bad in ("link", "fifo", "/etc/passwd", "a/../../x", "a/b"):
        with pytest.raises(WorkspaceError):
            ws.read_text(bad)
    ws.close()
    assert not path.exists()  # removed with its tmpfs
    kept = Workspace(keep=True)
    kept.write_text("x.txt", "kept")
    kept.close()
    assert (kept.path / "x.txt").read_text() == "kept" and kept.path.name.startswith("openk2-kept-")
    assert not os.path.ismount(kept.path)  # a plain directory: the tmpfs was released
    adopted = Workspace(path=tmp_path)
    adopted.write_text("y.txt", "mine")
    adopted.close()
    assert (tmp_path / "y.txt").read_text() == "mine"  # an adopted directory is never removed


def test_interpreter_keeps_state_restarts_after_timeout_and_plots():
    limits = SandboxLimits(cpu_seconds=60, wall_seconds=3, memory_mb=1024, file_size_mb=16)
    with ToolSession(interpreter_limits=limits) as tools:
        out = lambda text: json.loads(text[0])  # noqa: E731
        assert out(tools.call("python", {"code": "import math\nx = 6 * 7\nx"}))["stdout"] == "42\n"
        assert out(tools.call("python", {"code": "print(math.sqrt(x - 6))"}))["stdout"] == "6.0\n"
        err = out(tools.call("python", {"code": "1 / 0"}))
        assert (
            err["returncode"] == 1
            and "ZeroDivisionError" in err["stderr"]
            and "repl_server" not in err["stderr"]
        )
        plot = json.loads(
            tools.call("plot", {"code": "plt.plot(range(x)); plt.title('up')", "path": "p.png"})[0]
        )
        assert (
            plot["path"] == "p.png"
            and "title 'up'" in plot["description"]
            and "1 line(s)" in plot["description"]
        )
        assert (tools.workspace.path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        slow = out(tools.call("python", {"code": "import time\ntime.sleep(100)"}))
        assert slow["stopped_by"] == "wall_timeout" and "state is lost" in slow["stderr"]
        assert "NameError" in out(tools.call("python", {"code": "x"}))["stderr"]  # a fresh interpreter
        assert tools.call("nope", {}) == (f"Error: unknown tool 'nope'; tools: {', '.join(TOOL_SPECS)}", True)
        assert tools.call("shell", {"command": 3})[1] and tools.call("plot", {"code": "", "path": "a.jpg"})[1]
    assert [t["function"]["name"] for t in openai_tools()] == list(TOOL_SPECS)
