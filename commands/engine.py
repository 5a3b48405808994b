"""`slos-serve engine --engine sim|torch|vllm --connect tcp://HOST:PORT`: run one engine adapter.

The `sim` engine executes each step by sleeping the time its truth model gives (a performance model
plus optional context-length term and noise) and produces placeholder token ids. It tells the
planner nothing of that truth except through its step reports (it advertises no performance model
unless `--advertise-perf-model` is given). `torch` and `vllm` engines are imported only when asked.
"""

from __future__ import annotations

import argparse
import logging
import signal

from engine_adapters import registry
from engine_adapters.adapter import AdapterConfig, EngineAdapter
from engine_adapters.engine import Engine
from engine_adapters.registry import EngineOptions
from wire.security import CurveKeys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--engine", default="sim", help="sim, torch, vllm, or a module:builder of your own"
    )
    parser.add_argument(
        "--connect", default="tcp://127.0.0.1:5557", help="the planner's engine endpoint"
    )
    parser.add_argument("--engine-id", default="engine-0")
    parser.add_argument("--heartbeat-interval-s", type=float, default=0.5)
    parser.add_argument("--liveness", type=int, default=6)
    parser.add_argument(
        "--plan-grace-ms",
        type=float,
        default=10.0,
        help="after each report, wait up to this long for the planner's answer",
    )
    parser.add_argument(
        "--wait-for-every-answer",
        action="store_true",
        help="wait for the planner's answer after every report, not only when "
        "it announced a re-plan (fewer late plans, more waiting)",
    )
    sim = parser.add_argument_group("sim engine")
    sim.add_argument(
        "--perf-model", default="opt-13b-h100", help="truth model base (a preset name)"
    )
    sim.add_argument(
        "--k-context-s",
        type=float,
        default=0.0,
        help="truth: seconds per cached context token attended",
    )
    sim.add_argument("--noise-frac", type=float, default=0.0, help="truth: multiplicative noise")
    sim.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="sleep time_scale x the truth's step time (speeds up demos and tests)",
    )
    sim.add_argument("--num-blocks", type=int, default=4096)
    sim.add_argument("--block-size", type=int, default=16)
    sim.add_argument("--max-spec-tokens", type=int, default=0)
    sim.add_argument("--acceptance-rate", type=float, default=0.7)
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument(
        "--advertise-perf-model",
        action="store_true",
        help="send the truth's base model in READY (default: the planner's config)",
    )
    torch = parser.add_argument_group("torch engine")
    torch.add_argument("--model-dir", help="checkpoint directory (slos-serve make-model)")
    torch.add_argument("--draft-dir", help="draft model checkpoint for speculative decoding")
    torch.add_argument("--kv-memory-gb", type=float, default=0.25)
    vllm = parser.add_argument_group("vllm engine")
    vllm.add_argument(
        "--vllm-arg",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a vLLM engine argument (value read as JSON when it parses), e.g. "
        "max_model_len=2048; repeatable; adds to SLOS_SERVE_VLLM_ARGS",
    )
    sec = parser.add_argument_group("CURVE (beyond loopback)")
    sec.add_argument("--curve-public-key", default="")
    sec.add_argument("--curve-secret-key", default="")
    sec.add_argument("--curve-server-key", default="", help="the planner's public key")
    parser.add_argument("--log-level", default="WARNING")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    engine = build_engine(args)
    curve = None
    if args.curve_server_key:
        curve = CurveKeys(args.curve_public_key, args.curve_secret_key, args.curve_server_key)
    config = AdapterConfig(
        connect=args.connect,
        engine_id=args.engine_id,
        heartbeat_interval_s=args.heartbeat_interval_s,
        liveness=args.liveness,
        plan_grace_s=args.plan_grace_ms / 1000,
        wait_only_when_expected=not args.wait_for_every_answer,
        curve=curve,
    )
    adapter = EngineAdapter(engine, config)
    signal.signal(signal.SIGTERM, lambda *_: adapter.stop())
    try:
        adapter.run()
    except KeyboardInterrupt:
        adapter.stop()
    return 0


def build_engine(args: argparse.Namespace) -> Engine:
    options = EngineOptions(
        perf_model=args.perf_model,
        k_context_s=args.k_context_s,
        noise_frac=args.noise_frac,
        time_scale=args.time_scale,
        num_blocks=args.num_blocks,
        block_size=args.block_size,
        max_spec_tokens=args.max_spec_tokens,
        acceptance_rate=args.acceptance_rate,
        seed=args.seed,
        advertise_perf_model=args.advertise_perf_model,
        model_dir=args.model_dir,
        draft_dir=args.draft_dir,
        kv_memory_gb=args.kv_memory_gb,
        vllm_args=tuple(args.vllm_arg),
    )
    return registry.create(args.engine, options)
