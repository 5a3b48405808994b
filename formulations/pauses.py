"""Predicted tool pauses of agent chains (docs/AGENTS.md): how long after a round finishes the
chain's next round arrives, learned per class from the pauses the planner observes, as
formulations/lengths.py learns output lengths. The planner never reads a trace's delays.

`PausePredictor.predict(slo_class)` is a `PauseEstimate` (expected and 90th-percentile seconds) of
the last `max_samples` pauses of the class, or of the prior while fewer than `min_samples` were
seen. The prior (2 s expected, 4 s at the 90th percentile) is a stated guess for tool calls, not a
measurement; observations replace it.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass

DEFAULT_PRIOR_S = 2.0
DEFAULT_PRIOR_QUANTILE_S = 4.0
QUANTILE = 0.9


@dataclass(frozen=True, slots=True)
class PauseEstimate:
    expected_s: float
    quantile_s: float  # the QUANTILE of the pause


class PausePredictor:
    def __init__(
        self,
        max_samples: int = 256,
        min_samples: int = 8,
        prior: PauseEstimate = PauseEstimate(DEFAULT_PRIOR_S, DEFAULT_PRIOR_QUANTILE_S),
    ) -> None:
        if max_samples < 1 or not 1 <= min_samples <= max_samples:
            raise ValueError("need 1 <= min_samples <= max_samples")
        self.max_samples = max_samples
        self.min_samples = min_samples
        self.prior = prior
        self._recent: dict[str, deque[float]] = {}  # arrival order, for forgetting the oldest
        self._sorted: dict[str, list[float]] = {}

    def observe(self, slo_class: str, pause_s: float) -> None:
        if pause_s < 0:
            return
        recent = self._recent.setdefault(slo_class, deque())
        ordered = self._sorted.setdefault(slo_class, [])
        if len(recent) == self.max_samples:
            oldest = recent.popleft()
            del ordered[bisect.bisect_left(ordered, oldest)]
        recent.append(pause_s)
        bisect.insort(ordered, pause_s)

    def atoms(self, slo_class: str, num_atoms: int = 4) -> list[float]:
        """`num_atoms` equally likely pauses: the observed pauses' quantiles (k + 1/2) / n, or,
        while fewer than `min_samples` were seen, n evenly spaced from half the prior's expected
        pause to its 90th percentile (a stated guess, like the prior)."""
        ordered = self._sorted.get(slo_class)
        if not ordered or len(ordered) < self.min_samples:
            low, high = 0.5 * self.prior.expected_s, self.prior.quantile_s
            step = (high - low) / max(1, num_atoms - 1)
            return [low + k * step for k in range(num_atoms)]
        last = len(ordered) - 1
        return [
            ordered[min(last, int((k + 0.5) / num_atoms * len(ordered)))] for k in range(num_atoms)
        ]

    def predict(self, slo_class: str) -> PauseEstimate:
        ordered = self._sorted.get(slo_class)
        if not ordered or len(ordered) < self.min_samples:
            return self.prior
        index = min(len(ordered) - 1, int(QUANTILE * len(ordered)))
        return PauseEstimate(sum(ordered) / len(ordered), ordered[index])
