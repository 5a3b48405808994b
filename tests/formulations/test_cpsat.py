"""CP-SAT agrees with the DP (and so with brute force) on small random instances, and serves
plans."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings

from formulations.cpsat import CpSat
from formulations.plan import Verdict
from formulations.planning_problem import extract_problem
from formulations.registry import create
from formulations.slos_dp import solve_candidates
from tests.formulations.factories import request, view
from tests.formulations.plan_timing import deadline_misses
from tests.formulations.test_dp_vs_bruteforce import BLOCK, PERF, instances, reference_value


@settings(
    max_examples=40, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(instances())
def test_cpsat_value_equals_dp_and_brute_force(instance):
    perf, now_s, running, waiting, total_blocks = instance
    v = view(perf, now_s, running, waiting, total_blocks, BLOCK)
    problem = extract_problem(v)
    solver = CpSat(time_limit_s=5.0, hint_with_dp=False)  # no DP hint: an independent answer
    cp_choice = solver.solve(problem, v, max_spec_tokens=0)
    dp_choice = solve_candidates(problem, v, max_spec_tokens=0, use_bursts=False)
    cp_value = -1.0 if cp_choice is None else cp_choice.admission.value
    dp_value = -1.0 if dp_choice is None else dp_choice.admission.value
    assert "UNKNOWN" not in solver.last_status  # proven within the limit
    assert cp_value == dp_value == reference_value(*instance)


def test_cpsat_plan_meets_deadlines_and_is_selectable_by_name():
    waiting = [
        request(f"w{i}", 0.0, 300 + 150 * i, 30, 0.35, 0.05 if i % 2 else 0.1) for i in range(8)
    ]
    v = view(PERF, 0.0, [], waiting)
    plan = create("cpsat", time_limit_s=2.0).plan(v)
    admitted = {rid for rid, d in plan.decisions.items() if d.verdict is Verdict.ADMITTED}
    assert 0 < len(admitted) < 8
    assert not deadline_misses(plan, v, admitted)
    dp_plan = create("slos_dp", prefill_bursts=False).plan(v)  # the same model as cpsat
    dp_value = sum(d.verdict is Verdict.ADMITTED for d in dp_plan.decisions.values())
    assert len(admitted) == dp_value


def test_cpsat_serves_a_simulated_workload_with_the_guarantee():
    """Selected by name in the simulator like any formulation; its admitted requests attain."""
    from formulations.plan import Verdict as V
    from lab.simulator import SimConfig, simulate
    from lab.workloads.scenario import WorkloadOptions, build_workload

    workload = build_workload(
        "summarizer", PERF, WorkloadOptions(rate_rps=6.0, num_requests=30, seed=5)
    )
    config = SimConfig(
        formulation="cpsat", perf_model=PERF, formulation_params={"time_limit_s": 0.2}
    )
    result = simulate(workload, config)
    admitted = [r for r in result.records if r.verdict is V.ADMITTED]
    assert admitted and all(r.attainment.ok for r in admitted)
    assert any(r.verdict is V.REJECTED for r in result.records)
