"""Synthetic tool-calling agents, shaped like ToolBench: each agent runs 2 to 5 LLM rounds; round 1
reads a prompt of tool descriptions (1-2k tokens), every later round reads the whole context so far
plus the tool's result, each round writes a short call or answer, and a tool runs 0.5-2 s between
rounds. All parameters live in `ToolAgentParams`; change them there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from formulations.request import ToolChain, ToolRound


@dataclass(frozen=True)
class ToolAgentParams:
    # Every range is inclusive and drawn uniformly.
    min_rounds: int = 2
    max_rounds: int = 5
    min_first_prompt_tokens: int = 1000  # tool descriptions and the user's task
    max_first_prompt_tokens: int = 2000
    min_tool_result_tokens: int = 50  # new prompt tokens of rounds after the first
    max_tool_result_tokens: int = 400
    min_output_tokens: int = 20  # a function call, or the final answer
    max_output_tokens: int = 150
    min_tool_delay_s: float = 0.5
    max_tool_delay_s: float = 2.0

    def __post_init__(self) -> None:
        pairs = [
            (self.min_rounds, self.max_rounds),
            (self.min_first_prompt_tokens, self.max_first_prompt_tokens),
            (self.min_tool_result_tokens, self.max_tool_result_tokens),
            (self.min_output_tokens, self.max_output_tokens),
            (self.min_tool_delay_s, self.max_tool_delay_s),
        ]
        if self.min_rounds < 1 or self.min_output_tokens < 1 or self.min_tool_delay_s < 0:
            raise ValueError(f"bad tool agent parameters {self}")
        if any(low > high for low, high in pairs) or self.min_first_prompt_tokens < 1:
            raise ValueError(f"bad tool agent parameters {self}")


def sample_tool_chain(
    chain_id: str, arrival_s: float, rng: np.random.Generator, params: ToolAgentParams
) -> ToolChain:
    num_rounds = int(rng.integers(params.min_rounds, params.max_rounds + 1))
    rounds = []
    for k in range(num_rounds):
        if k == 0:
            low, high = params.min_first_prompt_tokens, params.max_first_prompt_tokens
            delay_s = 0.0
        else:
            low, high = params.min_tool_result_tokens, params.max_tool_result_tokens
            delay_s = float(rng.uniform(params.min_tool_delay_s, params.max_tool_delay_s))
        new_prompt = rng.integers(low, high + 1)
        output = rng.integers(params.min_output_tokens, params.max_output_tokens + 1)
        rounds.append(ToolRound(int(new_prompt), int(output), delay_s))
    return ToolChain(chain_id=chain_id, arrival_s=float(arrival_s), rounds=tuple(rounds))


def chain_total_tokens(chain: ToolChain) -> int:
    """Context length at the end of the last round (what must fit in the model's context)."""
    last = chain.num_rounds - 1
    return chain.round_prompt_tokens(last) + chain.rounds[last].num_output_tokens
