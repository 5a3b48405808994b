"""Synthetic reasoning requests, shaped like s1K (competition questions answered after a long
thinking trace): short prompts, a few thousand thinking tokens with a long tail, short answers.

Every length is a clipped log-normal: median * exp(sigma * N(0, 1)), rounded, clipped to
[min, max]. All parameters live in `ReasoningParams`; change them there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LogNormalTokens:
    """A token count drawn as round(median * exp(sigma * z)), z ~ N(0, 1), clipped to [min, max]."""

    median: float
    sigma: float
    min_tokens: int
    max_tokens: int

    def __post_init__(self) -> None:
        if not (self.median > 0 and self.sigma >= 0 and 1 <= self.min_tokens <= self.max_tokens):
            raise ValueError(f"bad token distribution {self}")

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        draws = self.median * np.exp(self.sigma * rng.standard_normal(size))
        return np.clip(np.rint(draws), self.min_tokens, self.max_tokens).astype(int)


@dataclass(frozen=True)
class ReasoningParams:
    prompt: LogNormalTokens = LogNormalTokens(median=300, sigma=0.5, min_tokens=50, max_tokens=1500)
    # sigma 0.6 puts the 95th percentile near 2.7x the median: the long tail of hard questions.
    thinking: LogNormalTokens = LogNormalTokens(
        median=2500, sigma=0.6, min_tokens=200, max_tokens=7000
    )
    answer: LogNormalTokens = LogNormalTokens(median=300, sigma=0.5, min_tokens=20, max_tokens=1500)
    slo_class: str = "reasoning"


@dataclass(frozen=True, slots=True)
class ReasoningSample:
    num_prompt_tokens: int
    num_thinking_tokens: int
    num_answer_tokens: int

    @property
    def num_output_tokens(self) -> int:
        return self.num_thinking_tokens + self.num_answer_tokens

    @property
    def num_total_tokens(self) -> int:
        return self.num_prompt_tokens + self.num_output_tokens


def sample_reasoning(
    num_items: int, rng: np.random.Generator, params: ReasoningParams = ReasoningParams()
) -> list[ReasoningSample]:
    prompts = params.prompt.sample(rng, num_items)
    thinking = params.thinking.sample(rng, num_items)
    answers = params.answer.sample(rng, num_items)
    return [ReasoningSample(int(p), int(t), int(a)) for p, t, a in zip(prompts, thinking, answers)]
