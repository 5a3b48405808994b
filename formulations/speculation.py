"""SLO-adaptive speculative decoding (docs/ALGORITHM.md section 5).

A request that verifies `s` draft tokens per step gains, under an i.i.d. per-token acceptance rate
`alpha`, on average

    E(s) = sum_{i=0..s} alpha^i = (1 - alpha^(s+1)) / (1 - alpha)       (E(s) = s + 1 at alpha = 1)

tokens per step: the target model's own token plus the accepted prefix of the draft. A TPOT tier
whose requests decode once every `k` steps of length `T` progresses `E(s) / (k * T)` tokens per
second on average, so it meets its TPOT `tau` in expectation when `E(s) >= k * T / tau`. The
planner picks, per tier and candidate step time, the smallest `s` that achieves at least one
decode period (`k >= 1`), i.e. speculation is used only where it is needed to meet the TPOT.
"""

from __future__ import annotations

from dataclasses import dataclass

# Floating slack so that exact fits (tau == k * T) are not lost to rounding.
_EPS = 1e-9

# Speculation plans with a safety margin on the expected gain: acceptance is random and its rate an
# online estimate, and a cumulative deadline that is met only on average is missed half the time.
SPEC_GAIN_MARGIN = 0.85

# Decode periods are rounded down to one of these so that the steady cycle (the lcm of the tiers'
# periods) stays short. Rounding a period down only makes a tier decode more often (safe).
ALLOWED_PERIODS = (1, 2, 3, 4, 6, 8, 12, 16, 24)


def expected_tokens_per_step(num_spec_tokens: int, acceptance_rate: float) -> float:
    """E(s): expected output tokens per verification step with `s` draft tokens."""
    if num_spec_tokens < 0:
        raise ValueError("the number of speculative tokens must be >= 0")
    if not 0.0 <= acceptance_rate <= 1.0:
        raise ValueError(f"acceptance rate must be in [0, 1], got {acceptance_rate}")
    if acceptance_rate >= 1.0:
        return float(num_spec_tokens + 1)
    return (1.0 - acceptance_rate ** (num_spec_tokens + 1)) / (1.0 - acceptance_rate)


def planned_gain(num_spec_tokens: int, acceptance_rate: float) -> float:
    """Tokens per decode the planner counts on: 1 without drafts, SPEC_GAIN_MARGIN * E(s) with."""
    if num_spec_tokens == 0:
        return 1.0
    return max(1.0, SPEC_GAIN_MARGIN * expected_tokens_per_step(num_spec_tokens, acceptance_rate))


def round_period(num_steps: int) -> int:
    """Largest allowed decode period <= num_steps (0 when num_steps < 1)."""
    best = 0
    for period in ALLOWED_PERIODS:
        if period <= num_steps:
            best = period
    return best


@dataclass(frozen=True, slots=True)
class TierChoice:
    """How one TPOT tier decodes at a given step time: `num_spec_tokens` draft tokens per decode,
    one decode every `period_steps` steps."""

    tpot_s: float
    num_spec_tokens: int
    period_steps: int

    @property
    def tokens_per_decode(self) -> int:
        """Tokens the performance model charges per decode: 1 computed + s verified drafts."""
        return 1 + self.num_spec_tokens


def choose_tier(
    tpot_s: float, step_time_s: float, max_spec_tokens: int, acceptance_rate: float
) -> TierChoice | None:
    """Smallest speculation length that lets a tier with TPOT `tpot_s` keep up at `step_time_s`.

    Period k = floor(g(s) * tau / T) steps between decodes, with g(0) = 1 and
    g(s) = SPEC_GAIN_MARGIN * E(s) for s > 0; the smallest s with k >= 1 wins. Without a draft model
    (max_spec_tokens == 0) only s = 0 is tried, which is a hard guarantee (k * T <= tau); with s > 0
    the TPOT is met in expectation (with the margin). None when no s works.
    """
    for num_spec in range(max_spec_tokens + 1):
        gain = planned_gain(num_spec, acceptance_rate)
        period = round_period(int(gain * tpot_s / step_time_s + _EPS))
        if period >= 1:
            return TierChoice(tpot_s, num_spec, period)
    return None


def candidate_step_times(
    tpots_s: set[float], max_spec_tokens: int, acceptance_rate: float
) -> list[float]:
    """Step times worth trying: each TPOT, and with speculation each TPOT stretched by the planned
    gain of s draft tokens."""
    candidates = set(tpots_s)
    for tpot_s in tpots_s:
        for num_spec in range(1, max_spec_tokens + 1):
            candidates.add(tpot_s * planned_gain(num_spec, acceptance_rate))
    return sorted(candidates)
