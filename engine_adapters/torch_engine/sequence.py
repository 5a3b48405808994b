"""One request inside the torch engine: its known tokens and how many of them each cache holds."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine_adapters.torch_engine.sampling import SamplingParams


@dataclass(slots=True)
class Sequence:
    request_id: str
    token_ids: list[int]  # prompt, then generated tokens
    num_prompt_tokens: int
    max_new_tokens: int
    params: SamplingParams
    generator: torch.Generator
    ignore_eos: bool
    num_computed_tokens: int = 0  # target KV cache holds token_ids[:num_computed_tokens]
    num_draft_computed_tokens: int = 0  # draft KV cache holds token_ids[:this]
    is_finished: bool = False
    chain_id: str | None = None  # the tool chain it is a round of (docs/AGENTS.md)
    retain_kv: str = "drop"  # at its end: "drop" its KV, or keep it "pinned" / "evictable"

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_generated_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_pending_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def num_remaining_output_tokens(self) -> int:
        return self.max_new_tokens - self.num_generated_tokens
