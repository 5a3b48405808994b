"""`slos-serve simulate`: serve one scenario (or a user trace) with one formulation at one rate in
the virtual-time simulator and print the report (vLLM-style block + SLO attainment per class)."""

from __future__ import annotations

import argparse

from commands.cli import CliError
from formulations.lengths import LENGTH_MODES


def add_experiment_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by `simulate` and `capacity`: what is served, and on what."""
    add = parser.add_argument
    add(
        "--scenario",
        default="chatbot",
        help="chatbot, coder, summarizer, reasoning, tool_agent, mixed",
    )
    add("--trace", metavar="FILE", help="a user trace (CSV / JSONL, docs/WORKLOADS.md) instead")
    add(
        "--perf-model",
        default="opt-13b-2xa100",
        help="a preset, or a JSON from `slos-serve profile`",
    )
    add("--replicas", type=int, help="engine replicas (default: 1; 2 when disaggregated)")
    add("--num-requests", type=int, default=300, help="items to take (a tool chain is one)")
    add("--start", type=int, help="trace rows to skip (default: the scenario's window start)")
    add("--seed", type=int, default=0)
    add("--spec", type=int, default=0, metavar="K", help="longest speculation (0: no draft model)")
    add("--duration", type=float, metavar="S", help="keep the arrivals of the first S seconds")
    add("--arrivals", choices=("trace", "poisson", "bursty"), help="another arrival process")
    add("--burst-size", type=float, default=4.0, help="mean burst size of bursty arrivals")
    add("--max-model-len", type=int, default=8192, help="context length (longer: dropped)")
    add("--lengths", choices=LENGTH_MODES, default="predicted", help="what the planner knows")
    add("--kv-blocks", type=int, metavar="N", help="KV blocks per replica (a smaller GPU)")
    truth = parser.add_argument_group(
        "the engines' truth (robustness to a wrong model)"
    ).add_argument
    truth(
        "--truth-context-s",
        type=float,
        default=0.0,
        metavar="S",
        help="engines also take S seconds per cached context token a step attends over",
    )
    truth(
        "--truth-noise",
        type=float,
        default=0.0,
        metavar="F",
        help="engines' step times vary by a uniform factor in [1 - F, 1 + F]",
    )
    truth("--refit", action="store_true", help="the planner refits its model online")
    truth(
        "--overrun-target",
        type=float,
        default=None,
        metavar="P",
        help="with --refit: share of planned steps allowed to overrun (sets the margin; 0.5)",
    )


def add_formulation_argument(parser: argparse.ArgumentParser, repeatable: bool = False) -> None:
    """--formulation NAME (`--policy`, its older name); `repeatable`: a list, for comparisons."""
    kwargs = {"action": "append", "dest": "formulations"} if repeatable else {}
    what = "formulations (repeat for several; default: slos_dp)" if repeatable else "formulation"
    default = None if repeatable else "slos_dp"
    parser.add_argument(
        "--formulation", "--policy", default=default, metavar="NAME", help=what, **kwargs
    )


def experiment_from_args(args: argparse.Namespace):
    from lab.experiment import Experiment
    from lab.workloads import SCENARIO_NAMES

    if args.trace is None and args.scenario not in SCENARIO_NAMES:
        raise CliError(f"unknown scenario {args.scenario!r} (known: {', '.join(SCENARIO_NAMES)})")
    if args.num_requests is not None and args.num_requests < 1:
        raise CliError(f"--num-requests must be at least 1, got {args.num_requests}")
    if args.start is not None and args.start < 0:
        raise CliError(f"--start must be non-negative, got {args.start}")
    if args.kv_blocks is not None and args.kv_blocks < 1:
        raise CliError(f"--kv-blocks must be at least 1, got {args.kv_blocks}")
    if args.truth_context_s < 0:
        raise CliError(f"--truth-context-s must be >= 0, got {args.truth_context_s}")
    if not 0 <= args.truth_noise < 1:
        raise CliError(f"--truth-noise must be in [0, 1), got {args.truth_noise}")
    if args.overrun_target is not None and not args.refit:
        raise CliError("--overrun-target needs --refit")
    return Experiment(
        scenario=args.scenario,
        trace_path=args.trace,
        perf_model=args.perf_model,
        num_replicas=args.replicas,
        max_spec_tokens=args.spec,
        num_requests=args.num_requests,
        start_index=args.start,
        seed=args.seed,
        arrivals=args.arrivals,
        mean_burst_size=args.burst_size,
        duration_s=args.duration,
        max_model_len=args.max_model_len,
        lengths=args.lengths,
        num_kv_blocks=args.kv_blocks,
        truth_context_s=args.truth_context_s,
        truth_noise=args.truth_noise,
        refit=_refit_params(args),
    )


def _refit_params(args: argparse.Namespace):
    if not args.refit:
        return None
    from formulations.refit import RefitParams

    if args.overrun_target is None:
        return RefitParams()
    if not 0 < args.overrun_target < 1:
        raise CliError(f"--overrun-target must be in (0, 1), got {args.overrun_target}")
    return RefitParams(overrun_target=args.overrun_target)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_formulation_argument(parser)
    add = parser.add_argument
    add("--rate", type=float, help="arrivals per second (a trace without it keeps its timestamps)")
    add_experiment_arguments(parser)
    add("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    from lab.experiment import check_formulation

    experiment = experiment_from_args(args)
    check_formulation(args.formulation)
    if args.rate is not None and not args.rate > 0:
        raise CliError(f"--rate must be a positive number of req/s, got {args.rate}")
    if args.rate is None and args.trace is None:
        raise CliError(
            "--rate is required for a scenario (a --trace may replay its own timestamps)"
        )
    report, result = experiment.run(args.formulation, args.rate)
    if args.json:
        data = report.to_dict()
        data["simulation"] = {
            "formulation": args.formulation,
            "rate_rps": args.rate,
            "num_gpus": result.num_gpus,
            "num_steps": result.num_steps,
            "num_replans": result.num_replans,
            "wall_s": result.wall_s,
            "truth": {"context_s": args.truth_context_s, "noise": args.truth_noise},
            "refit": [_refit_dict(status) for status in result.refits],
        }
        import json

        print(json.dumps(data, indent=2))
    else:
        print(
            f"{report.name}: {result.num_gpus} GPU(s), simulated {result.sim_duration_s:.1f} s "
            f"in {result.wall_s:.2f} s wall"
        )
        print(report.format_text())
        for status in result.refits:
            print(
                f"refit, replica {status.replica_id}: {status.num_refits} refits, "
                f"{status.num_drifts} drift(s); x{status.scale:.3f} the model, "
                f"{status.k_context_s:.3g} s per context token, margin "
                f"{100 * status.margin:.1f}%, planned steps overran "
                f"{100 * status.overrun_rate:.0f}% of the time"
            )
    return 0


def _refit_dict(status) -> dict:
    return {
        "replica_id": status.replica_id,
        "num_refits": status.num_refits,
        "num_drifts": status.num_drifts,
        "scale": status.scale,
        "k_context_s": status.k_context_s,
        "margin": status.margin,
        "overrun_rate": status.overrun_rate,
        "planning_model": status.planning_model.to_dict(),
    }
