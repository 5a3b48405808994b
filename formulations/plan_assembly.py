"""From an admission to a plan: the part the DP (slos_dp.py) and CP-SAT (cpsat.py) share.

A `Choice` is one candidate step time's budget curve with the jobs admitted on it; `assemble_plan`
turns the best choice into verdicts for the waiting requests and the plan's steps, with best-effort
work fitted into what admitted work leaves (memory and step budget).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from formulations.admission import Fallback, best_effort_memory
from formulations.batch_planner import Layout, build_layout
from formulations.budget import BudgetCurve, Job
from formulations.dp import Admission
from formulations.memory_timeline import Footprint, peak_blocks
from formulations.plan import Decision, Plan, Step, Verdict
from formulations.planning_problem import PlanningProblem, best_effort_work
from formulations.state import ReplicaView

# Step time used when nothing present has a TPOT (every request outputs a single token), and the
# length of the catch-up step when no step time can serve the running requests.
PREFILL_ONLY_STEP_S = 0.1


@dataclass(frozen=True)
class Choice:
    """The admission chosen for one candidate step time."""

    curve: BudgetCurve
    admission: Admission
    mandatory: tuple[Job, ...]  # with late ones relaxed
    num_relaxed: int = 0  # admitted jobs this candidate could not keep on time

    @property
    def uses_speculation(self) -> bool:
        return any(tier.num_spec_tokens for tier in self.curve.tiers)

    def score(self) -> tuple[int, float, bool, float, int, float]:
        counts = [0] * self.curve.num_tiers
        for job in self.admission.admitted:
            if job.tpot_s is not None:
                counts[self.curve.tier_index[job.tpot_s]] += 1
        rate = self.curve.budget(tuple(counts)) / self.curve.step_time_s
        # Speculation only when it admits more (its TPOT holds in expectation, not for sure).
        return (
            -self.num_relaxed,
            self.admission.value,
            not self.uses_speculation,
            rate,
            self.admission.final_slack,
            -self.curve.step_time_s,
        )


def timeline_blocks(problem: PlanningProblem, jobs: Sequence[Job]) -> int:
    """Peak KV blocks over time (memory_timeline.py) of the running decoders plus `jobs`. A job
    whose deadline was relaxed (late) has no release bound: it is held at its peak for ever."""
    prints: dict[str, Footprint] = {
        d.request_id: problem.footprints[d.request_id] for d in problem.decoders
    }
    for job in jobs:
        fp = problem.footprints[job.request_id]
        if job.deadline_s is None:
            fp = dataclasses.replace(fp, release_s=None)
        prints[job.request_id] = fp
    return peak_blocks(prints.values(), problem.now_s, problem.growth, problem.block_size)


def assemble_plan(
    view: ReplicaView,
    problem: PlanningProblem,
    choice: Choice | None,
    fallback: Fallback,
    timeline_memory: bool = True,
    max_best_effort_steps: int = 4,
) -> Plan:
    """Decisions, preemptions and steps for an admission (the DP's or CP-SAT's): admitted
    candidates get ADMITTED, the others the `fallback` verdict; the steps are laid out over the
    choice's budget curve (formulations/batch_planner.py) with best-effort work in what is left
    (`timeline_memory`: admitted KV counted over time, else at its peak from now on)."""
    admitted = choice.admission.admitted if choice is not None else ()
    candidate_ids = {j.request_id for j in problem.candidates}
    admitted_ids = {j.request_id for j in admitted if j.request_id in candidate_ids}
    decisions: dict[str, Decision] = {}
    for rid in problem.too_large:
        decisions[rid] = Decision(
            Verdict.REJECTED, "KV cache of the full request exceeds the replica"
        )
    for job in problem.candidates:
        if job.request_id in admitted_ids:
            decisions[job.request_id] = Decision(Verdict.ADMITTED)
        else:
            decisions[job.request_id] = Decision(fallback.verdict, "cannot guarantee the SLOs")
    if choice is None:
        return _catch_up_plan(view, problem, decisions)
    layout = _layout(view, problem, choice, decisions, timeline_memory, max_best_effort_steps)
    return Plan(layout[0].steps, layout[0].repeat, decisions, layout[1])


def _layout(
    view: ReplicaView,
    problem: PlanningProblem,
    choice: Choice,
    decisions: dict[str, Decision],
    timeline_memory: bool,
    max_best_effort_steps: int,
) -> tuple[Layout, tuple[str, ...]]:
    if timeline_memory:
        new = tuple(j for j in choice.admission.admitted if not j.mandatory)
        admitted_peak = timeline_blocks(problem, choice.mandatory + new)
    else:
        admitted_peak = problem.reserved_blocks + sum(
            j.peak_blocks for j in choice.admission.admitted
        )
    memory = best_effort_memory(
        problem.best_effort, admitted_peak, problem.num_total_blocks, view.block_size
    )
    preempted = set(memory.preempt)
    oldest_first = sorted(problem.best_effort, key=lambda s: (s.request.arrival_s, s.request_id))
    work = [
        best_effort_work(s, view.block_size, False)
        for s in oldest_first
        if s.request_id not in preempted
    ]
    waiting = {s.request_id: s for s in view.waiting}
    for rid, decision in decisions.items():
        if decision.verdict is Verdict.BEST_EFFORT:
            work.append(best_effort_work(waiting[rid], view.block_size, False))
    layout = build_layout(
        choice.curve,
        choice.admission.admitted,
        problem.decoders,
        work,
        memory.headroom_blocks,
        view.block_size,
        max_best_effort_steps,
        (memory.oldest_id, memory.oldest_need_blocks),
    )
    return layout, memory.preempt


def _catch_up_plan(
    view: ReplicaView, problem: PlanningProblem, decisions: dict[str, Decision]
) -> Plan:
    """No candidate step time can serve the running requests (a TPOT shorter than a step can
    be, or decoders that alone overflow a step): one catch-up step that decodes every decoder
    and gives what is left of a `PREFILL_ONLY_STEP_S` step to admitted prefill in EDF order;
    the core re-plans after it. Nothing new is admitted (decisions were made by the caller)."""
    tokens: dict[str, int] = {d.request_id: 1 for d in problem.decoders}
    context = len(tokens) * view.context_tokens_per_decode
    left = view.perf_model.max_tokens(PREFILL_ONLY_STEP_S, 0, context) - len(tokens)
    by_deadline = sorted(
        problem.mandatory,
        key=lambda j: (j.deadline_s is not None, j.deadline_s or 0.0, j.request_id),
    )
    for job in by_deadline:
        if left <= 0:
            break
        chunk = min(job.num_prefill_tokens, left)
        tokens[job.request_id] = chunk
        left -= chunk
    steps = (Step(tokens),) if tokens else ()
    return Plan(steps, (), decisions, ())
