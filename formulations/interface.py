"""The contract between the planner core and a planning formulation.

A formulation turns a `ReplicaView` (the replica's requests, their progress, its memory, and the
performance model) into a `Plan`: verdicts for the waiting requests, explicit steps, and a steady
cycle to repeat until the next plan. It never reads a clock, touches a socket or keeps references to
the view's mutable objects beyond the call; whatever it remembers between calls (a warm start, an
acceptance-rate estimate) lives on the instance, one instance per replica.

The planner core calls `plan` when the explicit steps of the previous plan run out, when requests
arrive or finish, on a timer, and when an engine reports a step it could not execute. A formulation
that plans one step at a time (the vLLM-style baselines) simply returns one step; one that plans a
horizon (the DP) returns many.

Rules every plan must keep (the core and the engines check them):
- a step names only running requests or waiting requests admitted in the same plan;
- `num_tokens[rid]` is between 1 and the request's pending tokens at that point of the plan;
- speculative tokens go only to decoding requests, at most `view.max_spec_tokens`;
- every waiting request gets a decision (a waiting request left without one stays waiting).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from formulations.pauses import PauseEstimate
from formulations.plan import Plan
from formulations.state import ReplicaView, RequestState

# "host": copied to host memory, only where the engine offers it (ReplicaView.num_host_free_blocks)
KV_RETENTIONS = ("drop", "pinned", "evictable", "host")


class Formulation(ABC):
    """A planning policy. Subclasses are registered by name (see `formulations.registry`)."""

    name: ClassVar[str] = ""
    # True when the policy runs separate prefill and decode replicas (DistServe-style).
    disaggregated: ClassVar[bool] = False
    # True when the policy decides admission against the SLOs: the core then gives a request it
    # has not decided on by its TTFT deadline the fallback verdict, so that clients always hear
    # back in time. False for queueing policies (the vLLM-style baselines admit, i.e. queue,
    # whatever fits in memory, as vLLM does, and never answer "too late").
    admission_control: ClassVar[bool] = True

    @abstractmethod
    def plan(self, view: ReplicaView) -> Plan:
        """Plan the replica's next steps and decide on its waiting requests."""

    def kv_retention(self, view: ReplicaView, state: RequestState, pause: PauseEstimate) -> str:
        """What happens to the KV of `state`, a round of a tool chain being admitted, when it
        finishes and the chain pauses for a tool call (`pause`: the predicted pause): one of
        KV_RETENTIONS. The default is vLLM's automatic prefix caching: the blocks stay cached but
        count as free and are evicted least recently used first ("evictable")."""
        return "evictable"
