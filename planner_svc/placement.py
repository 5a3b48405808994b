"""Where each unfinished request is, and how the planner core places requests on replicas.

- New requests go to the replica the router picks; a REJECTED verdict sends the request back to
  the router, which forwards it to another replica while it has been rejected at most
  `router.max_forwards` times. After that the fallback applies: `"reject"` gives a final REJECTED
  verdict (replica None), `"best_effort"` runs the request best effort on the least loaded replica.
- When an engine dies, its running requests move (keeping their verdict, recomputing their KV) to
  the least loaded replica of a compatible role; its waiting requests are routed anew. A request
  that has nowhere to go is reported in `failed`.
- Disaggregated policies (DistServe): when a request on a `role="prefill"` replica gets its first
  token, it leaves that replica for the least loaded decode replica. With `kv_migration` the shell
  moves the KV (after its transfer delay) and calls `complete_migration`; without it (the daemon:
  no KV transfer between engines yet) the request is moved at once and recomputes its KV there.

A request placed on a replica whose engine has not been sent it yet is listed in that replica's
`unsent`; the core puts its payload into the replica's next plan.
"""

from __future__ import annotations

from formulations.plan import Decision, Verdict
from formulations.state import RequestState
from planner_svc.chains import ChainBook
from planner_svc.outcome import CoreOutput, Failure, Forward, Migration, OnReplica, VerdictOut
from planner_svc.replica import ReplicaState
from planner_svc.router import Router
from wire.protocol import EngineRequest

FALLBACKS = ("reject", "best_effort")


class Placement:
    def __init__(
        self,
        replicas: dict[int, ReplicaState],
        router: Router,
        fallback: str,
        dirty: set[int],
        replan_on_arrival: bool,
        kv_migration: bool,
        chains: ChainBook | None = None,
    ) -> None:
        if fallback not in FALLBACKS:
            raise ValueError(f"fallback must be one of {FALLBACKS}, got {fallback!r}")
        self.replicas = replicas  # the core's, shared
        self.router = router
        self.fallback = fallback
        self.dirty = dirty  # the core's replicas to reconsider, shared
        self.replan_on_arrival = replan_on_arrival
        self.kv_migration = kv_migration
        self.where: dict[str, int] = {}  # unfinished request id -> replica holding it
        self.tried: dict[str, tuple[int, ...]] = {}  # waiting request -> replicas that rejected it
        self.migrating: dict[str, tuple[RequestState, Migration]] = {}
        self.chains = chains or ChainBook(kv_ttl_s=30.0)  # tool chains' kept KV (chains.py)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self.where or request_id in self.migrating

    def entry_loads(self) -> dict[int, int]:
        """Replicas that take new requests, with their load."""
        return {i: r.load() for i, r in self.replicas.items() if r.spec.role != "decode"}

    # ------------------------------------------------------------------ new requests

    def route(
        self,
        state: RequestState,
        tried: tuple[int, ...],
        out: CoreOutput,
        count_as_try: bool = True,
        last_reason: str = "",
    ) -> None:
        """Put a waiting request on the replica the router picks next (a tool round: the one that
        keeps its chain's KV first, claiming it), or fall back."""
        request = state.request
        loads = self.entry_loads()
        can_try = len(tried) <= self.router.max_forwards or not count_as_try
        target = None
        if can_try:
            home = self.chains.home(request, self.replicas)
            target = self.router.choose(request, loads, tried, home)
        if target is None or target not in loads:
            reason = "rejected by every replica tried"
            self.fall_back(state, out, f"{reason} ({last_reason})" if last_reason else reason)
            return
        if tried and count_as_try:
            out.forwards.append(Forward(request.request_id, tried[-1], target))
        rep = self.replicas[target]
        if rep.kept:
            self.chains.claim(rep, state)
        rep.waiting[request.request_id] = state
        self.where[request.request_id] = target
        self.tried[request.request_id] = tried
        if self.replan_on_arrival:
            rep.replan_requested = True
        self.dirty.add(target)

    def reject(
        self, state: RequestState, replica_id: int, out: CoreOutput, reason: str = ""
    ) -> None:
        """A replica's formulation rejected a waiting request (for `reason`): forward it or fall
        back (the final verdict carries the last replica's reason)."""
        rid = state.request_id
        del self.where[rid]
        self.chains.unclaim(state, self.replicas, out)
        self.route(state, self.tried.pop(rid, ()) + (replica_id,), out, last_reason=reason)

    def fall_back(self, state: RequestState, out: CoreOutput, reason: str) -> None:
        """Best effort on the least loaded replica, or a final rejection."""
        rid = state.request_id
        self.tried.pop(rid, None)
        self.where.pop(rid, None)
        self.chains.unclaim(state, self.replicas, out)
        loads = self.entry_loads()
        if self.fallback == "best_effort" and loads:
            target = min((load, i) for i, load in loads.items())[1]
            state.verdict = Verdict.BEST_EFFORT
            self.place_running(self.replicas[target], state, unsent=True)
            out.verdicts.append(VerdictOut(rid, target, Decision(Verdict.BEST_EFFORT, reason)))
            return
        if not loads:
            reason = "no replica takes new requests"
        if state.request.chain_id is not None:
            self.chains.end(state.request.chain_id)  # a rejected round ends its chain
        out.verdicts.append(VerdictOut(rid, None, Decision(Verdict.REJECTED, reason)))

    def place_running(self, rep: ReplicaState, state: RequestState, unsent: bool) -> None:
        rep.add_running(state)
        if unsent:
            rep.unsent[state.request_id] = None
        self.where[state.request_id] = rep.replica_id
        rep.replan_requested = True
        self.dirty.add(rep.replica_id)

    # ------------------------------------------------------------------ moves

    def move_running(self, state: RequestState, role: str, out: CoreOutput) -> None:
        """Move a running request off its replica, dropping its KV (recompute elsewhere)."""
        rid = state.request_id
        self.where.pop(rid, None)
        state.num_computed_tokens = 0
        state.num_blocks = 0
        options = [
            (r.load(), i) for i, r in self.replicas.items() if r.spec.role in (role, "mixed")
        ]
        if not options:
            out.failed.append(Failure(rid, f"no replica left for a {role} request"))
            return
        self.place_running(self.replicas[min(options)[1]], state, unsent=True)

    def remove_replica(self, rep: ReplicaState, out: CoreOutput) -> None:
        """An engine died: its running requests move, its waiting ones are routed anew."""
        for state in rep.running.values():
            self.move_running(state, rep.spec.role, out)
        for state in rep.waiting.values():
            del self.where[state.request_id]
            self.chains.unclaim(state, self.replicas, out)  # its replica is gone: nothing to free
            self.route(state, self.tried.pop(state.request_id, ()), out, count_as_try=False)

    def start_migration(
        self, rep: ReplicaState, state: RequestState, payload: EngineRequest, out: CoreOutput
    ) -> None:
        """A request on a prefill replica got its first token: off to a decode replica."""
        decode = [(r.load(), i) for i, r in self.replicas.items() if r.spec.role == "decode"]
        if not decode:
            return  # no decode replica: keep decoding here
        rid = state.request_id
        target = min(decode)[1]
        rep.remove_running(rid)
        self.where.pop(rid, None)
        if not self.kv_migration:  # no KV transfer: the engine drops it, the target recomputes
            out.aborts.append(OnReplica(rid, rep.replica_id))
            rep.num_free_blocks += state.num_blocks  # until the engine's next report says
            state.num_computed_tokens = 0
            state.num_blocks = 0
            self.place_running(self.replicas[target], state, unsent=True)
            return
        migration = Migration(
            rid,
            rep.replica_id,
            target,
            state.num_computed_tokens,
            state.num_generated_tokens,
            payload,
        )
        self.migrating[rid] = (state, migration)
        out.migrations.append(migration)

    def complete_migration(
        self, request_id: str, num_computed_tokens: int, out: CoreOutput
    ) -> None:
        """The shell moved a migrating request's KV: `num_computed_tokens` are now cached on the
        decode replica (0 if it could not hold them; the request then recomputes)."""
        entry = self.migrating.pop(request_id, None)
        if entry is None:
            return
        state, migration = entry
        source = self.replicas.get(migration.from_replica)
        if source is not None:  # the prefill engine freed the KV it sent
            source.num_free_blocks += source.blocks_for(migration.num_computed_tokens)
            self.dirty.add(source.replica_id)
        target = self.replicas.get(migration.to_replica)
        if target is None:  # the decode replica died during the transfer
            self.move_running(state, "decode", out)
            return
        state.num_computed_tokens = num_computed_tokens
        state.num_blocks = target.blocks_for(num_computed_tokens)
        self.place_running(target, state, unsent=False)  # the shell registered it there

    def abort(self, request_id: str, out: CoreOutput) -> int | None:
        """Forget a request the client gave up on; the replica that held it (None: none)."""
        replica_id = self.where.pop(request_id, None)
        self.tried.pop(request_id, None)
        if replica_id is None:
            entry = self.migrating.pop(request_id, None)
            if entry is not None:
                out.aborts.append(OnReplica(request_id, entry[1].from_replica))
                out.aborts.append(OnReplica(request_id, entry[1].to_replica))
        return replica_id
