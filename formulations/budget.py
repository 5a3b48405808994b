"""The token-budget curve (docs/ALGORITHM.md section 3): how many prefill tokens each future step
leaves
once the decode tokens that fall due have been placed.

Our variant of the budget curve (chosen so that admission is exact and provably safe):

- A plan runs steps of at most `T` seconds each (`T` is a candidate step time: a TPOT present, or a
  TPOT stretched by speculation). A step never holds more than `cap(s) = max_tokens(T, s)` tokens,
  so by the performance model it lasts at most `T`, and step m (0-based) ends by `now + (m + 1) T`.
  With a context term in the model, each decode in a step adds its cached context, estimated as
  the view's `context_tokens_per_decode`: a step with d decodes holds at most
  `cap(s, d) = max_tokens(T, s, d * context_tokens_per_decode)` tokens.
- A TPOT tier with TPOT `tau` decodes once every `k = floor(E(s) tau / T)` steps (speculation.py);
  its requests are spread over the k residues of the step index (step m serves the requests whose
  residue is m mod k), least-loaded residue first. With `n` requests the busiest residue holds
  `f(n)` of them, so a step carries at most `sum_tiers (1 + s) f(n_tier)` decode tokens.
  Between two tokens of a request lie at most k steps, i.e. k T <= tau seconds: every cumulative
  token deadline holds.
- A request's prefill must complete in a step that ends by its TTFT deadline d, i.e. within steps
  `0..M` with `M = floor((d - now) / T) - 1`. Its decodes start at step M + 1 (earlier only from
  leftover budget): token 2 is due at d + tau, and step M + k ends by now + (M + 1 + k) T <= d +
  tau.
  Because decode load starts at the deadline step and not at completion, the per-step prefill
  budget depends only on which requests are admitted, never on when their prefill finishes; so EDF
  over that budget is an optimal prefill order, and the supply between two deadlines is
  `(M_j - M_i) * budget(tier counts)`.

`BudgetCurve` holds one candidate step time's tiers and residue loads and answers
`budget(counts)`; `build_steps` lays out the actual steps for an admitted set.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from formulations.perf_model import PerfModel
from formulations.speculation import TierChoice, choose_tier

_EPS = 1e-9


@dataclass(frozen=True, slots=True)
class Burst:
    """A prefill burst: the plan opens with `num_steps` long steps of `step_time_s` that carry no
    decodes, used when every decoder is ahead of schedule (e.g. an idle replica, or decoders that
    got ahead in short decode steps). The T-grid starts after it."""

    num_steps: int
    step_time_s: float

    def end_s(self, now_s: float) -> float:
        return now_s + self.num_steps * self.step_time_s


class _NeedsDecodeInBurst(Exception):
    """A running decoder needs a token before the burst ends: no burst possible."""


@dataclass(frozen=True, slots=True)
class Decoder:
    """A running, admitted request that is decoding (one pending token)."""

    request_id: str
    tpot_s: float  # tightest TPOT of its remaining tokens
    next_deadline_s: float
    num_remaining_tokens: int  # decodes still to run


@dataclass(frozen=True, slots=True)
class Job:
    """A request that needs (re)prefill before its next token: a new request, or an admitted one
    that is still prefilling or recomputing after preemption."""

    request_id: str
    num_prefill_tokens: int
    deadline_s: float | None  # None: already late, scheduled first with no deadline check
    tpot_s: float | None  # tightest TPOT of its decode tokens; None when it has none
    num_decode_tokens: int  # decodes after the prefill's token
    peak_blocks: int  # KV blocks at its longest
    value: float
    mandatory: bool  # admitted earlier: can never be dropped
    arrival_s: float = 0.0


def steps_before(deadline_s: float, now_s: float, step_time_s: float) -> int:
    """Number of whole steps of `step_time_s` that end by `deadline_s`."""
    return math.floor((deadline_s - now_s) / step_time_s + _EPS)


def least_loaded(loads: list[int], max_residue: int | None = None) -> int:
    """Index of the least-loaded residue (lowest index on ties), among 0..max_residue."""
    last = len(loads) - 1 if max_residue is None else min(max_residue, len(loads) - 1)
    best = 0
    for r in range(1, last + 1):
        if loads[r] < loads[best]:
            best = r
    return best


class BudgetCurve:
    """Per-step token budgets for one candidate step time `T`."""

    def __init__(
        self,
        perf_model: PerfModel,
        now_s: float,
        step_time_s: float,
        tiers: dict[float, TierChoice],
        decoders: Sequence[Decoder],
        burst: Burst | None = None,
        acceptance_rate: float = 0.0,
        context_tokens_per_decode: int = 0,
    ) -> None:
        self.perf_model = perf_model
        self.acceptance_rate = acceptance_rate  # of draft tokens (the planned speculation's gain)
        self.context_tokens_per_decode = context_tokens_per_decode  # estimated (state.py)
        self.now_s = now_s
        self.step_time_s = step_time_s
        self.burst = burst
        self.num_burst_steps = burst.num_steps if burst else 0
        self.grid_start_s = burst.end_s(now_s) if burst else now_s  # where the T-grid begins
        self.tier_tpots: tuple[float, ...] = tuple(sorted(tiers))
        self.tiers: tuple[TierChoice, ...] = tuple(tiers[t] for t in self.tier_tpots)
        self.tier_index = {t: i for i, t in enumerate(self.tier_tpots)}
        self.decoder_residue: dict[str, int] = {}
        self.base_loads: list[list[int]] = [[0] * tier.period_steps for tier in self.tiers]
        immediate, self.deferred = self._split_decoders(decoders)
        self._assign_decoders(immediate)
        self._max_load_tables: list[list[int]] = [[max(loads)] for loads in self.base_loads]
        self._budget_memo: dict[tuple[int, ...], int] = {}
        self._cap_memo: dict[tuple[int, int], int] = {}

    def _latest_step(self, decoder: Decoder) -> int:
        """Last T-grid step (counted from the grid's start, after any burst) whose end still meets
        the decoder's next deadline."""
        return self.deadline_step(decoder.next_deadline_s) - self.num_burst_steps

    def _split_decoders(self, decoders: Sequence[Decoder]) -> tuple[list[Decoder], tuple[Job, ...]]:
        """A decoder whose next token is due within its period decodes from step 0 (base load).
        One that is ahead (latest step L >= k, e.g. a request whose first token came early) only
        needs its slots from step L - k + 1 on: it becomes a zero-prefill job with deadline step
        L - k, so that it joins the decode load exactly when a new request would."""
        immediate: list[Decoder] = []
        deferred: list[Job] = []
        for d in decoders:
            period = self.tiers[self.tier_index[d.tpot_s]].period_steps
            latest = self._latest_step(d)
            if latest < 0 and self.burst is not None:
                raise _NeedsDecodeInBurst(d.request_id)
            if latest < period:
                immediate.append(d)
                continue
            # deadline_step(x) = deadline_step(D) - period for x = D - period * T (on the T-grid)
            deadline_s = d.next_deadline_s - period * self.step_time_s
            deferred.append(
                Job(
                    d.request_id,
                    0,
                    deadline_s,
                    d.tpot_s,
                    d.num_remaining_tokens,
                    0,
                    0.0,
                    mandatory=True,
                    arrival_s=float("-inf"),
                )
            )
        return immediate, tuple(deferred)

    def _assign_decoders(self, decoders: Sequence[Decoder]) -> None:
        """Running decoders go to the least-loaded residue whose first step still meets their next
        deadline (grid step r ends by grid start + (r + 1) T); late ones decode in grid step 0.
        Residues count T-grid steps from the grid's start (after any burst)."""

        for d in sorted(decoders, key=lambda d: (self._latest_step(d), d.request_id)):
            i = self.tier_index[d.tpot_s]
            latest = self._latest_step(d)
            r = 0 if latest < 0 else least_loaded(self.base_loads[i], latest)
            self.base_loads[i][r] += 1
            self.decoder_residue[d.request_id] = r

    @property
    def num_tiers(self) -> int:
        return len(self.tiers)

    def deadline_step(self, deadline_s: float | None) -> int:
        """M: the last step index that ends by the deadline (-1 for late jobs). With a burst, the
        first `num_burst_steps` steps are `burst.step_time_s` long, the rest `T`."""
        if deadline_s is None:
            return -1
        if self.burst is not None and deadline_s < self.grid_start_s - _EPS * self.step_time_s:
            return steps_before(deadline_s, self.now_s, self.burst.step_time_s) - 1
        return (
            self.num_burst_steps + steps_before(deadline_s, self.grid_start_s, self.step_time_s) - 1
        )

    def supply(self, from_step: int, to_step: int, counts: tuple[int, ...]) -> int:
        """Prefill tokens of steps from_step + 1 .. to_step when `counts` new requests decode
        (burst steps carry no decodes: nobody may need a token during the burst)."""
        if to_step <= from_step:
            return 0
        burst_steps = max(0, min(to_step, self.num_burst_steps - 1) - from_step)
        grid_steps = (to_step - from_step) - burst_steps
        burst_tokens = burst_steps * self.burst_cap if burst_steps else 0
        return burst_tokens + grid_steps * self.budget(counts)

    @property
    def burst_cap(self) -> int:
        # Burst steps carry prefill chunks only, no decodes: no decoder context.
        return self.perf_model.max_tokens(self.burst.step_time_s, 0) if self.burst else 0

    def cap_at(self, step: int, spec_steps: int, num_decodes: int = 0) -> int:
        """Token cap of grid step `step` with `num_decodes` decodes in it."""
        if step < self.num_burst_steps:
            return self.burst_cap
        return self.step_cap(spec_steps, num_decodes)

    def admissible(self, job: Job) -> bool:
        """With a burst, a job that would decode during it (deadline step before its last step)
        cannot be admitted."""
        if job.tpot_s is None or self.burst is None:
            return True
        return self.deadline_step(job.deadline_s) >= self.num_burst_steps - 1

    def max_residue_load(self, tier: int, num_new: int) -> int:
        """f(n): the busiest residue of `tier` after n new requests join greedily."""
        table = self._max_load_tables[tier]
        if num_new >= len(table):
            loads = list(self.base_loads[tier])
            for _ in range(len(table) - 1):
                loads[least_loaded(loads)] += 1
            while len(table) <= num_new:
                loads[least_loaded(loads)] += 1
                table.append(max(loads))
        return table[num_new]

    def step_cap(self, spec_steps: int, num_decodes: int = 0) -> int:
        """Most tokens a step with `spec_steps` sequential draft steps and `num_decodes` decodes
        may hold (lasts <= T)."""
        key = (spec_steps, num_decodes * self.context_tokens_per_decode)
        cap = self._cap_memo.get(key)
        if cap is None:
            cap = self.perf_model.max_tokens(self.step_time_s, *key)
            self._cap_memo[key] = cap
        return cap

    def spec_steps(self, counts: Sequence[int]) -> int:
        """Largest speculation length among tiers with a decoder (running or started)."""
        return max(
            (
                tier.num_spec_tokens
                for i, tier in enumerate(self.tiers)
                if counts[i] > 0 or sum(self.base_loads[i]) > 0
            ),
            default=0,
        )

    def budget(self, counts: tuple[int, ...]) -> int:
        """Prefill tokens every step keeps once `counts[i]` new requests of tier i decode beside the
        running decoders: cap(s_max, sum_i f_i) - sum_i (1 + s_i) f_i(counts[i]). Negative: decode
        infeasible."""
        memo = self._budget_memo.get(counts)
        if memo is not None:
            return memo
        loads = [self.max_residue_load(i, counts[i]) for i in range(self.num_tiers)]
        decode_tokens = sum(tier.tokens_per_decode * load for tier, load in zip(self.tiers, loads))
        value = self.step_cap(self.spec_steps(counts), sum(loads)) - decode_tokens
        self._budget_memo[counts] = value
        return value

    def zero_counts(self) -> tuple[int, ...]:
        return (0,) * self.num_tiers


def make_budget_curve(
    perf_model: PerfModel,
    now_s: float,
    step_time_s: float,
    decoders: Sequence[Decoder],
    job_tpots_s: Iterable[float],
    max_spec_tokens: int,
    acceptance_rate: float,
    burst: Burst | None = None,
    context_tokens_per_decode: int = 0,
) -> BudgetCurve | None:
    """A budget curve for step time T, or None when a running decoder's tier cannot keep up at T.
    Job tiers that cannot keep up are left out (such jobs are not admissible at this T)."""
    tiers: dict[float, TierChoice] = {}
    for tpot_s in {d.tpot_s for d in decoders}:
        choice = choose_tier(tpot_s, step_time_s, max_spec_tokens, acceptance_rate)
        if choice is None:
            return None
        tiers[tpot_s] = choice
    for tpot_s in set(job_tpots_s) - set(tiers):
        choice = choose_tier(tpot_s, step_time_s, max_spec_tokens, acceptance_rate)
        if choice is not None:
            tiers[tpot_s] = choice
    if perf_model.max_tokens(step_time_s, 0) < 0:
        return None
    try:
        curve = BudgetCurve(
            perf_model,
            now_s,
            step_time_s,
            tiers,
            decoders,
            burst,
            acceptance_rate,
            context_tokens_per_decode,
        )
    except _NeedsDecodeInBurst:
        return None
    if burst is not None and curve.burst_cap <= 0:
        return None
    if curve.budget(curve.zero_counts()) < 0:
        return None  # the running decoders alone do not fit a step of this length
    return curve
