"""`openk2 agent [--endpoint URL | --model CKPT] [TASK]`: a tool-using agent in a sandboxed workspace.

With --endpoint the model is any OpenAI-compatible server (`openk2 serve`, vLLM, a hosted API); with
--model the project's own server app is started in this process on a loopback port, and the agent
talks to it over the same HTTP path. Without TASK the agent is interactive (one task per line;
/exit or an empty line ends). The transcript is appended as one JSONL line in the SFT format, and the
workspace path is printed at the end (kept unless --discard-workspace).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("task", nargs="?", default=None, help="the task; without it, interactive mode")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--endpoint", help="base URL of an OpenAI-compatible API, e.g. http://host:8000/v1")
    where.add_argument("--model", help="checkpoint (or run) directory: serve it in-process on loopback")
    parser.add_argument(
        "--model-name", default=None, help="model id to request (default: the endpoint's first)"
    )
    parser.add_argument("--api-key", default=None, help="API key (default: $OPENAI_API_KEY, or none)")
    parser.add_argument("--max-turns", type=int, default=10, help="assistant turns over the whole session")
    parser.add_argument("--max-tokens", type=int, default=16_384, help="completion tokens over the session")
    parser.add_argument("--turn-tokens", type=int, default=1024, help="max_tokens of one completion")
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--tool-choice", choices=["auto", "required", "none"], default="auto")
    parser.add_argument("--tools", default=None, help="comma-separated subset of the tools (default: all)")
    parser.add_argument(
        "--transcript", default="openk2-agent.jsonl", help="JSONL file the transcript is appended to"
    )
    parser.add_argument("--discard-workspace", action="store_true", help="remove the workspace at the end")
    parser.add_argument("--quota-mb", type=int, default=256, help="disk quota of the workspace")
    parser.add_argument("--max-seq-len", type=int, default=None, help="with --model: tokens per cache slot")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for one completion")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_in_process(checkpoint: str, max_seq_len: int | None):
    """The project's server app for a checkpoint, on a free loopback port; yields its /v1 base URL."""
    import httpx
    import uvicorn

    from openk2.serve.api import create_app
    from openk2.serve.cli import load_engine

    engine = load_engine(checkpoint, max_batch=1, max_seq_len=max_seq_len, dtype=None)
    port = _free_port()
    app = create_app(engine, Path(checkpoint).resolve().name)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or not thread.is_alive():
                raise SystemExit("error: the in-process server did not come up")
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def _tasks(task: str | None):
    if task is not None:
        yield task
        return
    print("openk2 agent: one task per line; /exit or an empty line ends.", flush=True)
    while True:
        try:
            line = input("\nyou> ")
        except EOFError:
            return
        if not line.strip() or line.strip() == "/exit":
            return
        yield line


def run(args: argparse.Namespace) -> int:
    import openai

    from openk2.agent.loop import Agent, AgentBudget
    from openk2.tools import IsolationUnavailable, require_isolation
    from openk2.tools.toolset import TOOL_SPECS, ToolSession

    names = [n.strip() for n in args.tools.split(",")] if args.tools else None
    unknown = [n for n in names or [] if n not in TOOL_SPECS]
    if unknown:
        raise SystemExit(f"error: unknown tools {unknown}; choose from {', '.join(TOOL_SPECS)}")
    try:
        budget = AgentBudget(args.max_turns, args.max_tokens, args.turn_tokens)
        require_isolation()
    except (ValueError, IsolationUnavailable) as e:
        raise SystemExit(f"error: {e}") from None
    if args.model is not None and not Path(args.model).exists():
        raise SystemExit(f"error: checkpoint {args.model} does not exist")
    server = (
        serve_in_process(args.model, args.max_seq_len)
        if args.model
        else contextlib.nullcontext(args.endpoint)
    )
    transcript = Path(args.transcript)
    with server as base_url:
        key = args.api_key or os.environ.get("OPENAI_API_KEY") or "none"
        client = openai.OpenAI(base_url=base_url, api_key=key, timeout=args.timeout, max_retries=1)
        try:
            model = args.model_name or client.models.list().data[0].id
        except (openai.OpenAIError, IndexError) as e:
            raise SystemExit(f"error: cannot list the models of {base_url}: {e}") from None
        session = ToolSession(quota_mb=args.quota_mb, keep=not args.discard_workspace)
        agent = Agent(client, model, session, budget, names, args.temperature, args.tool_choice)
        status = 0
        try:
            for task in _tasks(args.task):
                try:
                    agent.run(task)
                except openai.OpenAIError as e:
                    agent.state.stopped_by = "error"
                    print(f"\nerror: the endpoint failed: {e}", file=sys.stderr)
                    status = 1
                    break
                if agent.state.stopped_by in ("interrupted", "max_turns", "max_tokens"):
                    break
        except KeyboardInterrupt:
            agent.state.stopped_by = "interrupted"
            print("\n[interrupted]")
        finally:
            session.close()
            if any(m["role"] == "assistant" for m in agent.state.messages):
                transcript.parent.mkdir(parents=True, exist_ok=True)
                record = agent.state.record({"model": model, "workspace": session.path})
                with transcript.open("a") as f:
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")
                print(f"\ntranscript: {transcript}")
            else:
                print("\ntranscript: nothing to save (no assistant turn)")
            where = session.path if not args.discard_workspace else f"{session.path} (removed)"
            print(f"workspace: {where}")
    return status
