"""The adapter loop against a hand-driven planner socket: READY first, plans executed step by step
with a PROGRESS per step, the repeat tail run until a newer plan, late plans clamped, bad frames
counted, and a fresh connection (new identity, new READY) after the planner goes silent."""

from __future__ import annotations

import threading
import time

import msgspec
import pytest
import zmq

from engine_adapters.adapter import AdapterConfig, EngineAdapter
from engine_adapters.sim_engine import SimEngine
from formulations.perf_model import Line, PerfModel
from formulations.plan import Step
from wire import protocol as P

FAST = PerfModel((Line(1e-6, 0.0, 0.002),), "fast")


class FakePlanner:
    def __init__(self):
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind("tcp://127.0.0.1:0")
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)

    def recv(self, timeout_s=5.0, skip_heartbeats=True):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.socket.poll(50):
                identity, *frames = self.socket.recv_multipart()
                message = P.decode(frames, P.ENGINE_TO_PLANNER)
                if skip_heartbeats and isinstance(message, P.Heartbeat):
                    continue
                return identity, message
        raise TimeoutError("no message from the engine")

    def send(self, identity, message):
        self.socket.send_multipart([identity, *P.encode(message)])

    def close(self):
        self.socket.close()
        self.context.term()


@pytest.fixture
def planner():
    fake = FakePlanner()
    yield fake
    fake.close()


def start_adapter(endpoint, engine=None, **config):
    engine = engine or SimEngine(FAST, 64, block_size=16, clock=time.monotonic, sleep=time.sleep)
    adapter = EngineAdapter(engine, AdapterConfig(endpoint, "eng", **config), zmq.Context())
    thread = threading.Thread(target=adapter.run, daemon=True)
    thread.start()
    return adapter, thread


def stop(adapter, thread):
    adapter.stop()
    thread.join(5)
    assert not thread.is_alive()


def plan(plan_id, start, steps, repeat=(), new=()):
    return P.PlanMsg(
        plan_id=plan_id,
        start_step_id=start,
        steps=tuple(Step(s) for s in steps),
        repeat=tuple(Step(s) for s in repeat),
        new_requests=tuple(new),
    )


def test_ready_then_plan_steps_then_repeat_until_finished(planner):
    adapter, thread = start_adapter(planner.endpoint)
    try:
        identity, ready = planner.recv()
        assert isinstance(ready, P.Ready) and ready.protocol_version == P.PROTOCOL_VERSION
        assert ready.engine_id == "eng" and ready.num_total_blocks == 64 and ready.next_step_id == 0
        new = P.EngineRequest("a", num_prompt_tokens=40, max_new_tokens=4)
        planner.send(identity, plan(0, 0, [{"a": 25}, {"a": 15}], [{"a": 1}], [new]))
        reports = [planner.recv()[1] for _ in range(5)]
        assert [r.step_id for r in reports] == [0, 1, 2, 3, 4]
        assert [r.num_computed_tokens["a"] for r in reports] == [25, 15, 1, 1, 1]
        assert [r.num_new_tokens.get("a", 0) for r in reports] == [0, 1, 1, 1, 1]
        assert reports[-1].finished == ("a",) and all(r.plan_id == 0 for r in reports)
        # Nothing live: the engine idles and only heartbeats.
        _, message = planner.recv(skip_heartbeats=False)
        assert isinstance(message, P.Heartbeat)
        assert adapter.stats.num_steps == 5
    finally:
        stop(adapter, thread)


def test_late_plan_is_clamped_to_the_remaining_prompt(planner):
    adapter, thread = start_adapter(planner.endpoint)
    try:
        identity, _ = planner.recv()
        new = P.EngineRequest("a", num_prompt_tokens=30, max_new_tokens=2)
        # Plan 0 covers step 0 only; plan 1 (planned as if step 0 had not run) starts at 0 too.
        planner.send(identity, plan(0, 0, [{"a": 10}], [], [new]))
        first = planner.recv()[1]
        planner.send(identity, plan(1, 0, [{"a": 10}, {"a": 20}], [{"a": 1}]))
        reports = [planner.recv()[1] for _ in range(3)]
        assert first.num_computed_tokens == {"a": 10}
        assert [r.num_computed_tokens["a"] for r in reports] == [10, 10, 1]  # 20 clamped to 10
        assert all(not r.error for r in reports) and reports[-1].finished == ("a",)
        assert adapter.queue.num_late_plans == 1
    finally:
        stop(adapter, thread)


def test_bad_frames_are_counted_and_the_engine_keeps_serving(planner):
    adapter, thread = start_adapter(planner.endpoint)
    try:
        identity, _ = planner.recv()
        planner.socket.send_multipart([identity, b"P", b"\x00not msgpack"])
        planner.socket.send_multipart([identity, b"S", P.encode(P.StatsRequest())[1]])
        planner.send(identity, plan(0, 0, [{"a": 5}], [], [P.EngineRequest("a", 5, 1)]))
        report = planner.recv()[1]
        assert report.finished == ("a",)
        assert adapter.stats.num_rejected_frames == 2
    finally:
        stop(adapter, thread)


def test_reconnects_with_a_fresh_identity_when_the_planner_is_silent(planner):
    adapter, thread = start_adapter(
        planner.endpoint, heartbeat_interval_s=0.05, liveness=3, reconnect_min_s=0.05
    )
    try:
        first_identity, _ = planner.recv()
        planner.send(first_identity, plan(0, 0, [], [], [P.EngineRequest("a", 5, 100)]))
        # Say nothing more: after 3 silent intervals the adapter drops its requests and re-READYs.
        second_identity, ready = planner.recv(timeout_s=5)
        assert isinstance(ready, P.Ready) and second_identity != first_identity
        assert adapter.stats.num_connects >= 2 and not adapter.live
    finally:
        stop(adapter, thread)


def test_step_error_abandons_the_plan_and_reports_it(planner):
    engine = SimEngine(FAST, 2, block_size=16, clock=time.monotonic, sleep=time.sleep)
    adapter, thread = start_adapter(planner.endpoint, engine=engine)
    try:
        identity, _ = planner.recv()
        new = P.EngineRequest("a", num_prompt_tokens=100, max_new_tokens=2)  # needs 7 blocks of 2
        planner.send(identity, plan(0, 0, [{"a": 100}], [{"a": 1}], [new]))
        report = planner.recv()[1]
        assert "out of KV blocks" in report.error
        _, message = planner.recv(skip_heartbeats=False)  # abandoned: no further step
        assert isinstance(message, P.Heartbeat)
        assert adapter.stats.num_step_errors == 1
    finally:
        stop(adapter, thread)


def test_engine_waits_for_the_answer_to_its_report_so_the_plan_is_on_time(planner):
    adapter, thread = start_adapter(
        planner.endpoint, plan_grace_s=2.0, wait_only_when_expected=False
    )
    try:
        identity, _ = planner.recv()
        new = P.EngineRequest("a", num_prompt_tokens=10, max_new_tokens=50)
        planner.send(identity, plan(0, 0, [{"a": 10}], [{"a": 1}], [new]))
        first = planner.recv()[1]
        time.sleep(0.3)  # a slow planner: the engine must still be waiting for its answer
        b = P.EngineRequest("b", num_prompt_tokens=20, max_new_tokens=50)
        answer = plan(1, first.step_id + 1, [{"a": 1, "b": 20}], [{"a": 1, "b": 1}], [b])
        planner.send(identity, msgspec.structs.replace(answer, ack_step_id=first.step_id))
        second = planner.recv()[1]
        assert second.step_id == 1 and second.plan_id == 1  # the new plan, on time
        assert second.num_computed_tokens == {"a": 1, "b": 20}
        assert adapter.queue.num_late_plans == 0 and adapter.stats.num_ack_timeouts == 0
        # Acknowledgements without a plan release the engine too.
        planner.send(identity, P.Heartbeat("planner", ack_step_id=second.step_id))
        third = planner.recv()[1]
        assert third.step_id == 2 and len(adapter.stats.answer_latencies_s) >= 2
        assert adapter.stats.plan_wait_s >= 0.25
    finally:
        stop(adapter, thread)


def test_engine_waits_only_when_the_planner_announced_a_replan(planner):
    adapter, thread = start_adapter(
        planner.endpoint, plan_grace_s=2.0, wait_only_when_expected=True
    )
    try:
        identity, _ = planner.recv()
        planner.send(identity, P.Heartbeat("planner", replan_expected=False))
        new = P.EngineRequest("a", num_prompt_tokens=10, max_new_tokens=5000)
        planner.send(identity, plan(0, 0, [{"a": 10}], [{"a": 1}], [new]))
        start_s = time.monotonic()
        steps = [planner.recv()[1] for _ in range(3)]  # no answers sent: it must not wait
        assert [s.step_id for s in steps] == [0, 1, 2] and time.monotonic() - start_s < 1.5
        planner.send(identity, P.Heartbeat("planner", replan_expected=True))
        reports = list(steps)  # the news may land before or after the engine's next report
        while True:
            try:
                reports.append(planner.recv(timeout_s=0.5)[1])
            except TimeoutError:  # it waits for the answer to its last report
                break
        last = reports[-1]
        assert not last.finished and "a" in adapter.live  # waiting, not done
        planner.send(identity, P.Heartbeat("planner", ack_step_id=last.step_id))
        assert planner.recv()[1].step_id == last.step_id + 1
    finally:
        stop(adapter, thread)


def test_engine_registers_again_when_the_planner_does_not_know_it(planner):
    adapter, thread = start_adapter(planner.endpoint, reconnect_min_s=0.05)
    try:
        first_identity, _ = planner.recv()
        planner.send(
            first_identity, P.ErrorMsg("unknown engine: send READY first", kind="no_ready")
        )
        second_identity, ready = planner.recv(timeout_s=5)
        assert isinstance(ready, P.Ready) and second_identity != first_identity
    finally:
        stop(adapter, thread)


def test_terminating_the_context_under_a_running_adapter_does_not_hang(planner):
    """The owner of the context (a process or a test shutting down) may terminate it while the
    adapter still runs: the adapter closes its sockets and stops, so the termination returns
    (before, closing the monitor raised first and the socket left open blocked it for ever)."""
    adapter, thread = start_adapter(planner.endpoint, heartbeat_interval_s=0.05)
    planner.recv()  # READY: the adapter is connected and polling
    terminated = threading.Event()
    terminator = threading.Thread(
        target=lambda: (adapter.context.term(), terminated.set()), daemon=True
    )
    terminator.start()
    assert terminated.wait(10), "context.term() hung: a socket of the adapter stayed open"
    thread.join(5)
    assert not thread.is_alive()
