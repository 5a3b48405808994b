"""`VLLMEngine`: vLLM's engine core behind our `Engine` interface, scheduled by the planner.

The adapter loop calls `add_request` / `execute(step)` / `abort` / `preempt`; each `execute` hands
the step to `PlanScheduler.submit` and steps vLLM's engine core once, so vLLM computes exactly the
tokens the plan names. vLLM runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`) so that the
scheduler object is reachable directly; no plan crosses a process boundary.

vLLM appends a random suffix to request ids; this class maps our ids to vLLM's and back.
vLLM is imported only when an engine is built, so this module imports without vLLM installed.

Tool chains keep their KV through vLLM's prefix cache (on by default; docs/AGENTS.md "The vLLM
engine keeps KV"): a round with `retain_kv` leaves its blocks cached ("evictable": in vLLM's LRU;
"pinned": also held by a reference until the next round or `release_kv`), and the chain's next
round, registered with `num_cached_tokens`, starts with the cached whole blocks of its prompt found
at its first step, at most that many tokens. Fewer found are reported in that step's
`kv_found` (none at all: `kv_misses`); chains whose evictable prefix left the cache in `kv_evicted`.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from engine_adapters.engine import Engine, EngineInfo, EngineRequest
from engine_adapters.registry import EngineOptions, register
from engine_adapters.vllm.version import check_supported_version
from formulations.plan import Step
from wire.protocol import StepReport

if TYPE_CHECKING:
    from engine_adapters.vllm.scheduler import StepOutcome

log = logging.getLogger("slos_serve.vllm")

# vLLM finish reasons of a request that ran to its end (others: abort, error, repetition).
NORMAL_FINISH_REASONS = ("stop", "length")

SCHEDULER_CLS = "engine_adapters.vllm.scheduler.PlanScheduler"

# Engine arguments the planner-driven scheduler needs; a caller may not override them.
REQUIRED_ENGINE_ARGS: dict[str, Any] = {
    "scheduler_cls": SCHEDULER_CLS,
    "async_scheduling": False,
}
# Defaults a caller may override. Prefix caching keeps tool chains' KV between rounds; without it
# the engine keeps nothing (info().kv_retention is False).
DEFAULT_ENGINE_ARGS: dict[str, Any] = {"enforce_eager": True, "enable_prefix_caching": True}
# vLLM engine args for `slos-serve engine --engine vllm`, as one JSON object (the command passes
# only the model directory).
ENGINE_ARGS_ENV = "SLOS_SERVE_VLLM_ARGS"


def parse_engine_args(items: list[str]) -> dict[str, Any]:
    """['max_model_len=512', 'speculative_config={"method": "ngram", ...}'] -> dict; each value is
    read as JSON when it parses, else kept as a string."""
    engine_args = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name:
            raise ValueError(f"vllm engine argument {item!r} is not NAME=VALUE")
        try:
            engine_args[name.replace("-", "_")] = json.loads(text)
        except json.JSONDecodeError:
            engine_args[name.replace("-", "_")] = text
    return engine_args


def engine_args_from_env() -> dict[str, Any]:
    text = os.environ.get(ENGINE_ARGS_ENV, "").strip()
    if not text:
        return {}
    try:
        engine_args = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{ENGINE_ARGS_ENV} is not JSON: {exc}") from None
    if not isinstance(engine_args, dict):
        # A user error, so ValueError (the CLI prints those as one line), not TypeError.
        raise ValueError(f"{ENGINE_ARGS_ENV} must be a JSON object of vLLM engine arguments")
    return engine_args


def engine_args_for(engine_args: Mapping[str, Any]) -> dict[str, Any]:
    """Merge caller args with the scheduler's required ones; conflicting values are an error."""
    for name, required in REQUIRED_ENGINE_ARGS.items():
        if name in engine_args and engine_args[name] != required:
            raise ValueError(
                f"vllm engine: {name}={engine_args[name]!r} is not supported ({required!r} needed)"
            )
    return {**DEFAULT_ENGINE_ARGS, **engine_args, **REQUIRED_ENGINE_ARGS}


class VLLMEngine(Engine):
    """One vLLM engine core in this process. `engine_args` are vLLM `EngineArgs` fields."""

    def __init__(
        self, model_dir: str, engine_args: Mapping[str, Any] | None = None, name: str = "vllm"
    ):
        check_supported_version()
        if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0") != "0":
            raise ValueError(
                "vllm engine: VLLM_ENABLE_V1_MULTIPROCESSING must be 0 (in-process core)"
            )
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM  # deferred: vLLM is optional
        from vllm.exceptions import VLLMClientError

        self._request_errors = (VLLMClientError, ValueError)  # what vLLM raises for a bad request

        self._llm = LLM(model=model_dir, **engine_args_for(engine_args or {}))
        self._llm_engine = self._llm.llm_engine
        self._scheduler = self._llm_engine.engine_core.engine_core.scheduler
        self._name = name
        self._vllm_ids: dict[str, str] = {}  # our request id -> vLLM request id
        self._our_ids: dict[str, str] = {}  # vLLM request id -> ours
        # Our ids that finished or were aborted here: plan entries naming them are skipped (a
        # repeat tail outlives its requests; a plan may cross an abort on the wire).
        self._gone: set[str] = set()
        # Our ids registered with cached tokens, until their first step says what was found.
        self._num_claimed: dict[str, int] = {}

    @classmethod
    def from_pretrained(
        cls, model_dir: str, engine_args: Mapping[str, Any] | None = None
    ) -> VLLMEngine:
        """The constructor under the name `slos-serve engine` uses; without `engine_args` they are
        read from the SLOS_SERVE_VLLM_ARGS environment variable (JSON)."""
        return cls(model_dir, engine_args_from_env() if engine_args is None else engine_args)

    # ----- Engine interface ---------------------------------------------------------------------

    def info(self) -> EngineInfo:
        scheduler = self._scheduler
        return EngineInfo(
            num_total_blocks=scheduler.kv_cache_manager.block_pool.num_gpu_blocks
            - 1,  # minus null block
            block_size=scheduler.block_size,
            perf_model=None,
            max_spec_tokens=scheduler.num_spec_tokens,
            max_model_len=scheduler.max_model_len,
            name=self._name,
            kv_retention=scheduler.prefix_caching,
        )

    def add_request(self, request: EngineRequest) -> None:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        if request.request_id in self._vllm_ids:
            raise ValueError(f"vllm engine: duplicate request id {request.request_id}")
        params = SamplingParams(
            max_tokens=request.max_new_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            seed=request.seed,
            ignore_eos=request.ignore_eos,
            detokenize=False,
            output_kind=RequestOutputKind.DELTA,
        )
        kept = self._scheduler.kept
        entry = None
        if request.num_cached_tokens and request.chain_id is not None:
            entry = kept.take(request.chain_id)  # the round takes its chain's kept prefix
        kept_ids = entry.token_ids if entry is not None else ()
        prompt_token_ids = list(
            request.prompt_token_ids or self._placeholder_prompt(request, kept_ids)
        )
        try:
            vllm_id = self._add_to_vllm(request.request_id, prompt_token_ids, params)
        except ValueError:
            if entry is not None:
                kept.unpin(entry)  # a refused round leaves its chain's blocks to the cache
            raise
        self._vllm_ids[request.request_id] = vllm_id
        self._our_ids[vllm_id] = request.request_id
        self._gone.discard(request.request_id)
        if request.num_cached_tokens:
            self._scheduler.claim(vllm_id, request.num_cached_tokens, entry)
            self._num_claimed[request.request_id] = request.num_cached_tokens
        # "host" is never sent here (info() offers no host memory); it would be kept evictable.
        if request.chain_id is not None and request.retain_kv != "drop":
            self._scheduler.retain(vllm_id, request.chain_id, request.retain_kv == "pinned")

    def _add_to_vllm(self, request_id: str, prompt_token_ids: list[int], params) -> str:
        self._check_token_ids(request_id, prompt_token_ids)
        try:
            return self._llm_engine.add_request(
                request_id, {"prompt_token_ids": prompt_token_ids}, params
            )
        except self._request_errors as exc:  # e.g. a prompt longer than max_model_len
            raise ValueError(f"vllm engine: request {request_id}: {exc}") from None

    def execute(self, step: Step, step_id: int) -> StepReport:
        vllm_step, error = self._to_vllm_step(step)
        error = error or self._scheduler.submit(vllm_step)
        if error:
            log.warning("step %d refused: %s", step_id, error)
        if error or vllm_step.is_empty:
            now_s = time.monotonic()
            return StepReport(
                step_id=step_id,
                start_s=now_s,
                end_s=now_s,
                num_free_blocks=self.num_free_blocks,
                error=error,
                kv_evicted=self._scheduler.kept.pop_evicted(),
            )
        start_s = time.monotonic()
        self._llm_engine.step()  # schedule (our step) -> model -> update_from_output
        end_s = time.monotonic()
        outcome = self._scheduler.take_outcome()
        if outcome is None:
            raise RuntimeError("vLLM stepped without calling the planner-driven scheduler")
        return self._report(outcome, step_id, start_s, end_s)

    def abort(self, request_id: str) -> None:
        vllm_id = self._forget(request_id)
        if vllm_id is not None:
            self._llm_engine.abort_request([vllm_id], internal=True)

    def preempt(self, request_id: str) -> None:
        vllm_id = self._vllm_ids.get(request_id)
        if vllm_id is not None:
            self._scheduler.preempt(vllm_id)

    def release_kv(self, chain_id: str) -> None:
        """Drop a chain's kept prefix: a pinned one's blocks go back to vLLM's cache (free, and
        findable until reused); an evictable one is left to the cache (nothing is held)."""
        self._scheduler.kept.release(chain_id)

    @property
    def num_free_blocks(self) -> int:
        """vLLM's free blocks, cached (evictable) ones included."""
        return self._scheduler.num_free_blocks

    # ----- helpers ------------------------------------------------------------------------------

    @property
    def scheduler(self):
        """The PlanScheduler inside vLLM (tests and benchmarks read its outputs)."""
        return self._scheduler

    def vllm_request_id(self, request_id: str) -> str:
        return self._vllm_ids[request_id]

    def _check_token_ids(self, request_id: str, token_ids: list[int]) -> None:
        # vLLM accepts out-of-vocabulary ids at add time and fails inside the model later.
        vocab_size = self._llm_engine.model_config.get_vocab_size()
        bad = [t for t in token_ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(
                f"vllm engine: request {request_id}: token ids {bad[:5]} outside the vocabulary "
                f"(size {vocab_size})"
            )

    def kept_chains(self) -> dict[str, tuple[int, bool]]:
        """Chain id -> (kept tokens, pinned) of every kept prefix (tests, diagnostics)."""
        return self._scheduler.kept.chains()

    def _placeholder_prompt(self, request: EngineRequest, kept_ids: tuple[int, ...]) -> list[int]:
        # Planner workloads carry lengths, not text: any in-vocabulary ids will do; a chain's
        # round begins with the tokens its previous round left (its context).
        vocab_size = self._llm_engine.model_config.get_vocab_size()
        kept_ids = kept_ids[: request.num_prompt_tokens - 1]
        rest = range(len(kept_ids), request.num_prompt_tokens)
        return [*kept_ids, *(1 + (i * 7919) % (vocab_size - 1) for i in rest)]

    def _to_vllm_step(self, step: Step) -> tuple[Step, str]:
        """Our ids -> vLLM ids; entries of requests finished or aborted here are skipped."""
        num_tokens: dict[str, int] = {}
        num_spec_tokens: dict[str, int] = {}
        for request_id, n in step.num_tokens.items():
            if request_id in self._gone:
                continue
            if request_id not in self._vllm_ids:
                return Step({}), f"request {request_id} is unknown to this engine"
            vllm_id = self._vllm_ids[request_id]
            num_tokens[vllm_id] = n
            if request_id in step.num_spec_tokens:
                num_spec_tokens[vllm_id] = step.num_spec_tokens[request_id]
        return Step(num_tokens, num_spec_tokens), ""

    def _report(
        self, outcome: StepOutcome, step_id: int, start_s: float, end_s: float
    ) -> StepReport:
        to_ours = dict(self._our_ids)  # taken before finished requests are forgotten
        spec = {to_ours[v]: s for v, s in outcome.num_spec_tokens.items()}
        new_token_ids = {
            to_ours[v]: ids for v, ids in outcome.new_token_ids.items() if v in to_ours
        }
        finished = tuple(to_ours[v] for v in outcome.finished if v in to_ours)
        for vllm_id, reason in outcome.finished.items():
            if reason not in NORMAL_FINISH_REASONS:  # StepReport has no field for these
                log.warning("vLLM ended request %s early: %s", to_ours.get(vllm_id), reason)
        kv_misses, kv_found = self._found(outcome, to_ours)  # before finished ones are forgotten
        for request_id in finished:
            self._forget(request_id)
        return StepReport(
            step_id=step_id,
            start_s=start_s,
            end_s=end_s,
            # vLLM computed the planned tokens plus the verified drafts; report the former.
            num_computed_tokens={
                to_ours[v]: n - outcome.num_spec_tokens.get(v, 0)
                for v, n in outcome.num_scheduled_tokens.items()
            },
            num_new_tokens={rid: len(ids) for rid, ids in new_token_ids.items()},
            # A verifying request emits its accepted drafts plus one token of its own.
            num_accepted_spec_tokens={
                rid: max(0, len(new_token_ids.get(rid, ())) - 1) for rid in spec
            },
            num_proposed_spec_tokens=spec,
            new_token_ids=new_token_ids,
            num_free_blocks=self.num_free_blocks,
            finished=finished,
            kv_evicted=self._scheduler.kept.pop_evicted(),
            kv_misses=kv_misses,
            kv_found=kv_found,
        )

    def _found(
        self, outcome: StepOutcome, to_ours: dict[str, str]
    ) -> tuple[tuple[str, ...], dict[str, int]]:
        """Requests admitted this step with fewer cached tokens than they were registered with:
        none found (misses) and some (request -> tokens found)."""
        misses, found = [], {}
        for vllm_id, num_found in outcome.num_found_tokens.items():
            request_id = to_ours[vllm_id]
            num_claimed = self._num_claimed.pop(request_id, 0)
            if num_found == 0:
                misses.append(request_id)
            elif num_found < num_claimed:
                found[request_id] = num_found
        return tuple(misses), found

    def _forget(self, request_id: str) -> str | None:
        """Drop the id maps of a finished or aborted request; return its vLLM id."""
        self._gone.add(request_id)
        self._num_claimed.pop(request_id, None)
        vllm_id = self._vllm_ids.pop(request_id, None)
        if vllm_id is not None:
            self._our_ids.pop(vllm_id, None)
        return vllm_id


@register("vllm")
def build(options: EngineOptions) -> VLLMEngine:
    """vLLM engine arguments beyond the model come from SLOS_SERVE_VLLM_ARGS (JSON) and the
    repeatable --vllm-arg NAME=VALUE (which wins on conflicts)."""
    if not options.model_dir:
        raise ValueError("--engine vllm needs --model-dir")
    if importlib.util.find_spec("vllm") is None:
        raise ValueError("the vLLM engine needs vLLM: pip install 'slos-serve[vllm]'")
    engine_args = {**engine_args_from_env(), **parse_engine_args(list(options.vllm_args))}
    return VLLMEngine.from_pretrained(options.model_dir, engine_args)
