"""The model against the reference: transformers' DeepseekV3ForCausalLM (pinned 5.23.0), both directions."""

from __future__ import annotations

import json
import re

import pytest
import torch

from openk2 import ModelConfig, Transformer
from openk2.checkpoint import load_model, save_model
from openk2.model.size import count_parameters, kv_cache_bytes_per_token
from openk2.model.transformer import LatentForward

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402

YARN = {
    "rope_type": "yarn",
    "rope_theta": 50000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 32,
    "beta_fast": 1.0,
    "beta_slow": 1.0,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}
DEFAULT_ROPE = {"rope_type": "default", "rope_theta": 10000.0}

# Small configs covering every routing/attention variant the issue names.
CASES = {
    "yarn-group-limited": dict(n_group=4, topk_group=2, first_k_dense_replace=1, rope_parameters=YARN),
    "no-yarn-all-moe": dict(n_group=1, topk_group=1, first_k_dense_replace=0, rope_parameters=DEFAULT_ROPE),
    "two-dense-layers": dict(n_group=2, topk_group=1, first_k_dense_replace=2, rope_parameters=YARN),
    "full-rank-q": dict(
        n_group=1, topk_group=1, first_k_dense_replace=1, q_lora_rank=None, rope_parameters=YARN
    ),
}


def hf_config(**overrides) -> DeepseekV3Config:
    base = dict(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_shared_experts=1,
        n_routed_experts=8,
        num_experts_per_tok=3,
        routed_scaling_factor=2.827,
        q_lora_rank=32,
        kv_lora_rank=24,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=12,
        max_position_embeddings=256,
        num_mtp_layers=0,
        tie_word_embeddings=False,
    )
    base.update(overrides)
    return DeepseekV3Config(**base)


@torch.no_grad()
def random_hf_model(config: DeepseekV3Config, seed: int = 0) -> DeepseekV3ForCausalLM:
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(config).eval()
    for p in model.parameters():
        if p.ndim > 1:
            p.normal_(0, 0.08)
        else:
            p.uniform_(0.8, 1.2)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.normal_(0, 0.3)  # nonzero: selection must use it, combine weights must not
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_to_openk2_logits_match(case, tmp_path):
    hf = random_hf_model(hf_config(**CASES[case]))
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(ids).logits
        got = ours(ids)
        ours.record_stats(True)  # the explicit-logits attention path used for QK-Clip must agree too
        got_eager = ours(ids)
    assert got.shape == (2, 40, 300)
    assert (got - want).abs().max().item() < 1e-4
    assert (got_eager - want).abs().max().item() < 1e-4


@pytest.mark.parametrize("rope_format", ["legacy", "parameters"])
def test_openk2_to_transformers_logits_match(rope_format, tmp_path):
    cfg = ModelConfig.from_preset("tiny")
    cfg.model_type = "deepseek_v3"
    torch.manual_seed(0)
    ours = Transformer(cfg).eval()
    with torch.no_grad():
        for blk in ours.layers.values():
            if hasattr(blk.mlp, "gate"):
                blk.mlp.gate.e_score_correction_bias.normal_(0, 0.3)
    save_model(ours, tmp_path, max_shard_bytes=100_000)
    if rope_format == "parameters":  # rewrite config.json in the transformers-5 form
        cfg.save_pretrained(tmp_path, rope_format="parameters")
    assert len(json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    hf = DeepseekV3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max().item() < 1e-4


def test_segment_ids_isolate_packed_documents():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny")).eval()
    a = torch.randint(0, 512, (1, 10))
    b = torch.randint(0, 512, (1, 14))
    packed = torch.cat([a, b], dim=1)
    seg = torch.tensor([[0] * 10 + [1] * 14])
    with torch.no_grad():
        out = model(packed, segment_ids=seg)
        assert torch.allclose(out[:, :10], model(a), atol=1e-5)
        assert torch.allclose(out[:, 10:], model(b), atol=1e-5)


@pytest.mark.parametrize("fold", [True, False])
def test_latent_cache_decode_equals_training_forward(fold):
    """The inference path (`LatentForward`: absorbed attention against a cache of c_kv + k_rope only,
    W_uk/W_uv folded or not) gives the training forward's logits: a prefill of right-padded prompts
    of two lengths, then decode steps that each read the rows written so far, batched and alone."""
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny")
    model = Transformer(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    lengths = torch.tensor([7, 5])
    latent = LatentForward(model, max_seq_len=16, fold=fold)
    kv = torch.zeros(cfg.num_hidden_layers, 2, 16, cfg.kv_cache_dim)

    def store(layer: int, entry: torch.Tensor) -> None:
        kv[layer, :, : entry.shape[1]] = entry

    with torch.no_grad():
        want = model(ids)  # causal: position p's logits depend on ids[:, : p + 1] only
        got = latent.prefill(ids[:, :7], lengths, store)
        torch.testing.assert_close(got, want[[0, 1], lengths - 1], atol=1e-4, rtol=1e-4)
        pos = lengths.clone()
        for _ in range(4):
            allowed = torch.arange(11)[None, :] < pos[:, None]
            logits, entries = latent.step(ids[[0, 1], pos], pos, allowed, kv[:, :, :11])
            kv[:, [0, 1], pos] = entries
            torch.testing.assert_close(logits, want[[0, 1], pos], atol=1e-4, rtol=1e-4)
            pos += 1
        # one sequence alone (its MoE layers loop over the token's experts on the host)
        allowed = torch.arange(11)[None, :] < pos[:1, None]
        logits, _ = latent.step(ids[:1, 11], pos[:1], allowed, kv[:, :1, :11])
        torch.testing.assert_close(logits, want[:1, 11], atol=1e-4, rtol=1e-4)
    assert kv.shape[-1] == 32 + 8  # kv_lora_rank + qk_rope_head_dim per token and layer


def test_router_bias_selects_but_does_not_weight():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny")).eval()
    gate = model.layers["1"].mlp.gate
    x = torch.randn(5, 64)
    with torch.no_grad():
        gate.e_score_correction_bias.zero_()
        gate.e_score_correction_bias[7] = 10.0  # forces expert 7 into every token's top-k
        weights, ids, scores = gate(x)
    assert (ids == 7).any(dim=-1).all()
    chosen = scores.gather(1, ids)
    expected = chosen / chosen.sum(-1, keepdim=True) * gate.scaling
    assert torch.allclose(weights, expected)


def test_forward_exposes_max_logits_and_expert_counts():
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny")
    model = Transformer(cfg)
    model.record_stats(True)
    ids = torch.randint(0, 512, (3, 16))
    model(ids)
    logits = model.max_attention_logits()
    assert set(logits) == {0, 1, 2} and all(v.shape == (4,) for v in logits.values())
    counts = model.expert_counts()
    assert set(counts) == {1, 2}
    assert all(int(c.sum()) == 3 * 16 * cfg.num_experts_per_tok for c in counts.values())
    # The recorded maxima are the real maxima of the attention logits of layer 0.
    attn = model.layers["0"].self_attn
    with torch.no_grad():
        x = model.layers["0"].input_layernorm(model.embed_tokens(ids))
        cos, sin = model.rotary(torch.arange(16))
        q_nope, q_rope, latent = attn.project(x, cos, sin)
        c, k_rope = latent.split([attn.kv_lora_rank, attn.rope_dim], -1)
        k_nope = attn.kv_b_proj(c).view(3, 16, 4, -1)[..., : attn.nope_dim]
        s = torch.einsum("bshd,bthd->bhst", q_nope, k_nope) + torch.einsum("bshd,btd->bhst", q_rope, k_rope)
        s = (s * attn.softmax_scale).masked_fill(~torch.ones(16, 16, dtype=torch.bool).tril(), -1e9)
    assert torch.allclose(logits[0], s.amax(dim=(0, 2, 3)), atol=1e-5)


def test_kimi_k2_preset_on_meta_device():
    cfg = ModelConfig.from_preset("kimi-k2")
    with torch.device("meta"):
        model = Transformer(cfg)
    n = sum(p.numel() for p in model.parameters()) + sum(
        b.numel() for n_, b in model.named_buffers() if "bias" in n_
    )
    assert n == 1_026_408_232_448
    counts = count_parameters(cfg)
    assert counts.total == 1_026_408_232_448
    assert counts.activated == 32_861_477_888
    assert kv_cache_bytes_per_token(cfg) == {"mla_latent": 70_272, "multi_head": 2_498_560}
    assert model.layers["3"].mlp.experts.gate_proj.shape == (384, 2048, 7168)


def test_config_round_trip_both_rope_forms(tmp_path):
    cfg = ModelConfig.from_preset("kimi-k2")
    for fmt in ("legacy", "parameters"):
        cfg.save_pretrained(tmp_path, rope_format=fmt)
        raw = json.loads((tmp_path / "config.json").read_text())
        assert ("rope_parameters" in raw) == (fmt == "parameters")
        back = ModelConfig.from_pretrained(tmp_path)
        assert back.rope_scaling == cfg.rope_scaling and back.rope_theta == 50000.0
        assert back.to_hf_dict() == cfg.to_hf_dict()
    # transformers itself reads what we write
    cfg.model_type = "deepseek_v3"
    cfg.save_pretrained(tmp_path)
    hc = DeepseekV3Config.from_pretrained(tmp_path)
    assert hc.rope_parameters["factor"] == 32.0 and hc.rope_parameters["rope_theta"] == 50000.0
    assert hc.n_routed_experts == 384 and hc.routed_scaling_factor == 2.827


def test_unknown_model_type_names_the_file(tmp_path):
    cfg = ModelConfig.from_preset("tiny").to_hf_dict()
    cfg["model_type"] = "llama"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config\.json.*unknown model_type 'llama'"):
        load_model(tmp_path)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("hidden_size", "64", "hidden_size must be an integer, got '64'"),
        ("num_attention_heads", 0, "num_attention_heads must be at least 1"),
        ("n_routed_experts", -8, "n_routed_experts must be non-negative"),
        ("rms_norm_eps", "tiny", "rms_norm_eps must be a finite number"),
        ("tie_word_embeddings", 1, "tie_word_embeddings must be true or false"),
    ],
)
def test_config_values_of_the_wrong_kind_name_the_field(tmp_path, key, value, message):
    """A hand-edited config.json with a string, zero or negative size fails at load with the field's
    name, not deep inside torch."""
    cfg = ModelConfig.from_preset("tiny").to_hf_dict()
    cfg[key] = value
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=re.escape(message)):
        ModelConfig.from_pretrained(tmp_path)
