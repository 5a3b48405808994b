"""What the planner core knows of tool chains (docs/AGENTS.md): which chains were admitted (their
later rounds are protected), when each paused for a tool call (the pauses it learns from), the KV
each replica keeps for a paused chain, and the kept KV a waiting round has claimed.

Kept KV (`KeptKV`, in `ReplicaState.kept` by chain id) is the core's mirror of what the replica's
engine keeps after a round finished with `EngineRequest.retain_kv`: "pinned" entries are held
(not free) until the next round attaches them or the core releases them at their time-to-live;
"evictable" entries count as free and the engine evicts them least recently used first (its
reports say which). A round routed to the replica that keeps its chain's KV claims the entry
while it waits for its verdict: its state starts with those tokens computed, so that the
formulation plans only the new ones. If it leaves that replica unadmitted (rejected, expired,
aborted) the entry is released; if it is admitted its payload tells the engine to attach it.

The book also keeps the chain forecast (formulations/chain_forecast.py): every round that arrives
learns whether its chain continued and how many tokens it added, every round that finishes how
many it generated, and a chain whose next round has not come within `kv_ttl_s` of its last round
counts as ended (a client may also say a round is its chain's last). Each arriving round carries
the chance of a next round (`RequestState.chain_next_p`), and each kept entry the blocks the
chain is expected to need back
(`KeptKV.next_round`: from one predicted pause on, for as long as the finished round took), so
that a formulation can plan the chain, not only the call.
"""

from __future__ import annotations

from dataclasses import dataclass

from formulations.chain_forecast import ChainForecast
from formulations.pauses import PausePredictor
from formulations.progress import num_blocks_for
from formulations.request import Request
from formulations.state import ExpectedRound, RequestState
from planner_svc.outcome import CoreOutput, OnReplica
from planner_svc.replica import KeptKV, ReplicaState

# Pinned KV of paused chains never holds more than this share of a replica's blocks: the oldest
# entries are released first (formulations decide to pin when a round is admitted, and rounds
# admitted together may finish together; a replica whose blocks were all pinned would stall).
MAX_PINNED_SHARE = 0.5
# Kept KV waits at most this many predicted pauses (90th percentile) for its next round
# (measured on tool_agent at 1500 KV blocks: 0.208 -> 0.231 chains/s/GPU against the 30 s
# time-to-live alone; docs/AGENTS.md).
KEEP_PAUSES = 2.0
# A paused chain's next round is planned at this many equally likely pauses (chains._next_round).
PAUSE_ATOMS = 4
# A chain not heard of for this long is forgotten (its protection and its pause start), so that
# chains whose last round never comes (a client gone) do not accumulate.
CHAIN_IDLE_S = 600.0


@dataclass(slots=True)
class _Pause:
    """A chain between rounds: its last round finished at `since_s`."""

    since_s: float
    slo_class: str
    round_index: int  # of the round that finished
    num_context_tokens: int  # its prompt and output: the context the next round extends
    counted_ended: bool = False  # no round came within the time-to-live (chain_forecast.py)


@dataclass
class ChainStats:
    num_claims: int = 0  # rounds that found their chain's KV kept on the replica they went to
    num_misses: int = 0  # claimed KV the engine no longer held (recomputed)
    num_partial_hits: int = 0  # claimed KV the engine held only a leading part of
    num_releases: int = 0  # kept entries released by the core (time-to-live, unused, ended)
    # rounds >= 1 of a chain not admitted here (never seen, ended by a rejection, forgotten after
    # CHAIN_IDLE_S, or a planner restart): served as fresh requests, unprotected
    num_unknown_rounds: int = 0


class ChainBook:
    def __init__(
        self,
        kv_ttl_s: float,
        pauses: PausePredictor | None = None,
        forecast: ChainForecast | None = None,
    ) -> None:
        if kv_ttl_s <= 0:
            raise ValueError("kv_ttl_s must be positive")
        self.kv_ttl_s = kv_ttl_s
        self.pauses = pauses or PausePredictor()
        self.forecast = forecast or ChainForecast()
        self.admitted: dict[str, float] = {}  # chain id -> last time it was heard of
        self.paused: dict[str, _Pause] = {}  # chain id -> its pause, while between rounds
        self.claims: dict[str, tuple[int, KeptKV]] = {}  # waiting round -> (replica, entry)
        self.stats = ChainStats()

    # ------------------------------------------------------------------ rounds arriving

    def arrived(self, state: RequestState, now_s: float) -> None:
        """A round arrived: learn the pause it ended and that its chain continued; give it its
        chain's forecast; a later round of an admitted chain is protected."""
        request = state.request
        chain_id = request.chain_id
        if chain_id is None:
            return
        pause = self.paused.pop(chain_id, None)
        if pause is not None:
            self.pauses.observe(request.slo_class, now_s - pause.since_s)
            if pause.counted_ended:
                self.forecast.ended(pause.slo_class, pause.round_index, count=-1)
            num_added = request.num_prompt_tokens - pause.num_context_tokens
            self.forecast.continued(pause.slo_class, pause.round_index, num_added)
        state.chain_next_p = self.forecast.continue_probability(
            request.slo_class, request.round_index
        )
        if request.round_index > 0 and chain_id in self.admitted:
            state.protected = True
            self.admitted[chain_id] = now_s
        elif request.round_index > 0:
            self.stats.num_unknown_rounds += 1

    def home(self, request: Request, replicas: dict[int, ReplicaState]) -> int | None:
        """The replica that keeps the chain's KV (None: none does)."""
        if request.chain_id is None:
            return None
        for replica_id, rep in replicas.items():
            if request.chain_id in rep.kept:
                return replica_id
        return None

    def claim(self, rep: ReplicaState, state: RequestState) -> None:
        """A round placed on `rep` takes its chain's kept KV there (when it leaves a token to
        compute): its state starts with those tokens computed."""
        chain_id = state.request.chain_id
        entry = rep.kept.get(chain_id) if chain_id is not None else None
        if entry is None or entry.num_tokens >= state.num_prompt_tokens:
            return
        del rep.kept[chain_id]
        if not entry.pinned:  # counted free by the engine until now, or to be copied in
            rep.num_free_blocks -= entry.num_blocks
        state.num_computed_tokens = entry.num_tokens
        state.num_blocks = entry.num_blocks
        self.claims[state.request_id] = (rep.replica_id, entry)
        self.stats.num_claims += 1

    def unclaim(
        self, state: RequestState, replicas: dict[int, ReplicaState], out: CoreOutput
    ) -> None:
        """A waiting round leaves the replica whose kept KV it claimed, unadmitted: the entry is
        released (its next home, if any, recomputes)."""
        claim = self.claims.pop(state.request_id, None)
        if claim is None:
            return
        replica_id, entry = claim
        state.num_computed_tokens = 0
        state.num_blocks = 0
        rep = replicas.get(replica_id)
        if rep is not None:  # the claim took the entry's blocks from the free ones: give them back
            self._released(rep, entry.chain_id, entry.num_blocks, out)

    def attach(self, request_id: str) -> int:
        """An admitted round: the tokens its engine attaches from the kept KV (0: none)."""
        claim = self.claims.pop(request_id, None)
        return claim[1].num_tokens if claim is not None else 0

    # ------------------------------------------------------------------ rounds ending

    def admitted_round(self, request: Request, now_s: float) -> None:
        """A round got an admitting verdict: its chain's later rounds are protected from now on.
        Usually round 0; a later round of a chain unknown here (served as a fresh request: after a
        restart, a rejection, or CHAIN_IDLE_S) starts the protection the same way."""
        if request.chain_id is not None:
            self.admitted[request.chain_id] = now_s

    def finished(
        self,
        rep: ReplicaState,
        state: RequestState,
        retain_kv: str,
        now_s: float,
        out: CoreOutput,
    ) -> None:
        """A round finished on `rep`: keep its KV as its engine does, or end the chain."""
        request = state.request
        chain_id = request.chain_id
        if chain_id is None:
            return
        self.forecast.generated(request.slo_class, state.num_generated_tokens)
        if request.chain_last_round:  # only a client (or the oracle ablation) can say so
            self.forecast.ended(request.slo_class, request.round_index)
            self.end(chain_id)
            return
        num_context = state.num_prompt_tokens + state.num_generated_tokens
        self.paused[chain_id] = _Pause(now_s, request.slo_class, request.round_index, num_context)
        if retain_kv == "drop" or state.num_blocks == 0:
            return
        pinned = retain_kv == "pinned"
        on_host = retain_kv == "host"  # the engine's LRU of host memory may also drop it
        rep.kept[chain_id] = KeptKV(
            chain_id,
            state.num_computed_tokens,
            state.num_blocks,
            pinned,
            now_s + self._keep_s(request.slo_class) if pinned or on_host else None,
            on_host,
            self._next_round(state, pinned, now_s),
        )
        if pinned:
            self.release_pinned(rep, out, MAX_PINNED_SHARE * rep.spec.num_total_blocks)

    def release_pinned(self, rep: ReplicaState, out: CoreOutput, max_blocks: float = 0) -> int:
        """Release pinned entries of `rep`, oldest first, until at most `max_blocks` stay
        pinned; returns the blocks released (its engine frees them when told)."""
        pinned = sorted((e for e in rep.kept.values() if e.pinned), key=lambda e: e.expires_s)
        num_pinned = sum(e.num_blocks for e in pinned)
        num_released = 0
        for entry in pinned:
            if num_pinned <= max_blocks:
                break
            del rep.kept[entry.chain_id]
            num_pinned -= entry.num_blocks
            num_released += entry.num_blocks
            self._released(rep, entry.chain_id, entry.num_blocks, out)
        return num_released

    def _released(self, rep: ReplicaState, chain_id: str, num_freed: int, out: CoreOutput) -> None:
        """A kept entry the core gave up: `num_freed` blocks become free, its engine is told."""
        rep.num_free_blocks += num_freed
        out.kv_releases.append(OnReplica(chain_id, rep.replica_id))
        self.stats.num_releases += 1

    def _keep_s(self, slo_class: str) -> float:
        """How long kept KV waits for its next round: the time-to-live, or KEEP_PAUSES times the
        class's predicted pause (90th percentile) if shorter; a round that has not come by then
        most likely never will (the planner cannot tell a chain's last round)."""
        return min(self.kv_ttl_s, KEEP_PAUSES * self.pauses.predict(slo_class).quantile_s)

    def _next_round(
        self, state: RequestState, pinned: bool, now_s: float
    ) -> tuple[ExpectedRound, ...]:
        """The chain's next round as expected when this one finished: the context back and the
        tokens a round adds (less what stays pinned), for as long as this round took, from one
        of PAUSE_ATOMS equally likely pauses (pauses.py), with the chance that it comes shared
        among them."""
        request = state.request
        num_context = state.num_prompt_tokens + state.num_generated_tokens
        num_tokens = num_context + round(self.forecast.tokens_per_round(request.slo_class))
        if pinned:
            num_tokens -= state.num_computed_tokens
        duration_s = max(0.0, now_s - request.arrival_s)
        probability = state.chain_next_p / PAUSE_ATOMS
        return tuple(
            ExpectedRound(
                request.chain_id,
                max(0, num_tokens),
                now_s + pause_s,
                now_s + pause_s + duration_s,
                probability,
            )
            for pause_s in self.pauses.atoms(request.slo_class, PAUSE_ATOMS)
        )

    def end(self, chain_id: str) -> None:
        """The chain ended (its last round finished, a round was rejected or aborted)."""
        self.admitted.pop(chain_id, None)
        self.paused.pop(chain_id, None)

    # ------------------------------------------------------------------ engines' news, timers

    def evicted(self, rep: ReplicaState, chain_ids: tuple[str, ...]) -> None:
        for chain_id in chain_ids:
            entry = rep.kept.get(chain_id)
            if entry is not None and not entry.pinned:
                del rep.kept[chain_id]

    def missed(self, rep: ReplicaState, request_ids: tuple[str, ...]) -> None:
        """The engine no longer held the KV these rounds claimed: they recompute everything."""
        for rid in request_ids:
            state = rep.running.get(rid)
            if state is not None:
                state.num_computed_tokens = 0
                state.num_blocks = 0
                self.stats.num_misses += 1

    def found(self, rep: ReplicaState, num_found: dict[str, int]) -> None:
        """The engine held only the first tokens these rounds claimed (whole blocks, for vLLM):
        they start with those computed and compute the rest."""
        for rid, num_tokens in num_found.items():
            state = rep.running.get(rid)
            if state is not None and num_tokens < state.num_computed_tokens:
                state.num_computed_tokens = num_tokens
                state.num_blocks = num_blocks_for(num_tokens, rep.spec.block_size)
                self.stats.num_partial_hits += 1

    def next_expiry_s(self, replicas: dict[int, ReplicaState]) -> float | None:
        return min(
            (
                entry.expires_s
                for rep in replicas.values()
                for entry in rep.kept.values()
                if entry.expires_s is not None
            ),
            default=None,
        )

    def expire(self, replicas: dict[int, ReplicaState], now_s: float, out: CoreOutput) -> set[int]:
        """Release pinned KV past its time-to-live, and forget chains idle for CHAIN_IDLE_S.
        Returns the replicas that gained free blocks."""
        changed: set[int] = set()
        for replica_id, rep in replicas.items():
            due = [
                c for c, e in rep.kept.items() if e.expires_s is not None and e.expires_s <= now_s
            ]
            for chain_id in due:
                entry = rep.kept.pop(chain_id)
                # a host entry holds no GPU blocks
                self._released(rep, chain_id, entry.num_blocks if entry.pinned else 0, out)
                changed.add(replica_id)
        for pause in self.paused.values():
            if not pause.counted_ended and pause.since_s + self.kv_ttl_s <= now_s:
                pause.counted_ended = True  # no next round within the time-to-live: ended
                self.forecast.ended(pause.slo_class, pause.round_index)
        idle = [c for c, t in self.admitted.items() if t + CHAIN_IDLE_S <= now_s]
        idle += [c for c, p in self.paused.items() if p.since_s + CHAIN_IDLE_S <= now_s]
        for chain_id in idle:
            self.end(chain_id)
        return changed
