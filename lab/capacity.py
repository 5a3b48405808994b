"""Serving capacity: the highest arrival rate at which at least `target` of all requests attain
every stage SLO (docs/ALGORITHM.md section 1), found by binary search over the rate.

The search only needs `evaluate(rate_rps) -> attainment`; `search_capacity` is therefore tested
against known synthetic attainment curves, and `formulation_capacity` plugs in the simulator.

Search (paper: 1..32 req/s, stop when the interval is under 0.3 req/s):
1. evaluate the upper bound; while it still attains, the bound so far becomes the lower end and the
   upper bound doubles (up to `max_rate_cap_rps`);
2. otherwise evaluate the lower bound; while it fails, halve it (down to `min_rate_floor_rps`;
   below that the capacity is 0);
3. bisect [passing, failing] until it is narrower than `tolerance_rps` (and, if set, than
   `relative_tolerance` times its upper end).
The capacity is the highest rate that passed and whose failing neighbour is within the tolerance.
Attainment need not be monotone in the rate (a simulated run is one sample); bisection keeps the
bracket consistent whatever it sees, and `CapacityResult.monotone` says whether the evaluated
points were.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

# Attainment may rise with the rate by this much before the points are called non-monotone
# (one simulated run per rate is a noisy sample).
MONOTONE_SLACK = 0.02


@dataclass(frozen=True)
class SearchParams:
    target: float = 0.9  # fraction of requests that must attain every stage SLO
    min_rate_rps: float = 1.0
    max_rate_rps: float = 32.0
    tolerance_rps: float = 0.3
    max_rate_cap_rps: float = 1024.0  # the upper bound doubles at most up to here
    min_rate_floor_rps: float = 0.05  # the lower bound halves at most down to here
    # Optional: also stop once the bracket is narrower than this fraction of its upper end, so
    # that small capacities (well under 1 req/s) are still found to a few percent.
    relative_tolerance: float | None = None

    def __post_init__(self) -> None:
        if not 0 < self.target <= 1:
            raise ValueError(f"the attainment target must be in (0, 1], got {self.target!r}")
        if not 0 < self.min_rate_floor_rps <= self.min_rate_rps < self.max_rate_rps:
            raise ValueError(
                "rates must satisfy 0 < min_rate_floor <= min_rate < max_rate, got "
                f"{self.min_rate_floor_rps}, {self.min_rate_rps}, {self.max_rate_rps}"
            )
        if self.max_rate_cap_rps < self.max_rate_rps:
            raise ValueError("max_rate_cap_rps must be at least max_rate_rps")
        if not self.tolerance_rps > 0:
            raise ValueError(f"the tolerance must be positive, got {self.tolerance_rps!r}")
        if self.relative_tolerance is not None and not 0 < self.relative_tolerance < 1:
            raise ValueError(
                f"relative_tolerance must be in (0, 1), got {self.relative_tolerance!r}"
            )

    def tolerance_at(self, high_rps: float) -> float:
        """Bracket width at which the bisection below `high_rps` stops."""
        if self.relative_tolerance is None:
            return self.tolerance_rps
        return min(self.tolerance_rps, self.relative_tolerance * high_rps)

    @property
    def expected_num_evaluations(self) -> int:
        """Evaluations of a search that needs no expansion: both bounds, then the bisection."""
        width = self.max_rate_rps - self.min_rate_rps
        return 2 + max(0, math.ceil(math.log2(width / self.tolerance_rps)))


@dataclass(frozen=True)
class CapacityPoint:
    rate_rps: float
    attainment: float


@dataclass(frozen=True)
class CapacityResult:
    label: str  # usually the formulation name
    capacity_rps: float  # 0.0: not even the lowest rate tried attained
    num_gpus: int
    target: float
    points: tuple[CapacityPoint, ...]  # in evaluation order
    failing_rate_rps: float | None  # lowest failing rate above the capacity (None: cap reached)
    extra: dict = field(default_factory=dict)  # e.g. scenario, perf model, window

    @property
    def capacity_per_gpu_rps(self) -> float:
        return self.capacity_rps / self.num_gpus

    @property
    def monotone(self) -> bool:
        """Whether attainment never rose with the rate (beyond MONOTONE_SLACK) at the points."""
        ordered = sorted(self.points, key=lambda p: p.rate_rps)
        return all(
            later.attainment <= earlier.attainment + MONOTONE_SLACK
            for earlier, later in zip(ordered, ordered[1:])
        )

    def to_dict(self) -> dict:
        return {
            "label": self.label,
            "capacity_rps": self.capacity_rps,
            "capacity_per_gpu_rps": self.capacity_per_gpu_rps,
            "num_gpus": self.num_gpus,
            "target": self.target,
            "failing_rate_rps": self.failing_rate_rps,
            "monotone": self.monotone,
            "points": [{"rate_rps": p.rate_rps, "attainment": p.attainment} for p in self.points],
            **self.extra,
        }


class _Probe:
    """Evaluates rates once each, records the points and drives the progress bar."""

    def __init__(self, evaluate: Callable[[float], float], target: float, bar) -> None:
        self._evaluate = evaluate
        self._target = target
        self._bar = bar
        self.points: list[CapacityPoint] = []
        self._seen: dict[float, float] = {}

    def passes(self, rate_rps: float) -> bool:
        if rate_rps not in self._seen:
            attainment = float(self._evaluate(rate_rps))
            if not 0.0 <= attainment <= 1.0:
                raise ValueError(f"attainment must be within [0, 1], got {attainment!r}")
            self._seen[rate_rps] = attainment
            self.points.append(CapacityPoint(rate_rps, attainment))
            if self._bar.total is not None and self._bar.n >= self._bar.total:
                self._bar.total = self._bar.n + 1
            self._bar.set_postfix(rate=f"{rate_rps:.2f}", attained=f"{attainment:.3f}")
            self._bar.update(1)
        return self._seen[rate_rps] >= self._target


def search_capacity(
    evaluate: Callable[[float], float],
    params: SearchParams = SearchParams(),
    *,
    label: str = "formulation",
    num_gpus: int = 1,
    show_progress: bool | None = None,
    progress_file: TextIO | None = None,
    extra: dict | None = None,
) -> CapacityResult:
    """Binary-search the capacity. `evaluate(rate_rps)` returns the fraction of requests that
    attained every stage SLO at that rate. `show_progress=None` shows the tqdm bar only on a tty."""
    from tqdm import tqdm

    if num_gpus < 1:
        raise ValueError(f"num_gpus must be at least 1, got {num_gpus}")
    bar = tqdm(
        total=params.expected_num_evaluations,
        desc=f"capacity {label}",
        unit="run",
        file=progress_file or sys.stderr,
        disable=False if show_progress else (None if show_progress is None else True),
        leave=True,
        dynamic_ncols=True,
    )
    probe = _Probe(evaluate, params.target, bar)
    try:
        low, high = _bracket(probe, params)
        if low is not None and high is not None:
            while high - low >= params.tolerance_at(high):
                mid = (low + high) / 2
                if probe.passes(mid):
                    low = mid
                else:
                    high = mid
    finally:
        bar.close()
    return CapacityResult(
        label=label,
        capacity_rps=low or 0.0,
        num_gpus=num_gpus,
        target=params.target,
        points=tuple(probe.points),
        failing_rate_rps=high,
        extra=dict(extra or {}),
    )


def _bracket(probe: _Probe, params: SearchParams) -> tuple[float | None, float | None]:
    """(highest passing, lowest failing) rate; None for a side that was never found."""
    high = params.max_rate_rps
    low: float | None = None
    while probe.passes(high):
        low = high
        if high >= params.max_rate_cap_rps:
            return low, None
        high = min(2 * high, params.max_rate_cap_rps)
    if low is not None:
        return low, high
    low_try = params.min_rate_rps
    while not probe.passes(low_try):
        high = low_try
        low_try /= 2
        if low_try < params.min_rate_floor_rps:
            return None, high
    return low_try, high


# ---- capacity of a formulation in the simulator


def formulation_capacity(
    experiment,
    formulation: str,
    params: SearchParams = SearchParams(),
    *,
    show_progress: bool | None = None,
    progress_file: TextIO | None = None,
    num_seeds: int = 1,
    early_stop: bool = True,
) -> CapacityResult:
    """Capacity of `formulation` on `experiment` (a `lab.experiment.Experiment`): every rate
    the search tries is simulated with the experiment's workload rescaled to that rate, once per
    seed (seed, seed + 1, ...); the attainment of a rate pools the items of all its runs, which
    smooths the noise of a single run."""
    import dataclasses

    from lab.experiment import check_formulation

    check_formulation(formulation)
    if num_seeds < 1:
        raise ValueError(f"the number of seeds must be at least 1, got {num_seeds}")
    experiments = [
        dataclasses.replace(experiment, seed=experiment.seed + k) for k in range(num_seeds)
    ]

    def evaluate(rate_rps: float) -> float:
        """Pooled attainment at `rate_rps`. The runs stop as soon as more items have failed
        than the target allows over all seeds (SimConfig.stop_after_failed_items): the rate
        fails either way, and its point records an upper bound of its attainment."""
        num_items = sum(e.workload(rate_rps).num_items for e in experiments)
        allowed = math.floor((1 - params.target) * num_items + 1e-9) if early_stop else None
        num_attained = num_failed = 0
        for e in experiments:
            if allowed is not None:
                e = dataclasses.replace(
                    e, sim_params={**e.sim_params, "stop_after_failed_items": allowed - num_failed}
                )
            report, result = e.run(formulation, rate_rps)
            if getattr(result, "stopped_early", False):
                return 1 - (allowed + 1) / num_items  # more than `allowed` failed
            num_attained += report.num_attained
            num_failed += report.num_items - report.num_attained
            if allowed is not None and num_failed > allowed:
                return 1 - num_failed / num_items  # the seeds left could all attain
        return num_attained / num_items if num_items else 0.0

    extra = {
        "formulation": formulation,
        "scenario": experiment.label,
        "perf_model": experiment.perf_model,
        "num_replicas": experiment.replicas_for(formulation),
        "num_requests": experiment.num_requests,
        "seeds": [e.seed for e in experiments],
    }
    return search_capacity(
        evaluate,
        params,
        label=formulation,
        num_gpus=experiment.num_gpus(formulation),
        show_progress=show_progress,
        progress_file=progress_file,
        extra=extra,
    )


def format_capacity_table(results: list[CapacityResult]) -> str:
    """One row per formulation: capacity in req/s and req/s per GPU."""
    lines = [f"{'formulation':<22}{'GPUs':>6}{'req/s':>10}{'req/s/GPU':>12}{'runs':>6}  note"]
    for r in results:
        note = "" if r.monotone else "attainment not monotone in the rate"
        if r.failing_rate_rps is None:
            note = "still attains at the search cap"
        elif r.capacity_rps == 0.0:
            note = "fails even at the lowest rate tried"
        lines.append(
            f"{r.label:<22}{r.num_gpus:>6}{r.capacity_rps:>10.2f}{r.capacity_per_gpu_rps:>12.2f}"
            f"{len(r.points):>6}  {note}".rstrip()
        )
    return "\n".join(lines)


def demo_comparison(
    scenario: str = "chatbot",
    formulations: tuple[str, ...] = ("vllm_fcfs", "sarathi", "slos_dp"),
    num_requests: int = 150,
) -> int:
    """A small simulated capacity comparison on one scenario (the interim `make demo`): the
    capacity of each formulation, then the full report of each at the lowest capacity found."""
    from formulations import registry
    from lab.experiment import Experiment

    known = set(registry.available())
    formulations = tuple(p for p in formulations if p in known)
    experiment = Experiment(scenario=scenario, num_requests=num_requests)
    params = SearchParams(tolerance_rps=0.5)
    results = [
        formulation_capacity(experiment, p, params, show_progress=True) for p in formulations
    ]
    print(f"Capacity on {scenario} ({num_requests} requests, {experiment.perf_model}):")
    print(format_capacity_table(results))
    rate = min((r.capacity_rps for r in results if r.capacity_rps > 0), default=1.0)
    for formulation in formulations:
        report, _ = experiment.run(formulation, rate)
        print()
        print(f"{formulation} at {rate:.2f} req/s")
        print(report.format_text())
    return 0
