"""Helpers shared by the one-step baselines: memory-only admission, a KV block ledger with
vLLM-style preemption by recompute, and the steady decode cycle.

Memory-only admission: every waiting request whose prompt (and first output token) could ever fit in
the replica's KV pool is ADMITTED at once (for these baselines "admitted" means "queued"; no SLO
check); one that could never fit is REJECTED. Like vLLM, the baselines never use a request's
output length: not the true one, not a prediction, not the cap (a test runs them in the three length
modes of formulations/lengths.py and compares the results).

Steady decode (`plan_step`): when after the step every request is decoding and all of them fit one
step, the one-step decision of these baselines is "decode everyone" at every later step until
something arrives or finishes or the KV blocks run out; the plan then carries that decode step as
its repeat cycle (the engine skips finished requests), so the core is not called every step.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import ClassVar

from formulations.interface import Formulation
from formulations.plan import Decision, Plan, Step, Verdict
from formulations.progress import num_blocks_for
from formulations.state import ReplicaView, RequestState

ADMIT = Decision(Verdict.ADMITTED, "queued (memory-only admission)")


def is_started(state: RequestState) -> bool:
    """A running request that holds KV. A tool round waiting for its verdict may already hold its
    chain's kept KV (docs/AGENTS.md): it is still a new request, as a prefix-cache hit is in vLLM's
    waiting queue (never preempted before it runs)."""
    return state.num_computed_tokens > 0 and state.verdict is not None


def admit_by_memory(view: ReplicaView) -> dict[str, Decision]:
    """ADMITTED for every waiting request whose prompt fits the KV pool alone, REJECTED
    otherwise."""
    decisions: dict[str, Decision] = {}
    for state in view.waiting:
        peak_blocks = num_blocks_for(state.num_prompt_tokens + 1, view.block_size)
        if peak_blocks <= view.num_total_blocks:
            decisions[state.request_id] = ADMIT
        else:
            reason = f"needs {peak_blocks} KV blocks, the replica has {view.num_total_blocks}"
            decisions[state.request_id] = Decision(Verdict.REJECTED, reason)
    return decisions


def queue_order(view: ReplicaView, decisions: dict[str, Decision]) -> list[RequestState]:
    """Running requests in admission order, then the waiting requests admitted now."""
    if not view.waiting:
        return list(view.running)
    admitted = [s for s in view.waiting if decisions[s.request_id].verdict is Verdict.ADMITTED]
    return [*view.running, *admitted]


class BlockLedger:
    """Free KV blocks while a step is being built: `grow` reserves the blocks a request needs to
    compute `num_tokens` more tokens (plus `num_spec` draft tokens); `release` frees a victim."""

    __slots__ = ("block_size", "num_free_blocks", "touched", "_released")

    def __init__(self, view: ReplicaView) -> None:
        self.block_size = view.block_size
        self.num_free_blocks = view.num_free_blocks
        self.touched: dict[str, int] = {}  # rid -> blocks held now, for requests changed here
        self._released: set[str] = set()

    def held(self, state: RequestState) -> int:
        return self.touched.get(state.request_id, state.num_blocks)

    def extra_blocks(self, state: RequestState, num_tokens: int, num_spec: int = 0) -> int:
        """Blocks to add so that the request can hold `num_tokens + num_spec` more tokens (counted
        from zero once released: its KV is recomputed)."""
        rid = state.request_id
        computed = 0 if rid in self._released else state.num_computed_tokens
        need = num_blocks_for(computed + num_tokens + num_spec, self.block_size) - self.held(state)
        return max(0, need)

    def try_grow(self, state: RequestState, num_tokens: int, num_spec: int = 0) -> bool:
        extra = self.extra_blocks(state, num_tokens, num_spec)
        if extra > self.num_free_blocks:
            return False
        self.num_free_blocks -= extra
        self.touched[state.request_id] = self.held(state) + extra
        return True

    def release(self, state: RequestState) -> None:
        self.num_free_blocks += self.held(state)
        self.touched[state.request_id] = 0
        self._released.add(state.request_id)

    def grow_or_preempt(
        self,
        state: RequestState,
        num_tokens: int,
        victims: list[RequestState],
        preempted: list[str],
    ) -> bool:
        """Grow `state` by `num_tokens`, preempting (by recompute) the last of `victims` until it
        fits, as vLLM does when decode memory runs out. False when `state` itself was the victim."""
        while not self.try_grow(state, num_tokens):
            victim = victims.pop()
            self.release(victim)
            preempted.append(victim.request_id)
            if victim is state:
                return False
        return True


def plan_step(
    queue: Sequence[RequestState],
    num_tokens: dict[str, int],
    ledger: BlockLedger,
    decisions: dict[str, Decision],
    preempted: Sequence[str],
    max_num_decodes: int,
) -> Plan:
    """The plan for one scheduled step, with a decode-only repeat cycle after it when that cycle is
    exactly what the baseline would decide at every later step until the next event:

    after the step every request in `queue` is decoding (or done): no prompt or recompute is left
    partial or unstarted; nothing was preempted; and all of them fit one step (`max_num_decodes`:
    the token budget and the sequence cap). Then every later step decodes everyone, whatever the
    policy's order, for as long as the KV blocks last. Running out of blocks is itself an event:
    the engine refuses that step (all or nothing, no time passes), the core re-plans at once, and
    the baseline then preempts exactly as it would have in that step. When the step itself is the
    decode step, the plan is just the cycle (no explicit step).
    """
    if not num_tokens:
        return Plan(decisions=decisions, preempt=tuple(preempted))
    step = Step(num_tokens)
    tail = None if preempted else _decode_tail(queue, num_tokens, max_num_decodes)
    if tail is None:
        return Plan(steps=(step,), decisions=decisions, preempt=tuple(preempted))
    return _with_tail(step, tail, len(queue), decisions)


def _with_tail(
    step: Step, tail: dict[str, int], queue_length: int, decisions: dict[str, Decision]
) -> Plan:
    if tail == step.num_tokens and len(tail) == queue_length:  # the step already decodes everyone
        return Plan(repeat=(step,), decisions=decisions)
    return Plan(steps=(step,), repeat=(Step(tail),) if tail else (), decisions=decisions)


def start_plan(
    view: ReplicaView, max_num_decodes: int, tpot_budget: bool = False
) -> tuple[dict[str, Decision], list[RequestState], Plan | None]:
    """The opening every baseline shares: admit by memory, order the queue, and take the shortcuts.
    Returns (decisions, queue, plan); `plan` is set when it is already decided (nothing queued, or
    everyone decodes: `decode_all_plan`), else None and the baseline builds its step."""
    decisions = admit_by_memory(view)
    queue = queue_order(view, decisions)
    if not queue:
        return decisions, queue, Plan(decisions=decisions)
    return decisions, queue, decode_all_plan(view, queue, decisions, max_num_decodes, tpot_budget)


def decode_all_plan(
    view: ReplicaView,
    queue: Sequence[RequestState],
    decisions: dict[str, Decision],
    max_num_decodes: int,
    tpot_budget: bool = False,
) -> Plan | None:
    """One-pass shortcut for the commonest re-plan: everyone in `queue` is decoding, all fit one
    step (`max_num_decodes`; with `tpot_budget`, also the Sarathi/EDF budget of the tightest TPOT
    present) and the free blocks cover every new block the step needs. Then every baseline
    decides "decode everyone" (only their order differs, which changes nothing), and this returns
    the same plan as its general path, `plan_step` included. None when the shortcut does not
    apply."""
    if not queue or len(queue) > max_num_decodes:
        return None
    block_size = view.block_size
    num_free_blocks = view.num_free_blocks
    tightest_tpot_s = float("inf")
    step: dict[str, int] = {}
    tail: dict[str, int] = {}
    for s in queue:
        request = s.request
        generated = s.num_generated_tokens
        computed = s.num_computed_tokens
        if not generated or s.num_prompt_tokens + generated - computed != 1:  # is_decoding: hot
            return None
        need = -(-(computed + 1) // block_size) - s.num_blocks
        if need > 0:
            num_free_blocks -= need
            if num_free_blocks < 0:
                return None
        if tpot_budget:
            tpot_s = request.slo.thinking_tpot_s or request.slo.tpot_s
            tpot_s = min(tpot_s, request.slo.tpot_s)
            if tpot_s < tightest_tpot_s:
                tightest_tpot_s = tpot_s
        rid = request.request_id
        step[rid] = 1
        tail[rid] = 1  # the engine skips it in the cycle once it has finished
    if tpot_budget and len(queue) > max(1, view.perf_model.max_tokens(tightest_tpot_s)):
        return None
    return _with_tail(Step(step), tail, len(queue), decisions)


def _decode_tail(
    queue: Sequence[RequestState], num_tokens: dict[str, int], max_num_decodes: int
) -> dict[str, int] | None:
    """{rid: 1} for every request of `queue` (the engine skips those that finish in the step), or
    None when one of them would not be decoding after the step (or they would not fit one)."""
    tail: dict[str, int] = {}
    for s in queue:
        request = s.request
        rid = request.request_id
        pending = s.num_pending_tokens
        n = num_tokens.get(rid, 0)
        if n != pending and (n != 0 or not s.is_decoding):
            return None  # a prompt (or recompute) stays unfinished
        tail[rid] = 1
    if len(tail) > max_num_decodes:
        return None
    return tail


def schedule_in_order(
    order: Sequence[RequestState],
    ledger: BlockLedger,
    budget: int,
    max_num_seqs: int,
    victims: list[RequestState] | None = None,
) -> tuple[dict[str, int], list[str]]:
    """Requests in `order`, each min(pending, budget left) tokens, until the budget or the sequence
    cap runs out. A started request that cannot grow preempts, by recompute, the last of `victims`
    still holding KV (default: the started requests of `order`, the newest or lowest priority
    last), possibly itself, as vLLM does; `order`'s started requests must be a subsequence of
    `victims` in the same order, so no request already in the step is preempted. A request not
    started yet whose blocks are not free is skipped (EDF's order holds such requests)."""
    num_tokens: dict[str, int] = {}
    preempted: list[str] = []
    block_size = ledger.block_size
    touched = ledger.touched  # requests whose blocks the ledger changed: take the slow path
    for state in order:
        if budget <= 0 or len(num_tokens) >= max_num_seqs:
            break
        rid = state.request.request_id
        if preempted and rid in preempted:
            continue
        computed = state.num_computed_tokens
        # TokenProgress.num_pending_tokens and num_blocks_for, inlined: the hot loop of baselines
        n = min(state.num_prompt_tokens + state.num_generated_tokens - computed, budget)
        # Fast path (most decodes): the blocks it holds already have room for n more tokens.
        if rid not in touched and -(-(computed + n) // block_size) <= state.num_blocks:
            granted = True
        elif computed == 0 or state.verdict is None:
            granted = ledger.try_grow(state, n)
        else:
            if victims is None:  # popped from the end
                victims = [s for s in order if is_started(s)]
            granted = ledger.grow_or_preempt(state, n, victims, preempted)
        if granted:
            num_tokens[rid] = n
            budget -= n
    return num_tokens, preempted


class QueueingBaseline(Formulation):
    """What the baselines share: no admission control (they queue whatever fits in memory, as
    vLLM does), at most `max_num_seqs` requests per step, and the opening of `start_plan`;
    a subclass builds the step (`schedule`). `tpot_budget`: the decode-all shortcut also checks
    the Sarathi / EDF budget of the tightest TPOT present."""

    admission_control: ClassVar[bool] = False
    tpot_budget: ClassVar[bool] = False

    def __init__(self, max_num_seqs: int = 256) -> None:
        if max_num_seqs < 1:
            raise ValueError("max_num_seqs must be positive")
        self.max_num_seqs = max_num_seqs

    @property
    def max_num_decodes(self) -> int:
        """Most requests one step can decode."""
        return self.max_num_seqs

    def plan(self, view: ReplicaView) -> Plan:
        decisions, queue, decided = start_plan(view, self.max_num_decodes, self.tpot_budget)
        if decided is not None:
            return decided
        return self.schedule(view, decisions, queue)

    @abstractmethod
    def schedule(
        self, view: ReplicaView, decisions: dict[str, Decision], queue: list[RequestState]
    ) -> Plan:
        """The one-step plan for `queue` (running requests first, then those admitted now)."""
