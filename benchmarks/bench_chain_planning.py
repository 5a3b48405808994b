"""Planning the chain (issue 12, docs/AGENTS.md "Planning the chain"): slos_dp with and without
`plan_chains` on tool_agent, lengths predicted, per seed: first rounds admitted, later rounds of
admitted chains that missed, preemptions and chain attainment, at a tight and the default KV pool.

    PYTHONPATH=$PWD python benchmarks/bench_chain_planning.py [--num-chains 200] [--seeds 0 1] \
        [--host-blocks 5000 --swap-s-per-token 16e-6]

With `--host-blocks`, a third row per point: plan_chains on, engines offering that much host
memory for kept KV at that copy-in cost (docs/AGENTS.md, "KV on host memory").

Prints a markdown table (one simulation per cell, about 10 s each on the development VM).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict

from formulations.plan import Verdict
from lab.experiment import Experiment
from lab.simulator import simulate

# (KV blocks per replica or None for the preset's, chains per second)
POINTS = ((1500, 1.0), (1500, 0.6), (None, 1.6))


def measure(
    num_chains: int, seed: int, kv_blocks: int | None, rate: float, plan: bool, host: dict
) -> dict:
    experiment = Experiment(
        scenario="tool_agent",
        num_requests=num_chains,
        seed=seed,
        num_kv_blocks=kv_blocks,
        sim_params={"formulation_params": {"plan_chains": plan}, **host},
    )
    result = simulate(experiment.workload(rate), experiment.sim_config("slos_dp"))
    rounds = defaultdict(list)
    for record in result.records:
        rounds[record.request.chain_id].append(record.attainment.ok)
    expected = {c.chain_id: c.num_rounds for c in result.workload.chains}
    attained = sum(all(oks) and len(oks) == expected[c] for c, oks in rounds.items())
    return {
        "first_admitted": sum(
            r.request.round_index == 0 and r.verdict is Verdict.ADMITTED for r in result.records
        ),
        "later_missed": sum(
            r.request.round_index > 0 and not r.attainment.ok for r in result.records
        ),
        "preemptions": sum(r.num_preemptions for r in result.records),
        "chain_attainment": attained / len(expected),
    }


def column(cells: list[dict], key: str, digits: int = 0) -> str:
    """One table cell: the seeds' values, separated by slashes."""
    return " / ".join(f"{c[key]:.{digits}f}" for c in cells)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-chains", type=int, default=200)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--host-blocks", type=int, default=0, help="host KV blocks per replica")
    parser.add_argument("--swap-s-per-token", type=float, default=16e-6)
    args = parser.parse_args(argv)
    variants = [("off", False, {}), ("on", True, {})]
    if args.host_blocks:
        host = {"kv_host_blocks": args.host_blocks, "kv_swap_s_per_token": args.swap_s_per_token}
        variants.append((f"on, host {args.host_blocks}", True, host))
    print(
        "| KV blocks, rate | plan_chains | first rounds admitted | later rounds missed | "
        "preemptions | chain attainment |"
    )
    print("|---|---|---|---|---|---|")
    for kv_blocks, rate in POINTS:
        for label, plan, host in variants:
            start_s = time.perf_counter()
            cells = [measure(args.num_chains, s, kv_blocks, rate, plan, host) for s in args.seeds]

            print(
                f"| {kv_blocks or 'default'}, {rate} chains/s | {label} | "
                f"{column(cells, 'first_admitted')} | {column(cells, 'later_missed')} | "
                f"{column(cells, 'preemptions')} | {column(cells, 'chain_attainment', 3)} |",
                flush=True,
            )
            print(f"  ({time.perf_counter() - start_s:.0f} s)", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
