"""Checkpoint I/O: the real K2 naming, FP8 block quantisation, and loud failures on bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from openk2 import ModelConfig, Transformer
from openk2.checkpoint import load_model, save_model
from openk2.checkpoint.fp8 import dequantize_block_fp8, fp8_error_bound, quantize_block_fp8
from openk2.checkpoint.hf import CheckpointError, load_weights_


@pytest.fixture()
def tiny_model() -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny")).eval()
    with torch.no_grad():
        for blk in model.layers.values():
            if hasattr(blk.mlp, "gate"):
                blk.mlp.gate.e_score_correction_bias.normal_(0, 0.2)
    return model


@pytest.fixture()
def saved(tiny_model, tmp_path):
    save_model(tiny_model, tmp_path, max_shard_bytes=150_000)
    return tmp_path


def test_names_are_the_real_k2_names(saved):
    names = set(json.loads((saved / "model.safetensors.index.json").read_text())["weight_map"])
    for expected in [
        "model.embed_tokens.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.self_attn.q_a_proj.weight",
        "model.layers.0.self_attn.q_a_layernorm.weight",
        "model.layers.0.self_attn.kv_a_proj_with_mqa.weight",
        "model.layers.0.self_attn.kv_a_layernorm.weight",
        "model.layers.0.self_attn.kv_b_proj.weight",
        "model.layers.0.self_attn.o_proj.weight",
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.1.mlp.gate.weight",
        "model.layers.1.mlp.gate.e_score_correction_bias",
        "model.layers.1.mlp.experts.7.down_proj.weight",
        "model.layers.2.mlp.shared_experts.up_proj.weight",
        "model.norm.weight",
        "lm_head.weight",
    ]:
        assert expected in names
    assert not any("rotary" in n for n in names)
    assert len(list(saved.glob("model-*-of-*.safetensors"))) > 1


def test_round_trip_is_exact(tiny_model, saved):
    loaded = load_model(saved)
    ids = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded(ids), tiny_model(ids))


def test_block_fp8_error_bound_holds():
    torch.manual_seed(0)
    w = torch.randn(300, 200) * torch.logspace(-4, 1, 200)  # columns spanning 5 decades
    q, scale_inv = quantize_block_fp8(w)
    assert q.dtype == torch.float8_e4m3fn and scale_inv.shape == (3, 2)
    err = (dequantize_block_fp8(q, scale_inv) - w).abs()
    assert (err <= fp8_error_bound(w, scale_inv) + 1e-12).all()


def test_fp8_round_trip(tiny_model, tmp_path):
    """Saved as FP8, loaded back: weights obey the per-element e4m3 bound, the loader adds no error of
    its own (identical to quantise-dequantise in memory), and logits move by what that implies."""
    save_model(tiny_model, tmp_path, fp8=True)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == [128, 128]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    key = "model.layers.1.mlp.experts.3.up_proj.weight"
    assert key + "_scale_inv" in index
    with safe_open(str(tmp_path / index[key]), "pt") as f:
        assert f.get_tensor(key).dtype == torch.float8_e4m3fn
    with safe_open(str(tmp_path / index["model.embed_tokens.weight"]), "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16  # config.json's dtype
    with safe_open(str(tmp_path / index["model.layers.1.mlp.gate.weight"]), "pt") as f:
        assert f.get_tensor("model.layers.1.mlp.gate.weight").dtype == torch.bfloat16
        assert f.get_tensor("model.layers.1.mlp.gate.e_score_correction_bias").dtype == torch.float32

    loaded = load_model(tmp_path, dtype=torch.float32)
    reference = Transformer(tiny_model.config)
    reference.load_state_dict(tiny_model.state_dict())
    with torch.no_grad():
        for (name, p), (_, p0) in zip(loaded.named_parameters(), tiny_model.named_parameters()):
            if p.ndim == 2 and name.endswith(("proj.weight", "proj_with_mqa.weight")):
                q, s = quantize_block_fp8(p0)
                assert (p - p0).abs().le(fp8_error_bound(p0, s) + 1e-12).all(), name
                dict(reference.named_parameters())[name].copy_(dequantize_block_fp8(q, s))
            elif p.ndim == 3:  # stacked experts: each expert is its own 2-D matrix
                for e in range(p.shape[0]):
                    q, s = quantize_block_fp8(p0[e])
                    assert (p[e] - p0[e]).abs().le(fp8_error_bound(p0[e], s) + 1e-12).all(), name
                    dict(reference.named_parameters())[name][e].copy_(dequantize_block_fp8(q, s))
            else:  # stored in bfloat16
                assert torch.equal(p, p0.to(torch.bfloat16).float()), name
                dict(reference.named_parameters())[name].copy_(p)
        ids = torch.randint(0, 512, (2, 24))
        got, exact, original = loaded(ids), reference(ids), tiny_model(ids)
    assert (got - exact).abs().max().item() < 1e-6
    # With every weight within 2^-4 relative, logits of this 3-layer model move by a few percent of their
    # scale; we check a 10% bound and keep the observed figure visible in failures.
    rel = ((got - original).norm() / original.norm()).item()
    assert rel < 0.10, rel


def test_missing_shard_names_file_and_tensors(saved):
    victim = sorted(saved.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=rf"{victim.name}.*missing.*model\."):
        load_model(saved)


def test_truncated_file_names_the_file(saved):
    victim = sorted(saved.glob("model-*.safetensors"))[2]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{victim.name}.*truncated"):
        load_model(saved)


def test_wrong_shape_names_file_and_tensor(saved):
    index = json.loads((saved / "model.safetensors.index.json").read_text())["weight_map"]
    key = "model.layers.0.self_attn.o_proj.weight"
    file = saved / index[key]
    with safe_open(str(file), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors[key] = torch.zeros(3, 3)
    save_file(tensors, str(file), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"{file.name}: tensor {key} has shape \(3, 3\)"):
        load_model(saved)


def test_missing_tensor_is_an_error_not_a_partial_load(tiny_model, saved):
    index_path = saved / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    key = "model.layers.2.mlp.experts.5.gate_proj.weight"
    file = saved / index["weight_map"].pop(key)
    with safe_open(str(file), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != key}
    save_file(tensors, str(file), metadata={"format": "pt"})
    index_path.write_text(json.dumps(index))
    target = Transformer(tiny_model.config)
    with pytest.raises(CheckpointError, match=rf"lacks 1 tensors.*{key}"):
        load_weights_(target, saved)


def test_unexpected_tensor_is_reported(saved):
    index_path = saved / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    save_file({"model.layers.0.mlp.bogus.weight": torch.zeros(2)}, str(saved / "extra.safetensors"))
    index["weight_map"]["model.layers.0.mlp.bogus.weight"] = "extra.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(
        CheckpointError, match=r"extra\.safetensors: unexpected tensor model\.layers\.0\.mlp\.bogus"
    ):
        load_model(saved)


def test_export_is_loaded_by_transformers(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    from openk2.checkpoint.export import export
    from openk2.tokenizer import K2Tokenizer

    src = tmp_path / "ckpt"
    save_model(tiny_model, src)
    K2Tokenizer.byte_level().save_pretrained(src)
    out = export(src, tmp_path / "exported", max_shard_bytes=200_000)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors.index.json", "tiktoken.model", "tokenizer_config.json"} <= names
    assert "chat_template" in json.loads((out / "tokenizer_config.json").read_text())
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, 512, (2, 20))
    with torch.no_grad():
        assert (hf(ids).logits - tiny_model(ids)).abs().max().item() < 1e-4
    with pytest.raises(FileExistsError):
        export(src, out)


class _RunsCode:
    """Pickles as a call to a function: what a hostile trainer_state.pt would hold."""

    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_trainer_state_loads_plain_data_only(tmp_path, capsys):
    """Resume reads trainer_state.pt with weights_only: RNG states round-trip (numpy's as a tensor,
    and the numpy arrays of states written before that), and a pickled callable is refused unrun."""
    import random

    import numpy as np

    from openk2.checkpoint.store import STATE_FILE, load_trainer_state, rng_state, set_rng_state

    np.random.seed(1), random.seed(2), torch.manual_seed(3)
    saved = rng_state()
    expected = (np.random.rand(), random.random(), torch.rand(1).item())
    torch.save({"rng": saved, "config": {"lr": 0.02, "tags": ["a", None]}}, tmp_path / STATE_FILE)
    set_rng_state(load_trainer_state(tmp_path)["rng"])
    assert (np.random.rand(), random.random(), torch.rand(1).item()) == expected

    legacy = {"numpy": np.random.get_state(), "torch": torch.get_rng_state(), "python": random.getstate()}
    torch.save({"rng": legacy}, tmp_path / STATE_FILE)
    assert isinstance(load_trainer_state(tmp_path)["rng"]["numpy"][1], np.ndarray)

    torch.save({"optimizer": _RunsCode()}, tmp_path / STATE_FILE)
    with pytest.raises(CheckpointError, match="not plain data"):
        load_trainer_state(tmp_path)
    assert "pickled code ran" not in capsys.readouterr().out
