"""Capacity search against known synthetic attainment curves (an injected evaluate function)."""

from __future__ import annotations

import io
import json

import pytest

from lab.capacity import CapacityPoint, CapacityResult, SearchParams, search_capacity
from lab.plots import plot_attainment_curves


def logistic_curve(threshold_rps: float, target: float = 0.9):
    """Attainment that is >= target exactly for rates <= threshold (and decreasing)."""

    def evaluate(rate_rps: float) -> float:
        return (
            target + (threshold_rps - rate_rps) * 0.01
            if rate_rps > threshold_rps
            else min(1.0, target + (threshold_rps - rate_rps) * 0.02)
        )

    return evaluate


@pytest.mark.parametrize("threshold", [1.7, 5.0, 12.34, 31.0])
def test_search_brackets_threshold(threshold):
    params = SearchParams()
    result = search_capacity(logistic_curve(threshold), params, label="x", show_progress=False)
    assert result.capacity_rps <= threshold < result.failing_rate_rps
    assert result.failing_rate_rps - result.capacity_rps < params.tolerance_rps
    assert result.monotone
    # The bisection takes about log2(31 / 0.3) ~ 7 steps after the two bounds.
    assert len(result.points) <= params.expected_num_evaluations + 1
    # Every evaluated point on the capacity side passed; every point above failed.
    for point in result.points:
        assert (point.attainment >= 0.9) == (point.rate_rps <= threshold)


def test_upper_bound_expands_when_it_still_attains():
    result = search_capacity(logistic_curve(100.0), SearchParams(), show_progress=False)
    assert result.capacity_rps <= 100.0 < result.failing_rate_rps
    assert result.failing_rate_rps - result.capacity_rps < 0.3
    assert any(p.rate_rps == 128.0 for p in result.points)


def test_cap_reached_reports_no_failing_rate():
    params = SearchParams(max_rate_rps=4.0, max_rate_cap_rps=8.0)
    result = search_capacity(lambda rate: 1.0, params, show_progress=False)
    assert result.capacity_rps == 8.0 and result.failing_rate_rps is None


def test_lower_bound_shrinks_and_zero_capacity():
    result = search_capacity(logistic_curve(0.4), SearchParams(), show_progress=False)
    assert result.capacity_rps <= 0.4 < result.failing_rate_rps
    nothing = search_capacity(lambda rate: 0.0, SearchParams(), show_progress=False)
    assert nothing.capacity_rps == 0.0 and nothing.capacity_per_gpu_rps == 0.0
    assert min(p.rate_rps for p in nothing.points) < SearchParams().min_rate_floor_rps * 2


def test_relative_tolerance_refines_small_capacities():
    params = SearchParams(relative_tolerance=0.05)
    result = search_capacity(logistic_curve(0.37), params, show_progress=False)
    assert result.capacity_rps <= 0.37 < result.failing_rate_rps
    assert result.failing_rate_rps - result.capacity_rps < 0.05 * result.failing_rate_rps
    coarse = search_capacity(logistic_curve(0.37), SearchParams(), show_progress=False)
    assert coarse.failing_rate_rps - coarse.capacity_rps > 0.05  # the absolute 0.3 stops early


def test_non_monotone_curve_still_returns_a_consistent_bracket():
    # A dip around 16.5 req/s (one unlucky simulated run) below a true threshold of 20 req/s;
    # above 20 the attainment (0.85) is higher than in the dip.
    def evaluate(rate):
        if 16.0 <= rate <= 17.0:
            return 0.5
        return 0.95 if rate <= 20 else 0.85

    result = search_capacity(evaluate, SearchParams(), show_progress=False)
    seen = {p.rate_rps: p.attainment for p in result.points}
    assert seen[result.capacity_rps] >= 0.9  # the capacity is a rate that passed
    assert seen[result.failing_rate_rps] < 0.9
    assert result.failing_rate_rps - result.capacity_rps < 0.3
    assert not result.monotone  # the dip was seen and is flagged


def test_each_rate_is_evaluated_once():
    calls = []

    def evaluate(rate):
        calls.append(rate)
        return 1.0 if rate <= 3 else 0.0

    search_capacity(evaluate, SearchParams(), show_progress=False)
    assert len(calls) == len(set(calls))


def test_per_gpu_and_json():
    result = search_capacity(
        logistic_curve(6.0),
        SearchParams(),
        label="edf",
        num_gpus=4,
        show_progress=False,
        extra={"scenario": "chatbot"},
    )
    assert result.capacity_per_gpu_rps == pytest.approx(result.capacity_rps / 4)
    data = json.loads(json.dumps(result.to_dict()))
    assert data["label"] == "edf" and data["scenario"] == "chatbot" and data["num_gpus"] == 4
    assert len(data["points"]) == len(result.points)


def test_progress_bar_writes_to_a_non_tty_stream():
    stream = io.StringIO()
    result = search_capacity(
        logistic_curve(3.0),
        SearchParams(),
        label="sarathi",
        show_progress=True,
        progress_file=stream,
    )
    text = stream.getvalue()
    assert "capacity sarathi" in text and "attained=" in text
    assert result.capacity_rps <= 3.0
    quiet = io.StringIO()
    search_capacity(logistic_curve(3.0), SearchParams(), show_progress=None, progress_file=quiet)
    assert quiet.getvalue() == ""  # auto mode stays silent off a tty


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(target=0.0),
        dict(target=1.5),
        dict(min_rate_rps=5.0, max_rate_rps=2.0),
        dict(tolerance_rps=0.0),
        dict(max_rate_cap_rps=10.0),
        dict(min_rate_rps=-1.0),
        dict(relative_tolerance=0.0),
        dict(relative_tolerance=1.0),
    ],
)
def test_bad_search_params(kwargs):
    with pytest.raises(ValueError):
        SearchParams(**kwargs)


def test_out_of_range_attainment_is_an_error():
    with pytest.raises(ValueError, match="within"):
        search_capacity(lambda rate: 1.5, SearchParams(), show_progress=False)


def test_plot_writes_png(tmp_path):
    results = [
        search_capacity(logistic_curve(t), SearchParams(), label=name, show_progress=False)
        for name, t in (("a", 4.0), ("b", 9.0))
    ]
    path = plot_attainment_curves(results, tmp_path / "sub" / "curves.png", title="t", per_gpu=True)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError):
        plot_attainment_curves([], tmp_path / "x.png")


def test_monotone_property_uses_rate_order():
    points = (CapacityPoint(4.0, 0.5), CapacityPoint(1.0, 1.0), CapacityPoint(2.0, 0.99))
    assert CapacityResult("p", 1.0, 1, 0.9, points, 2.0).monotone
    bumpy = points + (CapacityPoint(3.0, 0.8), CapacityPoint(3.5, 0.9))
    assert not CapacityResult("p", 1.0, 1, 0.9, bumpy, 2.0).monotone


def test_capacity_bars_png(tmp_path):
    from lab.plots import plot_capacity_bars

    path = plot_capacity_bars(
        {"chatbot": {"a": 1.0, "b": 2.0}, "coder": {"a": 0.5}}, tmp_path / "bars.png", title="t"
    )
    assert path.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError):
        plot_capacity_bars({}, tmp_path / "none.png")


# ------------------------------------------------------------------ stopping a failing rate early


def _overloaded():
    from lab.experiment import Experiment

    return Experiment(scenario="chatbot", num_requests=60, perf_model="opt-13b-2xa100")


@pytest.mark.parametrize("formulation", ["slos_dp", "vllm_fcfs"])
def test_a_run_stops_once_more_items_failed_than_allowed(formulation):
    import dataclasses

    from formulations.deadlines import check_attainment

    experiment = _overloaded()
    rate_rps = 40.0  # ~10x the capacity: most requests fail
    _, full = experiment.run(formulation, rate_rps)
    num_failed = sum(not r.attainment.ok for r in full.records)
    assert not full.stopped_early and num_failed > 10
    stopping = dataclasses.replace(experiment, sim_params={"stop_after_failed_items": 5})
    _, cut = stopping.run(formulation, rate_rps)
    assert cut.stopped_early
    # what made it stop: more than 5 items known to fail (rejected, or a late first token)
    known = [
        r
        for r in cut.records
        if r.verdict is not None
        and (
            r.verdict.value == "rejected"
            or (r.token_times_s and not check_attainment(r.request, r.token_times_s).ttft_ok)
        )
    ]
    assert len(known) > 5
    assert cut.sim_duration_s < full.sim_duration_s


@pytest.mark.parametrize("formulation", ["slos_dp", "vllm_fcfs"])
def test_early_stop_finds_the_same_capacity(formulation):
    from lab.capacity import formulation_capacity

    params = SearchParams(min_rate_rps=1.0, max_rate_rps=16.0, tolerance_rps=0.5)
    results = [
        formulation_capacity(_overloaded(), formulation, params, num_seeds=2, early_stop=early)
        for early in (True, False)
    ]
    assert results[0].capacity_rps == results[1].capacity_rps
    for with_stop, without in zip(results[0].points, results[1].points):
        assert with_stop.rate_rps == without.rate_rps
        # a stopped rate records an upper bound of its attainment, below the target
        assert with_stop.attainment >= without.attainment - 1e-9
        assert (with_stop.attainment >= 0.9) == (without.attainment >= 0.9)
