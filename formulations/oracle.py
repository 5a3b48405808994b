"""An offline, clairvoyant upper bound on attainment for a whole (small) trace.

Every request whose SLOs are met must, in any schedule on the performance model,
- prefill its p tokens inside [a, a + 1.05 * ttft]   (the attainment check's 5% tolerance), and
- compute p + o - 1 tokens inside [a, a + 1.05 * (ttft + offset(o))], where offset(o) is the
  decode-clock time of its last token (deadlines.decode_offset_s);
and alone it must be able to: its prompt in one step within the TTFT window, and o - 1 decode
steps of at least T(1) each within the decode window. Any set of requests that can all attain
must therefore satisfy, for every interval [u, v] between an arrival u and a window end v,

    sum of the tokens of windows inside [u, v]  <=  max_tokens(v - u)

because the step time is subadditive (a max of lines with non-negative intercepts), so no sequence
of steps computes more tokens in a time L than one step of length L. The oracle maximises the number
(or value) of requests that satisfy these necessary conditions, with CP-SAT. It ignores memory,
decode-step sequencing across requests and routing, so it is an upper bound (a relaxation), not an
achievable schedule. Tool-chain rounds are not included (their arrival depends on the schedule).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ortools.sat.python import cp_model

from formulations.deadlines import TOLERANCE, decode_offset_s
from formulations.perf_model import PerfModel
from formulations.request import Request


@dataclass(frozen=True)
class Window:
    start_s: float
    end_s: float
    num_tokens: int


@dataclass(frozen=True)
class OracleResult:
    num_requests: int
    max_num_attained: int  # upper bound on requests that can attain every SLO
    status: str  # CP-SAT status: OPTIMAL, or FEASIBLE (then the bound is the solver's best bound)

    @property
    def max_attainment(self) -> float:
        return self.max_num_attained / self.num_requests if self.num_requests else 1.0


def request_windows(request: Request) -> tuple[Window, Window]:
    """The prefill window and the whole-request window (with the 5% tolerance)."""
    ttft_end_s = request.arrival_s + (1 + TOLERANCE) * request.ttft_slo_s
    last_s = ttft_end_s + (1 + TOLERANCE) * decode_offset_s(request, request.num_output_tokens)
    whole = request.num_prompt_tokens + request.num_output_tokens - 1
    return Window(request.arrival_s, ttft_end_s, request.num_prompt_tokens), Window(
        request.arrival_s, last_s, whole
    )


def alone_feasible(request: Request, perf_model: PerfModel) -> bool:
    prefill, whole = request_windows(request)
    if perf_model.step_time_s(request.num_prompt_tokens) > prefill.end_s - prefill.start_s + 1e-12:
        return False
    decode_window_s = whole.end_s - prefill.end_s
    decode_floor_s = (request.num_output_tokens - 1) * perf_model.step_time_s(1)
    return (
        decode_floor_s
        <= decode_window_s
        + (prefill.end_s - request.arrival_s - perf_model.step_time_s(request.num_prompt_tokens))
        + 1e-12
    )


def attainment_upper_bound(
    requests: Sequence[Request],
    perf_model: PerfModel,
    time_limit_s: float = 30.0,
    num_workers: int = 1,
) -> OracleResult:
    """Upper bound on how many of `requests` can attain every stage SLO on `perf_model`."""
    model = cp_model.CpModel()
    # -- data
    windows = {r.request_id: request_windows(r) for r in requests}
    starts = sorted({r.arrival_s for r in requests})
    ends = sorted({w.end_s for pair in windows.values() for w in pair})
    # -- variables
    x = {r.request_id: model.NewBoolVar(f"x[{r.request_id}]") for r in requests}
    # -- constraints
    for r in requests:
        if not alone_feasible(r, perf_model):
            model.Add(x[r.request_id] == 0)
    for u in starts:
        for v in ends:
            if v <= u:
                continue
            inside = [
                (w.num_tokens, x[rid])
                for rid, pair in windows.items()
                for w in pair
                if w.start_s >= u and w.end_s <= v
            ]
            if not inside:
                continue
            cap = perf_model.max_tokens(v - u)
            if sum(n for n, _ in inside) <= cap:
                continue  # cannot bind
            model.Add(sum(n * var for n, var in inside) <= max(cap, 0))
    # -- objective
    model.Maximize(sum(x.values()))
    # -- solve
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = time_limit_s
    solver.parameters.num_workers = num_workers
    status = solver.Solve(model)
    name = solver.StatusName(status)
    if status == cp_model.OPTIMAL:
        bound = round(solver.ObjectiveValue())
    elif status == cp_model.FEASIBLE:
        bound = int(solver.BestObjectiveBound())  # still an upper bound
    else:
        bound = len(requests)
    return OracleResult(len(requests), bound, name)
