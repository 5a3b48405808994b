"""Sarathi-Serve (docs/ALGORITHM.md section 8): decode-first stall-free batching with chunked
prefill.

Each step first gives every decoding request its token (in admission order; the newest started
request is preempted by recompute when memory runs out, as in vLLM), then fills the rest of the
token budget with prefill chunks in FCFS order (continuing partial prefills first, since they are
older). The budget is the chunk size Sarathi tunes offline: the largest step whose time meets the
tightest TPOT among the replica's running and waiting requests,

    budget = perf_model.max_tokens(min_r tpot_r)      (the inverse of the step-time model)

so that a step holding any prefill chunk still keeps every decode on time. Admission is by memory
only, as in vLLM (see `batching.admit_by_memory`).
"""

from __future__ import annotations

from typing import ClassVar

from formulations.baselines.batching import (
    BlockLedger,
    plan_step,
    schedule_in_order,
    start_plan,
)
from formulations.interface import Formulation
from formulations.plan import Plan
from formulations.registry import register
from formulations.state import ReplicaView, RequestState


def tpot_budget(view: ReplicaView, queue: list[RequestState]) -> int:
    """Tokens per step that keep the tightest TPOT present (at least one token)."""
    tightest_tpot_s = min(s.request.slo.min_tpot_s for s in queue)
    return max(1, view.perf_model.max_tokens(tightest_tpot_s))


def fill_prefills(
    queue: list[RequestState],
    ledger: BlockLedger,
    num_tokens: dict[str, int],
    skip: set[str],
    budget: int,
    max_num_seqs: int,
) -> None:
    """FCFS prefill chunks (requests not decoding) into the step until the budget is spent; the
    first request whose chunk does not fit in memory stops the queue (no overtaking)."""
    if len(num_tokens) == len(queue):
        return  # everyone is in the step already
    for state in queue:
        if budget <= 0 or len(num_tokens) >= max_num_seqs:
            return
        rid = state.request_id
        if rid in num_tokens or rid in skip or state.is_decoding:
            continue
        n = min(state.num_pending_tokens, budget)
        if not ledger.try_grow(state, n):
            return
        num_tokens[rid] = n
        budget -= n


@register("sarathi")
class Sarathi(Formulation):
    admission_control: ClassVar[bool] = False  # queues whatever fits in memory

    def __init__(self, max_num_seqs: int = 256) -> None:
        if max_num_seqs < 1:
            raise ValueError("max_num_seqs must be positive")
        self.max_num_seqs = max_num_seqs

    def plan(self, view: ReplicaView) -> Plan:
        decisions, queue, decided = start_plan(view, self.max_num_seqs, tpot_budget=True)
        if decided is not None:
            return decided
        budget = tpot_budget(view, queue)
        ledger = BlockLedger(view)
        started = [s for s in queue if s.num_computed_tokens > 0]
        decodes = [s for s in started if s.is_decoding]
        num_tokens, preempted = schedule_in_order(
            decodes, ledger, budget, self.max_num_seqs, started
        )
        left = budget - len(num_tokens)
        fill_prefills(queue, ledger, num_tokens, set(preempted), left, self.max_num_seqs)
        return plan_step(
            queue, num_tokens, ledger, decisions, preempted, min(budget, self.max_num_seqs)
        )
