"""Small factories for requests and replica views used by the planner tests."""

from __future__ import annotations

from formulations.perf_model import PerfModel
from formulations.plan import Verdict
from formulations.progress import num_blocks_for
from formulations.request import Request
from formulations.slo import SLO
from formulations.state import ReplicaView, RequestState


def request(
    rid: str,
    arrival_s: float,
    prompt: int,
    output: int,
    ttft_s: float,
    tpot_s: float,
    value: float = 1.0,
) -> Request:
    return Request(
        rid, arrival_s, prompt, output, SLO(tpot_s=tpot_s, ttft_s=ttft_s), ttft_s, value=value
    )


def decoding_state(
    req: Request, num_generated: int, first_token_s: float, block_size: int
) -> RequestState:
    """An admitted request that has produced `num_generated` tokens and is decoding."""
    computed = req.num_prompt_tokens + num_generated - 1
    return RequestState(
        req,
        Verdict.ADMITTED,
        computed,
        num_generated,
        first_token_s,
        num_blocks_for(computed, block_size),
    )


def view(
    perf: PerfModel,
    now_s: float,
    running,
    waiting,
    num_total_blocks: int = 100_000,
    block_size: int = 16,
    max_spec_tokens: int = 0,
    acceptance: float = 0.0,
) -> ReplicaView:
    used = sum(s.num_blocks for s in running)
    return ReplicaView(
        0,
        now_s,
        perf,
        block_size,
        num_total_blocks,
        num_total_blocks - used,
        tuple(running),
        tuple(RequestState(r) if isinstance(r, Request) else r for r in waiting),
        max_spec_tokens,
        acceptance,
    )
