"""The absorbed MLA cache: per layer and token only [RMSNorm(c_kv) ; rope(k_rope)].

That is kv_lora_rank + qk_rope_head_dim values (576 for K2, 70,272 bytes per token over 61 layers in
bf16) instead of the heads' full keys and values. The pool is one preallocated tensor

    kv (layers, slots, max_seq_len, kv_lora_rank + qk_rope_head_dim)

with one slot per running sequence, so its size is fixed and known at start-up: admission control
is a slot count plus a length check, and there is no allocator to fragment. Running sequences are
kept in slots 0..n-1 (when one finishes, the last one moves into its hole), so a decode step attends
to the plain slice kv[layer, :n, :T] instead of gathering scattered slots every step.
"""

from __future__ import annotations

import torch

from openk2.config import ModelConfig


class ContextLengthError(ValueError):
    """The prompt plus max_tokens do not fit a cache slot (an HTTP 400 for the server)."""


class LatentCache:
    def __init__(
        self,
        config: ModelConfig,
        slots: int,
        max_seq_len: int,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ):
        if slots < 1 or max_seq_len < 2:
            raise ValueError(f"cache needs at least 1 slot and 2 tokens, got {slots} x {max_seq_len}")
        self.slots = slots
        self.max_seq_len = max_seq_len
        self.dim = config.kv_cache_dim
        self.num_layers = config.num_hidden_layers
        self.kv = torch.zeros(self.num_layers, slots, max_seq_len, self.dim, dtype=dtype, device=device)

    @property
    def bytes_per_token(self) -> int:
        """Cache bytes one token occupies across all layers: layers * (r + rope) * element size."""
        return self.num_layers * self.dim * self.kv.element_size()

    @property
    def total_bytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def check_fits(self, prompt_len: int, max_tokens: int) -> None:
        # The last sampled token is never fed back, so a sequence needs prompt + max_tokens - 1 rows.
        if prompt_len < 1:
            raise ValueError("the prompt must hold at least one token")
        if prompt_len + max_tokens - 1 > self.max_seq_len:
            raise ContextLengthError(
                f"this model's context is {self.max_seq_len} tokens; the prompt has {prompt_len} tokens "
                f"and max_tokens is {max_tokens} ({prompt_len + max_tokens} in all). "
                "Shorten the prompt or lower max_tokens."
            )

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` rows of slot src into slot dst, in every layer."""
        if src != dst and length > 0:
            self.kv[:, dst, :length] = self.kv[:, src, :length]
