"""Adaptive speculation: E(s) matches its formula and a direct simulation, and chosen lengths meet
each tier's TPOT in expectation."""

from __future__ import annotations

import numpy as np
import pytest

from formulations.perf_model import perf_model_preset
from formulations.plan import Verdict
from formulations.registry import create
from formulations.speculation import (
    candidate_step_times,
    choose_tier,
    expected_tokens_per_step,
    planned_gain,
    round_period,
)
from tests.formulations.factories import decoding_state, request, view


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.7, 0.9, 1.0])
@pytest.mark.parametrize("s", [0, 1, 2, 4, 7])
def test_expected_tokens_formula(alpha, s):
    # sum_{i=0..s} alpha^i: the own token plus each draft token accepted with its prefix
    assert expected_tokens_per_step(s, alpha) == pytest.approx(sum(alpha**i for i in range(s + 1)))


def test_expected_tokens_match_a_simulation_of_the_acceptance_rule():
    rng = np.random.default_rng(0)
    alpha, s, n = 0.6, 4, 200_000
    # accepted = leading run of successes among s drafts, then one token of the target model
    draws = rng.random((n, s)) < alpha
    accepted = np.where(draws.all(axis=1), s, np.argmin(draws, axis=1))
    assert float(np.mean(accepted + 1)) == pytest.approx(
        expected_tokens_per_step(s, alpha), rel=0.01
    )


def test_bad_inputs_are_errors():
    with pytest.raises(ValueError):
        expected_tokens_per_step(-1, 0.5)
    with pytest.raises(ValueError):
        expected_tokens_per_step(2, 1.5)


@pytest.mark.parametrize("alpha", [0.5, 0.8])
@pytest.mark.parametrize("tpot_s", [0.05, 0.1])
@pytest.mark.parametrize("step_time_s", [0.03, 0.05, 0.08, 0.12, 0.2])
def test_chosen_length_is_smallest_that_meets_the_tpot(alpha, tpot_s, step_time_s):
    choice = choose_tier(tpot_s, step_time_s, max_spec_tokens=6, acceptance_rate=alpha)
    if choice is None:
        # even the longest speculation cannot keep up
        assert planned_gain(6, alpha) * tpot_s < step_time_s
        return
    gain = expected_tokens_per_step(choice.num_spec_tokens, alpha)
    # expected tokens per second >= 1 / tpot, even after the planning margin
    assert planned_gain(choice.num_spec_tokens, alpha) <= gain
    assert (
        planned_gain(choice.num_spec_tokens, alpha) / (choice.period_steps * step_time_s)
        >= 1 / tpot_s - 1e-9
    )
    if choice.num_spec_tokens > 0:
        shorter = planned_gain(choice.num_spec_tokens - 1, alpha)
        assert shorter * tpot_s < step_time_s  # one draft token less would not do


def test_no_draft_model_means_no_speculation():
    choice = choose_tier(0.1, 0.05, max_spec_tokens=0, acceptance_rate=0.9)
    assert choice.num_spec_tokens == 0 and choice.period_steps == 2
    assert choose_tier(0.05, 0.1, max_spec_tokens=0, acceptance_rate=0.9) is None


def test_periods_round_down_to_allowed_values():
    assert [round_period(n) for n in (0, 1, 5, 7, 13, 100)] == [0, 1, 4, 6, 12, 24]


def test_candidates_stretch_each_tpot_by_expected_gain():
    times = candidate_step_times({0.05}, 2, 0.5)
    margin = planned_gain(1, 0.5) / 1.5
    assert times == pytest.approx(sorted([0.05, 0.05 * 1.5 * margin, 0.05 * 1.75 * margin]))


def test_planner_speculates_for_the_tight_tier_when_it_pays():
    """With a draft model, coder requests (50 ms) decode with draft tokens in longer steps."""
    perf = perf_model_preset("opt-13b-2xa100")
    running = [
        decoding_state(request(f"d{i}", 0.0, 200, 400, 1.0, 0.05), 1, 1.0, 16) for i in range(4)
    ]
    waiting = [request(f"w{i}", 1.0, 2000, 50, 1.0, 0.05) for i in range(3)]
    plan = create("slos_dp").plan(
        view(perf, 1.0, running, waiting, max_spec_tokens=4, acceptance=0.8)
    )
    assert any(step.num_spec_tokens for step in plan.steps + plan.repeat)
    for step in plan.steps + plan.repeat:
        assert all(0 < s <= 4 for s in step.num_spec_tokens.values())
    plain = create("slos_dp", speculation=False).plan(view(perf, 1.0, running, waiting, 4, 0.8))
    assert not any(step.num_spec_tokens for step in plain.steps + plain.repeat)
    admitted = sum(d.verdict is Verdict.ADMITTED for d in plan.decisions.values())
    admitted_plain = sum(d.verdict is Verdict.ADMITTED for d in plain.decisions.values())
    assert admitted >= admitted_plain
