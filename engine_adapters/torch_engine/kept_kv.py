"""Kept KV: a tool chain's paged KV blocks held between its rounds (docs/AGENTS.md).

When a round of a chain finishes with `retain_kv` "pinned" or "evictable", its block table is
detached from the request and kept under the chain id together with the token ids whose KV those
blocks hold (prompt and output but the last token, whose KV was never computed). The chain's next
round takes the entry and, when its prompt begins with exactly those tokens, starts with the
blocks attached (the engine checks; see TorchEngine._attach). A block belongs to one owner at a
time, the entry or the request, never both: the next round appends into the partly filled last
block without copying it.

- "pinned" entries hold their blocks (not free) until taken or released.
- "evictable" entries count as free, like vLLM's automatic prefix cache: when an allocation needs
  more blocks than are truly free, the least recently kept evictable entries are evicted first
  (their chain ids are collected for the engine's next report).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from engine_adapters.torch_engine.kv_cache import BlockManager


@dataclass(frozen=True, slots=True)
class KeptEntry:
    token_ids: tuple[int, ...]  # the tokens whose KV the blocks hold, positions 0..n-1
    block_table: tuple[int, ...]


class KeptKV:
    """The kept entries of one block manager (the target model's cache)."""

    def __init__(self, blocks: BlockManager) -> None:
        self.blocks = blocks
        self._pinned: dict[str, KeptEntry] = {}
        self._evictable: OrderedDict[str, KeptEntry] = OrderedDict()  # least recently kept first
        self.num_pinned_blocks = 0
        self.num_evictable_blocks = 0
        self._evicted: list[str] = []  # since the last `pop_evicted`

    def keep(self, chain_id: str, request_id: str, token_ids: list[int], pinned: bool) -> None:
        """Detach the finished request's blocks and keep them under the chain id (an older entry
        of the chain is superseded and freed)."""
        self.release(chain_id)
        table = self.blocks.detach(request_id)
        entry = KeptEntry(tuple(token_ids), tuple(table))
        if pinned:
            self._pinned[chain_id] = entry
            self.num_pinned_blocks += len(table)
        else:
            self._evictable[chain_id] = entry
            self.num_evictable_blocks += len(table)

    def take(self, chain_id: str) -> KeptEntry | None:
        """Remove the chain's entry; its blocks are the caller's to attach or release."""
        entry = self._pinned.pop(chain_id, None)
        if entry is not None:
            self.num_pinned_blocks -= len(entry.block_table)
            return entry
        entry = self._evictable.pop(chain_id, None)
        if entry is not None:
            self.num_evictable_blocks -= len(entry.block_table)
        return entry

    def release(self, chain_id: str) -> None:
        """Free the chain's entry (unknown chains are ignored)."""
        entry = self.take(chain_id)
        if entry is not None:
            self.blocks.release(list(entry.block_table))

    def make_room(self, num_blocks: int) -> None:
        """Evict least recently kept evictable entries until `num_blocks` are truly free (or
        nothing evictable is left)."""
        while self.blocks.num_free_blocks < num_blocks and self._evictable:
            chain_id, entry = self._evictable.popitem(last=False)
            self.num_evictable_blocks -= len(entry.block_table)
            self.blocks.release(list(entry.block_table))
            self._evicted.append(chain_id)

    def pop_evicted(self) -> tuple[str, ...]:
        """Chains evicted since the last call (each reported once)."""
        evicted = tuple(self._evicted)
        self._evicted.clear()
        return evicted

    def chains(self) -> dict[str, tuple[int, int]]:
        """Chain id -> (tokens, blocks) of every entry, pinned and evictable."""
        return {
            chain_id: (len(entry.token_ids), len(entry.block_table))
            for chain_id, entry in {**self._pinned, **self._evictable}.items()
        }
