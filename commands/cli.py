"""The `slos-serve` command. Each subcommand lives in its own module with `add_arguments(parser)`
and `run(args) -> int`; modules are imported only when their subcommand runs, so that the
planner's commands never import torch or vLLM."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "simulate": ("commands.simulate", "run one scenario at one rate in the simulator"),
    "capacity": ("commands.capacity", "binary-search the serving capacity of formulations"),
    "planner": ("commands.planner", "run the planner daemon"),
    "engine": ("commands.engine", "run an engine adapter (sim, torch, vllm)"),
    "demo": ("commands.demo", "planner daemon + engines + replay client, SLO report"),
    "make-model": ("commands.make_model", "write a random-weight local checkpoint"),
    "profile": ("commands.profile", "profile an engine and fit the perf model"),
    "api": ("commands.api", "OpenAI-compatible HTTP front door"),
    "bench": ("commands.bench", "replay a scenario against an OpenAI-compatible server"),
    "serve": ("commands.serve", "planner + engines + OpenAI-compatible API in one command"),
    "scale": ("commands.scale", "change the number of replicas of a running serve"),
}


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


def _available() -> dict[str, tuple[str, str]]:
    return {name: spec for name, spec in COMMANDS.items() if _module_exists(spec[0])}


def _module_exists(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slos-serve", description="Multi-SLO LLM serving")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in _available().items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        sub_parser.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(sub_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except (CliError, ValueError, FileNotFoundError) as exc:
        print(f"slos-serve {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    # Run through the package module, not this `__main__` copy, so that `CliError` raised by the
    # subcommands is the class `main` catches.
    from commands.cli import main as package_main

    sys.exit(package_main())
