"""Checking a formulation's plan against the rules of `formulations/interface.py`.

The core runs this on every plan before anything is sent, so that a planner bug fails loudly, with
the formulation's name, instead of as an engine error far away. The check walks the explicit steps
and then one pass of the repeat cycle, tracking each request's pending tokens: a step that brings a
request's computed tokens up to its known tokens samples one output token (with speculation the
engine may accept more; the check assumes the minimum, so it never believes a request finished
early).
"""

from __future__ import annotations

from collections.abc import Mapping

from formulations.plan import Plan, Step, Verdict
from formulations.state import ReplicaView, RequestState


class PlanError(Exception):
    """A formulation returned a plan that breaks the interface rules (a planner bug)."""


_SERVED = (Verdict.ADMITTED, Verdict.BEST_EFFORT)


def check_plan(
    plan: Plan,
    view: ReplicaView,
    formulation_name: str,
    running: Mapping[str, RequestState] | None = None,
    waiting: Mapping[str, RequestState] | None = None,
) -> None:
    """Raise `PlanError` naming the formulation when `plan` breaks a rule for `view`.
    `running` / `waiting`: the view's requests by id, when the caller has them at hand."""

    def fail(message: str) -> PlanError:
        return PlanError(
            f"formulation {formulation_name!r} on replica {view.replica_id}: {message}"
        )

    if running is None:
        running = {s.request.request_id: s for s in view.running}
    if waiting is None:
        waiting = {s.request.request_id: s for s in view.waiting}
    for rid in plan.decisions:
        if rid not in waiting:
            raise fail(f"decision for {rid!r}, which is not a waiting request")
    for rid in plan.preempt:
        if rid not in running:
            raise fail(f"preempts {rid!r}, which is not running")
    known = running
    served = [rid for rid, d in plan.decisions.items() if d.verdict in _SERVED]
    if served:
        known = {**running, **{rid: waiting[rid] for rid in served}}
    walk = _Walk(known, set(plan.preempt), view.max_spec_tokens)
    plain_repeat = len(plan.repeat) == 1 and walk.plain_decodes_ok(plan.repeat[0])
    if len(plan.steps) == 1 and (plain_repeat or not plan.repeat):
        # The common one-step plan: only the step's non-trivial entries need the walk, since
        # the plain repeat's check does not depend on where the step leaves anyone.
        step = plan.steps[0]
        if step.is_empty:
            raise fail("step 0 is empty")
        problem = walk.step(walk.nontrivial_part(step), strict=True)
        if problem:
            raise fail(f"step 0: {problem}")
        return
    for i, step in enumerate(plan.steps):
        if step.is_empty:
            raise fail(f"step {i} is empty")
        problem = walk.step(step, strict=True)
        if problem:
            raise fail(f"step {i}: {problem}")
    for i, step in enumerate(plan.repeat):
        if len(plan.repeat) == 1 and walk.plain_decodes_ok(step):
            break
        problem = walk.step(step, strict=False)
        if problem:
            raise fail(f"repeat step {i}: {problem}")


class _Walk:
    """Pending tokens of the requests a plan names, built lazily (plans name few of them)."""

    __slots__ = ("known", "max_spec", "preempted", "progress")

    def __init__(
        self, known: Mapping[str, RequestState], preempted: set[str], max_spec: int
    ) -> None:
        self.known = known
        self.preempted = preempted
        self.max_spec = max_spec
        self.progress: dict[str, list[int]] = {}  # rid -> [pending, remaining outputs, has output]

    def plain_decodes_ok(self, step: Step) -> bool:
        """Fast check of the last step of the walk (a one-step repeat cycle) when it is made of
        plain decodes (1 token each, no drafts): every known request has >= 1 pending token at
        any point of a walk (pending is reset to 1 when a token is sampled), and one with no
        output left is skipped in the repeat cycle, so the step is valid iff every request in it
        is known. False: take the full walk (it also finds the error, if any)."""
        if step.num_spec_tokens or set(step.num_tokens.values()) != {1}:
            return False
        return step.num_tokens.keys() <= self.known.keys()

    def nontrivial_part(self, step: Step) -> Step:
        """The entries of a plan's first step that need the walk: a plain decode-sized entry (1
        token, no drafts) of a known request is always valid then (>= 1 pending token, >= 1
        output token to go), so only the others are kept (and all of them if an id is unknown,
        for the error message)."""
        spec = step.num_spec_tokens
        if not step.num_tokens.keys() <= self.known.keys() or spec:
            return step
        return Step({rid: n for rid, n in step.num_tokens.items() if n != 1})

    def step(self, step: Step, strict: bool) -> str:
        """Advance through one step; the problem found ('' if none)."""
        for rid in step.num_spec_tokens:
            if rid not in step.num_tokens:
                return f"speculative tokens for {rid!r}, which computes nothing in the step"
        progress = self.progress
        for rid, num_tokens in step.num_tokens.items():
            entry = progress.get(rid)
            if entry is None:
                state = self.known.get(rid)
                if state is None:
                    return f"unknown request {rid!r} (not running and not admitted by this plan)"
                entry = progress[rid] = _progress(state, rid in self.preempted)
            pending, remaining, has_output = entry
            if remaining <= 0:
                if strict:
                    return f"request {rid!r} has already produced all its output tokens"
                continue  # engines skip finished requests in the repeat cycle
            if not 1 <= num_tokens <= pending:
                return f"request {rid!r} gets {num_tokens} tokens but has {pending} pending"
            num_spec = step.num_spec_tokens.get(rid, 0) if step.num_spec_tokens else 0
            if num_spec:
                decoding = pending == 1 and has_output == 1
                if num_spec < 0 or num_spec > self.max_spec or not decoding:
                    return (
                        f"request {rid!r} gets {num_spec} speculative tokens "
                        f"(max {self.max_spec}, decoding={decoding})"
                    )
            pending -= num_tokens
            if pending == 0:  # the step samples the next output token
                remaining -= 1
                pending = 1
                has_output = 1
            entry[0], entry[1], entry[2] = pending, remaining, has_output
        return ""


def _progress(state: RequestState, preempted: bool) -> list[int]:
    pending = state.num_tokens if preempted else state.num_pending_tokens
    return [pending, state.num_remaining_output_tokens, 1 if state.num_generated_tokens else 0]
