"""Simulator speed: simulated seconds per wall-clock second (target >= 1000x on one core) for the
chatbot scenario, OPT-13B on two A100s, each baseline at its own capacity rate.

For every baseline: a quick capacity search (`lab.capacity.formulation_capacity`, a short trace
window) finds its rate; then one longer run at that rate is timed, with and without the
fast-forward of steady decode cycles. "Simulated seconds" run from the first arrival to the last
event. Wall time and this process's CPU time are both reported: on a shared machine the CPU time is
the fairer one-core number. One warm-up run first, so that module imports are not timed.

    python benchmarks/bench_simulator_speed.py [--formulations a,b] [--num-requests N]
        [--search-requests N] [--no-write]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.report_section import write_section  # noqa: E402
from lab.capacity import SearchParams, formulation_capacity  # noqa: E402
from lab.experiment import Experiment  # noqa: E402
from lab.simulator import simulate  # noqa: E402

BASELINES = ("vllm_fcfs", "vllm_prefill_first", "sarathi", "edf", "distserve")
TARGET_SPEEDUP = 1000.0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formulations", default=",".join(BASELINES))
    parser.add_argument("--num-requests", type=int, default=1000, help="requests in the timed run")
    parser.add_argument("--search-requests", type=int, default=1000, help="requests per search run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the fastest counts")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    return parser.parse_args(argv)


def timed_run(
    experiment: Experiment, formulation: str, rate_rps: float, fast_forward: bool, repeats: int = 1
) -> dict:
    """One simulated run, timed `repeats` times; the fastest counts (the machine is shared, and
    other work only ever slows a run down)."""
    config = dataclasses.replace(experiment.sim_config(formulation), fast_forward=fast_forward)
    workload = experiment.workload(rate_rps)
    runs = []
    for _ in range(repeats):
        cpu_start = time.process_time()
        result = simulate(workload, config)
        runs.append((time.process_time() - cpu_start, result))
    cpu_s, result = min(runs, key=lambda run: run[0])
    return {
        "sim_s": result.sim_duration_s,
        "wall_s": result.wall_s,
        "cpu_s": cpu_s,
        "speed_wall": result.sim_duration_s / result.wall_s,
        "speed_cpu": result.sim_duration_s / cpu_s if cpu_s > 0 else float("inf"),
        "num_steps": result.num_steps,
        "ff_share": result.num_fast_forward_steps / max(1, result.num_steps),
        "num_replans": result.num_replans,
        "mean_replan_us": 1e6 * result.replan_wall_total_s / max(1, result.num_replans),
        "attainment": result.attainment,
        "num_requests": len(result.records),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    formulations = [p for p in args.formulations.split(",") if p]
    search = Experiment(scenario="chatbot", num_requests=args.search_requests, seed=args.seed)
    timed = Experiment(scenario="chatbot", num_requests=args.num_requests, seed=args.seed)
    timed_run(search, formulations[0], 1.0, True)  # warm-up: imports, caches

    rows = []
    for formulation in formulations:
        capacity = formulation_capacity(
            search,
            formulation,
            SearchParams(min_rate_rps=0.5, max_rate_rps=16.0, tolerance_rps=0.3),
            show_progress=False,
        )
        rate_rps = max(capacity.capacity_rps, 0.5)
        fast = timed_run(timed, formulation, rate_rps, True, args.repeats)
        slow = timed_run(timed, formulation, rate_rps, False, args.repeats)
        rows.append((formulation, timed.replicas_for(formulation), rate_rps, fast, slow))
        print(
            f"{formulation:<20} rate {rate_rps:5.2f} req/s  sim {fast['sim_s']:7.0f}s  "
            f"x{fast['speed_wall']:6.0f} wall  x{fast['speed_cpu']:6.0f} cpu  "
            f"(no fast-forward: x{slow['speed_cpu']:5.0f} cpu)  ff {fast['ff_share']:.0%}",
            flush=True,
        )

    body = format_table(rows, args)
    print(body)
    if not args.no_write:
        command = "python benchmarks/bench_simulator_speed.py " + " ".join(argv or [])
        write_section("simulator_speed", body, command.strip())
    return 0


def format_table(rows, args) -> str:
    lines = [
        "## Simulator speed (chatbot, OPT-13B on 2 x A100, each baseline at its capacity rate)",
        "",
        f"Target: >= {TARGET_SPEEDUP:.0f}x real time on one core. Rate = capacity found by a quick "
        f"search on {args.search_requests} requests; the timed run has {args.num_requests} requests, "
        f"timed {args.repeats} times, the fastest kept (the machine is shared: other work only "
        "slows a run down; between runs of the same code the time varied by up to 40% here). "
        "Speed = simulated seconds / seconds of wall or CPU time (CPU time of this process is the "
        "fair one-core number on a shared machine). `ff` = share of engine steps applied by the "
        "fast-forward of steady decode cycles, which gives the same result as single steps "
        "(tests/lab/test_simulator.py).",
        "",
        "| formulation | replicas | rate (req/s) | simulated (s) | wall (s) | CPU (s) | x wall | x CPU "
        "| x CPU without fast-forward | steps | ff | replans | mean replan (us) | attainment |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for formulation, replicas, rate_rps, fast, slow in rows:
        lines.append(
            f"| {formulation} | {replicas} | {rate_rps:.2f} | {fast['sim_s']:.0f} | {fast['wall_s']:.3f} "
            f"| {fast['cpu_s']:.3f} | {fast['speed_wall']:.0f} | {fast['speed_cpu']:.0f} "
            f"| {slow['speed_cpu']:.0f} | {fast['num_steps']} | {fast['ff_share']:.0%} "
            f"| {fast['num_replans']} | {fast['mean_replan_us']:.0f} | {fast['attainment']:.3f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
