"""Tool-agent capacity per GPU (issue 12): the capacity search on the tool_agent scenario for
each formulation given, lengths predicted (the default), 200-chain windows, pooled over seeds.

    PYTHONPATH=$PWD python benchmarks/bench_agents.py --out out/bench_agents.json \
        --formulations slos_dp vllm_fcfs sarathi --seeds 2

Prints one line per formulation and writes every evaluated point as JSON. The numbers are quoted
in docs/AGENTS.md with the command and the commit that produced them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_blind import SEARCH as PARAMS

from lab.capacity import formulation_capacity
from lab.experiment import Experiment


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
        scenario="tool_agent",
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
        wall_s = time.perf_counter() - start_s
        row = {**result.to_dict(), "wall_s": round(wall_s, 1)}
        rows.append(row)
        print(
            f"{formulation:<12} {result.capacity_per_gpu_rps:.3f} chains/s/GPU "
            f"(failing at {result.failing_rate_rps}, {len(result.points)} runs, {wall_s:.0f} s)",
            flush=True,
        )
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
