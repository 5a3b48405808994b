"""The OpenAI-compatible HTTP server (aiohttp) in front of the planner daemon.

    POST /v1/completions, /v1/chat/completions   (streaming over server-sent events, or not)
    GET  /v1/models, /health, /metrics

One request: validate the body (`openai_schema`), SUBMIT it through the shared `PlannerClient`,
wait for the planner's verdict, then answer:
- rejected: 429 with `Retry-After` and an OpenAI error body giving the planner's reason (a
  planner with admission control answers within the request's TTFT target, "TTFT target passed
  before a verdict" at the latest). The SLO is the planner's, taken from its verdict; the wait for
  a verdict is bounded by `verdict_timeout_s` (then 503: the planner is not answering). No
  request is ever queued silently.
- admitted / best_effort: the tokens, as they arrive; the verdict is in the `X-SLO-Verdict` header
  and the body's `slo` field, so that best-effort answers are marked.
A client that disconnects (aiohttp cancels its handler) or a stop string ends the request at the
planner with ABORT, so that no engine keeps computing for nobody.

The event loop never blocks on the planner: the client's I/O thread hands events over with
`call_soon_threadsafe` (`RequestHandle.events_async`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import threading
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import msgspec
from aiohttp import web

from formulations.plan import Verdict
from planner_svc.client import PlannerClient, RequestHandle
from planner_svc.http.api_config import ApiConfig
from planner_svc.http.http_metrics import CONTENT_TYPE, HttpMetrics
from planner_svc.http.openai_responses import ResponseHead, slo_info, usage
from planner_svc.http.openai_schema import (
    SESSION_HEADER,
    ApiError,
    GenerationJob,
    context_length,
    parse_job,
    parse_json_body,
)
from planner_svc.http.output_text import OutputText
from planner_svc.http.session_rounds import SessionRounds
from planner_svc.http.tokenizer import TextTokenizer
from wire import protocol as P

log = logging.getLogger("slos_serve.http")
ACCESS_LOG = logging.getLogger("slos_serve.http.access")
ACCESS_LOG_FORMAT = '%a "%r" %s %b %Tf %{X-Request-Id}o %{X-SLO-Verdict}o'

VERDICT_HEADER = "X-SLO-Verdict"
# Bodies up to this size are parsed on the event loop (a few hundred microseconds at most); larger
# ones, which may carry a long text prompt, in one of PARSE_THREADS worker threads.
INLINE_PARSE_BYTES = 16 << 10
PARSE_THREADS = 2
# ErrorMsg kinds the planner client makes up when the planner is gone or restarted: 503, not 400.
CLIENT_SIDE_ERRORS = frozenset({"planner_restarted", "planner_unreachable", "client_error"})
_JSON = msgspec.json.Encoder()


@dataclass
class _Progress:
    """What has been produced for one request so far (server clock: time.monotonic)."""

    arrival_s: float
    token_ids: list[int]
    first_token_s: float | None = None
    last_token_s: float | None = None
    finish_reason: str | None = None


class ApiServer:
    """The aiohttp application and its handlers; one per planner client."""

    def __init__(
        self,
        client: PlannerClient,
        config: ApiConfig | None = None,
        tokenizer: TextTokenizer | None = None,
    ) -> None:
        self.client = client
        self.config = config or ApiConfig()
        self.tokenizer = tokenizer
        self.metrics = HttpMetrics()
        self.sessions = SessionRounds(self.config.max_sessions, self.config.session_ttl_s)
        self.created_s = int(time.time())
        # Few threads: a burst of huge prompts queues here instead of taking every core.
        self._parse_pool = ThreadPoolExecutor(PARSE_THREADS, thread_name_prefix="http-parse")

    def app(self) -> web.Application:
        app = web.Application(
            middlewares=[self._middleware], client_max_size=self.config.max_body_bytes
        )
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.prometheus)
        return app

    # ------------------------------------------------------------------ plain endpoints

    async def models(self, request: web.Request) -> web.Response:
        self._check_api_key(request)
        max_model_len = context_length(self.config, self.tokenizer)
        data = [  # max_model_len as vLLM gives it: benchmark clients size their requests by it
            {
                "id": name,
                "object": "model",
                "created": self.created_s,
                "owned_by": "slos-serve",
                "max_model_len": max_model_len,
            }
            for name in self.config.model_names
        ]
        return _json_response({"object": "list", "data": data})

    async def health(self, request: web.Request) -> web.Response:
        """200 when the planner answers and has at least one engine, else 503."""
        loop = asyncio.get_running_loop()
        try:
            stats = await loop.run_in_executor(None, lambda: self.client.stats(timeout_s=2.0))
        except Exception as exc:
            return _json_response({"status": "unavailable", "reason": str(exc)}, 503)
        body = {
            "status": "ok" if stats.num_engines else "no_engines",
            "num_engines": stats.num_engines,
        }
        return _json_response(body, 200 if stats.num_engines else 503)

    async def prometheus(self, request: web.Request) -> web.Response:
        self.metrics.planner_restarts.set(self.client.num_planner_restarts)
        return web.Response(body=self.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE})

    # ------------------------------------------------------------------ generation

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        arrival_s = time.monotonic()
        arrival_client_s = self.client.now_s()  # the same instant on the planner client's clock
        api_key = self._check_api_key(request)
        job = await self._parse(
            await request.read(), chat, api_key, request.headers.get(SESSION_HEADER)
        )
        job = self._number_round(job)
        head = ResponseHead(
            f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            int(time.time()),
            job.model,
            chat,
        )
        handle = self.client.submit(_submit_message(head.response_id, job))
        # up to the client's own arrival stamp (the hand-over to its I/O thread is not ours)
        self.metrics.ingress.observe(handle.arrival_s - arrival_client_s)
        events = handle.events_async()
        self.metrics.in_flight.inc()
        # Leaving this handler any other way than below (cancelled, a failed write) means the
        # client went away.
        abort_reason, client_left = "client disconnected", True
        try:
            verdict = await self._verdict(handle, events, job)
            progress = _Progress(arrival_s, [])
            if job.stream:
                response = await self._stream(request, job, head, handle, events, verdict, progress)
            else:
                response = await self._collect(job, head, events, verdict, progress)
            abort_reason, client_left = "answered (stop string or lost request)", False
            return response
        except ApiError as exc:
            abort_reason, client_left = exc.message, False
            raise
        finally:
            self.metrics.in_flight.dec()
            if not handle.done:  # the planner would keep generating for nobody
                if client_left:
                    self.metrics.disconnects.inc()
                self.client.abort(handle.request_id, abort_reason[:200])
            self.client.forget(handle.request_id)
            await events.aclose()

    async def _parse(
        self, raw: bytes, chat: bool, api_key: str | None, session_header: str | None
    ) -> GenerationJob:
        """The body as a job. Large bodies are decoded and tokenized in a worker thread (the
        tokenizer releases the GIL): tokenizing a long prompt takes seconds, during which the
        event loop must keep serving everyone else."""

        def parse() -> GenerationJob:
            body = parse_json_body(raw)
            return parse_job(body, chat, self.config, self.tokenizer, api_key, session_header)

        if len(raw) <= INLINE_PARSE_BYTES:
            return parse()
        return await asyncio.get_running_loop().run_in_executor(self._parse_pool, parse)

    def _number_round(self, job: GenerationJob) -> GenerationJob:
        """The job with its round index: the client's, or for a session the front door's count
        (on the event loop: one thread counts, so two requests never get the same index)."""
        slo = job.slo
        if slo.chain_id is None:
            round_index = slo.round_index or 0
        else:
            sessions = self.sessions
            expired_before, evicted_before = sessions.num_expired, sessions.num_evicted
            round_index = sessions.assign(slo.chain_id, slo.round_index)
            if slo.round_index is not None:
                kind = "explicit"
            else:
                kind = "counted" if round_index > 0 else "new"
            metrics = self.metrics
            metrics.session_rounds.labels(kind).inc()
            metrics.sessions.set(len(sessions))
            metrics.sessions_forgotten.labels("ttl").inc(sessions.num_expired - expired_before)
            metrics.sessions_forgotten.labels("lru").inc(sessions.num_evicted - evicted_before)
        return dataclasses.replace(job, slo=dataclasses.replace(slo, round_index=round_index))

    async def _verdict(
        self, handle: RequestHandle, events: AsyncIterator[P._Msg], job: GenerationJob
    ) -> P.VerdictMsg:
        """The planner's verdict, or an ApiError (429 rejected, 400 refused, 503 no answer)."""
        wait_s = self.config.verdict_timeout_s
        try:
            event = await asyncio.wait_for(anext(events, None), wait_s)
        except asyncio.TimeoutError:
            raise ApiError(
                503,
                f"the planner gave no verdict within {wait_s:g} s",
                code="planner_timeout",
                error_type="server_error",
                headers={"Retry-After": "1"},
            ) from None
        if isinstance(event, P.ErrorMsg) and event.kind in CLIENT_SIDE_ERRORS:
            raise ApiError(
                503,
                f"the planner is not available: {event.reason}",
                code="planner_unavailable",
                error_type="server_error",
                headers={"Retry-After": "1"},
            )
        if isinstance(event, P.ErrorMsg):
            raise ApiError(
                400, f"the planner refused the request: {event.reason}", code="planner_refused"
            )
        if not isinstance(event, P.VerdictMsg):
            raise ApiError(
                503,
                f"the planner ended the request without a verdict "
                f"({handle.error or 'unknown reason'})",
                code="no_verdict",
                error_type="server_error",
            )
        label = self.metrics.class_label(job.slo.slo_class)
        self.metrics.verdicts.labels(event.verdict, label).inc()
        if event.verdict == Verdict.REJECTED.value:
            self.metrics.rejected.labels(label).inc()
            if event.code in (P.VERDICT_NO_ENGINE, P.VERDICT_LOST):  # the service's fault
                raise ApiError(
                    503,
                    f"the service cannot serve the request now: {event.reason}",
                    code=event.code,
                    error_type="server_error",
                    headers={"Retry-After": "1"},
                )
            raise _too_many(
                f"the planner rejected the request: {event.reason or 'no reason'}",
                retry_after_s=event.ttft_slo_s,
                code=event.code or "slo_rejected",
            )
        return event

    async def _stream(
        self,
        request: web.Request,
        job: GenerationJob,
        head: ResponseHead,
        handle: RequestHandle,
        events: AsyncIterator[P._Msg],
        verdict: P.VerdictMsg,
        progress: _Progress,
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                VERDICT_HEADER: verdict.verdict,
                "X-Request-Id": head.response_id,
            }
        )
        await response.prepare(request)
        output = OutputText(self.tokenizer, job.stop)
        slo = slo_info(verdict, job.slo.slo_class)
        lost_reason = "the request ended before its last token"
        async for event in events:
            if isinstance(event, (P.ErrorMsg, P.VerdictMsg)):  # lost after admission
                lost_reason = getattr(event, "reason", "") or lost_reason
                break
            if not isinstance(event, P.Tokens):
                continue
            text, finish_reason = self._advance(progress, output, event, job)
            chunk = head.chunk(
                text,
                list(event.token_ids),
                finish_reason,
                first=progress.first_token_s is None,
                slo=None,
            )
            if progress.first_token_s is None:
                chunk["slo"] = slo
            await response.write(_sse(chunk))
            if handle.token_times_s:
                self.metrics.delivery.observe(self.client.now_s() - handle.token_times_s[-1])
            self._observe_token(progress, job)
            if finish_reason is not None:
                break
        if progress.finish_reason is None:  # never just stop: say why there is no more
            error = ApiError(
                503,
                f"the request was lost: {lost_reason}",
                code="request_lost",
                error_type="server_error",
            )
            await response.write(_sse(error.body()))
        if progress.finish_reason is not None and job.include_usage:
            await response.write(
                _sse(head.usage_chunk(usage(len(job.prompt_token_ids), len(progress.token_ids))))
            )
        await response.write(b"data: [DONE]\n\n")
        self._observe_end(progress, job)
        await response.write_eof()
        return response

    async def _collect(
        self,
        job: GenerationJob,
        head: ResponseHead,
        events: AsyncIterator[P._Msg],
        verdict: P.VerdictMsg,
        progress: _Progress,
    ) -> web.Response:
        output = OutputText(self.tokenizer, job.stop)
        text_parts = []
        async for event in events:
            if isinstance(event, (P.ErrorMsg, P.VerdictMsg)):
                raise ApiError(
                    503,
                    f"the request was lost: {getattr(event, 'reason', '')}",
                    code="request_lost",
                    error_type="server_error",
                )
            if isinstance(event, P.Tokens):
                text, finish_reason = self._advance(progress, output, event, job)
                text_parts.append(text)
                self._observe_token(progress, job)
                if finish_reason is not None:
                    break
        if progress.finish_reason is None:
            raise ApiError(
                503,
                "the request ended before its last token",
                code="request_lost",
                error_type="server_error",
            )
        self._observe_end(progress, job)
        body = head.completion(
            "".join(text_parts),
            progress.token_ids,
            progress.finish_reason,
            usage(len(job.prompt_token_ids), len(progress.token_ids)),
            slo_info(verdict, job.slo.slo_class),
        )
        return _json_response(
            body, headers={VERDICT_HEADER: verdict.verdict, "X-Request-Id": head.response_id}
        )

    def _advance(
        self, progress: _Progress, output: OutputText, event: P.Tokens, job: GenerationJob
    ) -> tuple[str, str | None]:
        """Take one Tokens message: the text to send now and the finish reason, if it ends."""
        progress.token_ids.extend(event.token_ids)
        text = output.add(list(event.token_ids))
        num_generated = max(event.num_generated_tokens, len(progress.token_ids))
        if output.stopped:
            progress.finish_reason = "stop"
        elif event.finished:
            progress.finish_reason = "length" if num_generated >= job.max_tokens else "stop"
        if progress.finish_reason is not None:
            text += output.finish()
        return text, progress.finish_reason

    def _observe_token(self, progress: _Progress, job: GenerationJob) -> None:
        now_s = time.monotonic()
        if progress.first_token_s is None:
            progress.first_token_s = now_s
            self.metrics.ttft.labels(self.metrics.class_label(job.slo.slo_class)).observe(
                now_s - progress.arrival_s
            )
        else:
            self.metrics.itl.observe(now_s - progress.last_token_s)
        progress.last_token_s = now_s

    def _observe_end(self, progress: _Progress, job: GenerationJob) -> None:
        self.metrics.prompt_tokens.inc(len(job.prompt_token_ids))
        self.metrics.completion_tokens.inc(len(progress.token_ids))
        if progress.last_token_s is not None:
            self.metrics.e2e.labels(self.metrics.class_label(job.slo.slo_class)).observe(
                progress.last_token_s - progress.arrival_s
            )

    # ------------------------------------------------------------------ plumbing

    def _check_api_key(self, request: web.Request) -> str | None:
        """The bearer key (None without one); 401 when keys are required and this one is not
        configured."""
        header = request.headers.get("Authorization", "")
        key = header[len("Bearer ") :].strip() if header.startswith("Bearer ") else None
        if self.config.require_api_key and key not in self.config.api_keys:
            raise ApiError(401, "Incorrect API key provided", code="invalid_api_key")
        return key

    @web.middleware
    async def _middleware(self, request: web.Request, handler) -> web.StreamResponse:
        """OpenAI-style error bodies for every failure; counts answers by path and status."""
        try:
            response = await handler(request)
        except ApiError as exc:
            response = _json_response(exc.body(), exc.status, exc.headers)
        except ConnectionResetError:  # the client went away mid-stream (its request is aborted)
            response = web.Response(status=499)  # nginx's "client closed request", for metrics
        except web.HTTPException as exc:  # 404, 405, 413 from aiohttp itself
            error = ApiError(
                exc.status,
                exc.reason
                if exc.status != 413
                else f"the request body exceeds {self.config.max_body_bytes} bytes",
                code=str(exc.status),
            )
            response = _json_response(error.body(), exc.status)
        except Exception:  # a bug must not take the server down; it is logged loudly
            log.exception("internal error on %s %s", request.method, request.path)
            error = ApiError(500, "internal server error", error_type="server_error")
            response = _json_response(error.body(), 500)
        route = request.match_info.route.resource
        path = route.canonical if route is not None else "other"
        self.metrics.requests.labels(path, str(response.status)).inc()
        return response


def _submit_message(request_id: str, job: GenerationJob) -> P.Submit:
    slo = job.slo
    return P.Submit(
        request_id=request_id,
        max_tokens=job.max_tokens,
        prompt_token_ids=job.prompt_token_ids,
        slo_class=slo.slo_class,
        slo_targets=slo.slo_targets,
        ttft_ms=slo.ttft_ms,
        ttft_slowdown=slo.ttft_slowdown,
        tpot_ms=slo.tpot_ms,
        thinking_tokens=min(slo.thinking_tokens, job.max_tokens),
        thinking_tpot_ms=slo.thinking_tpot_ms,
        temperature=job.temperature,
        top_p=job.top_p,
        seed=job.seed,
        ignore_eos=job.ignore_eos,
        chain_id=slo.chain_id,
        round_index=slo.round_index,
        chain_last_round=slo.chain_last_round,
        value=slo.value,
        expected_output_tokens=slo.expected_output_tokens,
    )


def _too_many(message: str, retry_after_s: float, code: str) -> ApiError:
    """A 429; Retry-After is a heuristic: about one TTFT budget (whole seconds, at least 1),
    the time in which the planner's queue turns over."""
    retry_after = str(max(1, math.ceil(retry_after_s)))
    return ApiError(
        429, message, code=code, error_type="slo_rejected", headers={"Retry-After": retry_after}
    )


def _sse(payload: dict) -> bytes:
    return b"data: " + _JSON.encode(payload) + b"\n\n"


def _json_response(
    body: dict, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=_JSON.encode(body),
        status=status,
        headers={"Content-Type": "application/json", **(headers or {})},
    )


# ---------------------------------------------------------------------- running


async def start_site(
    api: ApiServer, host: str, port: int, access_log: bool = True
) -> tuple[web.AppRunner, int]:
    """Serve `api` on host:port (0: any free port); returns the runner and the bound port.
    Handlers are cancelled when their client disconnects (that is how aborts are noticed). The
    access log (logger `slos_serve.http.access`, INFO) has one line per request: peer, request
    line, status, bytes, seconds (for a stream: until its end), request id, verdict."""
    runner = web.AppRunner(
        api.app(),
        handler_cancellation=True,
        access_log=ACCESS_LOG if access_log else None,
        access_log_format=ACCESS_LOG_FORMAT,
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError:  # the port is taken: the caller says so in one line
        await runner.cleanup()
        raise
    bound_port = runner.addresses[0][1]
    return runner, bound_port


class ServerThread:
    """The server on its own event loop in a background thread (tests, benchmarks)."""

    def __init__(self, api: ApiServer, host: str = "127.0.0.1", port: int = 0) -> None:
        self.api = api
        self.host = host
        self.loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(port, ready), daemon=True, name="http-server"
        )
        self._thread.start()
        if not ready.wait(10) or self._runner is None:
            raise RuntimeError("the HTTP server did not start")

    def _run(self, port: int, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self._runner, self.port = self.loop.run_until_complete(
                start_site(self.api, self.host, port)
            )
        finally:
            ready.set()
        self.loop.run_forever()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def close(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()
