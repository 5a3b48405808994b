"""Fast-forward of steady decode cycles in the simulator.

A replica whose plan is in a one-step repeat cycle of plain decodes, under an exact truth model,
runs identical steps of constant time until one of its requests finishes. Instead of one event per
step, the simulator schedules one "cruise" event at the end of those runs and applies them at once
(engine, core, per-token times). This gives the same result as single steps (a test compares them)
because nothing in between can change what the replica does: the core re-plans a busy replica only
at a step boundary after a trigger, so after every event the simulator asks the core whether a
trigger fired for a cruising replica (`replan_pending`, `timer_due_s`) and, if so, cuts the cruise
at the first boundary where single steps would have re-planned.
"""

from __future__ import annotations

import math

from formulations.plan import Step

CRUISE = 5  # the simulator's event kind for a cruise's end


class Cruise:
    """A fast-forward: `num_steps` runs of one plain-decode repeat step from `start_s`, each taking
    `step_time_s`; engine, core and records see them at once when the cruise ends."""

    __slots__ = ("end_s", "first_step_id", "num_steps", "start_s", "step", "step_time_s")

    def __init__(
        self, step: Step, first_step_id: int, start_s: float, step_time_s: float, num_steps: int
    ) -> None:
        self.step = step
        self.first_step_id = first_step_id
        self.start_s = start_s
        self.step_time_s = step_time_s
        self.num_steps = num_steps
        self.end_s = self.boundary_s(num_steps)

    def boundary_s(self, j: int) -> float:
        """End of run j, accumulated run by run exactly as the engine stamps single steps."""
        t = self.start_s
        for _ in range(j):
            t += self.step_time_s
        return t

    def run_ends_s(self) -> list[float]:
        ends = []
        t = self.start_s
        for _ in range(self.num_steps):
            t += self.step_time_s
            ends.append(t)
        return ends

    def first_boundary_at_or_after(self, at_s: float) -> int:
        """Smallest run count j >= 1 whose end is at or after `at_s`."""
        j = max(1, math.ceil((at_s - self.start_s) / self.step_time_s) - 1)
        while j > 1 and self.boundary_s(j - 1) >= at_s:
            j -= 1
        while self.boundary_s(j) < at_s:
            j += 1
        return j


class FastForward:
    """The simulator's cruise handling (mixed into `lab.simulator.Simulation`, whose `runners`,
    `core`, `_push`, `_on_step` and counters it uses)."""

    def _try_cruise(self, runner, step_id: int, step: Step, now_s: float) -> bool:
        cursor = runner.cursor
        if not cursor.in_repeat or len(cursor.plan.repeat) != 1:
            return False
        if self.core.replan_pending(runner.replica_id):
            return False
        num_steps = runner.engine.repeatable_steps(step)
        if num_steps < 2:
            return False
        step_time_s = runner.engine.truth.step_time_s(step.num_batched_tokens, 0, 0)
        cruise = Cruise(step, step_id, now_s, step_time_s, num_steps)
        due_s = self.core.timer_due_s(runner.replica_id)
        if due_s is not None and due_s < cruise.end_s:
            cruise = Cruise(
                step, step_id, now_s, step_time_s, cruise.first_boundary_at_or_after(due_s)
            )
            if cruise.num_steps < 2:
                return False
        runner.engine.reserve_repeat(step, cruise.num_steps)
        runner.cruise = cruise
        runner.busy = True
        self._cruising[runner.replica_id] = runner
        self._push(cruise.end_s, CRUISE, (runner.replica_id, cruise))
        return True

    def _cut_cruises(self, now_s: float) -> None:
        for runner in list(self._cruising.values()):
            cruise = runner.cruise
            replica_id = runner.replica_id
            if self.core.replan_pending(replica_id):
                at_s = now_s
            else:
                due_s = self.core.timer_due_s(replica_id)
                if due_s is None or due_s >= cruise.end_s:
                    continue
                at_s = max(due_s, now_s)
            num_steps = cruise.first_boundary_at_or_after(at_s)
            if num_steps < cruise.num_steps:
                cut = Cruise(
                    cruise.step, cruise.first_step_id, cruise.start_s, cruise.step_time_s, num_steps
                )
                runner.cruise = cut
                self._push(cut.end_s, CRUISE, (replica_id, cut))

    def _on_cruise_end(self, now_s: float, payload: tuple[int, Cruise]) -> None:
        replica_id, cruise = payload
        runner = self.runners.get(replica_id)
        if runner is None or runner.cruise is not cruise:
            return  # superseded by a cut, or the replica died
        self._finish_cruise(runner, cruise.num_steps, now_s)

    def _finish_cruise(self, runner, num_steps: int, now_s: float) -> None:
        cruise = runner.cruise
        runner.cruise = None
        del self._cruising[runner.replica_id]
        last_id = runner.cursor.repeat_more(num_steps - 1)
        report = runner.engine.execute_repeated(cruise.step, last_id, num_steps, cruise.start_s)
        self.num_steps += num_steps - 1
        self.num_fast_forward_steps += num_steps
        cruise.num_steps = num_steps
        self._on_step(report.end_s, (runner.replica_id, report), cruise.run_ends_s())

    def _stop_cruise(self, runner, at_s: float) -> None:
        """End a cruise at `at_s`: the runs completed by then did happen (as single steps would
        have been reported), the one in flight is dropped."""
        cruise = runner.cruise
        if cruise is None:
            return
        num_done = cruise.first_boundary_at_or_after(at_s)
        if cruise.boundary_s(num_done) > at_s:
            num_done -= 1
        if num_done >= 1:
            self.last_event_s = max(self.last_event_s, cruise.boundary_s(num_done))
            self._finish_cruise(runner, num_done, at_s)
        else:
            runner.cruise = None
            del self._cruising[runner.replica_id]

    def _stop_cruises(self, end_s: float) -> None:
        """At the end of the run, apply the cruise runs that completed by `end_s`."""
        for runner in list(self._cruising.values()):
            if runner.cruise.end_s > end_s:
                self._stop_cruise(runner, end_s)
