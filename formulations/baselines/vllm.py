"""vLLM-style baselines (docs/ALGORITHM.md section 8): admission by memory only, FCFS, one step per
plan.

`vllm_fcfs` follows the vLLM v1 scheduler with chunked prefill: a fixed token budget
`max_num_batched_tokens` per step; first the requests that have started (decodes and continuing
partial prefills), in admission order, each taking min(pending, budget left); then, only if nobody
was preempted, the requests that have not started (new, or preempted earlier) in admission order,
with chunked prefill. A request that has not started is scheduled only when the blocks for its chunk
are free, and the first one that does not fit stops the queue (FCFS: no overtaking). When a started
request cannot grow, the newest started request is preempted by recompute (possibly itself).

`vllm_prefill_first` follows the vLLM v0 default (no chunked prefill): if any not-started request
can be scheduled, the step holds only whole prompts (FCFS, up to the token budget, memory for the
whole prompt required; one prompt longer than the budget runs alone); otherwise the step decodes
every started request, preempting the newest when memory runs out.

Defaults: `max_num_batched_tokens=2048` (vLLM's default for its OpenAI server on GPUs under 70 GiB,
and the long-standing chunked-prefill default), `max_num_seqs=256` (vLLM's default);
prefill-first uses 8192 tokens, at least the longest prompt of our traces after filtering, the way
vLLM v0 sets the budget to the model's context length when chunked prefill is off.
"""

from __future__ import annotations

from formulations.baselines.batching import (
    BlockLedger,
    QueueingBaseline,
    plan_step,
    schedule_in_order,
)
from formulations.plan import Decision, Plan
from formulations.registry import register
from formulations.state import ReplicaView, RequestState


def _started(state: RequestState) -> bool:
    return state.num_computed_tokens > 0


class TokenBudgetBaseline(QueueingBaseline):
    """A vLLM-style baseline with a fixed token budget per step (`max_num_batched_tokens`)."""

    def __init__(self, max_num_batched_tokens: int, max_num_seqs: int = 256) -> None:
        if max_num_batched_tokens < 1 or max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be positive")
        super().__init__(max_num_seqs)
        self.max_num_batched_tokens = max_num_batched_tokens

    @property
    def max_num_decodes(self) -> int:
        return min(self.max_num_batched_tokens, self.max_num_seqs)


@register("vllm_fcfs")
class VllmFcfs(TokenBudgetBaseline):
    def __init__(self, max_num_batched_tokens: int = 2048, max_num_seqs: int = 256) -> None:
        super().__init__(max_num_batched_tokens, max_num_seqs)

    def schedule(
        self, view: ReplicaView, decisions: dict[str, Decision], queue: list[RequestState]
    ) -> Plan:
        started = [s for s in queue if _started(s)]
        ledger = BlockLedger(view)
        num_tokens, preempted = schedule_in_order(
            started, ledger, self.max_num_batched_tokens, self.max_num_seqs
        )
        if not preempted:
            budget = self.max_num_batched_tokens - sum(num_tokens.values())
            for state in queue:
                if budget <= 0 or len(num_tokens) >= self.max_num_seqs:
                    break
                if _started(state):
                    continue
                n = min(state.num_pending_tokens, budget)
                if not ledger.try_grow(state, n):
                    break  # FCFS: the head of the queue waits for memory, nobody overtakes it
                num_tokens[state.request_id] = n
                budget -= n
        return plan_step(queue, num_tokens, ledger, decisions, preempted, self.max_num_decodes)


@register("vllm_prefill_first")
class VllmPrefillFirst(TokenBudgetBaseline):
    def __init__(self, max_num_batched_tokens: int = 8192, max_num_seqs: int = 256) -> None:
        super().__init__(max_num_batched_tokens, max_num_seqs)

    def schedule(
        self, view: ReplicaView, decisions: dict[str, Decision], queue: list[RequestState]
    ) -> Plan:
        ledger = BlockLedger(view)
        started = [s for s in queue if _started(s)]
        prefills = self._prefills(queue, ledger, len(started))
        if prefills:
            return plan_step(queue, prefills, ledger, decisions, (), self.max_num_decodes)
        num_tokens, preempted = schedule_in_order(
            started, ledger, self.max_num_batched_tokens, self.max_num_seqs
        )
        return plan_step(queue, num_tokens, ledger, decisions, preempted, self.max_num_decodes)

    def _prefills(
        self, queue: list[RequestState], ledger: BlockLedger, num_running: int
    ) -> dict[str, int]:
        """Whole prompts of not-started requests, FCFS, within the budget and free memory."""
        num_tokens: dict[str, int] = {}
        budget = self.max_num_batched_tokens
        for state in queue:
            if _started(state):
                continue
            n = state.num_pending_tokens
            too_big = n > budget and bool(num_tokens)  # a long prompt may run alone
            if too_big or num_running + len(num_tokens) >= self.max_num_seqs:
                break
            if not ledger.try_grow(state, n):
                break
            num_tokens[state.request_id] = n
            budget -= n
        return num_tokens
