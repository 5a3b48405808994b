"""Each baseline's defining behaviour, on hand-made replica views."""

import pytest

from formulations import registry
from formulations.baselines.batching import BlockLedger
from formulations.plan import Verdict
from formulations.progress import num_blocks_for
from formulations.state import ReplicaView, RequestState
from tests.factories import SIMPLE_MODEL, make_req

BLOCK = 16


def state(
    rid,
    prompt=100,
    output=10,
    computed=0,
    generated=0,
    arrival_s=0.0,
    verdict=Verdict.ADMITTED,
    **kw,
):
    s = RequestState(make_req(rid, arrival_s, prompt, output, **kw), verdict)
    s.num_computed_tokens = computed
    s.num_generated_tokens = generated
    s.num_blocks = num_blocks_for(computed, BLOCK)
    return s


def decoding(rid, prompt=100, output=10, generated=1, **kw):
    return state(rid, prompt, output, computed=prompt + generated - 1, generated=generated, **kw)


def waiting(rid, prompt=100, output=10, **kw):
    return state(rid, prompt, output, verdict=None, **kw)


def view(running=(), waiting_=(), total=10_000, free=None, model=SIMPLE_MODEL, now_s=0.0):
    used = sum(s.num_blocks for s in running)
    return ReplicaView(
        0,
        now_s,
        model,
        BLOCK,
        total,
        total - used if free is None else free,
        tuple(running),
        tuple(waiting_),
    )


def only_step(plan):
    assert len(plan.steps) == 1, plan
    return dict(plan.steps[0].num_tokens)


# ---------------------------------------------------------------- vllm_fcfs


def test_vllm_fcfs_running_first_then_waiting_in_arrival_order_chunked():
    f = registry.create("vllm_fcfs", max_num_batched_tokens=300)
    v = view(
        running=[decoding("d1"), decoding("d2"), state("p", prompt=500, computed=200)],
        waiting_=[waiting("w1", prompt=150, arrival_s=1), waiting("w2", prompt=150, arrival_s=2)],
    )
    plan = f.plan(v)
    # 2 decodes, the partial prefill takes min(300 pending, 298 left) = 298, nothing left for w1/w2
    assert only_step(plan) == {"d1": 1, "d2": 1, "p": 298}
    assert {rid: d.verdict for rid, d in plan.decisions.items()} == {
        "w1": Verdict.ADMITTED,
        "w2": Verdict.ADMITTED,
    }

    plan = f.plan(
        view(
            running=[decoding("d1")],
            waiting_=[waiting("w1", prompt=150), waiting("w2", prompt=250)],
        )
    )
    assert only_step(plan) == {"d1": 1, "w1": 150, "w2": 149}


def test_vllm_fcfs_admits_by_memory_only():
    f = registry.create("vllm_fcfs")
    impossible_slo = waiting("tight", prompt=1000, ttft_s=1e-6, tpot_s=1e-6)
    too_big = waiting("big", prompt=10_000, output=10)
    plan = f.plan(view(waiting_=[impossible_slo, too_big], total=200))
    assert plan.decisions["tight"].verdict is Verdict.ADMITTED
    assert plan.decisions["big"].verdict is Verdict.REJECTED
    assert only_step(plan) == {"tight": 1000}


def test_vllm_fcfs_head_of_line_waits_for_memory():
    f = registry.create("vllm_fcfs")
    # 10 free blocks: w1 needs 13 (200 tokens), w2 needs 1; FCFS: nobody overtakes w1
    plan = f.plan(
        view(waiting_=[waiting("w1", prompt=200), waiting("w2", prompt=10)], total=100, free=10)
    )
    assert plan.steps == () and len(plan.decisions) == 2


def test_vllm_fcfs_preempts_the_newest_when_decodes_run_out_of_memory():
    f = registry.create("vllm_fcfs")
    # three requests with exactly full blocks: each decode needs a new block; one block free
    running = [decoding(f"d{i}", prompt=32, generated=1) for i in range(3)]
    plan = f.plan(view(running=running, total=7, free=1))
    # d0 takes the free block; d1 needs one too, so the newest (d2) is preempted and d1 fits
    assert plan.preempt == ("d2",)
    assert only_step(plan) == {"d0": 1, "d1": 1}
    # with no block at all, preemption runs down to the request itself
    plan = f.plan(view(running=running[:1], total=2, free=0))
    assert plan.preempt == ("d0",) and plan.steps == ()


def test_vllm_fcfs_steady_decode_is_a_repeat_cycle():
    f = registry.create("vllm_fcfs")
    plan = f.plan(view(running=[decoding("a"), decoding("b")]))
    assert plan.steps == () and len(plan.repeat) == 1
    assert dict(plan.repeat[0].num_tokens) == {"a": 1, "b": 1}
    # still the cycle when memory will run out: the engine refuses the step that does not fit
    plan = f.plan(view(running=[decoding("a", output=500), decoding("b", output=500)], free=2))
    assert plan.steps == () and dict(plan.repeat[0].num_tokens) == {"a": 1, "b": 1}
    # not steady while a prompt is unfinished: one step, then a re-plan
    plan = f.plan(view(running=[decoding("a"), state("p", prompt=3000, computed=100)]))
    assert plan.repeat == () and only_step(plan) == {"a": 1, "p": 2047}


def test_decode_tail_after_a_finishing_prefill():
    f = registry.create("vllm_fcfs")
    plan = f.plan(view(running=[decoding("a")], waiting_=[waiting("w", prompt=300)]))
    assert only_step(plan) == {"a": 1, "w": 300}
    assert dict(plan.repeat[0].num_tokens) == {"a": 1, "w": 1}  # both decode from then on


# ---------------------------------------------------------------- vllm_prefill_first


def test_prefill_first_runs_whole_prompts_before_decodes():
    f = registry.create("vllm_prefill_first", max_num_batched_tokens=1000)
    v = view(
        running=[decoding("d1")], waiting_=[waiting("w1", prompt=600), waiting("w2", prompt=600)]
    )
    plan = f.plan(v)
    assert only_step(plan) == {"w1": 600}  # w2 does not fit the budget beside w1; no decode
    plan = f.plan(view(running=[decoding("d1"), decoding("d2")]))
    assert plan.repeat and dict(plan.repeat[0].num_tokens) == {"d1": 1, "d2": 1}


def test_prefill_first_long_prompt_runs_alone():
    f = registry.create("vllm_prefill_first", max_num_batched_tokens=1000)
    plan = f.plan(view(waiting_=[waiting("long", prompt=3000)]))
    assert only_step(plan) == {"long": 3000}


# ---------------------------------------------------------------- shared helpers


def test_block_ledger_release_and_regrow():
    a = decoding("a", prompt=32, generated=1)  # 32 cached tokens: 2 full blocks
    ledger = BlockLedger(view(running=[a], total=3, free=1))
    assert ledger.try_grow(a, 1) and ledger.num_free_blocks == 0
    ledger.release(a)
    assert ledger.num_free_blocks == 3
    assert ledger.extra_blocks(a, 1) == 1  # recompute from nothing


@pytest.mark.parametrize("name", ["vllm_fcfs", "vllm_prefill_first"])
def test_baselines_are_registered(name):
    assert name in registry.available()


# ---------------------------------------------------------------- sarathi


def test_sarathi_chunk_is_the_budget_at_the_tightest_tpot():
    f = registry.create("sarathi")
    tight = decoding("d", tpot_s=0.05)
    v = view(running=[tight], waiting_=[waiting("w", prompt=1000, tpot_s=0.1)])
    budget = SIMPLE_MODEL.max_tokens(0.05)  # floor((0.05 - 0.010) / 1e-3) = 40
    assert budget == 40
    step = only_step(f.plan(v))
    assert step == {"d": 1, "w": budget - 1}
    assert SIMPLE_MODEL.step_time_s(sum(step.values())) <= 0.05
    # a looser TPOT alone gives a bigger chunk
    step = only_step(f.plan(view(waiting_=[waiting("w", prompt=1000, tpot_s=0.1)])))
    assert step == {"w": SIMPLE_MODEL.max_tokens(0.1)}


def test_sarathi_decodes_first_then_fcfs_chunks():
    f = registry.create("sarathi")
    older_partial = state("p", prompt=500, computed=100, tpot_s=0.05)
    running = [older_partial, decoding("d1", tpot_s=0.05), decoding("d2", tpot_s=0.05)]
    plan = f.plan(view(running=running, waiting_=[waiting("w", prompt=100, tpot_s=0.05)]))
    assert only_step(plan) == {"d1": 1, "d2": 1, "p": 38}


def test_sarathi_admits_by_memory_only():
    f = registry.create("sarathi")
    plan = f.plan(view(waiting_=[waiting("x", prompt=5000, ttft_s=1e-6, tpot_s=0.02)]))
    assert plan.decisions["x"].verdict is Verdict.ADMITTED


# ---------------------------------------------------------------- edf


def test_edf_serves_earliest_deadline_first():
    f = registry.create("edf")
    late = waiting("late", prompt=30, arrival_s=0.0, ttft_s=5.0, tpot_s=0.05)
    early = waiting("early", prompt=30, arrival_s=0.1, ttft_s=0.5, tpot_s=0.05)
    step = only_step(f.plan(view(waiting_=[late, early], now_s=0.1)))
    assert step == {"early": 30, "late": 10}  # 40-token budget at 50 ms TPOT, early deadline first


def test_edf_orders_decodes_and_prefills_by_deadline():
    f = registry.create("edf")
    # a decode due late (its TTFT deadline was far off) vs a prefill due soon
    relaxed = decoding("relaxed", ttft_s=10.0, tpot_s=0.05)
    urgent = waiting("urgent", prompt=500, ttft_s=0.2, tpot_s=0.05)
    step = only_step(f.plan(view(running=[relaxed], waiting_=[urgent])))
    assert step == {"urgent": 40}  # the earlier deadline takes the whole 40-token budget
    short = waiting("urgent", prompt=30, ttft_s=0.2, tpot_s=0.05)
    step = only_step(f.plan(view(running=[relaxed], waiting_=[short])))
    assert list(step.items()) == [("urgent", 30), ("relaxed", 1)]


def test_edf_has_no_admission_control():
    f = registry.create("edf")
    hopeless = [waiting(f"h{i}", prompt=2000, ttft_s=1e-3, tpot_s=1e-3) for i in range(5)]
    plan = f.plan(view(waiting_=hopeless))
    assert all(d.verdict is Verdict.ADMITTED for d in plan.decisions.values())


# ---------------------------------------------------------------- distserve


def test_distserve_prefill_replica_runs_whole_prompts_fcfs():
    f = registry.create("distserve", role="prefill", max_num_batched_tokens=1000)
    plan = f.plan(
        view(
            waiting_=[waiting("a", prompt=700), waiting("b", prompt=400), waiting("c", prompt=200)]
        )
    )
    assert only_step(plan) == {"a": 700}  # b does not fit the budget beside a; c may not overtake


def test_distserve_decode_replica_decodes_all_and_recomputes_missing_kv():
    f = registry.create("distserve", role="decode", max_num_batched_tokens=100)
    moved_without_kv = state("m", prompt=300, computed=0, generated=1)
    plan = f.plan(view(running=[decoding("d1"), moved_without_kv, decoding("d2")]))
    assert only_step(plan) == {"d1": 1, "d2": 1, "m": 98}
    plan = f.plan(view(running=[decoding("d1"), decoding("d2")]))
    assert plan.repeat and dict(plan.repeat[0].num_tokens) == {"d1": 1, "d2": 1}


def test_distserve_is_disaggregated_and_checks_its_role():
    cls = registry.formulation_class("distserve")
    assert cls.disaggregated
    with pytest.raises(ValueError, match="role"):
        registry.create("distserve", role="both")


# ---------------------------------------------------------------- the all-decoding shortcut


def _plan_shape(plan):
    return (
        [dict(s.num_tokens) for s in plan.steps],
        [dict(s.num_tokens) for s in plan.repeat],
        plan.preempt,
        {rid: d.verdict for rid, d in plan.decisions.items()},
    )


@pytest.mark.parametrize(
    "name, params, module",
    [
        ("vllm_fcfs", {}, "vllm"),
        ("vllm_prefill_first", {}, "vllm"),
        ("sarathi", {}, "sarathi"),
        ("edf", {}, "edf"),
        ("distserve", {"role": "decode", "max_num_batched_tokens": 40}, "distserve"),
    ],
)
def test_decode_all_shortcut_equals_the_general_path(name, params, module, monkeypatch):
    import importlib

    import numpy as np

    rng = np.random.default_rng(0)
    # Every baseline reaches the shortcut through batching.start_plan (`module` names its file).
    importlib.import_module(f"formulations.baselines.{module}")
    mod = importlib.import_module("formulations.baselines.batching")
    real_shortcut = mod.decode_all_plan
    taken = []

    def counting(*args, **kwargs):
        plan = real_shortcut(*args, **kwargs)
        taken.append(plan is not None)
        return plan

    for trial in range(60):
        n = int(rng.integers(1, 40))
        running = [
            decoding(
                f"d{i}",
                prompt=int(rng.integers(1, 200)),
                output=int(rng.integers(2, 40)),
                generated=1,
                tpot_s=float(rng.choice([0.03, 0.05, 0.1, 0.1])),
            )
            for i in range(n)
        ]
        for s in running:  # random progress within the output
            extra = int(rng.integers(0, s.request.num_output_tokens - 1))
            s.num_generated_tokens += extra
            s.num_computed_tokens += extra
            s.num_blocks = num_blocks_for(s.num_computed_tokens, BLOCK)
        used = sum(s.num_blocks for s in running)
        v = view(running=running, total=used + int(rng.integers(0, 8)))
        with monkeypatch.context() as m:
            m.setattr(mod, "decode_all_plan", counting)
            fast = registry.create(name, **params).plan(v)
        with monkeypatch.context() as m:
            m.setattr(mod, "decode_all_plan", lambda *a, **k: None)
            general = registry.create(name, **params).plan(v)
        assert _plan_shape(fast) == _plan_shape(general), (name, trial)
    assert 10 <= sum(taken) < len(taken)  # both paths were exercised


def test_vllm_spec_verifies_a_fixed_number_of_drafts_within_the_token_budget():
    """vLLM with a draft model: every decode verifies `num_spec_tokens` drafts, and drafts count
    in the token budget (10 tokens: two decodes of 1 + 4)."""
    import dataclasses

    spec = registry.create("vllm_spec", num_spec_tokens=4, max_num_batched_tokens=10)
    with_drafts = dataclasses.replace(
        view(running=[decoding("a"), decoding("b"), decoding("c")]), max_spec_tokens=4
    )
    plan = spec.plan(with_drafts)
    (step,) = plan.steps
    assert step.num_tokens == {"a": 1, "b": 1} and step.num_spec_tokens == {"a": 4, "b": 4}
    # Everyone decodes with its drafts when the budget allows: the step is the steady cycle.
    roomy = registry.create("vllm_spec", num_spec_tokens=2)
    (cycle,) = roomy.plan(with_drafts).repeat
    assert cycle.num_spec_tokens == {"a": 2, "b": 2, "c": 2}
    # No draft model on the engine: it is vllm_fcfs.
    plain = view(running=[decoding("a")])
    assert roomy.plan(plain) == registry.create("vllm_fcfs").plan(plain)
