"""Deadline math and the attainment check (docs/ALGORITHM.md section 1).

Output token n (1-based) of a request is due at

    start + sum_{i=2..n} tpot(i),   start = max(arrival + ttft_slo, actual first token time)

where tpot(i) is the thinking TPOT for i <= num_thinking_tokens and the answer TPOT after. The
deadline is cumulative: a request that got ahead may pause later, and an early first token does not
add slack. Attainment allows 5% tolerance on the TTFT and on each checked token's time since
`start`; tokens are checked every 20th and at the last.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from formulations.request import Request

TOLERANCE = 0.05
CHECK_EVERY = 20


def decode_offset_s(request: Request, n: int) -> float:
    """Time from the decode clock start to output token n's deadline (0 for n == 1)."""
    if n <= 1:
        return 0.0
    slo = request.slo
    num_think_gaps = max(0, min(n, request.num_thinking_tokens) - 1) if slo.thinking_tpot_s else 0
    num_answer_gaps = (n - 1) - num_think_gaps
    thinking_tpot_s = slo.thinking_tpot_s or slo.tpot_s
    return num_think_gaps * thinking_tpot_s + num_answer_gaps * slo.tpot_s


def token_deadline_s(request: Request, n: int, first_token_s: float | None = None) -> float:
    """Deadline of output token n. Before the first token exists, the clock starts at the TTFT
    deadline (the latest start that still meets every token)."""
    start_s = request.ttft_deadline_s
    if first_token_s is not None:
        start_s = max(start_s, first_token_s)
    return start_s + decode_offset_s(request, n)


def checked_tokens(num_output_tokens: int) -> list[int]:
    """Token indices (1-based) that the attainment check looks at."""
    checked = list(range(CHECK_EVERY, num_output_tokens + 1, CHECK_EVERY))
    if not checked or checked[-1] != num_output_tokens:
        checked.append(num_output_tokens)
    return checked


@dataclass(frozen=True, slots=True)
class Attainment:
    ttft_ok: bool
    tpot_ok: bool

    @property
    def ok(self) -> bool:
        return self.ttft_ok and self.tpot_ok


def check_attainment(
    request: Request, token_times_s: Sequence[float], admitted: bool = True
) -> Attainment:
    """Attainment of one request from the times its output tokens were produced.

    `token_times_s[i]` is the time of output token i+1. A request that was not admitted (rejected or
    best effort) or did not produce all its tokens attains nothing.
    """
    if not admitted or len(token_times_s) < request.num_output_tokens:
        return Attainment(False, False)
    first_s = token_times_s[0]
    ttft_ok = first_s - request.arrival_s <= (1 + TOLERANCE) * request.ttft_slo_s
    start_s = max(request.ttft_deadline_s, first_s)
    tpot_ok = all(
        token_times_s[n - 1] - start_s <= (1 + TOLERANCE) * decode_offset_s(request, n)
        for n in checked_tokens(request.num_output_tokens)
    )
    return Attainment(ttft_ok, tpot_ok)
