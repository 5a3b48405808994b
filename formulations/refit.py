"""Online refit of a performance model from measured steps (docs/PLANNER.md, "Robustness").

`OnlineRefit` keeps a rolling window of an engine's measured steps (bounded memory) and refits,
every `refit_every` steps, a correction of the prior model (the profile or preset the replica
started with) that keeps the prior's max-of-lines shape in (tokens, draft steps):

    T(n, s, c) = a * T_prior(n, s) + k_context * c + d

- `a` scales the prior (a slower or faster engine than profiled), `k_context` is the cost per
  cached context token the step attends over, `d` a fixed offset; the result is again a
  `PerfModel` (every line scaled by a, one context slope, intercepts + d).
- Robust: relative errors (steps span orders of magnitude), iteratively reweighted: two passes
  with Huber weights (a residual beyond `huber_k` robust standard deviations, 1.4826 x the median
  absolute residual, is down-weighted in proportion), then passes with Tukey's bisquare weights
  (residuals beyond `bisquare_c` robust standard deviations get no weight: a step slowed 4x by a
  page fault or a pause does not move the model).
- Anchored: a ridge pull, worth `prior_weight` samples, toward the correction in force before the
  refit (the prior's a = 1, its context slope, d = 0 at first), so that a window of near-identical
  steps (a steady decode cycle) cannot move the directions it does not inform.
- Drift: a two-sided CUSUM on log(measured / predicted) with slack `drift_slack`; when it passes
  `drift_threshold` the engine changed (another job took the GPU, a thermal limit, a new driver):
  the window keeps only the steps since the deviation began, the anchor is rescaled by their
  median measured / predicted ratio (a change of speed is the likeliest drift), and the model is
  refitted on them at once.
- Margin: the planner plans with the fitted model scaled by (1 + margin), the margin being the
  (1 - overrun_target) quantile of measured / fitted over the window, less 1 (clamped to
  [0, max_margin]): planned steps overrun their prediction at about `overrun_target`. The overrun
  rate actually seen (measured > the planning model, before each update) is kept too.

Pure: no clock, no I/O; numpy only. The planner core feeds it (planner_svc/refit.py).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from formulations.perf_model import Line, PerfModel, StepSample, nonneg_lstsq

# Floor of the robust scale of relative residuals (an exact truth gives a MAD of 0).
_MIN_SCALE = 1e-3
# Reweighting passes with (convex) Huber weights before the bisquare ones, which need a good start.
_HUBER_PASSES = 2
# Smallest scale of the prior a refit may produce (a step never becomes free).
_MIN_SCALE_FACTOR = 0.05


@dataclass(frozen=True)
class RefitParams:
    window: int = 512  # steps kept (the memory bound)
    refit_every: int = 16  # steps between refits
    min_samples: int = 24  # steps before the first refit (the prior stands until then)
    huber_k: float = 1.5  # robust standard deviations before a residual is down-weighted
    bisquare_c: float = 4.685  # ... beyond which it gets no weight (after the Huber passes)
    num_reweights: int = 5  # the first two Huber, the others bisquare
    prior_weight: float = 4.0  # the prior's pull on the scale and context slope, in steps' worth
    offset_prior_weight: float = 4.0  # ... on the offset
    # Planned steps may take longer than predicted this often. 0.5 plans with the median: the SLO
    # checks are cumulative, so symmetric step noise cancels, while every point of margin costs
    # capacity steeply near the tightest TPOT (docs/PLANNER.md, "Robustness": measured 0.47 req/s
    # at 0.5, 0.41 at 0.3, 0.28 at 0.2 on the robustness truth).
    overrun_target: float = 0.5
    max_margin: float = 0.5
    drift_slack: float = 0.05  # |log ratio| the CUSUM tolerates per step
    drift_threshold: float = 0.6  # CUSUM level that signals a drift
    min_samples_after_drift: int = 6  # steps a post-drift refit needs

    def __post_init__(self) -> None:
        if self.window < self.min_samples or self.min_samples < 4 or self.refit_every < 1:
            raise ValueError("refit needs window >= min_samples >= 4 and refit_every >= 1")
        if not 0.0 < self.overrun_target < 1.0:
            raise ValueError(f"overrun_target must be in (0, 1), got {self.overrun_target}")
        if self.huber_k <= 0 or self.bisquare_c <= 0 or self.num_reweights < 1:
            raise ValueError("huber_k and bisquare_c must be > 0, num_reweights >= 1")
        if self.prior_weight < 0 or self.max_margin < 0:
            raise ValueError("prior_weight and max_margin must be >= 0")
        if self.drift_slack < 0 or self.drift_threshold <= 0:
            raise ValueError("drift_slack must be >= 0 and drift_threshold > 0")
        if not 4 <= self.min_samples_after_drift <= self.window:
            raise ValueError("min_samples_after_drift must be in [4, window]")


@dataclass(frozen=True)
class Correction:
    """T = scale * T_prior(n, s) + k_context_s * c + offset_s."""

    scale: float = 1.0
    k_context_s: float = 0.0
    offset_s: float = 0.0

    def apply(self, prior: PerfModel, name: str) -> PerfModel:
        lines = tuple(
            Line(
                ln.k_token_s * self.scale,
                ln.k_spec_s * self.scale,
                ln.intercept_s * self.scale + self.offset_s,
                self.k_context_s,
            )
            for ln in prior.lines
        )
        return PerfModel(lines, name)


class OnlineRefit:
    """See the module docstring. `observe` one measured step at a time; `planning_model` is what
    the planner should plan with (it changes only at a refit or a drift: `observe` says so)."""

    def __init__(self, prior: PerfModel, params: RefitParams | None = None) -> None:
        self.params = params or RefitParams()
        self.prior = prior
        # The prior's shape without its context term; its context slope is the anchor's.
        self._shape = PerfModel(
            tuple(Line(ln.k_token_s, ln.k_spec_s, ln.intercept_s) for ln in prior.lines), "shape"
        )
        self._anchor = Correction(1.0, max(ln.k_context_s for ln in prior.lines), 0.0)
        self.correction = self._anchor
        self.model = self._anchor.apply(self._shape, prior.name)
        self.margin = 0.0
        self.planning_model = prior
        window = self.params.window
        self._samples: deque[tuple[float, float, float]] = deque(maxlen=window)  # f0, c, y
        self._overruns: deque[bool] = deque(maxlen=window)
        self._since_refit = 0
        self._cusum_up = self._cusum_down = 0.0
        self._run_length = 0  # steps since the CUSUM last stood at zero
        self.num_samples = 0
        self.num_refits = 0
        self.num_drifts = 0

    # -- derived --------------------------------------------------------------------------------

    @property
    def overrun_rate(self) -> float:
        """Share of the window's steps that took longer than the planning model said."""
        return sum(self._overruns) / len(self._overruns) if self._overruns else 0.0

    @property
    def num_window_samples(self) -> int:
        return len(self._samples)

    # -- updates --------------------------------------------------------------------------------

    def observe(self, sample: StepSample) -> bool:
        """Take one measured step. True when the planning model changed."""
        if not sample.step_time_s > 0 or not math.isfinite(sample.step_time_s):
            return False  # an empty or unmeasured step says nothing about costs
        f0 = self._shape.step_time_s(sample.num_tokens, sample.spec_steps)
        c = float(sample.num_context_tokens)
        y = sample.step_time_s
        planned_s = self.planning_model.step_time_s(
            sample.num_tokens, sample.spec_steps, sample.num_context_tokens
        )
        self._overruns.append(y > planned_s)
        predicted_s = self.model.step_time_s(
            sample.num_tokens, sample.spec_steps, sample.num_context_tokens
        )
        self._samples.append((f0, c, y))
        self.num_samples += 1
        self._since_refit += 1
        if self._drifted(math.log(y / predicted_s) if predicted_s > 0 else math.inf):
            return self._on_drift()
        if len(self._samples) >= self.params.min_samples and (
            self._since_refit >= self.params.refit_every
        ):
            self._refit()
            return True
        return False

    def _drifted(self, log_ratio: float) -> bool:
        p = self.params
        if not math.isfinite(log_ratio):
            return False
        self._cusum_up = max(0.0, self._cusum_up + log_ratio - p.drift_slack)
        self._cusum_down = max(0.0, self._cusum_down - log_ratio - p.drift_slack)
        self._run_length = self._run_length + 1 if self._cusum_up or self._cusum_down else 0
        return max(self._cusum_up, self._cusum_down) > p.drift_threshold

    def _on_drift(self) -> bool:
        """Keep the steps since the deviation began (at least `min_samples_after_drift`) and refit
        on them now."""
        self.num_drifts += 1
        keep = max(self._run_length, self.params.min_samples_after_drift)
        recent = list(self._samples)[-keep:]
        self._samples.clear()
        self._samples.extend(recent)
        data = np.array(recent, dtype=float)
        ratio = float(
            np.median(data[:, 2] / self._predict(self.correction, data[:, 0], data[:, 1]))
        )
        corr = self.correction
        self._anchor = Correction(
            corr.scale * ratio, corr.k_context_s * ratio, corr.offset_s * ratio
        )
        self._overruns.clear()
        self._cusum_up = self._cusum_down = 0.0
        self._run_length = 0
        self._refit()
        return True

    def _refit(self) -> None:
        data = np.array(self._samples, dtype=float)
        self.correction = self._fit(data[:, 0], data[:, 1], data[:, 2])
        self._anchor = self.correction
        self.model = self.correction.apply(self._shape, f"{self.prior.name}~refit")
        ratios = data[:, 2] / self._predict(self.correction, data[:, 0], data[:, 1])
        quantile = float(np.quantile(ratios, 1.0 - self.params.overrun_target))
        self.margin = min(self.params.max_margin, max(0.0, quantile - 1.0))
        self.planning_model = self.model.scaled(1.0 + self.margin, self.model.name)
        self.num_refits += 1
        self._since_refit = 0

    @staticmethod
    def _predict(corr: Correction, f0: np.ndarray, c: np.ndarray) -> np.ndarray:
        return corr.scale * f0 + corr.k_context_s * c + corr.offset_s

    def _fit(self, f0: np.ndarray, c: np.ndarray, y: np.ndarray) -> Correction:
        """Robust relative least squares of (scale, k_context, offset), anchored to the previous
        correction with `prior_weight` pseudo-samples. Residuals are relative to the current fit's
        prediction (the anchor's at first), not to the measurement: a step measured 4x too short
        would otherwise weigh 16x as much as the others."""
        p = self.params
        features = np.column_stack([f0, c, np.ones_like(f0)])
        anchor = np.array([self._anchor.scale, self._anchor.k_context_s, self._anchor.offset_s])
        coef = anchor
        weights = np.ones_like(y)
        for iteration in range(p.num_reweights):
            predicted = np.maximum(features @ coef, 1e-9)
            x, target = features / predicted[:, None], y / predicted
            # A pseudo-row per coefficient, scaled to that column's typical size.
            pull = np.sqrt([p.prior_weight, p.prior_weight, p.offset_prior_weight])
            ridge = np.diag((np.sqrt(np.mean(x**2, axis=0)) + 1e-30) * pull)
            sw = np.sqrt(weights)
            xa = np.vstack([x * sw[:, None], ridge])
            ya = np.concatenate([target * sw, ridge @ anchor])
            coef = nonneg_lstsq(xa, ya)
            residual = np.abs(target - x @ coef)
            scale = max(_MIN_SCALE, 1.4826 * float(np.median(residual)))
            if iteration < _HUBER_PASSES:
                weights = np.minimum(1.0, p.huber_k * scale / np.maximum(residual, 1e-30))
            else:
                weights = np.maximum(0.0, 1.0 - (residual / (p.bisquare_c * scale)) ** 2) ** 2
        scale_factor = max(_MIN_SCALE_FACTOR, float(coef[0]))
        # The empty step keeps a non-negative time: the offset cannot undo the prior's fixed cost.
        floor = -scale_factor * max(ln.intercept_s for ln in self._shape.lines)
        return Correction(scale_factor, float(coef[1]), max(floor, float(coef[2])))
