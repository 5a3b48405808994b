"""`slos-serve profile`: time a sweep of step compositions (token counts, draft steps, cached
contexts) on an engine (torch, or vllm with --vllm-arg), fit the max-of-lines performance model with
its context term, print R^2 / under-prediction / median error in sample and on held-out
compositions, and write the model as JSON
(PerfModel.to_dict) that a planner config can name. By default it lands in MODEL/perf_model.json,
where `TorchEngine.from_pretrained` picks it up for READY."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

ENGINES = ("torch", "vllm")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--engine", default="torch", help=f"engine to profile ({', '.join(ENGINES)})"
    )
    parser.add_argument("--model", required=True, help="local HF-layout model directory")
    parser.add_argument(
        "--draft", default=None, help="draft model directory (profiles speculation)"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--dtype", default=None, help="float32, float16, bfloat16 (default: model's)"
    )
    parser.add_argument("--kv-memory-gb", type=float, default=0.25)
    parser.add_argument("--out", default=None, help="output JSON (default: MODEL/perf_model.json)")
    parser.add_argument(
        "--max-num-lines",
        type=int,
        default=2,
        help="most lines in the max-of-lines model (the best R^2 of 1..N is kept)",
    )
    parser.add_argument("--quick", action="store_true", help="a short sweep (smoke test)")
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed rounds per composition (5; 3 quick)",
    )
    parser.add_argument(
        "--stats-out", default=None, help="also write the fit's statistics and the engine's facts"
    )
    parser.add_argument(
        "--vllm-arg",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="vllm engine: a vLLM engine argument (as `slos-serve engine --vllm-arg`)",
    )
    parser.add_argument(
        "--context-tokens",
        default=None,
        metavar="C[,C...]",
        help="cached contexts of the decoding requests swept (default: 16,128,512,1536; "
        "16,128 with --quick)",
    )
    parser.add_argument(
        "--num-threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's); 1 gives steadier times on a busy host",
    )
    parser.add_argument(
        "--timer",
        default="wall",
        choices=("wall", "cpu"),
        help="wall: the reported step time; cpu: process CPU time per step "
        "(needs --device cpu --num-threads 1; immune to other jobs' load)",
    )


def run(args: argparse.Namespace) -> int:
    if args.engine not in ENGINES:
        raise ValueError(f"profile supports --engine {', '.join(ENGINES)}, not {args.engine!r}")
    from engine_adapters.profiler import Profiler, SweepConfig

    if args.timer == "cpu" and (args.engine != "torch" or args.device != "cpu"):
        raise ValueError("--timer cpu needs --engine torch --device cpu --num-threads 1")
    if args.timer == "cpu" and args.num_threads != 1:
        raise ValueError("--timer cpu needs --device cpu --num-threads 1")
    if args.num_threads is not None:
        import torch

        torch.set_num_threads(args.num_threads)
    sweep = SweepConfig.quick() if args.quick else SweepConfig()
    if args.context_tokens is not None:
        sweep = dataclasses.replace(sweep, context_sizes=_context_sizes(args.context_tokens))
    if args.repeats is not None:
        if args.repeats < 1:
            raise ValueError(f"--repeats must be at least 1, got {args.repeats}")
        sweep = dataclasses.replace(sweep, num_repeats=args.repeats)
    engine = _engine(args)
    name = f"{Path(args.model).resolve().name}-{args.engine}-{args.device}"
    result = Profiler(engine, sweep, timer=args.timer).run(
        max_num_lines=args.max_num_lines, name=name
    )
    for m in result.measurements:
        s = m.sample
        predicted_ms = 1e3 * result.model.step_time_s(
            s.num_tokens, s.spec_steps, s.num_context_tokens
        )
        print(
            f"{m.label:>28}: tokens={s.num_tokens:5d} s={s.spec_steps} "
            f"context={s.num_context_tokens:6d} "
            f"measured={1e3 * s.step_time_s:8.2f} ms  model={predicted_ms:8.2f} ms"
        )
    if result.skipped:
        print(f"skipped (KV or context length too small): {', '.join(result.skipped)}")
    held_out = (
        f"{result.held_out_error_pct:.1f}% on {result.num_held_out} held-out compositions"
        if result.held_out_error_pct is not None
        else "n/a"
    )
    print(
        f"{len(result.model.lines)} line(s): R^2 = {result.fit.r2:.3f}; under-predicted "
        f"{100 * result.fit.under_prediction_fraction:.0f}% of {result.fit.num_samples} samples; "
        f"median |error| = {result.median_abs_pct_error:.1f}% in sample, {held_out}"
    )
    out = Path(args.out) if args.out else Path(args.model) / "perf_model.json"
    out.write_text(json.dumps(result.model.to_dict(), indent=2) + "\n")
    print(f"wrote {out}")
    if args.stats_out:
        Path(args.stats_out).write_text(json.dumps(_stats(result, engine), indent=2) + "\n")
        print(f"wrote {args.stats_out}")
    return 0


def _engine(args: argparse.Namespace):
    if args.engine == "torch":
        from engine_adapters.torch_engine.engine import TorchEngine

        return TorchEngine.from_pretrained(
            args.model,
            args.draft,
            device=args.device,
            kv_memory_gb=args.kv_memory_gb,
            dtype=args.dtype,
        )
    from engine_adapters import registry
    from engine_adapters.registry import EngineOptions

    return registry.create(
        "vllm", EngineOptions(model_dir=args.model, vllm_args=tuple(args.vllm_arg))
    )


def _stats(result, engine) -> dict:
    """The fit's quality and the engine's facts (what a capacity prediction needs)."""
    info = engine.info()
    return {
        "model": result.model.to_dict(),
        "r2": result.fit.r2,
        "in_sample_error_pct": result.median_abs_pct_error,
        "held_out_error_pct": result.held_out_error_pct,
        "num_samples": result.fit.num_samples,
        "num_held_out": result.num_held_out,
        "skipped": list(result.skipped),
        "engine": {
            "name": info.name,
            "num_total_blocks": info.num_total_blocks,
            "block_size": info.block_size,
            "max_model_len": info.max_model_len,
            "max_spec_tokens": info.max_spec_tokens,
        },
        "measurements": [
            {
                "label": m.label,
                "num_tokens": m.sample.num_tokens,
                "spec_steps": m.sample.spec_steps,
                "num_context_tokens": m.sample.num_context_tokens,
                "step_time_s": m.sample.step_time_s,
            }
            for m in result.measurements
        ],
    }


def _context_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"--context-tokens takes numbers like 16,128; got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise ValueError("--context-tokens must be at least 1")
    return sizes
