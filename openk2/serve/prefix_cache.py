"""Prefix caching: reuse the latent cache rows of a prompt prefix already computed for an earlier request.

Requests to a chat server share long prefixes: the system prompt and the tool declarations come first
in every conversation, and RL rollouts of one prompt share all of it. A token's cache rows depend only
on the tokens before it, so the rows a finished prefill wrote for a prefix are exactly the rows any
later prompt with that prefix needs; copying them into the new request's slot replaces recomputing
them (a memory copy of `bytes_per_token` per token instead of a forward pass).

Design: a trie of fixed-size blocks.

* A prompt is cut into blocks of `block_size` tokens. Block i is identified by (id of block i-1, the
  block's own tokens): an exact key, compared token by token by the dict, so two different prefixes can
  never share rows (no hash of the whole prefix that could collide). Following keys from the root is a
  walk down a trie whose edges are blocks; the longest cached prefix of a prompt is the walk's end.
* The rows live in one preallocated pool `(layers, blocks, block_size, r + rope)` beside the slot cache,
  so the memory is fixed at start-up (`capacity_tokens` rounded down to whole blocks). A slot gets its
  own copy of the rows (`restore`), so evicting a block never disturbs a running sequence and no block
  needs reference counting.
* Eviction is least-recently-used among leaves: a lookup touches its blocks from the deepest to the
  root, so a parent is always more recent than its children and the oldest block is a leaf (a block is
  never evicted before the blocks that extend it, which would make them unreachable).
* Only whole blocks of the prompt are stored, and at most len(prompt) - 1 tokens are reused: the last
  prompt token is always run through the model, because its logits pick the first new token. A prompt
  that is entirely a cached prefix therefore recomputes one token (up to a block's worth).
* The rows are only valid for the weights that computed them: `clear()` drops everything, and the
  engine's forward calls it whenever the weights change (`CachedForward.refresh`, run by
  `Engine.load_weights`).

Block size trades granularity against bookkeeping: with 16, a shared prefix is reused up to its last
whole block (at most 15 tokens recomputed), and a 4k-token system prompt is 256 dict lookups.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from openk2.serve.cache import LatentCache

DEFAULT_BLOCK_SIZE = 16
_ROOT = -1


class PrefixCache:
    """Latent cache rows of recent prompts' whole blocks, in a fixed pool, found by exact prefix."""

    def __init__(self, cache: LatentCache, capacity_tokens: int, block_size: int = DEFAULT_BLOCK_SIZE):
        if block_size < 1:
            raise ValueError(f"prefix cache block size must be >= 1, got {block_size}")
        if capacity_tokens < block_size:
            raise ValueError(
                f"a prefix cache of {capacity_tokens} tokens holds no block of {block_size}; "
                "give at least one block, or turn the prefix cache off"
            )
        self.cache = cache
        self.block_size = block_size
        self.num_blocks = capacity_tokens // block_size
        kv = cache.kv
        self.pool = torch.zeros(
            kv.shape[0], self.num_blocks, block_size, kv.shape[-1], dtype=kv.dtype, device=kv.device
        )
        self._block: dict[tuple[int, tuple[int, ...]], int] = {}  # (parent block, tokens) -> block
        self._key: list[tuple[int, tuple[int, ...]] | None] = [None] * self.num_blocks
        self._children = [0] * self.num_blocks
        self._lru: OrderedDict[int, None] = OrderedDict()  # used blocks, least recently used first
        self._free = list(range(self.num_blocks - 1, -1, -1))
        self.queried_tokens = 0  # prompt tokens looked up
        self.hit_tokens = 0  # of which restored from the cache
        self.evictions = 0

    # ------------------------------------------------------------------ public
    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def used_blocks(self) -> int:
        return len(self._lru)

    @property
    def hit_rate(self) -> float:
        """Fraction of looked-up prompt tokens whose rows came from the cache (0 before any lookup)."""
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0

    @property
    def total_bytes(self) -> int:
        return self.pool.numel() * self.pool.element_size()

    def restore(self, prompt: list[int], slot: int) -> int:
        """Copy the rows of the prompt's longest cached prefix (at most len(prompt) - 1 tokens) into
        rows 0.. of `slot`; returns how many tokens that covers (0 on a miss)."""
        blocks = self._walk(prompt, (len(prompt) - 1) // self.block_size)
        self.queried_tokens += len(prompt)
        if not blocks:
            return 0
        self._touch(blocks)
        n = len(blocks) * self.block_size
        rows = self.pool[:, blocks]  # (layers, k, block, dim): a gather, copied once more below
        self.cache.kv[:, slot, :n] = rows.reshape(rows.shape[0], n, rows.shape[-1])
        self.hit_tokens += n
        return n

    def store(self, prompt: list[int], slot: int) -> int:
        """Keep the whole blocks of `prompt` whose rows `slot` holds (after its prefill) and the cache
        does not have yet, evicting least-recently-used blocks for room; returns how many blocks were
        added. Stops early rather than evict a block of this prompt's own chain."""
        bs = self.block_size
        full = len(prompt) // bs
        path = self._walk(prompt, full)
        parent = path[-1] if path else _ROOT
        added: list[int] = []
        for i in range(len(path), full):
            block = self._allocate(protect=set(path))
            if block is None:
                break
            key = (parent, tuple(prompt[i * bs : (i + 1) * bs]))
            self._block[key] = block
            self._key[block] = key
            if parent != _ROOT:
                self._children[parent] += 1
            self._lru[block] = None
            path.append(block)
            added.append(block)
            parent = block
        if added:
            first = len(path) - len(added)
            rows = self.cache.kv[:, slot, first * bs : len(path) * bs]
            self.pool[:, added] = rows.reshape(rows.shape[0], len(added), bs, rows.shape[-1])
        self._touch(path)
        return len(added)

    def clear(self) -> None:
        """Forget every cached prefix (the weights changed: the rows are stale). Counters are kept."""
        self._block.clear()
        self._key = [None] * self.num_blocks
        self._children = [0] * self.num_blocks
        self._lru.clear()
        self._free = list(range(self.num_blocks - 1, -1, -1))

    def stats(self) -> dict:
        return {
            "prefix_cache_tokens": self.capacity_tokens,
            "prefix_cache_used_tokens": self.used_blocks * self.block_size,
            "prefix_cache_queried_tokens": self.queried_tokens,
            "prefix_cache_hit_tokens": self.hit_tokens,
            "prefix_cache_hit_rate": self.hit_rate,
            "prefix_cache_evictions": self.evictions,
        }

    # ------------------------------------------------------------------ internals
    def _walk(self, prompt: list[int], max_blocks: int) -> list[int]:
        """Blocks of the longest cached prefix of `prompt`, at most `max_blocks` of them."""
        bs, parent, path = self.block_size, _ROOT, []
        for i in range(max_blocks):
            block = self._block.get((parent, tuple(prompt[i * bs : (i + 1) * bs])))
            if block is None:
                break
            path.append(block)
            parent = block
        return path

    def _touch(self, path: list[int]) -> None:
        """Mark a chain used, deepest first, so every parent ends more recent than its children."""
        for block in reversed(path):
            self._lru.move_to_end(block)

    def _allocate(self, protect: set[int]) -> int | None:
        if self._free:
            return self._free.pop()
        victim = next((b for b in self._lru if self._children[b] == 0 and b not in protect), None)
        if victim is None:
            return None
        key = self._key[victim]
        del self._block[key]
        del self._lru[victim]
        self._key[victim] = None
        if key[0] != _ROOT:
            self._children[key[0]] -= 1
        self.evictions += 1
        return victim
