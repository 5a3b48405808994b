"""`slos-serve demo --engine sim`: the whole service on this machine for about 30 seconds.

Starts the planner daemon and two engine adapters as separate processes (each in its own process
group), replays a scenario through the Python client with a live summary, prints the SLO report
(vLLM-style block plus per-class attainment) and stops every process it started, also on Ctrl-C
or SIGTERM. With `--engine torch` it makes a tiny random-weight model (and profiles it, so the
planner knows its step times) if none exists yet.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from deploy.processes import ProcessGroup, cli, free_port, wait_for_engines
from lab.workloads import WorkloadOptions
from planner_svc.config import load_config

PLANNER_TOML = """\
formulation = "{formulation}"
router = "round_robin"
max_forwards = 1

[planner]
engine_endpoint = "tcp://127.0.0.1:{engine_port}"
client_endpoint = "tcp://127.0.0.1:{client_port}"
metrics_port = {metrics_port}
heartbeat_interval_s = 0.5
liveness = 6
default_perf_model = "{perf_model}"
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engine", choices=("sim", "torch"), default="sim")
    parser.add_argument("--num-engines", type=int, default=2)
    parser.add_argument("--formulation", default="slos_dp")
    parser.add_argument("--scenario", default="chatbot")
    parser.add_argument(
        "--rate",
        type=float,
        default=None,
        help="arrivals per second (default: 4 for sim, 0.5 for torch)",
    )
    parser.add_argument("--duration-s", type=float, default=30.0, help="arrival window")
    parser.add_argument(
        "--drain-s", type=float, default=20.0, help="time allowed after the last arrival"
    )
    parser.add_argument("--perf-model", default="opt-13b-h100", help="sim engines' model")
    parser.add_argument(
        "--model-dir", default="out/demo-model", help="torch: model directory (made if missing)"
    )
    parser.add_argument("--metrics-port", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    if args.num_engines < 1 or args.duration_s <= 0:
        raise ValueError("--num-engines must be >= 1 and --duration-s > 0")
    rate = args.rate or (4.0 if args.engine == "sim" else 0.5)
    group = ProcessGroup()
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return _run_demo(args, rate, group)
    except KeyboardInterrupt:
        print("\ninterrupted: stopping the planner and engines", file=sys.stderr)
        return 130
    finally:
        group.stop_all()
        signal.signal(signal.SIGTERM, previous)


def _run_demo(args: argparse.Namespace, rate: float, group: ProcessGroup) -> int:
    from lab.replay import replay
    from lab.report import build_report
    from lab.workloads import build_workload
    from planner_svc.client import PlannerClient

    engine_port, client_port = free_port(), free_port()
    with tempfile.TemporaryDirectory(prefix="slos-demo-") as tmp:
        engine_args = _engine_args(args)  # may make a model first: before anything runs
        # Sim engines stop at the trace's lengths, read from a file the planner never sees; the
        # client asks for the rest of the context, as real clients do (lab/replay.py).
        true_lengths = Path(tmp) / "true_lengths.jsonl" if args.engine == "sim" else None
        if true_lengths is not None:
            engine_args += ["--output-lengths", str(true_lengths)]
        planner_perf_model = args.perf_model
        slo_table, max_model_len = "", WorkloadOptions.max_model_len
        if args.engine == "torch":  # plans from the engine's own profile
            planner_perf_model = str(Path(args.model_dir).resolve() / "perf_model.json")
            slo_table, max_model_len = _torch_slos(), _max_model_len(Path(args.model_dir))
        config_path = Path(tmp) / "planner.toml"
        config_path.write_text(
            PLANNER_TOML.format(
                formulation=args.formulation,
                engine_port=engine_port,
                client_port=client_port,
                metrics_port=args.metrics_port,
                perf_model=planner_perf_model,
            )
            + slo_table
        )
        group.start(
            "planner", [*cli(), "planner", "--config", str(config_path), "--log-level", "WARNING"]
        )
        for i in range(args.num_engines):
            group.start(
                f"engine-{i}",
                [
                    *cli(),
                    "engine",
                    "--engine",
                    args.engine,
                    "--connect",
                    f"tcp://127.0.0.1:{engine_port}",
                    "--engine-id",
                    f"engine-{i}",
                    *engine_args,
                ],
            )
        perf_model = load_config(config_path).perf_model
        workload = build_workload(
            args.scenario,
            perf_model,
            WorkloadOptions(
                rate_rps=rate,
                num_requests=None,
                duration_s=args.duration_s,
                seed=args.seed,
                max_model_len=max_model_len,
            ),
        )
        print(
            f"demo: {args.formulation} on {args.num_engines} {args.engine} engine(s), "
            f"{args.scenario} at {rate:g} req/s for {args.duration_s:g}s "
            f"({workload.num_items} items)",
            flush=True,
        )
        with PlannerClient(f"tcp://127.0.0.1:{client_port}") as client:
            wait_for_engines(client, args.num_engines, group)
            result = replay(
                client,
                workload,
                drain_timeout_s=args.drain_s,
                should_stop=group.any_died,
                true_lengths=true_lengths,
                max_model_len=max_model_len,
            )
        if group.any_died():
            raise ValueError(f"a service process exited early: {group.died()}")
        print(build_report(result.records, workload).format_text())
    return 0


# The tiny CPU model prefills a prompt in a few milliseconds, so the published TTFT slowdowns
# (3-5x the zero-load prefill time) would ask for TTFTs of 5-40 ms, below the wall-clock cost of a
# plan's round trip between processes. The torch demo keeps each class's TPOT and gives it an
# absolute TTFT target instead.
TORCH_DEMO_TTFT_MS = 1000


def _torch_slos() -> str:
    from formulations.slo import SLO_PRESETS

    lines = []
    for name, slo in SLO_PRESETS.items():
        lines += [
            f"\n[slo_classes.{name}]",
            f"ttft_ms = {TORCH_DEMO_TTFT_MS}",
            f"tpot_ms = {slo.tpot_s * 1000:g}",
        ]
        if slo.thinking_tpot_s is not None:
            lines.append(f"thinking_tpot_ms = {slo.thinking_tpot_s * 1000:g}")
    return "\n".join(lines) + "\n"


def _max_model_len(model_dir: Path) -> int:
    """The model's context length: longer trace rows are dropped from the workload."""
    config = json.loads((model_dir / "config.json").read_text())
    return int(config.get("max_position_embeddings", WorkloadOptions.max_model_len))


def _engine_args(args: argparse.Namespace) -> list[str]:
    if args.engine == "sim":
        return ["--perf-model", args.perf_model, "--num-blocks", "3500", "--seed", str(args.seed)]
    model_dir = Path(args.model_dir)
    if not (model_dir / "config.json").is_file():
        print(f"demo: making a tiny model in {model_dir} (and profiling it)", flush=True)
        subprocess.run(
            [*cli(), "make-model", "--preset", "tiny", "--out", str(model_dir)], check=True
        )
        subprocess.run(
            [*cli(), "profile", "--model", str(model_dir), "--quick", "--num-threads", "1"],
            check=True,
        )
    # One torch thread per engine: the engines, the planner and the client share this host, and
    # torch's default (a thread per core in every engine) makes steps many times slower.
    return ["--model-dir", str(model_dir), "--num-threads", "1"]


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
