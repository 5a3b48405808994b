"""The guarantee, end to end in the virtual-time simulator: with the engines' truth equal to the
planner's performance model and known output lengths, every request slos_dp admits attains its
SLOs; best-effort requests all finish. Random workloads with bursts, several models and memory
sizes, one and two replicas."""

from __future__ import annotations

import numpy as np
import pytest

from formulations.perf_model import Line, PerfModel, perf_model_preset
from formulations.plan import Verdict
from formulations.request import make_request
from formulations.slo import SLO
from lab.simulator import SimConfig, simulate
from lab.workloads.scenario import WorkloadOptions, build_workload
from lab.workloads.workload import Workload

OPT13B = perf_model_preset("opt-13b-2xa100")
TOY = PerfModel((Line(4e-4, 0.0, 0.01),), "toy")
CLASSES = ("chatbot", "coder", "summarizer", "reasoning")


def random_workload(seed: int, perf: PerfModel) -> Workload:
    """Bursts of 1..12 simultaneous requests of mixed classes and sizes."""
    rng = np.random.default_rng(seed)
    requests = []
    now_s = 0.0
    while len(requests) < 60:
        now_s += float(rng.exponential(0.8))
        for _ in range(int(rng.integers(1, 13))):
            cls = CLASSES[int(rng.integers(len(CLASSES)))]
            output = int(rng.integers(1, 300))
            thinking = int(rng.integers(0, output)) if cls == "reasoning" else 0
            slo = "custom-abs" if rng.random() < 0.2 else cls
            requests.append(
                make_request(
                    f"s{seed}-{len(requests)}",
                    now_s,
                    int(rng.integers(16, 3000)),
                    output,
                    SLO(tpot_s=float(rng.choice([0.05, 0.1])), ttft_s=float(rng.uniform(0.2, 2.0)))
                    if slo == "custom-abs"
                    else slo,
                    perf,
                    num_thinking_tokens=thinking,
                    value=float(rng.choice([1.0, 2.0])),
                )
            )
    return Workload(f"random-{seed}", tuple(requests))


def check(result) -> None:
    admitted = [r for r in result.records if r.verdict is Verdict.ADMITTED]
    missed = [r.request.request_id for r in admitted if not r.attainment.ok]
    assert admitted, "nothing admitted: the check would be empty"
    assert not missed, f"admitted requests missed their SLOs: {missed[:5]}"
    best_effort = [r for r in result.records if r.verdict is Verdict.BEST_EFFORT]
    assert all(r.finished for r in best_effort), "a best-effort request never finished"


@pytest.mark.parametrize("seed", range(16))
def test_admitted_requests_attain_on_random_bursts(seed):
    perf = OPT13B if seed % 2 == 0 else TOY
    config = SimConfig(
        formulation="slos_dp",
        perf_model=perf,
        fallback="best_effort",
        num_replicas=1 + seed % 3 // 2,
        num_blocks_per_replica=[None, 3000, 600, None][seed % 4],
        seed=seed,
        lengths="oracle",
    )
    check(simulate(random_workload(seed, perf), config))


@pytest.mark.parametrize(
    "scenario", ["chatbot", "coder", "summarizer", "reasoning", "tool_agent", "mixed"]
)
def test_admitted_requests_attain_in_every_scenario(scenario):
    workload = build_workload(
        scenario, OPT13B, WorkloadOptions(rate_rps=6.0, num_requests=40, seed=3, arrivals="bursty")
    )
    check(
        simulate(
            workload,
            SimConfig(
                formulation="slos_dp", perf_model=OPT13B, fallback="best_effort", lengths="oracle"
            ),
        )
    )


def test_rejections_do_happen_under_overload():
    """Overload: the guarantee holds because the planner refuses work, and it does refuse some."""
    workload = random_workload(99, OPT13B)
    result = simulate(
        workload,
        SimConfig(formulation="slos_dp", perf_model=OPT13B, fallback="reject", lengths="oracle"),
    )
    check(result)
    assert any(r.verdict is Verdict.REJECTED for r in result.records)
