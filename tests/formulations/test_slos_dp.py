"""The slos_dp formulation: decisions, plan validity, and the guarantee on the plan itself (every
admitted request's tokens meet their deadlines when the plan is replayed on the model)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from formulations.perf_model import Line, PerfModel, perf_model_preset
from formulations.plan import Verdict
from formulations.registry import create
from formulations.state import RequestState
from tests.formulations.factories import decoding_state, request, view
from tests.formulations.plan_timing import deadline_misses, replay

PERF = perf_model_preset("opt-13b-2xa100")
TOY = PerfModel((Line(2e-3, 0.0, 0.02),), "toy-slow")
TPOTS = (0.05, 0.1, 0.15)


@st.composite
def scenes(draw):
    perf = draw(st.sampled_from((PERF, TOY)))
    small = perf is TOY
    running = []
    for i in range(draw(st.integers(0, 8 if small else 4))):
        req = request(
            f"d{i}",
            0.0,
            draw(st.integers(10, 400)),
            draw(st.integers(3, 120)),
            1.0,
            draw(st.sampled_from(TPOTS)),
        )
        running.append(
            decoding_state(req, draw(st.integers(1, 2)), 1.5, 16)
        )  # just produced a token at now
    waiting = [
        request(
            f"w{i}",
            draw(st.floats(1.0, 1.5)),
            draw(st.integers(5, 100) if small else st.integers(20, 2500)),
            draw(st.integers(1, 150)),
            draw(st.floats(0.15, 1.5)),
            draw(st.sampled_from(TPOTS)),
        )
        for i in range(draw(st.integers(1, 10)))
    ]
    return (
        perf,
        running,
        waiting,
        draw(st.sampled_from(("reject", "best_effort"))),
        draw(st.booleans()),
    )


@settings(
    max_examples=120, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(scenes())
def test_admitted_requests_meet_every_deadline_on_the_plan(scene):
    perf, running, waiting, fallback, eager = scene
    v = view(perf, 1.5, running, waiting, num_total_blocks=5000)
    plan = create("slos_dp", fallback=fallback, eager_decodes=eager).plan(v)
    assert set(plan.decisions) == {r.request_id for r in waiting}
    admitted = {rid for rid, d in plan.decisions.items() if d.verdict is Verdict.ADMITTED}
    assert not deadline_misses(plan, v, admitted | {s.request_id for s in running})
    for step in plan.steps:
        assert not step.is_empty
    if fallback == "reject":
        assert all(d.verdict is not Verdict.BEST_EFFORT for d in plan.decisions.values())


def test_eager_decodes_finish_decoders_sooner_and_keep_every_deadline():
    running = [
        decoding_state(request(f"d{i}", 0.0, 200, 60, 1.0, 0.15), 1, 1.5, 16) for i in range(3)
    ]
    waiting = [request("w", 1.5, 300, 40, 1.0, 0.05)]
    v = view(PERF, 1.5, running, waiting, num_total_blocks=5000)
    last = {}
    for eager in (False, True):
        plan = create("slos_dp", eager_decodes=eager).plan(v)
        assert plan.decisions["w"].verdict is Verdict.ADMITTED
        assert not deadline_misses(plan, v, {"w", "d0", "d1", "d2"})
        times = replay(plan, v)
        last[eager] = max(times[f"d{i}"][-1] for i in range(3))
    # at a 150 ms TPOT the slots come every few steps; eager decodes use the leftover budget
    assert last[True] < 0.6 * last[False]


def test_best_effort_requests_use_leftover_budget_and_finish():
    """A burst the DP cannot all guarantee: the rest run best effort and still finish in replay."""
    waiting = [request(f"w{i}", 0.0, 1200, 40, 0.4, 0.1) for i in range(8)]
    v = view(PERF, 0.0, [], waiting)
    plan = create("slos_dp", fallback="best_effort").plan(v)
    verdicts = [d.verdict for d in plan.decisions.values()]
    assert Verdict.ADMITTED in verdicts and Verdict.BEST_EFFORT in verdicts
    admitted = {rid for rid, d in plan.decisions.items() if d.verdict is Verdict.ADMITTED}
    assert not deadline_misses(plan, v, admitted)
    times = replay(plan, v)
    best_effort = [rid for rid, d in plan.decisions.items() if d.verdict is Verdict.BEST_EFFORT]
    assert any(times[rid] for rid in best_effort)  # best effort progressed inside this plan


def test_too_large_request_is_rejected_with_reason():
    v = view(PERF, 0.0, [], [request("big", 0.0, 5000, 100, 2.0, 0.1)], num_total_blocks=100)
    plan = create("slos_dp", fallback="best_effort").plan(v)
    assert plan.decisions["big"].verdict is Verdict.REJECTED
    assert "exceeds" in plan.decisions["big"].reason


def test_memory_limits_admission():
    waiting = [request(f"w{i}", 0.0, 100, 60, 2.0, 0.1) for i in range(6)]  # 10 blocks each
    v = view(PERF, 0.0, [], waiting, num_total_blocks=35)
    plan = create("slos_dp").plan(v)
    assert sum(d.verdict is Verdict.ADMITTED for d in plan.decisions.values()) == 3


def test_value_weights_pick_the_valuable_request():
    """Two requests compete for the same budget; the heavier one is admitted."""
    cheap = request("cheap", 0.0, 900, 10, 0.12, 0.1, value=1.0)
    dear = request("dear", 0.0, 900, 10, 0.12, 0.1, value=3.0)
    plan = create("slos_dp").plan(view(PERF, 0.0, [], [cheap, dear]))
    assert plan.decisions["dear"].verdict is Verdict.ADMITTED
    assert plan.decisions["cheap"].verdict is Verdict.REJECTED


def test_steady_decode_load_limits_admission():
    """Prefill fits easily, but each admitted request adds a decode slot per step: with 12 tokens
    per step (toy model, T = 0.044 s) and 10 running decoders only two more can decode."""
    model = PerfModel((Line(2e-3, 0.0, 0.02),), "toy")
    running = [
        decoding_state(request(f"d{i}", 0.0, 10, 50, 1.0, 0.044), 1, 1.0, 16) for i in range(10)
    ]
    waiting = [request(f"w{i}", 1.0, 1, 20, 3.0, 0.044) for i in range(4)]
    plan = create("slos_dp").plan(view(model, 1.0, running, waiting))
    assert sum(d.verdict is Verdict.ADMITTED for d in plan.decisions.values()) == 2


def test_late_admitted_request_is_kept_and_others_keep_their_guarantee():
    late = RequestState(request("late", 0.0, 800, 20, 0.2, 0.1), Verdict.ADMITTED, 100)
    fresh = request("fresh", 1.0, 300, 20, 1.0, 0.1)
    v = view(PERF, 1.0, [late], [fresh])
    plan = create("slos_dp").plan(v)
    assert plan.steps and "late" in plan.steps[0].num_tokens
    assert plan.decisions["fresh"].verdict is Verdict.ADMITTED
    assert not deadline_misses(plan, v, {"fresh"})


def test_bad_parameters_are_clear_errors():
    with pytest.raises(ValueError):
        create("slos_dp", fallback="maybe")
    with pytest.raises(ValueError):
        create("slos_dp", max_new_per_call=0)
    with pytest.raises(ValueError, match="memory must be"):
        create("slos_dp", memory="lazy")


def test_unservable_running_requests_get_a_bounded_catch_up_step():
    """A running decoder whose TPOT no step can meet (10 ms < the 31.7 ms step floor): no new
    admission, one catch-up step that decodes it and chunks the admitted prefill."""
    tight = decoding_state(request("tight", 0.0, 100, 50, 1.0, 0.01), 1, 1.0, 16)
    prefilling = RequestState(request("pre", 0.5, 5000, 20, 2.0, 0.1), Verdict.ADMITTED, 0)
    v = view(PERF, 1.0, [tight, prefilling], [request("new", 1.0, 100, 10, 1.0, 0.1)])
    plan = create("slos_dp").plan(v)
    assert plan.decisions["new"].verdict is Verdict.REJECTED
    (step,) = plan.steps
    assert step.num_tokens["tight"] == 1
    assert 0 < step.num_tokens["pre"] < 5000
    assert PERF.step_time_s(step.num_batched_tokens) <= 0.1 + 1e-9


def test_decoder_bound_burst_admits_a_long_prompt_beside_a_decoder_that_is_ahead():
    """A decoder whose next token is due in 0.7 s leaves room for long prefill steps until one
    grid step before that deadline; a 5000-token prompt due in 0.8 s needs them (the 50 ms grid
    carries about 16 x 254 tokens by then). The plan keeps every deadline when replayed."""
    ahead = decoding_state(request("d", 0.0, 200, 100, 1.0, 0.05), 4, 0.2, 16)  # token 5 at 1.2 s
    long_prompt = request("w", 0.5, 5000, 20, 0.8, 0.05)
    v = view(PERF, 0.5, [ahead], [long_prompt])
    without = create("slos_dp", decoder_bursts=False).plan(v)
    assert without.decisions["w"].verdict is Verdict.REJECTED
    plan = create("slos_dp").plan(v)
    assert plan.decisions["w"].verdict is Verdict.ADMITTED
    assert not deadline_misses(plan, v, {"d", "w"})
    assert max(len(step.num_tokens) for step in plan.steps[:2]) == 1  # prefill-only burst steps
