"""TorchEngine: executes plan steps on a Llama model with a paged KV cache.

One `execute` = one ragged forward pass of the target model over every request the step names
(prefill chunks of any size, decodes, speculative verification), preceded, when the step
speculates, by up to `spec_steps` ragged passes of the draft model. A step either runs exactly as
planned or not at all: every check (names, token counts, speculation, KV blocks) happens before
anything changes, and a failure inside the forward pass rolls the requests back.

Tool chains (docs/AGENTS.md): a finished round whose request asks to keep its KV (`retain_kv`
"pinned" or "evictable", with a `chain_id`) leaves its paged blocks kept under the chain id
(kept_kv.py); the chain's next round, registered with `num_cached_tokens`, starts with them
attached when the kept tokens are exactly its prompt's first `num_cached_tokens` tokens, and
otherwise recomputes from 0 and is reported in the next StepReport's `kv_misses`. Evictable blocks
count as free and are evicted (least recently kept first, reported in `kv_evicted`) when a step
needs them. Only the target model's KV is kept: a speculating round's draft cache catches up from
0, as after a preemption.
"""

from __future__ import annotations

import json
import os
import random
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine_adapters.engine import Engine, EngineInfo, EngineRequest
from engine_adapters.registry import EngineOptions, register
from engine_adapters.torch_engine.checkpoint import load_model, parse_dtype
from engine_adapters.torch_engine.kept_kv import KeptEntry, KeptKV
from engine_adapters.torch_engine.kv_cache import (
    BLOCK_SIZE,
    num_blocks_for_budget,
)
from engine_adapters.torch_engine.model import LlamaForCausalLM
from engine_adapters.torch_engine.model_runner import Chunk, ModelRunner
from engine_adapters.torch_engine.sampling import SamplingParams, probabilities, sample
from engine_adapters.torch_engine.sequence import Sequence
from engine_adapters.torch_engine.speculative import DraftProposer, accept_greedy, accept_sampled
from formulations.perf_model import PerfModel
from formulations.plan import Step
from wire.protocol import StepReport

PERF_MODEL_FILE = "perf_model.json"  # written by `slos-serve profile`, read by from_pretrained
DEFAULT_MAX_SPEC_TOKENS = 8
MAX_REMEMBERED_FINISHED = 10_000


class StepRefused(Exception):
    """The step cannot run as planned; nothing was executed."""


@dataclass(slots=True)
class _Work:
    """What the step does to one request."""

    seq: Sequence
    num_tokens: int
    num_spec_tokens: int
    draft_tokens: list[int] = field(default_factory=list)
    draft_probs: torch.Tensor | None = None

    @property
    def samples(self) -> bool:
        """The step reaches the request's last known token, so it samples the next one."""
        return self.seq.num_computed_tokens + self.num_tokens == self.seq.num_tokens


@dataclass(slots=True)
class _Outcome:
    """The per-request results of one step, gathered while it runs (see StepReport)."""

    num_computed_tokens: dict[str, int] = field(default_factory=dict)
    num_new_tokens: dict[str, int] = field(default_factory=dict)
    num_accepted_spec_tokens: dict[str, int] = field(default_factory=dict)
    num_proposed_spec_tokens: dict[str, int] = field(default_factory=dict)
    new_token_ids: dict[str, list[int]] = field(default_factory=dict)
    finished: list[str] = field(default_factory=list)

    def report(
        self,
        step_id: int,
        start_s: float,
        end_s: float,
        num_free_blocks: int,
        kv_news: dict[str, tuple[str, ...]],
    ) -> StepReport:
        return StepReport(
            step_id=step_id,
            start_s=start_s,
            end_s=end_s,
            num_computed_tokens=self.num_computed_tokens,
            num_new_tokens=self.num_new_tokens,
            num_accepted_spec_tokens=self.num_accepted_spec_tokens,
            num_proposed_spec_tokens=self.num_proposed_spec_tokens,
            new_token_ids=self.new_token_ids,
            num_free_blocks=num_free_blocks,
            finished=tuple(self.finished),
            **kv_news,
        )


class TorchEngine(Engine):
    def __init__(
        self,
        model: LlamaForCausalLM,
        num_blocks: int,
        draft_model: LlamaForCausalLM | None = None,
        block_size: int = BLOCK_SIZE,
        max_spec_tokens: int = DEFAULT_MAX_SPEC_TOKENS,
        perf_model: PerfModel | None = None,
        name: str = "torch",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if draft_model is not None and draft_model.config.vocab_size != model.config.vocab_size:
            raise ValueError("the draft model must share the target's vocabulary")
        self.model = model
        self.config = model.config
        self.target = ModelRunner(model, num_blocks, block_size)
        self.draft = (
            DraftProposer(ModelRunner(draft_model, num_blocks, block_size)) if draft_model else None
        )
        self.max_spec_tokens = max_spec_tokens if draft_model is not None else 0
        self.perf_model = perf_model
        self.name = name
        self.clock = clock
        self.device = self.target.device
        self._seqs: dict[str, Sequence] = {}
        # Recently finished ids (insertion-ordered, bounded), to word refusals of late steps.
        self._finished_ids: dict[str, None] = {}
        self._kept = KeptKV(self.target.blocks)  # tool chains' KV between rounds
        self._misses: list[str] = []  # registered with cached tokens not held, since the report

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        draft_dir: str | Path | None = None,
        device: str = "cpu",
        kv_memory_gb: float = 0.25,
        dtype: str | None = None,
        num_blocks: int | None = None,
        max_spec_tokens: int = DEFAULT_MAX_SPEC_TOKENS,
        perf_model: PerfModel | None = None,
    ) -> TorchEngine:
        """Load a local HF-layout checkpoint (and optionally a draft sharing its vocabulary).

        The KV cache gets `kv_memory_gb` (target and draft caches together, equal block counts)
        unless `num_blocks` is given. The performance model defaults to `model_dir/perf_model.json`
        when `slos-serve profile` wrote one, else None (the planner uses its configured one).
        """
        torch_dtype = parse_dtype(dtype) if dtype else None
        model = load_model(model_dir, device, torch_dtype)
        draft = load_model(draft_dir, device, torch_dtype) if draft_dir else None
        if num_blocks is None:
            bytes_per_token = sum(
                m.config.kv_bytes_per_token(m.lm_head.weight.element_size())
                for m in (model, draft)
                if m is not None
            )
            num_blocks = num_blocks_for_budget(
                int(kv_memory_gb * 2**30), bytes_per_token, BLOCK_SIZE
            )
            if num_blocks < 1:
                raise ValueError(f"kv_memory_gb={kv_memory_gb} holds no KV block")
        if perf_model is None and (Path(model_dir) / PERF_MODEL_FILE).is_file():
            perf_model = PerfModel.from_dict(
                json.loads((Path(model_dir) / PERF_MODEL_FILE).read_text())
            )
        return cls(
            model,
            num_blocks,
            draft,
            max_spec_tokens=max_spec_tokens,
            perf_model=perf_model,
            name=f"torch:{Path(model_dir).name}",
        )

    # ------------------------------------------------------------------ Engine interface

    def info(self) -> EngineInfo:
        return EngineInfo(
            num_total_blocks=self.target.blocks.num_blocks,
            block_size=self.target.block_size,
            perf_model=self.perf_model,
            max_spec_tokens=self.max_spec_tokens,
            max_model_len=self.config.max_position_embeddings,
            name=self.name,
            kv_retention=True,
        )

    @property
    def num_free_blocks(self) -> int:
        """Truly free blocks plus kept evictable ones (a step may evict them)."""
        return self.target.blocks.num_free_blocks + self._kept.num_evictable_blocks

    def add_request(self, request: EngineRequest) -> int:
        """Register a request; returns the prompt tokens it starts with cached (its chain's kept
        KV, attached), 0 when it has none or the kept entry is gone or does not match."""
        rid = request.request_id
        if rid in self._seqs:
            raise ValueError(f"request {rid!r} is already registered")
        ids = request.prompt_token_ids
        bad = [t for t in ids or () if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"request {rid!r}: token id {bad[0]} outside the vocabulary")
        if request.num_prompt_tokens >= self.config.max_position_embeddings:
            raise ValueError(
                f"request {rid!r}: prompt of {request.num_prompt_tokens} tokens exceeds "
                "max_model_len"
            )
        # Checked above, so a failure below cannot lose the chain's kept entry.
        entry = None
        if request.num_cached_tokens and request.chain_id is not None:
            entry = self._kept.take(request.chain_id)
        prompt = list(ids) if ids else self._placeholder_prompt(request, entry)
        seed = request.seed if request.seed is not None else int.from_bytes(os.urandom(7), "little")
        seq = self._seqs[rid] = Sequence(
            request_id=rid,
            token_ids=prompt,
            num_prompt_tokens=len(prompt),
            max_new_tokens=request.max_new_tokens,
            params=SamplingParams(request.temperature, request.top_p),
            generator=torch.Generator(self.device).manual_seed(seed),
            ignore_eos=request.ignore_eos,
            chain_id=request.chain_id,
            retain_kv=request.retain_kv,
        )
        self._finished_ids.pop(rid, None)
        if request.num_cached_tokens:
            self._attach(seq, request.num_cached_tokens, entry)
        return seq.num_computed_tokens

    def _attach(self, seq: Sequence, num_cached_tokens: int, entry: KeptEntry | None) -> None:
        """Start the request with its chain's kept blocks when they hold exactly its first
        `num_cached_tokens` prompt tokens (the HTTP path may tokenize a context differently from
        how the previous round produced it); otherwise free them and count a miss."""
        kept = entry.token_ids if entry is not None else None
        if (
            kept is None
            or len(kept) != num_cached_tokens
            or tuple(seq.token_ids[: len(kept)]) != kept
        ):
            if entry is not None:
                self.target.blocks.release(list(entry.block_table))
            self._misses.append(seq.request_id)
            return
        self.target.blocks.attach(seq.request_id, list(entry.block_table))
        seq.num_computed_tokens = num_cached_tokens

    def release_kv(self, chain_id: str) -> None:
        """Free a chain's kept KV (unknown chains are ignored)."""
        self._kept.release(chain_id)

    def kv_blocks(self) -> dict[str, int]:
        """Target KV blocks by use: free (not evictable), evictable, pinned, held by requests.
        Counted from separate books (the free list, kept entries, request tables), so a lost or
        double-owned block shows as a sum other than the total."""
        return {
            "free": self.target.blocks.num_free_blocks,
            "evictable": self._kept.num_evictable_blocks,
            "pinned": self._kept.num_pinned_blocks,
            "held": self.target.blocks.num_used_blocks,
        }

    def kept_chains(self) -> dict[str, tuple[int, int]]:
        """Chain id -> (tokens, blocks) of every kept entry, pinned and evictable."""
        return self._kept.chains()

    def abort(self, request_id: str) -> None:
        if self._seqs.pop(request_id, None) is not None:
            self._free(request_id)

    def preempt(self, request_id: str) -> None:
        seq = self._seqs.get(request_id)
        if seq is None:
            return
        self._free(request_id)
        seq.num_computed_tokens = 0
        seq.num_draft_computed_tokens = 0

    def execute(self, step: Step, step_id: int) -> StepReport:
        start_s = self.clock()
        if step.is_empty:
            return _Outcome().report(
                step_id, start_s, start_s, self.num_free_blocks, self._kv_news()
            )
        try:
            works = self._check(step)
            num_blocks_needed = self._check_blocks(works)
            self._kept.make_room(num_blocks_needed)  # evicts only once the step is sure to run
            report = self._run(works, step_id, start_s)
        except StepRefused as exc:
            return self._refusal(step_id, start_s, str(exc))
        return report

    def token_ids(self, request_id: str) -> list[int]:
        """Prompt plus generated tokens of a registered (unfinished) request."""
        return list(self._seqs[request_id].token_ids)

    # ------------------------------------------------------------------ checks

    def _check(self, step: Step) -> list[_Work]:
        unknown_spec = set(step.num_spec_tokens) - set(step.num_tokens)
        if unknown_spec:
            raise StepRefused(
                f"speculation for requests the step computes nothing for: {sorted(unknown_spec)}"
            )
        return [
            self._check_one(rid, n, step.num_spec_tokens.get(rid, 0))
            for rid, n in step.num_tokens.items()
        ]

    def _check_one(self, rid: str, num_tokens: int, num_spec: int) -> _Work:
        seq = self._seqs.get(rid)
        if seq is None:
            state = "finished" if rid in self._finished_ids else "unknown"
            raise StepRefused(f"step names {state} request {rid!r}")
        if num_tokens < 1:
            raise StepRefused(
                f"request {rid!r}: a step computes at least 1 token, not {num_tokens}"
            )
        if num_tokens > seq.num_pending_tokens:
            raise StepRefused(
                f"request {rid!r}: step asks for {num_tokens} tokens but only "
                f"{seq.num_pending_tokens} remain to compute"
            )
        work = _Work(seq, num_tokens, num_spec)
        if num_spec:
            self._check_spec(work)
        if seq.num_computed_tokens + num_tokens + num_spec > self.config.max_position_embeddings:
            raise StepRefused(f"request {rid!r}: step would exceed max_model_len")
        return work

    def _check_spec(self, work: _Work) -> None:
        rid, s = work.seq.request_id, work.num_spec_tokens
        if self.draft is None:
            raise StepRefused(
                f"request {rid!r}: speculation asked of an engine without a draft model"
            )
        if not 0 <= s <= self.max_spec_tokens:
            raise StepRefused(
                f"request {rid!r}: {s} speculative tokens (0..{self.max_spec_tokens})"
            )
        if not work.samples:
            raise StepRefused(
                f"request {rid!r}: speculation needs a step that finishes its pending tokens"
            )

    def _check_blocks(self, works: list[_Work]) -> int:
        """Refuse the step unless its blocks can be had (evicting kept evictable KV if need be);
        returns the target blocks it allocates."""
        needed = self.target.num_blocks_needed([self._chunk_shape(w) for w in works])
        free = self.num_free_blocks
        if needed > free:
            raise StepRefused(f"out of KV blocks: step needs {needed} more, {free} free")
        spec = [(w.seq, w.num_spec_tokens) for w in works if w.num_spec_tokens]
        if self.draft is not None and spec:
            draft_needed = self.draft.num_blocks_needed(spec)
            draft_free = self.draft.runner.blocks.num_free_blocks
            if draft_needed > draft_free:
                raise StepRefused(
                    f"out of draft KV blocks: step needs {draft_needed} more, {draft_free} free"
                )
        return needed

    @staticmethod
    def _chunk_shape(work: _Work) -> Chunk:
        """The target chunk's extent (draft tokens stood in by placeholders)."""
        seq = work.seq
        new = seq.token_ids[seq.num_computed_tokens : seq.num_computed_tokens + work.num_tokens]
        return Chunk(seq.request_id, new + [0] * work.num_spec_tokens, seq.num_computed_tokens)

    # ------------------------------------------------------------------ execution

    def _run(self, works: list[_Work], step_id: int, start_s: float) -> StepReport:
        saved = [
            (w.seq, w.seq.num_tokens, w.seq.num_computed_tokens, w.seq.num_draft_computed_tokens)
            for w in works
        ]
        outcome = _Outcome()
        try:
            self._propose(works)
            logits = self.target.run([self._chunk(w) for w in works])
            argmax = _split(torch.cat(logits).argmax(-1).tolist(), [len(rows) for rows in logits])
            for work, rows, best in zip(works, logits, argmax):
                self._advance(work, rows, best, outcome)
        except Exception as exc:  # e.g. device out of memory: report it, keep serving
            self._roll_back(saved)
            raise StepRefused(
                f"step failed and was rolled back: {type(exc).__name__}: {exc}"
            ) from exc
        for request_id in outcome.finished:
            self._release(request_id)
        self._sync()
        return outcome.report(step_id, start_s, self.clock(), self.num_free_blocks, self._kv_news())

    def _propose(self, works: list[_Work]) -> None:
        spec = [w for w in works if w.num_spec_tokens]
        if not spec:
            return
        proposals = self.draft.propose([(w.seq, w.num_spec_tokens) for w in spec])
        for work in spec:
            work.draft_tokens, work.draft_probs = proposals[work.seq.request_id]

    def _chunk(self, work: _Work) -> Chunk:
        seq = work.seq
        new = seq.token_ids[seq.num_computed_tokens : seq.num_computed_tokens + work.num_tokens]
        num_logits = work.num_spec_tokens + 1 if work.samples else 0
        return Chunk(seq.request_id, new + work.draft_tokens, seq.num_computed_tokens, num_logits)

    def _advance(
        self, work: _Work, logits: torch.Tensor, argmax: list[int], outcome: _Outcome
    ) -> None:
        """Apply the step's outcome to one request. logits: [num_spec + 1, V] when it samples,
        argmax: their argmax tokens (computed for the whole batch at once)."""
        seq, rid = work.seq, work.seq.request_id
        num_known = seq.num_tokens
        if not work.samples:
            seq.num_computed_tokens += work.num_tokens
            outcome.num_computed_tokens[rid] = work.num_tokens
            return
        if seq.params.is_greedy:
            new, accepted = accept_greedy(work.draft_tokens, argmax)
        elif work.num_spec_tokens:
            target_probs = probabilities(logits, seq.params)
            new, accepted = accept_sampled(
                work.draft_tokens, work.draft_probs, target_probs, seq.generator
            )
        else:
            new, accepted = sample(logits, seq.params, seq.generator).tolist(), 0
        new = self._cut_at_stop(seq, new)
        accepted = min(accepted, len(new) - 1)  # drafts kept past a stop count as not accepted
        if work.num_spec_tokens:
            self.draft.rollback(seq, num_known + accepted)
            outcome.num_accepted_spec_tokens[rid] = accepted
            outcome.num_proposed_spec_tokens[rid] = work.num_spec_tokens
        # The target cache now validly holds the known tokens and the accepted draft tokens.
        seq.num_computed_tokens = num_known + accepted
        self.target.blocks.truncate(rid, seq.num_computed_tokens)
        seq.token_ids.extend(new)
        outcome.num_computed_tokens[rid] = work.num_tokens + accepted
        outcome.num_new_tokens[rid] = len(new)
        outcome.new_token_ids[rid] = new
        if seq.is_finished:
            outcome.finished.append(rid)

    def _cut_at_stop(self, seq: Sequence, new: list[int]) -> list[int]:
        """Drop tokens past the output limit or past an EOS (when EOS stops the request)."""
        new = new[: seq.num_remaining_output_tokens]
        if not seq.ignore_eos and self.config.eos_token_id in new:
            new = new[: new.index(self.config.eos_token_id) + 1]
            seq.is_finished = True
        if seq.num_generated_tokens + len(new) >= seq.max_new_tokens:
            seq.is_finished = True
        return new

    def _release(self, request_id: str) -> None:
        """Forget a finished request and free its blocks, or keep them for its chain's next
        round (after the whole step succeeded)."""
        seq = self._seqs.pop(request_id)
        if seq.retain_kv != "drop" and seq.chain_id is not None and seq.num_computed_tokens:
            if self.draft is not None:
                self.draft.free(request_id)
            # The cache holds every known token but the last (sampled, never fed back).
            kept = seq.token_ids[: seq.num_computed_tokens]
            self._kept.keep(seq.chain_id, request_id, kept, pinned=seq.retain_kv == "pinned")
        else:
            self._free(request_id)
        self._finished_ids[request_id] = None
        if len(self._finished_ids) > MAX_REMEMBERED_FINISHED:
            del self._finished_ids[next(iter(self._finished_ids))]

    def _free(self, request_id: str) -> None:
        self.target.blocks.free(request_id)
        if self.draft is not None:
            self.draft.free(request_id)

    def _roll_back(self, saved: list[tuple[Sequence, int, int, int]]) -> None:
        for seq, num_tokens, num_computed, num_draft_computed in saved:
            del seq.token_ids[num_tokens:]
            seq.is_finished = False
            seq.num_computed_tokens = num_computed
            self.target.blocks.truncate(seq.request_id, num_computed)
            if self.draft is not None:
                self.draft.rollback(seq, num_draft_computed)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ------------------------------------------------------------------ reports

    def _refusal(self, step_id: int, start_s: float, error: str) -> StepReport:
        return StepReport(
            step_id=step_id,
            start_s=start_s,
            end_s=self.clock(),
            num_free_blocks=self.num_free_blocks,
            error=error,
            **self._kv_news(),
        )

    def _kv_news(self) -> dict[str, tuple[str, ...]]:
        """Evictions and misses since the last report, for this report (then forgotten)."""
        evicted, misses = self._kept.pop_evicted(), tuple(self._misses)
        self._misses.clear()
        return {"kv_evicted": evicted, "kv_misses": misses}

    def _placeholder_prompt(self, request: EngineRequest, kept: KeptEntry | None) -> list[int]:
        """Deterministic pseudo-random prompt tokens (avoiding BOS and EOS) for requests that
        come with a token count only. A later round of a chain that says its first
        `num_cached_tokens` are its chain's kept context begins with the kept tokens, when the
        engine holds that many (a count-only round has no ids of its own to compare)."""
        rng = random.Random(zlib.crc32(request.request_id.encode()))
        low = max(self.config.bos_token_id, self.config.eos_token_id) + 1
        prefix = []
        if kept is not None and len(kept.token_ids) == request.num_cached_tokens:
            prefix = list(kept.token_ids)
        return prefix + [
            rng.randrange(low, self.config.vocab_size)
            for _ in range(request.num_prompt_tokens - len(prefix))
        ]


def _split(items: list[int], sizes: list[int]) -> list[list[int]]:
    out, begin = [], 0
    for size in sizes:
        out.append(items[begin : begin + size])
        begin += size
    return out


@register("torch")
def build(options: EngineOptions) -> TorchEngine:
    if not options.model_dir:
        raise ValueError("--engine torch needs --model-dir (make one with `slos-serve make-model`)")
    if options.num_threads is not None:
        if options.num_threads < 1:
            raise ValueError(f"--num-threads must be at least 1, got {options.num_threads}")
        # One engine per core: torch's default (every core) oversubscribes a host that runs
        # the planner or other engines beside it, and steps then take many times longer.
        torch.set_num_threads(options.num_threads)
    return TorchEngine.from_pretrained(
        options.model_dir,
        draft_dir=options.draft_dir,
        device=options.device,
        kv_memory_gb=options.kv_memory_gb,
    )
