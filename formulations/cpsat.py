"""The admission + allocation problem as an OR-Tools CP-SAT model, registered as "cpsat".

Same model as the DP (docs/PLANNER.md), written as a constraint program instead of a search:
time is discretised into integer steps of the candidate step time T, grouped into segments between
consecutive deadline steps (the per-step budget is constant inside a segment, and token allocation
within a segment can always be split over its steps, so one allocation variable per job and
segment loses nothing).

    data        jobs j: prompt p_j, deadline step M_j, tier t_j, peak blocks, value; segments k
                covering steps (B_{k-1}, B_k]; the busiest-residue tables f_t(n) of the budget curve
    variables   x[j]            admit job j (mandatory jobs fixed to 1)
                y[j, k]         prefill tokens of job j in segment k
                n[t, k]         admitted tier-t jobs decoding in segment k (those with M_i < first
                step)
                load[t, k]      f_t(n[t, k]) (AddElement)
                cap[k]          step token cap, lowered by the speculation length of present tiers
    constraints sum_k<=k(j) y[j, k] = p_j x[j]                       (prefill by the deadline step)
                sum_j y[j, k] <= steps_k * (cap[k] - sum_t (1+s_t) load[t, k])   (segment budget)
                the steady segment after the last deadline keeps a budget >= 0  (decodes fit)
                sum_j peak_j x[j] <= memory cap
                late mandatory jobs are done before any checked job's deadline (EDF serves them
                first)
    objective   maximise sum_j value_j x[j]

Solved with a wall-clock limit; FEASIBLE is accepted beside OPTIMAL. Warm start (AddHint): the
admissions of the previous call for requests seen again, and (optionally) the DP's answer.
The chosen admitted set is laid out by the same batch planner as the DP, so both return one Plan
type.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ortools.sat.python import cp_model

from formulations.admission import Fallback
from formulations.budget import BudgetCurve, Job, make_budget_curve
from formulations.dp import Admission, admit, edf_order
from formulations.interface import Formulation
from formulations.plan import Plan
from formulations.plan_assembly import PREFILL_ONLY_STEP_S, Choice, assemble_plan
from formulations.planning_problem import PlanningProblem, extract_problem
from formulations.registry import register
from formulations.slos_dp import relax_late
from formulations.speculation import candidate_step_times
from formulations.state import ReplicaView

VALUE_SCALE = 1000  # objective weights are integers: value * VALUE_SCALE, rounded


@dataclass(frozen=True)
class CpSatOutcome:
    admission: Admission | None
    status: str  # "OPTIMAL", "FEASIBLE", "INFEASIBLE", "UNKNOWN", ...


def solve_admission_cpsat(
    jobs: Sequence[Job],
    curve: BudgetCurve,
    memory_cap_blocks: int,
    time_limit_s: float = 1.0,
    hint_admitted: set[str] | None = None,
    num_workers: int = 1,
) -> CpSatOutcome:
    """Best admissible set of `jobs` (mandatory ones forced) under `curve`, by CP-SAT."""
    order = edf_order(jobs, curve)
    model = cp_model.CpModel()

    # -- data
    deadline_step = {j.request_id: curve.deadline_step(j.deadline_s) for j in order}
    checked = [j for j in order if j.deadline_s is not None]
    late = [j for j in order if j.deadline_s is None]
    bounds = sorted(
        {deadline_step[j.request_id] for j in checked if deadline_step[j.request_id] >= 0}
    )
    segments = list(range(len(bounds) + 1))  # the last one is the steady state after every deadline
    first_step = [0] + [b + 1 for b in bounds]
    num_steps = [b - (first_step[k]) + 1 for k, b in enumerate(bounds)]
    tier_of = {j.request_id: curve.tier_index.get(j.tpot_s) for j in order if j.tpot_s is not None}

    # -- variables
    x = {j.request_id: model.NewBoolVar(f"x[{j.request_id}]") for j in order}
    for j in order:
        if j.mandatory:
            model.Add(x[j.request_id] == 1)
        if j.tpot_s is not None and tier_of[j.request_id] is None:
            model.Add(x[j.request_id] == 0)  # its tier cannot keep up at this step time
    if any(deadline_step[j.request_id] < 0 for j in checked):
        for j in checked:
            if deadline_step[j.request_id] < 0:
                model.Add(x[j.request_id] == 0)  # due before a single step can end
    y = {
        (j.request_id, k): model.NewIntVar(0, j.num_prefill_tokens, f"y[{j.request_id},{k}]")
        for j in order
        for k in segments[:-1]
        if j.deadline_s is None or first_step[k] <= deadline_step[j.request_id]
    }
    budget = {
        k: _segment_budget(model, curve, order, x, tier_of, deadline_step, first_step[k], k)
        for k in segments
    }

    # -- constraints
    for j in checked:
        rid = j.request_id
        mine = [y[rid, k] for k in segments[:-1] if (rid, k) in y]
        model.Add(sum(mine) == j.num_prefill_tokens * x[rid])
    for j in late:
        model.Add(sum(y[j.request_id, k] for k in segments[:-1]) == j.num_prefill_tokens)
    for k in segments[:-1]:
        model.Add(sum(v for (rid, kk), v in y.items() if kk == k) <= num_steps[k] * budget[k])
    model.Add(budget[segments[-1]] >= 0)
    if late:
        late_total = sum(j.num_prefill_tokens for j in late)
        for j in checked:
            k_j = (
                bounds.index(deadline_step[j.request_id]) if deadline_step[j.request_id] >= 0 else 0
            )
            done_late = sum(y[job.request_id, k] for job in late for k in range(k_j + 1))
            model.Add(done_late >= late_total).OnlyEnforceIf(x[j.request_id])
    # Mandatory jobs hold their memory already; new ones must fit what is left (nothing if
    # negative).
    memory_left = max(0, memory_cap_blocks - sum(j.peak_blocks for j in order if j.mandatory))
    model.Add(sum(j.peak_blocks * x[j.request_id] for j in order if not j.mandatory) <= memory_left)

    # -- objective
    model.Maximize(
        sum(round(j.value * VALUE_SCALE) * x[j.request_id] for j in order if not j.mandatory)
    )
    for rid in hint_admitted or ():
        if rid in x:
            model.AddHint(x[rid], 1)

    # -- solve
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = time_limit_s
    solver.parameters.num_workers = num_workers
    status = solver.Solve(model)
    name = solver.StatusName(status)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return CpSatOutcome(None, name)
    admitted = tuple(j for j in order if solver.Value(x[j.request_id]))
    value = sum(j.value for j in admitted if not j.mandatory)
    memory = sum(j.peak_blocks for j in admitted)
    return CpSatOutcome(Admission(admitted, value, 0, memory), name)


def _segment_budget(
    model, curve: BudgetCurve, order, x, tier_of, deadline_step, first_step: int, k: int
):
    """Per-step prefill budget in segment k: cap(s of present tiers) - sum_t (1+s_t) f_t(n_t)."""
    cap_plain = curve.step_cap(0)
    cap = model.NewIntVar(-(1 << 40), cap_plain, f"cap[{k}]")
    decode_terms = []
    for t, tier in enumerate(curve.tiers):
        members = [
            j
            for j in order
            if tier_of.get(j.request_id) == t and deadline_step[j.request_id] < first_step
        ]
        n = model.NewIntVar(0, len(members), f"n[{t},{k}]")
        model.Add(n == sum(x[j.request_id] for j in members))
        table = [curve.max_residue_load(t, c) for c in range(len(members) + 1)]
        load = model.NewIntVar(min(table), max(table), f"load[{t},{k}]")
        model.AddElement(n, table, load)
        decode_terms.append(tier.tokens_per_decode * load)
        if tier.num_spec_tokens:
            present = model.NewBoolVar(f"present[{t},{k}]")
            if sum(curve.base_loads[t]) == 0:
                model.Add(n == 0).OnlyEnforceIf(present.Not())
            else:
                model.Add(present == 1)
            model.Add(cap <= curve.step_cap(tier.num_spec_tokens)).OnlyEnforceIf(present)
    budget = model.NewIntVar(-(1 << 40), cap_plain, f"budget[{k}]")
    model.Add(budget == cap - sum(decode_terms))
    return budget


@register("cpsat")
class CpSat(Formulation):
    """CP-SAT admission over the budget-curve model; the plan is laid out like the DP's.

    Parameters: `time_limit_s` per candidate step time, `hint_with_dp` (warm-start from the DP's
    answer), `num_workers`, and the same `fallback` / `speculation` as slos_dp.
    """

    def __init__(
        self,
        time_limit_s: float = 0.5,
        hint_with_dp: bool = True,
        num_workers: int = 1,
        fallback: str = "reject",
        speculation: bool = True,
    ) -> None:
        if not time_limit_s > 0 or num_workers < 1:
            raise ValueError("time_limit_s must be positive and num_workers >= 1")
        self.time_limit_s = time_limit_s
        self.hint_with_dp = hint_with_dp
        self.num_workers = num_workers
        self.fallback = Fallback.parse(fallback)
        self.speculation = bool(speculation)
        self._previous_admitted: set[str] = set()
        self.last_status = ""

    def plan(self, view: ReplicaView) -> Plan:
        problem = extract_problem(view)
        max_spec = view.max_spec_tokens if self.speculation else 0
        choice = self.solve(problem, view, max_spec)
        if choice is not None:
            self._previous_admitted = {j.request_id for j in choice.admission.admitted}
        return assemble_plan(view, problem, choice, self.fallback)

    def solve(
        self, problem: PlanningProblem, view: ReplicaView, max_spec_tokens: int
    ) -> Choice | None:
        alpha = view.spec_acceptance_rate
        tpots = problem.tpots_s
        times = (
            candidate_step_times(tpots, max_spec_tokens, alpha) if tpots else [PREFILL_ONLY_STEP_S]
        )
        job_tpots = {
            j.tpot_s for j in problem.mandatory + problem.candidates if j.tpot_s is not None
        }
        mandatory_tpots = {j.tpot_s for j in problem.mandatory if j.tpot_s is not None}
        best: Choice | None = None
        statuses = []
        for step_time_s in times:
            curve = make_budget_curve(
                view.perf_model,
                view.now_s,
                step_time_s,
                problem.decoders,
                job_tpots,
                max_spec_tokens,
                alpha,
                context_tokens_per_decode=view.context_tokens_per_decode,
            )
            if curve is None or not mandatory_tpots <= set(curve.tier_index):
                continue
            mandatory = relax_late(problem.mandatory + curve.deferred, curve)
            jobs = mandatory + problem.candidates
            hint = set(self._previous_admitted)
            if self.hint_with_dp:
                dp = admit(jobs, curve, problem.memory_cap_blocks)
                if dp is not None:
                    hint |= {j.request_id for j in dp.admitted}
            outcome = solve_admission_cpsat(
                jobs, curve, problem.memory_cap_blocks, self.time_limit_s, hint, self.num_workers
            )
            statuses.append(outcome.status)
            if outcome.admission is None:
                continue
            choice = Choice(curve, outcome.admission, mandatory)
            if best is None or choice.score() > best.score():
                best = choice
        self.last_status = ",".join(statuses)
        return best
