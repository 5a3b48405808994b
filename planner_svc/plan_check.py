"""Checking a formulation's plan against the rules of `formulations/interface.py`.

The core runs this on every plan before anything is sent, so that a planner bug fails loudly, with
the formulation's name, instead of as an engine error far away. The check walks the explicit steps
and then one pass of the repeat cycle, tracking each request's pending tokens: a step that brings a
request's computed tokens up to its known tokens samples one output token (with speculation the
engine may accept more; the check assumes the minimum, so it never believes a request finished
early).
"""

from __future__ import annotations

from formulations.plan import Plan, Step, Verdict
from formulations.state import ReplicaView, RequestState


class PlanError(Exception):
    """A formulation returned a plan that breaks the interface rules (a planner bug)."""


_SERVED = (Verdict.ADMITTED, Verdict.BEST_EFFORT)


def check_plan(plan: Plan, view: ReplicaView, formulation_name: str) -> None:
    """Raise `PlanError` naming the formulation when `plan` breaks a rule for `view`."""

    def fail(message: str) -> PlanError:
        return PlanError(f"formulation {formulation_name!r} on replica {view.replica_id}: {message}")

    running = {s.request_id: s for s in view.running}
    waiting = {s.request_id: s for s in view.waiting}
    for rid in plan.decisions:
        if rid not in waiting:
            raise fail(f"decision for {rid!r}, which is not a waiting request")
    for rid in plan.preempt:
        if rid not in running:
            raise fail(f"preempts {rid!r}, which is not running")
    preempted = set(plan.preempt)
    progress: dict[str, list[int]] = {}  # rid -> [pending tokens, remaining outputs, generated > 0]
    for rid, state in running.items():
        progress[rid] = _progress(state, rid in preempted)
    for rid, decision in plan.decisions.items():
        if decision.verdict in _SERVED:
            progress[rid] = _progress(waiting[rid], False)
    for i, step in enumerate(plan.steps):
        if step.is_empty:
            raise fail(f"step {i} is empty")
        _walk(step, progress, view.max_spec_tokens, lambda m, i=i: fail(f"step {i}: {m}"), True)
    for i, step in enumerate(plan.repeat):
        _walk(step, progress, view.max_spec_tokens, lambda m, i=i: fail(f"repeat step {i}: {m}"), False)


def _progress(state: RequestState, preempted: bool) -> list[int]:
    computed = 0 if preempted else state.num_computed_tokens
    return [
        state.num_tokens - computed,
        state.num_remaining_output_tokens,
        int(state.num_generated_tokens > 0),
    ]


def _walk(step: Step, progress: dict[str, list[int]], max_spec: int, fail, strict: bool) -> None:
    for rid in step.num_spec_tokens:
        if rid not in step.num_tokens:
            raise fail(f"speculative tokens for {rid!r}, which computes nothing in the step")
    for rid, num_tokens in step.num_tokens.items():
        entry = progress.get(rid)
        if entry is None:
            raise fail(f"unknown request {rid!r} (not running and not admitted by this plan)")
        pending, remaining, has_output = entry
        if remaining <= 0:
            if strict:
                raise fail(f"request {rid!r} has already produced all its output tokens")
            continue  # engines skip finished requests in the repeat cycle
        if not 1 <= num_tokens <= pending:
            raise fail(f"request {rid!r} gets {num_tokens} tokens but has {pending} pending")
        num_spec = step.num_spec_tokens.get(rid, 0)
        if num_spec:
            decoding = pending == 1 and has_output == 1
            if num_spec < 0 or num_spec > max_spec or not decoding:
                raise fail(
                    f"request {rid!r} gets {num_spec} speculative tokens "
                    f"(max {max_spec}, decoding={decoding})"
                )
        pending -= num_tokens
        if pending == 0:  # the step samples the next output token
            remaining -= 1
            pending = 1
            has_output = 1
        entry[0], entry[1], entry[2] = pending, remaining, has_output
