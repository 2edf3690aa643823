"""The K2 / DeepSeek-V3 decoder: embeddings, `num_hidden_layers` blocks of MLA + (dense MLP or MoE),
final RMSNorm and an untied LM head.

Module names match the Hugging Face checkpoint (minus its `model.` prefix), so the checkpoint code only
has to split the stacked expert tensors into per-expert keys. Layers live in a ModuleDict keyed by
their global index, and `forward` skips a missing embedding or head: pipeline parallelism can delete
modules from a copy of the model without renaming anything (the torchtitan pattern).

`LatentForward` runs the same model against a latent cache for inference (prefill and one-token
decode steps): each layer's attention absorbed (`mla.LatentAttention`), everything else through the
modules the training forward uses (`Block.feed_forward`, `Transformer.logits`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from openk2.config import ModelConfig
from openk2.model.layers import MLP, RMSNorm, linear
from openk2.model.mla import MLA, LatentAttention, attention_bias
from openk2.model.moe import MoE
from openk2.model.rope import RotaryEmbedding
from openk2.model.size import count_parameters


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MLA(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.is_moe_layer(layer_id):
            self.mlp = MoE(config)
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None):
        return self.feed_forward(x + self.self_attn(self.input_layernorm(x), cos, sin, mask))

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block's second half, after attention: x + MLP-or-MoE(RMSNorm(x))."""
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config.validate()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rotary = RotaryEmbedding(config)
        self.layers = nn.ModuleDict({str(i): Block(config, i) for i in range(config.num_hidden_layers)})
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.init_weights()

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids (B, S) -> logits (B, S, vocab).

        segment_ids (B, S): packed documents; attention stays inside a segment and positions restart
        at each segment unless given. (Under pipeline parallelism a stage without the embedding takes
        hidden states (B, S, D) instead, and one without the head returns hidden states.)
        """
        x = self.embed_tokens(input_ids) if self.embed_tokens is not None else input_ids
        b, s = x.shape[:2]
        if positions is None and segment_ids is not None:
            positions = segment_positions(segment_ids)
        elif positions is None:
            positions = torch.arange(s, device=x.device)
        cos, sin = self.rotary(positions)
        mask = None
        if segment_ids is not None:
            causal = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
            mask = (segment_ids.unsqueeze(-1) == segment_ids.unsqueeze(-2)) & causal
            mask = mask.unsqueeze(1)  # (B, 1, S, S)
        for layer in self.layers.values():
            x = layer(x, cos, sin, mask)
        return self.logits(x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Final RMSNorm and LM head: hidden states (..., D) -> logits (..., vocab). A pipeline stage
        without them passes x through."""
        if self.norm is not None:
            x = self.norm(x)
        return linear(x, self.lm_head.weight, self.lm_head.bias) if self.lm_head is not None else x

    # ------------------------------------------------------------------ statistics for the optimizer
    def record_stats(self, enabled: bool = True) -> None:
        """Record per-head max attention logits (QK-Clip) and the sequence-wise aux loss in each forward."""
        for m in self.modules():
            if isinstance(m, MLA):
                m.record_max_logits = enabled
            elif isinstance(m, MoE):
                m.compute_aux_loss = enabled

    def max_attention_logits(self) -> dict[int, torch.Tensor]:
        """Layer id -> per-head max pre-softmax logit (H,) from the last forward that recorded them."""
        return {
            int(i): blk.self_attn.max_logits
            for i, blk in self.layers.items()
            if blk.self_attn.max_logits is not None
        }

    def expert_counts(self) -> dict[int, torch.Tensor]:
        """Layer id -> tokens routed to each expert (E,) in the last forward."""
        return {
            int(i): blk.mlp.expert_counts
            for i, blk in self.layers.items()
            if isinstance(blk.mlp, MoE) and blk.mlp.expert_counts is not None
        }

    def aux_loss(self) -> torch.Tensor:
        losses = [
            blk.mlp.aux_loss
            for blk in self.layers.values()
            if isinstance(blk.mlp, MoE) and blk.mlp.aux_loss is not None
        ]
        return torch.stack(losses).sum() if losses else torch.zeros(())

    # ------------------------------------------------------------------ initialisation
    @torch.no_grad()
    def init_weights(self, std: float | None = None) -> None:
        """Normal(0, initializer_range) for matrices, output projections scaled by 1/sqrt(2 * layers)
        (GPT-2 style, keeps the residual stream's variance flat with depth), ones for norms."""
        std = std or self.config.initializer_range
        out_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        for name, p in self.named_parameters():
            if p.ndim == 1:
                nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj")):
                nn.init.normal_(p, std=out_std)
            else:
                nn.init.normal_(p, std=std)
        for m in self.modules():
            if isinstance(m, MoE):
                m.gate.e_score_correction_bias.zero_()
        self.rotary.reset_parameters(self.config)

    # ------------------------------------------------------------------ sizes
    def num_parameters(self, activated: bool = False) -> int:
        counts = count_parameters(self.config)
        return counts.activated if activated else counts.total


def segment_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """Position of each token inside its segment: 0 at every segment start."""
    b, s = segment_ids.shape
    idx = torch.arange(s, device=segment_ids.device).expand(b, s)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return idx - torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values


class LatentForward:
    """The model run against a latent cache (inference): `prefill` a batch of prompts, or `step` one
    new token per sequence.

    The cache tensor belongs to the caller (openk2/serve/forward.py): `prefill` hands each layer's new
    entries to `store`, and `step` is a pure function of the cache rows it is given that returns the
    new rows for the caller to write, so that it can be handed whole to torch.compile. Call `refresh()`
    after the model's weights change (the absorbed attention weights are derived from them).
    """

    def __init__(self, model: Transformer, max_seq_len: int, fold: bool | None = None):
        self.model = model
        self.blocks: list[Block] = list(model.layers.values())
        self.attn = [LatentAttention(blk.self_attn, fold) for blk in self.blocks]
        self.heads = model.config.num_attention_heads
        p = model.lm_head.weight
        self.device, self.dtype = p.device, p.dtype
        # rotations for every cache position, looked up instead of recomputed each step
        self.cos, self.sin = model.rotary(torch.arange(max_seq_len, device=self.device))

    def refresh(self) -> None:
        """Recompute the absorbed weights after the model's weights changed."""
        for a in self.attn:
            a.refresh()

    def prefill(
        self,
        ids: torch.Tensor,
        lengths: torch.Tensor,
        store: Callable[[int, torch.Tensor], None],
        start: torch.Tensor | None = None,
        past: Callable[[int], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """ids (B, T) right-padded prompts of `lengths` -> logits (B, V) of each prompt's last token;
        store(layer, entries (B, T, r + rope)) is called once per layer.

        Without `start` the prompts begin at position 0. With it (a prefix cache hit), row b continues
        a prefix of start[b] tokens whose cache rows past(layer) returns as (B, P, r + rope), P >=
        max(start) (the columns from start[b] on are ignored): ids are then each prompt's rest, at
        positions start[b].., attending to its prefix's rows and causally to its own."""
        b, t = ids.shape
        pos = torch.arange(t, device=self.device)
        allowed = (pos[None, None, :] <= pos[None, :, None]) & (pos[None, None, :] < lengths[:, None, None])
        if start is None:
            cos, sin = self.cos[:t], self.sin[:t]
        else:
            # padding past the table's end takes its last rotation (its rows are never used)
            positions = (start[:, None] + pos).clamp_max(self.cos.shape[0] - 1)
            cos, sin = self.cos[positions], self.sin[positions]
        x = self.model.embed_tokens(ids)
        bias = None
        for layer, (blk, attn) in enumerate(zip(self.blocks, self.attn)):
            q, entry = attn.project(blk.input_layernorm(x), cos, sin)
            store(layer, entry)
            keys = entry
            if past is not None:
                old = past(layer)
                keys = torch.cat((old, entry), dim=1)
                if bias is None:
                    own = torch.arange(old.shape[1], device=self.device)[None, :] < start[:, None]
                    allowed = torch.cat((own[:, None, :].expand(b, t, -1), allowed), dim=-1)
            if bias is None:
                bias = attention_bias(allowed, self.heads, self.dtype)
            x = blk.feed_forward(x + attn.attend(q, keys, bias, t))
        return self.model.logits(x[torch.arange(b, device=self.device), lengths - 1])

    def step(
        self, tokens: torch.Tensor, pos: torch.Tensor, allowed: torch.Tensor, kv: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode step as a pure function: tokens (n,) at positions pos (n,), the cache rows written
        before (layers, n, T, r + rope), of which allowed (n, T) are each sequence's -> logits (n, V)
        and the new rows (layers, n, r + rope)."""
        bias = attention_bias(allowed.unsqueeze(1), self.heads, self.dtype)  # (n, 1, T), for all heads
        cos, sin = self.cos[pos][:, None], self.sin[pos][:, None]  # (n, 1, rope/2)
        x = self.model.embed_tokens(tokens.unsqueeze(1))  # (n, 1, D)
        entries = []
        for layer, (blk, attn) in enumerate(zip(self.blocks, self.attn)):
            # queries (n, H, r + rope), entry (n, 1, r + rope)
            q, entry = attn.project(blk.input_layernorm(x), cos, sin)
            entries.append(entry[:, 0])
            x = blk.feed_forward(x + attn.attend_new(q, entry[:, 0], kv[layer], bias))
        return self.model.logits(x[:, 0]), torch.stack(entries)
