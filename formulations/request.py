"""Requests, their stages, and tool-calling chains (docs/ALGORITHM.md section 1).

A `Request` is one LLM call: a prompt, an output (the first `num_thinking_tokens` of which are
thinking tokens for reasoning requests), an SLO, and the absolute TTFT target resolved from it. A
`ToolChain` is an agent: rounds of LLM calls separated by tool delays, each round's prompt being the
previous context plus the tool's output. Rounds become `Request`s when they arrive.
"""

from __future__ import annotations

from dataclasses import dataclass

from formulations.perf_model import PerfModel
from formulations.slo import SLO, slo_preset


@dataclass(frozen=True, slots=True)
class Request:
    request_id: str
    arrival_s: float
    num_prompt_tokens: int
    # The output cap the planner may rely on: the client's max_tokens (the engine stops at or
    # before it), or the true length in the simulator's oracle mode (formulations/lengths.py).
    num_output_tokens: int
    slo: SLO
    ttft_slo_s: float  # absolute TTFT target, resolved from `slo`
    slo_class: str = "custom"
    num_thinking_tokens: int = 0
    value: float = 1.0  # weight of admitting this request (per-class weights)
    chain_id: str | None = None  # set for tool-chain rounds
    round_index: int = 0
    hint_output_tokens: int | None = None  # the client's expected output length, if it gave one
    chain_last_round: bool = False  # the chain's last round: nothing follows to keep KV for

    def __post_init__(self) -> None:
        if self.num_prompt_tokens < 1:
            raise ValueError(f"request {self.request_id}: prompt must have at least one token")
        if self.num_output_tokens < 1:
            raise ValueError(f"request {self.request_id}: output must have at least one token")
        if not 0 <= self.num_thinking_tokens <= self.num_output_tokens:
            raise ValueError(
                f"request {self.request_id}: thinking tokens must be within the output"
            )
        if self.arrival_s < 0 or self.ttft_slo_s <= 0:
            raise ValueError(f"request {self.request_id}: bad arrival or TTFT target")

    @property
    def ttft_deadline_s(self) -> float:
        return self.arrival_s + self.ttft_slo_s

    @property
    def max_num_tokens(self) -> int:
        """Context length when the last output token has been produced."""
        return self.num_prompt_tokens + self.num_output_tokens

    @property
    def num_peak_kv_tokens(self) -> int:
        """KV tokens at the request's longest: the prompt and every output token but the last,
        which is sampled and never cached (the engine frees the request then)."""
        return self.num_prompt_tokens + self.num_output_tokens - 1


def make_request(
    request_id: str,
    arrival_s: float,
    num_prompt_tokens: int,
    num_output_tokens: int,
    slo: SLO | str,
    perf_model: PerfModel,
    *,
    slo_class: str | None = None,
    num_thinking_tokens: int = 0,
    value: float = 1.0,
    chain_id: str | None = None,
    round_index: int = 0,
    chain_last_round: bool = False,
) -> Request:
    """Build a request, resolving a slowdown TTFT target with `perf_model`."""
    if isinstance(slo, str):
        slo_class = slo_class or slo
        slo = slo_preset(slo)
    return Request(
        request_id=request_id,
        arrival_s=arrival_s,
        num_prompt_tokens=num_prompt_tokens,
        num_output_tokens=num_output_tokens,
        slo=slo,
        ttft_slo_s=slo.ttft_budget_s(perf_model, num_prompt_tokens),
        slo_class=slo_class or "custom",
        num_thinking_tokens=num_thinking_tokens,
        value=value,
        chain_id=chain_id,
        round_index=round_index,
        chain_last_round=chain_last_round,
    )


@dataclass(frozen=True, slots=True)
class ToolRound:
    num_new_prompt_tokens: int  # tool descriptions (round 0) or tool output (later rounds)
    num_output_tokens: int
    tool_delay_s: float = 0.0  # delay between the previous round finishing and this one arriving


@dataclass(frozen=True, slots=True)
class ToolChain:
    """An agent: round k+1 arrives `tool_delay_s` after round k finishes, with a prompt that holds
    everything so far. Intermediate rounds use `intermediate_slo`, the last uses `final_slo`."""

    chain_id: str
    arrival_s: float
    rounds: tuple[ToolRound, ...]
    intermediate_slo: str = "tool_intermediate"
    final_slo: str = "tool_final"
    slo_class: str = "tool_agent"

    def __post_init__(self) -> None:
        if not self.rounds:
            raise ValueError(f"tool chain {self.chain_id} has no rounds")

    @property
    def num_rounds(self) -> int:
        return len(self.rounds)

    def round_prompt_tokens(self, k: int) -> int:
        """Prompt of round k: all earlier prompts' new tokens and outputs, plus this round's."""
        return sum(r.num_new_prompt_tokens + r.num_output_tokens for r in self.rounds[:k]) + (
            self.rounds[k].num_new_prompt_tokens
        )

    def round_request(self, k: int, arrival_s: float, perf_model: PerfModel) -> Request:
        slo = self.final_slo if k == self.num_rounds - 1 else self.intermediate_slo
        return make_request(
            f"{self.chain_id}#r{k}",
            arrival_s,
            self.round_prompt_tokens(k),
            self.rounds[k].num_output_tokens,
            slo,
            perf_model,
            slo_class=self.slo_class,
            chain_id=self.chain_id,
            round_index=k,
            chain_last_round=k == self.num_rounds - 1,
        )
