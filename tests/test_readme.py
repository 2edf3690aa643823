"""The README's "Using it" section, run as a newcomer would: in a fresh directory, after the main job,
every command in order, each exiting 0 with no traceback.

Long runs are shortened; the flags this test adds are listed in SHORTEN (and the main job's in
MAIN_JOB), so what is run is the README's line plus those flags. `[...]` parts are optional and left
out, port 8000 becomes a free port, `serve` runs in the background until the end (the `eval
--endpoint` line talks to it), and `chat` reads two lines from stdin."""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]

# The main job (`openk2 train`), shortened: 3 steps on the first 200k characters.
MAIN_JOB = ["train", "--steps", "3", "--max-chars", "200000"]
# README command prefix -> flags appended to shorten it.
SHORTEN = {
    "openk2 train --preset tiny": ["--steps", "3"],
    "torchrun": ["--steps", "2"],
    "openk2 sample": ["--max-new-tokens", "20"],
    "openk2 chat": ["--max-tokens", "8"],
    "openk2 synth trajectories": ["--agents", "1", "--tasks-per-agent", "3"],
    "openk2 sft": ["--steps", "2"],
    "openk2 rl": ["--steps", "1"],
    "openk2 eval humaneval": ["--limit", "2", "--max-tokens", "16"],
}
CHAT_INPUT = "Hello there\n/exit\n"


def readme_commands() -> list[str]:
    """The command lines of the bash block in README's "Using it" section, comments removed."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Using it", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    lines = []
    for line in block.splitlines():
        line = re.sub(r"\s+#.*$", "", line).strip()
        if line:
            lines.append(line)
    return lines


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _argv(line: str, port: int) -> list[str]:
    line = re.sub(r"\s*\[[^\]]*\]", "", line)  # optional parts
    line = line.replace("8000", str(port))
    extra = next((flags for prefix, flags in SHORTEN.items() if line.startswith(prefix)), [])
    words = shlex.split(line) + extra
    if words[0] == "openk2":
        return [sys.executable, "-m", "openk2", *words[1:]]
    if words[0] == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", *words[1:]]
    raise AssertionError(f"README line is not an openk2 or torchrun command: {line}")


def test_readme_lists_the_commands_it_promises():
    lines = readme_commands()
    assert len(lines) >= 12
    for name in ("train", "sample", "serve", "chat", "export", "synth", "sft", "rl", "eval", "env"):
        assert any(line.startswith(f"openk2 {name}") for line in lines), name
    assert all(any(line.startswith(prefix) for line in lines) for prefix in SHORTEN)


@pytest.mark.slow
def test_readme_commands_run_in_order(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    (tmp_path / "configs").symlink_to(REPO / "configs")  # the repository's shipped configs

    def run(argv: list[str], stdin: str | None = None) -> None:
        out = subprocess.run(
            argv, cwd=tmp_path, env=env, input=stdin, capture_output=True, text=True, timeout=1200
        )
        shown = " ".join(argv[2:] if argv[1] == "-m" else argv)
        assert out.returncode == 0, f"`{shown}` exited {out.returncode}:\n{out.stderr[-3000:]}"
        assert "Traceback" not in out.stderr + out.stdout, f"`{shown}` printed a traceback"

    run([sys.executable, "-m", "openk2", *MAIN_JOB])
    port = _free_port()
    server = None
    try:
        for line in readme_commands():
            argv = _argv(line, port)
            if line.startswith("openk2 serve"):
                server = subprocess.Popen(
                    argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
                )
                deadline = time.time() + 300
                while True:
                    assert server.poll() is None, f"serve exited: {server.stderr.read()[-3000:]}"
                    try:
                        if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    assert time.time() < deadline, "serve did not come up"
                    time.sleep(0.5)
                continue
            run(argv, stdin=CHAT_INPUT if line.startswith("openk2 chat") else None)
    finally:
        if server is not None:
            server.terminate()
            _, err = server.communicate(timeout=60)
    assert "Traceback" not in err
    assert (tmp_path / "out" / "config.json").is_file()  # the export
    assert list((tmp_path / "runs" / "sft").rglob("config.json"))  # the SFT checkpoint
