"""The virtual-time simulator: the planner core and simulated engines, driven by events.

`simulate(workload, config)` runs the same `PlannerCore` the daemon runs, with one in-process
`SimEngine` per replica and a virtual clock instead of sockets and sleeping. Events, in time order
(ties in the order they were scheduled):
- arrival: a request, or a tool-chain round, reaches the planner (`core.submit`);
- step done: a replica's engine finished a step (`core.on_step`); the replica then runs the next
  step of its current plan, if any;
- timer: the core's earliest due timer (`core.next_timer_s`, `core.tick`);
- migration done: a disaggregated request's KV arrived at its decode replica
  (`core.complete_migration`).
Engines execute a step when it starts and report at its end. Every output token is stamped with the
end time of the step that produced it. Tool chains: round k+1 arrives `tool_delay_s` after round k
finished; a rejected (or unfinished) round ends its chain. The run stops when nothing is left to
do, or at `max_sim_time_s` (default: last first arrival + `drain_s`); unfinished requests are
recorded as such. The same seed gives the same result.

KV memory defaults per performance-model preset (`DEFAULT_KV_TOKENS`): 90% of GPU memory, minus the
fp16 weights, divided by the fp16 KV bytes per token (2 (K and V) * layers * hidden * 2 bytes):
- OPT-13B (40 layers, hidden 5120: 819,200 B/token, 26 GB weights) on 2 x A100-80GB:
  (144 - 26) GB / 819,200 B = ~144k tokens;
- OPT-6.7B (32 layers, hidden 4096: 524,288 B/token, 13.4 GB) on 1 x A100-80GB:
  (72 - 13.4) GB / 524,288 B = ~112k tokens;
- OPT-13B on 1 x H100-80GB: (72 - 26) GB / 819,200 B = ~56k tokens.

KV transfer for disaggregated policies: `latency + num_tokens * kv_bytes_per_token /
link_bytes_per_s`,
with the model's KV bytes per token (above) and a 25 GB/s link by default (PCIe 4.0 x16 between GPUs
of one node; NVLink would be ~10x faster, a cross-node 100 Gb/s NIC 2x slower).
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from engine_adapters.engine import EngineRequest
from engine_adapters.sim_engine import SimEngine, VirtualClock
from formulations import registry
from formulations.perf_model import PERF_MODEL_NUM_GPUS, PerfModel, TruthModel, perf_model_preset
from formulations.plan import Step, Verdict
from formulations.request import Request, ToolChain
from lab.workloads.workload import Workload
from planner_svc.core import CoreOutput, PlannerCore, ReplanPolicy
from planner_svc.records import RequestRecord
from planner_svc.replica import ReplicaSpec
from planner_svc.router import make_router
from wire.plan_cursor import PlanCursor, PlanEnvelope
from wire.step_report import StepReport

DEFAULT_KV_TOKENS = {"opt-13b-2xa100": 144_000, "opt-6.7b-a100": 112_000, "opt-13b-h100": 56_000}
KV_BYTES_PER_TOKEN = {"opt-13b-2xa100": 819_200, "opt-6.7b-a100": 524_288, "opt-13b-h100": 819_200}
_FALLBACK_KV_TOKENS = 100_000
_FALLBACK_KV_BYTES = 819_200


def _default_perf_model() -> PerfModel:
    return perf_model_preset("opt-13b-2xa100")


@dataclass
class SimConfig:
    policy: str = "vllm_fcfs"
    policy_params: dict[str, Any] = field(default_factory=dict)
    num_replicas: int = 1
    perf_model: PerfModel = field(default_factory=_default_perf_model)  # what the planner believes
    truth: TruthModel | None = None  # what the engines run; None: exactly `perf_model`
    num_blocks_per_replica: int | None = None  # None: DEFAULT_KV_TOKENS of the preset / block_size
    block_size: int = 16
    max_spec_tokens: int = 0
    true_acceptance_rate: float = 0.7
    spec_acceptance_prior: float = 0.7
    routing: str = "round_robin"
    max_forwards: int = 1
    fallback: str = "reject"
    replan: ReplanPolicy = field(default_factory=ReplanPolicy)
    seed: int = 0
    max_sim_time_s: float | None = None  # None: last first arrival + drain_s
    drain_s: float = 600.0
    num_gpus_per_replica: int | None = None  # None: from the preset (PERF_MODEL_NUM_GPUS), else 1
    # Disaggregated policies only:
    num_prefill_replicas: int | None = None  # None: half of the replicas (at least one)
    kv_bytes_per_token: int | None = None  # None: from the preset
    kv_link_bytes_per_s: float = 25e9
    kv_link_latency_s: float = 0.0
    check_plans: bool = True
    # Fast-forward runs of a steady plain-decode repeat step in one event when the truth model is
    # exact (same results as stepping one by one; see `Simulation`).
    fast_forward: bool = True
    # Faults: (time_s, replica_id) at which a replica's engine dies (`PlannerCore.remove_replica`).
    replica_failures: tuple[tuple[float, int], ...] = ()

    def num_blocks(self) -> int:
        if self.num_blocks_per_replica is not None:
            return self.num_blocks_per_replica
        tokens = DEFAULT_KV_TOKENS.get(self.perf_model.name, _FALLBACK_KV_TOKENS)
        return tokens // self.block_size

    def gpus_per_replica(self) -> int:
        if self.num_gpus_per_replica is not None:
            return self.num_gpus_per_replica
        return PERF_MODEL_NUM_GPUS.get(self.perf_model.name, 1)

    def kv_transfer_s(self, num_tokens: int) -> float:
        per_token = self.kv_bytes_per_token or KV_BYTES_PER_TOKEN.get(
            self.perf_model.name, _FALLBACK_KV_BYTES
        )
        return self.kv_link_latency_s + num_tokens * per_token / self.kv_link_bytes_per_s


@dataclass
class SimResult:
    records: list[RequestRecord]
    workload: Workload
    config: SimConfig
    sim_duration_s: float  # virtual time from the first arrival to the last event
    wall_s: float
    num_steps: int
    num_replans: int
    replan_wall_total_s: float
    replan_wall_max_s: float
    num_gpus: int
    num_fast_forward_steps: int = 0  # steps applied in fast-forwarded cruises (in num_steps too)

    @property
    def speedup(self) -> float:
        """Simulated seconds per wall-clock second."""
        return self.sim_duration_s / self.wall_s if self.wall_s > 0 else float("inf")

    @property
    def attainment(self) -> float:
        """Share of requests (tool rounds counted one by one) that attained every stage SLO."""
        if not self.records:
            return 0.0
        return sum(r.attainment.ok for r in self.records) / len(self.records)


_ARRIVAL, _STEP, _TIMER, _MIGRATION, _FAILURE, _CRUISE = range(6)


class _Cruise:
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


class _Runner:
    """A replica's simulated engine and the plan it is walking."""

    __slots__ = ("busy", "cruise", "cursor", "detached", "engine", "replica_id")

    def __init__(self, replica_id: int, engine: SimEngine) -> None:
        self.replica_id = replica_id
        self.engine = engine
        self.cursor: PlanCursor | None = None
        self.busy = False  # a step (or a cruise) is in flight
        self.cruise: _Cruise | None = None
        self.detached: set[str] = set()  # migrating away: KV still here, no more steps

    def is_live(self, request_id: str) -> bool:
        return self.engine.has_request(request_id) and request_id not in self.detached

    def live(self):
        """What the plan cursor checks liveness against (a container is the fast path)."""
        return self.is_live if self.detached else self.engine.live_requests


class Simulation:
    """One simulation run; `simulate()` is the short way to use it."""

    def __init__(self, workload: Workload, config: SimConfig) -> None:
        self.workload = workload
        self.config = config
        self.clock = VirtualClock()
        self.specs = _replica_specs(config)
        self.core = PlannerCore(
            self.specs,
            _formulation_factory(config),
            router=make_router(config.routing, config.max_forwards),
            replan=config.replan,
            fallback=config.fallback,
            spec_acceptance_prior=config.spec_acceptance_prior,
            check_plans=config.check_plans,
        )
        truth = config.truth or TruthModel(config.perf_model)
        self.runners = {
            spec.replica_id: _Runner(
                spec.replica_id,
                SimEngine(
                    truth,
                    spec.num_total_blocks,
                    spec.block_size,
                    spec.max_spec_tokens,
                    config.true_acceptance_rate,
                    seed=config.seed * 1000 + spec.replica_id,
                    clock=self.clock,
                ),
            )
            for spec in self.specs
        }
        self.records: dict[str, RequestRecord] = {}
        self.chains = {c.chain_id: c for c in workload.chains}
        self._heap: list[tuple[float, int, int, Any]] = []
        self._seq = 0
        self._timer_at: float | None = None
        self._cruising: dict[int, _Runner] = {}
        self._can_cruise = config.fast_forward and truth.is_exact
        self.num_steps = 0
        self.num_fast_forward_steps = 0
        self.last_event_s = 0.0

    # ------------------------------------------------------------------ driving

    def run(self) -> SimResult:
        for request in self.workload.requests:
            self._push(request.arrival_s, _ARRIVAL, request)
        for chain in self.workload.chains:
            self._push(
                chain.arrival_s,
                _ARRIVAL,
                chain.round_request(0, chain.arrival_s, self.config.perf_model),
            )
        first_s = min((e[0] for e in self._heap), default=0.0)
        end_s = self._end_time(first_s)
        for at_s, replica_id in self.config.replica_failures:
            self._push(at_s, _FAILURE, replica_id)
        start_wall = time.perf_counter()
        handlers: dict[int, Callable[[float, Any], None]] = {
            _ARRIVAL: self._on_arrival,
            _STEP: self._on_step,
            _TIMER: self._on_timer,
            _MIGRATION: self._on_migration,
            _FAILURE: self._on_failure,
            _CRUISE: self._on_cruise_end,
        }
        heap = self._heap
        while heap:
            now_s, _, kind, payload = heapq.heappop(heap)
            if now_s > end_s:
                break
            if self._is_stale(kind, payload):
                continue  # a superseded timer or cruise end: nothing happens then
            self.clock.now_s = now_s
            self.last_event_s = now_s
            handlers[kind](now_s, payload)
            if self._cruising:
                self._cut_cruises(now_s)
            self._schedule_timer(now_s)
        self._stop_cruises(end_s)
        wall_s = time.perf_counter() - start_wall
        stats = self.core.stats
        return SimResult(
            records=list(self.records.values()),
            workload=self.workload,
            config=self.config,
            sim_duration_s=max(0.0, self.last_event_s - first_s),
            wall_s=wall_s,
            num_steps=self.num_steps,
            num_replans=stats.num_replans,
            replan_wall_total_s=stats.total_wall_s,
            replan_wall_max_s=stats.max_wall_s,
            num_gpus=len(self.specs) * self.config.gpus_per_replica(),
            num_fast_forward_steps=self.num_fast_forward_steps,
        )

    def _is_stale(self, kind: int, payload: Any) -> bool:
        if kind == _TIMER:
            return self._timer_at != payload
        if kind == _CRUISE:
            runner = self.runners.get(payload[0])
            return runner is None or runner.cruise is not payload[1]
        return False

    def _end_time(self, first_s: float) -> float:
        if self.config.max_sim_time_s is not None:
            return first_s + self.config.max_sim_time_s
        last_s = max((e[0] for e in self._heap), default=0.0)
        return last_s + self.config.drain_s

    def _push(self, at_s: float, kind: int, payload: Any) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (at_s, self._seq, kind, payload))

    def _schedule_timer(self, now_s: float) -> None:
        due_s = self.core.next_timer_s()
        if due_s is None:
            return
        due_s = max(due_s, now_s)
        if self._timer_at is None or due_s < self._timer_at or self._timer_at < now_s:
            self._timer_at = due_s
            self._push(due_s, _TIMER, due_s)

    # ------------------------------------------------------------------ events

    def _on_arrival(self, now_s: float, request: Request) -> None:
        self.records[request.request_id] = RequestRecord(request)
        self._handle(self.core.submit(request, now_s), now_s)

    def _on_step(
        self, now_s: float, report: StepReport, run_ends_s: list[float] | None = None
    ) -> None:
        runner = self.runners.get(report.replica_id)
        if runner is None:
            return  # the replica died while the step ran: its work is lost
        runner.busy = False
        if report.error:
            runner.cursor = None  # the engine drops its plan after a step it could not run
        else:
            self._record_tokens(report, run_ends_s)
        num_steps = len(run_ends_s) if run_ends_s else 1
        self._handle(self.core.on_step(report, now_s, num_steps), now_s)
        self._start_step(runner, now_s)

    # ------------------------------------------------------------------ fast-forward
    #
    # A replica whose plan is in a one-step repeat cycle of plain decodes, under an exact truth
    # model, runs identical steps of constant time until one of its requests finishes. Instead of
    # one event per step, the simulator schedules one "cruise" event at the end of those runs and
    # applies them at once (engine, core, per-token times). This gives the same result as single
    # steps because nothing in between can change what the replica does: the core re-plans a busy
    # replica only at a step boundary after a trigger, so after every event the simulator asks the
    # core whether a trigger fired for a cruising replica (`replan_pending`, `timer_due_s`) and, if
    # so, cuts the cruise at the first boundary where single steps would have re-planned.

    def _try_cruise(self, runner: _Runner, step_id: int, step: Step, now_s: float) -> bool:
        cursor = runner.cursor
        if not cursor.in_repeat or len(cursor.envelope.plan.repeat) != 1:
            return False
        if self.core.replan_pending(runner.replica_id):
            return False
        num_steps = runner.engine.repeatable_steps(step)
        if num_steps < 2:
            return False
        step_time_s = runner.engine.truth.step_time_s(step.num_batched_tokens, 0, 0)
        cruise = _Cruise(step, step_id, now_s, step_time_s, num_steps)
        due_s = self.core.timer_due_s(runner.replica_id)
        if due_s is not None and due_s < cruise.end_s:
            cruise = _Cruise(
                step, step_id, now_s, step_time_s, cruise.first_boundary_at_or_after(due_s)
            )
            if cruise.num_steps < 2:
                return False
        runner.engine.reserve_repeat(step, cruise.num_steps)
        runner.cruise = cruise
        runner.busy = True
        self._cruising[runner.replica_id] = runner
        self._push(cruise.end_s, _CRUISE, (runner.replica_id, cruise))
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
                cut = _Cruise(
                    cruise.step, cruise.first_step_id, cruise.start_s, cruise.step_time_s, num_steps
                )
                runner.cruise = cut
                self._push(cut.end_s, _CRUISE, (replica_id, cut))

    def _on_cruise_end(self, now_s: float, payload: tuple[int, _Cruise]) -> None:
        replica_id, cruise = payload
        runner = self.runners.get(replica_id)
        if runner is None or runner.cruise is not cruise:
            return  # superseded by a cut, or the replica died
        self._finish_cruise(runner, cruise.num_steps, now_s)

    def _finish_cruise(self, runner: _Runner, num_steps: int, now_s: float) -> None:
        cruise = runner.cruise
        runner.cruise = None
        del self._cruising[runner.replica_id]
        last_id = runner.cursor.repeat_more(num_steps - 1)
        report = runner.engine.execute_repeated(
            cruise.step, runner.replica_id, last_id, num_steps, cruise.start_s
        )
        self.num_steps += num_steps - 1
        self.num_fast_forward_steps += num_steps
        cruise.num_steps = num_steps
        self._on_step(report.end_s, report, cruise.run_ends_s())

    def _on_timer(self, now_s: float, due_s: float) -> None:
        if self._timer_at != due_s:
            return  # superseded by an earlier timer
        self._timer_at = None
        self._handle(self.core.tick(now_s), now_s)

    def _on_failure(self, now_s: float, replica_id: int) -> None:
        runner = self.runners.get(replica_id)
        if runner is None:
            return
        self._stop_cruise(runner, now_s)
        del self.runners[replica_id]
        self._handle(self.core.remove_replica(replica_id, now_s), now_s)

    def _stop_cruise(self, runner: _Runner, at_s: float) -> None:
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

    def _on_migration(self, now_s: float, migration) -> None:
        source = self.runners.get(migration.from_replica)
        if source is not None:
            source.engine.abort(migration.request_id)
            source.detached.discard(migration.request_id)
        request = self.records[migration.request_id].request
        target = self.runners.get(migration.to_replica)
        num_cached = 0
        if target is not None:
            num_cached = target.engine.import_request(
                EngineRequest(
                    migration.request_id, request.num_prompt_tokens, request.num_output_tokens
                ),
                migration.num_computed_tokens,
                migration.num_generated_tokens,
            )
        self._handle(self.core.complete_migration(migration.request_id, num_cached, now_s), now_s)
        for runner in (source, target):
            if runner is not None:
                self._start_step(runner, now_s)

    # ------------------------------------------------------------------ core output

    def _handle(self, out: CoreOutput, now_s: float) -> None:
        records = self.records
        for rid, replica_id, decision in out.verdicts:
            record = records[rid]
            record.verdict = decision.verdict
            record.replica_id = replica_id
            if decision.verdict is Verdict.REJECTED:
                pass  # a rejected tool round ends its chain
        for rid, _from, _to in out.forwards:
            records[rid].num_forwards += 1
        for rid, _replica in out.preempted:
            records[rid].num_preemptions += 1
        for replica_id, rid in out.aborts:
            runner = self.runners.get(replica_id)
            if runner is not None:
                runner.engine.abort(rid)
        for migration in out.migrations:
            self.runners[migration.from_replica].detached.add(migration.request_id)
            self._push(
                now_s + self.config.kv_transfer_s(migration.num_computed_tokens),
                _MIGRATION,
                migration,
            )
        for envelope in out.plans.values():
            self._install(envelope, now_s)
        for rid, _replica in out.finished:
            self._on_finished(records[rid], now_s)

    def _install(self, envelope: PlanEnvelope, now_s: float) -> None:
        runner = self.runners[envelope.replica_id]
        engine = runner.engine
        for rid in envelope.plan.preempt:
            engine.preempt(rid)
        for request in envelope.new_requests:
            done = envelope.resumed.get(request.request_id, 0)
            engine.add_request(
                EngineRequest(
                    request.request_id,
                    request.num_prompt_tokens + done,
                    request.num_output_tokens - done,
                )
            )
        runner.cursor = PlanCursor(envelope)
        self._start_step(runner, now_s)

    def _start_step(self, runner: _Runner, now_s: float) -> None:
        if runner.busy or runner.cursor is None:
            return
        next_step = runner.cursor.next_step(runner.live())
        if next_step is None:
            runner.cursor = None
            return
        step_id, step = next_step
        if self._can_cruise and self._try_cruise(runner, step_id, step, now_s):
            self.num_steps += 1
            return
        report = runner.engine.execute(step, runner.replica_id, step_id)
        runner.busy = True
        self.num_steps += 1
        self._push(report.end_s, _STEP, report)

    def _record_tokens(self, report: StepReport, run_ends_s: list[float] | None) -> None:
        records = self.records
        if run_ends_s:  # a cruise: one token per run
            for rid in report.num_new_tokens:
                records[rid].token_times_s.extend(run_ends_s)
            return
        end_s = report.end_s
        for rid, num_new in report.num_new_tokens.items():
            if num_new == 1:
                records[rid].token_times_s.append(end_s)
            else:
                records[rid].token_times_s.extend([end_s] * num_new)

    def _on_finished(self, record: RequestRecord, now_s: float) -> None:
        record.finished = True
        request = record.request
        if request.chain_id is None:
            return
        chain: ToolChain = self.chains[request.chain_id]
        k = request.round_index + 1
        if k < chain.num_rounds:
            arrival_s = now_s + chain.rounds[k].tool_delay_s
            self._push(
                arrival_s, _ARRIVAL, chain.round_request(k, arrival_s, self.config.perf_model)
            )


def simulate(workload: Workload, config: SimConfig | None = None) -> SimResult:
    """Run `workload` through the planner core and simulated engines in virtual time."""
    return Simulation(workload, config or SimConfig()).run()


def _replica_specs(config: SimConfig) -> list[ReplicaSpec]:
    if config.num_replicas < 1:
        raise ValueError("num_replicas must be at least 1")
    roles = ["mixed"] * config.num_replicas
    if registry.formulation_class(config.policy).disaggregated:
        if config.num_replicas < 2:
            raise ValueError(
                f"policy {config.policy!r} is disaggregated: it needs at least 2 replicas"
            )
        num_prefill = config.num_prefill_replicas or config.num_replicas // 2
        if not 1 <= num_prefill < config.num_replicas:
            raise ValueError("num_prefill_replicas must leave at least one decode replica")
        roles = ["prefill"] * num_prefill + ["decode"] * (config.num_replicas - num_prefill)
    return [
        ReplicaSpec(
            replica_id=i,
            perf_model=config.perf_model,
            num_total_blocks=config.num_blocks(),
            block_size=config.block_size,
            max_spec_tokens=config.max_spec_tokens,
            role=role,
            num_gpus=config.gpus_per_replica(),
        )
        for i, role in enumerate(roles)
    ]


def _formulation_factory(config: SimConfig):
    cls = registry.formulation_class(config.policy)

    def make(spec: ReplicaSpec):
        params = dict(config.policy_params)
        if cls.disaggregated:
            params["role"] = spec.role
        return registry.create(config.policy, **params)

    return make
