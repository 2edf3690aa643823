"""`openk2 agent` end to end, as a real subprocess with the official `openai` client inside.

- Against a real `openk2 serve` subprocess (a random tiny checkpoint, tool calls forced by the server's
  grammar with --tool-choice required): the loop streams, executes every call in its workspace, stops
  at its turn budget, and the transcript renders with the chat template and loads in `openk2 sft`.
- Against a scripted OpenAI-compatible endpoint (in addition, because a random model cannot follow a
  plan): a multi-step task - write a file, run Python on it, make a plot, answer - with exact results.
- `--model CKPT` serves the checkpoint in-process and takes the same HTTP path.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
import uvicorn
from eval_util import save_tiny_checkpoint
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from serve_util import free_port, serve_process

from openk2.tokenizer.chat import encode_chat
from openk2.tokenizer.tokenizer import K2Tokenizer
from openk2.tools import isolation
from openk2.tools.sandbox import UID_BASE, pids_of_uid
from openk2.train.sft import load_conversations

pytestmark = pytest.mark.skipif(isolation() != "namespaces", reason="the agent's tools need kernel isolation")

DATA = "x,y\n1,2\n2,4\n3,9\n"
SCRIPT = [
    ("write_file", {"path": "data.csv", "content": DATA}),
    ("python", {"code": "import csv\nrows = list(csv.DictReader(open('data.csv')))\n"
                        "print(sum(int(r['y']) for r in rows))"}),
    ("plot", {"code": "plt.plot([int(r['x']) for r in rows], [int(r['y']) for r in rows])\n"
                      "plt.title('y by x')", "path": "y.png"}),
]  # fmt: skip


class ScriptedEndpoint:
    """A streaming OpenAI-compatible endpoint whose 'model' follows SCRIPT, one call per turn, then
    answers with the number the python tool printed (read back from the conversation)."""

    def __init__(self, script: list = SCRIPT):
        self.script = script
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.requests: list[dict] = []
        app = FastAPI()

        @app.get("/v1/models")
        def models():
            return {"object": "list", "data": [{"id": "scripted", "object": "model", "owned_by": "test"}]}

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = await request.json()
            self.requests.append(body)
            return StreamingResponse(self._stream(body), media_type="text/event-stream")

        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def _stream(self, body: dict):
        def chunk(delta: dict, finish=None, usage=None) -> str:
            choices = [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish}]
            payload = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "scripted"}
            return "data: " + json.dumps({**payload, "choices": choices, "usage": usage}) + "\n\n"

        tool_results = [m for m in body["messages"] if m["role"] == "tool"]
        step = len(tool_results)
        yield chunk({"role": "assistant", "content": ""})
        if step < len(self.script):
            name, args = self.script[step]
            text = json.dumps(args)
            yield chunk({"content": f"Step {step + 1}: {name}."})
            first = {
                "index": 0,
                "id": f"call_{step}",
                "type": "function",
                "function": {"name": name, "arguments": text[:7]},
            }
            yield chunk({"tool_calls": [first]})
            yield chunk(
                {"tool_calls": [{"index": 0, "function": {"arguments": text[7:]}}]}
            )  # split arguments
            yield chunk({}, "tool_calls")
        else:
            total = json.loads(tool_results[1]["content"])["stdout"].strip()
            plot = json.loads(tool_results[2]["content"])
            for part in (f"The sum of y is {total}", f"; the plot is {plot['path']}."):
                yield chunk({"content": part})
            yield chunk({}, "stop")
        yield chunk({}, usage={"prompt_tokens": 50, "completion_tokens": 20, "total_tokens": 70})
        yield "data: [DONE]\n\n"

    def __enter__(self) -> ScriptedEndpoint:
        self.thread.start()
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                httpx.get(self.url + "/models", timeout=1)
                return self
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError("endpoint did not start")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def _agent(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "openk2.cli", "agent", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _workspace(stdout: str) -> str:
    return stdout.rsplit("workspace: ", 1)[1].strip()


def _check_transcript(path) -> dict:
    convs = load_conversations(path)  # what `openk2 sft` reads
    assert len(convs) == 1
    conv = convs[0]
    enc = encode_chat(K2Tokenizer.byte_level(), conv["messages"], conv["tools"])
    assert any(enc.assistant_mask)  # renders with the chat template, with assistant tokens to train on
    return conv


def test_multi_step_task_against_a_scripted_endpoint(tmp_path):
    transcript = tmp_path / "t.jsonl"
    with ScriptedEndpoint() as endpoint:
        out = _agent(
            "--endpoint", endpoint.url, "--transcript", str(transcript), "Sum y in a CSV and plot it."
        )
    assert out.returncode == 0, out.stderr
    assert "The sum of y is 15; the plot is y.png." in out.stdout  # streamed to the terminal
    ws = _workspace(out.stdout)
    from pathlib import Path

    assert (Path(ws) / "data.csv").read_text() == DATA
    assert (Path(ws) / "y.png").read_bytes()[:4] == b"\x89PNG"
    conv = _check_transcript(transcript)
    roles = [m["role"] for m in conv["messages"]]
    assert roles == ["system", "user"] + ["assistant", "tool"] * 3 + ["assistant"]
    ids = [c["id"] for m in conv["messages"] for c in m.get("tool_calls") or []]
    assert ids == ["functions.write_file:0", "functions.python:1", "functions.plot:2"]  # K2 ids
    assert conv["meta"]["stopped_by"] == "answer" and conv["meta"]["completion_tokens"] == 80
    assert "title 'y by x'" in conv["messages"][7]["content"]
    # the endpoint saw the tools, streaming with usage, and the K2 ids sent back
    assert endpoint.requests[0]["stream"] is True and endpoint.requests[0]["stream_options"]["include_usage"]
    assert {t["function"]["name"] for t in endpoint.requests[0]["tools"]} >= {"python", "plot", "write_file"}
    shutil.rmtree(ws)


def _refused(capsys, *args: str) -> str:
    """The one-line error of a bad command line (run in-process: no model, no subprocess needed)."""
    from openk2.cli import main

    capsys.readouterr()
    assert main(["agent", *args]) in (1, 2)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_budgets_and_bad_input(tmp_path, capsys):
    from openk2.cli import main

    transcript = tmp_path / "t.jsonl"
    with ScriptedEndpoint() as endpoint:
        args = ["--endpoint", endpoint.url, "--max-turns", "2", "--transcript", str(transcript)]
        assert main(["agent", *args, "--discard-workspace", "task"]) == 0
    out = capsys.readouterr().out
    assert "[stopped: max_turns]" in out and "(removed)" in out
    assert json.loads(transcript.read_text())["meta"]["stopped_by"] == "max_turns"
    assert "unknown tools" in _refused(capsys, "--endpoint", "http://x", "--tools", "rm", "t")
    assert "must be positive" in _refused(capsys, "--endpoint", "http://x", "--max-turns", "0", "t")
    assert "cannot list the models" in _refused(
        capsys, "--endpoint", f"http://127.0.0.1:{free_port()}/v1", "t"
    )
    assert "does not exist" in _refused(capsys, "--model", str(tmp_path / "nope"), "t")


def test_interactive_mode(tmp_path, monkeypatch, capsys):
    """No TASK: tasks are read line by line until /exit; the whole session is one transcript."""
    import io

    from openk2.cli import main

    transcript = tmp_path / "t.jsonl"
    monkeypatch.setattr("sys.stdin", io.StringIO("Sum y in a CSV and plot it.\n/exit\n"))
    with ScriptedEndpoint() as endpoint:
        args = ["agent", "--endpoint", endpoint.url, "--transcript", str(transcript), "--discard-workspace"]
        assert main(args) == 0
    out = capsys.readouterr().out
    assert "one task per line" in out and "The sum of y is 15" in out and "(removed)" in out
    assert json.loads(transcript.read_text())["meta"]["stopped_by"] == "answer"


def test_ctrl_c_stops_cleanly(tmp_path):
    """SIGINT during a long tool call: the agent stops, keeps a consistent transcript (the call gets an
    "interrupted" result), prints the workspace, and leaves no sandboxed process behind."""
    transcript = tmp_path / "t.jsonl"
    slow = [("python", {"code": "import time\ntime.sleep(120)"})]
    cmd = [
        sys.executable,
        "-m",
        "openk2.cli",
        "agent",
        "--transcript",
        str(transcript),
        "--discard-workspace",
        "sleep",
    ]
    with ScriptedEndpoint(slow) as endpoint:
        proc = subprocess.Popen([*cmd, "--endpoint", endpoint.url], stdout=subprocess.PIPE, text=True)
        seen = ""
        while "[tool python(" not in seen:
            line = proc.stdout.readline()
            assert line, "the agent exited before calling the tool"
            seen += line
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "[interrupted]" in rest and "workspace: " in rest
    record = json.loads(transcript.read_text())
    assert record["meta"]["stopped_by"] == "interrupted"
    assert [m["role"] for m in record["messages"]] == ["system", "user", "assistant", "tool"]
    assert record["messages"][-1]["content"] == "Error: interrupted by the user"
    first = UID_BASE + (proc.pid % 16384) * 4096  # the uids the agent's sessions ran under
    assert not any(pids_of_uid(uid) for uid in range(first, first + 8))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    save_tiny_checkpoint(path, max_positions=2048)
    return path


# The server's grammar forces a call of list_files whose arguments match its schema (a bounded,
# portable path), so even a random model's calls are complete and run in the workspace.
ARGS = ["--tools", "list_files", "--tool-choice", "required", "--max-turns", "2", "--turn-tokens", "200",
        "--temperature", "0", "--discard-workspace", "Write a note."]  # fmt: skip


@pytest.mark.slow
def test_against_a_real_openk2_serve(checkpoint, tmp_path):
    transcript = tmp_path / "t.jsonl"
    with serve_process(checkpoint, "--served-model-name", "tiny", "--max-batch", "1") as url:
        out = _agent("--endpoint", url, "--transcript", str(transcript), *ARGS)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("[tool list_files(") == 2 and "[stopped: max_turns]" in out.stdout
    conv = _check_transcript(transcript)
    roles = [m["role"] for m in conv["messages"]]
    assert roles == ["system", "user", "assistant", "tool", "assistant", "tool"]
    for m in conv["messages"][3::2]:  # each call was complete JSON and answered by the runtime
        assert m["content"] == "(empty)" or m["content"].startswith("Error: no such directory")
    assert conv["meta"]["model"] == "tiny" and conv["meta"]["completion_tokens"] > 0


@pytest.mark.slow
def test_model_flag_serves_the_checkpoint_in_process(checkpoint, tmp_path):
    transcript = tmp_path / "t.jsonl"
    out = _agent("--model", str(checkpoint), "--transcript", str(transcript), *ARGS)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("[tool list_files(") == 2
    _check_transcript(transcript)
