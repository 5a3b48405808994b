"""What the planner core knows about one engine replica: its spec, its requests' progress, its free
memory, the plan it is running, and its speculative-decoding acceptance estimate.

The core owns `ReplicaState` objects and updates them from engine reports; formulations see them
only through the read-only `ReplicaView` that `view()` builds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from formulations.interface import Formulation
from formulations.perf_model import PerfModel
from formulations.progress import num_blocks_for
from formulations.state import ExpectedRound, ReplicaView, RequestState
from wire.protocol import PlanMsg, StepReport

ROLES = ("mixed", "prefill", "decode")


@dataclass(slots=True)
class KeptKV:
    """KV an engine keeps for a paused tool chain (planner_svc/chains.py)."""

    chain_id: str
    num_tokens: int
    num_blocks: int
    pinned: bool  # held until attached or released; else evictable (counted free by the engine)
    expires_s: float | None  # pinned: released then; evictable: None (the engine's LRU decides)
    on_host: bool = False  # copied to the engine's host memory: no GPU blocks held (expires too)
    # the chain's next round as expected, one per equally likely pause (chains.py)
    next_round: tuple[ExpectedRound, ...] = ()


@dataclass(frozen=True)
class ReplicaSpec:
    """One engine replica as the planner sees it."""

    replica_id: int
    perf_model: PerfModel  # what the planner believes a step costs on this replica
    num_total_blocks: int
    block_size: int = 16
    max_spec_tokens: int = 0  # 0: no draft model
    role: str = "mixed"  # "prefill" / "decode" replicas for disaggregated (DistServe) policies
    num_gpus: int = 1  # GPUs this replica occupies (capacity per GPU)
    # The engine keeps a tool chain's KV between rounds when asked (EngineRequest.retain_kv): the
    # simulator sets it (SimConfig.kv_reuse), the daemon when the engine's READY says so.
    kv_retention: bool = False
    # Host memory the engine offers for kept KV (blocks; 0: none) and its copy-in time per token.
    kv_host_blocks: int = 0
    kv_swap_s_per_token: float = 0.0

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(
                f"replica {self.replica_id}: role must be one of {ROLES}, got {self.role!r}"
            )
        if self.num_total_blocks < 1 or self.block_size < 1:
            raise ValueError(
                f"replica {self.replica_id}: needs at least one KV block of >= 1 token"
            )
        if self.max_spec_tokens < 0:
            raise ValueError(f"replica {self.replica_id}: max_spec_tokens must be >= 0")


class ReplicaState:
    """Mutable per-replica state kept by the planner core."""

    def __init__(self, spec: ReplicaSpec, formulation: Formulation, spec_prior: float) -> None:
        self.spec = spec
        self.formulation = formulation
        # Decides admission against the SLOs (see Formulation.admission_control).
        self.admission_control = bool(getattr(formulation, "admission_control", True))
        self.running: dict[str, RequestState] = {}  # admitted / best effort, in admission order
        self.waiting: dict[str, RequestState] = {}  # no verdict yet, in arrival order
        self.num_free_blocks = spec.num_total_blocks
        self.next_step_id = 0  # id of the next step the engine will report
        self.plan: PlanMsg | None = None  # the last plan sent to the engine
        self.last_step_time_s = 0.0  # the engine's last reported step
        self.unsent: dict[str, None] = {}  # placed here; the engine has not been sent them yet
        self.num_plans = 0
        self.last_plan_s = float("-inf")
        self.replan_requested = False  # a trigger fired; re-plan at the next step boundary
        self.num_consecutive_errors = 0
        self.repeat_ids: frozenset[str] = frozenset()
        self.num_live_repeat = 0  # running requests the repeat cycle still serves
        self.uncovered: set[str] = set()  # running requests the plan's repeat does not serve
        self.kept: dict[str, KeptKV] = {}  # chain id -> KV the engine keeps for the paused chain
        # Online acceptance-rate estimate (`observe_spec`): successes / trials, with a prior worth
        # `_PRIOR_WEIGHT` trials.
        self._spec_accepted = spec_prior * _PRIOR_WEIGHT
        self._spec_proposed = float(_PRIOR_WEIGHT)

    # -- derived state ----------------------------------------------------------------------------

    @property
    def replica_id(self) -> int:
        return self.spec.replica_id

    @property
    def spec_acceptance_rate(self) -> float:
        return self._spec_accepted / self._spec_proposed

    @property
    def has_work(self) -> bool:
        return bool(self.running) or bool(self.waiting)

    @property
    def has_unplanned_work(self) -> bool:
        """Waiting requests, or running ones that the current repeat cycle does not serve."""
        return bool(self.waiting) or bool(self.uncovered)

    def is_busy(self) -> bool:
        """True while the engine still has plan steps to run (it will send another report)."""
        if self.num_live_repeat > 0:
            return True
        plan = self.plan
        if plan is None or self.next_step_id >= plan.end_step_id:
            return False
        steps = plan.steps
        for i in range(self.next_step_id - plan.start_step_id, len(steps)):
            if any(rid in self.running for rid in steps[i].num_tokens):
                return True
        return False

    def load(self) -> int:
        """Requests on the replica (a cheap load measure for routing)."""
        return len(self.running) + len(self.waiting)

    def context_estimate(self) -> int:
        """Cached context one decode of a planned step attends over (each decode adds it to the
        `c` of the performance model): the mean KV of the running requests. 0 when the model has
        no context term: nothing to estimate."""
        if not self.spec.perf_model.has_context_term or not self.running:
            return 0
        total = sum(state.num_computed_tokens for state in self.running.values())
        return -(-total // len(self.running))

    def num_pinned_blocks(self) -> int:
        """Blocks held for paused chains (pinned kept KV no waiting round has claimed yet)."""
        return sum(entry.num_blocks for entry in self.kept.values() if entry.pinned)

    def view(self, now_s: float) -> ReplicaView:
        """The formulation's view. Pinned KV of paused chains is left out of the replica's
        blocks: planned as held for the whole horizon (a simplification: it is released when the
        next round arrives, predicted after the chain's pause)."""
        spec = self.spec
        pinned = self.num_pinned_blocks() if self.kept else 0
        expected = tuple(r for e in self.kept.values() for r in e.next_round)
        on_host = sum(e.num_blocks for e in self.kept.values() if e.on_host) if self.kept else 0
        return ReplicaView(
            replica_id=spec.replica_id,
            now_s=now_s,
            perf_model=spec.perf_model,
            block_size=spec.block_size,
            num_total_blocks=max(1, spec.num_total_blocks - pinned),
            num_free_blocks=self.num_free_blocks,
            running=tuple(self.running.values()),
            waiting=tuple(self.waiting.values()),
            max_spec_tokens=spec.max_spec_tokens,
            spec_acceptance_rate=self.spec_acceptance_rate if spec.max_spec_tokens else 0.0,
            context_tokens_per_decode=self.context_estimate(),
            num_kept_blocks=pinned,
            expected_rounds=expected,
            num_host_free_blocks=max(0, spec.kv_host_blocks - on_host),
            kv_swap_s_per_token=spec.kv_swap_s_per_token,
        )

    # -- updates
    # ------------------------------------------------------------------------------------

    def install(self, plan: PlanMsg, now_s: float) -> None:
        self.plan = plan
        self.num_plans += 1
        self.last_plan_s = now_s
        self.replan_requested = False
        ids: set[str] = set()
        for step in plan.repeat:
            ids.update(step.num_tokens)
        running_ids = self.running.keys()
        self.repeat_ids = frozenset(ids)
        self.num_live_repeat = len(running_ids & ids)
        self.uncovered = running_ids - ids

    def set_perf_model(self, perf_model: PerfModel) -> None:
        """Plan with another model from the next plan on (an online refit: planner_svc/refit.py);
        the running plan is kept."""
        self.spec = dataclasses.replace(self.spec, perf_model=perf_model)

    def remove_running(self, request_id: str) -> RequestState | None:
        state = self.running.pop(request_id, None)
        if state is None:
            return None
        if request_id in self.repeat_ids:
            self.num_live_repeat -= 1
        self.uncovered.discard(request_id)
        return state

    def add_running(self, state: RequestState) -> None:
        self.running[state.request_id] = state
        self.uncovered.add(state.request_id)

    def drop_kv(self, state: RequestState) -> None:
        """Preempt by recompute: the request keeps its output but loses its KV cache."""
        self.num_free_blocks += state.num_blocks
        state.num_blocks = 0
        state.num_computed_tokens = 0

    def observe_spec(self, outcomes: dict[str, tuple[int, int]]) -> None:
        """Update the acceptance-rate estimate from one step's (accepted, proposed) per request.

        Under the i.i.d. model a verification is a run of Bernoulli(alpha) trials stopped at the
        first rejection (or after all drafts): `accepted` successes out of `accepted + 1` trials
        when accepted < proposed, else `proposed` out of `proposed`. The estimate is successes /
        trials over all verifications plus the prior (the maximum-likelihood alpha), not accepted /
        proposed, which is biased low: E[accepted] = alpha + ... + alpha^s < s * alpha."""
        for num_accepted, num_proposed in outcomes.values():
            self._spec_accepted += num_accepted
            self._spec_proposed += num_accepted + (1 if num_accepted < num_proposed else 0)

    def blocks_for(self, num_tokens: int) -> int:
        return num_blocks_for(num_tokens, self.spec.block_size)

    def forget_plan(self) -> None:
        """The engine dropped its plan (after a step it could not run): all work is unplanned."""
        self.plan = None
        self.num_live_repeat = 0
        self.repeat_ids = frozenset()
        self.uncovered = set(self.running)

    def apply_report(self, report: StepReport) -> tuple[list[RequestState], list[RequestState]]:
        """Advance the running requests by an engine report. Returns the requests that finished
        and those that produced output but go on. A request produces output tokens only in a
        step that computed some of its tokens; the engine's `finished` also ends a request
        (EOS or a stop before its planned length)."""
        running = self.running
        block_size = self.spec.block_size
        new_tokens = report.num_new_tokens
        done: list[RequestState] = []
        produced: list[RequestState] = []
        ended = report.finished
        for rid, num_computed in report.num_computed_tokens.items():
            state = running.get(rid)
            if state is None:
                continue
            computed = state.num_computed_tokens + num_computed
            state.num_computed_tokens = computed
            state.num_blocks = -(-computed // block_size)  # num_blocks_for, inlined: hot loop
            num_new = new_tokens.get(rid)
            if not num_new:
                continue
            if state.first_token_s is None:
                state.first_token_s = report.end_s
            generated = state.num_generated_tokens + num_new
            state.num_generated_tokens = generated
            if generated >= state.request.num_output_tokens or (ended and rid in ended):
                done.append(state)
            else:
                produced.append(state)
        if report.finished:
            counted = {s.request_id for s in done}
            for rid in report.finished:
                state = running.get(rid)
                if state is not None and rid not in counted:
                    done.append(state)
        if report.num_proposed_spec_tokens:
            accepted = report.num_accepted_spec_tokens
            self.observe_spec(
                {
                    rid: (accepted.get(rid, 0), n)
                    for rid, n in report.num_proposed_spec_tokens.items()
                }
            )
        return done, produced


# Weight of the acceptance-rate prior, in draft-token trials.
_PRIOR_WEIGHT = 20
