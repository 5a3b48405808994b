"""`slos-serve engine --engine sim|torch|vllm --connect tcp://HOST:PORT`: run one engine adapter.

The `sim` engine executes each step by sleeping the time its truth model gives (a performance model
plus optional context-length term and noise) and produces placeholder token ids. It tells the
planner nothing of that truth except through its step reports (it advertises no performance model
unless `--advertise-perf-model` is given). `torch` and `vllm` engines are imported only when asked.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import signal
import time

from engine_adapters.adapter import AdapterConfig, EngineAdapter
from engine_adapters.engine import Engine
from formulations.perf_model import TruthModel, perf_model_preset
from wire.security import CurveKeys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engine", choices=("sim", "torch", "vllm"), default="sim")
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
    if args.engine == "sim":
        return _sim_engine(args)
    if args.engine == "torch":
        return _torch_engine(args)
    return _vllm_engine(args)


def _sim_engine(args: argparse.Namespace) -> Engine:
    from engine_adapters.sim_engine import SimEngine

    if args.time_scale <= 0:
        raise ValueError("--time-scale must be positive")
    base = perf_model_preset(args.perf_model)
    scale = args.time_scale
    return SimEngine(
        TruthModel(base, k_context_s=args.k_context_s, noise_frac=args.noise_frac, seed=args.seed),
        num_total_blocks=args.num_blocks,
        block_size=args.block_size,
        max_spec_tokens=args.max_spec_tokens,
        true_acceptance_rate=args.acceptance_rate,
        seed=args.seed,
        clock=time.monotonic,
        sleep=lambda time_s: time.sleep(time_s * scale),
        emit_token_ids=True,
        advertised_perf_model=base if args.advertise_perf_model else None,
    )


def _torch_engine(args: argparse.Namespace) -> Engine:
    if importlib.util.find_spec("torch") is None:
        raise ValueError("the torch engine needs torch: pip install 'slos-serve[torch]'")
    try:
        from engine_adapters.torch_engine.engine import TorchEngine
    except ImportError as exc:
        raise ValueError(f"the torch engine is not available: {exc}") from None
    if not args.model_dir:
        raise ValueError("--engine torch needs --model-dir (make one with `slos-serve make-model`)")
    return TorchEngine.from_pretrained(
        args.model_dir, draft_dir=args.draft_dir, kv_memory_gb=args.kv_memory_gb
    )


def _vllm_engine(args: argparse.Namespace) -> Engine:
    """vLLM engine arguments beyond the model come from SLOS_SERVE_VLLM_ARGS (JSON) and the
    repeatable --vllm-arg NAME=VALUE (which wins on conflicts)."""
    if not args.model_dir:
        raise ValueError("--engine vllm needs --model-dir")
    if importlib.util.find_spec("vllm") is None:
        raise ValueError("the vLLM engine needs vLLM: pip install 'slos-serve[vllm]'")
    try:
        module = importlib.import_module("engine_adapters.vllm.engine")
    except ImportError as exc:
        raise ValueError(f"the vLLM engine is not available: {exc}") from None
    engine_class = getattr(module, "VLLMEngine", None)
    if engine_class is None or not hasattr(engine_class, "from_pretrained"):
        raise ValueError("engine_adapters.vllm.engine has no VLLMEngine.from_pretrained")
    engine_args = {**module.engine_args_from_env(), **module.parse_engine_args(args.vllm_arg)}
    return engine_class.from_pretrained(args.model_dir, engine_args)
