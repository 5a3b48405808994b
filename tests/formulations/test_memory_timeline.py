"""The KV-over-time bound (formulations/memory_timeline.py) against a direct evaluation on a dense
time grid, and end to end: with the timeline check, slos_dp admits more long reasoning requests
than with peak reservation, the engine never runs out of KV blocks, and every admitted request
attains (truth = model)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from formulations.memory_timeline import SUM_QUANTILE_Z, Footprint, Growth, peak_blocks
from formulations.perf_model import perf_model_preset
from formulations.plan import Verdict
from formulations.request import make_request
from lab.simulator import SimConfig, Simulation, simulate
from lab.workloads.workload import Workload

OPT13B = perf_model_preset("opt-13b-2xa100")


def held_blocks(prints, t_s, now_s, block_size) -> int:
    """Sum of each request's footprint at t, written out from the definition (no shared code)."""
    total = 0
    for f in prints:
        if f.release_s is not None and t_s > f.release_s:
            continue
        grown = math.floor((t_s - now_s) * f.tokens_per_s + 1e-9) + f.num_extra_tokens
        tokens = min(f.num_peak_tokens, f.num_start_tokens + grown)
        total += -(-tokens // block_size)
    return total


@st.composite
def footprints(draw):
    """Requests growing at their own pace (the trajectory description) or at one shared bound."""
    shared = draw(st.booleans())
    rate, per_step = draw(st.sampled_from((2.0, 33.3, 150.0))), draw(st.integers(1, 3))
    prints = []
    for i in range(draw(st.integers(0, 8))):
        start = draw(st.integers(1, 500))
        if not shared:
            rate, per_step = draw(st.floats(0.5, 200.0)), draw(st.integers(1, 5))
        prints.append(
            Footprint(
                f"r{i}",
                start,
                start + draw(st.integers(0, 3000)),
                draw(st.one_of(st.none(), st.floats(0.0, 60.0))),
                rate,
                2 * per_step,
            )
        )
    return prints


@settings(max_examples=200, derandomize=True, deadline=None)
@given(footprints(), st.sampled_from((1, 16)))
def test_peak_is_the_supremum_over_time(prints, block_size):
    peak = peak_blocks(prints, 0.0, block_size)
    releases = [f.release_s for f in prints if f.release_s is not None]
    grid = list(np.linspace(0.0, 70.0, 1401)) + releases + [1e6]
    direct = [held_blocks(prints, t, 0.0, block_size) for t in grid]
    assert peak >= max(direct, default=0)  # an upper bound at every instant...
    assert peak == max(direct, default=0)  # ...and reached (at a release or at infinity)


@st.composite
def distributed_footprints(draw):
    """Requests with 1..4 equally likely outcomes of their length: shared start, pace and steps in
    flight, their own peak and release (as `footprints` and `paced` make them)."""
    prints = []
    for i in range(draw(st.integers(0, 6))):
        start = draw(st.integers(1, 300))
        rate, extra = draw(st.floats(0.5, 200.0)), draw(st.integers(0, 6))
        num_outcomes = draw(st.integers(1, 4))
        never = draw(st.booleans()) and draw(st.booleans())
        for _ in range(num_outcomes):
            release_s = None if never else draw(st.floats(0.0, 60.0))
            peak = start + draw(st.integers(0, 3000))
            prints.append(
                Footprint(f"r{i}", start, peak, release_s, rate, extra, 1, 1 / num_outcomes)
            )
    return prints


def mean_plus_spread(prints, t_s, now_s, block_size) -> float:
    """Sum over requests of E[blocks at t] + z * sqrt(sum of Var[blocks at t]), by definition."""
    by_request: dict[str, list[tuple[float, int]]] = {}
    for f in prints:
        blocks = held_blocks([f], t_s, now_s, block_size)
        by_request.setdefault(f.request_id, []).append((f.weight, blocks))
    mean = variance = 0.0
    for outcomes in by_request.values():
        m = sum(w * b for w, b in outcomes)
        mean += m
        variance += sum(w * b * b for w, b in outcomes) - m * m
    return mean + SUM_QUANTILE_Z * math.sqrt(max(0.0, variance))


@settings(max_examples=200, derandomize=True, deadline=None)
@given(distributed_footprints(), st.sampled_from((1, 16)))
def test_distributed_peak_is_the_worst_mean_plus_spread(prints, block_size):
    peak = peak_blocks(prints, 0.0, block_size)
    releases = [f.release_s for f in prints if f.release_s is not None]
    grid = list(np.linspace(0.0, 70.0, 1401)) + releases + [1e6]
    direct = max((mean_plus_spread(prints, t, 0.0, block_size) for t in grid), default=0.0)
    assert math.ceil(direct - 1e-6) <= peak <= math.ceil(direct + 1e-6)


def test_spread_of_independent_lengths_grows_like_the_square_root():
    # n requests, each 0 or 100 blocks at t = 0 with probability 1/2: mean 50 n, sd 50 sqrt(n).
    def prints(n):
        return [
            Footprint(f"r{i}", tokens, tokens, 1.0, 0.0, 0, 1, 0.5)
            for i in range(n)
            for tokens in (0, 100 * 16)
        ]

    for n in (1, 4, 64):
        expected = 50 * n + SUM_QUANTILE_Z * 50 * math.sqrt(n)
        assert peak_blocks(prints(n), 0.0, 16) == math.ceil(expected - 1e-9)
    # the per-request 90th percentile would reserve 100 n
    assert peak_blocks(prints(64), 0.0, 16) < 0.7 * 100 * 64


def test_growth_and_release_cases_by_hand():
    growth = Growth(10.0, 1)  # 10 tokens/s, 1 per step

    def fp(rid, start, peak, release_s):
        return Footprint(rid, start, peak, release_s, growth.tokens_per_s, growth.num_extra_tokens)

    # Two requests of 10 tokens growing to 40; one freed at 1.0 s. Blocks of 10 tokens.
    a = fp("a", 10, 40, 1.0)
    b = fp("b", 10, 40, 5.0)
    # at 1.0 s: floor(10) + 2 = 12 tokens more -> 22 tokens -> 3 blocks each: 6.
    # at 5.0 s: only b, capped at 40 tokens -> 4 blocks.
    assert peak_blocks([a, b], 0.0, 10) == 6
    # A request with no release bound grows to its peak and holds it for ever: 9 blocks at
    # infinity beat 3 + 3 at 1.0 s.
    assert peak_blocks([a, fp("c", 10, 90, None)], 0.0, 10) == 9
    assert peak_blocks([a, fp("c", 10, 50, None)], 0.0, 10) == 6
    # On a slower trajectory (2 tokens/s, no steps in flight), a at 1.0 s holds 12 tokens: 2 blocks.
    slow = Footprint("a", 10, 40, 1.0, 2.0, 0)
    assert peak_blocks([slow, b], 0.0, 10) == 2 + 3


def reasoning_workload(num_requests: int, gap_s: float) -> Workload:
    """Reasoning requests of mixed lengths (100..3000 output tokens), one every `gap_s`: short ones
    finish long before long ones reach their peak, which only the timeline check can use."""
    rng = np.random.default_rng(0)
    requests = []
    for i in range(num_requests):
        num_output = int(rng.integers(100, 3000))
        requests.append(
            make_request(
                f"q{i}",
                i * gap_s,
                int(rng.integers(50, 400)),
                num_output,
                "reasoning",
                OPT13B,
                num_thinking_tokens=num_output - 50,
            )
        )
    return Workload("reasoning-mixed-lengths", tuple(requests))


def run(memory: str, errors: list[str], lengths: str = "oracle"):
    original = Simulation._on_step

    def on_step(self, now_s, event, run_ends_s=None):
        _, report = event
        if report.error:
            errors.append(report.error)
        return original(self, now_s, event, run_ends_s)

    config = SimConfig(
        formulation="slos_dp",
        perf_model=OPT13B,
        num_blocks_per_replica=1200,  # 19200 tokens
        formulation_params={"memory": memory},
        lengths=lengths,
    )
    Simulation._on_step = on_step
    try:
        return simulate(reasoning_workload(40, 1.0), config)
    finally:
        Simulation._on_step = original


def test_growth_rate_of_a_model_with_draft_steps():
    # OPT-13B: T(0, s) = 31.7 ms + 3.34 ms * s; (1 + s) / T(0, s) is largest at s = 4 here.
    growth = Growth.for_model(OPT13B, 4)
    assert growth.tokens_per_step == 5
    assert growth.tokens_per_s == pytest.approx(5 / (0.0317 + 4 * 0.00334))
    assert Growth.for_model(OPT13B, 0).tokens_per_s == pytest.approx(1 / 0.0317)


@pytest.mark.parametrize("memory", ["peak", "timeline"])
def test_memory_modes_keep_the_guarantee_and_never_run_out_of_blocks(memory):
    errors: list[str] = []
    result = run(memory, errors)
    admitted = [r for r in result.records if r.verdict is Verdict.ADMITTED]
    assert admitted and all(r.attainment.ok for r in admitted)
    assert not errors, errors[:3]


def test_timeline_admits_more_long_reasoning_requests_than_peak_reservation():
    counts = {}
    for memory in ("peak", "timeline"):
        result = run(memory, [])
        counts[memory] = sum(r.verdict is Verdict.ADMITTED for r in result.records)
    assert counts["timeline"] > counts["peak"], counts


def test_trajectories_admit_at_least_as_many_and_the_engine_never_overflows():
    """With known lengths, KV counted on the trajectories the plan gives (the default) admits at
    least what the timeline bound does; predictions that fall short are caught before an engine
    runs out of blocks (no step refused), and every request ends."""
    counts = {}
    for memory in ("timeline", "trajectory"):
        errors: list[str] = []
        result = run(memory, errors)
        counts[memory] = sum(r.verdict is Verdict.ADMITTED for r in result.records)
        assert not errors, errors[:3]
        assert all(r.finished or r.verdict is Verdict.REJECTED for r in result.records)
    assert counts["trajectory"] >= counts["timeline"], counts
