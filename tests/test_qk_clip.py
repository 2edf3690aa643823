"""QK-Clip: after a clip, the same input gives max logit <= tau on clipped heads, the other heads'
logits are unchanged, and the shared rope key and the values are untouched."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from openk2 import ModelConfig, Transformer
from openk2.model.mla import MLA
from openk2.model.rope import RotaryEmbedding
from openk2.optim import MuonClip, qk_clip_
from openk2.optim.qk_clip import clip_mla_


def mla_and_input(q_lora_rank):
    cfg = ModelConfig.from_preset("tiny")
    cfg.q_lora_rank = q_lora_rank
    torch.manual_seed(0)
    attn = MLA(cfg)
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.3) if p.ndim == 2 else None
    x = torch.randn(2, 24, cfg.hidden_size)
    cos, sin = RotaryEmbedding(cfg)(torch.arange(24))
    attn.record_max_logits = True
    return attn, x, cos, sin


def all_logits(attn, x, cos, sin):
    """Every head's full pre-softmax score matrix (B, H, S, S), masked entries removed."""
    q_nope, q_rope, latent = attn.project(x, cos, sin)
    c_kv, k_rope = latent.split([attn.kv_lora_rank, attn.rope_dim], dim=-1)
    k_nope = attn.kv_b_proj(c_kv).view(*x.shape[:2], attn.n_heads, -1)[..., : attn.nope_dim]
    s = torch.einsum("bshd,bthd->bhst", q_nope, k_nope) + torch.einsum("bshd,btd->bhst", q_rope, k_rope)
    return s * attn.softmax_scale


@pytest.mark.parametrize("q_lora_rank", [32, None])
def test_clip_caps_clipped_heads_and_leaves_others(q_lora_rank):
    attn, x, cos, sin = mla_and_input(q_lora_rank)
    with torch.no_grad():
        attn(x, cos, sin)
    before = attn.max_logits.clone()
    scores_before = all_logits(attn, x, cos, sin).detach()
    tau = float(before.median())  # some heads above, some below
    over = before > tau
    assert over.any() and (~over).any()
    k_rope_w = attn.kv_a_proj_with_mqa.weight.detach().clone()
    v_rows = attn.kv_b_proj.weight.view(attn.n_heads, -1, attn.kv_lora_rank)[:, attn.nope_dim :].clone()

    assert clip_mla_(attn, before, tau) == int(over.sum())

    with torch.no_grad():
        attn(x, cos, sin)
    after = attn.max_logits
    assert torch.all(after[over] <= tau * (1 + 1e-5)), (after, tau)
    assert torch.allclose(after[over], torch.full_like(after[over], tau), rtol=1e-4)  # exactly gamma * S
    assert torch.equal(after[~over], before[~over])
    scores_after = all_logits(attn, x, cos, sin).detach()
    assert torch.equal(scores_after[:, ~over], scores_before[:, ~over])
    gamma = tau / before[over]
    assert torch.allclose(scores_after[:, over], scores_before[:, over] * gamma.view(1, -1, 1, 1), atol=1e-4)
    assert torch.equal(attn.kv_a_proj_with_mqa.weight, k_rope_w)  # the shared k_rope is untouched
    v_after = attn.kv_b_proj.weight.view(attn.n_heads, -1, attn.kv_lora_rank)[:, attn.nope_dim :]
    assert torch.equal(v_after, v_rows)


def test_no_clip_below_tau():
    attn, x, cos, sin = mla_and_input(32)
    with torch.no_grad():
        attn(x, cos, sin)
    w = attn.q_b_proj.weight.detach().clone()
    assert clip_mla_(attn, attn.max_logits, float(attn.max_logits.max()) + 1) == 0
    assert torch.equal(attn.q_b_proj.weight, w)


def test_optimizer_step_clips_from_the_same_steps_forward():
    """MuonClip.step() clips from the logits recorded in the step's forward and reports the count;
    re-running that forward after the step (1 layer, so the input to attention is the embedding, and
    lr ~0 so only the clip changes the weights) gives logits <= tau."""
    cfg = ModelConfig.from_preset("tiny")
    cfg.num_hidden_layers = 1
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():
        model.layers["0"].self_attn.q_b_proj.weight.mul_(60)
        model.layers["0"].self_attn.kv_b_proj.weight.mul_(60)
    model.record_stats(True)
    ids = torch.randint(0, cfg.vocab_size, (2, 32))
    logits = model(ids[:, :-1])
    before = model.max_attention_logits()[0].clone()
    tau = float(before.min() + before.max()) / 2
    F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
    opt = MuonClip(model, lr=1e-12, weight_decay=0.0, qk_clip_tau=tau)
    n = opt.step()
    assert n == int((before > tau).sum()) > 0
    assert opt.last_clipped == {0: n}
    assert model.max_attention_logits() == {}  # consumed: a later step cannot clip on stale numbers
    assert opt.step() == 0
    with torch.no_grad():
        model(ids[:, :-1])
    after = model.max_attention_logits()[0]
    assert torch.all(after <= tau * (1 + 1e-4))
    assert torch.allclose(after[before <= tau], before[before <= tau], rtol=1e-5)


def test_qk_clip_full_model_with_given_maxima():
    torch.manual_seed(1)
    model = Transformer(ModelConfig.from_preset("tiny"))
    h = model.config.num_attention_heads
    fake = {0: torch.full((h,), 50.0), 2: torch.tensor([1.0] * (h - 1) + [200.0])}
    w0 = model.layers["0"].self_attn.q_b_proj.weight.detach().clone()
    w1 = model.layers["1"].self_attn.q_b_proj.weight.detach().clone()
    per_layer: dict[int, int] = {}
    assert qk_clip_(model, 100.0, fake, per_layer=per_layer) == 1
    assert per_layer == {0: 0, 2: 1}
    assert torch.equal(model.layers["0"].self_attn.q_b_proj.weight, w0)
    assert torch.equal(model.layers["1"].self_attn.q_b_proj.weight, w1)
    with pytest.raises(ValueError, match="tau"):
        qk_clip_(model, 0.0)
