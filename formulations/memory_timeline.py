"""KV memory over time: an upper bound on what admitted requests hold at every future instant.

Reserving each admitted request's peak KV (prompt + full output) from admission on wastes memory on
decode-heavy work: a reasoning request that will think for 3000 tokens holds its prompt and a few
tokens at first, and its whole length only near its end. This module bounds each request's
footprint as a function of time and checks the peak of the *sum*.

Per request r, at plan time `now` (all quantities in tokens; blocks are ceil(tokens / block size)):

    held_r(t) <= F_r(t) = min(peak_r, start_r + floor(rate * (t - now)) + 2 g)
                                                            for t <= release_r,
    held_r(t)  = 0                                          after release_r

- `start_r`: the tokens it may hold at once now: computed tokens plus all pending ones (a prompt
  may be prefilled in a single step);
- growth: a request computes at most g = 1 + s tokens per step once it decodes (one sampled token
  and s draft tokens), and a step with s draft steps is no shorter than T(0 tokens, s) (the
  model's fixed cost), so whole steps add at most rate = max_s (1 + s) / T(0, s) tokens per second
  (1 / T(0) without a draft model); `+ 2 g` covers a step already in flight and the step that
  starts at `t`;
- `release_r`: the deadline of its last output token. An admitted request that keeps its SLO has
  finished (and freed its KV) by then. The decode clock starts at max(TTFT deadline, first token),
  so before its first token the last deadline is `TTFT deadline + decode offset`. A request that is
  already late has no such bound: it holds `F_r` for ever (`release_s = None`).

Each F_r is non-decreasing until it drops at its release, so the sum's supremum over t is reached
just before a release (left limit: requests released exactly then still count), or at infinity
(the never-released ones). `peak_blocks` evaluates exactly those points.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from formulations.deadlines import token_deadline_s
from formulations.perf_model import PerfModel
from formulations.state import RequestState

# Steps counted beyond floor((t - now) / step_min): the one in flight and the one starting at t.
EXTRA_STEPS = 2


@dataclass(frozen=True, slots=True)
class Footprint:
    """Upper bound on one request's KV tokens over time (see the module docstring)."""

    request_id: str
    num_start_tokens: int  # tokens it may hold right away (computed + pending)
    num_peak_tokens: int  # tokens at its longest (prompt + every output)
    release_s: float | None  # its KV is free by then; None: no bound (held for ever)

    def num_tokens_at(self, t_s: float, now_s: float, growth: Growth) -> int:
        """Bound on the tokens held at t_s (before the release)."""
        return min(self.num_peak_tokens, self.num_start_tokens + growth.tokens_by(t_s - now_s))


@dataclass(frozen=True, slots=True)
class Growth:
    """How fast one request's KV can grow: at most `tokens_per_step` tokens per step (1 + s with s
    draft tokens) and at most `tokens_per_s` per second over whole steps.

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

    def tokens_by(self, elapsed_s: float) -> int:
        if math.isinf(self.tokens_per_s):
            return 1 << 60  # no lower bound on a step's length: no bound on growth
        grown = math.floor(max(0.0, elapsed_s) * self.tokens_per_s + 1e-9)
        return grown + EXTRA_STEPS * self.tokens_per_step


def footprint(state: RequestState, now_s: float) -> Footprint:
    """The bound for a running or waiting request (admitted or about to be)."""
    request = state.request
    late = state.next_token_deadline_s < now_s
    release_s = None
    if not late:
        release_s = token_deadline_s(request, request.num_output_tokens, state.first_token_s)
    return Footprint(
        state.request_id,
        num_start_tokens=state.num_tokens,
        num_peak_tokens=request.num_peak_kv_tokens,
        release_s=release_s,
    )


def peak_blocks(
    footprints: Iterable[Footprint], now_s: float, growth: Growth, block_size: int
) -> int:
    """Supremum over t >= now of sum_r blocks(F_r(t)): the KV blocks these requests may hold at
    once, at most. Evaluated at every release time (rows: requests, columns: release times)."""
    prints = list(footprints)
    if not prints:
        return 0
    peak = np.array([f.num_peak_tokens for f in prints], dtype=np.int64)
    start = np.array([f.num_start_tokens for f in prints], dtype=np.int64)
    release = np.array(
        [np.inf if f.release_s is None else f.release_s for f in prints], dtype=np.float64
    )
    forever = int(np.sum(-(-peak[np.isinf(release)] // block_size)))
    times_s = np.unique(release[np.isfinite(release)])
    if times_s.size == 0:
        return forever
    grown = np.array([growth.tokens_by(t_s - now_s) for t_s in times_s], dtype=np.int64)
    tokens = np.minimum(peak[:, None], start[:, None] + grown[None, :])
    blocks = -(-tokens // block_size)
    held = np.where(release[:, None] >= times_s[None, :], blocks, 0).sum(axis=0)
    return max(forever, int(held.max()))
