"""Scaling benchmark: the planner daemon driving 1, 2, 4, 8 and 16 replicas of sim engines (each
an engine process, as `slos-serve serve` runs them) at the replicas' capacity rate.

For each replica count N:
1. capacity: the chatbot capacity of `slos_dp` on N x `opt-13b-h100` replicas, found in the
   simulator (90% attainment) on the very workload served next (150 x N requests, so that every N
   is judged on as many requests per replica, as bench_planner's scaling part does); "linear"
   compares it with N times the 1-replica capacity;
2. served: the daemon (its own process) and N sim engine processes serve that window at that rate
   through the Python client, and we measure attainment (client clock), the planner's CPU share
   (CPU seconds / wall seconds of serving, from /proc), the core's per-call time (p99, from the
   daemon's Prometheus histogram: an upper bucket bound), each engine's report -> answer round
   trip p99, and the engines' plan-wait share (time with live requests but no step to run,
   over busy + plan-wait time).

Time scale. 16 real-time replicas do not fit 2 cores together with the planner and the client, so
the engines sleep `time_scale` x each step's modelled time (`slos-serve engine --time-scale`) and
the planner plans with the model and the SLO targets scaled alike (deploy.Deployment.time_scaled):
every decision is the one made at full speed, arrivals are stretched by the same factor, and the
planner has `time_scale` times fewer calls per second to make. What that changes in the numbers:
- planner CPU share: measured at the scaled rate; at real time it would be about `time_scale`
  times higher (the same calls, per-call cost unchanged): shown as a projection;
- plan-wait share: the waits (network round trip + planner time) are not stretched but the steps
  are, so the measured share is diluted; the projection divides the same absolute wait per step by
  the unscaled step time. Queueing in the planner, which grows with its load, is not projected.
It also runs N = 1, 2, 4 at real time (time scale 1) to check the projections there (skip with
`--no-calibrate`). About 25 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from report_section import write_section

from deploy.deployment import load_deployment
from deploy.processes import ProcessGroup, cli, free_port, wait_for_engines
from formulations.perf_model import perf_model_preset
from lab.capacity import SearchParams, search_capacity
from lab.replay import replay
from lab.simulator import SimConfig, simulate
from lab.workloads import WorkloadOptions, build_workload
from planner_svc.client import PlannerClient

MODEL = "opt-13b-h100"
FORMULATION = "slos_dp"
NUM_BLOCKS = 3500
IMG = Path(__file__).resolve().parent.parent / "docs" / "img" / "scaling.png"


def workload(rate_rps: float, num_requests: int):
    options = WorkloadOptions(rate_rps=rate_rps, num_requests=num_requests, seed=0)
    return build_workload("chatbot", perf_model_preset(MODEL), options)


def sim_capacity(num_replicas: int, num_requests: int) -> float:
    config = SimConfig(
        formulation=FORMULATION,
        num_replicas=num_replicas,
        perf_model=perf_model_preset(MODEL),
        num_blocks_per_replica=NUM_BLOCKS,
    )

    def attainment(rate_rps: float) -> float:
        return simulate(workload(rate_rps, num_requests), config).attainment

    guess = 5.5 * num_replicas
    params = SearchParams(
        min_rate_rps=0.6 * guess,
        max_rate_rps=1.4 * guess,
        tolerance_rps=0.01 * guess,
    )
    result = search_capacity(attainment, params, label=f"{num_replicas}", show_progress=False)
    return result.capacity_rps


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def planner_tables(
    tmp: Path, time_scale: float, engine_port: int, client_port: int, metrics_port: int
) -> Path:
    """The planner config `slos-serve serve` would write for these sim engines (time-scaled)."""
    base = load_deployment()
    deployment = base.replace(engine_options={**base.engine_options, "time_scale": time_scale})
    deployment = deployment.replace(
        network=dataclasses.replace(base.network, metrics_port=metrics_port)
    )
    tables = deployment.time_scaled(deployment.planner_tables(engine_port, client_port), tmp)
    path = tmp / f"planner-{engine_port}.json"
    path.write_text(json.dumps(tables))
    return path


def p99_bucket_s(metrics_text: str) -> float:
    """The smallest histogram bound under which 99% of the core's calls fell (all events)."""
    counts: dict[float, float] = {}
    for line in metrics_text.splitlines():
        if line.startswith("slos_replan_seconds_bucket{"):
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            value = float(line.rsplit(" ", 1)[1])
            key = float("inf") if bound == "+Inf" else float(bound)
            counts[key] = counts.get(key, 0.0) + value
    total = counts.get(float("inf"), 0.0)
    for bound in sorted(counts):
        if total and counts[bound] >= 0.99 * total:
            return bound
    return float("nan")


def serve_run(
    tmp: Path, num_replicas: int, rate_rps: float, num_requests: int, time_scale: float
) -> dict:
    engine_port, client_port, metrics_port = free_port(), free_port(), free_port()
    config = planner_tables(tmp, time_scale, engine_port, client_port, metrics_port)
    virtual = workload(rate_rps, num_requests)
    stretched = dataclasses.replace(
        virtual,
        requests=tuple(
            dataclasses.replace(r, arrival_s=r.arrival_s * time_scale) for r in virtual.requests
        ),
    )
    group = ProcessGroup(label="bench")
    stats_paths = []
    try:
        planner = group.start(
            "planner", [*cli(), "planner", "--config", str(config), "--log-level", "WARNING"]
        )
        for i in range(num_replicas):
            stats_paths.append(tmp / f"engine-{engine_port}-{i}.json")
            group.start(
                f"engine-{i}",
                [
                    *cli(), "engine", "--engine", "sim",
                    "--connect", f"tcp://127.0.0.1:{engine_port}",
                    "--engine-id", f"engine-{i}",
                    "--perf-model", MODEL, "--num-blocks", str(NUM_BLOCKS), "--seed", str(i),
                    "--time-scale", str(time_scale),
                    "--stats-json", str(stats_paths[-1]),
                ],
            )  # fmt: skip
        with PlannerClient(f"tcp://127.0.0.1:{client_port}") as client:
            wait_for_engines(client, num_replicas, group)
            cpu_start_s, wall_start_s = cpu_seconds(planner.pid), time.monotonic()
            result = replay(client, stretched, drain_timeout_s=60 * time_scale, show_summary=False)
            cpu_s = cpu_seconds(planner.pid) - cpu_start_s
            wall_s = time.monotonic() - wall_start_s
            load_average = os.getloadavg()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            core_p99_s = p99_bucket_s(r.read().decode())
    finally:
        group.stop_all()
    engines = [json.loads(p.read_text()) for p in stats_paths if p.exists()]
    busy_s = sum(e["busy_s"] for e in engines)
    wait_s = sum(e["plan_wait_s"] for e in engines)
    num_steps = sum(e["num_steps"] for e in engines)
    wait_per_step_s = wait_s / max(1, num_steps)
    real_step_s = busy_s / max(1, num_steps) / time_scale
    records = result.records
    attained = sum(1 for r in records if r.attainment.ok)
    return {
        "replicas": num_replicas,
        "time_scale": time_scale,
        "rate_rps": rate_rps,
        "num_requests": len(records),
        "attainment": attained / max(1, len(records)),
        "num_unfinished": result.num_unfinished,
        "wall_s": wall_s,
        "planner_cpu_share": cpu_s / wall_s,
        "core_p99_s": core_p99_s,
        "answer_p99_s": max((e["answer_p99_s"] or 0.0) for e in engines)
        if engines
        else float("nan"),
        "plan_wait_share": wait_s / (busy_s + wait_s) if busy_s + wait_s else 0.0,
        "wait_per_step_ms": 1000 * wait_per_step_s,
        "plan_wait_share_real": wait_per_step_s / (real_step_s + wait_per_step_s)
        if num_steps
        else 0.0,
        "num_engine_stats": len(engines),
        "load_average": load_average,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="planner daemon scaling benchmark")
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--time-scale", type=float, default=4.0)
    parser.add_argument(
        "--requests-per-replica", type=int, default=150, help="workload size: this x replicas"
    )
    parser.add_argument(
        "--no-calibrate",
        dest="calibrate",
        action="store_false",
        help="skip the runs of N=1,2,4 at time scale 1 that check the projections",
    )
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument(
        "--from-rows", help="write the section from the JSON rows a run printed (no run)"
    )
    args = parser.parse_args(argv)
    if args.from_rows:
        rows = [json.loads(line) for line in Path(args.from_rows).read_text().splitlines()]
        rows = [r for r in rows if isinstance(r, dict) and "replicas" in r]
        write_results(rows, {r["replicas"]: r["rate_rps"] for r in rows}, args)
        return 0

    capacities = {}
    for n in sorted(set(args.replicas) | ({1, 2, 4} if args.calibrate else set())):
        start_s = time.perf_counter()
        capacities[n] = sim_capacity(n, args.requests_per_replica * n)
        print(f"capacity, {n} replica(s): {capacities[n]:.2f} req/s "
              f"({time.perf_counter() - start_s:.0f}s)", flush=True)  # fmt: skip
    runs = []
    plan = [(n, args.time_scale) for n in args.replicas]
    if args.calibrate:
        plan += [(n, 1.0) for n in (1, 2, 4)]
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as tmp:
        for n, scale in plan:
            num_requests = args.requests_per_replica * n
            row = serve_run(Path(tmp), n, capacities[n], num_requests, scale)
            print(json.dumps(row), flush=True)
            runs.append(row)
    write_results(runs, capacities, args)
    return 0


def write_results(runs: list[dict], capacities: dict[int, float], args) -> None:
    body = format_section(runs, capacities, args)
    print(body)
    if not args.no_write:
        plot(runs, capacities)
        write_section("scaling", body, "python benchmarks/bench_scaling.py")
        print(f"wrote the scaling section of docs/BENCHMARKS.md and {IMG}")


def format_section(runs: list[dict], capacities: dict[int, float], args) -> str:
    c1 = capacities[min(capacities)] / min(capacities)
    lines = [
        "## Scaling: the planner daemon driving 1-16 replicas",
        "",
        f"`{FORMULATION}`, chatbot scenario, `{MODEL}` sim engines ({NUM_BLOCKS} KV blocks each), "
        f"each replica an engine process, the planner daemon in its own process, the Python "
        f"client replaying {runs[0]['num_requests'] // runs[0]['replicas']} x N requests (the same ones the simulator "
        f"found the capacity on) at the capacity rate of N replicas. Engines sleep `time scale` x each modelled step, with the planner's model "
        f"and SLO targets scaled alike (the same decisions, `time scale` x fewer planner calls per "
        f"second): 16 real-time replicas do not fit {os.cpu_count()} shared cores. "
        "Projections to real time are estimates (same per-call cost; no extra queueing).",
        "",
        "| replicas | capacity (simulator) | per replica | vs linear | time scale | requests "
        "| **attainment served** | planner CPU share (measured; projected x1) | core call p99 "
        "| engine round trip p99 | **plan-wait share** (measured; projected x1) | wait per step |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        n, scale = r["replicas"], r["time_scale"]
        cap = capacities[n]
        projected_cpu = r["planner_cpu_share"] * scale
        lines.append(
            f"| {n} | {cap:.2f} req/s | {cap / n:.2f} | {100 * (cap / (n * c1) - 1):+.1f}% "
            f"| {scale:g} | {r['num_requests']} | **{100 * r['attainment']:.1f}%** "
            f"| {100 * r['planner_cpu_share']:.1f}%"
            + (f"; {100 * projected_cpu:.0f}%" if scale != 1 else "")
            + f" | <= {1000 * r['core_p99_s']:g} ms | {1000 * r['answer_p99_s']:.1f} ms "
            f"| **{100 * r['plan_wait_share']:.2f}%**"
            + (f"; {100 * r['plan_wait_share_real']:.2f}%" if scale != 1 else "")
            + f" | {r['wait_per_step_ms']:.2f} ms |"
        )
    lines += [
        "",
        "Capacity: the highest rate at which 90% of requests attain their SLOs in the simulator "
        "(the same planner core and engine model), per replica count; *vs linear* compares it "
        "with N x the 1-replica capacity. *Attainment served* is what the daemon and N engine "
        "processes delivered at that rate (client clock): near 90% means the service keeps the "
        "simulator's capacity at that scale. Planner CPU share: the daemon's CPU seconds per "
        "wall second of serving (100% = one core). Core call p99: the smallest Prometheus bucket "
        "bound holding 99% of the core's calls. Engine round trip: report -> answer (plan or "
        "acknowledgement), the worst engine's p99. Plan-wait share: time with live requests and "
        "no step to run, over busy + plan-wait time, all engines together (target < 2% at 16 "
        "replicas); projected x1 divides the same wait per step by the unscaled step time.",
        "",
        *verdicts(runs, capacities),
        "",
        f"![capacity and planner load against replicas](img/{IMG.name})",
    ]
    return "\n".join(lines)


def verdicts(runs: list[dict], capacities: dict[int, float]) -> list[str]:
    """The targets, judged on these numbers, and the check of the projections at real time."""
    lines = []
    scaled = {r["replicas"]: r for r in runs if r["time_scale"] != 1}
    real = {r["replicas"]: r for r in runs if r["time_scale"] == 1}
    checks = [
        f"N={n}: planner CPU {100 * real[n]['planner_cpu_share']:.1f}% measured vs "
        f"{100 * scaled[n]['planner_cpu_share'] * scaled[n]['time_scale']:.1f}% projected, "
        f"plan-wait {100 * real[n]['plan_wait_share']:.2f}% vs "
        f"{100 * scaled[n]['plan_wait_share_real']:.2f}%"
        for n in sorted(set(real) & set(scaled))
    ]
    if checks:
        lines.append(
            "Projections checked at real time (time scale 1) where it fits: "
            + "; ".join(checks)
            + "."
        )
    top = max(scaled, default=None)
    if top is not None:
        r = scaled[top]
        met = "met" if r["plan_wait_share_real"] < 0.02 else "**not met**"
        lines.append(
            f"Target plan-wait share < 2% at {top} replicas: {100 * r['plan_wait_share']:.2f}% "
            f"measured at time scale {r['time_scale']:g}; {100 * r['plan_wait_share_real']:.2f}% "
            f"projected at real time: {met} at real time."
        )
    ns = sorted(capacities)
    per_replica = {n: capacities[n] / n for n in ns}
    base = ns[min(2, len(ns) - 1)]  # from a few replicas on: N=1 cannot share bursts
    spread = max(abs(per_replica[n] / per_replica[base] - 1) for n in ns if n >= base)
    lines.append(
        "Target capacity linear in replicas within 10%: capacity per replica "
        + ", ".join(f"{per_replica[n]:.2f} (N={n})" for n in ns)
        + f" req/s; from N=1 it grows (one replica cannot absorb bursts that several share); "
        f"from N={base} to N={ns[-1]} it stays within {100 * spread:.1f}% of N={base}'s: "
        + ("met" if spread <= 0.10 else "**not met**")
        + " (no capacity per replica is lost as replicas are added)."
    )
    lines.append(
        f"The machine was shared with other work (load average {max(r['load_average'] for r in runs):.1f} "
        f"on {os.cpu_count()} cores at the end of the runs): waits and round trips include waiting for a CPU."
    )
    return lines


def plot(runs: list[dict], capacities: dict[int, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = sorted(capacities)
    c1 = capacities[ns[0]] / ns[0]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(ns, [capacities[n] for n in ns], "o-", label="capacity (simulator)")
    left.plot(ns, [c1 * n for n in ns], "--", color="grey", label="linear (N x 1 replica)")
    left.plot(ns, [0.9 * c1 * n for n in ns], ":", color="grey", label="linear - 10%")
    left.set_xlabel("replicas")
    left.set_ylabel("req/s at 90% attainment")
    left.set_xscale("log", base=2)
    left.set_yscale("log", base=2)
    left.legend()
    scaled = [r for r in runs if r["time_scale"] != 1]
    xs = [r["replicas"] for r in scaled]
    right.plot(xs, [100 * r["planner_cpu_share"] * r["time_scale"] for r in scaled], "o-",
               label="planner CPU share, projected x1")  # fmt: skip
    right.plot(xs, [100 * r["plan_wait_share_real"] for r in scaled], "s-",
               label="plan-wait share, projected x1")  # fmt: skip
    right.plot(xs, [100 * r["plan_wait_share"] for r in scaled], "s:",
               label=f"plan-wait share, measured (x{scaled[0]['time_scale']:g})" if scaled else "")  # fmt: skip
    right.axhline(2.0, color="red", lw=0.8, ls="--", label="2% target")
    right.set_xlabel("replicas")
    right.set_ylabel("%")
    right.set_xscale("log", base=2)
    right.legend(fontsize=8)
    fig.tight_layout()
    IMG.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(IMG, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
