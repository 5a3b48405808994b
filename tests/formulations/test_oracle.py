"""The offline oracle: an upper bound on attainment, checked on analytic cases and against what the
online planner achieves in the simulator."""

from __future__ import annotations

import pytest

from formulations.oracle import attainment_upper_bound, request_windows
from formulations.perf_model import perf_model_preset
from lab.simulator import SimConfig, simulate
from lab.workloads.scenario import WorkloadOptions, build_workload
from tests.formulations.factories import request

PERF = perf_model_preset("opt-13b-2xa100")


def test_simultaneous_prompts_that_do_not_fit_one_window():
    # max_tokens(1.05 * 0.1 s) = floor((0.105 - 0.0317) / 7.21e-5) = 1016: one 1000-token prompt
    # fits
    reqs = [request(f"r{i}", 0.0, 1000, 5, 0.1, 0.1) for i in range(3)]
    assert attainment_upper_bound(reqs, PERF).max_num_attained == 1


def test_spread_out_requests_all_fit():
    reqs = [request(f"r{i}", 2.0 * i, 1000, 20, 0.5, 0.1) for i in range(5)]
    result = attainment_upper_bound(reqs, PERF)
    assert result.max_num_attained == 5 and result.status == "OPTIMAL"


def test_request_too_big_for_its_own_slo_is_excluded():
    too_tight = request("tight", 0.0, 5000, 5, 0.2, 0.1)  # T(5000) = 0.39 s > 0.21 s
    # 49 decode steps of >= 31.8 ms each do not fit 1.05 * (0.2 + 49 * 0.01) s
    tiny_tpot = request("tpot", 0.0, 10, 50, 0.2, 0.01)
    assert attainment_upper_bound([too_tight, tiny_tpot], PERF).max_num_attained == 0


def test_windows_use_the_tolerance():
    r = request("r", 1.0, 100, 3, 0.2, 0.1)
    prefill, whole = request_windows(r)
    assert prefill.end_s == pytest.approx(1.0 + 1.05 * 0.2)
    assert whole.end_s == pytest.approx(1.0 + 1.05 * 0.2 + 1.05 * 0.2)
    assert whole.num_tokens == 102


@pytest.mark.parametrize("scenario,rate", [("coder", 4.0), ("summarizer", 8.0), ("chatbot", 10.0)])
def test_oracle_bounds_the_online_planner(scenario, rate):
    workload = build_workload(
        scenario, PERF, WorkloadOptions(rate_rps=rate, num_requests=50, seed=4)
    )
    bound = attainment_upper_bound(workload.requests, PERF, time_limit_s=20.0)
    for formulation in ("slos_dp", "vllm_fcfs"):
        attained = simulate(
            workload, SimConfig(formulation=formulation, perf_model=PERF)
        ).attainment
        assert attained <= bound.max_attainment + 1e-9
