"""Replay a workload against a running planner daemon, in real time, through the Python client.

Single requests are submitted at their arrival times (relative to the first arrival); each tool
chain runs in its own thread (`PlannerClient.run_tool_chain`: round k+1 goes out `tool_delay_s`
after round k finished). A live summary line is printed every `summary_every_s`. The result holds
the client-side records (client clock: what a user sees), ready for `lab.report`.

Lengths: by default each request asks for its true output length as `max_tokens`, so the planner
may plan with it (the oracle setting). With `true_lengths` (a file path) the replay writes every
request's true length there for the simulated engines to read (`slos-serve engine --output-lengths`,
engine_adapters/sim_lengths.py) and asks for what is left of `max_model_len` instead, as real
clients do: the planner sees only the cap and predicts the rest. Either way the records carry the
true lengths, so attainment is checked against them.
"""

from __future__ import annotations

import dataclasses
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from engine_adapters.sim_lengths import write_true_lengths
from formulations.request import Request
from lab.workloads.workload import Workload
from planner_svc.client import PlannerClient, RequestHandle
from planner_svc.records import RequestRecord


@dataclass
class ReplayResult:
    records: list[RequestRecord]
    workload: Workload
    wall_s: float
    num_unfinished: int  # still running when the replay stopped waiting


def replay(
    client: PlannerClient,
    workload: Workload,
    drain_timeout_s: float = 30.0,
    summary_every_s: float = 1.0,
    show_summary: bool = True,
    out: TextIO | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    true_lengths: str | Path | None = None,
    max_model_len: int = 8192,
) -> ReplayResult:
    """Submit `workload` in real time, wait up to `drain_timeout_s` after the last arrival for
    requests to finish, and return their records. The live summary goes to `out` (default: the
    current sys.stdout) unless `show_summary` is False."""
    out = (out or sys.stdout) if show_summary else None
    cap = None
    if true_lengths is not None:
        write_true_lengths(true_lengths, _length_rows(workload))
        cap = max_model_len
    start_s = time.monotonic()
    first_s = min(
        [r.arrival_s for r in workload.requests] + [c.arrival_s for c in workload.chains],
        default=0.0,
    )
    chain_threads = _start_chains(client, workload, start_s, first_s, should_stop, cap)
    next_summary_s = start_s + summary_every_s
    for request in workload.requests:
        due_s = start_s + request.arrival_s - first_s
        while (wait_s := due_s - time.monotonic()) > 0 and not should_stop():
            time.sleep(min(wait_s, 0.05))
            next_summary_s = _maybe_summary(client, start_s, next_summary_s, summary_every_s, out)
        if should_stop():
            break
        client.submit(**_submit_fields(request, cap))
    drain_end_s = time.monotonic() + drain_timeout_s
    while time.monotonic() < drain_end_s and not should_stop():
        if all(h.done for h in client.handles()) and not any(t.is_alive() for t in chain_threads):
            break
        time.sleep(0.05)
        next_summary_s = _maybe_summary(client, start_s, next_summary_s, summary_every_s, out)
    _print_summary(client, start_s, out)
    handles = client.handles()
    true = {r.request_id: r for r in workload.requests}
    return ReplayResult(
        records=[_with_true_lengths(h.record(), true) for h in handles],
        workload=workload,
        wall_s=time.monotonic() - start_s,
        num_unfinished=sum(not h.done for h in handles),
    )


def _submit_fields(request: Request, max_model_len: int | None) -> dict:
    if max_model_len is None:  # the true lengths go to the planner
        return dict(
            request_id=request.request_id,
            num_prompt_tokens=request.num_prompt_tokens,
            max_tokens=request.num_output_tokens,
            slo_class=request.slo_class,
            thinking_tokens=request.num_thinking_tokens,
            value=request.value,
        )
    return dict(
        request_id=request.request_id,
        num_prompt_tokens=request.num_prompt_tokens,
        max_tokens=max_model_len - request.num_prompt_tokens,
        slo_class=request.slo_class,
        value=request.value,
    )


def _length_rows(workload: Workload) -> list[tuple[str, int, int, int]]:
    rows = [
        (r.request_id, r.num_prompt_tokens, r.num_output_tokens, r.num_thinking_tokens)
        for r in workload.requests
    ]
    for chain in workload.chains:
        for k, round_ in enumerate(chain.rounds):
            rid = f"{chain.chain_id}#r{k}"
            rows.append((rid, chain.round_prompt_tokens(k), round_.num_output_tokens, 0))
    return rows


def _with_true_lengths(record: RequestRecord, requests: dict[str, Request]) -> RequestRecord:
    """The client's record with the request's true output and thinking lengths."""
    true = requests.get(record.request.request_id)
    if true is None:
        return record
    record.request = dataclasses.replace(
        record.request,
        num_output_tokens=true.num_output_tokens,
        num_thinking_tokens=true.num_thinking_tokens,
    )
    return record


def _start_chains(
    client, workload, start_s, first_s, should_stop, max_model_len
) -> list[threading.Thread]:
    threads = []
    for chain in workload.chains:

        def run(chain=chain):
            delay_s = start_s + chain.arrival_s - first_s - time.monotonic()
            if delay_s > 0:
                time.sleep(delay_s)
            if not should_stop():
                client.run_tool_chain(chain, max_model_len=max_model_len)

        thread = threading.Thread(target=run, daemon=True, name=f"chain-{chain.chain_id}")
        thread.start()
        threads.append(thread)
    return threads


def _maybe_summary(client, start_s, next_summary_s, every_s, out) -> float:
    if time.monotonic() < next_summary_s:
        return next_summary_s
    _print_summary(client, start_s, out)
    return next_summary_s + every_s


def _print_summary(client: PlannerClient, start_s: float, out: TextIO | None) -> None:
    if out is None:
        return
    handles: list[RequestHandle] = client.handles()
    verdicts = [h.verdict_msg.verdict for h in handles if h.verdict_msg is not None]
    finished = [h for h in handles if h.finished]
    attained = sum(h.record().attainment.ok for h in finished)
    out.write(
        f"[{time.monotonic() - start_s:6.1f}s] submitted {len(handles):4d}  "
        f"admitted {verdicts.count('admitted'):4d}  rejected {verdicts.count('rejected'):3d}  "
        f"best-effort {verdicts.count('best_effort'):3d}  finished {len(finished):4d}  "
        f"attained {attained:4d}\n"
    )
    out.flush()
