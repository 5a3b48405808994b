"""The planner core: replica state + router + one formulation instance per replica.

"One core, two shells": the core takes events with explicit timestamps (`submit`, `on_step`,
`tick`, `abort`, `remove_replica`, `add_replica`, `complete_migration`) and returns a `CoreOutput`
(new plans per replica, final verdicts, finished / preempted / forwarded / migrated requests). It
never reads a clock for its decisions and never touches a socket. The virtual-time simulator and the
ZeroMQ daemon both drive it; the daemon sends `CoreOutput.plans` to engines, tells clients the
verdicts, and feeds engine reports back through `on_step`.

When plans are made (per replica):
- immediately, when the replica's engine is idle (its last plan has no step left for a live request
  and no live repeat cycle) and it has work: after the last plan ran out, on a trigger, or when the
  timer is due;
- otherwise at the next step boundary (`on_step` of that replica) when a trigger fired: requests
  arrived (`ReplanPolicy.on_arrival`), requests finished while some work is not covered by the
  repeat cycle (`on_completion`), the step ran `slow_step_ratio` times slower than the performance
  model predicted, the engine reported an error, or `timer_s` passed while work is not covered by
  the repeat cycle. A busy engine keeps running its plan (explicit steps, then the repeat cycle), so
  a formulation that returns an exact steady-state repeat is not called again until something
  changes: that is what keeps the core cheap.

A new plan starts at the step id after the last reported one (see `wire/plan_cursor.py` for step
numbering). Before anything is applied, the plan is checked (`planner_svc/plan_check.py`); a bad
plan raises `PlanError` naming the formulation.

Decisions: ADMITTED / BEST_EFFORT move a waiting request to running on that replica (final verdict,
reported once). REJECTED goes back to the router, which forwards the request to another replica
while
the request has been rejected at most `router.max_forwards` times; after that the fallback applies:
`"reject"` gives a final REJECTED verdict (replica None), `"best_effort"` runs the request best
effort on the least loaded replica. A waiting request given no decision stays waiting.

Safety net: after two consecutive error reports from a replica (e.g. out of KV blocks), the core
itself preempts (by recompute) the newest running request that holds KV, best effort ones first.

Disaggregated policies (DistServe): when a request on a `role="prefill"` replica gets its first
token, the core takes it off that replica and returns a `Migration` to the least loaded decode
replica. The shell moves the KV (after its transfer delay), frees it on the prefill engine, imports
it on the decode engine and calls `complete_migration`.

Only `time.perf_counter` is read, to measure how long formulations take (`replan_stats`); it never
influences a decision.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from formulations.interface import Formulation
from formulations.plan import Decision, Plan, Verdict
from formulations.request import Request
from formulations.state import RequestState
from planner_svc.plan_check import PlanError, check_plan
from planner_svc.replica import ReplicaSpec, ReplicaState
from planner_svc.router import RoundRobinRouter, Router
from wire.plan_cursor import PlanEnvelope
from wire.step_report import StepReport

FALLBACKS = ("reject", "best_effort")
# Consecutive error reports after which the core preempts a request itself, and after which it
# gives up on a formulation that keeps planning steps no engine can run.
_ERRORS_BEFORE_PREEMPT = 2
_ERRORS_BEFORE_FAIL = 32
# Re-plans one core call may make per replica before the core calls it a livelock.
_MAX_REPLANS_PER_CALL = 10_000


@dataclass(frozen=True)
class ReplanPolicy:
    """When the core re-plans a busy replica (an idle one with work is always re-planned)."""

    timer_s: float = 0.1  # re-plan at least this often while work is not covered by the plan
    on_arrival: bool = True  # re-plan at the next step boundary when requests arrived
    on_completion: bool = True  # ... when requests finished and some work is not covered
    slow_step_ratio: float = 1.5  # ... when a measured step took longer than ratio * predicted

    def __post_init__(self) -> None:
        if self.timer_s <= 0 or self.slow_step_ratio <= 0:
            raise ValueError("ReplanPolicy.timer_s and slow_step_ratio must be positive")


@dataclass(frozen=True, slots=True)
class Migration:
    """Move a request's KV cache from a prefill replica to a decode replica (disaggregation)."""

    request_id: str
    from_replica: int
    to_replica: int
    num_computed_tokens: int  # KV tokens to transfer
    num_generated_tokens: int


@dataclass
class CoreOutput:
    """Everything one core call decided. All lists are in decision order."""

    plans: dict[int, PlanEnvelope] = field(default_factory=dict)  # replica id -> new plan
    verdicts: list[tuple[str, int | None, Decision]] = field(default_factory=list)  # final, once
    finished: list[tuple[str, int]] = field(default_factory=list)  # (request id, replica id)
    preempted: list[tuple[str, int]] = field(default_factory=list)
    forwards: list[tuple[str, int, int]] = field(default_factory=list)  # (rid, from, to)
    aborts: list[tuple[int, str]] = field(
        default_factory=list
    )  # (replica id, rid): engine drops it
    migrations: list[Migration] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (rid, reason): lost, no replica


@dataclass
class ReplanStats:
    num_replans: int = 0
    total_wall_s: float = 0.0
    max_wall_s: float = 0.0

    @property
    def mean_wall_s(self) -> float:
        return self.total_wall_s / self.num_replans if self.num_replans else 0.0


class PlannerCore:
    """See the module docstring. `formulation_factory(spec)` makes one formulation per replica."""

    def __init__(
        self,
        replicas: Sequence[ReplicaSpec],
        formulation_factory: Callable[[ReplicaSpec], Formulation],
        router: Router | None = None,
        replan: ReplanPolicy = ReplanPolicy(),
        fallback: str = "reject",
        spec_acceptance_prior: float = 0.7,
        check_plans: bool = True,
    ) -> None:
        if fallback not in FALLBACKS:
            raise ValueError(f"fallback must be one of {FALLBACKS}, got {fallback!r}")
        if not 0.0 <= spec_acceptance_prior <= 1.0:
            raise ValueError("spec_acceptance_prior must be in [0, 1]")
        self._factory = formulation_factory
        self.router = router or RoundRobinRouter()
        self.replan_policy = replan
        self.fallback = fallback
        self.check_plans = check_plans
        self._prior = spec_acceptance_prior
        self._replicas: dict[int, ReplicaState] = {}
        self._where: dict[str, int] = {}  # unfinished request id -> replica holding it
        self._tried: dict[str, tuple[int, ...]] = {}  # waiting request -> replicas that rejected it
        self._migrating: dict[str, tuple[RequestState, Migration]] = {}
        self._pending_preempt: dict[int, list[str]] = {}  # core-made preemptions for the next plan
        self._resumed: dict[int, dict[str, int]] = {}  # replica -> moved request -> outputs so far
        self._dirty: set[int] = set()
        self.stats = ReplanStats()
        for spec in replicas:
            self._add(spec)
        if not self._replicas:
            raise ValueError("the planner core needs at least one replica")

    # ------------------------------------------------------------------ events

    def submit(self, request: Request, now_s: float) -> CoreOutput:
        """A new request (or tool round) arrived."""
        rid = request.request_id
        if rid in self._where or rid in self._migrating:
            raise ValueError(f"request {rid!r} is already being served")
        out = CoreOutput()
        self._route(RequestState(request), (), out)
        self._settle(now_s, out, boundary=None)
        return out

    def on_step(self, report: StepReport, now_s: float, num_steps: int = 1) -> CoreOutput:
        """An engine finished (or refused) a step. Stale and duplicate reports are ignored.

        `num_steps > 1`: the report sums that many identical steps run back to back (the simulator
        fast-forwarding a steady decode cycle); `report.step_id` is the last one's id."""
        out = CoreOutput()
        rep = self._replicas.get(report.replica_id)
        if rep is None or report.step_id < rep.next_step_id:
            return out
        rep.next_step_id = report.step_id + 1
        rep.num_free_blocks = report.num_free_blocks
        if report.error:
            self._on_error(rep, out)
        else:
            rep.num_consecutive_errors = 0
            self._apply_progress(rep, report, out, num_steps)
        self._dirty.add(rep.replica_id)
        self._settle(now_s, out, boundary=rep.replica_id)
        return out

    def tick(self, now_s: float) -> CoreOutput:
        """Timers: re-plan idle replicas whose timer is due."""
        out = CoreOutput()
        self._dirty.update(self._replicas)
        self._settle(now_s, out, boundary=None)
        return out

    def next_timer_s(self) -> float | None:
        """Earliest time at which `tick` would re-plan an idle replica, or None."""
        due = [
            rep.last_plan_s + self.replan_policy.timer_s
            for rep in self._replicas.values()
            if rep.has_work and not rep.is_busy()
        ]
        return min(due, default=None)

    def abort(self, request_id: str, now_s: float) -> CoreOutput:
        """The client gave up on a request. Unknown ids are ignored."""
        out = CoreOutput()
        replica_id = self._where.pop(request_id, None)
        self._tried.pop(request_id, None)
        if replica_id is None:
            entry = self._migrating.pop(request_id, None)
            if entry is not None:
                out.aborts.append((entry[1].from_replica, request_id))
                out.aborts.append((entry[1].to_replica, request_id))
            return out
        rep = self._replicas[replica_id]
        state = rep.remove_running(request_id)
        if state is None:
            rep.waiting.pop(request_id, None)
        else:
            rep.num_free_blocks += state.num_blocks  # until the engine's next report says
        out.aborts.append((replica_id, request_id))
        self._dirty.add(replica_id)
        self._settle(now_s, out, boundary=None)
        return out

    def add_replica(self, spec: ReplicaSpec, now_s: float) -> CoreOutput:
        if spec.replica_id in self._replicas:
            raise ValueError(f"replica {spec.replica_id} already exists")
        self._add(spec)
        return CoreOutput()

    def remove_replica(self, replica_id: int, now_s: float) -> CoreOutput:
        """An engine died. Its running requests move (keeping their verdict, recomputing their KV)
        to the least loaded replica of a compatible role; its waiting requests are routed anew.
        A request that has nowhere to go is reported in `failed`."""
        rep = self._replicas.pop(replica_id, None)
        if rep is None:
            raise ValueError(f"unknown replica {replica_id}")
        self._pending_preempt.pop(replica_id, None)
        self._resumed.pop(replica_id, None)
        out = CoreOutput()
        for state in rep.running.values():
            self._move_running(state, rep.spec.role, out)
        for state in rep.waiting.values():
            del self._where[state.request_id]
            self._route(state, self._tried.pop(state.request_id, ()), out, count_as_try=False)
        self._settle(now_s, out, boundary=None)
        return out

    def complete_migration(
        self, request_id: str, num_computed_tokens: int, now_s: float
    ) -> CoreOutput:
        """The shell moved a migrating request's KV: `num_computed_tokens` are now cached on the
        decode replica (0 if it could not hold them; the request then recomputes)."""
        out = CoreOutput()
        entry = self._migrating.pop(request_id, None)
        if entry is None:
            return out
        state, migration = entry
        source = self._replicas.get(migration.from_replica)
        if source is not None:  # the prefill engine freed the KV it sent
            source.num_free_blocks += source.blocks_for(migration.num_computed_tokens)
            self._dirty.add(source.replica_id)
        target = self._replicas.get(migration.to_replica)
        state.num_computed_tokens = num_computed_tokens
        if target is None:  # the decode replica died during the transfer
            state.num_computed_tokens = 0
            self._move_running(state, "decode", out)
        else:
            state.num_blocks = target.blocks_for(num_computed_tokens)
            self._place_running(target, state)
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
        replica_id = self._where.get(request_id)
        if replica_id is None:
            entry = self._migrating.get(request_id)
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

    def replica_of(self, request_id: str) -> int | None:
        return self._where.get(request_id)

    @property
    def num_unfinished(self) -> int:
        return len(self._where) + len(self._migrating)

    # ------------------------------------------------------------------ internals: placement

    def _add(self, spec: ReplicaSpec) -> None:
        self._replicas[spec.replica_id] = ReplicaState(spec, self._factory(spec), self._prior)

    def _entry_loads(self) -> dict[int, int]:
        """Replicas that take new requests, with their load."""
        return {i: r.load() for i, r in self._replicas.items() if r.spec.role != "decode"}

    def _route(
        self,
        state: RequestState,
        tried: tuple[int, ...],
        out: CoreOutput,
        count_as_try: bool = True,
    ) -> None:
        request = state.request
        loads = self._entry_loads()
        can_try = len(tried) <= self.router.max_forwards or not count_as_try
        target = self.router.route(request, loads, tried) if can_try else None
        if target is None or target not in loads:
            self._fall_back(state, loads, out)
            return
        if tried and count_as_try:
            out.forwards.append((request.request_id, tried[-1], target))
        rep = self._replicas[target]
        rep.waiting[request.request_id] = state
        self._where[request.request_id] = target
        self._tried[request.request_id] = tried
        if self.replan_policy.on_arrival:
            rep.replan_requested = True
        self._dirty.add(target)

    def _fall_back(self, state: RequestState, loads: Mapping[int, int], out: CoreOutput) -> None:
        rid = state.request_id
        self._tried.pop(rid, None)
        if self.fallback == "best_effort" and loads:
            target = min((load, i) for i, load in loads.items())[1]
            decision = Decision(Verdict.BEST_EFFORT, "rejected by every replica tried")
            state.verdict = Verdict.BEST_EFFORT
            self._place_running(self._replicas[target], state)
            self._resumed.setdefault(target, {})[rid] = state.num_generated_tokens
            out.verdicts.append((rid, target, decision))
            return
        reason = "rejected by every replica tried" if loads else "no replica takes new requests"
        out.verdicts.append((rid, None, Decision(Verdict.REJECTED, reason)))

    def _place_running(self, rep: ReplicaState, state: RequestState) -> None:
        rep.add_running(state)
        self._where[state.request_id] = rep.replica_id
        rep.replan_requested = True
        self._dirty.add(rep.replica_id)

    def _move_running(self, state: RequestState, role: str, out: CoreOutput) -> None:
        """Move a running request off a dead replica, dropping its KV (recompute)."""
        rid = state.request_id
        self._where.pop(rid, None)
        state.num_computed_tokens = 0
        state.num_blocks = 0
        options = [
            (r.load(), i) for i, r in self._replicas.items() if r.spec.role in (role, "mixed")
        ]
        if not options:
            out.failed.append((rid, f"no replica left for a {role} request"))
            return
        target = min(options)[1]
        self._place_running(self._replicas[target], state)
        self._resumed.setdefault(target, {})[rid] = state.num_generated_tokens

    # ------------------------------------------------------------------ internals: reports

    def _apply_progress(
        self, rep: ReplicaState, report: StepReport, out: CoreOutput, num_steps: int
    ) -> None:
        running = rep.running
        block_size = rep.spec.block_size
        new_tokens = report.num_new_tokens
        is_prefill_role = rep.spec.role == "prefill"
        done: list[RequestState] = []
        to_migrate: list[RequestState] = []
        # A request produces output tokens only in a step that computed some of its tokens.
        for rid, num_computed in report.num_computed_tokens.items():
            state = running.get(rid)
            if state is None:
                continue
            computed = state.num_computed_tokens + num_computed
            state.num_computed_tokens = computed
            state.num_blocks = -(-computed // block_size)
            num_new = new_tokens.get(rid)
            if not num_new:
                continue
            if state.first_token_s is None:
                state.first_token_s = report.end_s
            state.num_generated_tokens += num_new
            if state.num_generated_tokens >= state.request.num_output_tokens:
                done.append(state)
            elif is_prefill_role:
                to_migrate.append(state)
        for rid in report.finished:
            state = running.get(rid)
            if state is not None and not state.is_finished:
                done.append(state)
        for state in done:
            self._finish(rep, state, out)
        for state in to_migrate:
            self._start_migration(rep, state, out)
        if report.num_proposed_spec_tokens:
            accepted = report.num_accepted_spec_tokens
            rep.observe_spec(
                {
                    rid: (accepted.get(rid, 0), n)
                    for rid, n in report.num_proposed_spec_tokens.items()
                }
            )
        self._check_slow(rep, report, num_steps)

    def _finish(self, rep: ReplicaState, state: RequestState, out: CoreOutput) -> None:
        rid = state.request_id
        rep.remove_running(rid)
        self._where.pop(rid, None)
        out.finished.append((rid, rep.replica_id))
        if self.replan_policy.on_completion and rep.has_unplanned_work:
            rep.replan_requested = True

    def _check_slow(self, rep: ReplicaState, report: StepReport, num_steps: int) -> None:
        """Compare the measured time with the model's: the step computed
        sum(computed) + sum(proposed) - sum(accepted) tokens (verified drafts count whether or not
        they were accepted), with the longest speculation as its draft steps."""
        proposed = report.num_proposed_spec_tokens
        num_batched = sum(report.num_computed_tokens.values())
        if proposed:
            num_batched += sum(proposed.values()) - sum(report.num_accepted_spec_tokens.values())
        spec_steps = max(proposed.values(), default=0)
        predicted_s = (
            rep.spec.perf_model.step_time_s(num_batched // num_steps, spec_steps) * num_steps
        )
        if report.step_time_s > self.replan_policy.slow_step_ratio * predicted_s:
            rep.replan_requested = True

    def _start_migration(self, rep: ReplicaState, state: RequestState, out: CoreOutput) -> None:
        decode = [(r.load(), i) for i, r in self._replicas.items() if r.spec.role == "decode"]
        if not decode:
            return  # no decode replica: keep decoding here
        rid = state.request_id
        target = min(decode)[1]
        rep.remove_running(rid)
        self._where.pop(rid, None)
        migration = Migration(
            rid, rep.replica_id, target, state.num_computed_tokens, state.num_generated_tokens
        )
        self._migrating[rid] = (state, migration)
        out.migrations.append(migration)

    def _on_error(self, rep: ReplicaState, out: CoreOutput) -> None:
        """The engine ran none of the step and stopped its plan; plan again, preempting if the
        formulation keeps failing."""
        rep.num_consecutive_errors += 1
        rep.replan_requested = True
        rep.envelope = None  # the engine dropped its plan
        rep.num_live_repeat = 0
        rep.repeat_ids = frozenset()
        rep.uncovered = set(rep.running)
        if rep.num_consecutive_errors >= _ERRORS_BEFORE_FAIL:
            raise PlanError(
                f"formulation {rep.formulation.name!r} on replica {rep.replica_id}: "
                f"{rep.num_consecutive_errors} consecutive steps could not be executed"
            )
        if rep.num_consecutive_errors >= _ERRORS_BEFORE_PREEMPT:
            victim = _newest_with_kv(rep.running.values())
            if victim is not None:
                rep.drop_kv(victim)
                self._pending_preempt.setdefault(rep.replica_id, []).append(victim.request_id)
                out.preempted.append((victim.request_id, rep.replica_id))

    # ------------------------------------------------------------------ internals: planning

    def _settle(self, now_s: float, out: CoreOutput, boundary: int | None) -> None:
        """Re-plan every dirty replica that should be re-planned now (see the module docstring).
        Forwards may dirty other replicas; each replica re-plans again only on a new trigger."""
        budget = _MAX_REPLANS_PER_CALL * max(1, len(self._replicas))
        while self._dirty:
            budget -= 1
            if budget < 0:  # forwards are bounded, so this is a bug, not a load
                raise RuntimeError(
                    f"re-planning does not settle (dirty replicas: {sorted(self._dirty)})"
                )
            replica_id = self._dirty.pop()
            rep = self._replicas.get(replica_id)
            if rep is not None and self._should_replan(rep, now_s, replica_id == boundary):
                self._replan(rep, now_s, out)

    def _should_replan(self, rep: ReplicaState, now_s: float, at_boundary: bool) -> bool:
        if not rep.has_work:
            return False
        timer_due = now_s - rep.last_plan_s >= self.replan_policy.timer_s
        if rep.is_busy():
            return at_boundary and (rep.replan_requested or (timer_due and rep.has_unplanned_work))
        env = rep.envelope  # idle: a non-empty last plan has run out
        ran_out = env is not None and bool(env.plan.steps or env.plan.repeat)
        return rep.replan_requested or timer_due or ran_out

    def _replan(self, rep: ReplicaState, now_s: float, out: CoreOutput) -> None:
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
        new_requests: list[Request] = []
        for rid, decision in plan.decisions.items():
            state = rep.waiting.pop(rid)
            if decision.verdict is Verdict.REJECTED:
                del self._where[rid]
                tried = self._tried.pop(rid, ()) + (rep.replica_id,)
                self._route(state, tried, out)
                continue
            self._tried.pop(rid, None)
            state.verdict = decision.verdict
            rep.add_running(state)
            new_requests.append(state.request)
            out.verdicts.append((rid, rep.replica_id, decision))
        for rid in plan.preempt:
            rep.drop_kv(rep.running[rid])
            out.preempted.append((rid, rep.replica_id))
        core_preempts = self._pending_preempt.pop(rep.replica_id, ())
        if core_preempts:
            plan = dataclasses.replace(plan, preempt=tuple(core_preempts) + plan.preempt)
        resumed = self._resumed.pop(rep.replica_id, {})
        if resumed:
            new_requests = [
                self._state_request(rid) for rid in resumed if rid in rep.running
            ] + new_requests
        envelope = PlanEnvelope(
            rep.replica_id,
            rep.num_plans,
            rep.next_step_id,
            plan,
            tuple(new_requests),
            resumed={rid: n for rid, n in resumed.items() if rid in rep.running},
        )
        rep.install(envelope, now_s)
        _put_plan(out, envelope)

    def _state_request(self, request_id: str) -> Request:
        state = self.request_state(request_id)
        assert state is not None
        return state.request


def _newest_with_kv(states) -> RequestState | None:
    """The request to preempt: the newest best-effort one holding KV, else the newest admitted."""
    best_effort = admitted = None
    for state in states:  # dicts keep admission order, so the last match is the newest
        if state.num_blocks > 0 or state.num_computed_tokens > 0:
            if state.verdict is Verdict.BEST_EFFORT:
                best_effort = state
            else:
                admitted = state
    return best_effort or admitted


def _put_plan(out: CoreOutput, envelope: PlanEnvelope) -> None:
    """Add a plan to the output; a second plan for the same replica in one call replaces the first
    but keeps the first's registrations and preemptions (the engine has not seen either yet)."""
    previous = out.plans.get(envelope.replica_id)
    if previous is not None:
        plan: Plan = envelope.plan
        preempt = tuple(dict.fromkeys(previous.plan.preempt + plan.preempt))
        envelope = dataclasses.replace(
            envelope,
            plan=dataclasses.replace(plan, preempt=preempt),
            new_requests=previous.new_requests + envelope.new_requests,
            resumed={**previous.resumed, **envelope.resumed},
            start_step_id=previous.start_step_id,
        )
    out.plans[envelope.replica_id] = envelope
