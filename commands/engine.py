"""`slos-serve engine --engine sim|torch|vllm --connect tcp://HOST:PORT`: run one engine adapter.

The `sim` engine executes each step by sleeping the time its truth model gives (a performance model
plus optional context-length term and noise) and produces placeholder token ids. It tells the
planner nothing of that truth except through its step reports (it advertises no performance model
unless `--advertise-perf-model` is given). `torch` and `vllm` engines are imported only when asked.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import socket

from commands.cli import CliError
from commands.curve_options import add_curve_arguments, curve_keys
from engine_adapters import registry
from engine_adapters.adapter import AdapterConfig, EngineAdapter
from engine_adapters.engine import Engine
from engine_adapters.registry import EngineOptions


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--engine", default="sim", help="sim, torch, vllm, or a module:builder of your own")
    add("--connect", default="tcp://127.0.0.1:5557", help="the planner's engine endpoint")
    add(
        "--engine-id",
        default=f"{socket.gethostname()}-{os.getpid()}",
        help="unique per engine (default: HOSTNAME-PID); the planner refuses a second engine "
        "with the id of a live one",
    )
    add("--heartbeat-interval-s", type=float, default=0.5)
    add("--liveness", type=int, default=6)
    add("--plan-grace-ms", type=float, default=10.0, help="wait for the answer to each report")
    add("--wait-for-every-answer", action="store_true", help="not only when a plan is announced")
    sim = parser.add_argument_group("sim engine").add_argument
    sim("--perf-model", default="opt-13b-h100", help="truth model base (a preset name)")
    sim("--k-context-s", type=float, default=0.0, help="truth: seconds per context token")
    sim("--noise-frac", type=float, default=0.0, help="truth: multiplicative noise")
    sim("--time-scale", type=float, default=1.0, help="sleep this x the truth's step time")
    sim("--num-blocks", type=int, default=4096)
    sim("--block-size", type=int, default=16)
    sim("--max-spec-tokens", type=int, default=0)
    sim("--acceptance-rate", type=float, default=0.7)
    sim("--seed", type=int, default=0)
    sim("--advertise-perf-model", action="store_true", help="send the truth's base in READY")
    sim("--output-lengths", metavar="FILE", help="a replay's true lengths (JSON lines)")
    torch = parser.add_argument_group("torch engine").add_argument
    torch("--model-dir", help="checkpoint directory (slos-serve make-model)")
    torch("--draft-dir", help="draft model checkpoint for speculative decoding")
    torch("--kv-memory-gb", type=float, default=0.25)
    torch(
        "--num-threads",
        type=int,
        default=None,
        help="torch CPU threads (default: all cores; 1 per engine when engines share a host)",
    )
    torch("--device", default="cpu", help="cpu or cuda")
    vllm = parser.add_argument_group("vllm engine").add_argument
    vllm(
        "--vllm-arg",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a vLLM engine argument (value read as JSON when it parses), e.g. "
        "max_model_len=2048; repeatable; adds to SLOS_SERVE_VLLM_ARGS",
    )
    add_curve_arguments(parser)
    add("--log-level", default="INFO", help="INFO: connects and reconnects, nothing per step")
    add("--stats-json", help="on exit, write where the engine's time went to this file")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    config = AdapterConfig(  # checked before a (maybe slow) engine is built
        connect=args.connect,
        engine_id=args.engine_id,
        heartbeat_interval_s=args.heartbeat_interval_s,
        liveness=args.liveness,
        plan_grace_s=args.plan_grace_ms / 1000,
        wait_only_when_expected=not args.wait_for_every_answer,
        curve=curve_keys(args),
    )
    adapter = EngineAdapter(build_engine(args), config)
    signal.signal(signal.SIGTERM, lambda *_: adapter.stop())
    try:
        adapter.run()
    except KeyboardInterrupt:
        adapter.stop()
    if args.stats_json:
        write_stats(adapter, args.stats_json)
    if adapter.fatal_error:
        raise CliError(adapter.fatal_error)
    return 0


def write_stats(adapter: EngineAdapter, path: str) -> None:
    """Busy / plan-wait / idle seconds, steps and the report -> answer round trips (for
    benchmarks that run engines as processes)."""
    import json

    s = adapter.stats
    latencies_s = sorted(s.answer_latencies_s)

    def percentile(q: float) -> float | None:
        return (
            latencies_s[min(len(latencies_s) - 1, int(q * len(latencies_s)))]
            if latencies_s
            else None
        )

    stats = {
        "engine_id": adapter.config.engine_id,
        "num_steps": s.num_steps,
        "busy_s": s.busy_s,
        "plan_wait_s": s.plan_wait_s,
        "idle_s": s.idle_s,
        "num_answers": len(latencies_s),
        "answer_p50_s": percentile(0.50),
        "answer_p99_s": percentile(0.99),
        "num_late_plans": s.num_late_plans + adapter.queue.num_late_plans,
        "num_ack_timeouts": s.num_ack_timeouts,
    }
    with open(path, "w") as f:
        json.dump(stats, f)


def build_engine(args: argparse.Namespace) -> Engine:
    """The engine `--engine` names, from the flags its builder reads (EngineOptions fields)."""
    names = {f.name for f in dataclasses.fields(EngineOptions)} - {"vllm_args"}
    options = EngineOptions(
        **{name: getattr(args, name) for name in names}, vllm_args=tuple(args.vllm_arg)
    )
    return registry.create(args.engine, options)
