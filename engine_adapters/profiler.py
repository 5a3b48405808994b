"""Profile an engine's step time over a sweep of step compositions and fit the planner's
performance model (formulations.perf_model) to the measurements.

The sweep runs through the `Engine` interface only, so it measures what a plan step really costs
the adapter (Python overhead, sampling, speculation) and works for any engine:
  - prefill steps: one request, a chunk of P tokens that samples the first token;
  - chunked prefill steps: a chunk of P tokens after C tokens of the same prompt already cached;
  - decode steps: B requests with a cached context of C tokens each, one token each (B x C swept);
  - mixed steps: B decodes plus one prefill chunk of P tokens;
  - speculative steps (engines with a draft): B decodes each verifying s draft tokens.
Each composition is timed in `num_repeats` interleaved rounds, each after an untimed warm-up
step; the sample keeps the median. A sample's x is (Step.num_batched_tokens, Step.spec_steps, the
context the step attends over: the tokens its requests had cached when it started), as the planner
charges it. Compositions whose KV would not fit the engine's free blocks are skipped.

Held-out error: every `held_out_every`-th composition is left out of a first fit and scored
against it (the error on step shapes the fit did not see); the model returned is then fitted on
all samples.

Timers: "wall" takes the step time the engine reports (what the planner sees). "cpu" takes the
process CPU time spent in `execute`: on a shared host other jobs stretch wall times by whole
scheduler slices, while the CPU time of a single-threaded CPU engine is its step time on an idle
host. Use "cpu" only for an engine that computes in this process with one thread.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from engine_adapters.engine import Engine, EngineRequest
from formulations.perf_model import FitResult, PerfModel, StepSample, fit_perf_model
from formulations.plan import Step

TIMERS = ("wall", "cpu")


@dataclass(frozen=True, slots=True)
class SweepConfig:
    prefill_sizes: tuple[int, ...] = (16, 64, 128, 256, 512, 1024)
    decode_batch_sizes: tuple[int, ...] = (1, 4, 8, 16, 32, 64)
    context_sizes: tuple[int, ...] = (16, 128, 512, 1536)  # cached tokens per decoding request
    chunked: tuple[tuple[int, int], ...] = ((128, 512), (256, 1024), (512, 1536))  # (P, C)
    mixed: tuple[tuple[int, int], ...] = ((4, 128), (16, 256), (32, 64), (8, 512))  # (B, P)
    spec_lengths: tuple[int, ...] = (1, 2, 4)
    spec_batch_sizes: tuple[int, ...] = (1, 8, 32)
    max_step_context_tokens: int = 32_768  # decode compositions beyond B x C = this are skipped
    num_repeats: int = 5
    held_out_every: int = 4  # every k-th composition is held out of the first fit (0: none)

    def __post_init__(self) -> None:
        if not self.context_sizes or min(self.context_sizes) < 1:
            raise ValueError("the sweep needs context sizes of at least 1 token")
        if self.num_repeats < 1 or self.held_out_every < 0:
            raise ValueError("num_repeats must be >= 1 and held_out_every >= 0")

    @classmethod
    def quick(cls) -> SweepConfig:
        """A few seconds on a tiny model: for tests and smoke runs."""
        return cls(
            prefill_sizes=(16, 64, 128),
            decode_batch_sizes=(1, 4, 16),
            context_sizes=(16, 128),
            chunked=((64, 128),),
            mixed=((4, 64),),
            spec_lengths=(1, 2),
            spec_batch_sizes=(1, 4),
            num_repeats=3,
        )


@dataclass(frozen=True, slots=True)
class Composition:
    """One step shape to time: `num_decodes` decodes with `decode_context` cached tokens each
    (verifying `spec` draft tokens each), and, if prefill_size > 0, one prefill chunk of that size
    after `prefill_context` cached tokens of its prompt."""

    label: str
    num_decodes: int = 0
    decode_context: int = 0
    prefill_size: int = 0
    prefill_context: int = 0
    spec: int = 0

    @property
    def num_kv_tokens(self) -> int:
        """KV tokens its requests hold at most (warm-up and timed rounds)."""
        decode = self.num_decodes * (self.decode_context + 2 * (self.spec + 1) + 1)
        return decode + 2 * (self.prefill_context + self.prefill_size + 1)


@dataclass(frozen=True)
class Measurement:
    label: str
    sample: StepSample


@dataclass(frozen=True)
class ProfileResult:
    measurements: tuple[Measurement, ...]
    fit: FitResult  # on every measurement
    held_out_error_pct: float | None  # median |error| of a fit without the held-out ones on them
    num_held_out: int = 0
    skipped: tuple[str, ...] = ()  # compositions whose KV did not fit the engine

    @property
    def model(self) -> PerfModel:
        return self.fit.model

    @property
    def median_abs_pct_error(self) -> float:
        return median_abs_pct_error(self.model, [m.sample for m in self.measurements])


def median_abs_pct_error(model: PerfModel, samples: Sequence[StepSample]) -> float:
    """median over samples of |T_model - T_measured| / T_measured, in percent."""
    errors = [
        abs(model.step_time_s(s.num_tokens, s.spec_steps, s.num_context_tokens) - s.step_time_s)
        / s.step_time_s
        for s in samples
    ]
    return 100.0 * float(np.median(errors))


def best_fit(samples: Sequence[StepSample], max_num_lines: int, name: str) -> FitResult:
    """The fit (relative least squares) with the lowest median relative error among
    1..max_num_lines lines (the alternating max-of-lines fit can settle in a worse local optimum
    than fewer lines; more lines never help then)."""
    fits = [
        fit_perf_model(samples, num_lines=k, name=name, relative=True)
        for k in range(1, max_num_lines + 1)
        if len(samples) >= 3 * k
    ]
    return min(fits, key=lambda fit: median_abs_pct_error(fit.model, samples))


def held_out_split(
    measurements: Sequence[Measurement], every: int
) -> tuple[list[StepSample], list[StepSample]]:
    """(fit set, held-out set): every `every`-th measurement, starting with the second, is held
    out (the sweep's order interleaves kinds, so each kind loses some)."""
    if every <= 1:
        return [m.sample for m in measurements], []
    fit = [m.sample for i, m in enumerate(measurements) if i % every != 1]
    held = [m.sample for i, m in enumerate(measurements) if i % every == 1]
    return fit, held


class Profiler:
    def __init__(
        self, engine: Engine, sweep: SweepConfig = SweepConfig(), timer: str = "wall"
    ) -> None:
        if timer not in TIMERS:
            raise ValueError(f"unknown timer {timer!r} (known: {', '.join(TIMERS)})")
        self.engine = engine
        self.sweep = sweep
        self.timer = timer
        info = engine.info()
        self.max_spec_tokens = info.max_spec_tokens
        self.max_model_len = info.max_model_len
        self.block_size = info.block_size
        self._ids = itertools.count()
        self.skipped: list[str] = []

    def run(self, max_num_lines: int = 2, name: str = "profiled") -> ProfileResult:
        measurements = tuple(self.measure())
        fit_set, held_out = held_out_split(measurements, self.sweep.held_out_every)
        held_out_error = None
        if held_out and len(fit_set) >= 3:
            first = best_fit(fit_set, max_num_lines, name)
            held_out_error = median_abs_pct_error(first.model, held_out)
        return ProfileResult(
            measurements,
            best_fit([m.sample for m in measurements], max_num_lines, name),
            held_out_error,
            len(held_out),
            tuple(self.skipped),
        )

    def measure(self) -> list[Measurement]:
        """Time every composition in `num_repeats` interleaved rounds (so that a burst of load on
        a shared host hits all compositions alike, not a few) and keep each one's median."""
        compositions = self._fitting(list(self.compositions()))
        times: dict[str, list[float]] = {c.label: [] for c in compositions}
        shapes: dict[str, tuple[int, int, int]] = {}
        for _ in range(self.sweep.num_repeats):
            for composition in compositions:
                shape, time_s = self._timed(composition)
                times[composition.label].append(time_s)
                shapes[composition.label] = shape
        return [
            Measurement(
                label, StepSample(*shapes[label][:2], statistics.median(t), shapes[label][2])
            )
            for label, t in times.items()
        ]

    def _fitting(self, compositions: list[Composition]) -> list[Composition]:
        """The compositions whose KV fits the engine's free blocks and whose prompts fit its
        context length; the others are recorded in `skipped`."""
        capacity = self.engine.num_free_blocks * self.block_size
        kept = []
        for c in compositions:
            too_long = (
                max(c.decode_context, c.prefill_context + c.prefill_size) + 2 * (c.spec + 1)
                >= self.max_model_len
            )
            if c.num_kv_tokens + c.num_decodes * self.block_size > capacity or too_long:
                self.skipped.append(c.label)
            else:
                kept.append(c)
        return kept

    def compositions(self) -> Iterator[Composition]:
        """Every step shape of the sweep, kinds interleaved by size."""
        sweep = self.sweep
        contexts = sweep.context_sizes
        for size in sweep.prefill_sizes:
            yield Composition(f"prefill P={size}", prefill_size=size)
        for size, context in sweep.chunked:
            yield Composition(
                f"chunk P={size} C={context}", prefill_size=size, prefill_context=context
            )
        for batch, context in itertools.product(sweep.decode_batch_sizes, contexts):
            if batch * context <= sweep.max_step_context_tokens:
                yield Composition(f"decode B={batch} C={context}", batch, context)
        for i, (batch, size) in enumerate(sweep.mixed):
            context = contexts[i % len(contexts)]
            yield Composition(f"mixed B={batch} C={context} P={size}", batch, context, size)
        spec_lengths = [s for s in sweep.spec_lengths if s <= self.max_spec_tokens]
        for i, (spec, batch) in enumerate(itertools.product(spec_lengths, sweep.spec_batch_sizes)):
            context = contexts[i % len(contexts)]
            yield Composition(f"spec B={batch} C={context} s={spec}", batch, context, spec=spec)

    def _timed(self, c: Composition) -> tuple[tuple[int, int, int], float]:
        """Time one step of composition `c` after an identical untimed warm-up; returns the timed
        step's (tokens, draft steps, context tokens) and its time."""
        cached: dict[str, int] = {}
        decoders = [self._add(c.decode_context, 2 * (c.spec + 1) + 1) for _ in range(c.num_decodes)]
        if decoders:
            self._execute(Step({rid: c.decode_context for rid in decoders}), cached)
        for _ in range(2):  # warm-up, then the timed step
            prefill = []
            if c.prefill_size:
                prefill = [self._add(c.prefill_context + c.prefill_size, 1)]
                if c.prefill_context:
                    self._execute(Step({prefill[0]: c.prefill_context}), cached)
            step = Step(
                {**dict.fromkeys(decoders, 1), **dict.fromkeys(prefill, c.prefill_size)},
                {rid: c.spec for rid in decoders if c.spec},
            )
            context = sum(cached.get(rid, 0) for rid in step.num_tokens)
            time_s = self._execute(step, cached)
            for rid in prefill:
                self.engine.abort(rid)
        for rid in decoders:
            self.engine.abort(rid)
        return (step.num_batched_tokens, step.spec_steps, context), time_s

    def _add(self, num_prompt_tokens: int, max_new_tokens: int) -> str:
        rid = f"profile-{next(self._ids)}"
        self.engine.add_request(EngineRequest(rid, num_prompt_tokens, max_new_tokens))
        return rid

    def _execute(self, step: Step, cached: dict[str, int]) -> float:
        """Run a step, count the tokens it cached per request; its time by the profiler's timer."""
        cpu_start_s = time.process_time()
        report = self.engine.execute(step, 0)
        cpu_s = time.process_time() - cpu_start_s
        if not report.ok:
            raise ValueError(f"profiling step failed: {report.error}")
        for rid, num in report.num_computed_tokens.items():
            cached[rid] = cached.get(rid, 0) + num
        return cpu_s if self.timer == "cpu" else report.step_time_s
