"""What a formulation sees of one replica when it plans: its requests' progress and its memory.

The planner core owns and updates these objects (from engine progress reports or the simulator);
formulations read them and must not mutate them.

A request's progress (pending tokens, blocks) is the token view of `formulations/progress.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from formulations.deadlines import token_deadline_s
from formulations.lengths import LengthEstimate
from formulations.perf_model import PerfModel
from formulations.plan import Verdict
from formulations.progress import TokenProgress, num_blocks_for
from formulations.request import Request


@dataclass(slots=True)
class RequestState(TokenProgress):
    request: Request
    verdict: Verdict | None = None  # None: waiting for a verdict
    num_computed_tokens: int = 0
    num_generated_tokens: int = 0
    first_token_s: float | None = None
    num_blocks: int = 0  # KV blocks held on the replica
    # The planner's belief about the output length (formulations/lengths.py), set by the core
    # before each plan; None: nothing better than the cap, `request.num_output_tokens`.
    predicted_output: LengthEstimate | None = None  # total output tokens, expected and quantile
    predicted_at: int = -1  # output tokens produced when `predicted_output` was made
    # A later round of a tool chain whose first round was admitted: the planner admits it unless
    # it rejects the whole chain (an explicit chain-level verdict; docs/AGENTS.md).
    protected: bool = False
    # Set by the core for a tool chain's rounds: the chance that a next round comes at all
    # (formulations/chain_forecast.py; docs/AGENTS.md).
    chain_next_p: float = 1.0
    num_prompt_tokens: int = field(init=False)  # the request's, kept here for the hot loops

    def __post_init__(self) -> None:
        self.num_prompt_tokens = self.request.num_prompt_tokens

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_planned_output_tokens(self) -> int:
        """The output length memory is planned for: the predicted quantile, within the cap and
        beyond what is already produced."""
        return self.within_cap(self.predicted_output.quantile if self.predicted_output else None)

    @property
    def num_expected_output_tokens(self) -> int:
        """The expected output length, within the cap and beyond what is already produced."""
        return self.within_cap(self.predicted_output.expected if self.predicted_output else None)

    def within_cap(self, total: int | None) -> int:
        """A total output length the request can still have: at most its cap, past what it has
        produced (None: the cap)."""
        cap = self.request.num_output_tokens
        if total is None:
            return cap
        return min(cap, max(total, self.num_generated_tokens + 1))

    def num_peak_blocks(self, block_size: int) -> int:
        """KV blocks at the request's longest as planned: its prompt and every planned output
        token but the last, which is sampled and never cached (`Request.num_peak_kv_tokens`)."""
        return num_blocks_for(
            self.num_prompt_tokens + self.num_planned_output_tokens - 1, block_size
        )

    @property
    def num_remaining_output_tokens(self) -> int:
        return self.request.num_output_tokens - self.num_generated_tokens

    @property
    def is_finished(self) -> bool:
        return self.num_generated_tokens >= self.request.num_output_tokens

    @property
    def is_prefilling(self) -> bool:
        return not self.is_finished and not self.is_decoding

    @property
    def next_token_deadline_s(self) -> float:
        """Deadline of the next output token (the TTFT deadline before the first one)."""
        return token_deadline_s(self.request, self.num_generated_tokens + 1, self.first_token_s)

    @property
    def current_tpot_s(self) -> float:
        """TPOT that applies to the next output token."""
        return self.request.slo.tpot_of_token_s(
            self.num_generated_tokens + 1, self.request.num_thinking_tokens
        )


@dataclass(frozen=True, slots=True)
class ExpectedRound:
    """A paused tool chain's next round as the planner expects it: `num_tokens` of KV beyond what
    the replica keeps pinned for it, held from its expected arrival to its expected end, with the
    chance that it comes at all (formulations/chain_forecast.py)."""

    chain_id: str
    num_tokens: int
    start_s: float
    end_s: float
    probability: float


@dataclass(frozen=True, slots=True)
class ReplicaView:
    """A snapshot of one replica at `now_s`, handed to `Formulation.plan`."""

    replica_id: int
    now_s: float
    perf_model: PerfModel
    block_size: int
    num_total_blocks: int
    num_free_blocks: int
    running: Sequence[RequestState]  # admitted or best effort, unfinished (possibly preempted)
    waiting: Sequence[RequestState]  # new requests that need a verdict
    max_spec_tokens: int = 0  # 0: the engine has no draft model
    spec_acceptance_rate: float = 0.0  # online estimate of the per-token acceptance rate alpha
    # Cached context one decode in a planned step attends over, as estimated by the core (each
    # decode adds it to the `c` of perf_model; 0 when the model has no context term).
    context_tokens_per_decode: int = 0
    # KV pinned for paused tool chains (docs/AGENTS.md), already left out of `num_total_blocks`.
    num_kept_blocks: int = 0
    # The next rounds expected back from paused tool chains whose KV the replica keeps
    # (planner_svc/chains.py): formulations that plan chains make room for them in time.
    expected_rounds: Sequence[ExpectedRound] = ()
    # Host memory the engine still offers for kept KV (blocks; 0: none or full) and the seconds
    # to copy one token's KV back in from it.
    num_host_free_blocks: int = 0
    kv_swap_s_per_token: float = 0.0
