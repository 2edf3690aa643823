"""Shared by the serving tests: a small random model and a real uvicorn server on 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import torch
import uvicorn

from openk2 import ModelConfig
from openk2.model.transformer import Transformer
from openk2.serve.api import create_app
from openk2.serve.engine import Engine
from openk2.tokenizer.tokenizer import K2Tokenizer

MODEL = "openk2-test"


def tiny_model(seed: int = 0, max_positions: int = 1024) -> Transformer:
    """The `tiny` preset (byte-level vocabulary) with a context long enough for tool declarations."""
    torch.manual_seed(seed)
    config = ModelConfig.from_preset("tiny")
    config.max_position_embeddings = max_positions
    return Transformer(config).eval()


def tiny_engine(max_batch: int = 8, max_seq_len: int = 1024, seed: int = 0) -> Engine:
    return Engine(
        tiny_model(seed, max_seq_len), K2Tokenizer.byte_level(), max_batch=max_batch, max_seq_len=max_seq_len
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn serving `create_app(engine, **app_options)` in a background thread, on a free loopback
    port."""

    def __init__(
        self, engine: Engine, api_key: str | None = None, constrained_tools: bool = True, **app_options
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        app = create_app(engine, MODEL, api_key=api_key, constrained_tools=constrained_tools, **app_options)
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError("server did not start")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@contextlib.contextmanager
def serve_process(checkpoint, *args: str, seconds: float = 120) -> Iterator[str]:
    """`openk2 serve CHECKPOINT ARGS` as a real subprocess on a free loopback port; yields the base URL
    (`http://127.0.0.1:PORT/v1`) once /health answers, and stops the server afterwards."""
    port = free_port()
    cmd = [sys.executable, "-m", "openk2.cli", "serve", str(checkpoint), "--port", str(port)]
    cmd += ["--log-level", "warning", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + seconds
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"openk2 serve exited: {proc.stderr.read()[-3000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError("openk2 serve did not come up")
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
