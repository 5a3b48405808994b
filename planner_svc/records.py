"""The outcome of serving one request, as recorded by the simulator or the daemon; reports and the
capacity search are computed from these and nothing else."""

from __future__ import annotations

from dataclasses import dataclass, field

from formulations.deadlines import Attainment, check_attainment
from formulations.plan import Verdict
from formulations.request import Request


@dataclass(slots=True)
class RequestRecord:
    request: Request
    verdict: Verdict | None = None  # final verdict (None: never decided, e.g. run ended first)
    replica_id: int | None = None
    token_times_s: list[float] = field(default_factory=list)  # time of each output token
    num_preemptions: int = 0
    num_forwards: int = 0  # times the router forwarded it after a rejection
    finished: bool = False
    # Prompt tokens whose KV its engine had kept from the chain's previous round (not prefilled).
    # A round whose kept KV was lost after it was sent (evicted: a miss) still recomputes them.
    num_cached_tokens: int = 0
    reason: str = ""  # the verdict's reason (a chain-level rejection says so: docs/AGENTS.md)

    @property
    def attainment(self) -> Attainment:
        return check_attainment(
            self.request, self.token_times_s, admitted=self.verdict is Verdict.ADMITTED
        )

    @property
    def ttft_s(self) -> float | None:
        return self.token_times_s[0] - self.request.arrival_s if self.token_times_s else None
