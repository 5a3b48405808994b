"""The multi-SLO admission dynamic program (docs/ALGORITHM.md section 4).

Jobs (new requests, and admitted requests still prefilling) are taken in EDF order of their TTFT
deadlines; running decoders are fixed load inside the `BudgetCurve`. A DP state after job j holds

    value   sum of admitted new requests' values        (maximise)
    memory  KV blocks reserved for admitted jobs         (minimise; peak blocks per request)
    slack   cumulative prefill supply through step M_j minus cumulative admitted prefill demand
            (the leftover budget carried forward)        (maximise)

keyed by the admitted count per TPOT tier, which is all the future supply depends on. Moving from
job i to job j adds the supply of steps M_i+1..M_j (`(M_j - M_i) * budget(counts)` on the plain
grid) to the slack; admitting j subtracts its prompt,
requires slack >= 0 (EDF meets every deadline iff the demand due by each deadline fits the supply
before it), memory within the cap, and a steady decode load that still fits a step
(`budget(counts + tier_j) >= 0`). Per key only the Pareto front over (value, memory, slack) is
kept; a dominated state cannot lead to a better final value, so the result is exact for this model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from formulations.budget import BudgetCurve, Job

# A DP state: (value, memory blocks, slack tokens, node id for backtracking).
_State = tuple[float, int, int, int]


@dataclass(frozen=True, slots=True)
class Admission:
    """The DP's answer: the admitted jobs (EDF order) and their total value."""

    admitted: tuple[Job, ...]
    value: float
    final_slack: int
    memory_blocks: int


def edf_order(jobs: Sequence[Job], curve: BudgetCurve) -> list[Job]:
    """Late jobs first, then by deadline step, deadline, arrival and id (a deterministic EDF)."""

    def key(job: Job) -> tuple:
        deadline = float("-inf") if job.deadline_s is None else job.deadline_s
        return (curve.deadline_step(job.deadline_s), deadline, job.arrival_s, job.request_id)

    return sorted(jobs, key=key)


def _pareto(states: list[_State]) -> list[_State]:
    """Drop states dominated in (value high, memory low, slack high)."""
    states.sort(key=lambda s: (-s[0], s[1], -s[2]))
    kept: list[_State] = []
    for state in states:
        if not any(k[1] <= state[1] and k[2] >= state[2] for k in kept):
            kept.append(state)
    return kept


def admit(
    jobs: Sequence[Job], curve: BudgetCurve, memory_cap_blocks: int | None
) -> Admission | None:
    """Most valuable feasible set of jobs that contains every mandatory one; None if the mandatory
    jobs alone are infeasible under this budget curve. `memory_cap_blocks` None: no memory check
    here (the caller checks memory over time, see memory_timeline.py)."""
    order = edf_order(jobs, curve)
    # Without a cap, memory is not tracked (0 per job), so it splits no Pareto front.
    track_memory = memory_cap_blocks is not None
    if memory_cap_blocks is None:
        memory_cap_blocks = 0
    # Mandatory jobs hold their memory already, wherever they fall in the order: new jobs share
    # what is left (nothing when the mandatory ones alone exceed the cap).
    memory_cap_blocks -= sum(j.peak_blocks for j in order if j.mandatory)
    # Backtracking nodes: (parent node, index into `order` of the job admitted there or -1).
    nodes: list[tuple[int, int]] = [(-1, -1)]
    layer: dict[tuple[int, ...], list[_State]] = {curve.zero_counts(): [(0.0, 0, 0, 0)]}
    position = -1  # deadline step M of the previous job
    for index, job in enumerate(order):
        deadline_step = curve.deadline_step(job.deadline_s)
        tier = curve.tier_index.get(job.tpot_s) if job.tpot_s is not None else None
        can_decode = (job.tpot_s is None or tier is not None) and curve.admissible(job)
        previous = position
        position = max(position, deadline_step)
        next_layer: dict[tuple[int, ...], list[_State]] = {}
        for counts, states in layer.items():
            gain = curve.supply(previous, position, counts)
            new_counts = counts
            if tier is not None:
                new_counts = counts[:tier] + (counts[tier] + 1,) + counts[tier + 1 :]
            steady_ok = can_decode and curve.budget(new_counts) >= 0
            for value, memory, slack, node in states:
                slack += gain
                if not job.mandatory:
                    next_layer.setdefault(counts, []).append((value, memory, slack, node))
                new_memory = memory + (job.peak_blocks if track_memory and not job.mandatory else 0)
                new_slack = slack - job.num_prefill_tokens
                if (
                    steady_ok
                    and (job.mandatory or new_memory <= memory_cap_blocks or not track_memory)
                    and (job.deadline_s is None or new_slack >= 0)
                ):
                    nodes.append((node, index))
                    new_value = value + (0.0 if job.mandatory else job.value)
                    next_layer.setdefault(new_counts, []).append(
                        (new_value, new_memory, new_slack, len(nodes) - 1)
                    )
        layer = {counts: _pareto(states) for counts, states in next_layer.items()}
        if not layer:
            return None
    best = max(
        (state for states in layer.values() for state in states),
        key=lambda s: (s[0], s[2], -s[1]),
    )
    return Admission(_backtrack(nodes, best[3], order), best[0], best[2], best[1])


def _backtrack(nodes: list[tuple[int, int]], node: int, order: Sequence[Job]) -> tuple[Job, ...]:
    admitted: list[Job] = []
    while node > 0:
        parent, index = nodes[node]
        admitted.append(order[index])
        node = parent
    return tuple(reversed(admitted))
