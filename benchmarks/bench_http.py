"""HTTP front door overhead: what the OpenAI-compatible server adds to TTFT and to each streamed
token, at the chatbot capacity rate, with a planner daemon and two simulated engines as processes.

1. The chatbot capacity of slos_dp on 2 replicas (opt-13b-2xa100) comes from the simulator's
   capacity search; the run uses that rate.
2. Direct: the workload is replayed through the Python client (lab.replay).
3. HTTP: the same workload through `slos-serve bench` (its own process) against the HTTP server
   (in this process, on its own event loop thread), whose PlannerClient keeps every handle. Per
   request, the handle stamps the submit and each TOKENS message on arrival, the HTTP client
   stamps its send and each SSE chunk on reading: their difference is what HTTP adds (ingress:
   HTTP, JSON, validation, submit; egress: event loop hop, JSON, SSE write, client read).
4. A second HTTP run at a low rate, paired the same way.
The machine is shared (2 cores: planner, 2 engines, server, load generator and other work), so
the added time is an upper bound of the server's own cost.

    python benchmarks/bench_http.py [--num-requests N] [--rate R]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgspec
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.report_section import write_section
from benchmarks.service_support import write_planner_config
from commands.demo import ProcessGroup, wait_for_engines
from formulations.plan import Verdict
from lab.capacity import SearchParams, formulation_capacity
from lab.experiment import Experiment
from lab.replay import replay
from lab.report import build_report
from planner_svc.client import PlannerClient
from planner_svc.http.server import ApiServer, ServerThread

PERF_MODEL = "opt-13b-2xa100"
POLICY = "slos_dp"
NUM_ENGINES = 2
TARGET_P50_ADDED_TTFT_MS = 1.0


class KeepingClient(PlannerClient):
    """A PlannerClient that keeps every handle (the server drops them when a request ends), so
    that the benchmark can read the client-side token times afterwards."""

    def forget(self, request_id: str) -> None:
        pass


def chatbot_capacity_rps(num_requests: int) -> float:
    experiment = Experiment(
        scenario="chatbot",
        perf_model=PERF_MODEL,
        num_replicas=NUM_ENGINES,
        num_requests=num_requests,
    )
    result = formulation_capacity(
        experiment, POLICY, SearchParams(tolerance_rps=0.5), show_progress=False
    )
    return result.capacity_rps


def start_service(group: ProcessGroup, tmp: Path) -> str:
    config, engine_port, client_port = write_planner_config(tmp, POLICY, PERF_MODEL)
    cli = [sys.executable, "-m", "commands.cli"]
    group.start("planner", [*cli, "planner", "--config", str(config), "--log-level", "WARNING"])
    for i in range(NUM_ENGINES):
        group.start(
            f"engine-{i}",
            [
                *cli,
                "engine",
                "--engine",
                "sim",
                "--connect",
                f"tcp://127.0.0.1:{engine_port}",
                "--engine-id",
                f"engine-{i}",
                "--perf-model",
                PERF_MODEL,
                "--num-blocks",
                "3500",
            ],
        )
    return f"tcp://127.0.0.1:{client_port}"


def direct_run(endpoint: str, workload) -> list:
    with PlannerClient(endpoint) as client:
        return replay(client, workload, drain_timeout_s=60.0, show_summary=False).records


def run_bench(url: str, args: list[str], calls_path: Path) -> None:
    """`slos-serve bench` on the chatbot scenario against `url`, in its own process; the
    per-call JSON goes to `calls_path`."""
    argv = [sys.executable, "-m", "commands.cli", "bench", "--url", url, "--scenario", "chatbot"]
    argv += [*args, "--json", "--calls-out", str(calls_path)]
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, timeout=600)


def http_run(endpoint: str, workload_args: list[str], tmp: Path):
    """(per-call JSON of the bench client, {response id: server-side handle}, client clock zero,
    CPU seconds this process (HTTP server + its planner client) used meanwhile, and the server's
    own ingress / token delivery histograms).
    The load generator is `slos-serve bench` in its own process, so that it does not compete with
    the server for this process's GIL."""
    client = KeepingClient(endpoint)
    api = ApiServer(client)
    server = ServerThread(api)
    calls_path = tmp / "calls.json"
    try:
        cpu_start_s = time.process_time()
        run_bench(server.url, [*workload_args, "--perf-model", PERF_MODEL], calls_path)
        server_cpu_s = time.process_time() - cpu_start_s
        handles = {h.request_id: h for h in client.handles()}
        inside = {name: _histogram_summary(api, name) for name in ("ingress", "token_delivery")}
        return json.loads(calls_path.read_text()), handles, client._t0, server_cpu_s, inside
    finally:
        server.close()
        client.close()


class NoopApi:
    """The floor: an aiohttp server that reads and parses the request body like ours, then at
    once streams one one-token chunk and [DONE], with no planner behind it. The bench client's
    TTFT against it is what the bare HTTP stack (client library, loopback TCP, aiohttp, this
    machine's scheduling) costs per request, before any serving work."""

    def app(self):
        from aiohttp import web

        async def completions(request: web.Request) -> web.StreamResponse:
            msgspec.json.decode(await request.read())
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            chunk = {
                "id": "noop",
                "object": "text_completion",
                "choices": [{"index": 0, "text": "", "token_ids": [1], "finish_reason": "length"}],
            }
            await response.write(b"data: " + msgspec.json.encode(chunk) + b"\n\ndata: [DONE]\n\n")
            return response

        app = web.Application(client_max_size=8 << 20)
        app.router.add_post("/v1/completions", completions)
        return app


def floor_ttft_ms(workload_args: list[str], tmp: Path) -> list[float]:
    """TTFTs (ms) that the bench client measures against NoopApi."""
    server = ServerThread(NoopApi())
    calls_path = tmp / "noop_calls.json"
    try:
        run_bench(server.url, workload_args, calls_path)
    finally:
        server.close()
    calls = json.loads(calls_path.read_text())["calls"]
    return [(c["token_times_s"][0] - c["arrival_s"]) * 1e3 for c in calls if c["token_times_s"]]


def _histogram_summary(api: ApiServer, name: str) -> dict:
    """Mean (ms) and the share of samples <= 1 ms of one of the server's overhead histograms."""
    registry = api.metrics.registry
    count = registry.get_sample_value(f"slos_http_{name}_seconds_count") or 0.0
    total_s = registry.get_sample_value(f"slos_http_{name}_seconds_sum") or 0.0
    under = registry.get_sample_value(f"slos_http_{name}_seconds_bucket", {"le": "0.001"}) or 0.0
    return {
        "mean_ms": 1e3 * total_s / count if count else float("nan"),
        "share_under_1ms": under / count if count else float("nan"),
    }


def added_times_ms(calls: dict, handles, client_t0: float) -> tuple[list[float], list[float]]:
    """Per request, TTFT(HTTP client) - TTFT(planner client inside the server); per streamed
    token message, its SSE read time - its TOKENS receive time. Both on the machine's monotonic
    clock (the two processes' clocks differ only by their zeros)."""
    added_ttft, added_token = [], []
    bench_t0 = calls["start_monotonic_s"]
    for call in calls["calls"]:
        handle = handles.get(call["response_id"])
        times = call["token_times_s"]
        if handle is None or not times or not handle.token_times_s:
            continue
        http_ttft_s = times[0] - call["arrival_s"]
        direct_ttft_s = handle.token_times_s[0] - handle.arrival_s
        added_ttft.append((http_ttft_s - direct_ttft_s) * 1e3)
        n = min(len(times), len(handle.token_times_s))
        added_token += [
            ((bench_t0 + b) - (client_t0 + h)) * 1e3
            for b, h in zip(times[:n], handle.token_times_s[:n])
        ]
    return added_ttft, added_token


def http_records(calls: dict, workload) -> list:
    """RequestRecords of the HTTP run, rebuilt from the bench client's per-call JSON."""
    from lab.bench_client import CallResult

    requests = {r.request_id: r for r in workload.requests}
    results = []
    for call in calls["calls"]:
        request = dataclasses.replace(requests[call["request_id"]], arrival_s=call["arrival_s"])
        verdict = Verdict(call["verdict"]) if call["verdict"] else None
        results.append(
            CallResult(
                request,
                call["status"],
                call["response_id"],
                verdict,
                call["slo"],
                call["token_times_s"],
                call["error"],
            ).record()
        )
    return results


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-requests", type=int, default=150)
    parser.add_argument("--rate", type=float, default=None, help="default: chatbot capacity")
    parser.add_argument("--low-rate", type=float, default=2.0, help="the low-load run's rate")
    args = parser.parse_args(argv)
    from formulations.perf_model import perf_model_preset
    from lab.workloads import WorkloadOptions, build_workload

    rate = args.rate or chatbot_capacity_rps(200)
    print(f"bench_http: chatbot at {rate:.2f} req/s, {args.num_requests} requests", flush=True)
    workload = build_workload(
        "chatbot",
        perf_model_preset(PERF_MODEL),
        WorkloadOptions(rate_rps=rate, num_requests=args.num_requests),
    )
    num_low = max(10, args.num_requests // 5)
    group = ProcessGroup()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-http-") as tmp:
            endpoint = start_service(group, Path(tmp))
            with PlannerClient(endpoint) as probe:
                wait_for_engines(probe, NUM_ENGINES, group)
            direct = build_report(direct_run(endpoint, workload), workload)
            loaded = http_run(
                endpoint,
                ["--rate", repr(rate), "--num-requests", str(args.num_requests)],
                Path(tmp),
            )
            low_args = [
                "--rate",
                repr(args.low_rate),
                "--num-requests",
                str(num_low),
                "--seed",
                "1",
            ]
            low = http_run(endpoint, low_args, Path(tmp))
            floor_ms = floor_ttft_ms(low_args, Path(tmp))
    finally:
        group.stop_all()
    via_http = build_report(http_records(loaded[0], workload), workload)
    rows = [
        _overhead_row(f"capacity rate, {rate:.2f} req/s", *loaded),
        _overhead_row(f"low load, {args.low_rate:g} req/s", *low),
    ]
    num_errors = sum(
        1 for run in (loaded, low) for c in run[0]["calls"] if c["error"] and c["status"] != 429
    )
    body = _section(rate, args.num_requests, direct, via_http, rows, num_errors, floor_ms)
    print(body)
    command = "python benchmarks/bench_http.py" + (f" {' '.join(argv)}" if argv else "")
    write_section("http", body, command)
    return 0


def _overhead_row(
    label: str, calls: dict, handles, client_t0: float, server_cpu_s: float, inside: dict
) -> dict:
    added_ttft, added_token = added_times_ms(calls, handles, client_t0)
    num_requests = len(calls["calls"])
    num_tokens = sum(len(h.token_times_s) for h in handles.values())
    return {
        "label": label,
        "ttft": added_ttft,
        "token": added_token,
        "cpu_ms_per_request": 1e3 * server_cpu_s / max(1, num_requests),
        "cpu_us_per_token": 1e6 * server_cpu_s / max(1, num_tokens),
        "num_tokens": num_tokens,
        "inside": inside,
    }


def _section(rate, num_requests, direct, via_http, rows, num_errors, floor_ms) -> str:
    capacity_p50 = _pct(rows[0]["ttft"], 50)
    low_p50 = _pct(rows[1]["ttft"], 50)

    def verdict(p50):
        return "met" if p50 < TARGET_P50_ADDED_TTFT_MS else "not met"

    table = [
        "| run | added TTFT p50 / p90 / p99 (ms) | added per token p50 / p99 (ms) | "
        "server CPU per request (ms) | server CPU per token (us) | requests | tokens |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        table.append(
            f"| {r['label']} | {_pct(r['ttft'], 50):.2f} / {_pct(r['ttft'], 90):.2f} / "
            f"{_pct(r['ttft'], 99):.2f} | {_pct(r['token'], 50):.2f} / {_pct(r['token'], 99):.2f} "
            f"| {r['cpu_ms_per_request']:.2f} | {r['cpu_us_per_token']:.0f} | {len(r['ttft'])} "
            f"| {r['num_tokens']} |"
        )
    inside = [
        "| run | ingress mean (ms) | ingress <= 1 ms | token delivery mean (ms) | "
        "delivery <= 1 ms |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        i, d = r["inside"]["ingress"], r["inside"]["token_delivery"]
        inside.append(
            f"| {r['label']} | {i['mean_ms']:.3f} | {100 * i['share_under_1ms']:.0f}% "
            f"| {d['mean_ms']:.3f} | {100 * d['share_under_1ms']:.0f}% |"
        )
    unpaired = [
        "| measured | direct client | through HTTP |",
        "|---|---|---|",
        f"| TTFT p50 / p99 (ms) | {direct.ttft.median_ms:.1f} / {direct.ttft.p99_ms:.1f} "
        f"| {via_http.ttft.median_ms:.1f} / {via_http.ttft.p99_ms:.1f} |",
        f"| ITL p50 / p99 (ms) | {direct.itl.median_ms:.1f} / {direct.itl.p99_ms:.1f} "
        f"| {via_http.itl.median_ms:.1f} / {via_http.itl.p99_ms:.1f} |",
        f"| SLO attainment | {100 * direct.attainment:.1f}% | {100 * via_http.attainment:.1f}% |",
        f"| admitted / rejected | {direct.num_admitted} / {direct.num_rejected} "
        f"| {via_http.num_admitted} / {via_http.num_rejected} |",
    ]
    return "\n".join(
        [
            "## HTTP front door overhead",
            "",
            f"Chatbot scenario with a planner daemon ({POLICY}) and {NUM_ENGINES} simulated "
            f"{PERF_MODEL} engines as processes. `slos-serve bench` (its own process) drives the HTTP "
            "server (streaming /v1/completions, token-id prompts); the server's planner client keeps "
            "its handles, so each request's added time is paired exactly: added TTFT = HTTP client "
            "TTFT - planner client TTFT inside the server (ingress + egress); added per token = SSE "
            "read time - TOKENS receive time. Server CPU = CPU time of the server process (event loop "
            "+ planner client thread) during the run, divided by the requests, and by the tokens "
            "(each an upper bound of the cost per request / per token, since both share it).",
            "",
            *table,
            "",
            f"Target: under {TARGET_P50_ADDED_TTFT_MS:g} ms p50 added to TTFT. At the capacity rate "
            f"({rate:.2f} req/s, the simulator's capacity of {POLICY} on {NUM_ENGINES} replicas at 90% "
            f"attainment): **{verdict(capacity_p50)}** ({capacity_p50:.2f} ms); at low load: "
            f"**{verdict(low_p50)}** ({low_p50:.2f} ms; minus the bare-HTTP floor's p50 below: "
            f"{low_p50 - _pct(floor_ms, 50):.2f} ms). HTTP errors: {num_errors}. The 2-core "
            "machine is shared by the planner, engines, server and load generator (and other work), "
            "so wall-clock added times include waiting for a CPU; they are upper bounds of the "
            "server's own cost.",
            "",
            "Inside the server alone (its Prometheus histograms): ingress = handler start (headers "
            "parsed) to the planner client's arrival stamp of the SUBMIT (body read, JSON, "
            "validation, message built: the same stamp the direct client's TTFT starts from); token "
            "delivery = TOKENS received by the planner client to its SSE chunk written (thread hop "
            "into the event loop, JSON, write). The rest of the added TTFT is the HTTP stack on both "
            "sides (aiohttp client and server, loopback TCP) and waiting for a CPU.",
            "",
            *inside,
            "",
            f"The floor: the same low-load requests against a no-op aiohttp server (reads and parses "
            f"the body, answers one chunk at once, no planner) take {_pct(floor_ms, 50):.2f} ms p50 "
            f"({_pct(floor_ms, 90):.2f} ms p90) from send to first chunk on this machine: that much "
            "of any added TTFT is the bare HTTP stack and the load generator, not serving work.",
            "",
            f"Unpaired: the same {num_requests}-request workload at the capacity rate through the "
            "Python client and through HTTP (two runs, scheduling noise included):",
            "",
            *unpaired,
        ]
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
