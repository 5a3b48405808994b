"""The Python client of the planner daemon: submit requests, stream their tokens, get verdicts.

    with PlannerClient("tcp://127.0.0.1:5558") as client:
        handle = client.submit(num_prompt_tokens=512, max_tokens=64, slo_class="chatbot")
        print(handle.verdict().verdict)          # admitted / rejected / best_effort
        for event in handle.tokens():            # Tokens messages as they arrive
            ...
        record = handle.record()                 # RequestRecord on the client's clock

Thread-safe: one background I/O thread owns the DEALER socket (ZeroMQ sockets are not thread-safe);
callers hand it messages through a queue and wake it through a pipe, so `submit` from any thread
(or from an asyncio loop, see `RequestHandle.events_async`) never blocks on the network. The HTTP
front door builds on this.

Endings: every request ends, with its last tokens, a rejection, or an error. Errors the client
makes up itself arrive as `ErrorMsg` events too: `planner_unreachable` when the planner has been
silent for `liveness` heartbeat intervals, and `planner_restarted` when replies come from another
planner process (each reply carries the planner's instance id): the new planner knows none of the
old one's requests, so they would never end otherwise.

Times: the client stamps a request's arrival when it is handed to the I/O thread and each token
when its message is received, on its own monotonic clock (`client.now_s()`), so a client-side report
measures what a user would see, network included.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

import zmq
from zmq.utils.monitor import recv_monitor_message

from formulations.plan import Verdict
from formulations.request import Request, ToolChain
from formulations.slo import SLO
from planner_svc.records import RequestRecord
from wire import protocol as P
from wire.endpoint import check_endpoint
from wire.security import HANDSHAKE_EVENTS, CurveKeys, handshake_failure_reason

log = logging.getLogger("slos_serve.client")


class ClientError(RuntimeError):
    """The planner refused a request or did not answer in time."""


@dataclass
class RequestHandle:
    """One submitted request. Events (VerdictMsg, Tokens, ErrorMsg) arrive in order."""

    submit: P.Submit
    arrival_s: float  # client clock
    # The planner process the request lives in (P.VerdictMsg.planner_id): the one the client knew
    # when it submitted, then the one that answered. "" : none known yet.
    planner_id: str = ""
    verdict_msg: P.VerdictMsg | None = None
    error: str = ""
    ended_with_last_token: bool = False  # the planner said the output is complete
    token_times_s: list[float] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    _events: queue.Queue = field(default_factory=queue.Queue, repr=False)
    _decided: threading.Event = field(default_factory=threading.Event, repr=False)
    _done: threading.Event = field(default_factory=threading.Event, repr=False)
    _callbacks: list[Callable[[P._Msg], None]] = field(default_factory=list, repr=False)

    @property
    def request_id(self) -> str:
        return self.submit.request_id

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def finished(self) -> bool:
        """All tokens arrived (the last one marked so: max_tokens, EOS or a stop), as opposed to
        rejected, failed or aborted."""
        return self.done and self.ended_with_last_token

    def verdict(self, timeout_s: float | None = 30.0) -> P.VerdictMsg:
        """Block until the verdict arrives."""
        if not self._decided.wait(timeout_s):
            raise ClientError(f"no verdict for {self.request_id} within {timeout_s}s")
        if self.verdict_msg is None:
            raise ClientError(f"request {self.request_id} failed: {self.error}")
        return self.verdict_msg

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until the request is finished, rejected or failed; False on timeout."""
        return self._done.wait(timeout_s)

    def tokens(self, timeout_s: float | None = 60.0) -> Iterator[P.Tokens]:
        """Yield Tokens messages until the request is done (blocking)."""
        while True:
            try:
                event = self._events.get(timeout=timeout_s)
            except queue.Empty:
                raise ClientError(f"no event for {self.request_id} within {timeout_s}s") from None
            if isinstance(event, P.Tokens):
                yield event
            if event is _END:
                return

    async def events_async(self) -> AsyncIterator[P._Msg]:
        """Every event (verdict, tokens, error) as an async iterator, for asyncio servers."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        self.add_callback(lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        while True:
            event = await events.get()
            if event is _END:
                return
            yield event

    def add_callback(self, callback: Callable[[P._Msg], None]) -> None:
        """Call `callback(event)` from the I/O thread for every later event (and `_END`). Events
        delivered before the call are replayed first."""
        with _CALLBACK_LOCK:
            replay = list(self._events.queue)
            self._callbacks.append(callback)
        for event in replay:
            callback(event)

    def record(self) -> RequestRecord:
        """The request's outcome on the client's clock, for reports (lab.report)."""
        verdict = Verdict(self.verdict_msg.verdict) if self.verdict_msg else None
        return RequestRecord(
            request=self._request(),
            verdict=verdict,
            replica_id=self.verdict_msg.replica_id if self.verdict_msg else None,
            token_times_s=list(self.token_times_s),
            finished=self.finished,
        )

    def _request(self) -> Request:
        msg = self.verdict_msg
        submit = self.submit
        if msg is not None and msg.ttft_slo_s > 0 and msg.tpot_s > 0:
            slo = SLO(tpot_s=msg.tpot_s, ttft_s=msg.ttft_slo_s, thinking_tpot_s=msg.thinking_tpot_s)
            ttft_slo_s = msg.ttft_slo_s
        else:  # never decided: keep a placeholder SLO; the record attains nothing anyway
            slo = SLO(tpot_s=1.0, ttft_s=1.0)
            ttft_slo_s = 1.0
        return Request(
            request_id=submit.request_id,
            arrival_s=self.arrival_s,
            num_prompt_tokens=submit.prompt_length,
            # A request that ended early (EOS, a stop) is as long as what it produced.
            num_output_tokens=len(self.token_times_s) if self.finished else submit.max_tokens,
            slo=slo,
            ttft_slo_s=ttft_slo_s,
            slo_class=submit.slo_class,
            num_thinking_tokens=min(
                msg.num_thinking_tokens if msg else submit.thinking_tokens,
                len(self.token_times_s) if self.finished else submit.max_tokens,
            ),
            value=submit.value,
            chain_id=submit.chain_id,
            round_index=submit.round_index,
            chain_last_round=submit.chain_last_round and submit.chain_id is not None,
        )

    def _deliver(self, event: P._Msg | object, now_s: float) -> None:
        """Called by the I/O thread."""
        if isinstance(event, P.VerdictMsg):
            self.verdict_msg = event
            self._decided.set()
        elif isinstance(event, P.Tokens):
            self.token_times_s.extend([now_s] * event.num_tokens)
            self.token_ids.extend(event.token_ids)
            self.ended_with_last_token = event.finished
        elif isinstance(event, P.ErrorMsg):
            self.error = event.reason
            self._decided.set()
        with _CALLBACK_LOCK:
            self._events.put(event)
            callbacks = list(self._callbacks)
        for callback in callbacks:
            callback(event)
        ends = (
            (isinstance(event, P.Tokens) and event.finished)
            or (isinstance(event, P.VerdictMsg) and event.verdict == Verdict.REJECTED.value)
            or isinstance(event, P.ErrorMsg)
        )
        if ends:
            self._end(now_s)

    def _fail(self, reason: str, kind: str, now_s: float) -> None:
        """End the request with an error the client made up itself (the planner restarted or
        went silent), delivered as an ErrorMsg event like the planner's own, so that every
        consumer (token iterators, async streams, callbacks) sees why it ended."""
        if not self._done.is_set():
            self._deliver(P.ErrorMsg(reason, self.request_id, kind), now_s)

    def _end(self, now_s: float) -> None:
        if self._done.is_set():
            return
        self._done.set()
        self._decided.set()
        with _CALLBACK_LOCK:
            self._events.put(_END)
            callbacks = list(self._callbacks)
        for callback in callbacks:
            callback(_END)


_END = object()  # marks the end of a handle's event stream
_CALLBACK_LOCK = threading.Lock()


class PlannerClient:
    def __init__(
        self,
        endpoint: str = "tcp://127.0.0.1:5558",
        client_id: str | None = None,
        curve: CurveKeys | None = None,
        context: zmq.Context | None = None,
        max_frame_bytes: int = P.DEFAULT_MAX_FRAME_BYTES,
        heartbeat_interval_s: float = 1.0,
        liveness: int = 5,
    ) -> None:
        """Requests still open when the planner has been silent for `liveness` heartbeat
        intervals end with the error "planner unreachable" (the client keeps trying to reach it
        for later requests)."""
        if heartbeat_interval_s <= 0 or liveness < 1:
            raise ValueError("heartbeat_interval_s must be > 0 and liveness >= 1")
        check_endpoint(endpoint, "the planner's client endpoint")
        self.heartbeat_interval_s = heartbeat_interval_s
        self.liveness = liveness
        self.endpoint = endpoint
        self.client_id = client_id or f"client-{uuid.uuid4().hex[:8]}"
        self.max_frame_bytes = max_frame_bytes
        self._context = context or zmq.Context.instance()
        self._curve = curve
        self._t0 = time.monotonic()
        self._outbox: queue.Queue = queue.Queue()
        self._unsent: list[bytes] | None = None  # frames the socket could not take yet
        self._wake_r, self._wake_w = os.pipe()
        self._handles: dict[str, RequestHandle] = {}
        # query id -> the queue its STATS answer goes to; a query that timed out removes itself,
        # so a late answer is dropped instead of reaching the next caller.
        self._stats_waiters: dict[int, queue.Queue] = {}
        self._stats_lock = threading.Lock()
        self._next_query_id = itertools.count(1)
        self._errors: deque[str] = deque(maxlen=1000)  # the latest, not a flood's every line
        self.num_handshake_failures = 0
        self.connection_problem = ""  # why the planner may be silent, when the client knows
        # The planner process last heard (its id in every reply); "" until one answers. A new id
        # means the planner restarted: requests of the old one are lost.
        self.planner_id = ""
        self.num_planner_restarts = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._io_loop, name="planner-client-io", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public API

    def now_s(self) -> float:
        return time.monotonic() - self._t0

    def submit(self, request: P.Submit | None = None, **fields) -> RequestHandle:
        """Submit a `Submit` message, or build one from keyword fields (see protocol.Submit;
        `request_id` defaults to a fresh unique id)."""
        if request is None:
            fields.setdefault("request_id", f"{self.client_id}-{uuid.uuid4().hex[:12]}")
            request = P.Submit(**fields)
        _ = request.prompt_length  # a prompt is required: fail here, not at the planner
        handle = RequestHandle(request, arrival_s=self.now_s(), planner_id=self.planner_id)
        self._handles[request.request_id] = handle
        self._send(request)
        return handle

    def run_tool_chain(
        self,
        chain: ToolChain,
        tool: Callable[[int, RequestHandle], None] | None = None,
        timeout_s: float = 120.0,
        max_model_len: int | None = None,
        **fields,
    ) -> list[RequestHandle]:
        """Run an agent's rounds one after another (blocking; run it in a thread or executor).

        Round k is submitted with the chain's prompt so far (`chain.round_prompt_tokens(k)`), the
        intermediate SLO for all but the last round and the final SLO for the last. Between rounds
        `tool(k, handle)` runs the tool (default: sleep the next round's `tool_delay_s`). The chain
        stops at a round that is not served to the end (rejected, failed or timed out). Each round
        asks for its own output length as `max_tokens`, or, with `max_model_len`, for what is
        left of the context (the engine knows where the round really stops)."""
        handles: list[RequestHandle] = []
        for k, round_ in enumerate(chain.rounds):
            if k > 0:
                if tool is not None:
                    tool(k, handles[-1])
                else:
                    time.sleep(round_.tool_delay_s)
            last = k == chain.num_rounds - 1
            handle = self.submit(
                request_id=f"{chain.chain_id}#r{k}",
                num_prompt_tokens=chain.round_prompt_tokens(k),
                max_tokens=round_.num_output_tokens
                if max_model_len is None
                else max_model_len - chain.round_prompt_tokens(k),
                slo_class=chain.slo_class,
                slo_targets=chain.final_slo if last else chain.intermediate_slo,
                chain_id=chain.chain_id,
                round_index=k,
                chain_last_round=last,
                **fields,
            )
            handles.append(handle)
            if not handle.wait(timeout_s) or not handle.finished:
                break
        return handles

    def abort(self, request_id: str, reason: str = "") -> None:
        self._send(P.Abort(request_id, reason))
        handle = self._handles.get(request_id)
        if handle is not None:
            handle.error = handle.error or "aborted"
            handle._end(self.now_s())

    def stats(self, timeout_s: float = 10.0) -> P.Stats:
        waiter: queue.Queue = queue.Queue()
        query_id = next(self._next_query_id)
        with self._stats_lock:
            self._stats_waiters[query_id] = waiter
        self._send(P.StatsRequest(query_id=query_id))
        try:
            return waiter.get(timeout=timeout_s)
        except queue.Empty:
            raise ClientError(f"no STATS answer within {timeout_s}s") from None
        finally:
            with self._stats_lock:
                self._stats_waiters.pop(query_id, None)

    def send_raw(self, frames: list[bytes]) -> None:
        """Send arbitrary frames (tests of the daemon's input checking)."""
        if self._stop.is_set():
            raise ClientError("the planner client is closed")
        self._outbox.put(frames)
        os.write(self._wake_w, b"x")

    @property
    def errors(self) -> list[str]:
        """ERROR messages not tied to a request (e.g. a rejected frame)."""
        return list(self._errors)

    def handles(self) -> list[RequestHandle]:
        return list(self._handles.values())

    def forget(self, request_id: str) -> None:
        """Drop the client's handle of a request (long-running servers call this when a request
        is over, so that handles do not accumulate). Later messages for it are ignored."""
        self._handles.pop(request_id, None)

    def close(self) -> None:
        """Stop the I/O thread and release the socket; calling it again does nothing."""
        if self._stop.is_set():
            return
        self._stop.set()
        os.write(self._wake_w, b"x")
        self._thread.join(timeout=5)
        os.close(self._wake_r)
        os.close(self._wake_w)

    def __enter__(self) -> PlannerClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ I/O thread

    def _send(self, message: P._Msg) -> None:
        if self._stop.is_set():
            raise ClientError("the planner client is closed")
        self._outbox.put(P.encode(message))
        os.write(self._wake_w, b"x")

    def _io_loop(self) -> None:
        try:
            self._serve_socket()
        except Exception as exc:  # a client bug must not leave requests hanging
            log.exception("the planner client's I/O thread failed")
            self._stop.set()
            self._fail_open(f"planner client failed: {exc}", "client_error")

    def _serve_socket(self) -> None:
        socket = self._context.socket(zmq.DEALER)
        socket.setsockopt(zmq.IDENTITY, self.client_id.encode())
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.MAXMSGSIZE, P.socket_frame_limit(self.max_frame_bytes))
        if self._curve is not None:
            self._curve.apply_client(socket)
        monitor = socket.get_monitor_socket(HANDSHAKE_EVENTS)
        socket.connect(self.endpoint)
        poller = zmq.Poller()
        poller.register(socket, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        self._last_heard_s = self._last_sent_s = time.monotonic()
        poll_ms = max(1, int(1000 * self.heartbeat_interval_s / 2))
        try:
            while not self._stop.is_set():
                events = dict(poller.poll(poll_ms))
                if self._wake_r in events:
                    os.read(self._wake_r, 4096)
                self._flush(socket)
                if socket in events:
                    self._drain(socket)
                    self._flush(socket)  # what handling the replies queued (aborts)
                if monitor in events:
                    self._note_handshake_failures(monitor)
                self._keep_alive(socket)
        finally:
            socket.disable_monitor()
            monitor.close(linger=0)
            socket.close(linger=0)

    def _note_handshake_failures(self, monitor: zmq.Socket) -> None:
        """A failed handshake (wrong CURVE keys, CURVE on one side only) leaves the planner
        silent: remember why, so that the requests that then fail say so."""
        while True:
            try:
                event = recv_monitor_message(monitor, zmq.NOBLOCK)["event"]
            except zmq.Again:
                return
            self.num_handshake_failures += 1
            self.connection_problem = (
                f"the handshake with the planner failed ({handshake_failure_reason(event)}): "
                "check the CURVE keys"
            )

    def _keep_alive(self, socket: zmq.Socket) -> None:
        """Heartbeat the planner (it echoes); fail open requests when it has gone silent."""
        now = time.monotonic()
        if now - self._last_sent_s >= self.heartbeat_interval_s:
            try:
                socket.send_multipart(P.encode(P.Heartbeat(sender_id=self.client_id)), zmq.NOBLOCK)
            except zmq.Again:
                pass  # nobody to talk to; liveness below decides
            self._last_sent_s = now
        if now - self._last_heard_s > self.liveness * self.heartbeat_interval_s:
            problem = f" ({self.connection_problem})" if self.connection_problem else ""
            self._fail_open(f"planner unreachable{problem}", "planner_unreachable")

    def _fail_open(self, reason: str, kind: str, unless_planner: str | None = None) -> None:
        """End every open request (except those of planner `unless_planner`) with an error."""
        now_s = self.now_s()
        for handle in list(self._handles.values()):
            if not handle.done and (unless_planner is None or handle.planner_id != unless_planner):
                handle._fail(reason, kind, now_s)

    def _flush(self, socket: zmq.Socket) -> None:
        """Send what callers queued. Never blocks: while the planner cannot take messages (not
        connected yet, or refused), they wait here and go out on a later turn."""
        while True:
            if self._unsent is None:
                try:
                    self._unsent = self._outbox.get_nowait()
                except queue.Empty:
                    return
            try:
                socket.send_multipart(self._unsent, zmq.NOBLOCK)
            except zmq.Again:
                return
            self._unsent = None
            self._last_sent_s = time.monotonic()

    def _drain(self, socket: zmq.Socket) -> None:
        while True:
            try:
                frames = socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            now_s = self.now_s()
            self._last_heard_s = time.monotonic()
            self.connection_problem = ""
            try:
                message = P.decode(frames, P.PLANNER_TO_CLIENT, self.max_frame_bytes)
            except P.ProtocolError as exc:
                self._errors.append(f"bad frame from planner: {exc}")
                continue
            self._route(message, now_s)

    def _route(self, message: P._Msg, now_s: float) -> None:
        request_id = getattr(message, "request_id", "")
        handle = self._handles.get(request_id) if request_id else None
        planner_id = getattr(message, "planner_id", "")
        if planner_id:
            if handle is not None and not handle.done:
                handle.planner_id = planner_id  # it lives there, whoever it was sent to
            self._notice_planner(planner_id)
        if isinstance(message, P.Stats):
            with self._stats_lock:
                waiter = self._stats_waiters.get(message.query_id)
            if waiter is not None:
                waiter.put(message)
            return
        if handle is not None and not handle.done:
            handle._deliver(message, now_s)
        elif isinstance(message, P.VerdictMsg) and message.verdict != Verdict.REJECTED.value:
            # admitted for nobody (given up on, or failed by a restart meanwhile): stop it
            self._send_now(P.Abort(request_id, "the client no longer waits for it"))
        elif isinstance(message, P.ErrorMsg) and handle is None:
            self._errors.append(message.reason)

    def _notice_planner(self, planner_id: str) -> None:
        """A reply from planner `planner_id`. If it is not the one heard before, the planner
        restarted: the new one knows none of the old one's requests, so they end now with an
        error (and an ABORT, in case one reached the new planner after all)."""
        previous = self.planner_id
        self.planner_id = planner_id
        if not previous or previous == planner_id:
            return
        self.num_planner_restarts += 1
        log.warning(
            "the planner restarted (%s -> %s); failing its open requests", previous, planner_id
        )
        lost = [h for h in self._handles.values() if not h.done and h.planner_id != planner_id]
        self._fail_open(
            f"the planner restarted (instance {previous} -> {planner_id}); the request was lost",
            "planner_restarted",
            unless_planner=planner_id,
        )
        for handle in lost:
            self._send_now(P.Abort(handle.request_id, "lost in a planner restart"))

    def _send_now(self, message: P._Msg) -> None:
        """Queue a message from the I/O thread itself (it flushes on its next turn)."""
        self._outbox.put(P.encode(message))
