"""Agent capacity per GPU (issue 12): the capacity search on a chain scenario (tool_agent, or
multi_turn_chat with --scenario) for each formulation given, lengths predicted (the default),
200-chain windows, pooled over seeds; then one run per seed at the capacity found, for the chain
and per-call attainment, KV hit rate and recompute share there.

    PYTHONPATH=$PWD python benchmarks/bench_agents.py --out out/bench_agents.json \
        --formulations slos_dp vllm_fcfs sarathi --seeds 2

Prints one line per formulation and writes every evaluated point as JSON. The numbers are quoted
in docs/AGENTS.md with the command and the commit that produced them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_blind import SEARCH as PARAMS

from lab.capacity import formulation_capacity
from lab.experiment import Experiment
from lab.workloads import SCENARIO_NAMES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="tool_agent", choices=SCENARIO_NAMES)
    parser.add_argument("--formulations", nargs="+", default=["slos_dp", "vllm_fcfs", "sarathi"])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--num-chains", type=int, default=200)
    parser.add_argument("--out", default="out/bench_agents.json")
    parser.add_argument("--kv-blocks", type=int, default=None, help="KV blocks per replica")
    parser.add_argument("--no-pin", action="store_true", help="slos_dp's pin_kv=False ablation")
    parser.add_argument("--spec", type=int, default=0, help="draft tokens per step (0: none)")
    args = parser.parse_args(argv)
    sim_params = {"formulation_params": {"pin_kv": False}} if args.no_pin else {}
    experiment = Experiment(
        scenario=args.scenario,
        num_requests=args.num_chains,
        num_kv_blocks=args.kv_blocks,
        max_spec_tokens=args.spec,
        sim_params=sim_params,
    )
    rows = []
    for formulation in args.formulations:
        start_s = time.perf_counter()
        result = formulation_capacity(
            experiment, formulation, PARAMS, num_seeds=args.seeds, show_progress=False
        )
        at_capacity = _at_rate(experiment, formulation, result.capacity_rps, args.seeds)
        wall_s = time.perf_counter() - start_s
        row = {**result.to_dict(), "at_capacity": at_capacity, "wall_s": round(wall_s, 1)}
        rows.append(row)
        print(
            f"{formulation:<12} {result.capacity_per_gpu_rps:.3f} chains/s/GPU "
            f"(failing at {result.failing_rate_rps}, {len(result.points)} runs, {wall_s:.0f} s); "
            f"at capacity: {_format(at_capacity)}",
            flush=True,
        )
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


def _at_rate(experiment: Experiment, formulation: str, rate_rps: float, num_seeds: int) -> dict:
    """Chain and per-call attainment, KV hit rate and recompute share at `rate_rps`, pooled over
    the seeds the search used (full runs, no early stop). Empty when the rate is 0."""
    if rate_rps <= 0:
        return {}
    totals = dict.fromkeys(
        (
            "num_items",
            "num_attained",
            "num_calls",
            "num_calls_attained",
            "num_later_round_prompt_tokens",
            "num_later_round_cached_tokens",
            "num_recomputed_tokens",
        ),
        0,
    )
    per_seed = []  # chain attainment of each seed: how noisy the pooled figure is
    for k in range(num_seeds):
        seeded = dataclasses.replace(experiment, seed=experiment.seed + k)
        report, _ = seeded.run(formulation, rate_rps)
        for key in totals:
            totals[key] += getattr(report, key)
        per_seed.append(round(report.attainment, 3))
    later = totals["num_later_round_prompt_tokens"]
    return {
        "rate_rps": rate_rps,
        **totals,
        "chain_attainment_per_seed": per_seed,
        "chain_attainment": totals["num_attained"] / max(1, totals["num_items"]),
        "call_attainment": totals["num_calls_attained"] / max(1, totals["num_calls"]),
        "kv_hit_rate": totals["num_later_round_cached_tokens"] / later if later else None,
        "recompute_share": totals["num_recomputed_tokens"] / later if later else None,
    }


def _format(at_capacity: dict) -> str:
    if not at_capacity:
        return "-"
    text = (
        f"chains {at_capacity['chain_attainment']:.3f} "
        f"(per seed {at_capacity['chain_attainment_per_seed']}), "
        f"calls {at_capacity['call_attainment']:.3f}"
    )
    if at_capacity["kv_hit_rate"] is not None:
        text += (
            f", KV hit rate {at_capacity['kv_hit_rate']:.3f}, "
            f"recomputed {at_capacity['recompute_share']:.3f}"
        )
    return text


if __name__ == "__main__":
    raise SystemExit(main())
