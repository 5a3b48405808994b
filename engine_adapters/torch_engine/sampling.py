"""Token sampling: greedy, or temperature with nucleus (top-p) truncation, drawn from a
per-request seeded generator so that a request's output does not depend on its batch mates."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution sampling draws from, [R, V] -> [R, V] float32.

    softmax(logits / T), then top-p: keep the smallest set of most likely tokens whose mass reaches
    top_p (the token that crosses the threshold included) and renormalise. Greedy: one-hot argmax.
    """
    logits = logits.float()
    if params.is_greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs  # mass of strictly likelier tokens
        sorted_probs = sorted_probs.masked_fill(mass_before >= params.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator
) -> torch.Tensor:
    """One token per row: [R, V] -> [R] long."""
    if params.is_greedy:
        return logits.argmax(-1)
    return draw(probabilities(logits, params), generator)


def draw(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One token per row from a distribution [R, V] -> [R] long."""
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
