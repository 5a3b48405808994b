"""KV memory over time: what admitted requests hold at every future instant.

Reserving each admitted request's peak KV (prompt + whole output) from admission on wastes memory
on decode-heavy work: a reasoning request that will think for 3000 tokens holds its prompt and a
few tokens at first, and its whole length only near its end. This module describes each request's
footprint as a function of time and checks the peak of the *sum*.

Per request r, at plan time `now` (all quantities in tokens; blocks are ceil(tokens / block size)):

    held_r(t) <= F_r(t) = min(peak_r, start_r + floor(rate_r * (t - now)) + extra_r)
                                                            for t <= release_r,
    held_r(t)  = 0                                          after release_r

- `start_r`: the tokens it may hold at once now: computed tokens plus all pending ones (a prompt
  may be prefilled in a single step);
- `peak_r`: its prompt and every *planned* output token but the last (the length predictor's
  quantile, formulations/lengths.py; the true length in the oracle mode);
- `rate_r`, `extra_r` and `release_r` come from one of two descriptions:

  **timeline** (the sound bound when lengths are known; kept as an ablation). A request computes at
  most g = 1 + s tokens per step once it decodes, and a step with s draft steps lasts at least
  T(0, s), so whole steps add at most rate = max_s (1 + s) / T(0, s) tokens per second (`Growth`);
  `extra = 2 g` covers the step in flight and the one starting at t. It is released at the
  deadline of its last planned output token: an admitted request that keeps its SLO has finished
  (and freed its KV) by then. A request already late has no such bound (`release_s = None`).

  **trajectory** (the default): the pace the plan gives it. On a candidate step time T its TPOT tier
  decodes once every k steps verifying s drafts, so it grows E(s) / (k T) tokens per second in
  expectation (formulations/speculation.py) and finishes its planned output at that pace (from its
  TTFT deadline for a request still to prefill), at the latest at the deadline of its last planned
  token. This is a prediction, not a bound: lengths past the prediction, slower acceptance or a
  re-plan that changes the pace are caught by the planner's overflow path (slos_dp.py), which
  preempts before an engine runs out of blocks.

Each F_r is non-decreasing until it drops at its release, so the sum's supremum over t is reached
just before a release (left limit: requests released exactly then still count), or at infinity
(the never-released ones). `peak_blocks` evaluates exactly those points.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from formulations.deadlines import token_deadline_s
from formulations.perf_model import PerfModel
from formulations.state import RequestState

# Steps counted beyond floor((t - now) / step_min): the one in flight and the one starting at t.
EXTRA_STEPS = 2
# Distributed lengths: the sum of the alive requests' KV is planned at its 90th percentile (the
# predictor's default quantile) under a normal approximation of the sum.
SUM_QUANTILE_Z = NormalDist().inv_cdf(0.9)
_NO_BOUND = 1 << 60  # growth without a lower bound on a step's length


@dataclass(frozen=True, slots=True)
class Footprint:
    """One request's KV tokens over time (see the module docstring)."""

    request_id: str
    num_start_tokens: int  # tokens it may hold right away (computed + pending)
    num_peak_tokens: int  # tokens at its longest as planned
    release_s: float | None  # its KV is free by then; None: no bound (held for ever)
    tokens_per_s: float  # growth rate
    num_extra_tokens: int  # growth allowed beyond rate * elapsed (steps in flight)
    num_remaining_outputs: int = 1  # output tokens still to come (to the planned length)
    weight: float = 1.0  # the probability of this outcome of the request's length
    start_s: float = -math.inf  # holds nothing before (a round expected later: tool chains)

    def num_tokens_at(self, t_s: float, now_s: float) -> int:
        """The tokens held at t_s (before the release)."""
        if math.isinf(self.tokens_per_s):
            return self.num_peak_tokens
        grown = math.floor(max(0.0, t_s - now_s) * self.tokens_per_s + 1e-9)
        return min(self.num_peak_tokens, self.num_start_tokens + grown + self.num_extra_tokens)


@dataclass(frozen=True, slots=True)
class Growth:
    """The fastest a request's KV can grow (the timeline bound): at most `tokens_per_step` tokens
    per step (1 + s with s draft tokens) and `tokens_per_s` per second over whole steps.

    A step with s draft steps adds at most 1 + s tokens to a request and lasts at least T(0, s), so
    completed steps in an interval of length D add at most D * max_s (1 + s) / T(0, s) tokens;
    `EXTRA_STEPS` steps (the one in flight, the one starting at t) add up to 1 + s_max each."""

    tokens_per_s: float
    tokens_per_step: int

    @classmethod
    def for_model(cls, perf_model: PerfModel, max_spec_tokens: int) -> Growth:
        rates = [
            (1 + s) / perf_model.step_time_s(0, s) if perf_model.step_time_s(0, s) > 0 else math.inf
            for s in range(max_spec_tokens + 1)
        ]
        return cls(max(rates), 1 + max_spec_tokens)

    @property
    def num_extra_tokens(self) -> int:
        return EXTRA_STEPS * self.tokens_per_step


def footprints(
    state: RequestState, now_s: float, growth: Growth, distributed: bool = False
) -> tuple[Footprint, ...]:
    """The timeline bound of a running or waiting request (admitted or about to be), one
    footprint per outcome of its length (`planned_lengths`)."""
    request = state.request
    late = state.next_token_deadline_s < now_s
    prints = []
    for num_output, weight in planned_lengths(state, distributed):
        release_s = None
        if not late:
            release_s = token_deadline_s(request, num_output, state.first_token_s)
        prints.append(
            Footprint(
                state.request_id,
                num_start_tokens=state.num_tokens,
                num_peak_tokens=state.num_prompt_tokens + num_output - 1,
                release_s=release_s,
                tokens_per_s=growth.tokens_per_s,
                num_extra_tokens=growth.num_extra_tokens,
                num_remaining_outputs=num_output - state.num_generated_tokens,
                weight=weight,
            )
        )
    return tuple(prints)


def planned_lengths(state: RequestState, distributed: bool) -> list[tuple[int, float]]:
    """The output lengths memory is planned for, with their probabilities.

    One length (`distributed` False, or nothing predicted): the predicted quantile. Distributed:
    the prediction's equally likely atoms (formulations/lengths.py), each within the cap and past
    what is produced. `peak_blocks` then plans the *sum* over requests at its 90th percentile, its
    mean plus z standard deviations at every instant: adding up every request's own quantile
    would grow like n where the sum's spread grows like sqrt(n), and a single length per request
    (even the mean) makes every request release at once, where real ones release spread out."""
    prediction = state.predicted_output
    if not distributed or prediction is None or not prediction.atoms:
        return [(state.num_planned_output_tokens, 1.0)]
    weight = 1.0 / len(prediction.atoms)
    return [(state.within_cap(total), weight) for total in prediction.atoms]


def paced(
    bound: Footprint, tokens_per_s: float, num_extra_tokens: int, decode_start_s: float
) -> Footprint:
    """The trajectory description of an outcome whose timeline bound is `bound`: it grows
    `tokens_per_s` and produces its remaining output tokens from `decode_start_s` at that pace
    (its release, at the latest the bound's)."""
    release_s = bound.release_s
    if release_s is not None and tokens_per_s > 0:
        release_s = min(release_s, decode_start_s + bound.num_remaining_outputs / tokens_per_s)
    return Footprint(  # not dataclasses.replace: this runs ~1e6 times per simulated hour
        bound.request_id,
        bound.num_start_tokens,
        bound.num_peak_tokens,
        release_s,
        tokens_per_s,
        num_extra_tokens,
        bound.num_remaining_outputs,
        bound.weight,
    )


def peak_blocks(footprints: Iterable[Footprint], now_s: float, block_size: int) -> int:
    """Supremum over t >= now of the KV blocks these requests hold at once: sum_r blocks(F_r(t)),
    evaluated at every release time (rows: outcomes, columns: release times, and infinity for
    the never-released). With outcomes of a request's length (weights below 1), its blocks at t
    are a random variable: the sum is its mean plus SUM_QUANTILE_Z standard deviations (requests
    independent). Between releases means grow and the alive set only gains footprints that start
    later (`start_s`), so the instants just before releases (left limits) still give the
    supremum."""
    prints = list(footprints)
    if not prints:
        return 0
    peak = np.array([f.num_peak_tokens for f in prints], dtype=np.int64)
    start = np.array([f.num_start_tokens for f in prints], dtype=np.int64)
    extra = np.array([f.num_extra_tokens for f in prints], dtype=np.int64)
    rate = np.array([f.tokens_per_s for f in prints], dtype=np.float64)
    weight = np.array([f.weight for f in prints], dtype=np.float64)
    release = np.array(
        [np.inf if f.release_s is None else f.release_s for f in prints], dtype=np.float64
    )
    starts_s = [f.start_s for f in prints]
    times_s = np.unique(release)
    if not np.isinf(times_s[-1]):
        times_s = np.append(times_s, np.inf)
    elapsed = np.maximum(0.0, times_s - now_s)[None, :]
    with np.errstate(invalid="ignore", over="ignore"):
        grown = np.floor(elapsed * rate[:, None] + 1e-9)
    grown = np.where(np.isfinite(grown), grown, _NO_BOUND).astype(np.int64)
    tokens = np.minimum(peak[:, None], start[:, None] + grown + extra[:, None])
    alive = release[:, None] >= times_s[None, :]
    if any(s > -math.inf for s in starts_s):  # rounds expected later (tool chains) hold nothing yet
        alive &= np.array(starts_s, dtype=np.float64)[:, None] <= times_s[None, :]
    blocks = np.where(alive, -(-tokens // block_size), 0)
    if np.all(weight == 1.0):
        return int(blocks.sum(axis=0).max())
    ids = [f.request_id for f in prints]
    index = {rid: i for i, rid in enumerate(dict.fromkeys(ids))}
    group = np.array([index[rid] for rid in ids])
    order = np.argsort(group, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(group[order]) != 0])
    blocks = blocks[order]
    weighted = blocks * weight[order][:, None]
    mean = np.add.reduceat(weighted, starts, axis=0)  # per request: sum over its outcomes
    square = np.add.reduceat(weighted * blocks, starts, axis=0)
    spread = np.sqrt(np.maximum(0.0, square - mean * mean).sum(axis=0))
    total = mean.sum(axis=0) + SUM_QUANTILE_Z * spread
    return math.ceil(float(total.max()) - 1e-9)
