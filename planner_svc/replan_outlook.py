"""Will the planner core re-plan a replica at its engine's next step report?

The daemon tells each engine the answer ahead (`replan_expected`), so that the engine waits for the
planner's answer to a report only when a new plan is likely to come (docs/SERVICE.md, "Plans in
time"). The rule mirrors `PlannerCore._should_replan` for a busy replica, from the core's read-only
replica state: a trigger fired (a request was routed to it, a step ran slow, an error); or some work
is not covered by the current plan and either the re-plan timer will be due at the next boundary
or a request is about to produce its last token (a completion re-plans while work is uncovered).
A wrong guess costs at most the engine's grace period of waiting, or one step of plan lag.
"""

from __future__ import annotations

from planner_svc.core import PlannerCore


def expects_replan(core: PlannerCore, replica_id: int, now_s: float, step_time_s: float) -> bool:
    """`step_time_s`: how long the engine's current step is expected to take (its last one)."""
    if replica_id not in core.replica_ids:
        return False
    rep = core.replica(replica_id)
    if not rep.has_work:
        return False
    if rep.replan_requested:
        return True
    if not rep.has_unplanned_work:
        return False
    policy = core.replan_policy
    if now_s + step_time_s - rep.last_plan_s >= policy.timer_s:
        return True
    return policy.on_completion and any(
        state.num_remaining_output_tokens <= 1 for state in rep.running.values()
    )
