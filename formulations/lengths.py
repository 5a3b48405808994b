"""What the planner may know of a request's output length, and how it predicts the rest.

A real server does not know when a request will stop: it knows the client's cap (`max_tokens`,
the planner's `Request.num_output_tokens`), how many tokens the request has produced, and what
earlier requests of its class did. `LengthPredictor` answers "how many more output tokens?" from
exactly that: the class, the prompt length and the tokens generated so far, as an expected value and
a quantile, conditioned on survival (a request that has produced g tokens is longer than g, so
among past requests only those longer than g say anything about it: the estimate of the rest grows
as a request outlives it, for heavy-tailed classes such as reasoning).

- `OnlineLengthPredictor`: per class (and, once a bucket has enough samples, per prompt-length
  bucket), the last `max_samples` observed lengths kept sorted (bounded memory), started from a
  cold-start prior of pseudo-samples (a log-normal given by its median and 90th percentile) that
  real samples replace. A client hint (`expected_output_tokens`) sets the expected total when
  given; the quantile keeps the class's spread around it.
- `CapLengths`: no knowledge beyond the cap (every request may run to `max_tokens`): the planner's
  `max_tokens` ablation, and the oracle mode, where the simulator hands the planner the true length
  as the cap.

Thinking lengths (reasoning requests) are predicted the same way, as a second kind of length.
"""

from __future__ import annotations

import bisect
import math
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass
from statistics import NormalDist

LENGTH_MODES = ("predicted", "oracle", "max_tokens")
NUM_ATOMS = 4  # values describing a length distribution (LengthEstimate.atoms)
OUTPUT, THINKING = "output", "thinking"


@dataclass(frozen=True, slots=True)
class LengthEstimate:
    """Tokens still to come: expected value and a (conservative) quantile, each >= 1, and the
    distribution as `NUM_ATOMS` equally likely values (the quantiles (i + 1/2) / NUM_ATOMS; empty
    when unknown)."""

    expected: int
    quantile: int
    atoms: tuple[int, ...] = ()

    def shifted(self, num_tokens: int) -> LengthEstimate:
        """The same belief counted from `num_tokens` earlier (remaining -> total)."""
        return LengthEstimate(
            self.expected + num_tokens,
            self.quantile + num_tokens,
            tuple(a + num_tokens for a in self.atoms),
        )


@dataclass(frozen=True, slots=True)
class LengthPrior:
    """A cold-start belief about a class's lengths: a log-normal with this median and 90th
    percentile, worth `weight` observations."""

    median: float = 256.0
    p90: float = 1024.0
    weight: int = 20

    def __post_init__(self) -> None:
        if not 1 <= self.median <= self.p90 or self.weight < 1:
            raise ValueError("a length prior needs 1 <= median <= p90 and weight >= 1")

    def pseudo_samples(self) -> list[int]:
        """`weight` lengths at evenly spaced quantiles of the log-normal."""
        sigma = max(1e-6, math.log(self.p90 / self.median) / _Z90)
        return sorted(
            max(1, round(self.median * math.exp(sigma * _NORMAL.inv_cdf((i + 0.5) / self.weight))))
            for i in range(self.weight)
        )


class LengthPredictor(ABC):
    """Remaining tokens of a request (see the module docstring). Implementations keep bounded
    memory and never see a request's true length before it has finished."""

    quantile: float = 0.9

    @abstractmethod
    def remaining(
        self,
        slo_class: str,
        num_prompt_tokens: int,
        num_generated: int,
        kind: str = OUTPUT,
        hint: int | None = None,
    ) -> LengthEstimate:
        """Tokens still to come for a request of `slo_class` that has produced `num_generated`
        (`kind` THINKING: of its thinking); `hint`: the client's expected total, if any."""

    @abstractmethod
    def observe(
        self, slo_class: str, num_prompt_tokens: int, length: int, kind: str = OUTPUT
    ) -> None:
        """A request of `slo_class` ended with `length` tokens of this kind."""


class CapLengths(LengthPredictor):
    """Knows nothing: the rest may be as long as the cap, which the caller applies."""

    def remaining(self, slo_class, num_prompt_tokens, num_generated, kind=OUTPUT, hint=None):
        return LengthEstimate(_UNBOUNDED, _UNBOUNDED)

    def observe(self, slo_class, num_prompt_tokens, length, kind=OUTPUT) -> None:
        pass


class _Samples:
    """The last `max_samples` lengths of one (class, kind, bucket), kept sorted, started from a
    prior's pseudo-samples that real samples replace one by one."""

    __slots__ = ("_suffix_sums", "max_samples", "num_real", "order", "pseudo", "sorted")

    def __init__(self, prior: LengthPrior, max_samples: int) -> None:
        self.max_samples = max_samples
        pseudo = prior.pseudo_samples()
        # Replaced in a low-discrepancy order, so that what is left keeps the prior's shape.
        order = sorted(range(len(pseudo)), key=lambda i: (i * _GOLDEN) % 1.0)
        self.pseudo = deque(pseudo[i] for i in order)
        self.order: deque[int] = deque()  # real samples, oldest first
        self.sorted = sorted(self.pseudo)
        self.num_real = 0
        self._suffix_sums: list[int] | None = None  # sum of sorted[i:], rebuilt after a change

    def add(self, length: int) -> None:
        if self.pseudo:
            self._remove(self.pseudo.popleft())
        elif len(self.order) >= self.max_samples:
            self._remove(self.order.popleft())
        self.order.append(length)
        bisect.insort(self.sorted, length)
        self.num_real += 1
        self._suffix_sums = None

    def _remove(self, length: int) -> None:
        del self.sorted[bisect.bisect_left(self.sorted, length)]

    def beyond(self, num_generated: int) -> tuple[int, int, int]:
        """Survival conditioning: (how many samples are longer than `num_generated`, their sum,
        and the index in `sorted` of the first of them)."""
        if self._suffix_sums is None:
            sums = [0] * (len(self.sorted) + 1)
            for i in range(len(self.sorted) - 1, -1, -1):
                sums[i] = sums[i + 1] + self.sorted[i]
            self._suffix_sums = sums
        first = bisect.bisect_right(self.sorted, num_generated)
        return len(self.sorted) - first, self._suffix_sums[first], first


class OnlineLengthPredictor(LengthPredictor):
    """Empirical, survival-conditioned lengths per class (module docstring).

    `priors`: per class and kind (`"chatbot"` or `"reasoning/thinking"`), else `default_prior`.
    When no sample is longer than the tokens already produced (the request outlived everything
    seen), the rest is expected to be `tail_ratio` times what it produced so far, and the quantile
    twice that (a heavy tail's mean residual life grows with age)."""

    def __init__(
        self,
        priors: dict[str, LengthPrior] | None = None,
        default_prior: LengthPrior | None = None,
        quantile: float = 0.9,
        max_samples: int = 2000,
        min_bucket_samples: int = 100,
        tail_ratio: float = 0.5,
    ) -> None:
        if not 0.5 <= quantile < 1 or max_samples < 10 or tail_ratio <= 0:
            raise ValueError("need 0.5 <= quantile < 1, max_samples >= 10, tail_ratio > 0")
        self.priors = dict(priors or {})
        self.default_prior = default_prior or LengthPrior()
        self.quantile = quantile
        self.max_samples = max_samples
        self.min_bucket_samples = min_bucket_samples
        self.tail_ratio = tail_ratio
        self._samples: dict[tuple[str, str, int], _Samples] = {}

    def _get(self, slo_class: str, kind: str, bucket: int) -> _Samples:
        key = (slo_class, kind, bucket)
        samples = self._samples.get(key)
        if samples is None:
            name = slo_class if kind == OUTPUT else f"{slo_class}/{kind}"
            prior = self.priors.get(name, self.default_prior)
            samples = self._samples[key] = _Samples(prior, self.max_samples)
        return samples

    def observe(self, slo_class, num_prompt_tokens, length, kind=OUTPUT) -> None:
        if length < 1:
            return
        self._get(slo_class, kind, -1).add(length)  # the whole class
        self._get(slo_class, kind, _bucket(num_prompt_tokens)).add(length)

    def remaining(self, slo_class, num_prompt_tokens, num_generated, kind=OUTPUT, hint=None):
        samples = self._get(slo_class, kind, _bucket(num_prompt_tokens))
        if samples.num_real < self.min_bucket_samples:
            samples = self._get(slo_class, kind, -1)
        num_longer, total, first = samples.beyond(num_generated)
        if num_longer:
            expected = total / num_longer - num_generated

            def at(q: float) -> float:
                index = first + max(0, math.ceil(q * num_longer) - 1)
                return samples.sorted[index] - num_generated

        else:  # outlived every sample seen: a heavy tail's residual life grows with age
            expected = self.tail_ratio * max(1, num_generated)

            def at(q: float) -> float:  # exponential of that mean; its 90th percentile ~ 2.3 x
                return expected * min(2.0, -math.log(1.0 - q))

        quantile = at(self.quantile)
        atoms = [at((i + 0.5) / NUM_ATOMS) for i in range(NUM_ATOMS)]
        if hint is not None and hint > num_generated:  # the class's relative spread around it
            scale = (hint - num_generated) / max(expected, 1e-9)
            expected = hint - num_generated
            quantile = max(expected, quantile * scale)
            atoms = [a * scale for a in atoms]
        expected = max(1, round(expected))
        return LengthEstimate(
            expected,
            max(expected, math.ceil(quantile)),
            tuple(max(1, round(a)) for a in atoms),
        )


def make_predictor(mode: str, **params) -> LengthPredictor:
    """The predictor of a length mode: `predicted` learns online; `oracle` and `max_tokens` plan
    with the cap alone (in the oracle mode the cap is the true length)."""
    if mode not in LENGTH_MODES:
        raise ValueError(f"lengths must be one of {', '.join(LENGTH_MODES)}, got {mode!r}")
    return OnlineLengthPredictor(**params) if mode == "predicted" else CapLengths()


def _bucket(num_prompt_tokens: int) -> int:
    """Prompt-length bucket: powers of two (1, 2-3, 4-7, ...)."""
    return max(0, num_prompt_tokens).bit_length()


_UNBOUNDED = 1 << 40
_GOLDEN = 0.6180339887498949
_NORMAL = NormalDist()
_Z90 = _NORMAL.inv_cdf(0.9)
