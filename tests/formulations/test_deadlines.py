"""Deadline and attainment math on hand-worked cases (docs/ALGORITHM.md section 1)."""

import pytest

from formulations.deadlines import (
    check_attainment,
    checked_tokens,
    decode_offset_s,
    token_deadline_s,
)
from formulations.request import make_request
from formulations.slo import SLO, slo_preset
from tests.factories import SIMPLE_MODEL, make_req


def test_ttft_slowdown_resolves_against_zero_load_prefill_time():
    # prefill of 500 tokens on the simple model: 0.5 s + 0.01 s = 0.51 s; chatbot is 5x.
    req = make_request("a", 2.0, 500, 10, "chatbot", SIMPLE_MODEL)
    assert req.ttft_slo_s == pytest.approx(5 * 0.51)
    assert req.ttft_deadline_s == pytest.approx(2.0 + 2.55)
    assert req.slo_class == "chatbot"


def test_absolute_ttft_is_taken_as_is():
    req = make_request("a", 0.0, 500, 10, SLO(tpot_s=0.05, ttft_s=0.8), SIMPLE_MODEL)
    assert req.ttft_slo_s == 0.8


def test_token_deadlines_are_cumulative_from_ttft_deadline():
    req = make_req(arrival_s=1.0, ttft_s=2.0, tpot_s=0.1, output=50)
    assert token_deadline_s(req, 1) == pytest.approx(3.0)
    assert token_deadline_s(req, 11) == pytest.approx(4.0)
    # an early first token adds no slack; a late one moves the clock
    assert token_deadline_s(req, 11, first_token_s=2.0) == pytest.approx(4.0)
    assert token_deadline_s(req, 11, first_token_s=3.5) == pytest.approx(4.5)


def test_thinking_then_answer_tpot_accumulate_across_the_switch():
    req = make_req(output=100, thinking=40, tpot_s=0.1, thinking_tpot_s=0.05)
    # tokens 2..40 are thinking gaps (39 x 50 ms), tokens 41..60 answer gaps (20 x 100 ms)
    assert decode_offset_s(req, 40) == pytest.approx(39 * 0.05)
    assert decode_offset_s(req, 60) == pytest.approx(39 * 0.05 + 20 * 0.1)
    assert req.slo.tpot_of_token_s(40, 40) == 0.05
    assert req.slo.tpot_of_token_s(41, 40) == 0.1


def test_checked_tokens_every_twentieth_and_the_last():
    assert checked_tokens(45) == [20, 40, 45]
    assert checked_tokens(40) == [20, 40]
    assert checked_tokens(7) == [7]


def test_attainment_with_five_percent_tolerance():
    req = make_req(arrival_s=0.0, ttft_s=1.0, tpot_s=0.1, output=21)
    on_time = [1.0 + 0.1 * i for i in range(21)]
    assert check_attainment(req, on_time).ok
    # TTFT 4% late passes, 6% late fails
    assert check_attainment(req, [1.04] + on_time[1:]).ttft_ok
    assert not check_attainment(req, [1.06] + on_time[1:]).ttft_ok
    # token 20 due 1.9 s after the clock start; 5% tolerance is on the elapsed 1.9 s
    late20 = list(on_time)
    late20[19] = 1.0 + 1.9 * 1.04
    assert check_attainment(req, late20).tpot_ok
    late20[19] = 1.0 + 1.9 * 1.06
    result = check_attainment(req, late20)
    assert result.ttft_ok and not result.tpot_ok and not result.ok


def test_unchecked_token_may_be_late_if_it_catches_up():
    req = make_req(ttft_s=1.0, tpot_s=0.1, output=21)
    times = [1.0 + 0.1 * i for i in range(21)]
    times[4] = 1.9  # token 5 very late, but not a checked token; token 20 on time
    times[5:19] = [1.9] * 14
    assert check_attainment(req, times).ok


def test_not_admitted_or_unfinished_never_attains():
    req = make_req(output=3)
    times = [0.5, 0.6, 0.7]
    assert check_attainment(req, times).ok
    assert not check_attainment(req, times, admitted=False).ok
    assert not check_attainment(req, times[:2]).ok


def test_bad_slo_and_request_are_rejected():
    with pytest.raises(ValueError):
        SLO(tpot_s=0.1)
    with pytest.raises(ValueError):
        SLO(tpot_s=0.1, ttft_s=1.0, ttft_slowdown=3.0)
    with pytest.raises(ValueError):
        SLO(tpot_s=-1, ttft_s=1.0)
    with pytest.raises(ValueError):
        make_req(prompt=0)
    with pytest.raises(ValueError):
        slo_preset("nope")
