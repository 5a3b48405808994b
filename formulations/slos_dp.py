"""The SLOs-Serve formulation: multi-SLO admission DP over the token-budget curve, adaptive
speculation and soft admission (docs/ALGORITHM.md sections 3 to 6), registered as "slos_dp".

Per call: extract the problem (running decoders, admitted jobs still prefilling, new requests);
for every candidate step time T (each TPOT present, and with a draft model each TPOT stretched by
E(s)) build the budget curve and run the DP; keep the candidate with the highest admitted value
(ties: the most prefill budget per second, then the shorter T); lay out the steps; give the rest
the fallback verdict; preempt best-effort work whose memory admitted work needs.

Re-planning is the core's (ReplanPolicy). This formulation expects to be called when requests
arrive (they wait for a verdict until then), when the explicit steps run out, on a timer (~100 ms)
and after an engine reports a step much slower than planned (its residues and deadlines are
recomputed from the reported progress, so a late admitted request is served first, never dropped).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence

from formulations.admission import Fallback
from formulations.budget import BudgetCurve, Burst, Job, make_budget_curve
from formulations.dp import Admission, admit, edf_order
from formulations.interface import Formulation
from formulations.overflow import (
    MAX_VICTIMS_PER_PLAN,
    overflow_victim,
    set_aside,
    waiting_resumes,
)
from formulations.pauses import PauseEstimate
from formulations.plan import Decision, Plan, Verdict
from formulations.plan_assembly import (
    MEMORY_MODES,
    PREFILL_ONLY_STEP_S,
    Choice,
    assemble_plan,
    decode_seconds,
    timeline_blocks,
)
from formulations.planning_problem import PlanningProblem, extract_problem
from formulations.progress import num_blocks_for
from formulations.registry import register
from formulations.speculation import candidate_step_times
from formulations.state import ReplicaView, RequestState

# Target length of a prefill-burst step (longer steps amortise the step's fixed cost), and how many
# burst ends (the earliest deadlines of requests that will decode) are tried per step time.
BURST_STEP_S = 0.25
MAX_BURST_CANDIDATES = 3
# Decoder-bound bursts (`decoder_bound_burst`) use steps of at most this fraction of the tightest
# TTFT SLO present (and at most BURST_STEP_S): a request that arrives during a long step waits for
# its end before it is even considered. 0.4 measured best of 0.3 / 0.4 / 0.5 / 1.0 on the
# 120-request capacity windows (docs/PLANNER.md section 1).
DECODER_BURST_TTFT_FRACTION = 0.4
# A decoder-bound burst stops this fraction of its length early, so that steps up to 10% slower
# than modelled still leave the first decoder its grid step (measured: without it, the robustness
# part's capacity under a 10%-noise truth fell from 0.62 to 0.47 req/s; with it 0.62).
DECODER_BURST_MARGIN = 0.1
# Pinned KV of paused tool chains may hold at most this share of a replica's blocks; beyond it a
# round's KV is left evictable (docs/AGENTS.md).
MAX_PINNED_SHARE = 0.5
CHAIN_REJECTED = "chain rejected: the next round's KV cannot fit the replica"


def relax_late(mandatory: Sequence[Job], curve: BudgetCurve) -> tuple[Job, ...]:
    """Admitted jobs that can no longer meet their deadline lose the deadline check: they are
    served first (EDF puts late jobs first), and the others keep their guarantee. Repeated until
    the mandatory set alone is feasible, since serving a late job first can make another late."""
    jobs = tuple(mandatory)
    while True:
        failing = _first_failing(jobs, curve)
        if failing is None:
            return jobs
        jobs = tuple(
            dataclasses.replace(j, deadline_s=None) if j.request_id == failing else j for j in jobs
        )


def _first_failing(jobs: Sequence[Job], curve: BudgetCurve) -> str | None:
    """The first job (EDF order) whose deadline the mandatory set alone misses, if any."""
    counts = list(curve.zero_counts())
    slack = 0
    position = -1
    for job in edf_order(jobs, curve):
        step = curve.deadline_step(job.deadline_s)
        slack += curve.supply(position, step, tuple(counts))
        position = max(position, step)
        slack -= job.num_prefill_tokens
        if job.deadline_s is not None and slack < 0:
            return job.request_id
        if job.tpot_s is not None and job.tpot_s in curve.tier_index:
            counts[curve.tier_index[job.tpot_s]] += 1
    return None


def burst_candidates(
    problem: PlanningProblem,
    now_s: float,
    previous_end_s: float | None = None,
    min_step_s: float = 0.0,
) -> list[Burst | None]:
    """No burst; the rest of the previous plan's burst (so that a re-plan can always continue
    what the admitted requests were promised); a burst ending at the earliest job deadline when it
    is too close for the grid (before the shortest candidate step `min_step_s` can end, or within
    half a burst step: a TTFT window shorter than a TPOT, or a prompt the grid's short steps would
    prefill too slowly, is served by a first step of the window's own length); and bursts ending at
    the earliest deadlines of jobs that will decode (a job due before the burst ends could not
    decode, so later ends trade admissions for longer steps)."""
    jobs = problem.mandatory + problem.candidates
    deadlines = {j.deadline_s for j in jobs if j.deadline_s is not None and j.deadline_s > now_s}
    horizon_s = max(min_step_s, BURST_STEP_S / 2)
    tight = sorted(d for d in deadlines if d - now_s < horizon_s)[:1]
    ends = sorted(
        {
            j.deadline_s
            for j in jobs
            if j.tpot_s is not None
            and j.deadline_s is not None
            and j.deadline_s - now_s >= BURST_STEP_S / 2
        }
    )
    if previous_end_s is not None and previous_end_s - now_s > 1e-6:
        ends = [previous_end_s] + [e for e in ends if e != previous_end_s]
    ends = tight + [e for e in ends if e not in tight][:MAX_BURST_CANDIDATES]
    return [None] + [_burst_until(end_s, now_s) for end_s in ends]


def _burst_until(end_s: float, now_s: float, max_step_s: float = BURST_STEP_S) -> Burst:
    num_steps = max(1, math.ceil((end_s - now_s) / max_step_s - 1e-9))
    return Burst(num_steps, (end_s - now_s) / num_steps)


def decoder_bound_burst(
    problem: PlanningProblem, now_s: float, step_time_s: float, max_step_s: float = BURST_STEP_S
) -> Burst | None:
    """The longest burst the running decoders allow on grid step `step_time_s`: it ends one grid
    step before the earliest decoder's next deadline, so that decoder still decodes in grid step 0,
    less a margin of DECODER_BURST_MARGIN of its length against model error.
    None without decoders or when it would replace fewer than two grid steps. Used for waiting
    requests whose prompts need long steps before the decoders' next tokens (tool rounds of 1-3k
    tokens beside decoders that got ahead)."""
    if not problem.decoders:
        return None
    latest_end_s = min(d.next_deadline_s for d in problem.decoders) - step_time_s
    end_s = now_s + (1 - DECODER_BURST_MARGIN) * (latest_end_s - now_s) - 1e-6
    if end_s - now_s < 2 * step_time_s:
        return None
    return _burst_until(end_s, now_s, max_step_s)


def fit_memory_over_time(
    admission: Admission,
    problem: PlanningProblem,
    cache: dict[tuple, int],
    curve: BudgetCurve | None = None,
) -> Admission:
    """Keep the longest EDF prefix of the newly admitted jobs whose KV, with the running and
    mandatory requests', fits the replica at every future instant (memory_timeline.py). Dropping
    jobs keeps the rest feasible (less demand, more budget), so the prefix is found by bisection;
    adding a job never lowers the peak. `cache` memoises peaks by admitted ids within one call."""

    # The trajectories depend on the curve only through its step time, burst and tiers.
    pace = (curve.step_time_s, curve.burst) if curve is not None else None

    def peak(jobs: Sequence[Job]) -> int:
        key = (pace, tuple((j.request_id, j.deadline_s is None) for j in jobs))
        if key not in cache:
            cache[key] = timeline_blocks(problem, jobs, curve)
        return cache[key]

    mandatory = [j for j in admission.admitted if j.mandatory]
    new = [j for j in admission.admitted if not j.mandatory]
    low, high = 0, len(new)  # invariant: the prefix of length `low` is kept (0 always is)
    if peak(mandatory + new) <= problem.num_total_blocks:
        low = high
    while high - low > 1:
        middle = (low + high) // 2
        if peak(mandatory + new[:middle]) <= problem.num_total_blocks:
            low = middle
        else:
            high = middle
    if low == len(new):
        return dataclasses.replace(admission, memory_blocks=peak(mandatory + new))
    kept = {j.request_id for j in new[:low]}
    admitted = tuple(j for j in admission.admitted if j.mandatory or j.request_id in kept)
    return Admission(
        admitted,
        sum(j.value for j in new[:low]),
        admission.final_slack,  # a lower bound: dropped jobs only leave more slack
        peak(mandatory + new[:low]),
    )


def solve_candidates(
    problem: PlanningProblem,
    view: ReplicaView,
    max_spec_tokens: int,
    use_bursts: bool = True,
    previous_burst_end_s: float | None = None,
    memory: str = "peak",
    decoder_bursts: bool = False,
) -> Choice | None:
    """Run the DP for every candidate step time (and prefill burst); the best choice, or None if
    none is usable. `decoder_bursts`: also try, per step time, the longest burst the running
    decoders allow (`decoder_bound_burst`), with steps of at most DECODER_BURST_TTFT_FRACTION of
    the tightest TTFT SLO present. Memory: each admitted request's peak KV reserved from now on
    (`memory` "peak": exact DP, checked against brute force), or the peak over time of
    every request's growing footprint ("trajectory" on the candidate curve's pace, "timeline" with
    the growth bound: the DP without memory, then the longest EDF prefix of its new admissions
    that fits, `fit_memory_over_time`)."""
    cache: dict[tuple, int] = {}
    alpha = view.spec_acceptance_rate
    tpots = problem.tpots_s
    times = candidate_step_times(tpots, max_spec_tokens, alpha) if tpots else [PREFILL_ONLY_STEP_S]
    bursts = [None]
    if use_bursts:
        bursts = burst_candidates(problem, view.now_s, previous_burst_end_s, min(times))
    best: Choice | None = None
    for step_time_s, burst in itertools.product(times, bursts):
        choice = _solve_one(problem, view, step_time_s, burst, max_spec_tokens, memory, cache)
        if choice is not None and (best is None or choice.score() > best.score()):
            best = choice
    if use_bursts and decoder_bursts:
        ttfts_s = [s.request.ttft_slo_s for s in (*view.running, *view.waiting)]
        max_step_s = min([BURST_STEP_S] + [DECODER_BURST_TTFT_FRACTION * t for t in ttfts_s])
        for step_time_s in times:
            burst = decoder_bound_burst(problem, view.now_s, step_time_s, max_step_s)
            if burst is None or burst in bursts:
                continue
            choice = _solve_one(problem, view, step_time_s, burst, max_spec_tokens, memory, cache)
            if choice is not None and (best is None or choice.score() > best.score()):
                best = choice
    return best


def _solve_one(
    problem: PlanningProblem,
    view: ReplicaView,
    step_time_s: float,
    burst: Burst | None,
    max_spec_tokens: int,
    memory: str,
    cache: dict[tuple[tuple[str, bool], ...], int],
) -> Choice | None:
    """The DP's admission for one step time and burst, or None when it cannot serve the running
    and mandatory requests."""
    curve = make_budget_curve(
        view.perf_model,
        view.now_s,
        step_time_s,
        problem.decoders,
        {j.tpot_s for j in problem.mandatory + problem.candidates if j.tpot_s is not None},
        max_spec_tokens,
        view.spec_acceptance_rate,
        burst,
        view.context_tokens_per_decode,
    )
    mandatory_tpots = {j.tpot_s for j in problem.mandatory if j.tpot_s is not None}
    if curve is None or not mandatory_tpots <= set(curve.tier_index):
        return None
    mandatory = relax_late(problem.mandatory + curve.deferred, curve)
    cap = problem.memory_cap_blocks if memory == "peak" else None
    admission = admit(mandatory + problem.candidates, curve, cap)
    if admission is None:
        return None
    if memory != "peak":
        curve_for_memory = curve if memory == "trajectory" else None
        admission = fit_memory_over_time(admission, problem, cache, curve_for_memory)
    num_relaxed = sum(j.deadline_s is None for j in mandatory) - sum(
        j.deadline_s is None for j in problem.mandatory
    )
    decode_s = decode_seconds(problem, curve, admission.admitted)
    return Choice(curve, admission, mandatory, num_relaxed, decode_s)


@register("slos_dp")
class SlosDP(Formulation):
    """Multi-SLO DP planner.

    Parameters: `fallback` ("reject" or "best_effort") for requests that cannot be guaranteed;
    `speculation` (use the engine's draft model adaptively when it has one); `max_new_per_call`
    (waiting requests considered per call, earliest deadline first; the rest keep waiting);
    `max_best_effort_steps` (explicit steps planned for best-effort prefill alone);
    `admit_all` (ablation "no burst handling": every waiting request is admitted and served in EDF
    order with no guarantee, as if admission control were off); `prefill_bursts` (open a plan with
    long prefill-only steps when every decoder is ahead of schedule, see budget.Burst);
    `decoder_bursts` (also open plans with the longest burst the running decoders' next deadlines
    allow, steps short against the TTFT SLOs present; see `decoder_bound_burst`);
    `memory` (memory_timeline.py: "trajectory", the default: the peak over time of every admitted
    request's KV on the trajectory the plan gives it, growing at its tier's pace to its planned
    length; "timeline": the same with the growth bound and release at the last deadline;
    "peak": each admitted request reserves its planned full-length KV from admission);
    `eager_decodes` (decoders also decode from a step's leftover token budget, their later slots
    still owed: they finish, and free their KV, sooner; batch_planner.py fill step 4);
    `distributed_lengths` (memory is planned on each request's predicted length distribution,
    the sum of the requests' KV at its 90th percentile, instead of every request at its own
    quantile; memory_timeline.planned_lengths and peak_blocks). Both are on by default (measured
    in docs/PLANNER.md section 13); off, they are the ablations.
    Tool chains (docs/AGENTS.md): `pin_kv` (keep a round's KV pinned over its chain's pause when
    that costs less than recomputing it; off: left evictable) and `plan_chains` (reserve each
    chain's expected later rounds, formulations/chain_forecast.py, when admitting its rounds;
    off: only the round at hand is planned). Both on by default; off, they are the ablations.
    """

    def __init__(
        self,
        fallback: str = "reject",
        speculation: bool = True,
        max_new_per_call: int = 48,
        max_best_effort_steps: int = 4,
        admit_all: bool = False,
        prefill_bursts: bool = True,
        memory: str = "trajectory",
        decoder_bursts: bool = True,
        eager_decodes: bool = True,
        distributed_lengths: bool = True,
        pin_kv: bool = True,
        plan_chains: bool = True,
    ) -> None:
        if memory not in MEMORY_MODES:
            known = ", ".join(MEMORY_MODES)
            raise ValueError(f"memory must be one of {known}, got {memory!r}")
        if max_new_per_call < 1 or max_best_effort_steps < 0:
            raise ValueError("max_new_per_call must be >= 1 and max_best_effort_steps >= 0")
        self.fallback = Fallback.parse(fallback)
        self.speculation = bool(speculation)
        self.max_new_per_call = max_new_per_call
        self.max_best_effort_steps = max_best_effort_steps
        self.admit_all = bool(admit_all)
        self.prefill_bursts = bool(prefill_bursts)
        self.memory = memory
        self.decoder_bursts = bool(decoder_bursts)
        self.eager_decodes = bool(eager_decodes)
        self.distributed_lengths = bool(distributed_lengths)
        self.pin_kv = bool(pin_kv)
        self.plan_chains = bool(plan_chains)
        self._burst_end_s: float | None = None  # end of the last plan's prefill burst

    def plan(self, view: ReplicaView) -> Plan:
        """A plan that fits the replica's KV blocks: when reality ran past the memory plan,
        requests are set aside (a resume waits, then the one with the most slack is preempted)
        and the replica planned again (formulations/overflow.py)."""
        plan = self._plan(view)
        resumes = waiting_resumes(view, plan)
        if resumes:
            aside = set_aside(view, resumes, drop_kv=False)
            plan = self._plan(aside)
            if not plan.steps and not plan.repeat:
                # Liveness: nothing else runs, so the earliest-due resume runs alone (it fits the
                # replica alone, or it would have been rejected as too large).
                first = min(resumes, key=lambda s: (s.next_token_deadline_s, s.request_id))
                aside = set_aside(view, [s for s in resumes if s is not first], drop_kv=False)
                plan = self._plan(aside)
            view = aside
        preempted: list[str] = []
        for _ in range(MAX_VICTIMS_PER_PLAN):
            victim = overflow_victim(view, plan)
            if victim is None:
                break
            preempted.append(victim.request_id)
            view = set_aside(view, [victim], drop_kv=True)
            plan = self._plan(view)
        if preempted:
            plan = dataclasses.replace(plan, preempt=tuple(preempted) + plan.preempt)
        return plan

    def kv_retention(self, view: ReplicaView, state: RequestState, pause: PauseEstimate) -> str:
        """Keep the round's KV over the chain's pause the cheapest way, in seconds of the
        replica: pinned, holding b of its B blocks for the pause's 90th percentile d costs
        (b/B) d when memory binds; copied to host memory (engines that offer it, with room),
        copying it back in costs its copy time; left to recompute costs its prefill time, only
        if a next round comes (its predicted chance, with `plan_chains`). Pinned KV stays under
        MAX_PINNED_SHARE of the blocks. When recomputing is cheapest the KV is left evictable
        (the engine's prefix cache may still have it when the round comes back)."""
        if not self.pin_kv:
            return "evictable"
        num_tokens = state.num_prompt_tokens + state.num_expected_output_tokens - 1
        num_blocks = num_blocks_for(num_tokens, view.block_size)
        num_total = view.num_total_blocks + view.num_kept_blocks
        next_p = state.chain_next_p if self.plan_chains else 1.0
        costs_s = {"evictable": next_p * view.perf_model.prefill_time_s(num_tokens)}
        if view.num_kept_blocks + num_blocks <= MAX_PINNED_SHARE * num_total:
            costs_s["pinned"] = num_blocks / num_total * pause.quantile_s
        if num_blocks <= view.num_host_free_blocks:
            costs_s["host"] = next_p * num_tokens * view.kv_swap_s_per_token
        return min(costs_s, key=lambda mode: (costs_s[mode], mode != "evictable"))

    def _plan(self, view: ReplicaView) -> Plan:
        problem = extract_problem(
            view, self.distributed_lengths, self.eager_decodes, self.plan_chains
        )
        protected = {s.request_id for s in view.waiting if s.protected}
        if not protected:
            return self._plan_problem(view, problem)
        # Later rounds of admitted chains are admitted as if already running (mandatory: a late
        # one loses its deadline check and is served first); only one whose KV can never fit is
        # rejected, and that verdict names the chain.
        kept = tuple(j for j in problem.candidates if j.request_id not in protected)
        forced = tuple(
            dataclasses.replace(j, mandatory=True)
            for j in problem.candidates
            if j.request_id in protected
        )
        problem = dataclasses.replace(
            problem, candidates=kept, mandatory=problem.mandatory + forced
        )
        plan = self._plan_problem(view, problem)
        decisions = dict(plan.decisions)
        for job in forced:
            decisions[job.request_id] = Decision(
                Verdict.ADMITTED, "a later round of an admitted chain"
            )
        for rid in problem.too_large:
            if rid in protected:
                decisions[rid] = Decision(Verdict.REJECTED, CHAIN_REJECTED)
        return dataclasses.replace(plan, decisions=decisions)

    def _plan_problem(self, view: ReplicaView, problem: PlanningProblem) -> Plan:
        deferred = self._defer(problem)
        if deferred:
            kept = tuple(j for j in problem.candidates if j.request_id not in deferred)
            problem = dataclasses.replace(problem, candidates=kept)
        max_spec = view.max_spec_tokens if self.speculation else 0
        if self.admit_all:  # ablation: everything becomes mandatory (late ones lose the check)
            forced = tuple(dataclasses.replace(j, mandatory=True) for j in problem.candidates)
            problem = dataclasses.replace(problem, mandatory=problem.mandatory + forced)
            choice = solve_candidates(problem, view, max_spec, self.prefill_bursts)
            problem = dataclasses.replace(
                problem, mandatory=problem.mandatory[: -len(forced) or None], candidates=forced
            )
        else:
            choice = solve_candidates(
                problem,
                view,
                max_spec,
                self.prefill_bursts,
                self._burst_end_s,
                self.memory,
                self.decoder_bursts,
            )
            burst = choice.curve.burst if choice is not None else None
            self._burst_end_s = burst.end_s(view.now_s) if burst is not None else None
        return assemble_plan(
            view,
            problem,
            choice,
            self.fallback,
            self.memory,
            self.max_best_effort_steps,
            self.eager_decodes,
        )

    def _defer(self, problem: PlanningProblem) -> set[str]:
        """Waiting requests beyond `max_new_per_call` (latest deadlines) wait for the next call."""
        if len(problem.candidates) <= self.max_new_per_call:
            return set()
        by_deadline = sorted(problem.candidates, key=lambda j: (j.deadline_s, j.request_id))
        return {j.request_id for j in by_deadline[self.max_new_per_call :]}
