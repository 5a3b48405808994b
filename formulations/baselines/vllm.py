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
    admit_by_memory,
    is_started,
    plan_step,
    queue_order,
    schedule_in_order,
)
from formulations.plan import Decision, Plan, Step
from formulations.registry import register
from formulations.state import ReplicaView, RequestState


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

    def _start_new_fcfs(
        self,
        queue: list[RequestState],
        ledger: BlockLedger,
        num_tokens: dict[str, int],
        budget: int,
    ) -> None:
        """The requests that have not started, in queue order, chunked into what is left of the
        token budget; the first whose chunk's blocks are not free stops the queue (FCFS: the head
        waits for memory, nobody overtakes it)."""
        for state in queue:
            if budget <= 0 or len(num_tokens) >= self.max_num_seqs:
                return
            if is_started(state):
                continue
            n = min(state.num_pending_tokens, budget)
            if not ledger.try_grow(state, n):
                return
            num_tokens[state.request_id] = n
            budget -= n


@register("vllm_fcfs")
class VllmFcfs(TokenBudgetBaseline):
    def __init__(self, max_num_batched_tokens: int = 2048, max_num_seqs: int = 256) -> None:
        super().__init__(max_num_batched_tokens, max_num_seqs)

    def schedule(
        self, view: ReplicaView, decisions: dict[str, Decision], queue: list[RequestState]
    ) -> Plan:
        started = [s for s in queue if is_started(s)]
        ledger = BlockLedger(view)
        num_tokens, preempted = schedule_in_order(
            started, ledger, self.max_num_batched_tokens, self.max_num_seqs
        )
        if not preempted:
            budget = self.max_num_batched_tokens - sum(num_tokens.values())
            self._start_new_fcfs(queue, ledger, num_tokens, budget)
        return plan_step(queue, num_tokens, ledger, decisions, preempted, self.max_num_decodes)


@register("vllm_prefill_first")
class VllmPrefillFirst(TokenBudgetBaseline):
    def __init__(self, max_num_batched_tokens: int = 8192, max_num_seqs: int = 256) -> None:
        super().__init__(max_num_batched_tokens, max_num_seqs)

    def schedule(
        self, view: ReplicaView, decisions: dict[str, Decision], queue: list[RequestState]
    ) -> Plan:
        ledger = BlockLedger(view)
        started = [s for s in queue if is_started(s)]
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
            if is_started(state):
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


@register("vllm_spec")
class VllmSpec(VllmFcfs):
    """`vllm_fcfs` with a draft model at a fixed speculation length, as a vLLM user with a draft
    model runs it: every decode verifies `num_spec_tokens` draft tokens (default: all the engine
    allows), counted in the token budget and reserved in KV memory like vLLM's speculative decode.
    Without a draft model on the engine it is `vllm_fcfs`."""

    def __init__(
        self,
        num_spec_tokens: int | None = None,
        max_num_batched_tokens: int = 2048,
        max_num_seqs: int = 256,
    ) -> None:
        if num_spec_tokens is not None and num_spec_tokens < 1:
            raise ValueError("num_spec_tokens must be at least 1")
        super().__init__(max_num_batched_tokens, max_num_seqs)
        self.num_spec_tokens = num_spec_tokens

    def plan(self, view: ReplicaView) -> Plan:
        drafts = min(self.num_spec_tokens or view.max_spec_tokens, view.max_spec_tokens)
        if drafts == 0:
            return super().plan(view)
        decisions = admit_by_memory(view)
        queue = queue_order(view, decisions)
        if not queue:
            return Plan(decisions=decisions)
        return self._speculative_step(view, decisions, queue, drafts)

    def _speculative_step(
        self,
        view: ReplicaView,
        decisions: dict[str, Decision],
        queue: list[RequestState],
        drafts: int,
    ) -> Plan:
        """Started requests first (a decode takes 1 + `drafts` tokens of the budget), the newest
        preempted by recompute when memory runs out; then new prompts FCFS in what is left."""
        started = [s for s in queue if is_started(s)]
        ledger = BlockLedger(view)
        victims = list(started)
        num_tokens: dict[str, int] = {}
        num_spec: dict[str, int] = {}
        preempted: list[str] = []
        budget = self.max_num_batched_tokens
        for state in started:
            if budget <= 0 or len(num_tokens) >= self.max_num_seqs:
                break
            rid = state.request_id
            if rid in preempted:
                continue
            spec = drafts if state.is_decoding and budget > drafts else 0
            n = min(state.num_pending_tokens, budget - spec)
            if ledger.grow_or_preempt(state, n + spec, victims, preempted):
                num_tokens[rid] = n
                if spec:
                    num_spec[rid] = spec
                budget -= n + spec
        if not preempted:
            self._start_new_fcfs(queue, ledger, num_tokens, budget)
        step = Step(num_tokens, num_spec)
        if not num_tokens:
            return Plan(decisions=decisions, preempt=tuple(preempted))
        everyone_decodes = len(num_spec) == len(queue) and not preempted
        if everyone_decodes:  # the same step is the decision at every later one: a cycle
            return Plan(repeat=(step,), decisions=decisions)
        return Plan(steps=(step,), decisions=decisions, preempt=tuple(preempted))
