"""The engine's side of the cached forward: it owns the latent cache and decides where rows go.

The model math (absorbed attention, MoE, norms, rotary embedding, logits) is the model's own, run by
`openk2.model.transformer.LatentForward`. This module adds what only the engine knows about: which
cache slot each sequence uses, writing a prefill's entries into those slots, and writing the rows a
decode step returns. The decode step (`LatentForward.step`) is a pure function of the cache rows it
is given, so `compile=True` can hand it whole to torch.compile: inductor fuses the ~600 small kernels
of a step into a few dozen. One graph serves one running sequence and a second any larger batch and
cache length; both compile at start-up (`warm_up`). docs/serving.md has the measurements.

On CUDA the compiled step also runs as CUDA graphs (torch.compile's "reduce-overhead" mode): one
recorded graph per batch size and cache-length bucket (`GRAPH_BUCKET` rows; the rows past each
sequence's own are masked), replayed with one launch instead of a few dozen kernel launches.
"""

from __future__ import annotations

import torch

from openk2.model.moe import MoE
from openk2.model.transformer import LatentForward, Transformer
from openk2.serve.cache import LatentCache
from openk2.serve.prefix_cache import PrefixCache

GRAPH_BUCKET = 256  # cache rows a CUDA-graph decode step reads are a multiple of this


class CachedForward:
    """Prefill and decode of the whole model against a LatentCache; `compile=True` runs the decode
    step through torch.compile (needs a C++ compiler on CPU). `prefix`, the engine's prefix cache if
    it has one, is cleared whenever `refresh` runs (new weights)."""

    def __init__(
        self,
        model: Transformer,
        cache: LatentCache,
        fold: bool | None = None,
        compile: bool = False,
        prefix: PrefixCache | None = None,
    ):
        self.cache = cache
        self.prefix = prefix  # cleared by refresh(): cached rows are only valid for the same weights
        self.latent = LatentForward(model, cache.max_seq_len, fold)
        self.attn = self.latent.attn
        self.device = self.latent.device
        self._rows = torch.arange(cache.slots, device=self.device) * cache.max_seq_len
        self.compiled = compile
        if compile and any(
            isinstance(b.mlp, MoE) and b.mlp.dispatcher is not None for b in self.latent.blocks
        ):
            raise ValueError("compile=True is for one process; this model's MoE is expert-parallel")
        self.graphs = compile and self.device.type == "cuda"  # CUDA graphs: static shapes per bucket
        mode = "reduce-overhead" if self.graphs else None
        step = self.latent.step
        self._step = torch.compile(step, fullgraph=True, mode=mode) if compile else step

    def refresh(self) -> None:
        """Recompute the absorbed weights after the model's weights changed, and forget every cached
        prefix (its rows were computed with the old weights)."""
        self.latent.refresh()
        if self.prefix is not None:
            self.prefix.clear()

    def prefill(
        self,
        ids: torch.Tensor,
        lengths: torch.Tensor,
        slots: torch.Tensor,
        start: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """ids (B, T) right-padded prompts of `lengths`, written to cache `slots` -> logits (B, V) of
        each prompt's last token. With `start` (B,), row b is the rest of a prompt whose first start[b]
        tokens' rows slot b already holds (a prefix cache hit, see `PrefixCache.restore`): it is run
        from position start[b] against those rows, and written after them."""
        b, t = ids.shape
        kv = self.cache.kv
        first = int(slots[0])
        contiguous = bool((slots == torch.arange(first, first + b, device=slots.device)).all())
        if start is not None and bool((start == 0).all()):
            start = None
        if start is None:

            def store(layer: int, entry: torch.Tensor) -> None:
                if contiguous:
                    kv[layer, first : first + b, :t] = entry
                else:
                    kv[layer, slots, :t] = entry

            return self.latent.prefill(ids, lengths, store)

        width = int(start.max())
        valid = torch.arange(t, device=self.device)[None, :] < lengths[:, None]  # (B, T) real tokens
        rows = (slots * self.cache.max_seq_len + start)[:, None] + torch.arange(t, device=self.device)
        rows = rows[valid]  # flat (slot, position) rows of the real tokens, in entry order
        flat = kv.view(self.cache.num_layers, -1, self.cache.dim)

        def store_after(layer: int, entry: torch.Tensor) -> None:
            flat[layer].index_copy_(0, rows, entry[valid])

        def past(layer: int) -> torch.Tensor:
            return kv[layer, first : first + b, :width] if contiguous else kv[layer, slots, :width]

        return self.latent.prefill(ids, lengths, store_after, start, past)

    def decode(self, tokens: torch.Tensor, pos: torch.Tensor, length: int) -> torch.Tensor:
        """One new token per sequence in cache slots 0..n-1: tokens (n,) at positions pos (n,), the
        longest sequence then being `length` rows -> logits (n, V). Runs the step on the rows already
        written, then writes the new ones."""
        n = tokens.shape[0]
        # The rows written before (T = length - 1), at least two: a dimension of size 1 would make
        # torch.compile specialise a third graph. Rows past a sequence's own are masked anyway.
        rows = max(length - 1, 2)
        if self.graphs:
            rows = min(-(-rows // GRAPH_BUCKET) * GRAPH_BUCKET, self.cache.max_seq_len)
        old = torch.arange(rows, device=self.device)
        allowed = old[None, :] < pos[:, None]  # (n, T): each sequence's own rows
        kv = self.cache.kv[:, :n, : old.shape[0]]
        if self.graphs:  # replayed graphs own their outputs: copy them out before the next replay
            torch.compiler.cudagraph_mark_step_begin()
            logits, entries = (t.clone() for t in self._step(tokens, pos, allowed, kv))
        else:
            if self.compiled:  # one graph for a single sequence, one for any larger batch and length
                batch = ((tokens, 0), (pos, 0), (allowed, 0), (kv, 1)) if n > 1 else ()
                for t, dim in ((kv, 2), (allowed, 1), *batch):
                    torch._dynamo.mark_dynamic(t, dim)
            logits, entries = self._step(tokens, pos, allowed, kv)
        flat = self.cache.kv.view(self.cache.num_layers, -1, self.cache.dim)
        flat.index_copy_(1, self._rows[:n] + pos, entries)  # row of (slot, position) in every layer
        return logits

    def warm_up(self) -> None:
        """Run (and so compile) the decode graphs once on scratch inputs, so that the first requests do
        not wait for the compiler; the rows it writes are overwritten by the next prefill."""
        try:
            for n in (1, 2) if self.cache.slots > 1 else (1,):
                with torch.inference_mode():
                    tokens = torch.zeros(n, dtype=torch.long, device=self.device)
                    self.decode(tokens, torch.full((n,), 2, device=self.device), 3)
        except Exception as e:  # no C++ compiler, an unsupported platform, ...
            if not self.compiled:
                raise
            raise RuntimeError(
                f"torch.compile of the decode step failed ({type(e).__name__}: "
                f"{(str(e).strip().splitlines() or [''])[0][:300]}); "
                "serve without compile (drop --compile), or install a C++ compiler"
            ) from e
