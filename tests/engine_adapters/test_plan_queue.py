"""PlanQueue: pending plans take over at their start step, late plans are re-based, duplicates are
dropped, and the repeat cycle keeps the engine busy until a newer plan comes."""

from __future__ import annotations

from engine_adapters.plan_queue import PlanQueue
from formulations.plan import Step
from wire.protocol import PlanMsg


def envelope(plan_id, start, steps=(), repeat=(), preempt=()):
    return PlanMsg(
        plan_id, start, steps=tuple(steps), repeat=tuple(repeat), preemptions=tuple(preempt)
    )


def live(*ids):
    return set(ids).__contains__


def test_explicit_steps_then_repeat_cycle():
    queue = PlanQueue()
    queue.offer(envelope(0, 0, [Step({"a": 100})], [Step({"a": 1}), Step({"b": 1})]))
    got = [queue.next_step(live("a", "b")) for _ in range(4)]
    assert got == [
        (0, Step({"a": 100})),
        (1, Step({"a": 1})),
        (2, Step({"b": 1})),
        (3, Step({"a": 1})),
    ]


def test_nothing_to_run_without_a_plan_or_when_all_finished():
    queue = PlanQueue()
    assert queue.next_step(live("a")) is None
    queue.offer(envelope(0, 0, [], [Step({"a": 1})]))
    assert queue.next_step(live()) is None


def test_pending_plan_takes_over_at_its_start_step():
    queue = PlanQueue()
    queue.offer(envelope(0, 0, [], [Step({"a": 1})]))
    assert queue.next_step(live("a", "b")) == (0, Step({"a": 1}))
    queue.offer(envelope(1, 2, [Step({"a": 1, "b": 50})], [Step({"a": 1, "b": 1})]))
    assert queue.next_step(live("a", "b")) == (1, Step({"a": 1}))  # old plan until step 2
    assert queue.next_step(live("a", "b")) == (2, Step({"a": 1, "b": 50}))
    assert queue.next_step(live("a", "b")) == (3, Step({"a": 1, "b": 1}))
    assert queue.current_plan_id == 1


def test_duplicate_plan_is_dropped():
    queue = PlanQueue()
    assert queue.offer(envelope(5, 0, [Step({"a": 3})]))
    assert not queue.offer(envelope(5, 0, [Step({"b": 3})]))
    assert not queue.offer(envelope(4, 0, [Step({"b": 3})]))
    assert queue.num_duplicate_plans == 2
    assert queue.next_step(live("a", "b")) == (0, Step({"a": 3}))


def test_late_plan_is_rebased_to_the_next_step():
    queue = PlanQueue()
    queue.offer(envelope(0, 0, [], [Step({"a": 1})]))
    for _ in range(3):
        queue.next_step(live("a", "b"))  # steps 0, 1, 2 ran
    assert queue.offer(envelope(1, 2, [Step({"b": 7})], []))  # planned for step 2: late
    assert queue.num_late_plans == 1
    assert queue.next_step(live("a", "b")) == (3, Step({"b": 7}))


def test_adoption_callback_sees_preemptions_and_abandon_waits_for_a_plan():
    queue = PlanQueue()
    adopted = []
    queue.offer(envelope(0, 0, [Step({"a": 2})], [Step({"a": 1})], preempt=["z"]))
    queue.next_step(live("a"), adopted.append)
    assert [e.preemptions for e in adopted] == [("z",)]
    queue.abandon()
    assert queue.next_step(live("a")) is None


def test_finished_requests_are_filtered_and_empty_explicit_steps_skipped():
    queue = PlanQueue()
    queue.offer(envelope(0, 0, [Step({"a": 1, "b": 1}), Step({"b": 1}), Step({"a": 1})]))
    assert queue.next_step(live("a")) == (0, Step({"a": 1}))
    assert queue.next_step(live("a")) == (2, Step({"a": 1}))  # step 1 had only b: skipped
