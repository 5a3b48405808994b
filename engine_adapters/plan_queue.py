"""Which step an engine runs next, given the plans the planner streams to it.

The step numbering is the planner core's (`wire.plan_cursor.PlanCursor`, shared so that both
sides agree on step ids): explicit step i of a plan has id `start_step_id + i` (a step with nothing
live left is skipped with its id), then the repeat cycle continues with consecutive ids until a
newer plan takes over.

The planner sends the plan for step k+2 while step k+1 runs, so a new plan usually waits here as
*pending* until its start step comes. It replaces the current plan from its `start_step_id` on:
when the current plan's next step would have an id at or past that start, or has nothing left.
A plan whose id is not newer than every id seen is a duplicate and is dropped. A plan whose start
step has already run is *late* (the planner planned from step k's report while the engine ran step
k+1 from the previous plan): it is still the newest word of the planner, so it is kept and re-based
to start at the engine's next step, and counted (`num_late_plans`). Dropping late plans would
starve the engine of every plan whenever planning takes longer than the gap between steps; the
adapter clamps each entry to the tokens the request still needs, which absorbs the one step of lag.
After a step the engine could not execute, the current plan is abandoned and the engine waits for
the next one (the core always sends one).
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from formulations.plan import Step
from wire.plan_cursor import PlanCursor
from wire.protocol import PlanMsg


class PlanQueue:
    def __init__(self) -> None:
        self.cursor: PlanCursor | None = None
        self.pending: PlanMsg | None = None
        self.last_plan_id: int | None = None
        self.last_step_id = -1  # id of the last step handed out
        self.num_late_plans = 0
        self.num_duplicate_plans = 0

    @property
    def current_plan_id(self) -> int:
        return self.cursor.plan.plan_id if self.cursor is not None else 0

    def offer(self, plan: PlanMsg) -> bool:
        """Keep `plan` as the pending plan unless it is a duplicate (then returns False)."""
        if self.last_plan_id is not None and plan.plan_id <= self.last_plan_id:
            self.num_duplicate_plans += 1
            return False
        self.last_plan_id = plan.plan_id
        if plan.start_step_id <= self.last_step_id:
            self.num_late_plans += 1
            plan = msgspec.structs.replace(plan, start_step_id=self.last_step_id + 1)
        self.pending = plan  # a newer plan replaces an older pending one
        return True

    def next_step(
        self,
        is_live: Callable[[str], bool],
        on_adopt: Callable[[PlanMsg], None] = lambda plan: None,
    ) -> tuple[int, Step] | None:
        """`(step_id, step)` to run next, restricted to live requests; None: nothing to run until
        a newer plan arrives."""
        if self.pending is not None and self.pending.start_step_id <= self.last_step_id + 1:
            self._adopt(on_adopt)
        found = self.cursor.next_step(is_live) if self.cursor is not None else None
        if self.pending is not None and (found is None or found[0] >= self.pending.start_step_id):
            self._adopt(on_adopt)  # the old plan's step would overlap the new plan: drop it
            found = self.cursor.next_step(is_live)
        if found is not None:
            self.last_step_id = found[0]
        return found

    def abandon(self) -> None:
        """Stop running the current plan (after a step the engine could not execute)."""
        self.cursor = None

    def _adopt(self, on_adopt: Callable[[PlanMsg], None]) -> None:
        assert self.pending is not None
        self.cursor, self.pending = PlanCursor(self.pending), None
        on_adopt(self.cursor.plan)
