"""The simulated engine: step time from the truth model, all-or-nothing KV blocks, speculative
acceptance against its analytic mean, preemption and finishing free memory."""

import pytest

from engine_adapters.engine import EngineRequest
from engine_adapters.sim_engine import SimEngine, VirtualClock
from formulations.perf_model import Line, PerfModel, TruthModel
from formulations.plan import Step
from tests.factories import SIMPLE_MODEL


def make_engine(num_blocks=100, block_size=16, truth=SIMPLE_MODEL, **kwargs):
    return SimEngine(truth, num_blocks, block_size, clock=VirtualClock(5.0), **kwargs)


def test_prefill_step_time_and_progress():
    engine = make_engine()
    engine.add_request(EngineRequest("a", 40, 3))
    report = engine.execute(Step({"a": 40}), step_id=7)
    assert report.ok and report.step_id == 7
    assert report.start_s == 5.0
    assert report.end_s == pytest.approx(5.0 + SIMPLE_MODEL.step_time_s(40))
    assert report.num_computed_tokens == {"a": 40}
    assert report.num_new_tokens == {"a": 1}
    assert report.num_free_blocks == 100 - 3  # ceil(40 / 16)


def test_chunked_prefill_samples_only_at_the_end():
    engine = make_engine()
    engine.add_request(EngineRequest("a", 40, 3))
    first = engine.execute(Step({"a": 30}), 0)
    assert first.num_new_tokens == {}
    second = engine.execute(Step({"a": 10}), 1)
    assert second.num_new_tokens == {"a": 1}


def test_context_term_of_the_truth_model():
    truth = TruthModel(SIMPLE_MODEL, k_context_s=1e-4)
    engine = make_engine(truth=truth)
    engine.add_request(EngineRequest("a", 50, 5))
    engine.add_request(EngineRequest("b", 30, 5))
    engine.execute(Step({"a": 50, "b": 30}), 0)
    report = engine.execute(Step({"a": 1, "b": 1}), 1)
    # context = cached tokens before the step: 50 + 30
    assert report.step_time_s == pytest.approx(SIMPLE_MODEL.step_time_s(2) + 1e-4 * 80)


def test_out_of_blocks_is_all_or_nothing():
    engine = make_engine(num_blocks=4)
    engine.add_request(EngineRequest("a", 48, 5))  # 3 blocks
    engine.add_request(EngineRequest("b", 32, 5))  # 2 blocks
    report = engine.execute(Step({"a": 48, "b": 32}), 0)
    assert not report.ok and "out of KV blocks" in report.error
    assert report.num_free_blocks == 4 and report.end_s == report.start_s
    ok = engine.execute(Step({"a": 48}), 1)  # a alone still fits: nothing was consumed
    assert ok.ok and ok.num_free_blocks == 1


def test_bad_steps_are_reported_not_raised():
    engine = make_engine()
    engine.add_request(EngineRequest("a", 10, 2))
    assert "unknown request" in engine.execute(Step({"zz": 1}), 0).error
    assert "pending" in engine.execute(Step({"a": 11}), 1).error
    assert "speculative" in engine.execute(Step({"a": 10}, {"a": 2}), 2).error


def test_finishing_frees_blocks_and_forgets_the_request():
    engine = make_engine()
    engine.add_request(EngineRequest("a", 16, 2))
    engine.execute(Step({"a": 16}), 0)
    report = engine.execute(Step({"a": 1}), 1)
    assert report.finished == ("a",)
    assert report.num_free_blocks == 100
    assert not engine.has_request("a")


def test_preempt_drops_kv_and_recompute_restores_it():
    engine = make_engine()
    engine.add_request(EngineRequest("a", 20, 5))
    engine.execute(Step({"a": 20}), 0)
    engine.execute(Step({"a": 1}), 1)
    engine.preempt("a")
    assert engine.num_free_blocks == 100
    # recompute prompt + 2 generated tokens - the newest one not yet cached: 22 pending
    assert "22 pending" in engine.execute(Step({"a": 23}), 2).error
    report = engine.execute(Step({"a": 22}), 3)
    assert report.num_new_tokens == {"a": 1}


def spec_engine(alpha, seed=0):
    engine = make_engine(
        num_blocks=100_000, max_spec_tokens=4, true_acceptance_rate=alpha, seed=seed
    )
    engine.add_request(EngineRequest("a", 8, 100_000))
    engine.execute(Step({"a": 8}), 0)
    return engine


@pytest.mark.parametrize("alpha, expected", [(1.0, 4), (0.0, 0)])
def test_speculation_extremes(alpha, expected):
    engine = spec_engine(alpha)
    report = engine.execute(Step({"a": 1}, {"a": 4}), 1)
    assert report.num_accepted_spec_tokens == {"a": expected}
    assert report.num_proposed_spec_tokens == {"a": 4}
    assert report.num_new_tokens == {"a": expected + 1}
    assert report.num_computed_tokens == {"a": expected + 1}


def test_speculation_mean_matches_the_iid_model():
    alpha, s = 0.6, 4
    engine = spec_engine(alpha, seed=3)
    total = 0
    n = 4000
    for i in range(n):
        total += engine.execute(Step({"a": 1}, {"a": s}), i + 1).num_accepted_spec_tokens["a"]
    expected = sum(alpha**a for a in range(1, s + 1))  # E[min(s, G - 1)]
    assert total / n == pytest.approx(expected, rel=0.05)


def test_speculation_never_overshoots_the_output():
    engine = make_engine(max_spec_tokens=4, true_acceptance_rate=1.0)
    engine.add_request(EngineRequest("a", 8, 3))
    engine.execute(Step({"a": 8}), 0)
    report = engine.execute(Step({"a": 1}, {"a": 4}), 1)
    assert report.num_new_tokens == {"a": 2} and report.finished == ("a",)


def test_sleeping_engine_uses_the_wall_clock_hook():
    now = [0.0]
    slept = []

    def sleep(dt):
        slept.append(dt)
        now[0] += dt

    model = PerfModel((Line(0.0, 0.0, 0.25),))
    engine = SimEngine(model, 10, clock=lambda: now[0], sleep=sleep, emit_token_ids=True)
    engine.add_request(EngineRequest("a", 4, 2))
    report = engine.execute(Step({"a": 4}), 0)
    assert slept == [0.25] and report.end_s == 0.25
    assert len(report.new_token_ids["a"]) == 1


def test_repeatable_steps_stop_before_the_blocks_run_out():
    engine = make_engine(num_blocks=6, block_size=4)
    for rid in ("a", "b"):
        engine.add_request(EngineRequest(rid, 4, 100))
        engine.execute(Step({rid: 4}), 0)  # 4 cached tokens: 1 full block each, 4 free
    step = Step({"a": 1, "b": 1})
    # each run caches one more token per request; blocks needed after r runs: 2 * ceil(r / 4)
    runs = engine.repeatable_steps(step)
    assert runs == 8  # 2 * ceil(8 / 4) = 4 <= 4 free, 9 runs would need 6
    report = engine.execute_repeated(step, 8, runs, start_s=0.0)
    assert report.num_new_tokens == {"a": 8, "b": 8} and report.num_free_blocks == 0
    assert "out of KV blocks" in engine.execute(step, 9).error
    assert report.end_s == pytest.approx(8 * SIMPLE_MODEL.step_time_s(2))
