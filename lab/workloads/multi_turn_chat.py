"""Multi-turn chat: a conversation of follow-up turns on the same context, as a `ToolChain` whose
"tool delay" is the user's think time. Turn k's prompt is everything said so far (every earlier
user message and answer) plus the new user message, so each turn after the first can reuse the KV
of the one before it. Every parameter lives in `MultiTurnChatParams`; docs/AGENTS.md ("Multi-turn
chat") says where each comes from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from formulations.request import ToolChain, ToolRound
from formulations.slo import SLO_PRESETS
from lab.workloads.trace import TRACE_FILES, load_trace


@dataclass(frozen=True)
class MultiTurnChatParams:
    """How conversations are drawn. The lengths are data; the turn count and think time are our
    assumptions (no shipped trace links turns of one conversation or times a user's reply)."""

    # Each turn's new user message and answer lengths: one row of this shipped trace, drawn
    # uniformly (the chatbot scenario's file, the Azure LLM inference trace 2023, conversation
    # service; ShareGPT lengths are not shipped, lab/workloads/data/SOURCES.md). Its prompts
    # may include a system prompt, so a follow-up message drawn from them is long rather than short.
    trace: str = "azure_conv_2023"
    # Turns per conversation: geometric on 1, 2, ... with this mean (our assumption, in the 3-5
    # range of chat datasets' user turns per conversation), capped at `max_turns`; a conversation
    # also ends before the first turn whose context and answer would not fit the model's context.
    mean_turns: float = 4.0
    max_turns: int = 12
    # The user's think time between an answer's end and the next message: log-normal,
    # median * exp(sigma * z) with z ~ N(0, 1), clipped to max_think_s (our assumption: reading
    # an answer and typing a reply takes seconds to a minute; p90 is ~29 s with these values).
    think_median_s: float = 8.0
    think_sigma: float = 1.0
    max_think_s: float = 120.0
    # Every turn is an interactive chat answer: the chatbot SLO preset (TTFT 5x the prefill
    # time, TPOT 100 ms), counted under this class.
    slo: str = "chatbot"
    slo_class: str = "chatbot"

    def __post_init__(self) -> None:
        if self.trace not in TRACE_FILES:
            raise ValueError(f"unknown trace {self.trace!r} (known: {', '.join(TRACE_FILES)})")
        if not (self.mean_turns >= 1 and math.isfinite(self.mean_turns)) or self.max_turns < 1:
            raise ValueError(f"bad multi-turn chat turn counts {self}")
        if not (self.think_median_s > 0 and self.think_sigma >= 0 and self.max_think_s > 0):
            raise ValueError(f"bad multi-turn chat think times {self}")
        if self.slo not in SLO_PRESETS:
            raise ValueError(f"unknown SLO preset {self.slo!r} (known: {', '.join(SLO_PRESETS)})")


def sample_conversation(
    chain_id: str,
    arrival_s: float,
    rng: np.random.Generator,
    params: MultiTurnChatParams,
    max_total_tokens: int,
) -> ToolChain:
    """One conversation. Its context (all turns' messages and answers) stays within
    `max_total_tokens`, except a first turn that is longer on its own: that conversation is
    returned whole, for the caller's context filter to drop and count."""
    rows = load_trace(params.trace)
    num_turns = min(int(rng.geometric(1.0 / params.mean_turns)), params.max_turns)
    turns: list[ToolRound] = []
    num_context_tokens = 0
    for k in range(num_turns):
        row = rows[int(rng.integers(len(rows)))]
        think_s = 0.0 if k == 0 else _think_time_s(rng, params)
        num_after = num_context_tokens + row.num_prompt_tokens + row.num_output_tokens
        if k > 0 and num_after > max_total_tokens:
            break
        turns.append(ToolRound(row.num_prompt_tokens, row.num_output_tokens, think_s))
        num_context_tokens = num_after
    return ToolChain(
        chain_id=chain_id,
        arrival_s=float(arrival_s),
        rounds=tuple(turns),
        intermediate_slo=params.slo,
        final_slo=params.slo,
        slo_class=params.slo_class,
    )


def _think_time_s(rng: np.random.Generator, params: MultiTurnChatParams) -> float:
    think_s = params.think_median_s * math.exp(params.think_sigma * rng.standard_normal())
    return min(think_s, params.max_think_s)
