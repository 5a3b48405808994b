"""Service benchmark: the planner daemon as a separate process on loopback.

1. Plan round trip: the time from an engine sending PROGRESS for step k to receiving the planner's
   answer (the new plan, or an acknowledgement that there is none), p50 / p99, with 2 engines
   stepping every ~20 ms under load.
2. Engine plan-wait fraction at ~20 ms steps: the share of an engine's active time (steps plus
   waiting with live requests) spent waiting for the planner (target < 2%). Measured with the
   default grace (the engine waits up to 10 ms for the answer to its last report) and with no grace
   (it never waits; plans made from report k then start one step late and are clamped).
3. Planner CPU per second of serving at the chatbot capacity rate: the capacity of slos_dp with
   2 replicas (OPT-13B on H100 model) is found in the simulator, then the chatbot scenario is served
   in real time at that rate by the daemon and two simulated engine processes; the daemon's CPU
   seconds (utime + stime from /proc) are divided by the wall seconds it served.

Engines in parts 1-2 are in-process threads (their statistics are read directly); the planner is
always its own process.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from report_section import write_section
from service_support import write_planner_config

from commands.demo import ProcessGroup, wait_for_engines
from engine_adapters.adapter import AdapterConfig, EngineAdapter
from engine_adapters.sim_engine import SimEngine
from formulations.perf_model import Line, PerfModel, perf_model_preset
from lab.capacity import SearchParams, search_capacity
from lab.replay import replay
from lab.report import build_report
from lab.simulator import SimConfig, simulate
from lab.workloads import WorkloadOptions, build_workload
from planner_svc.client import PlannerClient

# ~20 ms per step for the batches of part 1-2 (18 ms + 20 us per token).
STEP_20MS = PerfModel((Line(2e-5, 0.0, 0.018),), "step-20ms")
CAPACITY_MODEL = "opt-13b-h100"
FORMULATION = "slos_dp"


def start_planner(group: ProcessGroup, tmp: Path, formulation: str = FORMULATION):
    config, engine_port, client_port = write_planner_config(tmp, formulation, CAPACITY_MODEL)
    argv = [sys.executable, "-m", "commands.cli", "planner", "--config", str(config)]
    process = group.start(f"planner-{engine_port}", [*argv, "--log-level", "WARNING"])
    return process, f"tcp://127.0.0.1:{engine_port}", f"tcp://127.0.0.1:{client_port}"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---- parts 1-2 ---------------------------------------------------------------------------------


WAIT_MODES = {  # name -> (plan_grace_s, wait_only_when_expected)
    "wait for every answer": (0.01, False),
    "wait when a re-plan is announced (default)": (0.01, True),
    "never wait": (0.0, False),
}


def plan_wait(tmp: Path, mode: str, duration_s: float, rate_rps: float) -> dict:
    plan_grace_s, only_when_expected = WAIT_MODES[mode]
    group = ProcessGroup()
    try:
        _, engine_ep, client_ep = start_planner(group, tmp)
        adapters, threads = [], []
        for i in range(2):
            engine = SimEngine(
                STEP_20MS,
                4096,
                clock=time.monotonic,
                sleep=time.sleep,
                advertised_perf_model=STEP_20MS,
                seed=i,
            )
            adapter = EngineAdapter(
                engine,
                AdapterConfig(
                    engine_ep,
                    f"engine-{i}",
                    plan_grace_s=plan_grace_s,
                    wait_only_when_expected=only_when_expected,
                ),
            )
            thread = threading.Thread(target=adapter.run, daemon=True)
            thread.start()
            adapters.append(adapter)
            threads.append(thread)
        with PlannerClient(client_ep) as client:
            wait_for_engines(client, 2, group)
            rng = np.random.default_rng(0)
            handles = []
            end_s = time.monotonic() + duration_s
            while time.monotonic() < end_s:
                handles.append(
                    client.submit(
                        num_prompt_tokens=int(rng.integers(100, 800)),
                        max_tokens=int(rng.integers(40, 160)),
                    )
                )
                time.sleep(rng.exponential(1 / rate_rps))
            for handle in handles:
                handle.wait(30)
            for handle in handles:
                if not handle.finished:
                    print(
                        f"unfinished: {handle.request_id} verdict={handle.verdict_msg} "
                        f"tokens={len(handle.token_times_s)}/{handle.submit.max_tokens} "
                        f"error={handle.error!r}",
                        file=sys.stderr,
                    )
        for adapter in adapters:
            adapter.stop()
        for thread in threads:
            thread.join(5)
    finally:
        group.stop_all()
    latencies_ms = np.array([x for a in adapters for x in a.stats.answer_latencies_s]) * 1000
    busy_s = sum(a.stats.busy_s for a in adapters)
    wait_s = sum(a.stats.plan_wait_s for a in adapters)
    return {
        "mode": mode,
        "num_requests": len(handles),
        "num_finished": sum(h.finished for h in handles),
        "num_steps": sum(a.stats.num_steps for a in adapters),
        "mean_step_ms": 1000 * busy_s / max(1, sum(a.stats.num_steps for a in adapters)),
        "wait_fraction": wait_s / (busy_s + wait_s) if busy_s + wait_s > 0 else 0.0,
        "rtt_p50_ms": float(np.percentile(latencies_ms, 50)) if len(latencies_ms) else float("nan"),
        "rtt_p99_ms": float(np.percentile(latencies_ms, 99)) if len(latencies_ms) else float("nan"),
        "num_answers": len(latencies_ms),
        "num_ack_timeouts": sum(a.stats.num_ack_timeouts for a in adapters),
        "num_late_plans": sum(a.stats.num_late_plans + a.queue.num_late_plans for a in adapters),
    }


# ---- part 3 --------------------------------------------------------------------------------------


def chatbot_workload(rate_rps: float, num_requests: int | None, duration_s: float | None):
    options = WorkloadOptions(
        rate_rps=rate_rps, num_requests=num_requests, duration_s=duration_s, seed=0
    )
    return build_workload("chatbot", perf_model_preset(CAPACITY_MODEL), options)


def sim_config() -> SimConfig:
    return SimConfig(
        formulation=FORMULATION,
        num_replicas=2,
        perf_model=perf_model_preset(CAPACITY_MODEL),
        num_blocks_per_replica=3500,
    )


def chatbot_capacity(duration_s: float) -> float:
    """Capacity on the very workload window that part 3 then serves (arrivals in duration_s)."""

    def attainment(rate_rps: float) -> float:
        return simulate(chatbot_workload(rate_rps, None, duration_s), sim_config()).attainment

    params = SearchParams(min_rate_rps=0.5, max_rate_rps=16.0, tolerance_rps=0.5)
    return search_capacity(attainment, params, label=FORMULATION, show_progress=False).capacity_rps


def planner_cpu(tmp: Path, rate_rps: float, duration_s: float) -> dict:
    workload = chatbot_workload(rate_rps, None, duration_s)
    group = ProcessGroup()
    try:
        planner, engine_ep, client_ep = start_planner(group, tmp)
        for i in range(2):
            group.start(
                f"engine-{i}",
                [
                    sys.executable,
                    "-m",
                    "commands.cli",
                    "engine",
                    "--engine",
                    "sim",
                    "--connect",
                    engine_ep,
                    "--engine-id",
                    f"engine-{i}",
                    "--perf-model",
                    CAPACITY_MODEL,
                    "--num-blocks",
                    "3500",
                    "--seed",
                    str(i),
                ],
            )
        with PlannerClient(client_ep) as client:
            wait_for_engines(client, 2, group)
            cpu_start_s, wall_start_s = cpu_seconds(planner.pid), time.monotonic()
            result = replay(client, workload, drain_timeout_s=60, show_summary=False)
            cpu_s, wall_s = cpu_seconds(planner.pid) - cpu_start_s, time.monotonic() - wall_start_s
            load_average = os.getloadavg()[0]
    finally:
        group.stop_all()
    report = build_report(result.records, workload)
    predicted = simulate(workload, sim_config()).attainment
    return {
        "rate_rps": rate_rps,
        "num_items": workload.num_items,
        "wall_s": wall_s,
        "cpu_s": cpu_s,
        "cpu_per_s": cpu_s / wall_s,
        "attainment": report.num_attained / max(1, report.num_items),
        "predicted_attainment": predicted,
        "load_average": load_average,
    }


# ---- main -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="planner service benchmark")
    parser.add_argument("--duration-s", type=float, default=10.0, help="load per plan-wait run")
    parser.add_argument("--serve-s", type=float, default=20.0, help="chatbot arrival window")
    parser.add_argument("--skip-cpu", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-service-") as tmp_name:
        tmp = Path(tmp_name)
        waits = [plan_wait(tmp, mode, args.duration_s, rate_rps=6.0) for mode in WAIT_MODES]
        for row in waits:
            print(row, flush=True)
        if args.skip_cpu:
            return 0
        capacity_rps = chatbot_capacity(args.serve_s)
        print(
            f"chatbot capacity ({FORMULATION}, 2 replicas, simulator): {capacity_rps:.2f} req/s",
            flush=True,
        )
        cpu = planner_cpu(tmp, capacity_rps, args.serve_s)
        print(cpu, flush=True)
    body = format_section(waits, capacity_rps, cpu)
    print(body)
    if not args.no_write:
        write_section("service", body, "python benchmarks/bench_service.py")
    return 0


def format_section(waits: list[dict], capacity_rps: float, cpu: dict) -> str:
    lines = [
        "## Planner service (ZeroMQ, loopback)",
        "",
        f"Planner daemon (`{FORMULATION}`) in its own process; 2 simulated engines. Parts 1-2: "
        "engine steps of ~20 ms (18 ms + 20 us/token, slept), a steady stream of requests for "
        f"{' / '.join(str(w['num_requests']) for w in waits)} requests.",
        "",
        "| engine waits (grace 10 ms) | steps | mean step | plan round trip p50 | p99 "
        "| answers late (grace expired) | late plans | **engine plan-wait fraction** |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for w in waits:
        lines.append(
            f"| {w['mode']} | {w['num_steps']} | {w['mean_step_ms']:.1f} ms "
            f"| {w['rtt_p50_ms']:.2f} ms | {w['rtt_p99_ms']:.2f} ms | {w['num_ack_timeouts']} "
            f"| {w['num_late_plans']} | **{100 * w['wait_fraction']:.2f}%** |"
        )
    lines += [
        "",
        "Round trip = engine sends PROGRESS for step k -> planner decodes it, runs the core "
        "(re-planning when triggered) -> engine receives the new plan or the acknowledgement. "
        "Plan-wait counts the waits for answers plus any time with live requests and nothing to "
        "run. When the engine does not wait, a plan made from report k starts one step late "
        "(re-based and clamped: *late plans*). Announced re-plans: the planner tells the engine "
        "ahead when the core is likely to re-plan at its next report (a request was routed to "
        "it, a request is about to finish while work is uncovered, the re-plan timer is due).",
        "",
        f"Planner CPU at the chatbot capacity rate: capacity of `{FORMULATION}` on 2 x "
        f"`{CAPACITY_MODEL}` replicas in the simulator = **{capacity_rps:.2f} req/s** "
        "(90% attainment). Served in real time at that rate by the daemon and 2 simulated engine "
        "processes:",
        "",
        "| rate | items | wall | planner CPU | **planner CPU per second of serving** "
        "| attainment (client) | simulator prediction |",
        "|---|---|---|---|---|---|---|",
        f"| {cpu['rate_rps']:.2f} req/s | {cpu['num_items']} | {cpu['wall_s']:.1f} s "
        f"| {cpu['cpu_s']:.2f} s | **{cpu['cpu_per_s']:.3f} s/s** "
        f"| {100 * cpu['attainment']:.1f}% | {100 * cpu['predicted_attainment']:.1f}% |",
        "",
        f"Load average of the machine at the end of the run: {cpu['load_average']:.1f} "
        f"(on {os.cpu_count()} cores, shared). At the capacity rate the system sits at the 90% edge, "
        "so the measured attainment is sensitive to CPU contention (slept engine steps overshoot, "
        "the planner is descheduled): in development runs it was 91.2% vs 90.7% predicted and "
        "89.7% vs 91.2%, and once 61% vs 91.2% under a load average of ~7.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
