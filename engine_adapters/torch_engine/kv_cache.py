"""The paged KV cache: fixed-size blocks of token slots in one preallocated tensor per layer, a
free list, and a block table per request (nano-vLLM / vLLM style paging, without prefix sharing).

Slot `p` of a request (its p-th token) lives in physical slot
    block_table[p // block_size] * block_size + p % block_size
of the flattened cache, so a request's context is gathered through its block table.
"""

from __future__ import annotations

import torch

from formulations.progress import num_blocks_for

BLOCK_SIZE = 16


class OutOfBlocksError(Exception):
    """Not enough free KV blocks for what a step needs."""


class BlockManager:
    """Free list and block tables. Pure bookkeeping: no tensors."""

    def __init__(self, num_blocks: int, block_size: int = BLOCK_SIZE) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("a KV cache needs at least one block of at least one slot")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() gives low ids first
        self._tables: dict[str, list[int]] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def block_table(self, request_id: str) -> list[int]:
        return self._tables.get(request_id, [])

    def num_blocks_needed(self, request_id: str, num_slots: int) -> int:
        """Blocks to add so that the request's table covers `num_slots` token slots."""
        return max(
            0, num_blocks_for(num_slots, self.block_size) - len(self.block_table(request_id))
        )

    def allocate(self, request_id: str, num_slots: int) -> None:
        needed = self.num_blocks_needed(request_id, num_slots)
        if needed > len(self._free):
            raise OutOfBlocksError(
                f"request {request_id} needs {needed} more KV blocks, {len(self._free)} free"
            )
        table = self._tables.setdefault(request_id, [])
        table.extend(self._free.pop() for _ in range(needed))

    def truncate(self, request_id: str, num_slots: int) -> None:
        """Give back the blocks beyond the first `num_slots` slots (rollback, preemption)."""
        table = self._tables.get(request_id)
        if table is None:
            return
        keep = num_blocks_for(num_slots, self.block_size)
        while len(table) > keep:
            self._free.append(table.pop())
        if not table:
            del self._tables[request_id]

    def free(self, request_id: str) -> None:
        self.truncate(request_id, 0)

    def detach(self, request_id: str) -> list[int]:
        """Take a request's block table away from it without freeing the blocks: the caller owns
        them now (and must `attach` or `release` them)."""
        return self._tables.pop(request_id, [])

    def attach(self, request_id: str, table: list[int]) -> None:
        """Give a request (holding no blocks) a detached table as its first blocks."""
        if request_id in self._tables:
            raise ValueError(f"request {request_id} already holds KV blocks")
        if table:
            self._tables[request_id] = list(table)

    def release(self, table: list[int]) -> None:
        """Free a detached table's blocks."""
        self._free.extend(reversed(table))

    @property
    def num_used_blocks(self) -> int:
        return sum(len(t) for t in self._tables.values())


class PagedKVCache:
    """K and V tensors, [num_layers, num_blocks * block_size, num_kv_heads, head_dim] each."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        num_kv_heads: int,
        head_dim: int,
        block_size: int = BLOCK_SIZE,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        shape = (num_layers, num_blocks * block_size, num_kv_heads, head_dim)
        self.key = torch.zeros(shape, dtype=dtype, device=device)
        self.value = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size

    def write(
        self, layer: int, slots: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> None:
        """Store new K/V ([T, num_kv_heads, head_dim]) into flat slots ([T])."""
        self.key[layer].index_copy_(0, slots, key)
        self.value[layer].index_copy_(0, slots, value)

    def gather(self, layer: int, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V of whole blocks [B, n] -> [B, n * block_size, num_kv_heads, head_dim]."""
        return self._gather(self.key[layer], blocks), self._gather(self.value[layer], blocks)

    def _gather(self, flat: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        paged = flat.view(-1, self.block_size, *flat.shape[1:])  # [num_blocks, block_size, H, D]
        # index_select on whole blocks: several times faster on CPU than per-slot fancy indexing
        gathered = paged.index_select(0, blocks.flatten())  # [B * n, block_size, H, D]
        return gathered.view(blocks.shape[0], -1, *flat.shape[1:])


def num_blocks_for_budget(kv_memory_bytes: int, bytes_per_token: int, block_size: int) -> int:
    """How many blocks fit in a memory budget: budget / (block_size * bytes per token)."""
    return int(kv_memory_bytes // (block_size * bytes_per_token))
