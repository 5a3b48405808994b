"""Profile an engine's step time over a sweep of step compositions and fit the planner's
performance model (formulations.perf_model) to the measurements.

The sweep runs through the `Engine` interface only, so it measures what a plan step really costs
the adapter (Python overhead, sampling, speculation) and works for any engine:
  - prefill steps: one request, a chunk of P tokens that samples the first token;
  - decode steps: B requests with a context of C tokens each, one token each;
  - mixed steps: B decodes plus one prefill chunk of P tokens;
  - speculative steps (engines with a draft): B decodes each verifying s draft tokens.
Each composition is timed in `num_repeats` interleaved rounds, each after an untimed warm-up
step; the sample keeps the median. A sample's x is (Step.num_batched_tokens, Step.spec_steps),
as the planner charges it.

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
    mixed: tuple[tuple[int, int], ...] = ((4, 128), (16, 256), (32, 64), (8, 512))  # (B, P)
    spec_lengths: tuple[int, ...] = (1, 2, 4)
    spec_batch_sizes: tuple[int, ...] = (1, 8, 32)
    context_tokens: int = 64
    num_repeats: int = 5

    @classmethod
    def quick(cls) -> SweepConfig:
        """A few seconds on a tiny model: for tests and smoke runs."""
        return cls((16, 64, 128), (1, 4, 16), ((4, 64),), (1, 2), (1, 4), 16, 3)


@dataclass(frozen=True)
class Measurement:
    label: str
    sample: StepSample


@dataclass(frozen=True)
class ProfileResult:
    measurements: tuple[Measurement, ...]
    fit: FitResult

    @property
    def model(self) -> PerfModel:
        return self.fit.model

    @property
    def median_abs_pct_error(self) -> float:
        return median_abs_pct_error(self.model, [m.sample for m in self.measurements])


def median_abs_pct_error(model: PerfModel, samples: Sequence[StepSample]) -> float:
    """median over samples of |T_model - T_measured| / T_measured, in percent."""
    errors = [
        abs(model.step_time_s(s.num_tokens, s.spec_steps) - s.step_time_s) / s.step_time_s
        for s in samples
    ]
    return 100.0 * float(np.median(errors))


def best_fit(samples: Sequence[StepSample], max_num_lines: int, name: str) -> FitResult:
    """The fit with the highest R^2 among 1..max_num_lines lines (the alternating max-of-lines fit
    can settle in a worse local optimum than fewer lines; more lines never help then)."""
    fits = [
        fit_perf_model(samples, num_lines=k, name=name)
        for k in range(1, max_num_lines + 1)
        if len(samples) >= 3 * k
    ]
    return max(fits, key=lambda fit: fit.r2)


class Profiler:
    def __init__(
        self, engine: Engine, sweep: SweepConfig = SweepConfig(), timer: str = "wall"
    ) -> None:
        if timer not in TIMERS:
            raise ValueError(f"unknown timer {timer!r} (known: {', '.join(TIMERS)})")
        self.engine = engine
        self.sweep = sweep
        self.timer = timer
        self.max_spec_tokens = engine.info().max_spec_tokens
        self._ids = itertools.count()

    def run(self, max_num_lines: int = 2, name: str = "profiled") -> ProfileResult:
        measurements = tuple(self.measure())
        return ProfileResult(
            measurements, best_fit([m.sample for m in measurements], max_num_lines, name)
        )

    def measure(self) -> list[Measurement]:
        """Time every composition in `num_repeats` interleaved rounds (so that a burst of load on
        a shared host hits all compositions alike, not a few) and keep each one's median."""
        compositions = list(self.compositions())
        times: dict[str, list[float]] = {label: [] for label, *_ in compositions}
        shapes: dict[str, tuple[int, int]] = {}
        for _ in range(self.sweep.num_repeats):
            for label, num_decodes, prefill_size, spec in compositions:
                step, time_s = self._timed(num_decodes, prefill_size, spec)
                times[label].append(time_s)
                shapes[label] = (step.num_batched_tokens, step.spec_steps)
        return [
            Measurement(label, StepSample(*shapes[label], statistics.median(times[label])))
            for label in times
        ]

    def compositions(self) -> Iterator[tuple[str, int, int, int]]:
        """(label, decodes, prefill chunk size, speculation length) of each step to time."""
        sweep = self.sweep
        for size in sweep.prefill_sizes:
            yield f"prefill P={size}", 0, size, 0
        for batch in sweep.decode_batch_sizes:
            yield f"decode B={batch}", batch, 0, 0
        for batch, size in sweep.mixed:
            yield f"mixed B={batch} P={size}", batch, size, 0
        for spec in (s for s in sweep.spec_lengths if s <= self.max_spec_tokens):
            for batch in sweep.spec_batch_sizes:
                yield f"spec B={batch} s={spec}", batch, 0, spec

    def _timed(self, num_decodes: int, prefill_size: int, spec: int) -> tuple[Step, float]:
        """Time one step with `num_decodes` decodes (each verifying `spec` draft tokens) and, if
        prefill_size > 0, one prefill chunk of that size, after an identical untimed warm-up."""
        decoders = [
            self._add(self.sweep.context_tokens, 2 * (spec + 1) + 1) for _ in range(num_decodes)
        ]
        if decoders:
            self._execute(Step({rid: self.sweep.context_tokens for rid in decoders}))
        for _ in range(2):  # warm-up, then the timed step
            prefill = [self._add(prefill_size, 1)] if prefill_size else []
            step = Step(
                {**{rid: 1 for rid in decoders}, **{rid: prefill_size for rid in prefill}},
                {rid: spec for rid in decoders if spec},
            )
            time_s = self._execute(step)
            for rid in prefill:
                self.engine.abort(rid)
        for rid in decoders:
            self.engine.abort(rid)
        return step, time_s

    def _add(self, num_prompt_tokens: int, max_new_tokens: int) -> str:
        rid = f"profile-{next(self._ids)}"
        self.engine.add_request(EngineRequest(rid, num_prompt_tokens, max_new_tokens))
        return rid

    def _execute(self, step: Step) -> float:
        cpu_start_s = time.process_time()
        report = self.engine.execute(step, 0)
        cpu_s = time.process_time() - cpu_start_s
        if not report.ok:
            raise ValueError(f"profiling step failed: {report.error}")
        return cpu_s if self.timer == "cpu" else report.step_time_s
