"""The pipelines end to end against the project's own server (`openk2 serve`) on loopback.

The served model is a random `tiny` checkpoint, so almost everything it writes is rejected: the point is
that every stage talks to a real OpenAI-compatible server and that rejection is reported honestly."""

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from serve_util import serve_process

from openk2.checkpoint import save_model
from openk2.config import ModelConfig
from openk2.model.transformer import Transformer
from openk2.tokenizer.tokenizer import K2Tokenizer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    # The tiny architecture with room for the pipelines' prompts (bytes: a tool declaration is ~1.5k).
    cfg = dataclasses.replace(
        ModelConfig.from_preset("tiny"), max_position_embeddings=4096, rope_scaling=None
    )
    save_model(Transformer(cfg), ckpt)
    K2Tokenizer.byte_level().save_pretrained(ckpt)
    with serve_process(ckpt, "--served-model-name", "openk2") as url:
        yield url


def _synth(*args) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [sys.executable, "-m", "openk2.cli", "synth", *args], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_rephrase_and_trajectories_against_openk2_serve(server, tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text(
        json.dumps({"id": "d0", "text": "Water boils at 100 degrees Celsius at sea level."}) + "\n"
    )
    out = _synth("rephrase", "--input", str(docs), "--out", str(tmp_path / "r.jsonl"), "--base-url", server,
                 "--max-tokens", "32", "--concurrency", "2")  # fmt: skip
    assert "requests" in out.stdout and "rephrase: accepted / rejected" in out.stdout
    done = [json.loads(line) for line in (tmp_path / "r.jsonl.done").read_text().splitlines()]
    assert [d["id"] for d in done] == ["d0"]  # judged (almost surely rejected as drift), and recorded

    tools = tmp_path / "tools.jsonl"
    _synth("tools", "--no-synthetic", "--out", str(tools), "--workspace", str(tmp_path))
    out = _synth("trajectories", "--tools", str(tools), "--out", str(tmp_path / "t.jsonl"),
                 "--base-url", server, "--agents", "1", "--tasks-per-agent", "2", "--max-steps", "2",
                 "--agent-max-tokens", "128", "--concurrency", "2")  # fmt: skip
    assert "trajectories: accepted / rejected" in out.stdout
    assert "trajectories: 2 items:" in out.stdout and " 0 failed" in out.stdout
