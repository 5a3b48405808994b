"""What a formulation sees of one replica when it plans: its requests' progress and its memory.

The planner core owns and updates these objects (from engine progress reports or the simulator);
formulations read them and must not mutate them.

A request's progress follows the phase-free token view: it has `num_tokens` known tokens (prompt
plus
output generated so far), of which `num_computed_tokens` are in the KV cache. A step that brings the
computed count up to `num_tokens` samples the next output token. Prefill, chunked prefill,
recompute after preemption and decode are all "compute the pending tokens".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from formulations.deadlines import token_deadline_s
from formulations.perf_model import PerfModel
from formulations.plan import Verdict
from formulations.request import Request


def num_blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


@dataclass(slots=True)
class RequestState:
    request: Request
    verdict: Verdict | None = None  # None: waiting for a verdict
    num_computed_tokens: int = 0
    num_generated_tokens: int = 0
    first_token_s: float | None = None
    num_blocks: int = 0  # KV blocks held on the replica

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_tokens(self) -> int:
        return self.request.num_prompt_tokens + self.num_generated_tokens

    @property
    def num_pending_tokens(self) -> int:
        """Tokens to compute before the next output token is sampled (1 while decoding)."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def num_remaining_output_tokens(self) -> int:
        return self.request.num_output_tokens - self.num_generated_tokens

    @property
    def is_finished(self) -> bool:
        return self.num_generated_tokens >= self.request.num_output_tokens

    @property
    def is_decoding(self) -> bool:
        return self.num_generated_tokens > 0 and self.num_pending_tokens == 1

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

    def num_blocks_after(self, num_new_tokens: int, block_size: int) -> int:
        """KV blocks this request holds after computing `num_new_tokens` more tokens."""
        return num_blocks_for(self.num_computed_tokens + num_new_tokens, block_size)


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
