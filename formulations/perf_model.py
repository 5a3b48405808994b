"""The batch performance model (docs/ALGORITHM.md section 2).

The time of one engine step is a maximum of lines:

    T(num_tokens, s) = max_l ( k_token_l * num_tokens + k_spec_l * s + intercept_l )

`num_tokens` counts every token the step computes (prefill chunk tokens, one per plain decode, and
the s draft tokens each speculating request verifies); `s` is the largest speculation length in the
step. Its inverse is the largest token budget that fits in a time:

    budget(t, s) = min_l floor((t - intercept_l - k_spec_l * s) / k_token_l)

The planner, the simulator and the baselines all share one `PerfModel`, so they cannot disagree
about what a step costs. `TruthModel` is the richer model a simulated engine runs (context-length
term, multiplicative noise) so that the planner can be measured against a model it does not know.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

# A token budget larger than any step will ever hold; returned when no line limits the budget.
UNBOUNDED_TOKENS = 1 << 30


@dataclass(frozen=True, slots=True)
class Line:
    k_token_s: float
    k_spec_s: float
    intercept_s: float

    def time_s(self, num_tokens: int, spec_steps: int) -> float:
        return self.k_token_s * num_tokens + self.k_spec_s * spec_steps + self.intercept_s


@dataclass(frozen=True, slots=True)
class PerfModel:
    """Max-of-lines step time model. Times in seconds."""

    lines: tuple[Line, ...]
    name: str = "custom"

    def __post_init__(self) -> None:
        if not self.lines:
            raise ValueError("a performance model needs at least one line")
        for line in self.lines:
            if line.k_token_s < 0 or line.k_spec_s < 0:
                raise ValueError(f"performance model slopes must be non-negative: {line}")

    def step_time_s(self, num_tokens: int, spec_steps: int = 0) -> float:
        return max(line.time_s(num_tokens, spec_steps) for line in self.lines)

    def prefill_time_s(self, num_prompt_tokens: int) -> float:
        """Zero-load time to prefill a prompt in one step (the TTFT slowdown's denominator)."""
        return self.step_time_s(num_prompt_tokens, 0)

    def max_tokens(self, time_s: float, spec_steps: int = 0) -> int:
        """Largest num_tokens whose step fits in `time_s`; -1 when not even an empty step fits."""
        budget = UNBOUNDED_TOKENS
        for line in self.lines:
            slack_s = time_s - line.intercept_s - line.k_spec_s * spec_steps
            if line.k_token_s == 0.0:
                if slack_s < 0:
                    return -1
                continue
            # A tiny epsilon keeps exact-fit budgets (t == T(n)) from rounding down to n - 1.
            budget = min(budget, math.floor(slack_s / line.k_token_s + 1e-9))
        return max(budget, -1)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "lines": [[ln.k_token_s, ln.k_spec_s, ln.intercept_s] for ln in self.lines],
        }

    @classmethod
    def from_dict(cls, data: dict) -> PerfModel:
        try:
            lines = tuple(Line(float(a), float(b), float(c)) for a, b, c in data["lines"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed performance model {data!r}: {exc}") from None
        return cls(lines=lines, name=str(data.get("name", "custom")))


PERF_MODEL_PRESETS: dict[str, PerfModel] = {
    "opt-6.7b-a100": PerfModel(
        (Line(6.88e-5, 1.25e-6, 0.0248), Line(7.52e-5, 3.46e-3, 0.00303)), "opt-6.7b-a100"
    ),
    "opt-13b-2xa100": PerfModel(
        (Line(7.21e-5, 3.34e-3, 0.0317), Line(0.0, 3.01e-3, 0.0)), "opt-13b-2xa100"
    ),
    "opt-13b-h100": PerfModel((Line(4.18e-5, 0.0, 0.0274),), "opt-13b-h100"),
}

# GPUs each preset occupies (for capacity per GPU).
PERF_MODEL_NUM_GPUS: dict[str, int] = {"opt-6.7b-a100": 1, "opt-13b-2xa100": 2, "opt-13b-h100": 1}


def perf_model_preset(name: str) -> PerfModel:
    try:
        return PERF_MODEL_PRESETS[name]
    except KeyError:
        known = ", ".join(sorted(PERF_MODEL_PRESETS))
        raise ValueError(f"unknown performance model {name!r} (known: {known})") from None


# ---------------------------------------------------------------------------------------------
# Fitting


@dataclass(frozen=True, slots=True)
class StepSample:
    num_tokens: int
    spec_steps: int
    step_time_s: float


@dataclass(frozen=True)
class FitResult:
    model: PerfModel
    r2: float
    under_prediction_fraction: float  # share of samples whose measured time exceeds the model's
    num_samples: int


def fit_perf_model(
    samples: Sequence[StepSample], num_lines: int = 1, name: str = "fitted", num_iters: int = 50
) -> FitResult:
    """Least-squares fit of a max-of-lines model.

    One line is ordinary least squares. For several lines the fit alternates: assign each sample to
    the line that is currently the maximum, then refit each line on its samples (a k-planes style
    fit of a convex piecewise-linear function); started from a split on num_tokens.
    """
    if num_lines < 1:
        raise ValueError("num_lines must be at least 1")
    if len(samples) < 3 * num_lines:
        raise ValueError(f"need at least {3 * num_lines} samples to fit {num_lines} line(s)")
    x = np.array([[s.num_tokens, s.spec_steps, 1.0] for s in samples], dtype=float)
    y = np.array([s.step_time_s for s in samples], dtype=float)

    order = np.argsort(x[:, 0] + x[:, 1] * 1e3, kind="stable")
    groups = np.empty(len(samples), dtype=int)
    for g, chunk in enumerate(np.array_split(order, num_lines)):
        groups[chunk] = g
    coefs = np.zeros((num_lines, 3))
    for _ in range(num_iters):
        for g in range(num_lines):
            mask = groups == g
            if mask.sum() >= 3:
                coefs[g] = _nonneg_lstsq(x[mask], y[mask])
        new_groups = np.argmax(x @ coefs.T, axis=1)
        if np.array_equal(new_groups, groups):
            break
        groups = new_groups

    pred = np.max(x @ coefs.T, axis=1)
    ss_res = float(np.sum((y - pred) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    lines = tuple(Line(float(a), float(b), float(c)) for a, b, c in coefs)
    return FitResult(
        model=PerfModel(lines, name),
        r2=r2,
        under_prediction_fraction=float(np.mean(y > pred)),
        num_samples=len(samples),
    )


def _nonneg_lstsq(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with the two slopes clamped at zero (a step never gets cheaper with work)."""
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    for j in (0, 1):
        if coef[j] < 0:
            keep = [k for k in range(3) if k != j]
            sub, *_ = np.linalg.lstsq(x[:, keep], y, rcond=None)
            coef = np.zeros(3)
            coef[keep] = sub
    return np.maximum(coef, [0.0, 0.0, -np.inf])


# ---------------------------------------------------------------------------------------------
# The simulated engine's truth


@dataclass(frozen=True)
class TruthModel:
    """What a simulated step really costs: the base model plus a term per context token attended
    (the sum over the step's requests of their cached context length) and multiplicative noise.

    With `k_context_s = 0` and `noise_frac = 0` it equals the base model exactly, which is the
    setting in which the planner's guarantee must hold.
    """

    base: PerfModel
    k_context_s: float = 0.0
    noise_frac: float = 0.0
    seed: int = 0
    _rng: np.random.Generator = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.k_context_s < 0 or not 0 <= self.noise_frac < 1:
            raise ValueError("k_context_s must be >= 0 and noise_frac in [0, 1)")
        object.__setattr__(self, "_rng", np.random.default_rng(self.seed))

    def step_time_s(
        self, num_tokens: int, spec_steps: int = 0, num_context_tokens: int = 0
    ) -> float:
        time_s = (
            self.base.step_time_s(num_tokens, spec_steps) + self.k_context_s * num_context_tokens
        )
        if self.noise_frac > 0:
            time_s *= 1.0 + self.noise_frac * float(self._rng.uniform(-1.0, 1.0))
        return time_s

    @property
    def is_exact(self) -> bool:
        return self.k_context_s == 0.0 and self.noise_frac == 0.0
