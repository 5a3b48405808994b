"""Arrival processes: Poisson, bursty, and a trace's own timestamps rescaled to a target rate.

Every process returns `num_items` non-decreasing arrival times in seconds, starting near 0, whose
long-run mean rate is `rate_rps`. Randomness comes only from the `numpy.random.Generator` passed in,
so a workload is reproducible from its seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

ARRIVAL_PROCESSES = ("trace", "poisson", "bursty")


@dataclass(frozen=True)
class BurstParams:
    """Bursts of a geometric number of simultaneous requests at Poisson times.

    A burst holds k >= 1 requests with P(k) = (1 - q)^(k - 1) q, q = 1 / mean_burst_size, so its
    mean size is `mean_burst_size`; bursts arrive at rate `rate_rps / mean_burst_size`, which keeps
    the
    mean request rate at `rate_rps`.
    """

    mean_burst_size: float = 4.0

    def __post_init__(self) -> None:
        if not self.mean_burst_size >= 1.0:
            raise ValueError(f"mean_burst_size must be at least 1, got {self.mean_burst_size!r}")


def _check(rate_rps: float, num_items: int) -> None:
    if not rate_rps > 0 or not np.isfinite(rate_rps):
        raise ValueError(f"the arrival rate must be a positive number of req/s, got {rate_rps!r}")
    if num_items < 0:
        raise ValueError(f"the number of requests must be non-negative, got {num_items}")


def poisson_arrivals(rate_rps: float, num_items: int, rng: np.random.Generator) -> np.ndarray:
    """Poisson process: exponential gaps of mean 1 / rate_rps; the first request arrives at 0."""
    _check(rate_rps, num_items)
    if num_items == 0:
        return np.zeros(0)
    gaps_s = rng.exponential(1.0 / rate_rps, size=num_items - 1)
    return np.concatenate(([0.0], np.cumsum(gaps_s)))


def bursty_arrivals(
    rate_rps: float, num_items: int, rng: np.random.Generator, params: BurstParams = BurstParams()
) -> np.ndarray:
    """Bursts (all members arrive at the same instant) at Poisson times of rate rate / mean size."""
    _check(rate_rps, num_items)
    burst_rate_rps = rate_rps / params.mean_burst_size
    arrivals_s: list[float] = []
    now_s = 0.0
    while len(arrivals_s) < num_items:
        size = int(rng.geometric(1.0 / params.mean_burst_size))
        arrivals_s.extend([now_s] * size)
        now_s += float(rng.exponential(1.0 / burst_rate_rps))
    return np.asarray(arrivals_s[:num_items])


def rescale_timestamps(timestamps_s: Sequence[float], rate_rps: float) -> np.ndarray:
    """Shift a trace's timestamps to start at 0 and stretch them to a mean rate of `rate_rps`.

    The trace's own rate is (n - 1) / (t_last - t_first); every gap is multiplied by
    own_rate / rate_rps, which keeps the trace's burst structure and changes only its speed.
    """
    times_s = np.asarray(timestamps_s, dtype=float)
    _check(rate_rps, len(times_s))
    if len(times_s) == 0:
        return times_s
    if np.any(np.diff(times_s) < 0):
        raise ValueError("trace timestamps must be non-decreasing")
    span_s = float(times_s[-1] - times_s[0])
    shifted_s = times_s - times_s[0]
    if len(times_s) < 2 or span_s == 0.0:
        return shifted_s
    own_rate_rps = (len(times_s) - 1) / span_s
    return shifted_s * (own_rate_rps / rate_rps)


def make_arrivals(
    process: str,
    rate_rps: float,
    num_items: int,
    rng: np.random.Generator,
    *,
    timestamps_s: Sequence[float] | None = None,
    burst: BurstParams = BurstParams(),
) -> np.ndarray:
    """Arrival times by process name; "trace" needs the trace's `timestamps_s`."""
    if process == "poisson":
        return poisson_arrivals(rate_rps, num_items, rng)
    if process == "bursty":
        return bursty_arrivals(rate_rps, num_items, rng, burst)
    if process == "trace":
        if timestamps_s is None:
            raise ValueError("this workload has no timestamps: use poisson or bursty arrivals")
        return rescale_timestamps(list(timestamps_s)[:num_items], rate_rps)
    raise ValueError(f"unknown arrival process {process!r} (known: {', '.join(ARRIVAL_PROCESSES)})")
