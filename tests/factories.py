"""Small factories shared by the tests."""

from __future__ import annotations

from formulations.perf_model import Line, PerfModel
from formulations.request import Request
from formulations.slo import SLO

# A one-line model with round numbers: 1 ms per token + 10 ms per step.
SIMPLE_MODEL = PerfModel((Line(1e-3, 0.0, 0.010),), "simple")


def make_req(
    rid: str = "r0",
    arrival_s: float = 0.0,
    prompt: int = 100,
    output: int = 10,
    ttft_s: float = 1.0,
    tpot_s: float = 0.1,
    thinking: int = 0,
    thinking_tpot_s: float | None = None,
    slo_class: str = "custom",
) -> Request:
    slo = SLO(tpot_s=tpot_s, ttft_s=ttft_s, thinking_tpot_s=thinking_tpot_s)
    return Request(rid, arrival_s, prompt, output, slo, ttft_s, slo_class, thinking)
