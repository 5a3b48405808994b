"""The planner core: replica state + router + one formulation instance per replica.

"One core, two shells": the core takes events with explicit timestamps (`submit`, `on_step`,
`tick`, `abort`, `remove_replica`, `add_replica`, `complete_migration`) and returns a `CoreOutput`
(planner_svc/outcome.py: new plans per replica, final verdicts, finished / preempted / forwarded /
migrated requests). It never reads a clock for its decisions and never touches a socket. The
virtual-time simulator (lab/simulator.py) and the ZeroMQ daemon both drive it; the daemon sends the
plans to engines, tells clients the verdicts, and feeds engine reports back through `on_step`.

- When plans are made: planner_svc/triggers.py. A new plan starts at the step id after the last
  reported one (wire/plan_cursor.py numbers steps). Before anything is applied, the plan is checked
  (planner_svc/plan_check.py); a bad plan raises `PlanError` naming the formulation.
- Where requests go (routing, forwards, fallback, moves off a dead engine, disaggregated
  migrations): planner_svc/placement.py.
- Decisions: ADMITTED / BEST_EFFORT move a waiting request to running on that replica (final
  verdict, reported once); REJECTED goes back to placement. A waiting request given no decision
  stays waiting; with a formulation that has admission control, never past its TTFT deadline:
  then it gets the fallback verdict at once, so every client hears back within its TTFT target.
- Payloads: each request's `EngineRequest` (given at `submit`) rides in the first plan of the
  replica that runs it; after a move it is resumed (prompt + the output so far, recomputed).
- Output lengths (formulations/lengths.py): before each plan the core gives every request the
  planner's belief about its total output (`RequestState.predicted_output`) from its length
  predictor, which learns from the requests that finish (`lengths="predicted"`, the default); a
  request's cap (`Request.num_output_tokens`) is all the `oracle` and `max_tokens` modes use. The
  core never reads an engine payload's `max_new_tokens` for planning. A reasoning request's thinking
  length becomes known when its engine reports the end of its thinking.
- Memory: a replica whose engine's free KV blocks could run out at the next step is re-planned at
  that boundary (formulations with admission control), so that the formulation can preempt before
  the engine refuses a step. Safety net: after two consecutive error reports from a replica (e.g.
  out of KV blocks), the core itself preempts (by recompute) a running request that holds KV: best
  effort ones first (the newest), then the admitted one with the most slack before its next
  deadline.

Only `time.perf_counter` is read, to measure how long formulations take (`stats`); it never
influences a decision.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import msgspec

from formulations.interface import KV_RETENTIONS, Formulation
from formulations.lengths import THINKING, LengthPredictor, make_predictor
from formulations.pauses import PausePredictor
from formulations.plan import Verdict
from formulations.refit import RefitParams
from formulations.request import Request
from formulations.state import RequestState
from planner_svc.chains import ChainBook
from planner_svc.outcome import CoreOutput, OnReplica, VerdictOut
from planner_svc.placement import Placement
from planner_svc.plan_check import PlanError, check_plan
from planner_svc.refit import RefitStatus, ReplicaRefits
from planner_svc.replica import ReplicaSpec, ReplicaState
from planner_svc.router import RoundRobinRouter, Router
from planner_svc.triggers import ReplanPolicy, expects_replan, ran_slow, should_replan
from wire.protocol import EngineRequest, PlanMsg, StepReport

# Consecutive error reports after which the core preempts a request itself, and after which it
# gives up on a formulation that keeps planning steps no engine can run.
_ERRORS_BEFORE_PREEMPT = 2
_ERRORS_BEFORE_FAIL = 32
# Re-plans one core call may make per replica before the core calls it a livelock.
_MAX_REPLANS_PER_CALL = 10_000
# A request's output-length prediction is refreshed after this many more tokens (or when it
# outlives the expected length): survival conditioning changes slowly, and queries cost.
PREDICTION_REFRESH_TOKENS = 16
EXPIRED_REASON = "TTFT target passed before a verdict"


@dataclass
class ReplanStats:
    num_replans: int = 0
    total_wall_s: float = 0.0
    max_wall_s: float = 0.0

    @property
    def mean_wall_s(self) -> float:
        return self.total_wall_s / self.num_replans if self.num_replans else 0.0


class PlannerCore:
    """See the module docstring. `formulation_factory(spec)` makes one formulation per replica.
    `kv_migration`: disaggregated requests move with their KV (the shell transfers it and calls
    `complete_migration`); off, they recompute on the decode replica. `announce_replans`: fill
    `CoreOutput.replan_expected` (the daemon tells engines; the simulator needs no such hint).
    `lengths`: what the planner knows of output lengths (formulations/lengths.py; a
    `length_predictor` given replaces the mode's default one). `refit`: refit each replica's
    performance model online from its step reports and plan with the refitted model and its
    safety margin (planner_svc/refit.py); None: the models stay."""

    def __init__(
        self,
        replicas: Sequence[ReplicaSpec],
        formulation_factory: Callable[[ReplicaSpec], Formulation],
        router: Router | None = None,
        replan: ReplanPolicy | None = None,
        fallback: str = "reject",
        spec_acceptance_prior: float = 0.7,
        check_plans: bool = True,
        kv_migration: bool = False,
        announce_replans: bool = False,
        lengths: str = "predicted",
        length_predictor: LengthPredictor | None = None,
        refit: RefitParams | None = None,
        kv_ttl_s: float = 30.0,
        pause_predictor: PausePredictor | None = None,
    ) -> None:
        if not 0.0 <= spec_acceptance_prior <= 1.0:
            raise ValueError("spec_acceptance_prior must be in [0, 1]")
        replan = replan or ReplanPolicy()
        self._factory = formulation_factory
        self.replan_policy = replan
        self.check_plans = check_plans
        self.announce_replans = announce_replans
        self._prior = spec_acceptance_prior
        self._replicas: dict[int, ReplicaState] = {}
        self._dirty: set[int] = set()
        self.chains = ChainBook(kv_ttl_s, pause_predictor)
        self.placement = Placement(
            self._replicas,
            router or RoundRobinRouter(),
            fallback,
            self._dirty,
            replan.on_arrival,
            kv_migration,
            self.chains,
        )
        self._payloads: dict[str, EngineRequest] = {}  # unfinished request -> its engine payload
        self._token_ids: dict[str, list[int]] = {}  # output ids so far, for requests sent with ids
        self._pending_preempt: dict[int, list[str]] = {}  # core-made preemptions for the next plan
        self.lengths = lengths
        self.length_predictor = length_predictor or make_predictor(lengths)
        self.stats = ReplanStats()
        self.refits = ReplicaRefits(refit) if refit is not None else None
        for spec in replicas:
            self._add(spec)
        if not self._replicas:
            raise ValueError("the planner core needs at least one replica")

    @property
    def router(self) -> Router:
        return self.placement.router

    @property
    def fallback(self) -> str:
        return self.placement.fallback

    # ------------------------------------------------------------------ events

    def submit(
        self, request: Request, now_s: float, payload: EngineRequest | None = None
    ) -> CoreOutput:
        """A new request (or tool round) arrived. `payload`: what an engine needs to run it (by
        default the prompt length and `request.num_output_tokens` as the engine's stop)."""
        rid = request.request_id
        if rid in self.placement:
            raise ValueError(f"request {rid!r} is already being served")
        if payload is None:
            payload = EngineRequest(rid, request.num_prompt_tokens, request.num_output_tokens)
        self._payloads[rid] = payload
        if payload.prompt_token_ids is not None:
            self._token_ids[rid] = []
        out = CoreOutput()
        state = RequestState(request)
        self.chains.arrived(state, now_s)
        self.placement.route(state, (), out)
        self._settle(now_s, out, boundary=None)
        return out

    def on_step(
        self, replica_id: int, report: StepReport, now_s: float, num_steps: int = 1
    ) -> CoreOutput:
        """A replica's engine finished (or refused) a step. Stale and duplicate reports are
        ignored. `num_steps > 1`: the report sums that many identical steps run back to back (the
        simulator fast-forwarding a steady decode cycle); `report.step_id` is the last one's id."""
        out = CoreOutput()
        rep = self._replicas.get(replica_id)
        if rep is None or report.step_id < rep.next_step_id:
            return out
        rep.next_step_id = report.step_id + 1
        rep.num_free_blocks = report.num_free_blocks
        # Kept-KV news ride on any report, a refused step's too; misses before the report's
        # counts are added to those requests'.
        if report.kv_misses:
            self.chains.missed(rep, report.kv_misses)
        if report.kv_found:
            self.chains.found(rep, report.kv_found)
        if report.kv_misses or report.kv_found:
            rep.replan_requested = True  # the plan counted on KV the engine did not hold
        if report.kv_evicted:
            self.chains.evicted(rep, report.kv_evicted)
        if report.error:
            self._on_error(rep, out)
        else:
            rep.num_consecutive_errors = 0
            rep.last_step_time_s = report.step_time_s / num_steps
            if self.refits is not None:  # before the report moves the requests' progress
                self.refits.observe(rep, report, num_steps)
            self._record_token_ids(report)
            if report.thinking_ended:
                self._thinking_ended(rep, report.thinking_ended)
            done, produced = rep.apply_report(report)
            for state in done:
                self._finish(rep, state, out, now_s)
            if rep.spec.role == "prefill":
                for state in produced:
                    payload = self._payloads[state.request_id]
                    self.placement.start_migration(rep, state, payload, out)
            if ran_slow(rep, report, num_steps, self.replan_policy.slow_step_ratio):
                rep.replan_requested = True
            if rep.admission_control and rep.num_free_blocks < len(rep.running):
                rep.replan_requested = True  # the next step might not get its KV blocks
        self._dirty.add(rep.replica_id)
        self._settle(now_s, out, boundary=rep.replica_id)
        return out

    def tick(self, now_s: float) -> CoreOutput:
        """Timers: re-plan idle replicas whose timer is due, expire verdicts past their TTFT."""
        out = CoreOutput()
        self._dirty.update(self._replicas)
        for replica_id in self.chains.expire(self._replicas, now_s, out):
            self._replicas[replica_id].replan_requested = True  # memory came back
        self._settle(now_s, out, boundary=None)
        return out

    def next_timer_s(self) -> float | None:
        """Earliest time at which `tick` would do something, or None."""
        due = [
            rep.last_plan_s + self.replan_policy.timer_s
            for rep in self._replicas.values()
            if rep.has_work and not rep.is_busy()
        ]
        due += [
            state.request.ttft_deadline_s
            for rep in self._replicas.values()
            if rep.admission_control
            for state in rep.waiting.values()
            if not state.protected  # never expired: it waits for the next plan
        ]
        expiry_s = self.chains.next_expiry_s(self._replicas)
        if expiry_s is not None:
            due.append(expiry_s)
        return min(due, default=None)

    def next_verdict_deadline_s(self) -> float | None:
        """The earliest TTFT deadline of a request still waiting for a verdict on a replica whose
        formulation has admission control (None: there is none)."""
        return min(
            (
                state.request.ttft_deadline_s
                for rep in self._replicas.values()
                if rep.admission_control
                for state in rep.waiting.values()
                if not state.protected
            ),
            default=None,
        )

    def expire_undecided(self, due_s: float, now_s: float) -> CoreOutput:
        """The fallback verdict, now, for waiting requests whose TTFT deadline comes before
        `due_s` (at or after `now_s`). A shell calls it with `due_s` = now + what its next call
        and the verdict's delivery may take, so that the verdict still reaches the client within
        the TTFT target: a request decided after its deadline could not be started in time
        anyway (added for the daemon's timely verdicts in bursts; see docs/SERVICE.md)."""
        out = CoreOutput()
        for rep in self._replicas.values():
            if rep.admission_control and rep.waiting:
                self._expire(rep, due_s, out)
        self._settle(now_s, out, boundary=None)
        return out

    def abort(self, request_id: str, now_s: float) -> CoreOutput:
        """The client gave up on a request. Unknown ids are ignored."""
        out = CoreOutput()
        self._forget(request_id)
        replica_id = self.placement.abort(request_id, out)
        if replica_id is None:
            return out
        rep = self._replicas[replica_id]
        rep.unsent.pop(request_id, None)
        state = rep.remove_running(request_id)
        if state is None:
            waiting = rep.waiting.pop(request_id, None)
            if waiting is not None:
                self.chains.unclaim(waiting, self._replicas, out)
                self._end_chain(waiting.request)
        else:
            self._end_chain(state.request)  # the client gave up on the chain
            rep.num_free_blocks += state.num_blocks  # until the engine's next report says
        out.aborts.append(OnReplica(request_id, replica_id))
        self._dirty.add(replica_id)
        self._settle(now_s, out, boundary=None)
        return out

    def add_replica(self, spec: ReplicaSpec, now_s: float) -> CoreOutput:
        if spec.replica_id in self._replicas:
            raise ValueError(f"replica {spec.replica_id} already exists")
        self._add(spec)
        return CoreOutput()

    def remove_replica(self, replica_id: int, now_s: float) -> CoreOutput:
        """An engine died; its requests are placed elsewhere (planner_svc/placement.py)."""
        rep = self._replicas.pop(replica_id, None)
        if rep is None:
            raise ValueError(f"unknown replica {replica_id}")
        self._pending_preempt.pop(replica_id, None)
        if self.refits is not None:
            self.refits.remove(replica_id)
        out = CoreOutput()
        self.placement.remove_replica(rep, out)
        self._drop_failed(out)
        self._settle(now_s, out, boundary=None)
        return out

    def complete_migration(
        self, request_id: str, num_computed_tokens: int, now_s: float
    ) -> CoreOutput:
        """The shell moved a migrating request's KV (see Placement.complete_migration)."""
        out = CoreOutput()
        self.placement.complete_migration(request_id, num_computed_tokens, out)
        self._drop_failed(out)
        self._settle(now_s, out, boundary=None)
        return out

    # ------------------------------------------------------------------ accessors

    @property
    def replica_ids(self) -> list[int]:
        return sorted(self._replicas)

    def replica(self, replica_id: int) -> ReplicaState:
        """The replica's state, for metrics and tests (read only)."""
        return self._replicas[replica_id]

    def queue_lengths(self) -> dict[int, tuple[int, int]]:
        """replica id -> (running requests, waiting requests)."""
        return {i: (len(r.running), len(r.waiting)) for i, r in self._replicas.items()}

    def request_state(self, request_id: str) -> RequestState | None:
        replica_id = self.placement.where.get(request_id)
        if replica_id is None:
            entry = self.placement.migrating.get(request_id)
            return entry[0] if entry else None
        rep = self._replicas[replica_id]
        return rep.running.get(request_id) or rep.waiting.get(request_id)

    def replan_pending(self, replica_id: int) -> bool:
        """True when a trigger fired and the replica re-plans at its next step boundary."""
        return self._replicas[replica_id].replan_requested

    def timer_due_s(self, replica_id: int) -> float | None:
        """When the timer will make a busy replica re-plan at a step boundary (None: never, while
        its plan covers all its work)."""
        rep = self._replicas[replica_id]
        if not rep.has_unplanned_work:
            return None
        return rep.last_plan_s + self.replan_policy.timer_s

    @property
    def num_unfinished(self) -> int:
        return len(self.placement.where) + len(self.placement.migrating)

    def refit_status(self, replica_id: int) -> RefitStatus | None:
        """The replica's online refit (None without refit)."""
        return self.refits.status(replica_id) if self.refits is not None else None

    # ------------------------------------------------------------------ internals

    def _add(self, spec: ReplicaSpec) -> None:
        rep = ReplicaState(spec, self._factory(spec), self._prior)
        self._replicas[spec.replica_id] = rep
        if self.refits is not None:
            self.refits.add(rep)

    def _payload(self, state: RequestState) -> EngineRequest:
        """The request's engine payload as of now (resumed after output already produced; with
        no cached tokens once its claimed KV was lost, e.g. after a move)."""
        rid = state.request_id
        payload = self._payloads[rid]
        if payload.num_cached_tokens and state.num_computed_tokens != payload.num_cached_tokens:
            payload = msgspec.structs.replace(payload, num_cached_tokens=0)
        return payload.resumed(self._token_ids.get(rid), state.num_generated_tokens)

    def _admit_round(self, rep: ReplicaState, state: RequestState, now_s: float) -> None:
        """A tool round got its verdict: its payload names its chain, the kept tokens its engine
        attaches, and what to do with its KV when it finishes."""
        rid = state.request_id
        request = state.request
        self.chains.admitted_round(request, now_s)
        num_cached = self.chains.attach(rid)
        self._payloads[rid] = msgspec.structs.replace(
            self._payloads[rid],
            chain_id=request.chain_id,
            num_cached_tokens=num_cached,
            retain_kv=self._retention(rep, state, now_s),
        )

    def _record_token_ids(self, report: StepReport) -> None:
        if self._token_ids:
            for rid, ids in report.new_token_ids.items():
                kept = self._token_ids.get(rid)
                if kept is not None:
                    kept.extend(ids)

    def _predict(self, rep: ReplicaState) -> None:
        """Refresh the planner's belief about the output length of the replica's requests (each
        time a request has produced `PREDICTION_REFRESH_TOKENS` more tokens, or outlived its
        expectation)."""
        predictor = self.length_predictor
        for state in (*rep.running.values(), *rep.waiting.values()):
            generated = state.num_generated_tokens
            known = state.predicted_output
            if (
                known is not None
                and generated < known.expected
                and (generated - state.predicted_at < PREDICTION_REFRESH_TOKENS)
            ):
                continue
            request = state.request
            rest = predictor.remaining(
                request.slo_class,
                request.num_prompt_tokens,
                generated,
                hint=request.hint_output_tokens,
            )
            state.predicted_output = rest.shifted(generated)
            state.predicted_at = generated

    def _thinking_ended(self, rep: ReplicaState, ended: dict[str, int]) -> None:
        """The engine saw the end of these requests' thinking: the planner moves them to their
        answer TPOT (a re-plan at this boundary) and learns the thinking length."""
        for rid, num_in_step in ended.items():
            state = rep.running.get(rid)
            if state is None:
                continue
            request = state.request
            num_thinking = min(request.num_output_tokens, state.num_generated_tokens + num_in_step)
            if num_thinking != request.num_thinking_tokens:
                state.request = dataclasses.replace(request, num_thinking_tokens=num_thinking)
                rep.replan_requested = True
            self.length_predictor.observe(
                request.slo_class, request.num_prompt_tokens, num_thinking, THINKING
            )

    def _end_chain(self, request: Request) -> None:
        """The chain of `request` ended early (aborted): nothing more is kept for it."""
        chain_id = request.chain_id
        if chain_id is None:
            return
        self.chains.end(chain_id)

    def _retention(self, rep: ReplicaState, state: RequestState, now_s: float) -> str:
        """What the engine does with an admitted round's KV when it finishes (KV_RETENTIONS):
        the formulation decides for a chain's rounds before its last, on an engine that keeps KV;
        everything else drops it."""
        request = state.request
        if request.chain_id is None or request.chain_last_round or not rep.spec.kv_retention:
            return "drop"
        pause = self.chains.pauses.predict(request.slo_class)
        mode = rep.formulation.kv_retention(rep.view(now_s), state, pause)
        if mode not in KV_RETENTIONS or (mode == "host" and not rep.spec.kv_host_blocks):
            raise PlanError(
                f"formulation {rep.formulation.name!r}: KV retention {mode!r} unknown or not "
                "offered by the engine"
            )
        return mode

    def _forget(self, request_id: str) -> None:
        self._payloads.pop(request_id, None)
        self._token_ids.pop(request_id, None)

    def _drop_failed(self, out: CoreOutput) -> None:
        for failure in out.failed:
            self._forget(failure.request_id)

    def _finish(
        self, rep: ReplicaState, state: RequestState, out: CoreOutput, now_s: float
    ) -> None:
        rid = state.request_id
        request = state.request
        self.length_predictor.observe(
            request.slo_class, request.num_prompt_tokens, state.num_generated_tokens
        )
        if request.chain_id is not None:
            payload = self._payloads.get(rid)
            retain_kv = payload.retain_kv if payload is not None else "drop"
            self.chains.finished(rep, state, retain_kv, now_s, out)
        rep.remove_running(rid)
        self.placement.where.pop(rid, None)
        self._forget(rid)
        out.finished.append(OnReplica(rid, rep.replica_id))
        if self.replan_policy.on_completion and rep.has_unplanned_work:
            rep.replan_requested = True

    def _on_error(self, rep: ReplicaState, out: CoreOutput) -> None:
        """The engine ran none of the step and stopped its plan; plan again, preempting if the
        formulation keeps failing."""
        rep.num_consecutive_errors += 1
        rep.replan_requested = True
        rep.forget_plan()
        if rep.num_consecutive_errors >= _ERRORS_BEFORE_FAIL:
            raise PlanError(
                f"formulation {rep.formulation.name!r} on replica {rep.replica_id}: "
                f"{rep.num_consecutive_errors} consecutive steps could not be executed"
            )
        if self.chains.release_pinned(rep, out):
            return  # the engine ran out of blocks: the paused chains' pinned KV gives way first
        if rep.num_consecutive_errors >= _ERRORS_BEFORE_PREEMPT:
            victim = _victim_with_kv(rep.running.values())
            if victim is not None:
                rep.drop_kv(victim)
                self._pending_preempt.setdefault(rep.replica_id, []).append(victim.request_id)
                out.preempted.append(OnReplica(victim.request_id, rep.replica_id))

    def _expire(self, rep: ReplicaState, now_s: float, out: CoreOutput) -> None:
        """Waiting requests whose TTFT deadline passed get the fallback verdict now."""
        expired = [
            s
            for s in rep.waiting.values()
            if s.request.ttft_deadline_s <= now_s and not s.protected
        ]
        for state in expired:
            del rep.waiting[state.request_id]
            self.placement.fall_back(state, out, EXPIRED_REASON)

    def _settle(self, now_s: float, out: CoreOutput, boundary: int | None) -> None:
        """Re-plan every dirty replica that should be re-planned now (planner_svc/triggers.py).
        Forwards may dirty other replicas; each replica re-plans again only on a new trigger."""
        budget = _MAX_REPLANS_PER_CALL * max(1, len(self._replicas))
        while self._dirty:
            budget -= 1
            if budget < 0:  # forwards are bounded, so this is a bug, not a load
                dirty = sorted(self._dirty)
                raise RuntimeError(f"re-planning does not settle (dirty replicas: {dirty})")
            replica_id = self._dirty.pop()
            rep = self._replicas.get(replica_id)
            if rep is None:
                continue
            if rep.waiting and rep.admission_control:
                self._expire(rep, now_s, out)
            at_boundary = replica_id == boundary
            if should_replan(rep, self.replan_policy, now_s, at_boundary):
                self._replan(rep, now_s, out)
        for verdict in out.verdicts:
            if verdict.decision.verdict is Verdict.REJECTED:
                self._forget(verdict.request_id)
        if self.announce_replans:
            out.replan_expected = {
                i: expects_replan(rep, self.replan_policy, now_s)
                for i, rep in self._replicas.items()
            }

    def _replan(self, rep: ReplicaState, now_s: float, out: CoreOutput) -> None:
        self._predict(rep)
        view = rep.view(now_s)
        start = time.perf_counter()
        plan = rep.formulation.plan(view)
        elapsed_s = time.perf_counter() - start
        self.stats.num_replans += 1
        self.stats.total_wall_s += elapsed_s
        self.stats.max_wall_s = max(self.stats.max_wall_s, elapsed_s)
        if self.check_plans:
            name = rep.formulation.name or type(rep.formulation).__name__
            check_plan(plan, view, name, rep.running, rep.waiting)
        for rid, decision in plan.decisions.items():
            state = rep.waiting.pop(rid)
            if decision.verdict is Verdict.REJECTED:
                self.placement.reject(state, rep.replica_id, out, decision.reason)
                continue
            self.placement.tried.pop(rid, None)
            state.verdict = decision.verdict
            if state.request.chain_id is not None:
                self._admit_round(rep, state, now_s)
            rep.add_running(state)
            rep.unsent[rid] = None
            out.verdicts.append(VerdictOut(rid, rep.replica_id, decision))
        for rid in plan.preempt:
            rep.drop_kv(rep.running[rid])
            out.preempted.append(OnReplica(rid, rep.replica_id))
        preemptions = tuple(self._pending_preempt.pop(rep.replica_id, ())) + plan.preempt
        new_requests = tuple(
            self._payload(rep.running[rid]) for rid in rep.unsent if rid in rep.running
        )
        rep.unsent.clear()
        message = PlanMsg(
            plan_id=rep.num_plans,
            start_step_id=rep.next_step_id,
            steps=plan.steps,
            repeat=plan.repeat,
            new_requests=new_requests,
            preemptions=preemptions,
        )
        rep.install(message, now_s)
        out.put_plan(rep.replica_id, message)


def _victim_with_kv(states) -> RequestState | None:
    """The request the safety net preempts: the newest best-effort one holding KV, else the
    admitted one with the most slack before its next token's deadline."""
    best_effort = admitted = None
    for state in states:  # dicts keep admission order, so the last match is the newest
        if state.num_blocks > 0 or state.num_computed_tokens > 0:
            if state.verdict is Verdict.BEST_EFFORT:
                best_effort = state
            elif admitted is None or state.next_token_deadline_s > admitted.next_token_deadline_s:
                admitted = state
    return best_effort or admitted
