"""Soft admission with a best-effort tier (docs/ALGORITHM.md section 6).

Requests the DP cannot guarantee are either REJECTED (the router may forward them to another
replica) or served BEST_EFFORT: from the step budget and KV memory that admitted work leaves. An
admitted request reserves its peak KV (prompt plus full output); best-effort requests hold only what
they have computed. When admitted reservations plus best-effort holdings exceed the replica, the
most
recently arrived best-effort requests are preempted (their KV is dropped and recomputed later), so
admitted work always has its memory. Best-effort requests are never dropped: a preempted one keeps
its output and is recomputed once memory frees up.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from formulations.plan import Verdict
from formulations.state import RequestState


class Fallback(enum.Enum):
    """What happens to a request the planner cannot guarantee."""

    REJECT = "reject"
    BEST_EFFORT = "best_effort"

    @property
    def verdict(self) -> Verdict:
        return Verdict.REJECTED if self is Fallback.REJECT else Verdict.BEST_EFFORT

    @classmethod
    def parse(cls, value: str | Fallback) -> Fallback:
        if isinstance(value, Fallback):
            return value
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"fallback must be 'reject' or 'best_effort', got {value!r}") from None


@dataclass(frozen=True, slots=True)
class BestEffortMemory:
    preempt: tuple[str, ...]  # best-effort requests whose KV is dropped now
    headroom_blocks: int  # blocks best-effort work may still grow into
    oldest_id: str | None = None  # the best-effort request whose full growth is kept free
    oldest_need_blocks: int = 0  # blocks it still needs to finish (others may not take them)


def best_effort_memory(
    best_effort: Sequence[RequestState],
    admitted_peak_blocks: int,
    num_total_blocks: int,
    block_size: int,
) -> BestEffortMemory:
    """Preempt the latest-arrived best-effort requests until admitted peaks plus best-effort
    holdings fit the replica, and until the oldest best-effort request can grow to its full
    length; the rest of the memory is the best-effort headroom."""
    held = sum(s.num_blocks for s in best_effort)
    preempt: list[str] = []
    by_recency = sorted(best_effort, key=lambda s: (-s.request.arrival_s, s.request_id))
    for state in by_recency:
        if admitted_peak_blocks + held <= num_total_blocks:
            break
        if state.num_blocks > 0:
            preempt.append(state.request_id)
            held -= state.num_blocks
    headroom = max(0, num_total_blocks - admitted_peak_blocks - held)
    # Liveness: the oldest best-effort request must be able to grow to its full length, or best
    # effort could deadlock with every request holding part of the memory. Newer ones make room.
    kept = [s for s in best_effort if s.request_id not in preempt]
    oldest_id, need = None, 0
    if kept:
        oldest = min(kept, key=lambda s: (s.request.arrival_s, s.request_id))
        need = oldest.num_peak_blocks(block_size) - oldest.num_blocks
        for state in sorted(kept, key=lambda s: (-s.request.arrival_s, s.request_id)):
            if headroom >= need or state is oldest:
                break
            if state.num_blocks > 0:
                preempt.append(state.request_id)
                headroom += state.num_blocks
        oldest_id = oldest.request_id
    return BestEffortMemory(tuple(preempt), headroom, oldest_id, max(0, need))
