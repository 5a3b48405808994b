"""A tool-calling agent loop: each LLM round is a request; between rounds the agent "runs a tool"
(here: sleeps) and sends the next round with the whole context so far. Intermediate rounds use the
tight tool SLO, the last round the looser one; the planner routes every round anew.

    python examples/tool_agent.py --rounds 3
"""

from __future__ import annotations

import argparse
import time
import uuid

from formulations.request import ToolChain, ToolRound
from planner_svc.client import PlannerClient, RequestHandle


def run_tool(round_index: int, previous: RequestHandle) -> None:
    """Stand-in for a real tool call (a search, a code run): it only takes time."""
    print(
        f"  tool call after round {round_index - 1} "
        f"({len(previous.token_ids)} tokens of arguments)..."
    )
    time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--planner", default="tcp://127.0.0.1:5558", help="client endpoint")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    rounds = [ToolRound(num_new_prompt_tokens=1200, num_output_tokens=60)]
    rounds += [
        ToolRound(num_new_prompt_tokens=300, num_output_tokens=40, tool_delay_s=0.5)
        for _ in range(args.rounds - 1)
    ]
    chain = ToolChain(f"agent-{uuid.uuid4().hex[:12]}", 0.0, tuple(rounds))  # unique per run
    with PlannerClient(args.planner) as client:
        handles = client.run_tool_chain(chain, tool=run_tool)
    for handle in handles:
        record = handle.record()
        verdict = handle.verdict_msg.verdict if handle.verdict_msg else "no verdict"
        if handle.error:
            verdict = f"{verdict} (error: {handle.error})"
        ttft_ms = f"{record.ttft_s * 1000:.0f} ms" if record.ttft_s is not None else "-"
        print(
            f"{handle.request_id}: {verdict}, prompt {handle.submit.num_prompt_tokens} tokens, "
            f"TTFT {ttft_ms}, "
            f"attained {record.attainment.ok}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
