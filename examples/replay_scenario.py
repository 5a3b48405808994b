"""Replay one of the six scenarios against a running planner at a given rate, with a live summary
line per second, then print the SLO report (vLLM-style block plus per-class attainment).

    python examples/replay_scenario.py --scenario mixed --rate 2 --duration-s 20
"""

from __future__ import annotations

import argparse

from formulations.perf_model import perf_model_preset
from lab.replay import replay
from lab.report import build_report
from lab.workloads import SCENARIO_NAMES, WorkloadOptions, build_workload
from planner_svc.client import PlannerClient


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--planner", default="tcp://127.0.0.1:5558", help="client endpoint")
    parser.add_argument("--scenario", default="chatbot", choices=[*SCENARIO_NAMES])
    parser.add_argument("--rate", type=float, default=2.0, help="items per second")
    parser.add_argument("--duration-s", type=float, default=20.0)
    parser.add_argument(
        "--perf-model",
        default="opt-13b-h100",
        help="model used to build the workload (context filter, SLOs)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    workload = build_workload(
        args.scenario,
        perf_model_preset(args.perf_model),
        WorkloadOptions(
            rate_rps=args.rate, num_requests=None, duration_s=args.duration_s, seed=args.seed
        ),
    )
    print(f"replaying {workload.num_items} {args.scenario} items at {args.rate:g}/s")
    with PlannerClient(args.planner) as client:
        result = replay(client, workload, drain_timeout_s=60)
    print(build_report(result.records, workload).format_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
