"""What one call of the planner core decided (`CoreOutput`), in decision order. Every entry names
the request first, then the replica it concerns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import msgspec

from formulations.plan import Decision
from wire.protocol import EngineRequest, PlanMsg


class VerdictOut(NamedTuple):
    """A final verdict, given once. `replica_id` None: no replica serves the request."""

    request_id: str
    replica_id: int | None
    decision: Decision


class OnReplica(NamedTuple):
    """A request that finished / was preempted / must be dropped by a replica's engine."""

    request_id: str
    replica_id: int


class Forward(NamedTuple):
    """A rejected request the router sent on to another replica."""

    request_id: str
    from_replica: int
    to_replica: int


class Failure(NamedTuple):
    """A request lost for good (no replica left to run it): it gets an explicit error."""

    request_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class Migration:
    """Move a request's KV cache from a prefill replica to a decode replica (disaggregation)."""

    request_id: str
    from_replica: int
    to_replica: int
    num_computed_tokens: int  # KV tokens to transfer
    num_generated_tokens: int
    payload: EngineRequest  # as submitted; the decode engine imports it with the output so far


@dataclass
class CoreOutput:
    plans: dict[int, PlanMsg] = field(default_factory=dict)  # replica id -> its new plan
    verdicts: list[VerdictOut] = field(default_factory=list)
    finished: list[OnReplica] = field(default_factory=list)
    preempted: list[OnReplica] = field(default_factory=list)
    forwards: list[Forward] = field(default_factory=list)
    aborts: list[OnReplica] = field(default_factory=list)  # the engine drops the request
    migrations: list[Migration] = field(default_factory=list)  # KV to move (kv_migration on)
    failed: list[Failure] = field(default_factory=list)
    # Kept KV of tool chains the engine must drop: (chain id, replica id) (planner_svc/chains.py).
    kv_releases: list[OnReplica] = field(default_factory=list)
    # Per replica, whether the core expects to re-plan at its engine's next report (only when the
    # core was made with `announce_replans`; see planner_svc/triggers.py).
    replan_expected: dict[int, bool] = field(default_factory=dict)

    def put_plan(self, replica_id: int, plan: PlanMsg) -> None:
        """Add a plan; a second plan for the same replica in one call replaces the first but keeps
        the first's start, registrations and preemptions (the engine has not seen either yet)."""
        previous = self.plans.get(replica_id)
        if previous is not None:
            plan = msgspec.structs.replace(
                plan,
                start_step_id=previous.start_step_id,
                new_requests=previous.new_requests + plan.new_requests,
                preemptions=tuple(dict.fromkeys(previous.preemptions + plan.preemptions)),
            )
        self.plans[replica_id] = plan
