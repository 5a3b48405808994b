"""What the planner expects of a tool chain's later rounds (docs/AGENTS.md, "Planning the
chain"), learned per class from the chains it serves, never read from a trace: whether another
round follows round k, how many tokens a round adds to the chain's context (the tool's output and
the new instructions), and how many it generates.

The planner (planner_svc/chains.py) expects a paused chain's next round with the chance that it
comes, holding its context back and the tokens a round adds, and weighs keeping the chain's KV
over the pause by that chance.

Continuation is learned as a hazard per round index: of the chains whose round k ended, how many
sent round k+1 and how many ended (a chain is counted as ended when its next round did not come
within the time the planner keeps its KV, or when a client says the round was the last). The
prior CONTINUE_PRIOR (a stated guess, not a measurement) is blended in as PRIOR_WEIGHT
pseudo-observations, so a few chains already move the estimate. Round indices from
MAX_TRACKED_ROUND on share one counter; sizes are running means of the last `max_samples`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

CONTINUE_PRIOR = 0.5
PRIOR_WEIGHT = 4.0
MAX_TRACKED_ROUND = 16


@dataclass
class _ClassStats:
    continued: list[int] = field(default_factory=lambda: [0] * MAX_TRACKED_ROUND)
    ended: list[int] = field(default_factory=lambda: [0] * MAX_TRACKED_ROUND)
    added_tokens: deque[int] = field(default_factory=deque)  # new prompt tokens of rounds >= 1
    output_tokens: deque[int] = field(default_factory=deque)  # output tokens of chain rounds


def _bucket(round_index: int) -> int:
    return min(max(round_index, 0), MAX_TRACKED_ROUND - 1)


class ChainForecast:
    def __init__(self, max_samples: int = 256) -> None:
        if max_samples < 1:
            raise ValueError("max_samples must be at least 1")
        self.max_samples = max_samples
        self._stats: dict[str, _ClassStats] = {}

    def _of(self, slo_class: str) -> _ClassStats:
        stats = self._stats.get(slo_class)
        if stats is None:
            stats = self._stats[slo_class] = _ClassStats()
        return stats

    def _push(self, samples: deque[int], value: int) -> None:
        samples.append(value)
        if len(samples) > self.max_samples:
            samples.popleft()

    # ------------------------------------------------------------------ observations

    def continued(self, slo_class: str, ended_round: int, num_added_tokens: int | None) -> None:
        """Round `ended_round + 1` of a chain arrived; it added `num_added_tokens` to the
        context the previous round left (None: unknown, e.g. the previous round was not seen)."""
        stats = self._of(slo_class)
        stats.continued[_bucket(ended_round)] += 1
        if num_added_tokens is not None and num_added_tokens >= 0:
            self._push(stats.added_tokens, num_added_tokens)

    def ended(self, slo_class: str, last_round: int, count: int = 1) -> None:
        """A chain ended after round `last_round` (no further round came); `count=-1` takes it
        back (a chain counted as ended whose next round came after all)."""
        stats = self._of(slo_class)
        k = _bucket(last_round)
        stats.ended[k] = max(0, stats.ended[k] + count)

    def generated(self, slo_class: str, num_output_tokens: int) -> None:
        """A chain round finished with this many output tokens."""
        self._push(self._of(slo_class).output_tokens, num_output_tokens)

    # ------------------------------------------------------------------ predictions

    def continue_probability(self, slo_class: str, round_index: int) -> float:
        """P(round `round_index + 1` comes | round `round_index` ended)."""
        stats = self._stats.get(slo_class)
        if stats is None:
            return CONTINUE_PRIOR
        k = _bucket(round_index)
        num_continued, num_ended = stats.continued[k], stats.ended[k]
        return (num_continued + PRIOR_WEIGHT * CONTINUE_PRIOR) / (
            num_continued + num_ended + PRIOR_WEIGHT
        )

    def tokens_per_round(self, slo_class: str) -> float:
        """Expected tokens a later round adds to the context: its new prompt tokens and its
        output (0 until a later round was seen: nothing to go on)."""
        stats = self._stats.get(slo_class)
        if stats is None or not stats.added_tokens:
            return 0.0
        added = sum(stats.added_tokens) / len(stats.added_tokens)
        output = sum(stats.output_tokens) / len(stats.output_tokens) if stats.output_tokens else 0
        return added + output
