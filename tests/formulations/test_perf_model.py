"""The max-of-lines performance model, its inverse and the least-squares fit."""

import numpy as np
import pytest

from formulations.perf_model import (
    PERF_MODEL_PRESETS,
    Line,
    PerfModel,
    StepSample,
    TruthModel,
    fit_perf_model,
    perf_model_preset,
)


def test_published_presets_evaluate_as_written():
    m = perf_model_preset("opt-13b-2xa100")
    # max(7.21e-5*tok + 3.34e-3*s + 0.0317, 3.01e-3*s)
    assert m.step_time_s(1000, 0) == pytest.approx(7.21e-5 * 1000 + 0.0317)
    assert m.step_time_s(0, 4) == pytest.approx(max(3.34e-3 * 4 + 0.0317, 3.01e-3 * 4))
    h100 = perf_model_preset("opt-13b-h100")
    assert h100.step_time_s(512) == pytest.approx(4.18e-5 * 512 + 0.0274)
    assert set(PERF_MODEL_PRESETS) == {"opt-6.7b-a100", "opt-13b-2xa100", "opt-13b-h100"}


@pytest.mark.parametrize("name", sorted(PERF_MODEL_PRESETS))
@pytest.mark.parametrize("spec", [0, 1, 4])
def test_budget_is_the_inverse_of_step_time(name, spec):
    m = PERF_MODEL_PRESETS[name]
    for time_s in (0.02, 0.05, 0.1, 0.3):
        budget = m.max_tokens(time_s, spec)
        if budget < 0:
            assert m.step_time_s(0, spec) > time_s
            continue
        assert m.step_time_s(budget, spec) <= time_s + 1e-12
        assert m.step_time_s(budget + 1, spec) > time_s


def test_budget_exact_fit_does_not_round_down():
    m = PerfModel((Line(1e-3, 0.0, 0.010),))
    assert m.max_tokens(m.step_time_s(40)) == 40
    assert m.max_tokens(0.005) == -1


def test_fit_recovers_known_single_line():
    rng = np.random.default_rng(0)
    samples = [
        StepSample(n, s, 5e-5 * n + 2e-3 * s + 0.02)
        for n, s in zip(rng.integers(1, 4000, 200), rng.integers(0, 5, 200))
    ]
    fit = fit_perf_model(samples)
    (line,) = fit.model.lines
    assert line.k_token_s == pytest.approx(5e-5, rel=1e-6)
    assert line.k_spec_s == pytest.approx(2e-3, rel=1e-6)
    assert line.intercept_s == pytest.approx(0.02, rel=1e-6)
    assert fit.r2 == pytest.approx(1.0)


def test_fit_recovers_two_lines_and_reports_quality():
    truth = PerfModel((Line(1e-5, 0.0, 0.03), Line(8e-5, 0.0, -0.05)))
    rng = np.random.default_rng(1)
    tokens = rng.integers(1, 6000, 400)
    samples = [
        StepSample(int(n), 0, truth.step_time_s(int(n)) * rng.uniform(0.97, 1.03)) for n in tokens
    ]
    fit = fit_perf_model(samples, num_lines=2)
    assert fit.r2 > 0.98
    assert 0.2 < fit.under_prediction_fraction < 0.8
    pred = np.array([fit.model.step_time_s(int(n)) for n in tokens])
    true = np.array([truth.step_time_s(int(n)) for n in tokens])
    assert np.median(np.abs(pred - true) / true) < 0.03


def test_fit_rejects_too_few_samples():
    with pytest.raises(ValueError):
        fit_perf_model([StepSample(1, 0, 0.1)])


def test_truth_model_exact_noise_and_context_term():
    base = perf_model_preset("opt-13b-h100")
    assert TruthModel(base).step_time_s(100) == base.step_time_s(100)
    assert TruthModel(base).is_exact
    with_ctx = TruthModel(base, k_context_s=1e-7)
    assert with_ctx.step_time_s(100, 0, 10_000) == pytest.approx(base.step_time_s(100) + 1e-3)
    noisy = [TruthModel(base, noise_frac=0.1, seed=3).step_time_s(100) for _ in range(2)]
    assert noisy[0] == noisy[1]  # same seed, same first draw
    draws = TruthModel(base, noise_frac=0.1, seed=4)
    times = [draws.step_time_s(100) for _ in range(200)]
    assert min(times) >= 0.9 * base.step_time_s(100) and max(times) <= 1.1 * base.step_time_s(100)
    assert len(set(times)) > 100


def test_perf_model_round_trips_through_dict_and_rejects_garbage():
    m = perf_model_preset("opt-6.7b-a100")
    assert PerfModel.from_dict(m.to_dict()) == m
    with pytest.raises(ValueError):
        PerfModel.from_dict({"lines": [[1, 2]]})
    with pytest.raises(ValueError):
        PerfModel((Line(-1.0, 0.0, 0.0),))


CONTEXT_MODEL = PerfModel((Line(5e-5, 2e-3, 0.02, 3e-7), Line(1e-5, 0.0, 0.05, 1e-7)), "ctx")


def test_context_term_defaults_to_zero_and_adds_per_context_token():
    m = CONTEXT_MODEL
    assert m.has_context_term and not perf_model_preset("opt-13b-h100").has_context_term
    assert m.step_time_s(100) == m.step_time_s(100, 0, 0)
    assert m.step_time_s(100, 1, 10_000) == pytest.approx(
        max(5e-5 * 100 + 2e-3 + 3e-7 * 10_000 + 0.02, 1e-5 * 100 + 1e-7 * 10_000 + 0.05)
    )


@pytest.mark.parametrize("context", [0, 1_000, 50_000])
@pytest.mark.parametrize("spec", [0, 2])
def test_budget_is_the_inverse_of_step_time_with_context(context, spec):
    m = CONTEXT_MODEL
    for time_s in (0.03, 0.06, 0.1, 0.3):
        budget = m.max_tokens(time_s, spec, context)
        if budget < 0:
            assert m.step_time_s(0, spec, context) > time_s
            continue
        assert m.step_time_s(budget, spec, context) <= time_s + 1e-12
        assert m.step_time_s(budget + 1, spec, context) > time_s
    assert m.max_tokens(0.1, spec, context) <= m.max_tokens(0.1, spec, 0)


def test_scaled_model_is_slower_by_the_factor():
    m = CONTEXT_MODEL.scaled(1.1, "margin")
    assert m.name == "margin"
    assert m.step_time_s(300, 1, 5_000) == pytest.approx(
        1.1 * CONTEXT_MODEL.step_time_s(300, 1, 5_000)
    )
    with pytest.raises(ValueError):
        CONTEXT_MODEL.scaled(0.0)


def test_context_model_round_trips_through_dict_and_wire():
    from wire.protocol import perf_model_from_wire, perf_model_to_wire

    data = CONTEXT_MODEL.to_dict()
    assert all(len(row) == 4 for row in data["lines"])
    assert PerfModel.from_dict(data) == CONTEXT_MODEL
    assert all(len(row) == 3 for row in perf_model_preset("opt-13b-h100").to_dict()["lines"])
    assert perf_model_from_wire(perf_model_to_wire(CONTEXT_MODEL)) == CONTEXT_MODEL
    plain = perf_model_preset("opt-6.7b-a100")
    assert perf_model_to_wire(plain).k_context_s == []
    assert perf_model_from_wire(perf_model_to_wire(plain)) == plain
    with pytest.raises(ValueError):
        PerfModel((Line(1e-5, 0.0, 0.01, -1e-7),))


def test_fit_recovers_a_context_term_from_noisy_samples():
    truth = PerfModel((Line(6e-5, 1.5e-3, 0.012, 2.5e-7),))
    rng = np.random.default_rng(7)
    samples = []
    for _ in range(300):
        n, s, c = int(rng.integers(1, 2000)), int(rng.integers(0, 4)), int(rng.integers(0, 60_000))
        time_s = truth.step_time_s(n, s, c) * (1 + 0.05 * rng.uniform(-1, 1))
        samples.append(StepSample(n, s, time_s, c))
    (line,) = fit_perf_model(samples, relative=True).model.lines
    assert line.k_token_s == pytest.approx(6e-5, rel=0.05)
    assert line.k_context_s == pytest.approx(2.5e-7, rel=0.05)
    assert line.intercept_s == pytest.approx(0.012, rel=0.1)
    assert line.k_spec_s == pytest.approx(1.5e-3, rel=0.2)


def test_truth_model_with_a_context_base_is_not_exact():
    assert not TruthModel(CONTEXT_MODEL).is_exact
    assert TruthModel(CONTEXT_MODEL).step_time_s(10, 0, 1000) == CONTEXT_MODEL.step_time_s(
        10, 0, 1000
    )
