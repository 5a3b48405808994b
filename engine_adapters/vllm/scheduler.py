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
cache group (plain decoder-only text models), prefix caching off, synchronous scheduling, no
LoRA, no KV or encoder-cache connectors, no pipeline parallelism. Speculative decoding works with
the proposer vLLM is configured with (a draft model, or n-gram on CPU); the plan picks how many of
the proposed draft tokens each request verifies.

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

from formulations.plan import Step


@dataclass
class StepOutcome:
    """What one executed plan step did, in vLLM request ids."""

    num_scheduled_tokens: dict[str, int]  # what vLLM computed: plan tokens + verified drafts
    num_spec_tokens: dict[str, int]  # draft tokens verified per request
    new_token_ids: dict[str, list[int]] = field(default_factory=dict)
    finished: dict[str, str] = field(default_factory=dict)  # request id -> vLLM finish reason


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
        if num_blocks > self.num_free_blocks:
            return f"out of KV blocks: step needs {num_blocks}, {self.num_free_blocks} free"
        return ""

    @staticmethod
    def _num_computed_after_admission(request: Request) -> int:
        # Waiting and preempted requests hold no KV (prefix caching is off): they start from 0.
        return request.num_computed_tokens if request.status == RequestStatus.RUNNING else 0

    def _num_new_blocks(self, request: Request, num_scheduled_tokens: int) -> int:
        """Blocks allocate_slots will take: ceil(slots needed / block_size) - blocks held."""
        num_slots = min(
            self._num_computed_after_admission(request)
            + num_scheduled_tokens
            + self.num_lookahead_tokens,
            self.max_model_len,
        )
        num_held = len(self.kv_cache_manager.get_block_ids(request.request_id)[0])
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
            dict(scheduler_output.num_scheduled_tokens), scheduled.num_spec_tokens
        )
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
        """Move a waiting or preempted request into the running batch (its first step)."""
        was_preempted = request.status == RequestStatus.PREEMPTED
        self.waiting.remove_request(request)
        request.num_computed_tokens = 0
        self._allocate(request, num_tokens)
        request.status = RequestStatus.RUNNING
        self.running.append(request)
        (scheduled.resumed if was_preempted else scheduled.new).append(request)
        if num_tokens < request.num_tokens:
            self._inflight_prefills.add(request)
        if self.log_stats:
            request.record_event(EngineCoreEventType.SCHEDULED, time.monotonic())
        return self.kv_cache_manager.get_blocks(request.request_id)

    def _allocate(self, request: Request, num_new_tokens: int):
        new_blocks = self.kv_cache_manager.allocate_slots(
            request, num_new_tokens, num_lookahead_tokens=self.num_lookahead_tokens
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
        if block_copies:  # copy-on-write needs prefix caching, which is refused at start-up
            raise RuntimeError("unexpected KV block copies with prefix caching off")
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


def unsupported_features(scheduler: Scheduler) -> list[str]:
    """Features of a vLLM configuration that PlanScheduler does not handle (empty: supported)."""
    checks = {
        "prefix caching (start vLLM with enable_prefix_caching=False)": (
            scheduler.cache_config.enable_prefix_caching
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
