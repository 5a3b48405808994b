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

Hardware facts (KV memory per replica, KV transfer between replicas): lab/hardware.py. The
fast-forward of steady decode cycles: lab/fast_forward.py.
"""

from __future__ import annotations

import dataclasses
import heapq
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from engine_adapters.sim_engine import SimEngine, VirtualClock
from formulations import registry
from formulations.deadlines import TOLERANCE
from formulations.lengths import LENGTH_MODES, LengthPredictor, LengthPrior, make_predictor
from formulations.perf_model import PERF_MODEL_NUM_GPUS, PerfModel, TruthModel, perf_model_preset
from formulations.plan import Verdict
from formulations.refit import RefitParams
from formulations.request import Request, ToolChain
from lab.fast_forward import CRUISE, Cruise, FastForward
from lab.hardware import DEFAULT_LINK_BYTES_PER_S, default_kv_tokens, kv_bytes_per_token
from lab.workloads.workload import Workload
from planner_svc.core import PlannerCore
from planner_svc.outcome import CoreOutput
from planner_svc.records import RequestRecord
from planner_svc.refit import RefitStatus
from planner_svc.replica import ReplicaSpec
from planner_svc.router import make_router
from planner_svc.triggers import ReplanPolicy
from wire.plan_cursor import PlanCursor
from wire.protocol import EngineRequest, PlanMsg, StepReport


def _default_perf_model() -> PerfModel:
    return perf_model_preset("opt-13b-2xa100")


@dataclass
class SimConfig:
    formulation: str = "vllm_fcfs"
    formulation_params: dict[str, Any] = field(default_factory=dict)
    num_replicas: int = 1
    perf_model: PerfModel = field(default_factory=_default_perf_model)  # what the planner believes
    truth: TruthModel | None = None  # what the engines run; None: exactly `perf_model`
    refit: RefitParams | None = None  # refit the planner's model online (planner_svc/refit.py)
    num_blocks_per_replica: int | None = None  # None: DEFAULT_KV_TOKENS of the preset / block_size
    block_size: int = 16
    max_spec_tokens: int = 0
    true_acceptance_rate: float = 0.7
    spec_acceptance_prior: float = 0.7
    router: str = "round_robin"
    max_forwards: int = 1
    fallback: str = "reject"
    replan: ReplanPolicy = field(default_factory=ReplanPolicy)
    seed: int = 0
    max_sim_time_s: float | None = None  # None: last first arrival + drain_s
    drain_s: float = 600.0
    num_gpus_per_replica: int | None = None  # None: from the preset (PERF_MODEL_NUM_GPUS), else 1
    # Disaggregated formulations only:
    num_prefill_replicas: int | None = None  # None: half of the replicas (at least one)
    kv_bytes_per_token: int | None = None  # None: from the preset
    kv_link_bytes_per_s: float = DEFAULT_LINK_BYTES_PER_S
    kv_link_latency_s: float = 0.0
    check_plans: bool = True
    # Fast-forward runs of a steady plain-decode repeat step in one event when the truth model is
    # exact (same results as stepping one by one; see `Simulation`).
    fast_forward: bool = True
    # Faults: (time_s, replica_id) at which a replica's engine dies (`PlannerCore.remove_replica`).
    replica_failures: tuple[tuple[float, int], ...] = ()
    # What the planner knows of output lengths (formulations/lengths.py): "predicted" (the
    # default: the cap below, and what it learns from finished requests), "oracle" (every
    # request's true output and thinking lengths: the paper's setting), or "max_tokens" (the cap
    # alone). The engines always stop at the true length.
    lengths: str = "predicted"
    length_priors: dict[str, LengthPrior] = field(default_factory=dict)  # by class (lengths.py)
    # A predictor of one's own for the "predicted" mode (a factory: each run gets a fresh one).
    predictor: Callable[[], LengthPredictor] | None = None
    # The cap a client sets (max_tokens): what is left of the served model's context after the
    # prompt (and the speculation lookahead). The workload must be filtered to this context.
    max_model_len: int = 8192
    # Stop once more than this many items (a request, or a whole tool chain) are known to fail:
    # rejected, or a first token past its TTFT target. The capacity search sets it to what the
    # attainment target allows, so that a rate far past capacity is not simulated to the end;
    # the result is then `stopped_early` (its attainment an upper bound). None: run to the end.
    stop_after_failed_items: int | None = None
    # Tool chains (docs/AGENTS.md): the engines keep a round's KV for the chain's next round as the
    # formulation decides (pinned, or evictable as vLLM's prefix cache); False: every round
    # re-prefills its whole context (the behaviour before issue 12). `kv_ttl_s`: pinned KV is
    # released this long after its round finished if the next round has not taken it.
    kv_reuse: bool = True
    kv_ttl_s: float = 30.0
    # Host memory per replica for kept KV, in blocks (0: none), and the time to copy one token's
    # KV back in from it (engines honour retain_kv "host"; bench_agents.py --host-blocks).
    kv_host_blocks: int = 0
    kv_swap_s_per_token: float = 0.0

    def __post_init__(self) -> None:
        if self.lengths not in LENGTH_MODES:
            known = ", ".join(LENGTH_MODES)
            raise ValueError(f"lengths must be one of {known}, got {self.lengths!r}")

    def length_predictor(self):
        """A fresh predictor of this length mode (each run learns from nothing but its priors)."""
        if self.lengths == "predicted":
            if self.predictor is not None:
                return self.predictor()
            return make_predictor("predicted", priors=self.length_priors)
        return make_predictor(self.lengths)

    def planner_request(self, request: Request) -> Request:
        """The request as the planner sees it in this length mode (the true one in `oracle`):
        the cap as its output length, and never whether a chain round is its chain's last
        (chain_forecast.py predicts whether another follows)."""
        if self.lengths == "oracle":
            return request
        cap = self.max_model_len - request.num_prompt_tokens - self.max_spec_tokens
        if cap < request.num_output_tokens:
            raise ValueError(
                f"request {request.request_id} is longer than max_model_len {self.max_model_len}"
                " allows: filter the workload to the same context length"
            )
        thinking = cap if request.slo.thinking_tpot_s is not None else 0
        return dataclasses.replace(
            request, num_output_tokens=cap, num_thinking_tokens=thinking, chain_last_round=False
        )

    def num_blocks(self) -> int:
        if self.num_blocks_per_replica is not None:
            return self.num_blocks_per_replica
        tokens = default_kv_tokens(self.perf_model.name)
        return tokens // self.block_size

    def gpus_per_replica(self) -> int:
        if self.num_gpus_per_replica is not None:
            return self.num_gpus_per_replica
        return PERF_MODEL_NUM_GPUS.get(self.perf_model.name, 1)

    def kv_transfer_s(self, num_tokens: int) -> float:
        per_token = self.kv_bytes_per_token or kv_bytes_per_token(self.perf_model.name)
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
    refits: list[RefitStatus] = field(default_factory=list)  # per replica, with `config.refit`
    stopped_early: bool = False  # `config.stop_after_failed_items` was passed
    kv_pinned_block_s: float = 0.0  # pinned KV held in tool pauses, block-seconds (all engines)
    num_kv_misses: int = 0  # rounds whose claimed kept KV was evicted before they registered

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


_ARRIVAL, _STEP, _TIMER, _MIGRATION, _FAILURE = range(5)
_CRUISE = CRUISE


class _Runner:
    """A replica's simulated engine and the plan it is walking."""

    __slots__ = ("busy", "cruise", "cursor", "detached", "engine", "replica_id")

    def __init__(self, replica_id: int, engine: SimEngine) -> None:
        self.replica_id = replica_id
        self.engine = engine
        self.cursor: PlanCursor | None = None
        self.busy = False  # a step (or a cruise) is in flight
        self.cruise: Cruise | None = None
        self.detached: set[str] = set()  # migrating away: KV still here, no more steps

    def is_live(self, request_id: str) -> bool:
        return self.engine.has_request(request_id) and request_id not in self.detached

    def live(self):
        """What the plan cursor checks liveness against (a container is the fast path)."""
        return self.is_live if self.detached else self.engine.live_requests


class Simulation(FastForward):
    """One simulation run; `simulate()` is the short way to use it."""

    def __init__(self, workload: Workload, config: SimConfig) -> None:
        self.workload = workload
        self.config = config
        self.clock = VirtualClock()
        self.specs = _replica_specs(config)
        self.core = PlannerCore(
            self.specs,
            _formulation_factory(config),
            router=make_router(config.router, config.max_forwards),
            replan=config.replan,
            fallback=config.fallback,
            spec_acceptance_prior=config.spec_acceptance_prior,
            check_plans=config.check_plans,
            kv_migration=True,  # the simulator moves KV between engines (after its transfer time)
            lengths=config.lengths,
            length_predictor=config.length_predictor(),
            refit=config.refit,
            kv_ttl_s=config.kv_ttl_s,
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
                    host_blocks=spec.kv_host_blocks,
                    swap_s_per_token=spec.kv_swap_s_per_token,
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
        self._failed_items: set[str] = set()  # see SimConfig.stop_after_failed_items
        self._dead_pinned_block_s = 0.0  # pinned block-seconds of engines that died

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
        max_failed = self.config.stop_after_failed_items
        stopped_early = False
        while heap:
            now_s, _, kind, payload = heapq.heappop(heap)
            if now_s > end_s:
                break
            if max_failed is not None and len(self._failed_items) > max_failed:
                stopped_early = True
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
            stopped_early=stopped_early,
            kv_pinned_block_s=self._dead_pinned_block_s
            + sum(r.engine.pinned_block_seconds() for r in self.runners.values()),
            num_kv_misses=self.core.chains.stats.num_misses,
            refits=[
                status
                for i in self.core.replica_ids
                if (status := self.core.refit_status(i)) is not None
            ],
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
        """The record keeps the true request (attainment is checked against it); the planner gets
        what the length mode allows; the engine stops at the true length."""
        self.records[request.request_id] = RequestRecord(request)
        payload = EngineRequest(
            request.request_id,
            request.num_prompt_tokens,
            request.num_output_tokens,
            sim_thinking_tokens=request.num_thinking_tokens,
        )
        planner_request = self.config.planner_request(request)
        self._handle(self.core.submit(planner_request, now_s, payload), now_s)

    def _on_step(
        self,
        now_s: float,
        event: tuple[int, StepReport],
        run_ends_s: list[float] | None = None,
    ) -> None:
        replica_id, report = event
        runner = self.runners.get(replica_id)
        if runner is None:
            return  # the replica died while the step ran: its work is lost
        runner.busy = False
        if report.error:
            runner.cursor = None  # the engine drops its plan after a step it could not run
        else:
            self._record_tokens(report, run_ends_s)
        num_steps = len(run_ends_s) if run_ends_s else 1
        self._handle(self.core.on_step(replica_id, report, now_s, num_steps), now_s)
        self._start_step(runner, now_s)

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
        self._cruising.pop(replica_id, None)  # the stopped cruise's report may have begun one
        runner.cruise = None
        self._dead_pinned_block_s += runner.engine.pinned_block_seconds()
        del self.runners[replica_id]
        self._handle(self.core.remove_replica(replica_id, now_s), now_s)

    def _on_migration(self, now_s: float, migration) -> None:
        source = self.runners.get(migration.from_replica)
        if source is not None:
            source.engine.abort(migration.request_id)
            source.detached.discard(migration.request_id)
        target = self.runners.get(migration.to_replica)
        num_cached = 0
        if target is not None:
            num_cached = target.engine.import_request(
                migration.payload,
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
            record.reason = decision.reason
            record.replica_id = replica_id
            if decision.verdict is Verdict.REJECTED:
                self._fail(record)
        for rid, _from, _to in out.forwards:
            records[rid].num_forwards += 1
        for rid, _replica in out.preempted:
            records[rid].num_preemptions += 1
        for rid, replica_id in out.aborts:
            runner = self.runners.get(replica_id)
            if runner is not None:
                runner.engine.abort(rid)
        for chain_id, replica_id in out.kv_releases:
            runner = self.runners.get(replica_id)
            if runner is not None:
                runner.engine.release_kv(chain_id)
        for migration in out.migrations:
            self.runners[migration.from_replica].detached.add(migration.request_id)
            self._push(
                now_s + self.config.kv_transfer_s(migration.num_computed_tokens),
                _MIGRATION,
                migration,
            )
        for replica_id, plan in out.plans.items():
            self._install(replica_id, plan, now_s)
        for rid, _replica in out.finished:
            self._on_finished(records[rid], now_s)

    def _install(self, replica_id: int, plan: PlanMsg, now_s: float) -> None:
        runner = self.runners[replica_id]
        engine = runner.engine
        for rid in plan.preemptions:
            engine.preempt(rid)
        for request in plan.new_requests:
            num_cached = engine.add_request(request)
            if num_cached:
                self.records[request.request_id].num_cached_tokens = num_cached
        runner.cursor = PlanCursor(plan)
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
        report = runner.engine.execute(step, step_id)
        runner.busy = True
        self.num_steps += 1
        self._push(report.end_s, _STEP, (runner.replica_id, report))

    def _fail(self, record: RequestRecord) -> None:
        request = record.request
        self._failed_items.add(request.chain_id or request.request_id)

    def _record_tokens(self, report: StepReport, run_ends_s: list[float] | None) -> None:
        records = self.records
        if run_ends_s:  # a cruise: one token per run
            for rid in report.num_new_tokens:
                records[rid].token_times_s.extend(run_ends_s)
            return
        end_s = report.end_s
        for rid, num_new in report.num_new_tokens.items():
            record = records[rid]
            if not record.token_times_s and num_new:
                request = record.request
                if end_s - request.arrival_s > (1 + TOLERANCE) * request.ttft_slo_s:
                    self._fail(record)  # judged as check_attainment does
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
    if registry.formulation_class(config.formulation).disaggregated:
        if config.num_replicas < 2:
            raise ValueError(
                f"formulation {config.formulation!r} is disaggregated: it needs at least 2 replicas"
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
            kv_retention=config.kv_reuse,
            kv_host_blocks=config.kv_host_blocks if config.kv_reuse else 0,
            kv_swap_s_per_token=config.kv_swap_s_per_token,
        )
        for i, role in enumerate(roles)
    ]


def _formulation_factory(config: SimConfig):
    cls = registry.formulation_class(config.formulation)

    def make(spec: ReplicaSpec):
        params = dict(config.formulation_params)
        if cls.disaggregated:
            params["role"] = spec.role
        return registry.create(config.formulation, **params)

    return make
