"""The simulated engine: executes plan steps under a `TruthModel` instead of a GPU.

What a step costs: `truth.step_time_s(step.num_batched_tokens, step.spec_steps, num_context_tokens)`
where `num_context_tokens` is the sum, over the step's requests, of the tokens already in their KV
cache when the step starts (the truth model's attention-context term).

KV memory: a request holds ceil(computed tokens / block_size) blocks out of a fixed pool. A step
first reserves blocks for every token it may write (its computed tokens plus its draft tokens); if
the pool cannot cover the whole step, nothing runs and the report carries `error` (all or nothing).
A finished request frees its blocks at once, unless its payload asks to keep them for its tool
chain's next round (`EngineRequest.retain_kv`, docs/AGENTS.md): "pinned" blocks stay held under
the chain id until the next round attaches them (`num_cached_tokens`) or the planner releases them
(`release_kv`); "evictable" blocks count as free, like vLLM's automatic prefix cache: a step that
needs more blocks than are truly free evicts the least recently finished entries first (reported
in `StepReport.kv_evicted`), and a round that comes back before its entry was evicted attaches it.
A round registered with cached tokens the engine no longer holds recomputes its whole prompt
(`StepReport.kv_misses`). Every block is always exactly one of: free, evictable, pinned, or held
by a registered request (`kv_blocks` tells the split). An engine given host memory for KV
(`host_blocks`) also honours "host": the finished round's KV is copied to host memory and its GPU
blocks freed (a simplification: the copy out is taken as overlapped with compute and finished
before the blocks are reused); the round that attaches it gets fresh GPU blocks and its copy in
takes `swap_s_per_token` per token from registration, so the first step that names the round
waits for it if it is not done (the step's time grows by the wait). Host entries beyond the host
pool are evicted least recently kept first (reported in `kv_evicted`).

Speculative decoding: a request verifying s draft tokens accepts each one with the true rate alpha,
independently, and keeps the leading accepted run:

    P(accepted = a) = alpha^a (1 - alpha) for a < s,  P(accepted = s) = alpha^s,

i.e. accepted = min(s, G - 1) with G ~ Geometric(1 - alpha) (trials to the first rejection). It
then produces accepted + 1 tokens (the verified drafts plus one token of its own), capped by what
the
request still has to generate. Draws come from a seeded generator, so a run is reproducible.

Time: the engine reads a clock it is given (`clock()`, seconds). The simulator passes its virtual
clock and the report's end time is `start + step time`; a real-time adapter passes a wall clock and
`sleep=time.sleep`, and the engine then sleeps the step time and stamps the report with the clock.
The planner learns the truth only through the reports.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from types import MappingProxyType

import msgspec
import numpy as np

from engine_adapters.engine import Engine, EngineInfo, EngineRequest
from engine_adapters.registry import EngineOptions, register
from engine_adapters.sim_lengths import TrueLengths
from formulations.perf_model import PerfModel, TruthModel, perf_model_preset
from formulations.plan import Step
from formulations.progress import TokenProgress, num_blocks_for
from wire.protocol import StepReport


class VirtualClock:
    """A settable clock for the simulator: `clock()` returns `clock.now_s`."""

    __slots__ = ("now_s",)

    def __init__(self, now_s: float = 0.0) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s


class _Sequence(TokenProgress):
    __slots__ = (
        "chain_id",
        "max_new_tokens",
        "num_blocks",
        "num_computed_tokens",
        "num_generated_tokens",
        "num_prompt_tokens",
        "num_thinking_tokens",
        "retain_kv",
        "swap_ready_s",
    )

    def __init__(self, request: EngineRequest) -> None:
        self.num_prompt_tokens = request.num_prompt_tokens
        self.max_new_tokens = request.max_new_tokens
        self.num_thinking_tokens = request.sim_thinking_tokens  # where thinking ends; 0: none
        self.num_computed_tokens = 0
        self.num_generated_tokens = 0
        self.num_blocks = 0
        self.chain_id: str | None = None
        self.retain_kv = "drop"
        self.swap_ready_s = 0.0  # its kept KV copied in from host memory by then

    def thinking_in(self, num_before: int, num_after: int) -> int:
        """How many of the output tokens num_before+1..num_after were thinking tokens, when the
        thinking ends among them (0 otherwise)."""
        end = self.num_thinking_tokens
        return end - num_before if num_before < end <= num_after else 0


class SimEngine(Engine):
    def __init__(
        self,
        truth: TruthModel | PerfModel,
        num_total_blocks: int,
        block_size: int = 16,
        max_spec_tokens: int = 0,
        true_acceptance_rate: float = 0.7,
        seed: int = 0,
        clock: Callable[[], float] | None = None,
        sleep: Callable[[float], None] | None = None,
        emit_token_ids: bool = False,
        advertised_perf_model: PerfModel | None = None,
        vocab_size: int = 50272,
        true_lengths: TrueLengths | None = None,
        host_blocks: int = 0,
        swap_s_per_token: float = 0.0,
    ) -> None:
        if num_total_blocks < 1 or block_size < 1:
            raise ValueError("the simulated engine needs at least one KV block of >= 1 token")
        if not 0.0 <= true_acceptance_rate <= 1.0:
            raise ValueError("true_acceptance_rate must be in [0, 1]")
        if host_blocks < 0 or swap_s_per_token < 0:
            raise ValueError("host_blocks and swap_s_per_token must be >= 0")
        self.host_blocks = host_blocks
        self.swap_s_per_token = swap_s_per_token
        self._host: OrderedDict[str, tuple[int, int]] = OrderedDict()  # LRU, oldest first
        self._num_host_blocks = 0
        self._num_swapping = 0  # registered rounds whose copy in may not be done yet
        self.truth = truth if isinstance(truth, TruthModel) else TruthModel(truth)
        self.num_total_blocks = num_total_blocks
        self.block_size = block_size
        self.max_spec_tokens = max_spec_tokens
        self.true_acceptance_rate = true_acceptance_rate
        self.clock = clock or VirtualClock()
        self.sleep = sleep
        self.emit_token_ids = emit_token_ids
        self.advertised_perf_model = advertised_perf_model
        self.vocab_size = vocab_size
        self.true_lengths = true_lengths  # where replayed requests really stop (sim_lengths.py)
        self._rng = np.random.default_rng(seed)
        self._seqs: dict[str, _Sequence] = {}
        self._live_view = MappingProxyType(self._seqs)
        self._num_free_blocks = num_total_blocks
        self._pending_repeat: tuple[Step, int] | None = None  # see reserve_repeat
        self._num_reserved_blocks: int | None = None
        self.num_steps = 0
        # Kept KV of tool chains between rounds: chain id -> (tokens, blocks). Evictable entries
        # in LRU order (oldest first) and counted in `_num_free_blocks`; pinned ones are not.
        self._pinned: dict[str, tuple[int, int]] = {}
        self._evictable: OrderedDict[str, tuple[int, int]] = OrderedDict()
        self._num_pinned_blocks = 0
        self._num_evictable_blocks = 0
        self._evicted: list[str] = []  # since the last report
        self._misses: list[str] = []  # since the last report
        self.pinned_block_s = 0.0  # integral of pinned blocks over the engine's clock
        self._pinned_since_s = self.clock()

    # ------------------------------------------------------------------ Engine API

    def info(self) -> EngineInfo:
        return EngineInfo(
            num_total_blocks=self.num_total_blocks,
            block_size=self.block_size,
            perf_model=self.advertised_perf_model,
            max_spec_tokens=self.max_spec_tokens,
            name="sim",
            kv_retention=True,
            kv_host_blocks=self.host_blocks,
            kv_swap_s_per_token=self.swap_s_per_token,
        )

    @property
    def num_free_blocks(self) -> int:
        return self._num_free_blocks

    def add_request(self, request: EngineRequest) -> int:
        """Register a request; returns the prompt tokens it found cached (its chain's kept KV)."""
        if request.request_id in self._seqs:
            raise ValueError(f"request {request.request_id!r} is already registered")
        seq = _Sequence(self._with_true_length(request))
        self._seqs[request.request_id] = seq
        seq.retain_kv = request.retain_kv
        seq.chain_id = request.chain_id
        if request.num_cached_tokens:
            self._attach(request, seq)
        return seq.num_computed_tokens

    def _attach(self, request: EngineRequest, seq: _Sequence) -> None:
        """Give the request its chain's kept KV, or count a miss (it recomputes)."""
        chain_id = request.chain_id
        on_host = chain_id in self._host
        entry = self._take_kept(chain_id) if chain_id is not None else None
        if entry is None or entry[0] != request.num_cached_tokens:
            self._misses.append(request.request_id)  # an entry of another length is dropped
            return
        num_tokens, num_blocks = entry
        if on_host:
            if num_blocks > self._num_free_blocks:  # no GPU room to copy it into: recompute
                self._misses.append(request.request_id)
                return
            seq.swap_ready_s = self.clock() + num_tokens * self.swap_s_per_token
            self._num_swapping += 1
        self._num_free_blocks -= num_blocks
        self._evict_to_fit()
        seq.num_computed_tokens = num_tokens
        seq.num_blocks = num_blocks

    def _take_kept(self, chain_id: str) -> tuple[int, int] | None:
        """Remove a chain's kept entry; its blocks are counted as free (the caller uses them)."""
        entry = self._pinned.pop(chain_id, None)
        if entry is not None:
            self._add_pinned(-entry[1])
            self._num_free_blocks += entry[1]
            return entry
        entry = self._evictable.pop(chain_id, None)
        if entry is not None:
            self._num_evictable_blocks -= entry[1]
            return entry
        entry = self._host.pop(chain_id, None)
        if entry is not None:  # off the GPU: the caller allocates its blocks anew
            self._num_host_blocks -= entry[1]
        return entry

    def release_kv(self, chain_id: str) -> None:
        """The planner no longer wants the chain's kept KV (a time-to-live, the chain ended, its
        next round went elsewhere). Unknown chains are ignored."""
        self._take_kept(chain_id)

    def kv_blocks(self) -> dict[str, int]:
        """Blocks by use: free (not evictable), evictable, pinned, held by requests."""
        held = sum(seq.num_blocks for seq in self._seqs.values())
        return {
            "free": self._num_free_blocks - self._num_evictable_blocks,
            "evictable": self._num_evictable_blocks,
            "pinned": self._num_pinned_blocks,
            "held": held,
        }

    @property
    def num_host_blocks(self) -> int:
        """Blocks of kept KV in host memory (not of the GPU pool `kv_blocks` splits)."""
        return self._num_host_blocks

    def kept_chains(self) -> dict[str, tuple[int, int]]:
        """Chain id -> (tokens, blocks) of every kept entry, pinned, evictable and on host."""
        return {**self._pinned, **self._evictable, **self._host}

    def pinned_block_seconds(self) -> float:
        """Pinned KV held so far, in block-seconds of the engine's clock (up to now)."""
        held_s = max(0.0, self.clock() - self._pinned_since_s)
        return self.pinned_block_s + self._num_pinned_blocks * held_s

    def _add_pinned(self, num_blocks: int) -> None:
        now_s = self.clock()
        self.pinned_block_s += self._num_pinned_blocks * max(0.0, now_s - self._pinned_since_s)
        self._pinned_since_s = now_s
        self._num_pinned_blocks += num_blocks

    def _keep(self, seq: _Sequence) -> None:
        """A finished request's blocks stay for its chain's next round (pinned or evictable)."""
        chain_id = seq.chain_id
        self._take_kept(chain_id)  # an older entry of the chain is superseded
        entry = (seq.num_computed_tokens, seq.num_blocks)
        if seq.retain_kv == "host":
            self._num_free_blocks += seq.num_blocks  # copied out: the GPU blocks are free
            if seq.num_blocks > self.host_blocks:
                self._evicted.append(chain_id)
                return
            self._host[chain_id] = entry
            self._num_host_blocks += seq.num_blocks
            while self._num_host_blocks > self.host_blocks:
                evicted, (_, num_blocks) = self._host.popitem(last=False)
                self._num_host_blocks -= num_blocks
                self._evicted.append(evicted)
        elif seq.retain_kv == "pinned":
            self._pinned[chain_id] = entry
            self._add_pinned(seq.num_blocks)
        else:
            self._evictable[chain_id] = entry
            self._num_evictable_blocks += seq.num_blocks
            self._num_free_blocks += seq.num_blocks

    def _evict_to_fit(self) -> None:
        """Evict the least recently kept evictable entries until the truly free blocks are not
        negative (a step took blocks that were counted free as evictable)."""
        while self._num_free_blocks < self._num_evictable_blocks and self._evictable:
            chain_id, (_, num_blocks) = self._evictable.popitem(last=False)
            self._num_evictable_blocks -= num_blocks
            self._evicted.append(chain_id)

    def _kv_news(self) -> dict[str, tuple[str, ...]]:
        """Evictions and misses since the last report, for the next report (then cleared)."""
        if not self._evicted and not self._misses:
            return {}
        news = {"kv_evicted": tuple(self._evicted), "kv_misses": tuple(self._misses)}
        self._evicted.clear()
        self._misses.clear()
        return news

    def _with_true_length(self, request: EngineRequest) -> EngineRequest:
        """The payload with the replayed trace's true length, when the engine has one for it
        (a moved request's payload already holds its output so far in its prompt)."""
        if self.true_lengths is None:
            return request
        true = self.true_lengths.get(request.request_id)
        if true is None:
            return request
        num_generated = max(0, request.num_prompt_tokens - true.num_prompt_tokens)
        max_new_tokens = min(request.max_new_tokens, max(1, true.num_output_tokens - num_generated))
        thinking = max(0, true.num_thinking_tokens - num_generated)
        return msgspec.structs.replace(
            request, max_new_tokens=max_new_tokens, sim_thinking_tokens=thinking
        )

    @property
    def live_requests(self) -> Mapping[str, object]:
        """The registered, unfinished requests (a read-only view keyed by id)."""
        return self._live_view

    def has_request(self, request_id: str) -> bool:
        """True while the request is registered and unfinished (finished ones are forgotten)."""
        return request_id in self._seqs

    def abort(self, request_id: str) -> None:
        seq = self._seqs.pop(request_id, None)
        if seq is not None:
            self._num_free_blocks += seq.num_blocks
            self._no_swap(seq)

    def preempt(self, request_id: str) -> None:
        seq = self._seqs.get(request_id)
        if seq is not None:
            self._num_free_blocks += seq.num_blocks
            seq.num_blocks = 0
            seq.num_computed_tokens = 0
            self._no_swap(seq)

    def _no_swap(self, seq: _Sequence) -> None:
        """The round's copy in from host memory no longer matters (its KV was dropped)."""
        if seq.swap_ready_s:
            seq.swap_ready_s = 0.0
            self._num_swapping -= 1

    def import_request(
        self, request: EngineRequest, num_computed_tokens: int, num_generated_tokens: int
    ) -> int:
        """Register a request whose KV arrives from another engine (disaggregation). Returns the
        tokens now cached here: all of them, or 0 when the blocks are not free (it recomputes)."""
        seq = _Sequence(request)
        seq.num_generated_tokens = num_generated_tokens
        num_blocks = num_blocks_for(num_computed_tokens, self.block_size)
        if num_blocks <= self._num_free_blocks - self._blocks_reserved():
            seq.num_computed_tokens = num_computed_tokens
            seq.num_blocks = num_blocks
            self._num_free_blocks -= num_blocks
            self._evict_to_fit()
        self._seqs[request.request_id] = seq
        return seq.num_computed_tokens

    def execute(self, step: Step, step_id: int) -> StepReport:
        start_s = self.clock()
        problem, num_context_tokens = self._check(step)
        if problem:
            return StepReport(
                step_id=step_id,
                start_s=start_s,
                end_s=start_s,
                num_free_blocks=self._num_free_blocks,
                error=problem,
                **self._kv_news(),
            )
        time_s = self.truth.step_time_s(
            step.num_batched_tokens, step.spec_steps, num_context_tokens
        )
        if self._num_swapping:  # a round's KV still being copied in from host memory
            time_s += self._swap_wait_s(step, start_s)
        report = self._apply(step, step_id, start_s, start_s + time_s)
        if self.sleep is not None:
            self.sleep(time_s)
            report = msgspec.structs.replace(report, end_s=self.clock())
        self.num_steps += 1
        return report

    def _swap_wait_s(self, step: Step, start_s: float) -> float:
        """How long the step waits for copies in from host memory of the rounds it names."""
        wait_s = 0.0
        for rid in step.num_tokens:
            seq = self._seqs[rid]
            if seq.swap_ready_s > start_s:
                wait_s = max(wait_s, seq.swap_ready_s - start_s)
                seq.swap_ready_s = 0.0
                self._num_swapping -= 1
        return wait_s

    # ------------------------------------------------------------------ fast-forward (simulator)

    def repeatable_steps(self, step: Step) -> int:
        """How many times `step` can run back to back with every run identical: 0 unless the truth
        model is exact (constant step time) and the step is plain decodes (one token each, no
        drafts); else the runs until the first of its requests finishes or until the free blocks
        would not cover the next run (the most runs r with sum_i max(0, ceil((c_i + r) / B) - b_i)
        <= free, found by bisection: the sum grows with r)."""
        if not self.truth.is_exact or step.num_spec_tokens or self._num_swapping:
            return 0
        seqs = self._seqs
        num_runs = 1 << 30
        members = []
        for rid, num_tokens in step.num_tokens.items():
            seq = seqs.get(rid)
            # A first token would be stamped at the cruise's end: only requests already decoding.
            if seq is None or num_tokens != 1 or not seq.is_decoding:
                return 0
            members.append(seq)
            remaining = seq.max_new_tokens - seq.num_generated_tokens
            if seq.num_thinking_tokens > seq.num_generated_tokens:  # stop where thinking ends
                remaining = min(remaining, seq.num_thinking_tokens - seq.num_generated_tokens)
            if remaining < num_runs:
                num_runs = remaining
        # Each member needs at most num_runs // block_size + 1 new blocks: often plainly enough.
        if len(members) * (num_runs // self.block_size + 1) <= self._num_free_blocks:
            return num_runs
        if self._blocks_for_runs(members, num_runs) <= self._num_free_blocks:
            return num_runs
        low, high = 0, num_runs  # low runs fit, high runs do not
        while high - low > 1:
            mid = (low + high) // 2
            if self._blocks_for_runs(members, mid) <= self._num_free_blocks:
                low = mid
            else:
                high = mid
        return low

    def _blocks_for_runs(self, members: list[_Sequence], num_runs: int) -> int:
        block_size = self.block_size
        return sum(
            max(0, seq.num_blocks_after(num_runs, block_size) - seq.num_blocks) for seq in members
        )

    def reserve_repeat(self, step: Step, num_steps: int) -> None:
        """Hold the blocks `num_steps` runs of a repeatable step will need until
        `execute_repeated` runs them, so that KV arriving meanwhile cannot take them. (The sum is
        computed only if KV does arrive: usually nothing asks.)"""
        self._pending_repeat = (step, num_steps)
        self._num_reserved_blocks = None

    def _blocks_reserved(self) -> int:
        if self._pending_repeat is None:
            return 0
        if self._num_reserved_blocks is None:
            step, num_steps = self._pending_repeat
            members = [seq for rid in step.num_tokens if (seq := self._seqs.get(rid)) is not None]
            self._num_reserved_blocks = self._blocks_for_runs(members, num_steps)
        return self._num_reserved_blocks

    def execute_repeated(
        self, step: Step, last_step_id: int, num_steps: int, start_s: float
    ) -> StepReport:
        """Run a decode step `num_steps` times from `start_s` (at most `repeatable_steps(step)`,
        checked by the caller before any other change to these requests); one summed report whose
        `end_s` is the end of the last run, accumulated run by run exactly as single steps are."""
        step_time_s = self.truth.step_time_s(step.num_batched_tokens, 0, 0)
        end_s = start_s
        for _ in range(num_steps):
            end_s += step_time_s
        self._pending_repeat = None
        seqs = self._seqs
        finished: list[str] = []
        thinking_ended: dict[str, int] = {}
        for rid in step.num_tokens:
            seq = seqs[rid]
            seq.num_computed_tokens += num_steps
            seq.num_generated_tokens += num_steps
            if seq.num_thinking_tokens:
                num_thinking = seq.thinking_in(
                    seq.num_generated_tokens - num_steps, seq.num_generated_tokens
                )
                if num_thinking:
                    thinking_ended[rid] = num_thinking
            if seq.num_generated_tokens >= seq.max_new_tokens:
                self._finish(rid, seq, finished)
            else:
                blocks = seq.num_blocks_after(0, self.block_size)
                self._num_free_blocks -= blocks - seq.num_blocks
                seq.num_blocks = blocks
        if self._num_free_blocks < self._num_evictable_blocks:
            self._evict_to_fit()
        self.num_steps += num_steps
        counts = dict.fromkeys(step.num_tokens, num_steps)
        return StepReport(
            step_id=last_step_id,
            start_s=start_s,
            end_s=end_s,
            num_computed_tokens=counts,
            num_new_tokens=dict(counts),
            num_free_blocks=self._num_free_blocks,
            finished=tuple(finished),
            thinking_ended=thinking_ended,
            **self._kv_news(),
        )

    # ------------------------------------------------------------------ internals

    def _check(self, step: Step) -> tuple[str, int]:
        """Why the step cannot run as planned ('' when it can), reserving nothing; and the step's
        context tokens (cached tokens of its requests before it runs)."""
        seqs = self._seqs
        block_size = self.block_size
        spec = step.num_spec_tokens
        num_needed_blocks = 0
        num_context_tokens = 0
        for rid, num_tokens in step.num_tokens.items():
            seq = seqs.get(rid)
            if seq is None:
                return f"unknown request {rid!r}", 0
            computed = seq.num_computed_tokens
            pending = seq.num_prompt_tokens + seq.num_generated_tokens - computed  # inlined: hot
            if not 1 <= num_tokens <= pending:
                return f"request {rid!r}: {num_tokens} tokens planned, {pending} pending", 0
            num_spec = spec.get(rid, 0) if spec else 0
            if num_spec and (num_spec > self.max_spec_tokens or not seq.is_decoding):
                return f"request {rid!r}: {num_spec} speculative tokens not allowed", 0
            blocks = -(-(computed + num_tokens + num_spec) // block_size)  # num_blocks_for
            if blocks > seq.num_blocks:
                num_needed_blocks += blocks - seq.num_blocks
            num_context_tokens += computed
        if num_needed_blocks > self._num_free_blocks:
            problem = (
                f"out of KV blocks: step needs {num_needed_blocks}, {self._num_free_blocks} free"
            )
            return problem, 0
        return "", num_context_tokens

    def _apply(self, step: Step, step_id: int, start_s: float, end_s: float) -> StepReport:
        """Run a checked step: each request computes its tokens; one that completes its pending
        tokens samples a token (and, verifying drafts, the accepted ones too)."""
        seqs = self._seqs
        block_size = self.block_size
        spec = step.num_spec_tokens
        emit_ids = self.emit_token_ids
        computed = dict(step.num_tokens)
        new_tokens: dict[str, int] = {}
        accepted: dict[str, int] = {}
        proposed: dict[str, int] = {}
        token_ids: dict[str, list[int]] = {}
        finished: list[str] = []
        thinking_ended: dict[str, int] = {}
        for rid, num_tokens in step.num_tokens.items():
            seq = seqs[rid]
            seq.num_computed_tokens += num_tokens
            if seq.num_computed_tokens == seq.num_prompt_tokens + seq.num_generated_tokens:
                num_new = 1  # the next token is sampled
                num_spec = spec.get(rid, 0) if spec else 0
                if num_spec:
                    num_accepted = self._sample_accepted(
                        num_spec, seq.max_new_tokens - seq.num_generated_tokens - 1
                    )
                    proposed[rid] = num_spec
                    accepted[rid] = num_accepted
                    seq.num_computed_tokens += num_accepted
                    computed[rid] = num_tokens + num_accepted
                    num_new += num_accepted
                if emit_ids:
                    base = seq.num_tokens
                    token_ids[rid] = [(base + i) % self.vocab_size for i in range(num_new)]
                seq.num_generated_tokens += num_new
                new_tokens[rid] = num_new
                if seq.num_thinking_tokens:
                    generated = seq.num_generated_tokens
                    num_thinking = seq.thinking_in(generated - num_new, generated)
                    if num_thinking:
                        thinking_ended[rid] = num_thinking
                if seq.num_generated_tokens >= seq.max_new_tokens:
                    self._finish(rid, seq, finished)
                    continue
            blocks = -(-seq.num_computed_tokens // block_size)  # num_blocks_for, inlined: hot
            self._num_free_blocks -= blocks - seq.num_blocks
            seq.num_blocks = blocks
        if self._num_free_blocks < self._num_evictable_blocks:
            self._evict_to_fit()
        return StepReport(
            step_id=step_id,
            start_s=start_s,
            end_s=end_s,
            num_computed_tokens=computed,
            num_new_tokens=new_tokens,
            num_accepted_spec_tokens=accepted,
            num_proposed_spec_tokens=proposed,
            new_token_ids=token_ids,
            num_free_blocks=self._num_free_blocks,
            finished=tuple(finished),
            thinking_ended=thinking_ended,
            **self._kv_news(),
        )

    def _finish(self, rid: str, seq: _Sequence, finished: list[str]) -> None:
        """The request produced its last token: free its KV (or keep it for its chain's next
        round) and forget it."""
        if seq.retain_kv != "drop" and seq.chain_id is not None and seq.num_blocks:
            self._keep(seq)
        else:
            self._num_free_blocks += seq.num_blocks
        del self._seqs[rid]
        finished.append(rid)

    def _sample_accepted(self, num_spec: int, max_accepted: int) -> int:
        """Leading accepted draft tokens out of `num_spec` (module docstring), capped."""
        alpha = self.true_acceptance_rate
        if alpha >= 1.0:
            num_accepted = num_spec
        elif alpha <= 0.0:
            num_accepted = 0
        else:
            num_accepted = min(num_spec, int(self._rng.geometric(1.0 - alpha)) - 1)
        return max(0, min(num_accepted, max_accepted))


@register("sim")
def build(options: EngineOptions) -> SimEngine:
    """A real-time sim engine: it sleeps each step's truth time (times `time_scale`) on the wall
    clock and makes placeholder token ids. It tells the planner nothing of its truth except through
    its step reports (it advertises no performance model unless `advertise_perf_model`)."""
    if options.time_scale <= 0:
        raise ValueError("--time-scale must be positive")
    base = perf_model_preset(options.perf_model)
    scale = options.time_scale
    truth = TruthModel(
        base, k_context_s=options.k_context_s, noise_frac=options.noise_frac, seed=options.seed
    )
    return SimEngine(
        truth,
        num_total_blocks=options.num_blocks,
        block_size=options.block_size,
        max_spec_tokens=options.max_spec_tokens,
        true_acceptance_rate=options.acceptance_rate,
        seed=options.seed,
        clock=time.monotonic,
        sleep=lambda time_s: time.sleep(time_s * scale),
        emit_token_ids=True,
        advertised_perf_model=base if options.advertise_perf_model else None,
        true_lengths=TrueLengths(options.output_lengths) if options.output_lengths else None,
    )
