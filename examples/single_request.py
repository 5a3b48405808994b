"""Submit one request to a running planner and stream its tokens.

slos-serve planner --config examples/planner_slos_dp.toml &
slos-serve engine --engine sim --engine-id engine-0 &
python examples/single_request.py --prompt-tokens 512 --max-tokens 64 --slo-class chatbot
"""

from __future__ import annotations

import argparse
import sys

from planner_svc.client import ClientError, PlannerClient


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--planner", default="tcp://127.0.0.1:5558", help="client endpoint")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--slo-class", default="chatbot")
    parser.add_argument(
        "--thinking-tokens",
        type=int,
        default=0,
        help="reasoning: thinking budget (use --slo-class reasoning)",
    )
    args = parser.parse_args(argv)

    try:
        with PlannerClient(args.planner) as client:
            stream_one(client, args)
    except (ClientError, ValueError) as exc:  # e.g. an unknown SLO class, no planner
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def stream_one(client: PlannerClient, args: argparse.Namespace) -> None:
    handle = client.submit(
        num_prompt_tokens=args.prompt_tokens,
        max_tokens=args.max_tokens,
        slo_class=args.slo_class,
        thinking_tokens=args.thinking_tokens,
    )
    verdict = handle.verdict(timeout_s=10)
    print(
        f"{handle.request_id}: {verdict.verdict} on replica {verdict.replica_id} "
        f"(TTFT target {verdict.ttft_slo_s * 1000:.0f} ms, TPOT {verdict.tpot_s * 1000:.0f} ms)"
        f"{' - ' + verdict.reason if verdict.reason else ''}"
    )
    for event in handle.tokens():
        print(
            f"  +{event.num_tokens} tokens ({event.num_generated_tokens} so far) "
            f"ids={event.token_ids}"
        )
    if handle.error:
        raise ClientError(f"{handle.request_id} ended early: {handle.error}")
    record = handle.record()
    if record.ttft_s is not None:
        print(f"TTFT {record.ttft_s * 1000:.1f} ms, attained: {record.attainment.ok}")


if __name__ == "__main__":
    raise SystemExit(main())
