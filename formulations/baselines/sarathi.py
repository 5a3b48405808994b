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

from formulations.baselines.batching import (
    BlockLedger,
    QueueingBaseline,
    is_started,
    plan_step,
    schedule_in_order,
)
from formulations.plan import Decision, Plan
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


def decode_first_step(
    view: ReplicaView,
    decisions: dict[str, Decision],
    queue: list[RequestState],
    budget: int,
    max_num_seqs: int,
) -> Plan:
    """Stall-free batching: every decoding request first (newest started preempted by recompute
    when memory runs out), then FCFS prefill chunks in what is left of `budget`."""
    ledger = BlockLedger(view)
    started = [s for s in queue if is_started(s)]
    decodes = [s for s in started if s.is_decoding]
    num_tokens, preempted = schedule_in_order(decodes, ledger, budget, max_num_seqs, started)
    left = budget - len(num_tokens)
    fill_prefills(queue, ledger, num_tokens, set(preempted), left, max_num_seqs)
    max_num_decodes = min(budget, max_num_seqs)
    return plan_step(queue, num_tokens, ledger, decisions, preempted, max_num_decodes)


@register("sarathi")
class Sarathi(QueueingBaseline):
    tpot_budget = True

    def schedule(
        self, view: ReplicaView, decisions: dict[str, Decision], queue: list[RequestState]
    ) -> Plan:
        return decode_first_step(
            view, decisions, queue, tpot_budget(view, queue), self.max_num_seqs
        )
