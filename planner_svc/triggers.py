"""When the planner core re-plans a replica, and what it tells the engine ahead of time.

An idle replica (its engine has no step left for a live request) with work is re-planned at once:
after its last plan ran out, on a trigger, or when the timer is due. A busy replica is re-planned
only at a step boundary (its engine's report) when a trigger fired: requests arrived
(`ReplanPolicy.on_arrival`), requests finished while some work is not covered by the repeat cycle
(`on_completion`), a step ran `slow_step_ratio` times slower than the performance model predicted,
the engine reported an error, or `timer_s` passed while work is not covered by the repeat cycle. A
busy engine keeps running its plan (explicit steps, then the repeat cycle), so a formulation that
returns an exact steady-state repeat is not called again until something changes: that is what
keeps the core cheap.

`expects_replan` is the same rule seen one step ahead: the core says it in its output, so that an
engine waits for the answer to its next report only when a new plan is likely to come
(docs/SERVICE.md, "Plans in time"). A wrong guess costs at most the engine's grace period of
waiting, or one step of plan lag.
"""

from __future__ import annotations

from dataclasses import dataclass

from planner_svc.replica import ReplicaState
from wire.protocol import StepReport


@dataclass(frozen=True)
class ReplanPolicy:
    """When the core re-plans a busy replica (an idle one with work is always re-planned)."""

    timer_s: float = 0.1  # re-plan at least this often while work is not covered by the plan
    on_arrival: bool = True  # re-plan at the next step boundary when requests arrived
    on_completion: bool = True  # ... when requests finished and some work is not covered
    slow_step_ratio: float = 1.5  # ... when a measured step took longer than ratio * predicted

    def __post_init__(self) -> None:
        if self.timer_s <= 0 or self.slow_step_ratio <= 0:
            raise ValueError("ReplanPolicy.timer_s and slow_step_ratio must be positive")


def should_replan(rep: ReplicaState, policy: ReplanPolicy, now_s: float, at_boundary: bool) -> bool:
    """Re-plan `rep` now? `at_boundary`: the call is its engine's step report."""
    if not rep.has_work:
        return False
    # The same sum as PlannerCore.next_timer_s, so that a tick at the time it names is due (a
    # difference can round below timer_s and leave the timer due for ever at that instant).
    timer_due = now_s >= rep.last_plan_s + policy.timer_s
    if rep.is_busy():
        return at_boundary and (rep.replan_requested or (timer_due and rep.has_unplanned_work))
    plan = rep.plan  # idle: a non-empty last plan has run out
    ran_out = plan is not None and bool(plan.steps or plan.repeat)
    return rep.replan_requested or timer_due or ran_out


def ran_slow(rep: ReplicaState, report: StepReport, num_steps: int, ratio: float) -> bool:
    """Did the reported step(s) take longer than `ratio` times the model's prediction? The step
    computed sum(computed) + sum(proposed) - sum(accepted) tokens (verified drafts count whether or
    not they were accepted), with the longest speculation as its draft steps."""
    proposed = report.num_proposed_spec_tokens
    num_batched = sum(report.num_computed_tokens.values())
    if proposed:
        num_batched += sum(proposed.values()) - sum(report.num_accepted_spec_tokens.values())
    spec_steps = max(proposed.values(), default=0)
    predicted_s = rep.spec.perf_model.step_time_s(num_batched // num_steps, spec_steps)
    return report.step_time_s > ratio * predicted_s * num_steps


def expects_replan(rep: ReplicaState, policy: ReplanPolicy, now_s: float) -> bool:
    """Will `rep` be re-planned at its engine's next report (about one step from now)?"""
    if not rep.has_work:
        return False
    if rep.replan_requested:
        return True
    if not rep.has_unplanned_work:
        return False
    if now_s + rep.last_step_time_s - rep.last_plan_s >= policy.timer_s:
        return True
    return policy.on_completion and any(
        state.num_remaining_output_tokens <= 1 for state in rep.running.values()
    )
