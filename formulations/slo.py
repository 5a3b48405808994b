"""Service-level objectives per application class (docs/ALGORITHM.md section 1).

A TTFT target is either absolute (`ttft_s`) or a slowdown over the zero-load prefill time of the
prompt (`ttft_slowdown`), which needs the performance model to turn into seconds. TPOT targets are
per output token; reasoning requests may have a tighter TPOT for their thinking tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from formulations.perf_model import PerfModel


@dataclass(frozen=True, slots=True)
class SLO:
    """Targets for one request. Exactly one of `ttft_slowdown` and `ttft_s` must be set."""

    tpot_s: float
    ttft_slowdown: float | None = None
    ttft_s: float | None = None
    thinking_tpot_s: float | None = None  # TPOT of the first `num_thinking_tokens` output tokens

    def __post_init__(self) -> None:
        if (self.ttft_slowdown is None) == (self.ttft_s is None):
            raise ValueError("an SLO needs exactly one of ttft_slowdown and ttft_s")
        for name in ("tpot_s", "ttft_slowdown", "ttft_s", "thinking_tpot_s"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"SLO {name} must be positive, got {value!r}")

    def ttft_budget_s(self, perf_model: PerfModel, num_prompt_tokens: int) -> float:
        """TTFT target in seconds for a prompt of `num_prompt_tokens` tokens."""
        if self.ttft_s is not None:
            return self.ttft_s
        assert self.ttft_slowdown is not None
        return self.ttft_slowdown * perf_model.prefill_time_s(num_prompt_tokens)

    def tpot_of_token_s(self, n: int, num_thinking_tokens: int) -> float:
        """TPOT that applies to the gap before output token `n` (1-based)."""
        if self.thinking_tpot_s is not None and n <= num_thinking_tokens:
            return self.thinking_tpot_s
        return self.tpot_s

    @property
    def min_tpot_s(self) -> float:
        if self.thinking_tpot_s is None:
            return self.tpot_s
        return min(self.tpot_s, self.thinking_tpot_s)


# Published presets (docs/ALGORITHM.md section 1). Tool agents use the tight SLO for intermediate
# rounds and the looser one for the final round.
SLO_PRESETS: dict[str, SLO] = {
    "chatbot": SLO(ttft_slowdown=5.0, tpot_s=0.100),
    "coder": SLO(ttft_slowdown=5.0, tpot_s=0.050),
    "summarizer": SLO(ttft_slowdown=3.0, tpot_s=0.100),
    "reasoning": SLO(ttft_slowdown=3.0, tpot_s=0.100, thinking_tpot_s=0.050),
    "tool_intermediate": SLO(ttft_slowdown=3.0, tpot_s=0.050),
    "tool_final": SLO(ttft_slowdown=3.0, tpot_s=0.100),
}


def slo_preset(name: str) -> SLO:
    try:
        return SLO_PRESETS[name]
    except KeyError:
        known = ", ".join(sorted(SLO_PRESETS))
        raise ValueError(f"unknown SLO class {name!r} (known: {known})") from None
