"""Walking a plan: which step an engine runs next, with which step id.

Step numbering (shared by the planner core and every engine through `PlanCursor`, so both agree on
when a plan is used up):
- explicit step i of the plan has step id `start_step_id + i`. A step whose every request has
  finished (or is unknown to the engine) is skipped, and its id is skipped with it;
- steps of the repeat cycle get ids `start_step_id + len(steps)`, `+1`, ... in the order executed;
- entries of finished / unknown requests are dropped from a step before it runs.
A new plan replaces the previous one from its `start_step_id` on. After a step the engine could not
execute (a report with `error`), the engine stops running the current plan and waits for the next
one (the core always sends one).
"""

from __future__ import annotations

from collections.abc import Callable, Container

from formulations.plan import Step
from wire.protocol import PlanMsg


class PlanCursor:
    """Walks a plan's explicit steps, then cycles its repeat steps, yielding `(step_id, step)`.

    `is_live(request_id)` tells whether a request still needs work on this engine; entries of other
    requests are dropped. `next_step` returns None when the plan has nothing left to run.
    """

    __slots__ = ("_index", "_next_repeat_id", "_repeat_index", "plan")

    def __init__(self, plan: PlanMsg) -> None:
        self.plan = plan
        self._index = 0
        self._repeat_index = 0
        self._next_repeat_id = plan.end_step_id

    @property
    def in_repeat(self) -> bool:
        """True once the explicit steps are used up."""
        return self._index >= len(self.plan.steps)

    def repeat_more(self, num_steps: int) -> int:
        """After `next_step` returned a step of a one-step repeat cycle, account for `num_steps`
        more runs of it (a fast-forward); returns the last step id used."""
        if len(self.plan.repeat) != 1 or not self.in_repeat:
            raise ValueError("repeat_more needs a plan whose one-step repeat cycle is running")
        self._next_repeat_id += num_steps
        return self._next_repeat_id - 1

    def next_step(self, is_live: Callable[[str], bool] | Container[str]) -> tuple[int, Step] | None:
        """`is_live`: a predicate, or a container of the live request ids (faster)."""
        if not callable(is_live):
            is_live = is_live.__contains__
        plan = self.plan
        while self._index < len(plan.steps):
            step_id = plan.start_step_id + self._index
            step = _live_part(plan.steps[self._index], is_live)
            self._index += 1
            if step is not None:
                return step_id, step
        for _ in range(len(plan.repeat)):
            step = _live_part(plan.repeat[self._repeat_index], is_live)
            self._repeat_index = (self._repeat_index + 1) % len(plan.repeat)
            if step is not None:
                step_id = self._next_repeat_id
                self._next_repeat_id += 1
                return step_id, step
        return None


def _live_part(step: Step, is_live: Callable[[str], bool]) -> Step | None:
    """The step restricted to live requests (the same object when all are live); None if empty."""
    if all(map(is_live, step.num_tokens)):
        return step if step.num_tokens else None
    num_tokens = {rid: n for rid, n in step.num_tokens.items() if is_live(rid)}
    if not num_tokens:
        return None
    num_spec = {rid: n for rid, n in step.num_spec_tokens.items() if rid in num_tokens}
    return Step(num_tokens, num_spec)
