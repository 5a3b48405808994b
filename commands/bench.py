"""`slos-serve bench --url URL --scenario NAME --rate R [--num-requests N] [--json]`: replay a
scenario against an OpenAI-compatible server (ours or vLLM's) with streaming, and print vLLM's
"Serving Benchmark Result" block plus per-class SLO attainment and goodput (or JSON)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from commands.cli import CliError

DEFAULT_MAX_MODEL_LEN = 8192  # when the server does not say its context length


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", required=True, help="server root, e.g. http://127.0.0.1:8000")
    parser.add_argument(
        "--scenario",
        default="chatbot",
        help="chatbot, coder, summarizer, reasoning, tool_agent or mixed",
    )
    parser.add_argument("--rate", type=float, required=True, help="arrivals per second")
    parser.add_argument("--num-requests", type=int, default=100, help="items (a chain is one)")
    parser.add_argument(
        "--model", help="the model name to request (default: the server's first, /v1/models)"
    )
    parser.add_argument("--api-key", default=None)
    parser.add_argument(
        "--perf-model",
        default="opt-13b-h100",
        help="resolves the scenario's TTFT slowdowns for servers that report no SLO",
    )
    parser.add_argument(
        "--max-model-len",
        type=int,
        help="drop scenario requests longer than this (default: the server's context length "
        f"from /v1/models, else {DEFAULT_MAX_MODEL_LEN})",
    )
    parser.add_argument(
        "--max-token-id",
        type=int,
        default=500,
        help="prompt token ids are drawn below this (the model's vocabulary)",
    )
    parser.add_argument(
        "--no-slo-fields",
        action="store_true",
        help="send plain OpenAI requests (no slo_class extension)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--drain-s", type=float, default=60.0, help="wait after the last arrival")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--calls-out", help="also write every call's raw times to this JSON file")


def run(args: argparse.Namespace) -> int:
    from formulations.perf_model import perf_model_preset
    from lab.bench_client import BenchOptions, run_bench
    from lab.report import build_report
    from lab.workloads import SCENARIO_NAMES, WorkloadOptions, build_workload

    if args.scenario not in SCENARIO_NAMES:
        raise CliError(f"unknown scenario {args.scenario!r} (known: {', '.join(SCENARIO_NAMES)})")
    if not args.url.startswith(("http://", "https://")):
        raise CliError(f"--url must start with http:// or https://, got {args.url!r}")
    if args.max_token_id <= 10:
        raise CliError("--max-token-id must be above 10")
    url = args.url.rstrip("/")
    model, max_model_len = _served_model(url, args)
    workload = build_workload(
        args.scenario,
        perf_model_preset(args.perf_model),
        WorkloadOptions(
            rate_rps=args.rate,
            num_requests=args.num_requests,
            seed=args.seed,
            max_model_len=max_model_len,
        ),
    )
    options = BenchOptions(
        url=url,
        model=model,
        api_key=args.api_key,
        send_slo_fields=not args.no_slo_fields,
        max_token_id=args.max_token_id,
        seed=args.seed,
        drain_timeout_s=args.drain_s,
        perf_model=args.perf_model,
    )
    if not args.json:
        print(
            f"bench: {args.scenario} at {args.rate:g} req/s, {workload.num_items} items "
            f"against {options.url} (model {model}, requests up to {max_model_len} tokens)",
            file=sys.stderr,
            flush=True,
        )
    result = run_bench(workload, options)
    report = build_report(result.records, workload)
    if args.calls_out:
        Path(args.calls_out).write_text(json.dumps(result.calls_json()))
    errors = sorted({c.error for c in result.calls if c.error and c.status != 429})
    if args.json:
        print(
            json.dumps(
                {
                    **report.to_dict(),
                    "url": options.url,
                    "num_errors": result.num_errors,
                    "errors": errors[:10],
                },
                indent=2,
            )
        )
    else:
        print(report.format_text())
        if errors:
            print(f"{result.num_errors} call(s) failed; first errors: {errors[:3]}")
    if result.calls and all(c.status == 0 for c in result.calls):
        raise CliError(f"no answer from {options.url}: {errors[:1]}")
    if result.num_errors:  # a report over failed calls must not pass for a measurement
        print(
            f"slos-serve bench: error: {result.num_errors} of {len(result.calls)} calls failed "
            f"(not counting rejections); first: {errors[:1]}",
            file=sys.stderr,
        )
        return 1
    return 0


def _served_model(url: str, args: argparse.Namespace) -> tuple[str, int]:
    """The model to request and the longest request to send, from the server's /v1/models
    unless the options say."""
    from lab.bench_client import served_models

    try:
        models = served_models(url, args.api_key)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    names = [m.name for m in models]
    if not models:
        raise CliError(f"{url} serves no model")
    if args.model is not None and args.model not in names:
        raise CliError(
            f"{url} does not serve the model {args.model!r} (it serves: {', '.join(names)})"
        )
    chosen = next(m for m in models if m.name == (args.model or names[0]))
    max_model_len = args.max_model_len or chosen.max_model_len or DEFAULT_MAX_MODEL_LEN
    return chosen.name, max_model_len
