"""Real-engine fidelity: a real engine serves a scenario through the planner daemon, and the
simulator predicts the same trace with the engine's profiled model, in one run.

    python benchmarks/bench_fidelity.py [--engine torch|vllm] [--device cpu|cuda] [--preset small]
        [--scenario chatbot] [--rates 2.5,4] [--duration-s 40] [--num-threads 1] [--refit]
        [--json OUT] [--no-write]

1. Make a random-weight model (`slos-serve make-model --preset`) unless `--model-dir` is given.
2. Profile the engine (`slos-serve profile`, a subprocess: it frees its memory before serving): the
   fitted model with its context term, and its median error on held-out step shapes.
3. For each rate: start `slos-serve planner` (slos_dp, planning with that model) and one engine
   process (`slos-serve engine`, which also writes its adapter's statistics), replay the scenario
   through the Python client in real time, and report attainment, output tokens per second and
   the engine's plan-wait share (time with live requests but no step to run).
4. Simulate the same requests with the same formulation, the profiled model as the engines'
   truth and the engine's KV blocks: the predicted attainment. The gap is the fidelity.

SLOs: each class keeps its published TPOT; TTFT is an absolute 1 s (the torch demo's table:
the published 3-5x slowdowns of a small model's prefill time are tens of milliseconds, below the
cost of a plan's round trip between processes); planner and simulator use the same table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from commands.demo import (  # noqa: E402
    PLANNER_TOML,
    TORCH_DEMO_TTFT_MS,
    ProcessGroup,
    _torch_slos,
    free_port,
    wait_for_engines,
)
from formulations.perf_model import PerfModel  # noqa: E402
from formulations.slo import SLO, SLO_PRESETS  # noqa: E402

REFIT_TOML = "\n[core.refit]\n"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--engine", choices=("torch", "vllm"), default="torch")
    add("--device", default="cpu")
    add("--preset", default="small", help="make-model preset (ignored with --model-dir)")
    add("--model-dir", default=None, help="an existing model directory")
    add("--scenario", default="chatbot", help="a scenario without tool chains")
    add(
        "--rates",
        default="2.5,4",
        help="arrival rates to serve, req/s, comma-separated; 'auto': 0.7x and 1x the capacity "
        "the simulator predicts for the profiled engine",
    )
    add("--duration-s", type=float, default=40.0, help="arrival window per rate")
    add("--drain-s", type=float, default=30.0)
    add("--num-threads", type=int, default=1, help="torch CPU threads of the engine")
    add("--kv-memory-gb", type=float, default=0.25, help="torch engine KV memory")
    add("--vllm-arg", action="append", default=[], metavar="NAME=VALUE")
    add("--repeats", type=int, default=3, help="profiler rounds per step shape")
    add("--quick-profile", action="store_true", help="the profiler's short sweep (smoke runs)")
    add("--reuse-profile", action="store_true", help="keep WORK/profile.json if it is there")
    add("--refit", action="store_true", help="planner and simulator refit the model online")
    add("--seed", type=int, default=0)
    add("--work-dir", default=None, help="keep the model, profile and logs here")
    add("--json", default=None, help="write the results as JSON here")
    add("--no-write", action="store_true", help="leave docs/BENCHMARKS.md alone")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory(prefix="slos-fidelity-") as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        model_dir = Path(args.model_dir) if args.model_dir else make_model(args, work)
        profile = run_profile(args, model_dir, work)
        rates = rates_to_serve(args, profile)
        rows = [serve_and_predict(args, model_dir, work, profile, rate) for rate in rates]
    result = {
        "engine": args.engine,
        "device": args.device,
        "model": str(model_dir.name),
        "scenario": args.scenario,
        "refit": args.refit,
        "profile": {k: v for k, v in profile.items() if k != "measurements"},
        "runs": rows,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"profile_held_out_error_pct": profile["held_out_error_pct"], "runs": rows}))
    if not args.no_write:
        from report_section import write_section

        name = f"fidelity_{args.engine}_{args.device}"
        command = "python benchmarks/bench_fidelity.py " + " ".join(argv or sys.argv[1:])
        write_section(name, markdown(args, profile, rows), command.strip())
    return 0


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "commands.cli", *args]


def make_model(args: argparse.Namespace, work: Path) -> Path:
    model_dir = work / args.preset
    if not (model_dir / "config.json").is_file():
        subprocess.run(
            cli("make-model", "--preset", args.preset, "--out", str(model_dir)), check=True
        )
    return model_dir


def engine_flags(args: argparse.Namespace) -> list[str]:
    """What the profiler and the serving engine share, so that both see the same engine."""
    if args.engine == "torch":
        return ["--device", args.device, "--num-threads", str(args.num_threads),
                "--kv-memory-gb", str(args.kv_memory_gb)]  # fmt: skip
    return [flag for item in args.vllm_arg for flag in ("--vllm-arg", item)]


def run_profile(args: argparse.Namespace, model_dir: Path, work: Path) -> dict:
    stats_path, model_path = work / "profile.json", model_dir / "perf_model.json"
    if args.reuse_profile and stats_path.is_file() and model_path.is_file():
        profile = json.loads(stats_path.read_text())
        return {**profile, "wall_s": float("nan"), "model_path": str(model_path)}
    command = cli("profile", "--engine", args.engine, "--model", str(model_dir))
    command += ["--out", str(model_path), "--stats-out", str(stats_path)]
    command += ["--repeats", str(args.repeats)] + (["--quick"] if args.quick_profile else [])
    command += engine_flags(args)
    if args.engine == "vllm":
        command += ["--device", args.device]  # names the profile; vLLM picks its device itself
    started_s = time.monotonic()
    subprocess.run(command, check=True, cwd=ROOT)
    profile = json.loads(stats_path.read_text())
    profile["wall_s"] = time.monotonic() - started_s
    profile["model_path"] = str(model_path)
    print(
        f"profile: held-out error {profile['held_out_error_pct']:.1f}%, in sample "
        f"{profile['in_sample_error_pct']:.1f}%, {profile['wall_s']:.0f} s",
        flush=True,
    )
    return profile


def rates_to_serve(args: argparse.Namespace, profile: dict) -> list[float]:
    if args.rates != "auto":
        return [float(r) for r in args.rates.split(",")]
    from lab.capacity import SearchParams, search_capacity

    model, engine = PerfModel.from_dict(profile["model"]), profile["engine"]

    # A shorter window than the served one: the search simulates ~8 rates.
    search_args = argparse.Namespace(**{**vars(args), "duration_s": min(args.duration_s, 10.0)})

    def predicted(rate_rps: float) -> float:
        workload = workload_for(search_args, model, rate_rps, engine["max_model_len"])
        return predict(search_args, model, engine, workload)["predicted_attainment"]

    params = SearchParams(min_rate_rps=1.0, max_rate_rps=8.0, relative_tolerance=0.1)
    capacity = search_capacity(predicted, params, label="simulated", show_progress=False)
    rate = capacity.capacity_rps or params.min_rate_floor_rps
    print(f"simulated capacity {rate:.2f} req/s: serving at 0.7x and 1x", flush=True)
    return [round(0.7 * rate, 2), round(rate, 2)]


def workload_for(args: argparse.Namespace, model: PerfModel, rate_rps: float, max_len: int):
    """The scenario at `rate_rps` with the demo's SLO table (TPOTs kept, TTFT 1 s)."""
    from lab.workloads import WorkloadOptions, build_workload

    options = WorkloadOptions(
        rate_rps=rate_rps,
        num_requests=None,
        duration_s=args.duration_s,
        seed=args.seed,
        max_model_len=max_len,
    )
    workload = build_workload(args.scenario, model, options)
    if workload.chains:
        raise SystemExit(f"--scenario {args.scenario} has tool chains; pick one without")
    ttft_s = TORCH_DEMO_TTFT_MS / 1000
    requests = []
    for request in workload.requests:
        preset = SLO_PRESETS[request.slo_class]
        slo = SLO(tpot_s=preset.tpot_s, ttft_s=ttft_s, thinking_tpot_s=preset.thinking_tpot_s)
        requests.append(dataclasses.replace(request, slo=slo, ttft_slo_s=ttft_s))
    return dataclasses.replace(workload, requests=tuple(requests))


def serve_and_predict(
    args: argparse.Namespace, model_dir: Path, work: Path, profile: dict, rate_rps: float
) -> dict:
    model = PerfModel.from_dict(profile["model"])
    engine = profile["engine"]
    workload = workload_for(args, model, rate_rps, engine["max_model_len"])
    served = serve(args, model_dir, work, profile, workload, rate_rps)
    steps = served.pop("steps")
    predicted = predict(args, model, engine, workload)
    row = {
        "rate_rps": rate_rps,
        "num_requests": len(workload.requests),
        **served,
        **predicted,
        "gap_points": 100 * (served["attainment"] - predicted["predicted_attainment"]),
    }
    # The same prediction with a model fitted on the steps the engine ran while serving: what is
    # left of the gap is the service's own effects (plan latency, the client's clock), not the
    # profile's error.
    if len(steps) >= 8:
        served_model = fitted_on(steps)
        row["served_model"] = served_model.to_dict()
        row["hindsight_attainment"] = predict(args, served_model, engine, workload)[
            "predicted_attainment"
        ]
        row["hindsight_gap_points"] = 100 * (served["attainment"] - row["hindsight_attainment"])
    print(f"rate {rate_rps:g}: {json.dumps(row)}", flush=True)
    return row


def serve(args, model_dir: Path, work: Path, profile: dict, workload, rate_rps: float) -> dict:
    from lab.replay import replay
    from lab.report import build_report
    from planner_svc.client import PlannerClient

    engine_port, client_port = free_port(), free_port()
    config = work / f"planner-{rate_rps:g}.toml"
    config.write_text(
        PLANNER_TOML.format(
            formulation="slos_dp",
            engine_port=engine_port,
            client_port=client_port,
            metrics_port=0,
            perf_model=profile["model_path"],
        )
        + _torch_slos()
        + (REFIT_TOML if args.refit else "")
    )
    stats_path = work / f"engine-{rate_rps:g}.json"
    group = ProcessGroup()
    try:
        group.start("planner", cli("planner", "--config", str(config), "--log-level", "WARNING"))
        engine_command = [sys.executable, str(ROOT / "benchmarks" / "engine_with_stats.py")]
        engine_command += [str(stats_path), "--engine", args.engine, "--model-dir", str(model_dir)]
        engine_command += ["--connect", f"tcp://127.0.0.1:{engine_port}"] + engine_flags(args)
        group.start("engine", engine_command)
        with PlannerClient(f"tcp://127.0.0.1:{client_port}") as client:
            wait_for_engines(client, 1, group, timeout_s=600.0)
            result = replay(
                client,
                workload,
                drain_timeout_s=args.drain_s,
                show_summary=False,
                should_stop=group.any_died,
            )
        if group.any_died():
            raise RuntimeError(f"a service process exited early: {group.died()}")
    finally:
        group.stop_all(grace_s=30.0)
    report = build_report(result.records, workload)
    engine_stats = json.loads(stats_path.read_text()) if stats_path.is_file() else {}
    num_tokens = sum(len(r.token_times_s) for r in result.records)
    return {
        "attainment": report.attainment,
        "steps": engine_stats.get("steps", []),
        **outcome_counts(result.records, ""),
        **served_step_error(PerfModel.from_dict(profile["model"]), engine_stats.get("steps", [])),
        "num_unfinished": result.num_unfinished,
        "tokens_per_s": num_tokens / result.wall_s if result.wall_s > 0 else 0.0,
        "plan_wait_share": engine_stats.get("plan_wait_fraction"),
        "engine_steps": engine_stats.get("num_steps"),
        "engine_busy_s": engine_stats.get("busy_s"),
        "wall_s": result.wall_s,
    }


def predict(args, model: PerfModel, engine: dict, workload) -> dict:
    from formulations.refit import RefitParams
    from lab.report import build_report
    from lab.simulator import SimConfig, simulate

    config = SimConfig(
        formulation="slos_dp",
        perf_model=model,
        num_blocks_per_replica=engine["num_total_blocks"],
        block_size=engine["block_size"],
        refit=RefitParams() if args.refit else None,
        seed=args.seed,
    )
    result = simulate(workload, config)
    report = build_report(result.records, workload)
    num_tokens = sum(len(r.token_times_s) for r in result.records)
    return {
        "predicted_attainment": report.attainment,
        **outcome_counts(result.records, "predicted_"),
        "predicted_tokens_per_s": num_tokens / result.sim_duration_s
        if result.sim_duration_s > 0
        else 0.0,
    }


def fitted_on(steps: list[list[float]]) -> PerfModel:
    """A one-line model with a context term fitted on served steps [tokens, drafts, context, s]."""
    from formulations.perf_model import StepSample, fit_perf_model

    samples = [StepSample(int(n), int(s), t, int(c)) for n, s, c, t in steps if t > 0]
    return fit_perf_model(samples, name="served", relative=True).model


def served_step_error(model: PerfModel, steps: list[list[float]]) -> dict:
    """How the profiled model predicts the steps the engine ran while serving: the median
    absolute error and the median measured / predicted ratio."""
    import statistics

    ratios = [
        time_s / model.step_time_s(int(n), int(s), int(c))
        for n, s, c, time_s in steps
        if time_s > 0 and model.step_time_s(int(n), int(s), int(c)) > 0
    ]
    if not ratios:
        return {"served_step_error_pct": None, "served_step_ratio": None}
    return {
        "served_step_error_pct": 100 * statistics.median(abs(r - 1) for r in ratios),
        "served_step_ratio": statistics.median(ratios),
        "served_mean_step_ms": 1e3 * statistics.mean(step[3] for step in steps),
    }


def _hindsight(row: dict) -> str:
    if "hindsight_attainment" not in row:
        return "n/a"
    return f"{row['hindsight_attainment']:.3f} ({row['hindsight_gap_points']:+.1f})"


def _step_error(row: dict) -> str:
    if row.get("served_step_error_pct") is None:
        return "n/a"
    return f"{row['served_step_error_pct']:.0f}%, x{row['served_step_ratio']:.2f}"


def outcome_counts(records, prefix: str) -> dict:
    """Rejected requests, and admitted ones that missed an SLO (a broken promise)."""
    rejected = sum(r.verdict is not None and r.verdict.name == "REJECTED" for r in records)
    missed = sum(
        r.verdict is not None and r.verdict.name == "ADMITTED" and not r.attainment.ok
        for r in records
    )
    return {f"{prefix}rejected": rejected, f"{prefix}admitted_missed": missed}


def markdown(args: argparse.Namespace, profile: dict, rows: list[dict]) -> str:
    lines = [
        f"## Real-engine fidelity: {args.engine} on {args.device}",
        "",
        f"`{args.engine}` engine, model `{args.model_dir or args.preset}` (random weights), one "
        f"engine process ({args.num_threads} torch thread(s) on CPU), the planner daemon and the "
        "client on the same host. Profile: "
        f"{profile['num_samples']} step shapes, median error {profile['in_sample_error_pct']:.1f}%"
        f" in sample and {profile['held_out_error_pct']:.1f}% on {profile['num_held_out']} held-out "
        f"shapes (target < 10%), {profile['wall_s']:.0f} s. Scenario `{args.scenario}`, "
        f"{args.duration_s:g} s of arrivals per rate, TTFT 1 s and the published TPOTs; "
        f"slos_dp{' with the online refit' if args.refit else ''}. Predicted: the simulator on the "
        "same requests with the profiled model as the truth and the engine's KV blocks.",
        "",
        "| rate req/s | requests | attainment, served | attainment, simulated | gap (points) | "
        "simulated with a model fitted on the served steps (gap) | "
        "rejected / admitted but missed, served | ... simulated | tokens/s served | "
        "tokens/s simulated | plan-wait share | unfinished | served steps: median error of the "
        "profiled model, measured / predicted |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        wait = row["plan_wait_share"]
        lines.append(
            f"| {row['rate_rps']:g} | {row['num_requests']} | {row['attainment']:.3f} | "
            f"{row['predicted_attainment']:.3f} | {row['gap_points']:+.1f} | "
            f"{_hindsight(row)} | {row['rejected']} / {row['admitted_missed']} | "
            f"{row['predicted_rejected']} / {row['predicted_admitted_missed']} | "
            f"{row['tokens_per_s']:.0f} | {row['predicted_tokens_per_s']:.0f} | "
            f"{'n/a' if wait is None else f'{100 * wait:.1f}%'} | {row['num_unfinished']} | "
            + _step_error(row)
            + " |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
