"""Replay a workload against any OpenAI-compatible server (ours, or vLLM's own) over streaming
/v1/completions, and turn what it measured into `RequestRecord`s for `lab.report`.

Each request is sent at its arrival time (relative to the first arrival) with a prompt of its
length (random token ids in [min_token_id, max_token_id), seeded) and `max_tokens` = its output
length with `ignore_eos` (vLLM's field), so that the server produces exactly the workload's tokens.
Tool chains run round after round, each `tool_delay_s` after the previous one finished. With
`send_slo_fields` the request's class (and thinking budget, tool round, value) go along as the
extension fields of docs/HTTP_API.md; a server that does not know them ignores them.

Times are this client's (time.monotonic, relative to the start): a request's arrival is when it was
sent, a token's time is when the SSE chunk carrying it was read. A chunk's token count comes from
its `token_ids` extension when the server sends one, else each chunk with text counts one token (as
vLLM's benchmark does); tokens that `usage` reports beyond those are stamped with the last chunk's
time. Deadlines: the SLO the server reports in its `slo` extension (the one its planner resolved),
else the workload's own.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import aiohttp
import numpy as np

from formulations.perf_model import perf_model_preset
from formulations.plan import Verdict
from formulations.request import Request, ToolChain
from formulations.slo import SLO
from lab.workloads.workload import Workload
from planner_svc.records import RequestRecord


@dataclass(frozen=True)
class BenchOptions:
    url: str  # server root, e.g. http://127.0.0.1:8000
    model: str = "slos-serve"
    api_key: str | None = None
    send_slo_fields: bool = True
    min_token_id: int = 10
    max_token_id: int = 500
    seed: int = 0
    request_timeout_s: float = 300.0
    drain_timeout_s: float = 60.0  # after the last arrival
    max_connections: int = 1000
    perf_model: str = "opt-13b-h100"  # resolves tool rounds' TTFT slowdowns (the workload's model)


@dataclass
class CallResult:
    """One LLM call as the benchmark client saw it."""

    request: Request  # the workload's request (arrival_s replaced by the send time)
    status: int = 0  # HTTP status (0: no answer)
    response_id: str = ""
    verdict: Verdict | None = None
    slo: dict | None = None  # the server's `slo` extension, if any
    token_times_s: list[float] = field(default_factory=list)
    error: str = ""

    def record(self) -> RequestRecord:
        return RequestRecord(
            request=self._request_with_server_slo(),
            verdict=self.verdict,
            token_times_s=list(self.token_times_s),
            finished=len(self.token_times_s) >= self.request.num_output_tokens,
        )

    def _request_with_server_slo(self) -> Request:
        slo = self.slo
        if not slo or not slo.get("ttft_ms") or not slo.get("tpot_ms"):
            return self.request
        thinking_tpot_s = self.request.slo.thinking_tpot_s
        return replace(
            self.request,
            ttft_slo_s=slo["ttft_ms"] / 1e3,
            slo=SLO(
                tpot_s=slo["tpot_ms"] / 1e3,
                ttft_s=slo["ttft_ms"] / 1e3,
                thinking_tpot_s=thinking_tpot_s,
            ),
        )


@dataclass
class BenchResult:
    calls: list[CallResult]
    workload: Workload
    wall_s: float
    start_monotonic_s: float  # time.monotonic() at the client clock's zero

    @property
    def records(self) -> list[RequestRecord]:
        return [c.record() for c in self.calls]

    @property
    def num_errors(self) -> int:
        return sum(1 for c in self.calls if c.error and c.verdict is not Verdict.REJECTED)

    def calls_json(self) -> dict:
        """Per-call raw measurements (times on this client's clock; `start_monotonic_s` is its
        zero on the machine's monotonic clock, to line them up with another process's)."""
        return {
            "start_monotonic_s": self.start_monotonic_s,
            "wall_s": self.wall_s,
            "calls": [
                {
                    "request_id": c.request.request_id,
                    "response_id": c.response_id,
                    "status": c.status,
                    "verdict": c.verdict.value if c.verdict else None,
                    "arrival_s": c.request.arrival_s,
                    "token_times_s": c.token_times_s,
                    "slo": c.slo,
                    "error": c.error,
                }
                for c in self.calls
            ],
        }


@dataclass(frozen=True)
class ServedModel:
    """One entry of the server's GET /v1/models."""

    name: str
    max_model_len: int | None  # None: the server does not say (OpenAI's own API does not)


def served_models(
    url: str, api_key: str | None = None, timeout_s: float = 10.0
) -> list[ServedModel]:
    """The models the server at `url` serves (GET /v1/models), with their context length when it
    says (vLLM and slos-serve do). Raises ValueError with the reason when it cannot be read."""
    request = urllib.request.Request(f"{url}/v1/models")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            entries = json.loads(response.read())["data"]
    except urllib.error.HTTPError as exc:
        raise ValueError(f"GET {url}/v1/models answered {exc.code}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ValueError(f"cannot reach {url}/v1/models: {reason}") from None
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{url}/v1/models did not answer an OpenAI model list") from None
    models = []
    for entry in entries:
        max_model_len = entry.get("max_model_len")
        valid = isinstance(max_model_len, int) and max_model_len > 1
        models.append(ServedModel(str(entry["id"]), max_model_len if valid else None))
    return models


def run_bench(workload: Workload, options: BenchOptions) -> BenchResult:
    """Replay `workload` in real time (blocking)."""
    return asyncio.run(_run(workload, options))


async def _run(workload: Workload, options: BenchOptions) -> BenchResult:
    rng = np.random.default_rng(options.seed)
    first_s = min(
        [r.arrival_s for r in workload.requests] + [c.arrival_s for c in workload.chains],
        default=0.0,
    )
    calls: list[CallResult] = []
    connector = aiohttp.TCPConnector(limit=options.max_connections)
    timeout = aiohttp.ClientTimeout(total=options.request_timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start_s = time.monotonic()
        clock = lambda: time.monotonic() - start_s  # noqa: E731
        sender = _Sender(session, options, rng, clock)
        tasks = [
            asyncio.create_task(_at(r.arrival_s - first_s, clock, sender.call(r, calls)))
            for r in workload.requests
        ]
        tasks += [
            asyncio.create_task(_at(c.arrival_s - first_s, clock, sender.chain(c, calls)))
            for c in workload.chains
        ]
        last_arrival_s = max((r.arrival_s - first_s for r in workload.requests), default=0.0)
        _, pending = await asyncio.wait(
            tasks, timeout=last_arrival_s + options.drain_timeout_s if tasks else None
        )
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    return BenchResult(calls, workload, time.monotonic() - start_s, start_s)


async def _at(due_s: float, clock: Callable[[], float], coroutine) -> None:
    delay_s = due_s - clock()
    if delay_s > 0:
        await asyncio.sleep(delay_s)
    await coroutine


class _Sender:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        options: BenchOptions,
        rng: np.random.Generator,
        clock: Callable[[], float],
    ) -> None:
        self.session = session
        self.options = options
        self.rng = rng
        self.clock = clock
        self.perf_model = perf_model_preset(options.perf_model)
        self.headers = {"Content-Type": "application/json"}
        if options.api_key:
            self.headers["Authorization"] = f"Bearer {options.api_key}"

    async def chain(self, chain: ToolChain, calls: list[CallResult]) -> None:
        """Round k+1 goes out tool_delay_s after round k ended; a round not served ends the
        chain."""
        for k, round_ in enumerate(chain.rounds):
            if k > 0:
                await asyncio.sleep(round_.tool_delay_s)
            request = chain.round_request(k, self.clock(), self.perf_model)
            last = k == chain.num_rounds - 1
            extra = {
                "slo_targets": chain.final_slo if last else chain.intermediate_slo,
                "chain_id": chain.chain_id,
                "round_index": k,
            }
            result = await self.call(request, calls, extra)
            if len(result.token_times_s) < request.num_output_tokens:
                return

    async def call(
        self, request: Request, calls: list[CallResult], extra: dict | None = None
    ) -> CallResult:
        body = json.dumps(self._body(request, extra or {})).encode()  # before the clock starts
        result = CallResult(replace(request, arrival_s=self.clock()))
        calls.append(result)
        try:
            async with self.session.post(
                f"{self.options.url}/v1/completions", data=body, headers=self.headers
            ) as response:
                result.status = response.status
                if response.status != 200:
                    await self._failed(result, response)
                    return result
                result.verdict = _verdict(response.headers.get("X-SLO-Verdict"))
                await self._read_stream(result, response)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            result.error = f"{type(exc).__name__}: {exc}"
        return result

    def _body(self, request: Request, extra: dict) -> dict:
        prompt = self.rng.integers(
            self.options.min_token_id, self.options.max_token_id, request.num_prompt_tokens
        ).tolist()
        body = {
            "model": self.options.model,
            "prompt": prompt,
            "max_tokens": request.num_output_tokens,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": 0.0,
        }
        if self.options.send_slo_fields:
            body["slo_class"] = request.slo_class
            slo = {}
            if request.num_thinking_tokens:
                slo["thinking_tokens"] = request.num_thinking_tokens
            if request.value != 1.0:
                slo["value"] = request.value
            if slo:
                body["slo"] = slo
            body.update(extra)
        return body

    async def _failed(self, result: CallResult, response: aiohttp.ClientResponse) -> None:
        text = await response.text()
        try:
            result.error = json.loads(text)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            result.error = text[:200]
        if response.status == 429:
            result.verdict = Verdict.REJECTED

    async def _read_stream(self, result: CallResult, response: aiohttp.ClientResponse) -> None:
        usage_tokens = None
        async for line in response.content:
            if not line.startswith(b"data: "):
                continue
            now_s = self.clock()
            payload = line[6:].strip()
            if payload == b"[DONE]":
                break
            chunk = json.loads(payload)
            if "error" in chunk:
                result.error = str(chunk["error"].get("message", chunk["error"]))
                break
            if chunk.get("slo") and result.slo is None:
                result.slo = chunk["slo"]
                result.verdict = _verdict(chunk["slo"].get("verdict")) or result.verdict
            result.response_id = result.response_id or chunk.get("id", "")
            if chunk.get("usage"):
                usage_tokens = chunk["usage"].get("completion_tokens")
            for choice in chunk.get("choices") or ():
                result.token_times_s.extend([now_s] * _num_tokens(choice))
        if usage_tokens is not None and result.token_times_s:
            missing = usage_tokens - len(result.token_times_s)
            result.token_times_s.extend([result.token_times_s[-1]] * max(0, missing))


def _num_tokens(choice: dict) -> int:
    if isinstance(choice.get("token_ids"), list):
        return len(choice["token_ids"])
    text = choice.get("text")
    if text is None:
        text = (choice.get("delta") or {}).get("content")
    return 1 if text else 0


def _verdict(name: str | None) -> Verdict | None:
    if name is None:
        return Verdict.ADMITTED  # a server without verdicts serves everything it answers
    try:
        return Verdict(name)
    except ValueError:
        return None
