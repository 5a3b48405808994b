"""Helpers shared by the one-step baselines: memory-only admission, a KV block ledger with
vLLM-style preemption by recompute, and the steady decode cycle.

Memory-only admission: every waiting request whose whole context (prompt plus output) could ever fit
in the replica's KV pool is ADMITTED at once (for these baselines "admitted" means "queued"; no SLO
check); one that could never fit is REJECTED.

Steady decode: when every running request is decoding, every one of them gets its token in the step,
and the free blocks cover every request's growth to its last token, the one-step decision of these
baselines is the same at every later step until something arrives or finishes; the plan then
returns it as a repeat cycle with no explicit steps (the engine skips finished requests), so the
core is not called every step.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from formulations.plan import Decision, Plan, Step, Verdict
from formulations.state import ReplicaView, RequestState, num_blocks_for

ADMIT = Decision(Verdict.ADMITTED, "queued (memory-only admission)")


def admit_by_memory(view: ReplicaView) -> dict[str, Decision]:
    """ADMITTED for every waiting request that fits the KV pool alone, REJECTED otherwise."""
    decisions: dict[str, Decision] = {}
    for state in view.waiting:
        # The last output token is sampled, never cached: the KV peaks at max_num_tokens - 1.
        peak_blocks = num_blocks_for(state.request.max_num_tokens - 1, view.block_size)
        if peak_blocks <= view.num_total_blocks:
            decisions[state.request_id] = ADMIT
        else:
            reason = f"needs {peak_blocks} KV blocks, the replica has {view.num_total_blocks}"
            decisions[state.request_id] = Decision(Verdict.REJECTED, reason)
    return decisions


def queue_order(view: ReplicaView, decisions: dict[str, Decision]) -> list[RequestState]:
    """Running requests in admission order, then the waiting requests admitted now."""
    admitted = [s for s in view.waiting if decisions[s.request_id].verdict is Verdict.ADMITTED]
    return [*view.running, *admitted]


class BlockLedger:
    """Free KV blocks while a step is being built: `grow` reserves the blocks a request needs to
    compute `num_tokens` more tokens (plus `num_spec` draft tokens); `release` frees a victim."""

    __slots__ = ("block_size", "num_free_blocks", "_held")

    def __init__(self, view: ReplicaView) -> None:
        self.block_size = view.block_size
        self.num_free_blocks = view.num_free_blocks
        self._held: dict[str, int] = {}

    def held(self, state: RequestState) -> int:
        return self._held.get(state.request_id, state.num_blocks)

    def extra_blocks(self, state: RequestState, num_tokens: int, num_spec: int = 0) -> int:
        computed = 0 if self._held.get(state.request_id, -1) == 0 else state.num_computed_tokens
        return max(0, num_blocks_for(computed + num_tokens + num_spec, self.block_size) - self.held(state))

    def try_grow(self, state: RequestState, num_tokens: int, num_spec: int = 0) -> bool:
        extra = self.extra_blocks(state, num_tokens, num_spec)
        if extra > self.num_free_blocks:
            return False
        self.num_free_blocks -= extra
        self._held[state.request_id] = self.held(state) + extra
        return True

    def release(self, state: RequestState) -> None:
        self.num_free_blocks += self.held(state)
        self._held[state.request_id] = 0


def steady_decode_plan(
    view: ReplicaView, decodes: Sequence[RequestState], decisions: dict[str, Decision]
) -> Plan | None:
    """A decode-only repeat cycle when it is exactly the one-step decision until the next event
    (module docstring), else None. `decodes` are the requests the step decodes."""
    if len(decodes) != len(view.running) or any(d.verdict is Verdict.ADMITTED for d in decisions.values()):
        return None
    if not all(s.is_decoding for s in decodes):
        return None
    growth = sum(
        num_blocks_for(s.request.max_num_tokens - 1, view.block_size) - s.num_blocks for s in decodes
    )
    if growth > view.num_free_blocks:
        return None
    step = Step({s.request_id: 1 for s in decodes})
    return Plan(steps=(), repeat=(step,), decisions=decisions)


def one_step_plan(
    num_tokens: dict[str, int], decisions: dict[str, Decision], preempt: Iterable[str] = ()
) -> Plan:
    steps = (Step(num_tokens),) if num_tokens else ()
    return Plan(steps=steps, decisions=decisions, preempt=tuple(preempt))
