"""Perplexity in sliding windows: every token scored once, the same figure as one full-context forward
when the text fits, bits per byte from the total NLL, and the CLI on a saved checkpoint."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from eval_util import save_tiny_checkpoint

from openk2.checkpoint import load_model
from openk2.eval import perplexity
from openk2.eval.harness import ResultStore
from openk2.tokenizer.tokenizer import K2Tokenizer


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    save_tiny_checkpoint(path, max_positions=256)
    return path


@pytest.mark.parametrize("n", [2, 3, 7, 64, 65, 200])
@pytest.mark.parametrize("context,stride", [(2, 1), (8, 8), (8, 3), (16, 5), (64, 32)])
def test_windows_score_every_target_once(n, context, stride):
    scored = []
    for w in perplexity.windows(n, context, stride):
        assert w.end - w.begin <= context and w.begin < w.score_from <= w.end
        scored += range(w.score_from, w.end)
    assert scored == list(range(1, n))


def test_windows_reject_bad_sizes():
    with pytest.raises(ValueError):
        perplexity.windows(10, 1, 1)
    with pytest.raises(ValueError):
        perplexity.windows(10, 8, 9)


def test_sliding_equals_one_forward_when_it_fits(ckpt, tmp_path):
    text = "To be, or not to be, that is the question.\n" * 3
    (tmp_path / "held.txt").write_text(text)
    model = load_model(ckpt).eval()
    tok = K2Tokenizer.from_pretrained(ckpt)
    ids = torch.tensor([[tok.bos_id] + tok.encode(text)])
    with torch.no_grad():
        full = F.cross_entropy(model(ids[:, :-1])[0], ids[0, 1:], reduction="sum").item()
    cfg = perplexity.PerplexityConfig(text=str(tmp_path / "held.txt"), chars=10_000, context=256, stride=128)
    result = perplexity.run(str(ckpt), cfg, ResultStore(tmp_path, "perplexity", "tiny", {}), progress=False)
    m = result["metrics"]
    assert m["tokens"] == ids.shape[1] - 1 and m["bytes"] == len(text.encode())
    assert m["nll"] * m["tokens"] == pytest.approx(full, rel=1e-5)
    assert m["bits_per_byte"] == pytest.approx(full / math.log(2) / len(text.encode()), rel=1e-5)
    assert m["ppl"] == pytest.approx(math.exp(m["nll"]))
    # a random model is close to uniform over its 512 ids
    assert 300 < m["ppl"] < 800
    # shorter windows only lose context: the total moves, but every token is still counted
    cfg = perplexity.PerplexityConfig(text=str(tmp_path / "held.txt"), chars=10_000, context=16, stride=4)
    short = perplexity.run(str(ckpt), cfg, ResultStore(tmp_path, "perplexity", "tiny-16", {}), progress=False)
    assert short["metrics"]["tokens"] == m["tokens"]


def test_cli_perplexity_on_corpus_tail(ckpt, tmp_path):
    cmd = [sys.executable, "-m", "openk2.cli", "eval", "perplexity", "--model", str(ckpt), "--text"]
    cmd += ["python-stdlib", "--chars", "3000", "--context", "128", "--out", str(tmp_path), "--no-progress"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "| bits_per_byte" in out.stdout
    (path,) = tmp_path.glob(f"perplexity-{ckpt.name}-*.json")  # label: name + config hash
    saved = json.loads(path.read_text())
    assert saved["metrics"]["bytes"] >= 3000 and saved["context"] == 128 and saved["stride"] == 64
    bad = subprocess.run(
        [sys.executable, "-m", "openk2.cli", "eval", "perplexity", "--endpoint", "http://127.0.0.1:9/v1"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 2 and "needs the weights" in bad.stderr
