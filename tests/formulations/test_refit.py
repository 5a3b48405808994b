"""The online refit: recovers a known correction from noisy steps, down-weights outliers, converges
after a step change (drift), tunes its margin to the overrun target, stays bounded."""

import numpy as np
import pytest

from formulations.perf_model import Line, PerfModel, StepSample, TruthModel
from formulations.refit import OnlineRefit, RefitParams

PRIOR = PerfModel((Line(7e-5, 3e-3, 0.03), Line(0.0, 3e-3, 0.0)), "prior")


def steps(truth: TruthModel, count: int, seed: int) -> list[StepSample]:
    """Steps of varied shape: 1..600 tokens, 0..2 draft steps, 0..60k context tokens."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        n, s = int(rng.integers(1, 600)), int(rng.integers(0, 3))
        c = int(rng.integers(0, 60_000))
        out.append(StepSample(n, s, truth.step_time_s(n, s, c), c))
    return out


def relative_error(model: PerfModel, truth: PerfModel, samples: list[StepSample]) -> float:
    errors = [
        abs(model.step_time_s(x.num_tokens, x.spec_steps, x.num_context_tokens))
        / truth.step_time_s(x.num_tokens, x.spec_steps, x.num_context_tokens)
        - 1
        for x in samples
    ]
    return float(np.max(np.abs(errors)))


def test_recovers_a_known_correction_from_noisy_steps():
    true_model = PerfModel(
        (Line(1.2 * 7e-5, 1.2 * 3e-3, 1.2 * 0.03 + 0.002, 3e-7), Line(0.0, 3.6e-3, 0.002, 3e-7))
    )
    truth = TruthModel(true_model, noise_frac=0.05, seed=1)
    params = RefitParams(window=400, refit_every=400, min_samples=24, drift_threshold=1e9)
    refit = OnlineRefit(PRIOR, params)
    for sample in steps(truth, 400, seed=2):
        refit.observe(sample)
    assert refit.num_refits == 1
    assert refit.correction.scale == pytest.approx(1.2, rel=0.05)
    assert refit.correction.k_context_s == pytest.approx(3e-7, rel=0.05)
    assert refit.correction.offset_s == pytest.approx(0.002, abs=0.0015)
    assert relative_error(refit.model, true_model, steps(TruthModel(true_model), 50, 3)) < 0.03


def test_outliers_are_down_weighted():
    truth = TruthModel(PRIOR, k_context_s=2e-7, noise_frac=0.02, seed=4)
    clean = steps(truth, 300, seed=5)
    rng = np.random.default_rng(6)
    # One step in ten is mis-timed: 4x too long (a page fault, a GC pause) or 4x too short.
    factors = rng.choice([0.25, 4.0], size=len(clean)) * (rng.uniform(size=len(clean)) < 0.1)
    spoiled = [
        StepSample(x.num_tokens, x.spec_steps, x.step_time_s * (f or 1.0), x.num_context_tokens)
        for x, f in zip(clean, factors)
    ]
    params = RefitParams(window=300, refit_every=300, drift_threshold=1e9)
    robust = OnlineRefit(PRIOR, params)
    plain = OnlineRefit(
        PRIOR,
        RefitParams(window=300, refit_every=300, drift_threshold=1e9, huber_k=1e9, bisquare_c=1e9),
    )
    for sample in spoiled:
        robust.observe(sample)
        plain.observe(sample)
    exact = PerfModel(
        tuple(Line(ln.k_token_s, ln.k_spec_s, ln.intercept_s, 2e-7) for ln in PRIOR.lines)
    )
    probe = steps(TruthModel(exact), 50, seed=7)
    assert relative_error(robust.model, exact, probe) < 0.05
    assert relative_error(plain.model, exact, probe) > 0.2  # least squares follows the outliers


def test_prior_stands_until_enough_steps():
    refit = OnlineRefit(PRIOR, RefitParams(min_samples=24, drift_threshold=1e9))
    truth = TruthModel(PRIOR.scaled(1.3), seed=8)
    changed = [refit.observe(x) for x in steps(truth, 23, seed=9)]
    assert not any(changed) and refit.planning_model == PRIOR
    assert refit.observe(steps(truth, 1, seed=10)[0])
    assert refit.planning_model != PRIOR


def test_refit_converges_after_a_step_change_and_logs_a_drift():
    before = PerfModel(
        tuple(Line(ln.k_token_s, ln.k_spec_s, ln.intercept_s, 1e-7) for ln in PRIOR.lines)
    )
    after = before.scaled(1.6)
    refit = OnlineRefit(PRIOR, RefitParams(window=256, refit_every=16, overrun_target=0.5))
    for sample in steps(TruthModel(before, noise_frac=0.05, seed=11), 300, seed=12):
        refit.observe(sample)
    drifts_before = refit.num_drifts
    probe = steps(TruthModel(after), 50, seed=13)
    assert relative_error(refit.model, after, probe) > 0.3
    for sample in steps(TruthModel(after, noise_frac=0.05, seed=14), 40, seed=15):
        refit.observe(sample)
    assert refit.num_drifts > drifts_before  # the CUSUM saw the change
    assert relative_error(refit.model, after, probe) < 0.06  # within 40 steps of it


def test_margin_keeps_the_overrun_rate_near_its_target():
    for target in (0.1, 0.3):
        refit = OnlineRefit(PRIOR, RefitParams(window=400, overrun_target=target))
        truth = TruthModel(PRIOR, k_context_s=1e-7, noise_frac=0.1, seed=16)
        for sample in steps(truth, 2000, seed=17):
            refit.observe(sample)
        # uniform noise +-10%: the (1 - target) quantile of the ratio is 1 + 0.1 (1 - 2 target)
        assert refit.margin == pytest.approx(0.1 * (1 - 2 * target), abs=0.02)
        assert refit.overrun_rate == pytest.approx(target, abs=0.06)
        assert refit.num_window_samples <= 400  # bounded memory


def test_bad_params_and_bad_samples():
    with pytest.raises(ValueError):
        RefitParams(overrun_target=1.0)
    with pytest.raises(ValueError):
        RefitParams(window=10, min_samples=24)
    refit = OnlineRefit(PRIOR)
    assert not refit.observe(StepSample(10, 0, 0.0, 0))  # unmeasured step: ignored
    assert refit.num_samples == 0
