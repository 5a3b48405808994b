"""A model with its own paged KV cache and block manager, running ragged forward passes.

The engine owns one for the target model and, with speculative decoding, one for the draft."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine_adapters.torch_engine.kv_cache import BLOCK_SIZE, BlockManager
from engine_adapters.torch_engine.model import LlamaForCausalLM
from engine_adapters.torch_engine.ragged_batch import RaggedBatch, Segment


@dataclass(frozen=True, slots=True)
class Chunk:
    """A request's tokens for one forward pass."""

    request_id: str
    token_ids: Sequence[int]  # the new tokens, at positions num_cached, num_cached + 1, ...
    num_cached: int
    num_logits: int = 0  # logits wanted for the last `num_logits` of them

    @property
    def num_slots(self) -> int:
        return self.num_cached + len(self.token_ids)


class ModelRunner:
    def __init__(
        self, model: LlamaForCausalLM, num_blocks: int, block_size: int = BLOCK_SIZE
    ) -> None:
        self.model = model
        self.blocks = BlockManager(num_blocks, block_size)
        self.cache = model.new_cache(num_blocks, block_size)
        self.device = model.lm_head.weight.device

    @property
    def block_size(self) -> int:
        return self.blocks.block_size

    def num_blocks_needed(self, chunks: Sequence[Chunk]) -> int:
        return sum(self.blocks.num_blocks_needed(c.request_id, c.num_slots) for c in chunks)

    def run(self, chunks: Sequence[Chunk]) -> list[torch.Tensor]:
        """Allocate blocks, write the chunks' K/V and return each chunk's logits
        ([num_logits, vocab] float32; empty when it asked for none)."""
        if not chunks:
            return []
        for chunk in chunks:
            self.blocks.allocate(chunk.request_id, chunk.num_slots)
        segments = [
            Segment(c.num_cached, len(c.token_ids), self.blocks.block_table(c.request_id))
            for c in chunks
        ]
        batch = RaggedBatch.build(segments, self.block_size, self.device)
        input_ids = torch.tensor([t for c in chunks for t in c.token_ids], device=self.device)
        rows, end = [], 0
        for chunk in chunks:
            end += len(chunk.token_ids)
            rows.extend(range(end - chunk.num_logits, end))
        rows_tensor = torch.tensor(rows, dtype=torch.long, device=self.device)
        logits = self.model(input_ids, batch, self.cache, rows_tensor)
        return list(logits.split([c.num_logits for c in chunks]))
