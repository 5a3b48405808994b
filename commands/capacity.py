"""`slos-serve capacity`: binary-search the serving capacity of one or more formulations on a
scenario
(the highest rate at which >= target of the requests attain every stage SLO), with a progress bar;
prints req/s and req/s per GPU, writes JSON and an attainment-vs-rate plot."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from commands.cli import CliError
from commands.simulate import (
    add_experiment_arguments,
    add_formulation_argument,
    experiment_from_args,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_formulation_argument(parser, repeatable=True)
    add = parser.add_argument
    add("--target", type=float, default=0.9, help="share of items that must attain (0.9)")
    add("--min-rate", type=float, default=1.0, help="lower search bound, req/s")
    add(
        "--max-rate", type=float, default=32.0, help="upper bound, req/s (doubled while it attains)"
    )
    add("--tolerance", type=float, default=0.3, help="stop when the bracket is this narrow, req/s")
    add("--out", default="out/capacity", help="directory for the JSON and plot")
    add("--seeds", type=int, default=1, help="runs per rate (seed, seed+1, ...), pooled")
    add("--no-progress", action="store_true", help="hide the progress bar")
    add_experiment_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from lab.capacity import SearchParams, format_capacity_table, formulation_capacity
    from lab.experiment import check_formulation
    from lab.plots import plot_attainment_curves

    experiment = experiment_from_args(args)
    formulations = args.formulations or ["slos_dp"]
    for formulation in formulations:
        check_formulation(formulation)
    params = SearchParams(
        target=args.target,
        min_rate_rps=args.min_rate,
        max_rate_rps=args.max_rate,
        tolerance_rps=args.tolerance,
    )
    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise CliError(f"--out {out_dir} exists and is not a directory")
    results = [
        formulation_capacity(
            experiment,
            formulation,
            params,
            num_seeds=args.seeds,
            show_progress=not args.no_progress and None,
        )
        for formulation in formulations
    ]
    truth = ""
    if experiment.has_truth_error:
        truth = (
            f", truth +{experiment.truth_context_s:g} s/context token, "
            f"+-{100 * experiment.truth_noise:g}% noise"
        )
    refit = ", refit on" if experiment.refit is not None else ""
    print(
        f"Serving capacity on {experiment.label} ({experiment.perf_model}{truth}{refit}, "
        f"target {100 * args.target:.0f}%):"
    )
    print(format_capacity_table(results))
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"capacity_{experiment.label}.json"
    json_path.write_text(json.dumps([r.to_dict() for r in results], indent=2))
    plot_path = plot_attainment_curves(
        results,
        out_dir / f"capacity_{experiment.label}.png",
        title=f"{experiment.label} on {experiment.perf_model}",
    )
    print(f"wrote {json_path} and {plot_path}")
    return 0
