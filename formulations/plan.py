"""The one plan type every formulation returns (DP, CP-SAT, baselines).

A plan is phase-free: each step maps request ids to the number of tokens to compute (a prefill
chunk,
or 1 for a decode) and, for speculating requests, to the number of draft tokens to verify in the
same step. After the explicit `steps`, the engine repeats `repeat` (a steady-state cycle, usually
decode-only) until the next plan arrives, skipping entries of requests that have finished.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field


class Verdict(enum.Enum):
    ADMITTED = "admitted"  # guaranteed: the planner commits to every stage SLO
    REJECTED = "rejected"  # will not be served by this replica
    BEST_EFFORT = "best_effort"  # served from leftover budget and memory; may be preempted


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Step:
    """One engine step. `num_tokens[rid]` tokens are computed for request rid; a speculating request
    additionally verifies `num_spec_tokens[rid]` draft tokens."""

    num_tokens: Mapping[str, int]
    num_spec_tokens: Mapping[str, int] = field(default_factory=dict)

    @property
    def num_batched_tokens(self) -> int:
        """Tokens the performance model charges for: computed plus verified draft tokens."""
        return sum(self.num_tokens.values()) + sum(self.num_spec_tokens.values())

    @property
    def spec_steps(self) -> int:
        return max(self.num_spec_tokens.values(), default=0)

    @property
    def is_empty(self) -> bool:
        return not self.num_tokens


@dataclass(frozen=True, slots=True)
class Plan:
    steps: tuple[Step, ...] = ()
    repeat: tuple[Step, ...] = ()  # cycle to run after `steps` until the next plan
    decisions: Mapping[str, Decision] = field(default_factory=dict)  # verdicts for waiting requests
    preempt: tuple[str, ...] = ()  # requests whose KV is dropped now (recomputed later)

    @property
    def num_steps(self) -> int:
        return len(self.steps)
