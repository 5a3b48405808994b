"""`slos-serve planner --config planner.toml`: run the planner daemon until SIGINT / SIGTERM."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal

from planner_svc.config import load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="planner TOML file (see examples/)")
    parser.add_argument("--engine-endpoint", help="override [planner] engine_endpoint")
    parser.add_argument("--client-endpoint", help="override [planner] client_endpoint")
    parser.add_argument("--metrics-port", type=int, help="override [planner] metrics_port")
    parser.add_argument("--formulation", help="override the config's formulation")
    parser.add_argument("--log-level", default="INFO")


def run(args: argparse.Namespace) -> int:
    from planner_svc.daemon import PlannerDaemon  # zmq only when the daemon really runs

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    config = load_config(args.config)
    overrides = {
        "engine_endpoint": args.engine_endpoint,
        "client_endpoint": args.client_endpoint,
        "metrics_port": args.metrics_port,
        "formulation": args.formulation,
    }
    config = dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})
    daemon = PlannerDaemon(config)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: daemon.stop())
    try:
        daemon.serve_metrics()
    except ValueError:
        daemon.close()
        raise
    logging.getLogger("slos_serve.daemon").info(
        "planner up: formulation %s, engines at %s, clients at %s",
        config.formulation,
        daemon.engine_endpoint,
        daemon.client_endpoint,
    )
    print(
        f"planner ready engines={daemon.engine_endpoint} clients={daemon.client_endpoint}",
        flush=True,
    )
    daemon.run()
    return 0
