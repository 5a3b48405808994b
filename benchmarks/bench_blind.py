"""Blind planning measured (issue 11): serving capacity per GPU of slos_dp when it does not know
output lengths (`predicted`, the default), against the same planner told the true lengths
(`oracle`, the paper's setting) or planning with `max_tokens`, and against every baseline, with
and without a draft model. Writes the `blind` section of docs/BENCHMARKS.md and
docs/img/capacity_blind.png; raw results (one entry per scenario and column) go to
out/bench_blind.json and are reused by later runs with the same window and seeds, so a run
that was cut short resumes.

    python benchmarks/bench_blind.py [--scenarios a,b] [--columns c1,c2] [--num-requests 400]
        [--seeds 3] [--processes 2] [--fresh] [--no-write]

The protocol (issue 11, item 8): windows of at least 400 requests, at least 3 seeds pooled per
rate, the vLLM baseline at the better of max_num_batched_tokens 2048 and 8192, a vLLM baseline
with the same draft model at a fixed speculation length, tool agents judged per chain (every
round) with per-call attainment beside it, preemptions per 1000 requests at the capacity rate.
A smaller window or fewer seeds is printed in the section's heading, never hidden.

Everything runs in the virtual-time simulator on "opt-13b-2xa100" (a replica is two GPUs); the
numbers are simulated capacities, not GPU measurements.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from multiprocessing import Pool
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lab.capacity import SearchParams, formulation_capacity  # noqa: E402
from lab.experiment import Experiment  # noqa: E402
from lab.workloads import EVALUATION_SCENARIOS, SCENARIO_NAMES  # noqa: E402

PERF_MODEL = "opt-13b-2xa100"
SPEC_TOKENS = 4  # draft tokens per step at most (true acceptance 0.7)
RESULTS_PATH = ROOT / "out" / "bench_blind.json"
PLOT_PATH = ROOT / "docs" / "img" / "capacity_blind.png"
SEARCH = SearchParams(
    min_rate_rps=0.25,
    max_rate_rps=8.0,
    tolerance_rps=0.5,
    relative_tolerance=0.06,
    min_rate_floor_rps=0.02,
)


@dataclasses.dataclass(frozen=True)
class Column:
    """One capacity per scenario: a formulation, what it knows of lengths, its parameters,
    whether the engine has a draft model."""

    name: str
    formulation: str
    lengths: str = "predicted"
    draft: bool = False
    params: tuple[tuple[str, object], ...] = ()
    baseline: bool = False


COLUMNS = {
    c.name: c
    for c in (
        Column(
            "vllm_fcfs@2048", "vllm_fcfs", params=(("max_num_batched_tokens", 2048),), baseline=True
        ),
        Column(
            "vllm_fcfs@8192", "vllm_fcfs", params=(("max_num_batched_tokens", 8192),), baseline=True
        ),
        Column("vllm_prefill_first", "vllm_prefill_first", baseline=True),
        Column("sarathi", "sarathi", baseline=True),
        Column("edf", "edf", baseline=True),
        Column("distserve", "distserve", baseline=True),
        Column("vllm_spec", "vllm_spec", draft=True, params=(("num_spec_tokens", SPEC_TOKENS),)),
        Column("slos_dp", "slos_dp"),
        Column("slos_dp:oracle", "slos_dp", lengths="oracle"),
        Column("slos_dp:max_tokens", "slos_dp", lengths="max_tokens"),
        Column("slos_dp+draft", "slos_dp", draft=True),
        Column("slos_dp:oracle+draft", "slos_dp", lengths="oracle", draft=True),
    )
}
VLLM_BUDGETS = ("vllm_fcfs@2048", "vllm_fcfs@8192")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", default=",".join(EVALUATION_SCENARIOS))
    parser.add_argument("--columns", default=",".join(COLUMNS), help="which capacities to measure")
    parser.add_argument("--num-requests", type=int, default=400, help="trace window per run")
    parser.add_argument("--seeds", type=int, default=3, help="seeds pooled per rate")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--fresh", action="store_true", help="ignore out/bench_blind.json")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    args = parser.parse_args(argv)
    args.scenarios = args.scenarios.split(",")
    args.columns = args.columns.split(",")
    unknown = set(args.columns) - set(COLUMNS)
    if unknown:
        parser.error(f"unknown columns {sorted(unknown)} (known: {', '.join(COLUMNS)})")
    unknown = set(args.scenarios) - set(SCENARIO_NAMES)
    if unknown:
        parser.error(f"unknown scenarios {sorted(unknown)} (known: {', '.join(SCENARIO_NAMES)})")
    return args


def experiment_for(scenario: str, column: Column, num_requests: int) -> Experiment:
    sim_params = {"formulation_params": dict(column.params)} if column.params else {}
    return Experiment(
        scenario=scenario,
        perf_model=PERF_MODEL,
        num_requests=num_requests,
        lengths=column.lengths,
        max_spec_tokens=SPEC_TOKENS if column.draft else 0,
        sim_params=sim_params,
    )


def measure(job: tuple[str, str, int, int]) -> dict:
    """Capacity of one column on one scenario, then one run per seed at that capacity for the
    counts the search does not keep (preemptions, per-call attainment)."""
    scenario, name, num_requests, num_seeds = job
    column = COLUMNS[name]
    experiment = experiment_for(scenario, column, num_requests)
    start_s = time.perf_counter()
    result = formulation_capacity(
        experiment, column.formulation, SEARCH, show_progress=False, num_seeds=num_seeds
    )
    at_capacity = {"num_items": 0, "num_attained": 0, "num_calls": 0, "num_calls_attained": 0}
    at_capacity["num_preemptions"] = 0
    if result.capacity_rps > 0:
        for k in range(num_seeds):
            seeded = dataclasses.replace(experiment, seed=experiment.seed + k)
            report, _ = seeded.run(column.formulation, result.capacity_rps)
            at_capacity["num_items"] += report.num_items
            at_capacity["num_attained"] += report.num_attained
            at_capacity["num_preemptions"] += report.num_preemptions
            at_capacity["num_calls"] += sum(c.num_calls for c in report.per_class)
            at_capacity["num_calls_attained"] += sum(c.num_calls_attained for c in report.per_class)
    return {
        "scenario": scenario,
        "column": name,
        "num_requests": num_requests,
        "num_seeds": num_seeds,
        "capacity_per_gpu_rps": result.capacity_per_gpu_rps,
        "monotone": result.monotone,
        "points": [[p.rate_rps, p.attainment] for p in result.points],
        "at_capacity": at_capacity,
        "wall_s": time.perf_counter() - start_s,
    }


def result_key(scenario: str, column: str, num_requests: int, num_seeds: int) -> str:
    return f"{scenario}|{column}|{num_requests}|{num_seeds}"


def load_results(fresh: bool) -> dict[str, dict]:
    if fresh or not RESULTS_PATH.exists():
        return {}
    return json.loads(RESULTS_PATH.read_text())


def save_results(results: dict[str, dict]) -> None:
    RESULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_PATH.write_text(json.dumps(results, indent=1, sort_keys=True))


def run_jobs(args: argparse.Namespace, results: dict[str, dict]) -> int:
    """Run the searches not in `results` yet; returns how many were reused."""
    jobs = [
        (s, c, args.num_requests, args.seeds)
        for s in args.scenarios
        for c in args.columns
        if result_key(s, c, args.num_requests, args.seeds) not in results
    ]
    # the slowest first (slos_dp on reasoning), so that two processes end together
    jobs.sort(key=lambda j: (j[0] != "reasoning", not j[1].startswith("slos_dp")))
    num_reused = len(args.scenarios) * len(args.columns) - len(jobs)
    print(f"{len(jobs)} capacity searches to run ({num_reused} reused)", flush=True)
    start_s = time.perf_counter()
    with Pool(max(1, args.processes)) as pool:
        for done, entry in enumerate(pool.imap_unordered(measure, jobs), 1):
            key = result_key(entry["scenario"], entry["column"], args.num_requests, args.seeds)
            results[key] = entry
            save_results(results)
            print(
                f"[{done}/{len(jobs)} {time.perf_counter() - start_s:6.0f} s] "
                f"{entry['scenario']:<11} {entry['column']:<22} "
                f"{entry['capacity_per_gpu_rps']:.3f} req/s/GPU ({entry['wall_s']:.0f} s)",
                flush=True,
            )
    return num_reused


def geometric_mean(values: list[float]) -> float:
    values = [v for v in values if v > 0 and math.isfinite(v)]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def ratio(a: float | None, b: float | None) -> float:
    if a is None or b is None or b <= 0:
        return float("nan")
    return a / b


def table(args: argparse.Namespace, results: dict[str, dict]) -> tuple[str, dict]:
    def get(scenario: str, column: str) -> dict | None:
        return results.get(result_key(scenario, column, args.num_requests, args.seeds))

    def cap(scenario: str, column: str) -> float | None:
        entry = get(scenario, column)
        return None if entry is None else entry["capacity_per_gpu_rps"]

    shown = [c for c in COLUMNS if c not in VLLM_BUDGETS and c in args.columns]
    has_vllm = any(c in args.columns for c in VLLM_BUDGETS)
    header = (["vllm_fcfs (best budget)"] if has_vllm else []) + shown
    lines = [
        "| scenario | " + " | ".join(header) + " |",
        "|---|" + "---|" * len(header),
    ]
    ratios: dict[str, list[float]] = {
        "predicted / best baseline": [],
        "predicted+draft / best baseline": [],
        "predicted+draft / vllm_spec": [],
        "predicted / oracle": [],
        "max_tokens / predicted": [],
    }
    per_gpu: dict[str, dict[str, float]] = {}
    notes = []
    for scenario in args.scenarios:
        row: dict[str, float | None] = {}
        if has_vllm:
            budgets = {b: cap(scenario, b) for b in VLLM_BUDGETS if cap(scenario, b) is not None}
            if budgets:
                best_budget = max(budgets, key=budgets.get)
                row["vllm_fcfs (best budget)"] = budgets[best_budget]
                notes.append(
                    f"{scenario}: vllm_fcfs "
                    + ", ".join(f"{b.split('@')[1]}: {v:.3f}" for b, v in budgets.items())
                )
        for c in shown:
            row[c] = cap(scenario, c)
        cells = " | ".join("-" if row.get(h) is None else f"{row[h]:.3f}" for h in header)
        lines.append(f"| {scenario} | {cells} |")
        per_gpu[scenario] = {h: v for h, v in row.items() if v is not None}
        baseline_caps = [v for h, v in row.items() if v is not None and _is_baseline(h)]
        best = max(baseline_caps) if baseline_caps else None
        ratios["predicted / best baseline"].append(ratio(row.get("slos_dp"), best))
        ratios["predicted+draft / best baseline"].append(ratio(row.get("slos_dp+draft"), best))
        ratios["predicted+draft / vllm_spec"].append(
            ratio(row.get("slos_dp+draft"), row.get("vllm_spec"))
        )
        ratios["predicted / oracle"].append(ratio(row.get("slos_dp"), row.get("slos_dp:oracle")))
        ratios["max_tokens / predicted"].append(
            ratio(row.get("slos_dp:max_tokens"), row.get("slos_dp"))
        )
    ratio_lines = [
        "| ratio | " + " | ".join(args.scenarios) + " | geometric mean |",
        "|---|" + "---|" * (len(args.scenarios) + 1),
    ]
    for name, values in ratios.items():
        cells = " | ".join("-" if not math.isfinite(v) else f"{v:.2f}x" for v in values)
        ratio_lines.append(f"| {name} | {cells} | **{_fmt(geometric_mean(values))}** |")
    counts = [
        "| slos_dp column at its capacity | scenario | preemptions per 1000 requests | "
        "attainment (items) | per-call attainment |",
        "|---|---|---|---|---|",
    ]
    for scenario in args.scenarios:
        for c in ("slos_dp", "slos_dp:oracle", "slos_dp+draft"):
            entry = get(scenario, c)
            if entry is None or not entry["at_capacity"]["num_items"]:
                continue
            a = entry["at_capacity"]
            calls = a["num_calls"] or a["num_items"]
            counts.append(
                f"| {c} | {scenario} | {1000 * a['num_preemptions'] / calls:.1f} | "
                f"{a['num_attained'] / a['num_items']:.3f} | "
                f"{(a['num_calls_attained'] / a['num_calls']) if a['num_calls'] else float('nan'):.3f} |"
            )
    body = "\n".join(lines) + "\n\n" + "\n".join(ratio_lines) + "\n\n" + "\n".join(counts)
    if notes:
        body += "\n\nvLLM token budgets (req/s/GPU): " + "; ".join(notes) + "."
    return body, per_gpu


def _is_baseline(header: str) -> bool:
    return header == "vllm_fcfs (best budget)" or (header in COLUMNS and COLUMNS[header].baseline)


def _fmt(value: float) -> str:
    return f"{value:.2f}x" if math.isfinite(value) else "-"


def markdown(
    args: argparse.Namespace, body: str, wall_s: float, num_reused: int, search_s: float
) -> str:
    reduced = []
    if args.num_requests < 400:
        reduced.append(f"{args.num_requests}-request windows (protocol: 400)")
    if args.seeds < 3:
        reduced.append(f"{args.seeds} seed(s) (protocol: 3)")
    missing = [c for c in COLUMNS if c not in args.columns]
    if missing:
        reduced.append("columns not run: " + ", ".join(missing))
    reduced_line = "**Reduced run**: " + "; ".join(reduced) + "." if reduced else "Full protocol."
    return f"""## Blind planning: capacity per GPU without knowing output lengths

Simulated on `{PERF_MODEL}` (a replica = 2 GPUs; DistServe a prefill and a decode replica).
Capacity = the highest rate at which >= 90% of the items (a tool chain counts once, attaining
only if every round does) attain every SLO, {args.num_requests}-request windows, {args.seeds} seed(s)
pooled per rate. `slos_dp` plans with predicted lengths (the default: the engine stops at the
true length, the planner learns it from the reports); `:oracle` is told the true lengths (the
paper's setting), `:max_tokens` plans with the caps. `+draft` / `vllm_spec`: the engine has a draft
model ({SPEC_TOKENS} draft tokens at most, true acceptance 0.7); `vllm_spec` speculates
{SPEC_TOKENS} tokens on every decode. Baselines never use lengths. "best baseline" is the best
of the baselines without a draft model (vllm_fcfs at the better of its 2048 and 8192-token budgets,
vllm_prefill_first, sarathi, edf, distserve). {reduced_line}

{body}

Plot: `docs/img/capacity_blind.png`. Raw results: `out/bench_blind.json`. The searches took
{search_s / 60:.0f} min of process time in all ({args.processes} processes); {num_reused} of them
were reused from an earlier run of this command (out/bench_blind.json), this run took
{wall_s / 60:.0f} min.
"""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    results = load_results(args.fresh)
    start_s = time.perf_counter()
    num_reused = run_jobs(args, results)
    body, per_gpu = table(args, results)
    keys = [
        result_key(s, c, args.num_requests, args.seeds)
        for s in args.scenarios
        for c in args.columns
    ]
    search_s = sum(results[k]["wall_s"] for k in keys if k in results)
    text = markdown(args, body, time.perf_counter() - start_s, num_reused, search_s)
    print(text, flush=True)
    if not args.no_write:
        from report_section import write_section

        from lab.plots import plot_capacity_bars

        plot_capacity_bars(
            per_gpu, PLOT_PATH, title=f"Capacity per GPU without known lengths, {PERF_MODEL}"
        )
        command = "python benchmarks/bench_blind.py " + " ".join(
            sys.argv[1:] if argv is None else argv
        )
        write_section("blind", text, command.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
