"""The batch performance model (docs/ALGORITHM.md section 2).

The time of one engine step is a maximum of lines:

    T(n, s, c) = max_l ( k_token_l * n + k_spec_l * s + k_context_l * c + intercept_l )

`n` counts every token the step computes (prefill chunk tokens, one per plain decode, and the s
draft tokens each speculating request verifies); `s` is the largest speculation length in the
step; `c` is the context the step attends over: the sum, over the step's requests, of the tokens
already in their KV cache when it starts (a decode reads its whole cached context; a prefill chunk
reads the chunks before it). Its inverse is the largest token budget that fits in a time:

    budget(t, s, c) = min_l floor((t - intercept_l - k_spec_l * s - k_context_l * c) / k_token_l)

`c` defaults to 0 everywhere, and a model without a context term (k_context = 0, the published
presets) is exactly the older (n, s) model: `step_time_s(n, s)` and `max_tokens(t, s)` keep their
meaning.

The planner, the simulator and the baselines all share one `PerfModel`, so they cannot disagree
about what a step costs. `TruthModel` is the richer model a simulated engine runs (an extra
context-length term, multiplicative noise) so that the planner can be measured against a model it
does not know. `fit_perf_model` fits a model to profiled steps (formulations/refit.py refits one
online from engine reports).
"""

from __future__ import annotations

import itertools
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
    k_context_s: float = 0.0  # seconds per cached context token the step attends over

    def time_s(self, num_tokens: int, spec_steps: int, num_context_tokens: int = 0) -> float:
        return (
            self.k_token_s * num_tokens
            + self.k_spec_s * spec_steps
            + self.k_context_s * num_context_tokens
            + self.intercept_s
        )

    def scaled(self, factor: float) -> Line:
        return Line(
            self.k_token_s * factor,
            self.k_spec_s * factor,
            self.intercept_s * factor,
            self.k_context_s * factor,
        )

    def to_list(self) -> list[float]:
        """[k_token_s, k_spec_s, intercept_s] (+ k_context_s when it is not 0)."""
        coefs = [self.k_token_s, self.k_spec_s, self.intercept_s]
        return coefs + [self.k_context_s] if self.k_context_s else coefs


@dataclass(frozen=True, slots=True)
class PerfModel:
    """Max-of-lines step time model. Times in seconds."""

    lines: tuple[Line, ...]
    name: str = "custom"

    def __post_init__(self) -> None:
        if not self.lines:
            raise ValueError("a performance model needs at least one line")
        for line in self.lines:
            if line.k_token_s < 0 or line.k_spec_s < 0 or line.k_context_s < 0:
                raise ValueError(f"performance model slopes must be non-negative: {line}")

    @property
    def has_context_term(self) -> bool:
        return any(line.k_context_s for line in self.lines)

    def step_time_s(
        self, num_tokens: int, spec_steps: int = 0, num_context_tokens: int = 0
    ) -> float:
        return max(line.time_s(num_tokens, spec_steps, num_context_tokens) for line in self.lines)

    def prefill_time_s(self, num_prompt_tokens: int) -> float:
        """Zero-load time to prefill a prompt in one step (the TTFT slowdown's denominator)."""
        return self.step_time_s(num_prompt_tokens, 0)

    def max_tokens(self, time_s: float, spec_steps: int = 0, num_context_tokens: int = 0) -> int:
        """Largest num_tokens whose step fits in `time_s`; -1 when not even an empty step fits."""
        budget = UNBOUNDED_TOKENS
        for line in self.lines:
            slack_s = (
                time_s
                - line.intercept_s
                - line.k_spec_s * spec_steps
                - line.k_context_s * num_context_tokens
            )
            if line.k_token_s == 0.0:
                if slack_s < 0:
                    return -1
                continue
            # A tiny epsilon keeps exact-fit budgets (t == T(n)) from rounding down to n - 1.
            budget = min(budget, math.floor(slack_s / line.k_token_s + 1e-9))
        return max(budget, -1)

    def scaled(self, factor: float, name: str | None = None) -> PerfModel:
        """Every step `factor` times longer (a safety margin: formulations/refit.py)."""
        if not factor > 0:
            raise ValueError(f"a performance model scale must be positive, got {factor}")
        return PerfModel(tuple(ln.scaled(factor) for ln in self.lines), name or self.name)

    def to_dict(self) -> dict:
        return {"name": self.name, "lines": [ln.to_list() for ln in self.lines]}

    @classmethod
    def from_dict(cls, data: dict) -> PerfModel:
        """Lines of 3 numbers (k_token_s, k_spec_s, intercept_s) or 4 (+ k_context_s)."""
        try:
            rows = [[float(x) for x in row] for row in data["lines"]]
            if any(len(row) not in (3, 4) for row in rows):
                raise ValueError("each line needs 3 or 4 numbers")
            lines = tuple(Line(*row) for row in rows)
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
    num_context_tokens: int = 0


@dataclass(frozen=True)
class FitResult:
    model: PerfModel
    r2: float
    under_prediction_fraction: float  # share of samples whose measured time exceeds the model's
    num_samples: int


def design_matrix(samples: Sequence[StepSample]) -> np.ndarray:
    """Rows [num_tokens, spec_steps, num_context_tokens, 1] (the order of `Line`'s slopes)."""
    return np.array(
        [[s.num_tokens, s.spec_steps, s.num_context_tokens, 1.0] for s in samples], dtype=float
    )


def fit_perf_model(
    samples: Sequence[StepSample],
    num_lines: int = 1,
    name: str = "fitted",
    num_iters: int = 50,
    relative: bool = False,
) -> FitResult:
    """Least-squares fit of a max-of-lines model, with a context term when the samples carry
    context (a column of zeros otherwise, fitted as 0).

    One line is least squares with non-negative slopes. For several lines the fit alternates:
    assign each sample to the line that is currently the maximum, then refit each line on its
    samples (a k-planes style fit of a convex piecewise-linear function); started from a split on
    num_tokens. `relative`: minimise squared *relative* errors (each sample weighted 1 / time^2),
    what the median relative error rewards when step times span orders of magnitude.
    """
    if num_lines < 1:
        raise ValueError("num_lines must be at least 1")
    if len(samples) < 3 * num_lines:
        raise ValueError(f"need at least {3 * num_lines} samples to fit {num_lines} line(s)")
    x = design_matrix(samples)
    y = np.array([s.step_time_s for s in samples], dtype=float)
    weights = 1.0 / np.maximum(y, 1e-12) ** 2 if relative else np.ones_like(y)

    order = np.argsort(x[:, 0] + x[:, 1] * 1e3, kind="stable")
    groups = np.empty(len(samples), dtype=int)
    for g, chunk in enumerate(np.array_split(order, num_lines)):
        groups[chunk] = g
    coefs = np.zeros((num_lines, x.shape[1]))
    for _ in range(num_iters):
        for g in range(num_lines):
            mask = groups == g
            if mask.sum() >= 3:
                coefs[g] = nonneg_lstsq(x[mask], y[mask], weights[mask])
        new_groups = np.argmax(x @ coefs.T, axis=1)
        if np.array_equal(new_groups, groups):
            break
        groups = new_groups

    pred = np.max(x @ coefs.T, axis=1)
    ss_res = float(np.sum((y - pred) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    lines = tuple(Line(float(a), float(b), float(d), float(c)) for a, b, c, d in coefs)
    return FitResult(
        model=PerfModel(lines, name),
        r2=r2,
        under_prediction_fraction=float(np.mean(y > pred)),
        num_samples=len(samples),
    )


def nonneg_lstsq(x: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Weighted least squares with the slopes (all columns but the last, the intercept) clamped
    at zero: a step never gets cheaper with more work. Exact for these few columns: every subset
    of slopes is tried free (the others at zero) and the best feasible solution kept."""
    w = np.sqrt(weights) if weights is not None else np.ones(len(y))
    xw, yw = x * w[:, None], y * w
    num_slopes = x.shape[1] - 1
    best, best_residual = np.zeros(x.shape[1]), math.inf
    for size in range(num_slopes, -1, -1):
        for free in itertools.combinations(range(num_slopes), size):
            keep = [*free, num_slopes]
            sub, *_ = np.linalg.lstsq(xw[:, keep], yw, rcond=None)
            if np.any(sub[:-1] < 0):
                continue
            residual = float(np.sum((xw[:, keep] @ sub - yw) ** 2))
            if residual < best_residual - 1e-18:
                best = np.zeros(x.shape[1])
                best[keep] = sub
                best_residual = residual
    return best


# ---------------------------------------------------------------------------------------------
# The simulated engine's truth


@dataclass(frozen=True)
class TruthModel:
    """What a simulated step really costs: the base model (which may have its own context term)
    plus `k_context_s` per context token attended (the sum over the step's requests of their cached
    context length) and multiplicative noise, uniform in [1 - noise_frac, 1 + noise_frac].

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
            self.base.step_time_s(num_tokens, spec_steps, num_context_tokens)
            + self.k_context_s * num_context_tokens
        )
        if self.noise_frac > 0:
            time_s *= 1.0 + self.noise_frac * float(self._rng.uniform(-1.0, 1.0))
        return time_s

    @property
    def is_exact(self) -> bool:
        """Equal to a context-free base model: identical steps take identical times."""
        return self.k_context_s == 0.0 and self.noise_frac == 0.0 and not self.base.has_context_term
