"""The wire protocol: every message round-trips; anything else fails at the boundary as a
ProtocolError (never another exception, never a half-decoded message)."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from formulations.perf_model import perf_model_preset
from formulations.plan import Plan, Step
from wire import protocol as P
from wire.plan_cursor import PlanEnvelope
from wire.step_report import StepReport

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
        engine_id="e0",
        plan_id=3,
        start_step_id=7,
        steps=[P.WireStep({"a": 128, "b": 1}, {"b": 2})],
        repeat=[P.WireStep({"b": 1})],
        new_requests=[P.NewRequest("a", 300, 20, prompt_token_ids=None, seed=5)],
        aborts=["z"],
        preemptions=["y"],
    ),
    P.Progress(
        engine_id="e0",
        step_id=7,
        plan_id=3,
        step_time_s=0.021,
        num_computed_tokens={"a": 128},
        num_new_tokens={"b": 3},
        new_token_ids={"b": [1, 2, 3]},
        num_free_blocks=90,
        finished=["b"],
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
    ),
    P.VerdictMsg("r1", "admitted", "fits", replica_id=1, arrival_s=1.0, ttft_slo_s=0.5, tpot_s=0.1),
    P.Tokens("r1", 2, [5, 6], num_generated_tokens=10, finished=True),
    P.Abort("r1", "client gave up"),
    P.StatsRequest(),
    P.Stats(counters={"x": 1.0}, attainment_by_class={"chatbot": 0.5}, num_engines=2),
    P.ErrorMsg("bad", "r1"),
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
    frames = P.encode(P.PlanMsg(engine_id="e0", plan_id=0, start_step_id=0))
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


def test_step_perf_model_and_envelope_conversions():
    step = Step({"a": 5, "b": 1}, {"b": 3})
    assert P.step_from_wire(P.step_to_wire(step)) == step
    model = perf_model_preset("opt-6.7b-a100")
    assert P.perf_model_from_wire(P.perf_model_to_wire(model)) == model
    assert P.perf_model_from_wire(P.PerfModelSpec(name="opt-13b-h100")) == perf_model_preset(
        "opt-13b-h100"
    )
    envelope = PlanEnvelope(2, 4, 10, Plan(steps=(step,), repeat=(Step({"b": 1}),), preempt=("c",)))
    wire = P.envelope_to_wire(envelope, "e2", [], ["x"])
    back = P.envelope_from_wire(P.decode(P.encode(wire), P.PLANNER_TO_ENGINE), replica_id=2)
    assert back.plan_id == 4 and back.start_step_id == 10
    assert back.plan.steps == (step,) and back.plan.repeat == (Step({"b": 1}),)
    assert back.plan.preempt == ("c",)


def test_progress_report_conversion_restamps_on_the_planner_clock():
    report = StepReport(
        0,
        9,
        start_s=100.0,
        end_s=100.25,
        num_computed_tokens={"a": 4},
        num_new_tokens={"a": 1},
        new_token_ids={"a": [7]},
        num_free_blocks=3,
        finished=("a",),
    )
    wire = P.report_to_progress(report, "e0", plan_id=2)
    back = P.progress_to_report(wire, replica_id=5, end_s=3.0)
    assert back.replica_id == 5 and back.step_id == 9
    assert back.end_s == 3.0 and back.step_time_s == pytest.approx(0.25)
    assert back.num_computed_tokens == {"a": 4} and back.finished == ("a",)
    assert back.new_token_ids == {"a": [7]} and back.num_free_blocks == 3
