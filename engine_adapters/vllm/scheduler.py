"""A vLLM V1 scheduler that executes the planner's steps exactly (plugged in via `scheduler_cls`).

vLLM's own `Scheduler.schedule()` decides per step how many tokens each request computes (running
requests first, then waiting ones, under a token budget). `PlanScheduler` keeps vLLM's request
bookkeeping, KV block manager and output processing (`update_from_output` is inherited unchanged)
and replaces only that decision: one `schedule()` call runs the step handed to `submit()`, so

    num_scheduled_tokens[r] = step.num_tokens[r] + step.num_spec_tokens[r]   for r in step
    r not in step  =>  r computes nothing this step (a request the planner never names never runs)

A step is checked before anything is touched (`check`): known live requests, token counts within
what each request still has to compute, batch limits, draft tokens available, and enough free KV
blocks for the whole step. A step that fails the check runs not at all and its reason is returned,
which keeps the Engine contract's all-or-nothing rule.

Supported configuration (checked at start-up, see `unsupported_features`): one full-attention KV
cache group (plain decoder-only text models), synchronous scheduling, no LoRA, no KV or
encoder-cache connectors, no pipeline parallelism. Speculative decoding works with
the proposer vLLM is configured with (a draft model, or n-gram on CPU); the plan picks how many of
the proposed draft tokens each request verifies.

Prefix caching (on by default, docs/AGENTS.md "The vLLM engine keeps KV") is how tool chains keep
their KV between rounds: only a request the adapter `claim`ed a prefix for reads the cache, at its
admission, and starts with the cached tokens found (whole blocks, at most the claimed count); every
other request computes from 0, as the planner expects. A finished request whose chain keeps its KV
is recorded in `kept` (kept_prefix.py) before vLLM frees its blocks.

Driven from one thread: the adapter calls `submit`, then steps the engine core once (which calls
`schedule` and `update_from_output`), then reads `take_outcome`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from vllm.v1.core.sched.output import NewRequestData, SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine import EngineCoreEventType
from vllm.v1.request import Request, RequestStatus

from engine_adapters.vllm.kept_prefix import KeptPrefix, KeptPrefixes
from formulations.plan import Step

# vLLM statuses of a request that ran to its end: only these leave KV for their chain's next round.
_FINISHED_NORMALLY = (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH_CAPPED)


@dataclass
class StepOutcome:
    """What one executed plan step did, in vLLM request ids."""

    num_scheduled_tokens: dict[str, int]  # what vLLM computed: plan tokens + verified drafts
    num_spec_tokens: dict[str, int]  # draft tokens verified per request
    new_token_ids: dict[str, list[int]] = field(default_factory=dict)
    finished: dict[str, str] = field(default_factory=dict)  # request id -> vLLM finish reason
    # Requests admitted with a claimed prefix: request id -> cached tokens they started with.
    num_found_tokens: dict[str, int] = field(default_factory=dict)


@dataclass
class _Claim:
    """Cached tokens a waiting request may start with (at most `num_tokens`, whole blocks), and
    the kept entry whose blocks are held for it until it is admitted."""

    num_tokens: int
    entry: KeptPrefix | None


@dataclass(frozen=True)
class _Retention:
    """What to do with a request's KV when it finishes: keep it for `chain_id`."""

    chain_id: str
    pinned: bool


class PlanScheduler(Scheduler):
    """vLLM `Scheduler` whose `schedule()` runs the step given to `submit()`, nothing else."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        problems = unsupported_features(self)
        if problems:
            raise ValueError(
                "PlanScheduler cannot run this vLLM configuration: " + "; ".join(problems)
            )
        self._pending_step: Step | None = None
        self._outcome: StepOutcome | None = None
        self.kept = KeptPrefixes(self.kv_cache_manager.block_pool, self.block_size)
        self._claims: dict[str, _Claim] = {}  # waiting request id -> its claimed prefix
        self._retentions: dict[str, _Retention] = {}  # request id -> keep its KV when it finishes
        # Cached prefixes found by the last check(): request id -> (blocks, tokens).
        self._hits: dict[str, tuple[list, int]] = {}

    # ----- the adapter's side -------------------------------------------------------------------

    def submit(self, step: Step) -> str:
        """Queue `step` (vLLM request ids) for the next `schedule()`; '' or why it cannot run."""
        reason = self.check(step)
        if not reason:
            self._pending_step = step
        return reason

    def take_outcome(self) -> StepOutcome | None:
        outcome, self._outcome = self._outcome, None
        return outcome

    @property
    def num_free_blocks(self) -> int:
        return self.kv_cache_manager.block_pool.get_num_free_blocks()

    @property
    def prefix_caching(self) -> bool:
        return self.cache_config.enable_prefix_caching

    def claim(self, request_id: str, num_tokens: int, entry: KeptPrefix | None) -> None:
        """A waiting request starts with up to `num_tokens` cached tokens at its admission;
        `entry` (its chain's kept prefix, taken from `kept`) holds its blocks until then."""
        self._claims[request_id] = _Claim(num_tokens, entry)

    def retain(self, request_id: str, chain_id: str, pinned: bool) -> None:
        """Keep the request's KV for `chain_id` when it finishes normally (kept_prefix.py)."""
        self._retentions[request_id] = _Retention(chain_id, pinned)

    def preempt(self, request_id: str) -> None:
        """Drop a running request's KV blocks; it recomputes its tokens when a step names it."""
        request = self.requests.get(request_id)
        if request is None or request.status != RequestStatus.RUNNING:
            return
        self.running.remove(request)
        self._preempt_request(request, time.monotonic())

    # ----- feasibility --------------------------------------------------------------------------

    def check(self, step: Step) -> str:
        """Why `step` cannot run exactly as planned, or '' when it can."""
        self._hits = {
            rid: self._prefix_hit(self.requests[rid], self._claims[rid])
            for rid in step.num_tokens
            if rid in self._claims and rid in self.requests
        }
        for request_id, num_tokens in step.num_tokens.items():
            reason = self._check_entry(
                request_id, num_tokens, step.num_spec_tokens.get(request_id, 0)
            )
            if reason:
                return reason
        unknown_spec = set(step.num_spec_tokens) - set(step.num_tokens)
        if unknown_spec:
            return f"draft tokens for requests with no tokens in the step: {sorted(unknown_spec)}"
        return self._check_batch(step)

    def _check_entry(self, request_id: str, num_tokens: int, num_spec_tokens: int) -> str:
        request = self.requests.get(request_id)
        if request is None or request.is_finished():
            return f"request {request_id} is not live in vLLM"
        if num_tokens < 1 or num_spec_tokens < 0:
            return f"request {request_id}: bad token counts ({num_tokens}, {num_spec_tokens} spec)"
        num_remaining = request.num_tokens - self._num_computed_after_admission(request)
        if num_tokens > num_remaining:
            return f"request {request_id}: {num_tokens} tokens planned, {num_remaining} left"
        if num_spec_tokens > 0:
            if num_tokens != 1 or num_remaining != 1:
                return (
                    f"request {request_id}: draft tokens planned for a request that is not decoding"
                )
            if num_spec_tokens > len(request.spec_token_ids):
                return (
                    f"request {request_id}: {num_spec_tokens} draft tokens planned, "
                    f"{len(request.spec_token_ids)} proposed"
                )
        num_positions = request.num_tokens + num_spec_tokens + self.num_sampled_tokens_per_step
        if num_positions > self.max_model_len:
            return f"request {request_id}: {num_positions} positions exceed max_model_len"
        return ""

    def _check_batch(self, step: Step) -> str:
        if step.num_batched_tokens > self.max_num_scheduled_tokens:
            return (
                f"step has {step.num_batched_tokens} tokens, vLLM was started with "
                f"max_num_batched_tokens={self.max_num_scheduled_tokens}"
            )
        admitted = [
            rid for rid in step.num_tokens if self.requests[rid].status != RequestStatus.RUNNING
        ]
        if len(self.running) + len(admitted) > self.max_num_running_reqs:
            return f"step would run more than max_num_seqs={self.max_num_running_reqs} requests"
        num_blocks = sum(
            self._num_new_blocks(self.requests[rid], n + step.num_spec_tokens.get(rid, 0))
            for rid, n in step.num_tokens.items()
        )
        if admitted:
            num_blocks += self.kv_cache_manager.watermark_blocks
        # Cached blocks a prefix hit takes out of the free queue (each once, however many share it).
        num_blocks += len(
            {b.block_id for blocks, _ in self._hits.values() for b in blocks if b.ref_cnt == 0}
        )
        if num_blocks > self.num_free_blocks:
            return f"out of KV blocks: step needs {num_blocks}, {self.num_free_blocks} free"
        return ""

    def _num_computed_after_admission(self, request: Request) -> int:
        # Waiting and preempted requests hold no KV: they start from 0, or from the cached prefix
        # found for their claim.
        if request.status == RequestStatus.RUNNING:
            return request.num_computed_tokens
        hit = self._hits.get(request.request_id)
        return hit[1] if hit is not None else 0

    def _prefix_hit(self, request: Request, claim: _Claim) -> tuple[list, int]:
        """The cached blocks a claimed request would start with now, and their tokens: vLLM's
        longest hit for its prompt within the claim (whole blocks; at least one prompt token is
        left to compute)."""
        if request.status != RequestStatus.WAITING or not self.prefix_caching:
            return [], 0
        max_hit_tokens = min(claim.num_tokens, request.num_tokens - 1)
        blocks, num_hit_tokens, _ = self.kv_cache_manager.coordinator.find_longest_cache_hit(
            request.block_hashes, max_hit_tokens
        )
        num_blocks = num_hit_tokens // self.block_size
        return list(blocks[0][:num_blocks]), num_blocks * self.block_size

    def _num_new_blocks(self, request: Request, num_scheduled_tokens: int) -> int:
        """Blocks allocate_slots will take: ceil(slots needed / block_size) - blocks held."""
        num_slots = min(
            self._num_computed_after_admission(request)
            + num_scheduled_tokens
            + self.num_lookahead_tokens,
            self.max_model_len,
        )
        num_held = len(self.kv_cache_manager.get_block_ids(request.request_id)[0])
        hit = self._hits.get(request.request_id)
        if hit is not None and request.status != RequestStatus.RUNNING:
            num_held += len(hit[0])
        return max(0, -(-num_slots // self.block_size) - num_held)

    # ----- vLLM's side --------------------------------------------------------------------------

    def schedule(self, throttle_prefills: bool = False) -> SchedulerOutput:
        """Run the submitted step (an empty step when none was submitted)."""
        step, self._pending_step = self._pending_step or Step({}), None
        self.current_step += 1
        self.kv_cache_manager.new_step_starts()
        scheduled = _ScheduledBatch()
        for request_id, num_tokens in step.num_tokens.items():
            self._schedule_request(
                self.requests[request_id],
                num_tokens,
                step.num_spec_tokens.get(request_id, 0),
                scheduled,
            )
        scheduler_output = self._make_output(scheduled)
        self._update_after_schedule(scheduler_output)
        self._outcome = StepOutcome(
            dict(scheduler_output.num_scheduled_tokens),
            scheduled.num_spec_tokens,
            num_found_tokens=scheduled.num_found_tokens,
        )
        self._hits = {}
        return scheduler_output

    def _schedule_request(
        self, request: Request, num_tokens: int, num_spec_tokens: int, scheduled: _ScheduledBatch
    ) -> None:
        request_id = request.request_id
        if request.status == RequestStatus.RUNNING:
            new_blocks = self._allocate(request, num_tokens + num_spec_tokens)
            scheduled.running.append(request)
            if num_spec_tokens:
                scheduled.spec_token_ids[request_id] = request.spec_token_ids[:num_spec_tokens]
                scheduled.num_spec_tokens[request_id] = num_spec_tokens
            # Drafts are proposed afresh after every step that runs the request.
            request.spec_token_ids = []
        else:
            new_blocks = self._admit(request, num_tokens, scheduled)
        scheduled.new_blocks[request_id] = new_blocks
        scheduled.num_tokens[request_id] = num_tokens + num_spec_tokens

    def _admit(self, request: Request, num_tokens: int, scheduled: _ScheduledBatch):
        """Move a waiting or preempted request into the running batch (its first step), starting
        with the cached prefix found for its claim, if any."""
        was_preempted = request.status == RequestStatus.PREEMPTED
        claim = self._claims.pop(request.request_id, None)
        hit_blocks, num_hit_tokens = [], 0
        if claim is not None:
            hit_blocks, num_hit_tokens = self._prefix_hit(request, claim)
            # Found again now: an earlier admission of this step may have reused some of the
            # blocks the check found (the step still fits: the check counted them as taken from
            # the free queue), but never start past the check's hit, which the step's count of
            # tokens was checked against.
            num_checked = self._hits.get(request.request_id, ([], 0))[1]
            if num_hit_tokens > num_checked:
                hit_blocks = hit_blocks[: num_checked // self.block_size]
                num_hit_tokens = num_checked
            scheduled.num_found_tokens[request.request_id] = num_hit_tokens
        self.waiting.remove_request(request)
        request.num_computed_tokens = 0
        self._allocate(request, num_tokens, hit_blocks, num_hit_tokens)
        request.num_computed_tokens = num_hit_tokens
        if claim is not None and claim.entry is not None:
            self.kept.unpin(claim.entry)  # the request holds its own reference now
        request.status = RequestStatus.RUNNING
        self.running.append(request)
        (scheduled.resumed if was_preempted else scheduled.new).append(request)
        if num_hit_tokens + num_tokens < request.num_tokens:
            self._inflight_prefills.add(request)
        if self.log_stats:
            request.record_event(EngineCoreEventType.SCHEDULED, time.monotonic())
        return self.kv_cache_manager.get_blocks(request.request_id)

    def _allocate(
        self,
        request: Request,
        num_new_tokens: int,
        hit_blocks: list | None = None,
        num_hit_tokens: int = 0,
    ):
        new_blocks = self.kv_cache_manager.allocate_slots(
            request,
            num_new_tokens,
            num_new_computed_tokens=num_hit_tokens,
            new_computed_blocks=(
                self.kv_cache_manager.create_kv_cache_blocks((hit_blocks,)) if hit_blocks else None
            ),
            num_lookahead_tokens=self.num_lookahead_tokens,
        )
        if new_blocks is None:  # check() counted the blocks, so this is a bug, not a full cache
            raise RuntimeError(
                f"KV allocation failed for {request.request_id} after the step check"
            )
        return new_blocks

    def _make_output(self, scheduled: _ScheduledBatch) -> SchedulerOutput:
        new_requests = scheduled.new
        if self.use_v2_model_runner:  # the v2 runner takes resumed requests as new ones
            new_requests = scheduled.new + scheduled.resumed
            scheduled.resumed = []
        new_reqs_data = [self._new_request_data(r, scheduled) for r in new_requests]
        cached_reqs_data = self._make_cached_request_data(
            scheduled.running,
            scheduled.resumed,
            scheduled.num_tokens,
            scheduled.spec_token_ids,
            scheduled.new_blocks,
        )
        if not self.use_v2_model_runner:
            self.prev_step_scheduled_req_ids = set(scheduled.num_tokens)
        block_copies, _ = self.kv_cache_manager.take_kv_cache_block_copies()
        if block_copies:  # copy-on-write serves partial-block hits, which are never claimed here
            raise RuntimeError("unexpected KV block copies (a partial-block prefix hit)")
        total_num_tokens = sum(scheduled.num_tokens.values())
        if self.defer_block_free and total_num_tokens > 0:
            self.sched_step_seq += 1
        return SchedulerOutput(
            scheduled_new_reqs=new_reqs_data,
            scheduled_cached_reqs=cached_reqs_data,
            num_scheduled_tokens=scheduled.num_tokens,
            total_num_scheduled_tokens=total_num_tokens,
            scheduled_spec_decode_tokens=scheduled.spec_token_ids,
            scheduled_encoder_inputs={},
            preempted_req_ids=self.reset_preempted_req_ids,
            finished_req_ids=self.finished_req_ids,
            free_encoder_mm_hashes=self.encoder_cache_manager.get_freed_mm_hashes(),
            new_block_ids_to_zero=self._get_new_block_ids_to_zero(),
            num_spec_tokens_to_schedule=self.num_spec_tokens,
        )

    def _new_request_data(self, request: Request, scheduled: _ScheduledBatch) -> NewRequestData:
        block_ids = scheduled.new_blocks[request.request_id].get_block_ids()
        prefill_token_ids = request._all_token_ids if self.use_v2_model_runner else None
        return NewRequestData.from_request(
            request, block_ids, prefill_token_ids, uses_mrope=self.model_uses_mrope
        )

    def _free_blocks(self, request: Request) -> None:
        """vLLM frees a finished request's blocks: keep its prefix first if its chain asked, and
        drop a claim it never used (aborted while waiting)."""
        retention = self._retentions.pop(request.request_id, None)
        if retention is not None and request.status in _FINISHED_NORMALLY and self.prefix_caching:
            blocks = self.kv_cache_manager.get_blocks(request.request_id).blocks[0]
            self.kept.keep(retention.chain_id, request, list(blocks), retention.pinned)
        claim = self._claims.pop(request.request_id, None)
        if claim is not None and claim.entry is not None:
            self.kept.unpin(claim.entry)
        super()._free_blocks(request)

    def update_from_output(self, scheduler_output, model_runner_output):
        """vLLM's own output processing; also records the tokens and finishes of this step."""
        engine_core_outputs = super().update_from_output(scheduler_output, model_runner_output)
        if self._outcome is not None:
            for outputs in engine_core_outputs.values():
                for core_output in outputs.outputs:
                    request_id = core_output.request_id
                    self._outcome.new_token_ids[request_id] = list(core_output.new_token_ids)
                    if core_output.finish_reason is not None:
                        self._outcome.finished[request_id] = str(core_output.finish_reason)
        return engine_core_outputs


@dataclass
class _ScheduledBatch:
    """The pieces of one SchedulerOutput while it is being built."""

    new: list[Request] = field(default_factory=list)
    resumed: list[Request] = field(default_factory=list)
    running: list[Request] = field(default_factory=list)
    num_tokens: dict[str, int] = field(default_factory=dict)
    num_spec_tokens: dict[str, int] = field(default_factory=dict)
    spec_token_ids: dict[str, list[int]] = field(default_factory=dict)
    new_blocks: dict = field(default_factory=dict)  # request id -> KVCacheBlocks
    num_found_tokens: dict[str, int] = field(default_factory=dict)  # claimed admissions' hits


def unsupported_features(scheduler: Scheduler) -> list[str]:
    """Features of a vLLM configuration that PlanScheduler does not handle (empty: supported)."""
    checks = {
        "prefix caching hashed by blocks of another size than the KV blocks": (
            scheduler.cache_config.enable_prefix_caching
            and scheduler.hash_block_size != scheduler.block_size
        ),
        "async scheduling (start vLLM with async_scheduling=False)": (
            scheduler.scheduler_config.async_scheduling
        ),
        "more than one KV cache group (hybrid or sliding-window models)": (
            len(scheduler.kv_cache_config.kv_cache_groups) != 1
        ),
        "LoRA": scheduler.lora_config is not None,
        "KV connectors": scheduler.connector is not None,
        "encoder-cache connectors": scheduler.ec_connector is not None,
        "encoder-decoder models": scheduler.is_encoder_decoder,
        "pipeline parallelism": scheduler.use_pp,
        "Mamba layers": scheduler.has_mamba_layers,
    }
    return [name for name, present in checks.items() if present]
