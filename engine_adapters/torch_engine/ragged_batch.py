"""Metadata for one ragged forward pass: many requests' new tokens flattened into one sequence,
each attending to its own cached context through its block table.

Request i contributes tokens at positions [num_cached_i, num_cached_i + num_new_i). Its query at
position p may attend to its keys at positions 0..p (causal within the request, nothing across
requests). Attention runs per group: short segments (decodes, speculative verification) share
padded batches, bucketed by context length; each long segment (a prefill chunk) runs alone, so
one long chunk never pads many decodes to its length. Keys are gathered a whole block at a time.

Built with numpy (one vectorised pass per group, not a loop over tokens): on CPU this metadata is
a visible share of a decode step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
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
    """B segments padded to Q queries and L = num_blocks * block_size keys."""

    query_rows: torch.Tensor  # [B, Q] flat token rows (padding repeats the segment's last row)
    query_valid: torch.Tensor  # [B, Q] bool
    valid_rows: torch.Tensor  # [number of valid queries] = query_rows[query_valid]
    key_blocks: torch.Tensor  # [B, num_blocks] physical blocks (padding: block 0, masked out)
    mask: torch.Tensor | None  # [B, 1, Q, L] bool (True: may attend); None: plain causal, B == 1


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
        cached = np.array([s.num_cached for s in segments], dtype=np.int64)
        new = np.array([s.num_new for s in segments], dtype=np.int64)
        if len(segments) == 0 or new.min() < 1:
            raise ValueError("a forward pass needs segments of at least one token each")
        tables = _padded_tables(segments, block_size)  # [N, max blocks]
        starts = np.concatenate(([0], np.cumsum(new)[:-1]))
        seg_of_row = np.repeat(np.arange(len(segments)), new)  # [T]
        positions = cached[seg_of_row] + np.arange(int(new.sum())) - starts[seg_of_row]
        slots = tables[seg_of_row, positions // block_size] * block_size + positions % block_size
        long = [np.array([i]) for i in np.flatnonzero(new > MAX_SHORT_SEGMENT_TOKENS)]
        groups = [
            _group(idx, cached, new, starts, tables, block_size, device)
            for idx in _short_buckets(cached + new, new) + long
        ]
        return cls(
            torch.from_numpy(positions).to(device),
            torch.from_numpy(slots).to(device),
            tuple(groups),
            int(new.sum()),
        )


def _short_buckets(num_total: np.ndarray, num_new: np.ndarray) -> list[np.ndarray]:
    """Short segments sorted by context length and cut into buckets whose longest context is at
    most twice the shortest (plus a block), so padding at most doubles the keys gathered; one
    decode with a long context does not pad every other decode to its length."""
    short = np.flatnonzero(num_new <= MAX_SHORT_SEGMENT_TOKENS)
    short = short[np.argsort(num_total[short], kind="stable")]
    buckets: list[list[int]] = []
    for i in short.tolist():
        if not buckets or num_total[i] > 2 * num_total[buckets[-1][0]] + 16:
            buckets.append([])
        buckets[-1].append(i)
    return [np.array(bucket) for bucket in buckets]


def _padded_tables(segments: Sequence[Segment], block_size: int) -> np.ndarray:
    width = max(len(s.block_table) for s in segments)
    tables = np.zeros((len(segments), max(width, 1)), dtype=np.int64)
    for i, seg in enumerate(segments):
        if len(seg.block_table) * block_size < seg.num_total:
            num_slots = len(seg.block_table) * block_size
            raise ValueError(f"block table covers {num_slots} slots, {seg.num_total} needed")
        tables[i, : len(seg.block_table)] = seg.block_table
    return tables


def _group(
    idx: np.ndarray,
    cached: np.ndarray,
    new: np.ndarray,
    starts: np.ndarray,
    tables: np.ndarray,
    block_size: int,
    device: torch.device | str,
) -> AttentionGroup:
    cached, new, starts = cached[idx], new[idx], starts[idx]
    num_q = int(new.max())
    num_blocks = int(-(-(cached + new).max() // block_size))
    offset = np.minimum(np.arange(num_q)[None, :], new[:, None] - 1)  # [B, Q] padding repeats last
    query_rows = starts[:, None] + offset
    query_valid = np.arange(num_q)[None, :] < new[:, None]
    # query j of a segment sits at position num_cached + j and sees keys 0..num_cached + j
    query_pos = cached[:, None] + offset  # [B, Q]
    key_pos = np.arange(num_blocks * block_size)  # [L]
    mask = key_pos[None, None, None, :] <= query_pos[:, None, :, None]  # [B, 1, Q, L]
    plain_causal = len(idx) == 1 and cached[0] == 0 and num_blocks * block_size == new[0]
    to = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731
    return AttentionGroup(
        query_rows=to(query_rows),
        query_valid=to(query_valid),
        valid_rows=to(query_rows[query_valid]),
        key_blocks=to(tables[idx, :num_blocks]),
        mask=None if plain_causal else to(mask),
    )
