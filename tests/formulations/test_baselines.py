"""Each baseline's defining behaviour, on hand-made replica views."""

import pytest

from formulations import registry
from formulations.baselines.batching import BlockLedger
from formulations.plan import Verdict
from formulations.state import ReplicaView, RequestState, num_blocks_for
from tests.factories import SIMPLE_MODEL, make_req

BLOCK = 16


def state(rid, prompt=100, output=10, computed=0, generated=0, arrival_s=0.0, verdict=Verdict.ADMITTED, **kw):
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
        0, now_s, model, BLOCK, total, total - used if free is None else free, tuple(running), tuple(waiting_)
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
    assert {rid: d.verdict for rid, d in plan.decisions.items()} == {"w1": Verdict.ADMITTED, "w2": Verdict.ADMITTED}

    plan = f.plan(view(running=[decoding("d1")], waiting_=[waiting("w1", prompt=150), waiting("w2", prompt=250)]))
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
    plan = f.plan(view(waiting_=[waiting("w1", prompt=200), waiting("w2", prompt=10)], total=100, free=10))
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
    # not steady when memory cannot hold every request to its end: one step only
    plan = f.plan(view(running=[decoding("a", output=500), decoding("b", output=500)], free=2))
    assert plan.repeat == () and only_step(plan) == {"a": 1, "b": 1}


# ---------------------------------------------------------------- vllm_prefill_first


def test_prefill_first_runs_whole_prompts_before_decodes():
    f = registry.create("vllm_prefill_first", max_num_batched_tokens=1000)
    v = view(running=[decoding("d1")], waiting_=[waiting("w1", prompt=600), waiting("w2", prompt=600)])
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
