"""The wire protocol: every message round-trips; anything else fails at the boundary as a
ProtocolError (never another exception, never a half-decoded message)."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from formulations.perf_model import perf_model_preset
from formulations.plan import Step
from wire import protocol as P

ALL_TYPES = frozenset(P.MessageType)

SAMPLES = [
    P.Ready(
        protocol_version=P.PROTOCOL_VERSION,
        engine_id="e0",
        num_total_blocks=100,
        block_size=16,
        perf_model=P.PerfModelSpec("m", [(1e-4, 0.0, 0.02)]),
        max_spec_tokens=4,
    ),
    P.PlanMsg(
        plan_id=3,
        start_step_id=7,
        steps=(Step({"a": 128, "b": 1}, {"b": 2}),),
        repeat=(Step({"b": 1}),),
        new_requests=(P.EngineRequest("a", 300, 20, prompt_token_ids=None, seed=5),),
        aborts=("z",),
        preemptions=("y",),
    ),
    P.StepReport(
        step_id=7,
        plan_id=3,
        start_s=1.0,
        end_s=1.021,
        num_computed_tokens={"a": 128},
        num_new_tokens={"b": 3},
        new_token_ids={"b": [1, 2, 3]},
        num_free_blocks=90,
        finished=("b",),
    ),
    P.Heartbeat("e0", 12.5),
    P.Submit(
        request_id="r1",
        max_tokens=64,
        prompt_token_ids=[1, 2, 3],
        slo_class="reasoning",
        thinking_tokens=40,
        thinking_tpot_ms=50.0,
        chain_id="c",
        round_index=2,
        chain_last_round=True,
    ),
    P.VerdictMsg("r1", "admitted", "fits", replica_id=1, arrival_s=1.0, ttft_slo_s=0.5, tpot_s=0.1),
    P.Tokens("r1", 2, [5, 6], num_generated_tokens=10, finished=True),
    P.Abort("r1", "client gave up"),
    P.StatsRequest(),
    P.Stats(counters={"x": 1.0}, attainment_by_class={"chatbot": 0.5}, num_engines=2),
    P.ErrorMsg("bad", "r1"),
    P.ReleaseKV(("chain-1", "chain-2")),
]


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(message):
    frames = P.encode(message)
    assert len(frames) == 2 and len(frames[0]) == 1
    assert P.decode(frames, ALL_TYPES) == message


def test_type_bytes_are_distinct():
    values = [t.value for t in P.MessageType]
    assert len(set(values)) == len(values) == len(P.MESSAGE_CLASSES)


def test_unexpected_type_is_rejected_on_that_socket():
    frames = P.encode(P.PlanMsg(plan_id=0, start_step_id=0))
    with pytest.raises(P.ProtocolError, match="not expected"):
        P.decode(frames, P.CLIENT_TO_PLANNER)


def test_oversized_payload_is_rejected_before_decoding():
    frames = P.encode(P.Submit(request_id="r", max_tokens=1, prompt_token_ids=list(range(5000))))
    with pytest.raises(P.ProtocolError, match="exceeds"):
        P.decode(frames, P.CLIENT_TO_PLANNER, max_frame_bytes=1024)


@pytest.mark.parametrize(
    "frames, match",
    [
        ([b"S"], "expected 2 frames"),
        ([b"S", b"", b""], "expected 2 frames"),
        ([b"?", b"\x80"], "unknown message type"),
        ([b"SS", b"\x80"], "unknown message type"),
        ([b"S", b"\xc1garbage"], "malformed SUBMIT"),
        ([b"S", msgpack.packb([1, 2, 3])], "malformed SUBMIT"),
        ([b"S", msgpack.packb({"request_id": "r"})], "malformed SUBMIT"),  # max_tokens missing
        ([b"S", msgpack.packb({"request_id": "r", "max_tokens": "many"})], "malformed SUBMIT"),
        ([b"S", msgpack.packb({"request_id": "r", "max_tokens": 0})], "malformed SUBMIT"),
        ([b"S", msgpack.packb({"request_id": "", "max_tokens": 3})], "malformed SUBMIT"),
        (
            [b"S", msgpack.packb({"request_id": "r", "max_tokens": 3, "tpot_ms": -1.0})],
            "malformed SUBMIT",
        ),
    ],
)
def test_malformed_frames_raise_protocol_error(frames, match):
    with pytest.raises(P.ProtocolError, match=match):
        P.decode(frames, ALL_TYPES)


def test_progress_rejects_negative_token_counts():
    payload = msgpack.packb(
        {
            "engine_id": "e",
            "step_id": 1,
            "plan_id": 0,
            "step_time_s": 0.1,
            "num_new_tokens": {"a": -3},
        }
    )
    with pytest.raises(P.ProtocolError):
        P.decode([b"G", payload], P.ENGINE_TO_PLANNER)


def test_unknown_fields_are_ignored_for_forward_compatibility():
    payload = msgpack.packb(
        {"request_id": "r", "max_tokens": 3, "num_prompt_tokens": 4, "a_future_field": [1, 2]}
    )
    message = P.decode([b"S", payload], P.CLIENT_TO_PLANNER)
    assert message == P.Submit(request_id="r", max_tokens=3, num_prompt_tokens=4)


def test_pickle_payloads_are_not_unpickled():
    import pickle

    payload = pickle.dumps({"request_id": "r", "max_tokens": 3})
    with pytest.raises(P.ProtocolError):
        P.decode([b"S", payload], P.CLIENT_TO_PLANNER)


@settings(max_examples=300, deadline=None)
@given(type_byte=st.sampled_from([t.value for t in P.MessageType]), payload=st.binary(max_size=200))
def test_random_payloads_only_ever_raise_protocol_error(type_byte, payload):
    try:
        message = P.decode([type_byte, payload], ALL_TYPES)
    except P.ProtocolError:
        return
    assert isinstance(message, P.MESSAGE_CLASSES[P.MessageType(type_byte)])


def test_submit_needs_a_prompt():
    with pytest.raises(ValueError, match="prompt"):
        _ = P.Submit(request_id="r", max_tokens=3).prompt_length
    assert P.Submit(request_id="r", max_tokens=3, prompt_token_ids=[1, 2]).prompt_length == 2


def test_plans_carry_the_formulations_steps_and_perf_models_cross_the_wire():
    step = Step({"a": 5, "b": 1}, {"b": 3})
    plan = P.PlanMsg(4, 10, steps=(step,), repeat=(Step({"b": 1}),), preemptions=("c",))
    back = P.decode(P.encode(plan), P.PLANNER_TO_ENGINE)
    assert back == plan and back.end_step_id == 11
    assert isinstance(back.steps[0], Step) and back.steps[0] == step
    model = perf_model_preset("opt-6.7b-a100")
    assert P.perf_model_from_wire(P.perf_model_to_wire(model)) == model
    assert P.perf_model_from_wire(P.PerfModelSpec(name="opt-13b-h100")) == perf_model_preset(
        "opt-13b-h100"
    )


@pytest.mark.parametrize(
    "step",
    [
        {"num_tokens": {"a": 0}},
        {"num_tokens": {"a": -2}},
        {"num_tokens": {"a": 1}, "num_spec_tokens": {"a": -1}},
        {"num_tokens": {"a": 1}, "num_spec_tokens": {"b": 2}},  # drafts for a request not in it
    ],
)
def test_decoded_plans_reject_bad_token_counts(step):
    payload = msgpack.packb({"plan_id": 0, "start_step_id": 0, "repeat": [step]})
    with pytest.raises(P.ProtocolError, match="PLAN"):
        P.decode([b"P", payload], P.PLANNER_TO_ENGINE)


def test_a_resumed_payload_recomputes_the_output_so_far():
    request = P.EngineRequest("a", 3, 10, prompt_token_ids=[1, 2, 3], seed=4)
    assert request.resumed([7, 8], 0) is request
    moved = request.resumed([7, 8], 2)
    assert (moved.num_prompt_tokens, moved.max_new_tokens) == (5, 8)
    assert moved.prompt_token_ids == [1, 2, 3, 7, 8] and moved.seed == 4
    # ids not all known (a count-only engine): the prompt length still grows, ids are dropped
    assert request.resumed([7], 2).prompt_token_ids is None
    with pytest.raises(ValueError, match="length"):
        P.EngineRequest("b", 2, 1, prompt_token_ids=[1])


def test_kv_retention_fields_default_to_the_old_behaviour():
    """A READY from an engine that predates kv_retention says it keeps nothing; RELEASE_KV goes
    only to engines and needs chain ids."""
    old_ready = msgpack.packb(
        {"protocol_version": 2, "engine_id": "e", "num_total_blocks": 8, "block_size": 16}
    )
    assert P.decode([b"R", old_ready], P.ENGINE_TO_PLANNER).kv_retention is False
    release = P.encode(P.ReleaseKV(("c",)))
    assert P.decode(release, P.PLANNER_TO_ENGINE) == P.ReleaseKV(("c",))
    with pytest.raises(P.ProtocolError, match="not expected"):
        P.decode(release, P.ENGINE_TO_PLANNER)
    with pytest.raises(P.ProtocolError, match="malformed"):
        P.decode([b"K", msgpack.packb({"chain_ids": [""]})], P.PLANNER_TO_ENGINE)
