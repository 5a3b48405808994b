"""The budget curve and the batch planner on hand-computed cases."""

from __future__ import annotations

import math

from formulations.batch_planner import build_layout
from formulations.budget import Decoder, Job, make_budget_curve
from formulations.perf_model import Line, PerfModel, perf_model_preset

PERF = perf_model_preset("opt-13b-2xa100")
TOY = PerfModel((Line(1e-3, 0.0, 0.01),), "toy")  # cap(T) = floor((T - 0.01) / 0.001)


def job(rid, prompt, deadline_s, tpot_s=0.1, decodes=5):
    return Job(rid, prompt, deadline_s, tpot_s, decodes, peak_blocks=1, value=1.0, mandatory=False)


def test_budget_without_decoders_is_the_inverse_of_the_model():
    curve = make_budget_curve(PERF, 0.0, 0.1, [], [0.1], 0, 0.0)
    assert (
        curve.budget(curve.zero_counts())
        == PERF.max_tokens(0.1)
        == math.floor((0.1 - 0.0317) / 7.21e-5)
    )


def test_staggered_tier_reserves_the_busiest_residue():
    # T = 0.05: the 100 ms tier decodes every 2 steps, so n requests need ceil(n / 2) slots a step
    curve = make_budget_curve(TOY, 0.0, 0.05, [], [0.05, 0.1], 0, 0.0)
    slow = curve.tier_index[0.1]
    fast = curve.tier_index[0.05]
    assert curve.tiers[slow].period_steps == 2 and curve.tiers[fast].period_steps == 1
    for n in range(7):
        counts = [0, 0]
        counts[slow] = n
        assert curve.budget(tuple(counts)) == 40 - math.ceil(n / 2)
        counts = [0, 0]
        counts[fast] = n
        assert curve.budget(tuple(counts)) == 40 - n


def test_decoders_due_soon_are_pinned_to_early_residues():
    # Three 100 ms decoders all due within the first step (latest step 0) pile up on residue 0.
    decoders = [Decoder(f"d{i}", 0.1, 0.06, 10) for i in range(3)]
    curve = make_budget_curve(TOY, 0.0, 0.05, decoders, [], 0, 0.0)
    assert curve.base_loads[curve.tier_index[0.1]] == [3, 0]
    # Due within two steps: they spread over both residues.
    decoders = [Decoder(f"d{i}", 0.1, 0.1, 10) for i in range(3)]
    curve = make_budget_curve(TOY, 0.0, 0.05, decoders, [], 0, 0.0)
    assert sorted(curve.base_loads[curve.tier_index[0.1]]) == [1, 2]


def test_decoders_ahead_of_schedule_join_later_as_jobs():
    # next token due at 0.5 s: latest step 9, period 2 -> joins as a job with deadline step 7
    curve = make_budget_curve(TOY, 0.0, 0.05, [Decoder("ahead", 0.1, 0.5, 10)], [], 0, 0.0)
    assert curve.base_loads[curve.tier_index[0.1]] == [0, 0]
    (deferred,) = curve.deferred
    assert deferred.num_prefill_tokens == 0 and deferred.mandatory
    assert curve.deadline_step(deferred.deadline_s) == 7


def test_deadline_step_counts_whole_steps():
    curve = make_budget_curve(TOY, 1.0, 0.05, [], [], 0, 0.0)
    assert curve.deadline_step(1.0 + 0.25) == 4  # steps 0..4 end by 1.25
    assert curve.deadline_step(1.0 + 0.26) == 4
    assert curve.deadline_step(1.0 + 0.04) == -1  # not even one step
    assert curve.deadline_step(None) == -1


def test_unservable_decoder_tier_rejects_the_step_time():
    assert make_budget_curve(TOY, 0.0, 0.1, [Decoder("d", 0.05, 0.05, 3)], [], 0, 0.0) is None


def test_layout_fills_steps_in_edf_order_with_varying_chunks():
    curve = make_budget_curve(TOY, 0.0, 0.05, [Decoder("d0", 0.05, 0.05, 30)], [0.05], 0, 0.0)
    jobs = [job("a", 50, 0.2, 0.05, 3), job("b", 60, 0.3, 0.05, 3)]  # EDF: a before b
    layout = build_layout(curve, jobs, [Decoder("d0", 0.05, 0.05, 30)])
    cap = curve.step_cap(0)
    first = layout.steps[0].num_tokens
    assert first["d0"] == 1 and first["a"] == cap - 1  # decode first, then a's chunk
    assert layout.steps[1].num_tokens["a"] == 50 - (cap - 1)
    assert layout.steps[1].num_tokens["b"] == cap - 1 - (50 - (cap - 1))  # leftover goes to b
    for step in layout.steps + layout.repeat:
        assert step.num_batched_tokens <= cap
        assert TOY.step_time_s(step.num_batched_tokens) <= 0.05 + 1e-12
    assert layout.completion_step["a"] <= curve.deadline_step(0.2)
    assert layout.completion_step["b"] <= curve.deadline_step(0.3)
    # the repeat cycle decodes everyone still decoding
    assert set(layout.repeat[0].num_tokens) == {"d0", "a", "b"}


def test_each_decode_adds_its_context_to_the_step_and_bursts_carry_none():
    from formulations.budget import Burst

    model = PerfModel((Line(1e-4, 0.0, 0.02, 1e-6),))
    decoders = [Decoder(f"d{i}", 0.1, 0.1, 10) for i in range(10)]
    plain = make_budget_curve(model, 0.0, 0.1, decoders, [0.1], 0, 0.7)
    loaded = make_budget_curve(model, 0.0, 0.1, decoders, [0.1], 0, 0.7, None, 3_000)
    assert plain.step_cap(0, 10) == plain.step_cap(0) == model.max_tokens(0.1) == 800
    assert loaded.step_cap(0) == 800
    assert loaded.step_cap(0, 10) == model.max_tokens(0.1, 0, 30_000) == 500
    # ten running decoders in every step (period 1): each takes a token and 3k context tokens
    assert plain.budget(plain.zero_counts()) == 800 - 10
    assert loaded.budget(loaded.zero_counts()) == 500 - 10
    one_more = (1,) * loaded.num_tiers
    assert loaded.budget(one_more) == model.max_tokens(0.1, 0, 33_000) - 11
    bursting = make_budget_curve(model, 0.0, 0.1, [], [0.1], 0, 0.7, Burst(2, 0.25), 3_000)
    assert bursting.burst_cap == model.max_tokens(0.25)  # prefill chunks only: no decoder context
    crowded = [Decoder(f"d{i}", 0.1, 0.1, 10) for i in range(30)]
    assert make_budget_curve(model, 0.0, 0.1, crowded, [0.1], 0, 0.7, None, 3_000) is None


def test_laid_out_steps_fit_the_step_time_with_their_decoders_context():
    model = PerfModel((Line(1e-4, 0.0, 0.02, 1e-6),))
    decoders = [Decoder(f"d{i}", 0.1, 0.1, 50) for i in range(8)]
    job = Job("new", 2_000, 1.0, 0.1, 20, 10, 1.0, mandatory=True)
    curve = make_budget_curve(model, 0.0, 0.1, decoders, [0.1], 0, 0.7, None, 3_000)
    layout = build_layout(curve, [job], decoders)
    prefill_steps = [s for s in layout.steps if "new" in s.num_tokens]
    assert sum(s.num_tokens["new"] for s in prefill_steps) == 2_000
    for step in layout.steps + layout.repeat:
        num_decodes = sum(1 for n in step.num_tokens.values() if n == 1)
        time_s = model.step_time_s(step.num_batched_tokens, 0, num_decodes * 3_000)
        assert time_s <= 0.1 + 1e-12
