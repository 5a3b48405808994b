"""`slos-serve api --planner tcp://HOST:PORT --port 8000 [--model-dir DIR] [--config FILE]`: the
OpenAI-compatible HTTP front door (docs/HTTP_API.md) in front of a running planner daemon."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from commands.cli import CliError
from commands.curve_options import add_curve_arguments, curve_keys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--planner", default="tcp://127.0.0.1:5558", help="the planner daemon's client endpoint"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--model-dir",
        help="model directory with tokenizer.json (text in and "
        "out); without it, prompts must be token ids",
    )
    parser.add_argument("--config", help="HTTP front door TOML (SLO defaults per model / API key)")
    parser.add_argument(
        "--served-model-name",
        nargs="+",
        help="model name(s) clients use (default: the config's, else the model "
        "directory's name, else slos-serve)",
    )
    parser.add_argument("--max-model-len", type=int, help="prompt + max_tokens limit")
    add_curve_arguments(parser)
    parser.add_argument("--no-access-log", action="store_true", help="no line per HTTP request")
    parser.add_argument("--log-level", default="INFO")


def run(args: argparse.Namespace) -> int:
    from planner_svc.client import PlannerClient
    from planner_svc.http.api_config import load_api_config
    from planner_svc.http.server import ApiServer
    from planner_svc.http.tokenizer import TextTokenizer

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    if not 0 <= args.port < 65536:
        raise CliError(f"--port must be in [0, 65535], got {args.port}")
    tokenizer = TextTokenizer.from_model_dir(args.model_dir) if args.model_dir else None
    names = args.served_model_name
    if names is None and args.config is None and tokenizer is not None:
        names = [tokenizer.name]
    config = load_api_config(args.config, names, max_model_len=args.max_model_len)
    with PlannerClient(args.planner, curve=curve_keys(args)) as client:
        api = ApiServer(client, config, tokenizer)
        asyncio.run(_serve(api, args.host, args.port, not args.no_access_log))
    return 0


async def _serve(api, host: str, port: int, access_log: bool) -> None:
    from planner_svc.http.server import start_site

    try:
        runner, bound_port = await start_site(api, host, port, access_log)
    except OSError as exc:
        raise CliError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    print(
        f"api ready http://{host}:{bound_port} models={','.join(api.config.model_names)}",
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
