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
from formulations.memory_timeline import EXTRA_STEPS, Footprint, paced, peak_blocks
from formulations.plan import Decision, Plan, Step, Verdict
from formulations.planning_problem import PlanningProblem, best_effort_work
from formulations.speculation import expected_tokens_per_step
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
    decode_s: float = 0.0  # request-seconds of decoding it plans (`decode_seconds`)

    @property
    def uses_speculation(self) -> bool:
        return any(tier.num_spec_tokens for tier in self.curve.tiers)

    def score(self) -> tuple[int, float, float, float, int, float]:
        """Keep every admitted request on time, admit the most value; then, at equal value,
        finish the decodes soonest: KV held for less time is memory for later requests (this is
        where speculation pays even when it admits no more now); then the most prefill rate."""
        counts = [0] * self.curve.num_tiers
        for job in self.admission.admitted:
            if job.tpot_s is not None:
                counts[self.curve.tier_index[job.tpot_s]] += 1
        rate = self.curve.budget(tuple(counts)) / self.curve.step_time_s
        return (
            -self.num_relaxed,
            self.admission.value,
            -self.decode_s,
            rate,
            self.admission.final_slack,
            -self.curve.step_time_s,
        )


def decode_seconds(problem: PlanningProblem, curve: BudgetCurve, jobs: Sequence[Job]) -> float:
    """Sum over the running decoders and `jobs` of the time each needs to produce its planned
    output at the pace `curve` gives its tier (k T / E(s) per token)."""
    total_s = 0.0
    tpots = {j.request_id: j.tpot_s for j in jobs if j.tpot_s is not None}
    tpots.update((d.request_id, d.tpot_s) for d in problem.decoders)  # deferred ones are jobs too
    for rid, tpot_s in tpots.items():
        tier_index = curve.tier_index.get(tpot_s)
        if tier_index is None:
            continue
        tier = curve.tiers[tier_index]
        gain = expected_tokens_per_step(tier.num_spec_tokens, curve.acceptance_rate)
        seconds_per_token = tier.period_steps * curve.step_time_s / gain
        total_s += problem.planned_remaining.get(rid, 1) * seconds_per_token
    return total_s


MEMORY_MODES = ("trajectory", "timeline", "peak")


def timeline_blocks(
    problem: PlanningProblem, jobs: Sequence[Job], curve: BudgetCurve | None = None
) -> int:
    """Peak KV blocks over time (memory_timeline.py) of the running decoders plus `jobs`: on their
    trajectories under `curve` (the pace its tiers give them), else the timeline bound. A job
    whose deadline was relaxed (late) has no release bound: it is held at its peak for ever."""
    prints: dict[str, list[Footprint]] = {}  # a deferred decoder comes back as a job
    eager_step_s = None
    if curve is not None and problem.eager_decodes and problem.perf_model is not None:
        ids = {d.request_id for d in problem.decoders}
        ids.update(j.request_id for j in jobs if j.tpot_s is not None)
        eager_step_s = min(curve.step_time_s, problem.perf_model.step_time_s(len(ids)))
    for d in problem.decoders:
        pace = _pace(curve, d.tpot_s, eager_step_s)
        outcomes = problem.footprints[d.request_id]
        if pace is not None:
            outcomes = [paced(fp, *pace, curve.grid_start_s) for fp in outcomes]
        prints[d.request_id] = list(outcomes)
    for job in jobs:
        pace = _pace(curve, job.tpot_s, eager_step_s)
        outcomes = problem.footprints[job.request_id]
        if job.deadline_s is None:
            outcomes = [dataclasses.replace(fp, release_s=None) for fp in outcomes]
        elif pace is not None:
            start_s = max(job.deadline_s, curve.grid_start_s)
            outcomes = [paced(fp, *pace, start_s) for fp in outcomes]
        prints[job.request_id] = list(outcomes)
    every = [fp for outcomes in prints.values() for fp in outcomes]
    every.extend(problem.expected_rounds)  # paused tool chains' next rounds, in time
    return peak_blocks(every, problem.now_s, problem.block_size)


def _pace(
    curve: BudgetCurve | None, tpot_s: float | None, eager_step_s: float | None
) -> tuple[float, int] | None:
    """Tokens per second and extra tokens of a request of this TPOT on the trajectory `curve`
    plans for it (memory_timeline.py): its tier's pace, or with eager decodes at least one token
    per `eager_step_s`; None without a curve (the timeline bound) or a tier."""
    if curve is None or tpot_s is None:
        return None
    tier_index = curve.tier_index.get(tpot_s)
    if tier_index is None:
        return None
    tier = curve.tiers[tier_index]
    gain = expected_tokens_per_step(tier.num_spec_tokens, curve.acceptance_rate)
    rate = gain / (tier.period_steps * curve.step_time_s)
    if eager_step_s is not None:
        rate = max(rate, 1.0 / eager_step_s)
    return rate, EXTRA_STEPS * tier.tokens_per_decode


def assemble_plan(
    view: ReplicaView,
    problem: PlanningProblem,
    choice: Choice | None,
    fallback: Fallback,
    memory: str = "trajectory",
    max_best_effort_steps: int = 4,
    eager_decodes: bool = False,
) -> Plan:
    """Decisions, preemptions and steps for an admission (the DP's or CP-SAT's): admitted
    candidates get ADMITTED, the others the `fallback` verdict; the steps are laid out over the
    choice's budget curve (formulations/batch_planner.py) with best-effort work in what is left of
    the memory admitted work needs (`memory`, one of MEMORY_MODES: counted on its trajectories,
    over time with the timeline bound, or at its peak from now on)."""
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
    layout = _layout(view, problem, choice, decisions, memory, max_best_effort_steps, eager_decodes)
    return Plan(layout[0].steps, layout[0].repeat, decisions, layout[1])


def _layout(
    view: ReplicaView,
    problem: PlanningProblem,
    choice: Choice,
    decisions: dict[str, Decision],
    memory: str,
    max_best_effort_steps: int,
    eager_decodes: bool,
) -> tuple[Layout, tuple[str, ...]]:
    if memory != "peak":
        new = tuple(j for j in choice.admission.admitted if not j.mandatory)
        curve = choice.curve if memory == "trajectory" else None
        admitted_peak = timeline_blocks(problem, choice.mandatory + new, curve)
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
        eager_decodes,
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
