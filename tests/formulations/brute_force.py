"""Independent reference for the admission DP: enumerate every subset of the waiting requests and
check each one with a plain step-by-step simulation of the budget-curve model (no DP, no slack
bookkeeping, no shared code with formulations/dp.py or formulations/budget.py).

The model it checks (docs/PLANNER.md): steps of T seconds hold at most max_tokens(T) tokens; a tier
with TPOT tau decodes every k = floor(tau / T) steps (rounded down to an allowed period), its
requests spread over residues m mod k least-loaded first (running decoders restricted to residues
that meet their next deadline), and a step reserves the busiest residue's count of each tier; an
admitted request's decode slots start after its TTFT deadline step; prefill is EDF over what is
left; every prefill must finish in a step ending by its deadline; memory is reserved at peak.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from formulations.perf_model import PerfModel

PERIODS = (1, 2, 3, 4, 6, 8, 12, 16, 24)


@dataclass(frozen=True)
class RunningDecoder:
    tpot_s: float
    next_deadline_s: float
    peak_blocks: int
    name: str = "d"


@dataclass(frozen=True)
class NewRequest:
    name: str
    prompt_tokens: int
    deadline_s: float
    tpot_s: float | None  # None: single output token
    peak_blocks: int
    value: float
    arrival_s: float


def _period(tpot_s: float, step_s: float) -> int:
    raw = int(tpot_s / step_s + 1e-9)
    return max([p for p in PERIODS if p <= raw], default=0)


def _pick(loads: list[int], upto: int) -> int:
    best = 0
    for r in range(min(upto, len(loads) - 1) + 1):
        if loads[r] < loads[best]:
            best = r
    return best


def feasible(
    perf: PerfModel,
    now_s: float,
    step_s: float,
    running: list[RunningDecoder],
    chosen: list[NewRequest],
    memory_blocks: int,
) -> bool:
    if (
        chosen
        and sum(r.peak_blocks for r in chosen) + sum(d.peak_blocks for d in running) > memory_blocks
    ):
        return False
    cap = perf.max_tokens(step_s, 0)
    tiers = sorted({d.tpot_s for d in running} | {r.tpot_s for r in chosen if r.tpot_s is not None})
    period = {t: _period(t, step_s) for t in tiers}
    if any(p == 0 for p in period.values()) or cap < 0:
        return False

    def last_step(deadline_s: float) -> int:
        return math.floor((deadline_s - now_s) / step_s + 1e-9) - 1

    # Running decoders due within their period decode from step 0; the others are ahead and join
    # like a new request whose deadline step is k steps before their own latest step.
    base = {t: [0] * period[t] for t in tiers}
    ahead = []
    for d in sorted(running, key=lambda d: (last_step(d.next_deadline_s), d.name)):
        latest = last_step(d.next_deadline_s)
        if latest >= period[d.tpot_s]:
            ahead.append(
                NewRequest(
                    d.name,
                    0,
                    d.next_deadline_s - period[d.tpot_s] * step_s,
                    d.tpot_s,
                    0,
                    0.0,
                    float("-inf"),
                )
            )
            continue
        r = 0 if latest < 0 else _pick(base[d.tpot_s], latest)
        base[d.tpot_s][r] += 1
    edf = sorted(
        list(chosen) + ahead,
        key=lambda r: (last_step(r.deadline_s), r.deadline_s, r.arrival_s, r.name),
    )
    if any(last_step(r.deadline_s) < 0 for r in edf):
        return False  # due before even one step can end
    left = {r.name: r.prompt_tokens for r in edf}
    horizon = max((last_step(r.deadline_s) for r in edf), default=-1)
    for m in range(horizon + 2):  # one extra step: the steady state with everyone decoding
        loads = {t: list(base[t]) for t in tiers}
        for r in edf:
            if r.tpot_s is not None and last_step(r.deadline_s) < m:
                loads[r.tpot_s][_pick(loads[r.tpot_s], 10**9)] += 1
        budget = cap - sum(max(loads[t]) for t in tiers)
        if budget < 0:
            return False
        for r in edf:
            take = min(budget, left[r.name])
            left[r.name] -= take
            budget -= take
        for r in edf:
            if last_step(r.deadline_s) == m and left[r.name] > 0:
                return False
    return all(v == 0 for v in left.values())


def best_value(
    perf: PerfModel,
    now_s: float,
    running: list[RunningDecoder],
    waiting: list[NewRequest],
    memory_blocks: int,
) -> float:
    """Highest total value of a feasible subset over every candidate step time (-1 if no step
    time can even serve the running decoders)."""
    step_times = sorted(
        {d.tpot_s for d in running} | {r.tpot_s for r in waiting if r.tpot_s is not None}
    )
    best = -1.0
    for step_s in step_times or [0.1]:
        if not feasible(perf, now_s, step_s, running, [], 1 << 40):
            continue
        for size in range(len(waiting), -1, -1):
            for subset in itertools.combinations(waiting, size):
                value = sum(r.value for r in subset)
                if value > best and feasible(
                    perf, now_s, step_s, running, list(subset), memory_blocks
                ):
                    best = value
    return best
