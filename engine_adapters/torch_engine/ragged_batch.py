"""Metadata for one ragged forward pass: many requests' new tokens flattened into one sequence,
each attending to its own cached context through its block table.

Request i contributes tokens at positions [num_cached_i, num_cached_i + num_new_i). Its query at
position p may attend to its keys at positions 0..p (causal within the request, nothing across
requests). Attention runs per group: all short segments (decodes, speculative verification) share
one padded batch; each long segment (a prefill chunk) runs alone, so one long chunk never pads
many decodes to its length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

# Segments with at most this many new tokens are batched together (padded to the longest).
MAX_SHORT_SEGMENT_TOKENS = 16


@dataclass(frozen=True, slots=True)
class Segment:
    """One request's share of a forward pass."""

    num_cached: int  # tokens already in the KV cache (its context before this pass)
    num_new: int  # tokens this pass computes
    block_table: Sequence[int]

    @property
    def num_total(self) -> int:
        return self.num_cached + self.num_new


@dataclass(frozen=True, slots=True)
class AttentionGroup:
    """B segments padded to Q queries and L keys."""

    query_rows: torch.Tensor  # [B, Q] flat token rows (padding repeats a valid row)
    query_valid: torch.Tensor  # [B, Q] bool
    key_slots: torch.Tensor  # [B, L] flat cache slots (padding points at slot 0)
    mask: torch.Tensor | None  # [B, 1, Q, L] bool (True: may attend); None: plain causal, B == 1

    @property
    def valid_rows(self) -> torch.Tensor:
        return self.query_rows[self.query_valid]  # [num valid queries]


@dataclass(frozen=True, slots=True)
class RaggedBatch:
    positions: torch.Tensor  # [T]
    slots: torch.Tensor  # [T] flat cache slot of each new token
    groups: tuple[AttentionGroup, ...]
    num_tokens: int

    @classmethod
    def build(
        cls, segments: Sequence[Segment], block_size: int, device: torch.device | str
    ) -> RaggedBatch:
        if any(s.num_new < 1 for s in segments):
            raise ValueError("every segment computes at least one token")
        starts, row = [], 0
        for seg in segments:
            starts.append(row)
            row += seg.num_new
        positions = torch.cat([torch.arange(s.num_cached, s.num_total) for s in segments])
        slots = torch.cat([_slots(s, s.num_cached, s.num_total, block_size) for s in segments])
        short = [i for i, s in enumerate(segments) if s.num_new <= MAX_SHORT_SEGMENT_TOKENS]
        long = [i for i, s in enumerate(segments) if s.num_new > MAX_SHORT_SEGMENT_TOKENS]
        groups = [_group([segments[i] for i in idx], [starts[i] for i in idx], block_size, device)
                  for idx in ([short] if short else []) + [[i] for i in long]]
        return cls(positions.to(device), slots.to(device), tuple(groups), row)


def _slots(seg: Segment, begin: int, end: int, block_size: int) -> torch.Tensor:
    pos = torch.arange(begin, end)
    table = torch.as_tensor(list(seg.block_table), dtype=torch.long)
    if len(table) * block_size < end:
        raise ValueError(f"block table covers {len(table) * block_size} slots, {end} needed")
    return table[pos // block_size] * block_size + pos % block_size


def _group(
    segments: list[Segment], starts: list[int], block_size: int, device: torch.device | str
) -> AttentionGroup:
    num_q = max(s.num_new for s in segments)
    num_k = max(s.num_total for s in segments)
    batch = len(segments)
    query_rows = torch.zeros(batch, num_q, dtype=torch.long)
    query_valid = torch.zeros(batch, num_q, dtype=torch.bool)
    key_slots = torch.zeros(batch, num_k, dtype=torch.long)
    mask = torch.zeros(batch, 1, num_q, num_k, dtype=torch.bool)
    for b, (seg, start) in enumerate(zip(segments, starts)):
        query_rows[b] = start  # padded queries repeat the first row; their output is dropped
        query_rows[b, : seg.num_new] = torch.arange(start, start + seg.num_new)
        query_valid[b, : seg.num_new] = True
        key_slots[b, : seg.num_total] = _slots(seg, 0, seg.num_total, block_size)
        # query j sits at position num_cached + j and sees keys 0..num_cached + j
        q_pos = seg.num_cached + torch.arange(num_q).clamp(max=seg.num_new - 1)
        mask[b, 0] = torch.arange(num_k)[None, :] <= q_pos[:, None]
    plain_causal = batch == 1 and segments[0].num_cached == 0
    return AttentionGroup(
        query_rows.to(device),
        query_valid.to(device),
        key_slots.to(device),
        None if plain_causal else mask.to(device),
    )
