"""The vLLM engine's kept KV of tool chains: a finished round's blocks left in vLLM's prefix cache.

With prefix caching on, vLLM hashes every full KV block by the token prefix it holds; when a
request finishes its blocks go back to the free queue still findable by hash: they count as free
and are reused least recently freed first (a request's tail blocks before its head). A chain's
next round finds the previous round's blocks by hashing its own prompt, so the retention itself is
vLLM's cache. This book adds what the Engine contract needs on top of it (docs/AGENTS.md):

- which prefix each chain left (`KeptPrefix`: the token ids whose KV was computed, prompt and
  output but the last token, and the hashes of its full blocks), so that a count-only next round
  can begin with those tokens and so that evictions can be reported;
- pinning: a "pinned" chain's full blocks get one more reference (`BlockPool.touch`), so they leave
  the free queue and cannot be evicted until the next round holds its own reference to them or the
  planner releases the chain (`BlockPool.free_blocks` then returns them to the cache's LRU, where
  they stay findable until reused);
- evictions: an evictable entry whose first block is no longer cached has nothing left to find; it
  is dropped and reported once (an entry whose tail blocks alone were reused is still there: the
  next round finds the blocks that remain).

vLLM caches whole blocks only: a prefix of n tokens is found as n rounded down to the block size,
and the tokens of the partly filled last block are recomputed (StepReport.kv_found).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# The one KV cache group the planner-driven scheduler supports (scheduler.unsupported_features).
KV_CACHE_GROUP = 0


@dataclass(slots=True)
class KeptPrefix:
    """What a chain's finished round left in the cache."""

    chain_id: str
    token_ids: tuple[int, ...]  # whose KV was computed: prompt and output but the last token
    block_hashes: tuple[Any, ...]  # vLLM's hash of each full block, in order
    pinned: bool
    held_blocks: tuple[Any, ...] = ()  # vLLM KVCacheBlocks this book holds a reference to

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


class KeptPrefixes:
    """Chain id -> its kept prefix, over vLLM's block pool (`BlockPool`)."""

    def __init__(self, block_pool: Any, block_size: int):
        self._pool = block_pool
        self._block_size = block_size
        self._entries: dict[str, KeptPrefix] = {}

    def keep(self, chain_id: str, request: Any, blocks: list[Any], pinned: bool) -> None:
        """`request` (a vLLM Request) finished holding `blocks`; call before vLLM frees them. A
        newer round of the chain supersedes its older entry."""
        self.release(chain_id)
        num_tokens = request.num_computed_tokens
        num_full_blocks = num_tokens // self._block_size
        held = tuple(blocks[:num_full_blocks]) if pinned else ()
        self._pool.touch(held)
        self._entries[chain_id] = KeptPrefix(
            chain_id,
            tuple(request.all_token_ids[:num_tokens]),
            tuple(request.block_hashes[:num_full_blocks]),
            pinned,
            held,
        )

    def take(self, chain_id: str) -> KeptPrefix | None:
        """The chain's entry, for its next round; still holding its blocks until `unpin`."""
        return self._entries.pop(chain_id, None)

    def unpin(self, entry: KeptPrefix) -> None:
        """Drop this book's reference to the entry's blocks (tail first, as vLLM frees a request's
        blocks, so that the head stays cached longest)."""
        self._pool.free_blocks(reversed(entry.held_blocks))
        entry.held_blocks = ()

    def release(self, chain_id: str) -> None:
        entry = self._entries.pop(chain_id, None)
        if entry is not None:
            self.unpin(entry)

    def release_all(self) -> None:
        for chain_id in list(self._entries):
            self.release(chain_id)

    def pop_evicted(self) -> tuple[str, ...]:
        """Chains whose evictable entry lost its first block (dropped here; reported once)."""
        gone = [c for c, e in self._entries.items() if not e.pinned and not self._head_cached(e)]
        for chain_id in gone:
            del self._entries[chain_id]
        return tuple(gone)

    def chains(self) -> dict[str, tuple[int, bool]]:
        """Chain id -> (kept tokens, pinned)."""
        return {c: (e.num_tokens, e.pinned) for c, e in self._entries.items()}

    @property
    def num_held_blocks(self) -> int:
        return sum(len(e.held_blocks) for e in self._entries.values())

    def _head_cached(self, entry: KeptPrefix) -> bool:
        if not entry.block_hashes:
            return False
        return self._pool.get_cached_block(entry.block_hashes[0], [KV_CACHE_GROUP]) is not None
