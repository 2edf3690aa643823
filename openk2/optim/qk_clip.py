"""QK-Clip: cap each attention head's largest logit by rescaling its query and key weights.

After the optimizer step, for every head h whose largest pre-softmax logit in that step's forward,
S_h, exceeded tau, set gamma_h = tau / S_h and shrink the weights that produce head h's logits so the
same inputs would now give gamma_h * S_h = tau. MLA splits each head's logit into two parts:

    logit = scale * (q_nope . k_nope + q_rope . k_rope)

q_nope and k_nope are per-head rows of q_b_proj (or q_proj) and kv_b_proj: scale both by
sqrt(gamma_h). q_rope is per head too: scale it by gamma_h. k_rope is one key shared by every head
(in kv_a_proj_with_mqa), so touching it would change the other heads; it is left alone. Both terms
then shrink by exactly gamma_h. Heads at or below tau are untouched, and the step's forward/backward
is unaffected (the clip acts on the weights after the update). The values (v rows of kv_b_proj) are
not scaled.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def clip_mla_(attn: nn.Module, max_logits: torch.Tensor, tau: float) -> int:
    """Clip one MLA module given its per-head max logits (H,); returns the number of heads clipped."""
    over = max_logits > tau
    n = int(over.sum())
    if n == 0:
        return 0
    gamma = torch.where(over, tau / max_logits.clamp_min(tau), torch.ones_like(max_logits)).float()
    q_proj = attn.q_proj if attn.q_lora_rank is None else attn.q_b_proj
    h, nope, rope = attn.n_heads, attn.nope_dim, attn.rope_dim
    wq = q_proj.weight.view(h, nope + rope, -1)
    wq[:, :nope].mul_(gamma.sqrt().view(h, 1, 1).to(wq.dtype))
    wq[:, nope:].mul_(gamma.view(h, 1, 1).to(wq.dtype))
    wkv = attn.kv_b_proj.weight.view(h, nope + attn.v_dim, -1)
    wkv[:, :nope].mul_(gamma.sqrt().view(h, 1, 1).to(wkv.dtype))
    return n


@torch.no_grad()
def qk_clip_(
    model: nn.Module,
    tau: float = 100.0,
    max_logits: dict[int, torch.Tensor] | None = None,
    per_layer: dict[int, int] | None = None,
) -> int:
    """Apply QK-Clip to every attention layer of `model`; returns the total number of heads clipped.

    max_logits: layer -> per-head max logit (H,) over the whole step (under gradient accumulation the
    caller takes the max over micro-batches). By default they are read from the model's last forward
    (`model.record_stats(True)`) and consumed, so a later step without a recording cannot clip again on
    stale numbers. `per_layer`, when given, receives layer -> heads clipped."""
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}")
    if max_logits is None:
        max_logits = model.max_attention_logits()
        for layer in max_logits:
            model.layers[str(layer)].self_attn.max_logits = None
    total = 0
    for layer, logits in max_logits.items():
        attn = model.layers[str(layer)].self_attn
        n = clip_mla_(attn, logits.to(attn.kv_b_proj.weight.device), tau)
        if per_layer is not None:
            per_layer[layer] = n
        total += n
    return total
