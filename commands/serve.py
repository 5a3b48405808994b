"""`slos-serve serve [--config deploy.toml] [flags]`: the planner daemon, N engines and the
OpenAI-compatible API as one service (docs/DEPLOYMENT.md). With no arguments: the embedded default
deployment (2 sim engines, slos_dp, http://127.0.0.1:8000/v1). `--cluster ray` runs the engines as
Ray actors on a Ray cluster (`--address`) or on a local one it starts."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from deploy.deployment import (
    DEFAULT_TOML,
    Deployment,
    Network,
    RayOptions,
    load_deployment,
    parse_option,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--config", help="deployment TOML (default: the embedded one; --print-config shows it)")
    add("--print-config", action="store_true", help="print the embedded default TOML and exit")
    add("--engine", help="sim, torch, vllm, or package.module:builder")
    add("--model-dir", help="torch / vllm: the model directory (also the API's tokenizer)")
    add("--replicas", type=int, help="number of engine replicas")
    add("--formulation", help="the planner's formulation (e.g. slos_dp, sarathi)")
    add("--served-model-name", nargs="+", help="model name(s) clients use")
    add("--host", help="the API's host ([network] api_host)")
    add("--port", type=int, help="the API's port ([network] api_port; 0 = a free port)")
    add("--engine-port", type=int, help="the planner's engine port (0 = a free port)")
    add("--client-port", type=int, help="the planner's client port (0 = a free port)")
    add("--control-port", type=int, help="the port `slos-serve scale` uses (0 = a free port)")
    add("--metrics-port", type=int, help="the planner's Prometheus port (0 = off)")
    add("--planner-host", help="where the planner's engine socket listens")
    add("--advertise-host", help="the address engines dial to reach the planner")
    add("--curve", choices=("auto", "on", "off"), help="CURVE on the planner's sockets")
    add(
        "--engine-option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an [engine_options] entry, e.g. time_scale=4 or num_blocks=2000; repeatable",
    )
    ray = parser.add_argument_group("Ray").add_argument
    ray("--cluster", choices=("local", "ray"), help="engines as processes (local) or Ray actors")
    ray("--address", help="Ray cluster address (default: start a local Ray)")
    ray("--num-gpus", type=float, help="GPUs per replica ([ray] num_gpus)")
    ray("--num-cpus", type=float, help="CPUs per replica ([ray] num_cpus)")


def run(args: argparse.Namespace) -> int:
    from deploy.service import Service
    from deploy.supervisor import PrefixedLog

    if args.print_config:
        sys.stdout.write(DEFAULT_TOML.read_text())
        return 0
    config_path = Path(args.config) if args.config else None
    deployment = build_deployment(args, config_path)
    log = PrefixedLog()
    log.line("serve", f"deployment from {deployment.source}")
    service = Service(
        deployment,
        log,
        config_path=config_path,
        reload=lambda: build_deployment(args, config_path),
    )
    return service.run()


def build_deployment(args: argparse.Namespace, config_path: Path | None) -> Deployment:
    """The deployment file (or the embedded default) with the flags on top."""
    deployment = load_deployment(config_path)
    top = {
        "engine": args.engine,
        "model_dir": args.model_dir,
        "replicas": args.replicas,
        "cluster": args.cluster,
        "served_model_name": tuple(args.served_model_name) if args.served_model_name else None,
    }
    changes = {k: v for k, v in top.items() if v is not None}
    network = {
        "api_host": args.host,
        "api_port": args.port,
        "engine_port": args.engine_port,
        "client_port": args.client_port,
        "control_port": args.control_port,
        "metrics_port": args.metrics_port,
        "planner_host": args.planner_host,
        "advertise_host": args.advertise_host,
        "curve": args.curve,
    }
    network = {k: v for k, v in network.items() if v is not None}
    ray = {"address": args.address, "num_gpus": args.num_gpus, "num_cpus": args.num_cpus}
    ray = {k: v for k, v in ray.items() if v is not None}
    engine_options = dict(deployment.engine_options)
    engine_options.update(parse_option(text) for text in args.engine_option)
    planner_config = dict(deployment.planner_config)
    if args.formulation:
        planner_config["formulation"] = args.formulation
    if args.engine and args.engine != "sim" and config_path is None:
        # the embedded default's sim settings mean nothing to a real engine
        engine_options = {k: v for k, v in engine_options.items() if k not in _SIM_ONLY}
    if "address" in ray and "cluster" not in changes:
        changes["cluster"] = "ray"  # --address alone means Ray
    try:
        return Deployment(
            **{**_fields(deployment), **changes},
            network=Network(**{**_fields(deployment.network), **network}),
            ray=RayOptions(**{**_fields(deployment.ray), **ray}),
            engine_options=engine_options,
            planner_config=planner_config,
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{deployment.source} with the flags given: {exc}") from None


_SIM_ONLY = {"perf_model", "num_blocks", "k_context_s", "noise_frac", "time_scale"}


def _fields(obj) -> dict:
    import dataclasses

    skip = {"network", "ray", "engine_options", "planner_config"}
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.name not in skip}
