"""Benchmark of the torch engine on this machine's CPU: decode and prefill throughput of the
`tiny` and `small` presets at several batch sizes, and how well the fitted performance model (with
its context term) predicts measured step times (in sample and on held-out step shapes).

    .venv/bin/python benchmarks/bench_torch_engine.py [--presets tiny small] [--num-threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks.report_section import write_section
from commands.make_model import make_model
from engine_adapters.engine import EngineRequest
from engine_adapters.profiler import Profiler
from engine_adapters.torch_engine.engine import TorchEngine
from formulations.plan import Step

DECODE_BATCH_SIZES = (1, 4, 16, 64)
PREFILL_SIZES = (128, 512)
CONTEXT_TOKENS = 128
NUM_TIMED_STEPS = 8
CONTEXT_SWEEP_BATCHES = (16, 64)
CONTEXT_SWEEP_TOKENS = (1, 64, 256)


def decode_tokens_per_s(engine: TorchEngine, batch: int) -> float:
    ids = [f"d{batch}-{i}" for i in range(batch)]
    for rid in ids:
        engine.add_request(EngineRequest(rid, CONTEXT_TOKENS, NUM_TIMED_STEPS + 2))
    engine.execute(Step({rid: CONTEXT_TOKENS for rid in ids}), 0)
    engine.execute(Step({rid: 1 for rid in ids}), 0)  # warm-up
    start = time.perf_counter()
    for _ in range(NUM_TIMED_STEPS):
        assert engine.execute(Step({rid: 1 for rid in ids}), 0).ok
    elapsed = time.perf_counter() - start
    for rid in ids:
        engine.abort(rid)
    return batch * NUM_TIMED_STEPS / elapsed


def decode_cpu_ms(engine: TorchEngine, batch: int, context_tokens: int) -> float:
    """Median process CPU time of a decode step of `batch` requests with `context_tokens` each."""
    ids = [f"c{batch}-{context_tokens}-{i}" for i in range(batch)]
    for rid in ids:
        engine.add_request(EngineRequest(rid, context_tokens, NUM_TIMED_STEPS + 2))
    engine.execute(Step({rid: context_tokens for rid in ids}), 0)
    times_ms = []
    for _ in range(NUM_TIMED_STEPS):
        start = time.process_time()
        assert engine.execute(Step({rid: 1 for rid in ids}), 0).ok
        times_ms.append(1e3 * (time.process_time() - start))
    for rid in ids:
        engine.abort(rid)
    return statistics.median(times_ms)


def prefill_cpu_ms(engine: TorchEngine, size: int) -> float:
    times_ms = []
    for i in range(NUM_TIMED_STEPS):
        rid = f"q{size}-{i}"
        engine.add_request(EngineRequest(rid, size, 1))
        start = time.process_time()
        assert engine.execute(Step({rid: size}), 0).ok
        times_ms.append(1e3 * (time.process_time() - start))
    return statistics.median(times_ms[1:])


def context_rows(engine: TorchEngine, preset: str) -> list[str]:
    """Same token count, different work: decodes at growing context vs one prefill chunk."""
    rows = []
    for batch in CONTEXT_SWEEP_BATCHES:
        cells = [f"{decode_cpu_ms(engine, batch, ctx):.1f}" for ctx in CONTEXT_SWEEP_TOKENS]
        rows.append(
            f"| {preset} | {batch} | "
            + " | ".join(cells)
            + f" | {prefill_cpu_ms(engine, batch):.1f} |"
        )
    return rows


def prefill_tokens_per_s(engine: TorchEngine, size: int) -> float:
    times = []
    for i in range(4):
        rid = f"p{size}-{i}"
        engine.add_request(EngineRequest(rid, size, 1))
        report = engine.execute(Step({rid: size}), 0)
        assert report.ok
        times.append(report.step_time_s)
    return size / statistics.median(times[1:])


def bench_preset(preset: str, root: Path) -> tuple[list[str], list[str], list[str]]:
    model_dir = root / preset
    make_model(preset, model_dir, draft=True)
    engine = TorchEngine.from_pretrained(model_dir, model_dir / "draft", kv_memory_gb=0.5)
    decode = [f"{decode_tokens_per_s(engine, b):,.0f}" for b in DECODE_BATCH_SIZES]
    prefill = [f"{prefill_tokens_per_s(engine, p):,.0f}" for p in PREFILL_SIZES]
    throughput_row = f"| {preset} | " + " | ".join(decode + prefill) + " |"

    fit_rows = [_fit_row(preset, engine, timer) for timer in ("cpu", "wall")]
    context = context_rows(engine, preset)
    return [throughput_row], fit_rows, context


def _fit_row(preset: str, engine: TorchEngine, timer: str) -> str:
    """The profiler's fit with its context term; its error in sample and on held-out step shapes
    (a fit without every fourth shape, scored on them)."""
    fit = Profiler(engine, timer=timer).run(max_num_lines=2, name=f"{preset}-cpu")
    lines = " , ".join(
        f"{ln.k_token_s * 1e6:.1f} us/tok + {ln.k_spec_s * 1e3:.2f} ms*s + "
        f"{ln.k_context_s * 1e9:.0f} ns/ctx tok + {ln.intercept_s * 1e3:.2f} ms"
        for ln in fit.model.lines
    )
    return (
        f"| {preset} | {timer} | {fit.fit.num_samples} | {fit.num_held_out} | {fit.fit.r2:.3f} | "
        f"{100 * fit.fit.under_prediction_fraction:.0f}% | {fit.median_abs_pct_error:.1f}% | "
        f"{fit.held_out_error_pct:.1f}% | max({lines}) |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--num-threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.num_threads)
    load_before = os.getloadavg()[0]
    throughput, fits, contexts = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            rows = bench_preset(preset, Path(tmp))
            throughput += rows[0]
            fits += rows[1]
            contexts += rows[2]
            print("\n".join(rows[0] + rows[1] + rows[2]), flush=True)
    load_after = os.getloadavg()[0]
    decode_cols = " | ".join(f"decode B={b}" for b in DECODE_BATCH_SIZES)
    prefill_cols = " | ".join(f"prefill P={p}" for p in PREFILL_SIZES)
    body = "\n".join(
        [
            "## Torch engine (CPU)",
            "",
            f"Random-weight presets, float32, {args.num_threads} torch thread(s), block size 16. "
            "Tokens per second through `TorchEngine.execute` (sampling and bookkeeping "
            f"included); decodes run with {CONTEXT_TOKENS} context tokens per request. Host load "
            f"average {load_before:.1f} before, {load_after:.1f} after (a shared host: other jobs "
            "inflate and scatter these times).",
            "",
            f"| preset | {decode_cols} | {prefill_cols} |",
            "|---|" + "---|" * (len(DECODE_BATCH_SIZES) + len(PREFILL_SIZES)),
            *throughput,
            "",
            "Performance model with its context term, fitted by the profiler sweep (prefill "
            "chunks 16..1024, chunked prefill after 512..1536 cached tokens, decode batches 1..64 "
            "at contexts 16..1536, mixed steps, speculation s = 1, 2, 4 with the preset's draft, "
            "at varying contexts); the median absolute error in sample and on held-out step "
            "shapes (every fourth shape left out of a first fit and scored against it; target: "
            "< 10%). Timer `cpu`: process CPU time per step (one thread, so the step's own cost, "
            "immune to other jobs); `wall`: the step time the engine reports, as the planner sees "
            "it on this shared host.",
            "",
            "| preset | timer | shapes | held out | R^2 | under-predicted | median abs err (fit) "
            "| median abs err (held out) | model |",
            "|---|---|---|---|---|---|---|---|---|",
            *fits,
            "",
            "Why a token-count model missed (the context term's reason): a decode token also "
            "attends over its cached context. Process CPU time (ms) of one step of B tokens, as B "
            "decodes at a given context length or as one prefill chunk of B tokens:",
            "",
            "| preset | B | "
            + " | ".join(f"decode, context {c}" for c in CONTEXT_SWEEP_TOKENS)
            + " | prefill chunk |",
            "|---|---|" + "---|" * (len(CONTEXT_SWEEP_TOKENS) + 1),
            *contexts,
        ]
    )
    command = "python benchmarks/bench_torch_engine.py " + " ".join(argv or [])
    write_section("torch_engine", body, command.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
