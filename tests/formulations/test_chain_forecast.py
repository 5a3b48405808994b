"""The chain forecast (formulations/chain_forecast.py): continuation learned per round index from
chains that continued or ended, sizes from what later rounds added and generated."""

import pytest

from formulations.chain_forecast import CONTINUE_PRIOR, PRIOR_WEIGHT, ChainForecast


def test_prior_until_chains_are_seen():
    forecast = ChainForecast()
    assert forecast.continue_probability("agent", 0) == CONTINUE_PRIOR
    assert forecast.tokens_per_round("agent") == 0  # no later round seen: nothing to go on


def test_continuation_is_learned_per_round_index():
    forecast = ChainForecast()
    for _ in range(96):
        forecast.continued("agent", 0, 100)
        forecast.ended("agent", 1)
    assert forecast.continue_probability("agent", 0) == pytest.approx(
        (96 + PRIOR_WEIGHT * CONTINUE_PRIOR) / (96 + PRIOR_WEIGHT)
    )
    assert forecast.continue_probability("agent", 1) == pytest.approx(
        PRIOR_WEIGHT * CONTINUE_PRIOR / (96 + PRIOR_WEIGHT)
    )
    assert forecast.continue_probability("other", 0) == CONTINUE_PRIOR


def test_a_chain_counted_as_ended_whose_round_came_is_taken_back():
    forecast = ChainForecast()
    forecast.ended("agent", 0)
    forecast.ended("agent", 0, count=-1)
    forecast.continued("agent", 0, 10)
    assert forecast.continue_probability("agent", 0) > CONTINUE_PRIOR


def test_tokens_per_round_add_new_prompt_tokens_and_output():
    forecast = ChainForecast()
    for _ in range(10):
        forecast.continued("agent", 0, 200)
        forecast.generated("agent", 50)
    assert forecast.tokens_per_round("agent") == 250


def test_sizes_are_bounded_running_means():
    forecast = ChainForecast(max_samples=2)
    for added in (1000, 10, 30):
        forecast.continued("agent", 0, added)
    assert forecast.tokens_per_round("agent") == 20  # the last two
    with pytest.raises(ValueError):
        ChainForecast(max_samples=0)
