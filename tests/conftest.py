"""Test-session settings.

One torch thread per process: the tests' models are tiny, several tests start servers or torchrun
workers beside the pytest process, and two processes each running 2 OpenMP threads on 2 cores spin
on each other's descheduled threads (small matmuls then take milliseconds instead of microseconds).
Subprocesses inherit the environment variable."""

import os
import signal

os.environ.setdefault("OMP_NUM_THREADS", "1")

# Tests that press Ctrl-C (send SIGINT to a command) need it to reach the command as from a terminal.
# A test run started in the background by a non-interactive shell (`cmd &`, some CI runners) inherits
# SIGINT as ignored, and an ignored signal stays ignored across exec, so those commands would never
# see it. A handler here instead is reset to the default in every subprocess.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

import mcp.client.stdio  # noqa: E402, F401
import torch  # noqa: E402

torch.set_num_threads(1)
# The MCP SDK's stdio client binds `sys.stderr` as a default argument when it is first imported;
# imported here, before any test captures stderr, it keeps the real one (imported first inside a
# test that captures, it would keep that test's capture file, closed by the time later tests run).


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _no_flush_denormal_leaks():
    """`openk2` commands run in-process turn on flush-to-zero for speed (openk2/cli.py); that must
    not leak into later tests (hypothesis refuses to generate floats when subnormals are flushed)."""
    yield
    torch.set_flush_denormal(False)
