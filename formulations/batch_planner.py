"""Lays out the steps of a plan for an admitted set over a `BudgetCurve` (docs/ALGORITHM.md section
3).

Step m of the grid (at most T seconds, at most `cap` tokens) is filled in this order:
1. due decodes: every decoder whose residue is m mod k (admitted jobs only from step M_j + 1 on);
2. prefill chunks of admitted jobs in EDF order, as much as the step's budget allows (so chunk
   sizes vary from step to step);
3. early decodes of admitted jobs whose prefill is done but whose decode slots have not started;
4. with eager decodes (slos_dp's `eager_decodes`), every other decoder with decodes left, one
   token each, while the budget lasts: a request that finishes sooner frees its KV sooner, and
   its later slots stay in the plan, so no deadline moves;
5. best-effort work from what is left: decodes first, then prefill chunks, within the best-effort
   memory headroom (admitted requests have their peak memory reserved).
Explicit steps run until every admitted prefill is done (and best-effort prefill, up to a cap);
then a decode-only cycle of lcm(periods) grid steps repeats until the next plan (with eager
decodes, every decoder in every cycle step the budget allows). Empty grid steps
are dropped: that only makes later steps come earlier, which never breaks a deadline.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from formulations.budget import BudgetCurve, Decoder, Job, least_loaded
from formulations.plan import Step
from formulations.progress import num_blocks_for


@dataclass(slots=True)
class BestEffortWork:
    """A best-effort request as the layout tracks it (mutable copy, never the view's object)."""

    request_id: str
    num_pending_tokens: int
    num_remaining_outputs: int
    num_computed_tokens: int
    num_blocks: int
    has_output: bool
    peak_blocks: int

    @property
    def is_decoding(self) -> bool:
        return self.has_output and self.num_pending_tokens == 1 and self.num_remaining_outputs > 0


@dataclass(slots=True)
class _Track:
    """Progress of one admitted request through the layout."""

    tier: int | None
    residue: int
    start_step: int  # first grid step whose decode slot is owed
    num_prefill_left: int
    num_decodes_left: int
    done_step: int | None = None  # grid step in which the prefill completed


@dataclass(frozen=True)
class Layout:
    steps: tuple[Step, ...]
    repeat: tuple[Step, ...]
    grid_index: tuple[int, ...]  # grid step index of each explicit step
    completion_step: dict[str, int] = field(default_factory=dict)  # job -> grid step of its token


def _tracks(
    curve: BudgetCurve, jobs: Sequence[Job], decoders: Sequence[Decoder]
) -> dict[str, _Track]:
    """Residues: running decoders as the curve placed them, then admitted jobs greedily in EDF
    order (the same greedy that defines f(n) in the curve)."""
    loads = [list(base) for base in curve.base_loads]
    tracks: dict[str, _Track] = {}
    for d in decoders:
        if d.request_id in curve.decoder_residue:  # the others are deferred: they come as jobs
            tier = curve.tier_index[d.tpot_s]
            tracks[d.request_id] = _Track(
                tier, curve.decoder_residue[d.request_id], 0, 0, d.num_remaining_tokens, -1
            )
    for job in jobs:
        tier = curve.tier_index[job.tpot_s] if job.tpot_s is not None else None
        residue = 0
        if tier is not None:
            residue = least_loaded(loads[tier])
            loads[tier][residue] += 1
        start = curve.deadline_step(job.deadline_s) + 1
        done_step = -1 if job.num_prefill_tokens == 0 else None  # a deferred decoder: no prefill
        tracks[job.request_id] = _Track(
            tier, residue, start, job.num_prefill_tokens, job.num_decode_tokens, done_step
        )
    return tracks


class _Filler:
    """Fills one grid step at a time."""

    def __init__(
        self,
        curve: BudgetCurve,
        jobs: Sequence[Job],
        decoders: Sequence[Decoder],
        best_effort: Sequence[BestEffortWork],
        be_headroom_blocks: int,
        block_size: int,
        be_reserve: tuple[str | None, int] = (None, 0),
    ):
        self.curve = curve
        self.jobs = list(jobs)
        self.tracks = _tracks(curve, jobs, decoders)
        self.best_effort = list(best_effort)
        self.be_headroom_blocks = be_headroom_blocks
        self.block_size = block_size
        self.be_reserved_id, self.be_reserved_blocks = be_reserve

    def _due(self, track: _Track, m: int) -> bool:
        """Decode slot of the track's residue (residues count from the T-grid's first step)."""
        m -= self.curve.num_burst_steps
        period = self.curve.tiers[track.tier].period_steps
        return m >= 0 and m % period == track.residue

    def _decode_due(self, track: _Track, m: int) -> bool:
        """The track decodes, has decodes left, and step m is its slot."""
        return track.tier is not None and track.num_decodes_left > 0 and self._due(track, m)

    def _started_counts(self, m: int) -> tuple[int, ...]:
        counts = [0] * self.curve.num_tiers
        for job in self.jobs:
            track = self.tracks[job.request_id]
            if track.tier is not None and track.start_step <= m:
                counts[track.tier] += 1
        return tuple(counts)

    def fill(self, m: int, counts: tuple[int, ...]) -> Step:
        in_burst = m < self.curve.num_burst_steps
        spec_cap = 0 if in_burst else self.curve.spec_steps(counts)
        num_tokens: dict[str, int] = {}
        num_spec: dict[str, int] = {}
        used = 0
        # 1. decodes that fall due (decoding before this step: done_step < m)
        for rid, t in self.tracks.items():
            decoding = t.done_step is not None and t.done_step < m
            if decoding and t.start_step <= m and self._decode_due(t, m):
                s = self.curve.tiers[t.tier].num_spec_tokens
                used += self._decode(rid, t, s, num_tokens, num_spec)
        cap = self.curve.cap_at(m, spec_cap, len(num_tokens))  # each decode adds its context
        # 2. admitted prefill in EDF order
        for job in self.jobs:
            t = self.tracks[job.request_id]
            if t.num_prefill_left > 0 and used < cap:
                chunk = min(t.num_prefill_left, cap - used)
                num_tokens[job.request_id] = chunk
                t.num_prefill_left -= chunk
                used += chunk
                if t.num_prefill_left == 0:
                    t.done_step = m
        # 3. early decodes from leftover budget
        for job in self.jobs:
            t = self.tracks[job.request_id]
            decoding = t.done_step is not None and t.done_step < m
            if decoding and m < t.start_step and self._decode_due(t, m):
                s = self.curve.tiers[t.tier].num_spec_tokens
                s = s if s <= spec_cap else 0
                if used + 1 + s <= self.curve.cap_at(m, spec_cap, len(num_tokens) + 1):
                    used += self._decode(job.request_id, t, s, num_tokens, num_spec)
        # 4. eager decodes: decoders not due here decode from what is left (a request that
        # finishes early frees its KV early; its slots stay owed, so deadlines hold)
        if self.eager_decodes:
            for rid, t in self.tracks.items():
                decoding = t.done_step is not None and t.done_step < m
                if not (decoding and self._may_decode_early(rid, t, num_tokens)):
                    continue
                if used + 1 <= self.curve.cap_at(m, spec_cap, len(num_tokens) + 1):
                    used += self._decode(rid, t, 0, num_tokens, num_spec)
        # 5. best effort (its decoders, if they all join, add their context too)
        num_be_decoding = sum(be.is_decoding for be in self.best_effort)
        cap = self.curve.cap_at(m, spec_cap, len(num_tokens) + num_be_decoding)
        used = self._fill_best_effort(num_tokens, used, cap, prefill=True)
        return Step(num_tokens, num_spec)

    @staticmethod
    def _may_decode_early(rid: str, t: _Track, num_tokens: dict) -> bool:
        """A decoder with decodes left that this step does not compute yet."""
        return rid not in num_tokens and t.tier is not None and t.num_decodes_left > 0

    @staticmethod
    def _decode(rid: str, t: _Track, s: int, num_tokens: dict, num_spec: dict) -> int:
        num_tokens[rid] = 1
        if s:
            num_spec[rid] = s
        t.num_decodes_left -= 1
        return 1 + s

    def _fill_best_effort(self, num_tokens: dict, used: int, cap: int, prefill: bool) -> int:
        for be in self.best_effort:
            if used >= cap or be.num_remaining_outputs <= 0:
                continue
            if be.is_decoding:
                chunk = 1
            elif prefill and not be.is_decoding:
                chunk = min(be.num_pending_tokens, cap - used)
            else:
                continue
            chunk = self._fit_memory(be, chunk)
            if chunk <= 0:
                continue
            num_tokens[be.request_id] = chunk
            used += chunk
            self._advance(be, chunk)
        return used

    def _fit_memory(self, be: BestEffortWork, chunk: int) -> int:
        """Shrink a best-effort chunk to the blocks the headroom still has (others than the oldest
        may not take the blocks kept for the oldest to finish)."""
        headroom = self.be_headroom_blocks
        if be.request_id != self.be_reserved_id:
            headroom -= self.be_reserved_blocks
        max_tokens = (be.num_blocks + max(0, headroom)) * self.block_size - be.num_computed_tokens
        return min(chunk, max_tokens)

    def _advance(self, be: BestEffortWork, chunk: int) -> None:
        be.num_computed_tokens += chunk
        new_blocks = num_blocks_for(be.num_computed_tokens, self.block_size)
        self.be_headroom_blocks -= new_blocks - be.num_blocks
        if be.request_id == self.be_reserved_id:
            self.be_reserved_blocks -= new_blocks - be.num_blocks
        be.num_blocks = new_blocks
        be.num_pending_tokens -= chunk
        if be.num_pending_tokens == 0:
            be.num_remaining_outputs -= 1
            be.num_pending_tokens = 1
            be.has_output = True

    def admitted_prefill_left(self) -> bool:
        return any(self.tracks[j.request_id].num_prefill_left > 0 for j in self.jobs)

    def best_effort_left(self) -> bool:
        return any(
            be.num_remaining_outputs > 0 and be.request_id not in self.be_in_repeat
            for be in self.best_effort
        )

    def repeat_step(self, m: int, cap: int, spec_cap: int) -> Step:
        num_tokens: dict[str, int] = {}
        num_spec: dict[str, int] = {}
        used = 0
        for rid, t in self.tracks.items():
            if t.num_prefill_left == 0 and self._decode_due(t, m):
                s = self.curve.tiers[t.tier].num_spec_tokens
                num_tokens[rid] = 1
                if s:
                    num_spec[rid] = min(s, spec_cap)
                used += 1 + num_spec.get(rid, 0)
        if self.eager_decodes:
            for rid, t in self.tracks.items():
                if (
                    t.num_prefill_left == 0
                    and used < cap
                    and self._may_decode_early(rid, t, num_tokens)
                ):
                    num_tokens[rid] = 1
                    used += 1
        for be in self.best_effort:
            # Best-effort decoders join the cycle only with their peak memory reserved.
            if be.is_decoding and used < cap and be.request_id in self.be_in_repeat:
                num_tokens[be.request_id] = 1
                used += 1
        return Step(num_tokens, num_spec)

    be_in_repeat: frozenset[str] = frozenset()
    eager_decodes: bool = False


def build_layout(
    curve: BudgetCurve,
    jobs: Sequence[Job],
    decoders: Sequence[Decoder],
    best_effort: Sequence[BestEffortWork] = (),
    be_headroom_blocks: int = 0,
    block_size: int = 16,
    max_best_effort_steps: int = 64,
    be_reserve: tuple[str | None, int] = (None, 0),
    eager_decodes: bool = False,
) -> Layout:
    """Steps and steady cycle for the admitted `jobs` (EDF order) beside the running `decoders`."""
    filler = _Filler(curve, jobs, decoders, best_effort, be_headroom_blocks, block_size, be_reserve)
    filler.eager_decodes = eager_decodes
    steps: list[Step] = []
    grid: list[int] = []
    m = 0
    num_be_steps = 0
    while filler.admitted_prefill_left() or (
        filler.best_effort_left() and num_be_steps < max_best_effort_steps
    ):
        if not filler.admitted_prefill_left():
            num_be_steps += 1
        step = filler.fill(m, filler._started_counts(m))
        if not step.is_empty:
            steps.append(step)
            grid.append(m)
        elif not filler.admitted_prefill_left():
            break  # best effort cannot progress (memory): wait for the next plan
        m += 1
    repeat = _repeat_cycle(filler, max(m, curve.num_burst_steps))
    completion = {
        j.request_id: filler.tracks[j.request_id].done_step
        for j in jobs
        if filler.tracks[j.request_id].done_step is not None
    }
    return Layout(tuple(steps), repeat, tuple(grid), completion)


def _repeat_cycle(filler: _Filler, first_step: int) -> tuple[Step, ...]:
    curve = filler.curve
    counts = filler._started_counts(1 << 30)
    spec_cap = curve.spec_steps(counts)
    periods = [
        curve.tiers[t.tier].period_steps for t in filler.tracks.values() if t.tier is not None
    ]
    length = math.lcm(*periods) if periods else 1
    headroom = filler.be_headroom_blocks
    chosen = []
    for be in filler.best_effort:
        if be.is_decoding:
            growth = be.peak_blocks - be.num_blocks
            if growth <= headroom:
                headroom -= growth
                chosen.append(be.request_id)
    filler.be_in_repeat = frozenset(chosen)
    cap = curve.step_cap(spec_cap, len(filler.tracks) + len(chosen))  # every decoder's context
    cycle = [filler.repeat_step(first_step + c, cap, spec_cap) for c in range(length)]
    return tuple(step for step in cycle if not step.is_empty)
