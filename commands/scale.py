"""`slos-serve scale N [--control tcp://127.0.0.1:5559] [--wait-s S]`: set the number of engine
replicas of a running `slos-serve serve`; without N, print its replicas."""

from __future__ import annotations

import argparse
import time

from commands.cli import CliError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("replicas", type=int, nargs="?", help="the new number of replicas")
    parser.add_argument(
        "--control", default="tcp://127.0.0.1:5559", help="serve's control endpoint"
    )
    parser.add_argument(
        "--wait-s",
        type=float,
        default=0.0,
        help="wait up to this long until the planner counts N engines",
    )


def run(args: argparse.Namespace) -> int:
    from deploy.control import ScaleRequest, StatusRequest, ask

    request = StatusRequest() if args.replicas is None else ScaleRequest(args.replicas)
    reply = ask(args.control, request)
    if not reply.ok:
        raise CliError(reply.error)
    deadline = time.monotonic() + args.wait_s
    while args.replicas is not None and reply.num_engines != reply.target_replicas:
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
        reply = ask(args.control, StatusRequest())
    print(
        f"replicas: {reply.target_replicas} wanted, {reply.num_engines} registered with the planner"
    )
    for row in reply.replicas:
        detail = f"  {row.where}" if row.where else ""
        print(f"  {row.engine_id or f'engine-{row.index}'}: {row.state}{detail}")
    if args.replicas is not None and args.wait_s and reply.num_engines != reply.target_replicas:
        raise CliError(
            f"{reply.num_engines} of {reply.target_replicas} engines after {args.wait_s:g}s"
        )
    return 0
