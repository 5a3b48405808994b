"""The planner daemon: the planner core on the wall clock, behind two ZeroMQ ROUTER sockets.

    engines  --DEALER-->  [ROUTER engine_endpoint]  \
                                                      planner loop: observe -> plan -> send
    clients  --DEALER-->  [ROUTER client_endpoint]  /

The loop is one thread with a bounded poll (never an infinite wait): it drains both sockets,
feeds every event to the core with the daemon's clock (`now_s`, seconds since start), and sends the
core's plans to engines and verdicts / tokens to clients at once. Every engine report is answered
at once (with the plan it caused or an acknowledgement), and engines are told ahead when a re-plan
is likely (the core says so in its output), so that plans start on time (docs/SERVICE.md,
"Plans in time").

Every frame is decoded against the types expected on its socket (`protocol.decode`); a frame that
fails is counted (metrics `slos_rejected_frames`), answered with ERROR, and dropped: the daemon
stays up. An engine that has been silent for `liveness` heartbeat intervals is declared dead and
the core re-plans its requests on the remaining replicas (recompute): every request either
finishes or gets an explicit verdict. An engine that leaves on purpose says GOODBYE and is removed
the same way at once.

Tool chains' kept KV (docs/AGENTS.md): an engine whose READY says `kv_retention` (and the config's
`kv_retention`, default on) gets a replica that keeps KV between a chain's rounds; the core's
`kv_releases` go to it as RELEASE_KV. A dead engine's kept KV dies with its replica in the core.
"""

from __future__ import annotations

import errno
import inspect
import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

import msgspec
import zmq
from zmq.utils.monitor import recv_monitor_message

from formulations import registry
from formulations.lengths import make_predictor
from formulations.perf_model import PerfModel
from formulations.plan import Decision, Verdict
from formulations.refit import RefitParams
from formulations.request import Request
from planner_svc.chains import ChainStats
from planner_svc.client_liveness import ClientLiveness
from planner_svc.config import PlannerConfig
from planner_svc.core import EXPIRED_REASON, PlannerCore
from planner_svc.metrics import PlannerMetrics
from planner_svc.outcome import CoreOutput
from planner_svc.records import RequestRecord
from planner_svc.replica import ReplicaSpec
from planner_svc.request_book import Judgement, RequestBook, Tracked
from planner_svc.router import make_router
from planner_svc.triggers import ReplanPolicy
from wire import protocol as P
from wire.rate_limited_log import RateLimitedLog
from wire.security import HANDSHAKE_EVENTS, handshake_failure_reason

log = logging.getLogger("slos_serve.daemon")
MONITORED_EVENTS = HANDSHAKE_EVENTS | zmq.EVENT_DISCONNECTED
# A verdict needs this long after it is made to reach its client: the rest of the loop turn and
# a loopback hop (well under a millisecond when idle; a few milliseconds on a busy 2-core
# machine in a burst, docs/BENCHMARKS.md, section soak).
VERDICT_DELIVERY_SLACK_S = 0.010
RECENT_CALLS = 32  # core calls whose longest duration predicts the next one's
CALL_SAFETY_FACTOR = 2.0  # measured at 10x the chatbot capacity: 1.0 left 4 of 468 verdicts late
POLL_WAITED_S = 0.0005  # a poll that took longer found nothing to read at first


@dataclass
class EngineLink:
    """One connected engine (one DEALER identity)."""

    identity: bytes
    engine_id: str
    replica_id: int
    perf_model: PerfModel
    last_heard_s: float
    last_sent_s: float = 0.0
    sent_request_ids: set[str] = field(default_factory=set)
    last_step_time_s: float = 0.0
    engine_instance: str = ""  # Ready.engine_instance
    replan_expected_sent: bool | None = None  # the last `replan_expected` told to the engine
    num_drifts_exported: int = 0  # refit drifts already counted in the metrics


class PlannerDaemon:
    def __init__(self, config: PlannerConfig, context: zmq.Context | None = None):
        self.config = config
        registry.create(config.formulation, **config.formulation_params)  # bad name/params: now
        make_router(config.router, config.max_forwards)
        _check_core_params(config.core_params)
        self.core: PlannerCore | None = None  # made when the first engine connects
        # Says to clients and engines which planner process they talk to: a new id means a
        # restart, and that requests known to the old one will never end here.
        self.planner_id = uuid.uuid4().hex[:12]
        self.context = context or zmq.Context.instance()
        self.metrics = PlannerMetrics()
        self.stop_event = threading.Event()
        self.engines: dict[bytes, EngineLink] = {}  # by identity
        self.book = RequestBook(config.slo_classes, config.perf_model, config.max_ended_history)
        self.num_rejected_frames = 0
        self.num_moved_requests = 0  # registered on another engine after theirs died
        self._next_replica_id = 0
        self._t0 = time.monotonic()
        self._last_tick_s = 0.0
        self._last_gauges_s = 0.0
        self._last_client_check_s = 0.0
        self._recent_call_s: deque[float] = deque(maxlen=RECENT_CALLS)  # core call durations
        self._seen_empty_s: dict[zmq.Socket, float] = {}  # socket -> when last seen empty
        self.clients = ClientLiveness(config.client_timeout_s)
        self._authenticator = None
        self._log = RateLimitedLog(log)  # what peers can make us log at will
        warm_up(config)
        self.engine_socket, self.client_socket = self._bind()
        # socket-monitor PAIR socket -> the side it watches (failed handshakes, disconnects)
        self._monitors = {
            self.engine_socket.get_monitor_socket(MONITORED_EVENTS): "engine",
            self.client_socket.get_monitor_socket(MONITORED_EVENTS): "client",
        }

    # ------------------------------------------------------------------ lifecycle

    def now_s(self) -> float:
        return time.monotonic() - self._t0

    def _heartbeat(self, now_s: float, **fields) -> P.Heartbeat:
        return P.Heartbeat(sender_id="planner", sent_s=now_s, planner_id=self.planner_id, **fields)

    def _bind(self) -> tuple[zmq.Socket, zmq.Socket]:
        """Both ROUTER sockets, bound. A bind that fails (the port is taken) closes what was
        opened and raises a one-line ValueError."""
        sockets: list[zmq.Socket] = []
        if self.config.curve is not None:
            self._start_authenticator()
        endpoints = {"engine": self.config.engine_endpoint, "client": self.config.client_endpoint}
        for side, endpoint in endpoints.items():
            socket = self.context.socket(zmq.ROUTER)
            sockets.append(socket)
            socket.setsockopt(zmq.LINGER, 0)
            socket.setsockopt(zmq.ROUTER_HANDOVER, 1)
            # ZeroMQ drops a peer that sends a frame over this before reading it: a 100 MB frame
            # never reaches memory. Frames a little over max_frame_bytes are still read, to be
            # answered and counted as oversized.
            socket.setsockopt(zmq.MAXMSGSIZE, P.socket_frame_limit(self.config.max_frame_bytes))
            if self.config.curve is not None:
                socket.curve_secretkey = self.config.curve.secret_key.encode()
                socket.curve_publickey = self.config.curve.public_key.encode()
                socket.curve_server = True
            try:
                socket.bind(endpoint)
            except zmq.ZMQError as exc:
                for opened in sockets:
                    opened.close(linger=0)
                if self._authenticator is not None:
                    self._authenticator.stop()
                hint = " (is another planner running?)" if exc.errno == errno.EADDRINUSE else ""
                raise ValueError(
                    f"cannot bind the {side} endpoint {endpoint}: {exc.strerror}{hint}"
                ) from None
        return sockets[0], sockets[1]

    def _start_authenticator(self) -> None:
        from zmq.auth.thread import ThreadAuthenticator

        allowed = self.config.curve.allowed_client_keys
        self._authenticator = ThreadAuthenticator(self.context)
        self._authenticator.start()

        class _Keys:  # CURVE callback: which peer public keys (Z85) may connect
            def callback(self, domain: str, z85_key: bytes) -> bool:
                return not allowed or z85_key.decode() in allowed

        self._authenticator.configure_curve_callback("*", credentials_provider=_Keys())

    @property
    def engine_endpoint(self) -> str:
        return self.engine_socket.getsockopt_string(zmq.LAST_ENDPOINT)

    @property
    def client_endpoint(self) -> str:
        return self.client_socket.getsockopt_string(zmq.LAST_ENDPOINT)

    def serve_metrics(self) -> None:
        if self.config.metrics_port:
            self.metrics.serve(self.config.metrics_port, self.config.metrics_address)

    def run(self) -> None:
        """Serve until `stop_event` is set."""
        poller = zmq.Poller()
        poller.register(self.engine_socket, zmq.POLLIN)
        poller.register(self.client_socket, zmq.POLLIN)
        for monitor in self._monitors:
            poller.register(monitor, zmq.POLLIN)
        try:
            while not self.stop_event.is_set():
                poll_start_s = self.now_s()
                events = dict(poller.poll(self._poll_timeout_ms()))
                self._note_empty_sockets(events, poll_start_s)
                if self.engine_socket in events:
                    self._drain(self.engine_socket, self._on_engine_frames)
                if self.client_socket in events:
                    self._drain(self.client_socket, self._on_client_frames)
                for monitor, side in self._monitors.items():
                    if monitor in events:
                        self._on_monitor_events(monitor, side)
                self._housekeeping()
        finally:
            self.close()

    def stop(self) -> None:
        self.stop_event.set()

    def close(self) -> None:
        for socket in (self.engine_socket, self.client_socket):
            socket.disable_monitor()
        for monitor in self._monitors:
            monitor.close(linger=0)
        self.engine_socket.close(linger=0)
        self.client_socket.close(linger=0)
        if self._authenticator is not None:
            self._authenticator.stop()

    def _poll_timeout_ms(self) -> int:
        """Sleep until the core's next timer (never sooner than `tick_interval_s` after the last
        tick, so that a timer the core leaves due cannot spin the loop), at most half a
        heartbeat interval."""
        wait_s = self.config.heartbeat_interval_s / 2
        if self.core is None:
            return int(wait_s * 1000) + 1
        now_s = self.now_s()
        due_s = self.core.next_timer_s()
        if due_s is not None:
            next_tick_s = max(due_s, self._last_tick_s + self.config.tick_interval_s)
            wait_s = min(wait_s, max(0.0, next_tick_s - now_s))
        verdict_due_s = self.core.next_verdict_deadline_s()
        if verdict_due_s is not None:  # wake for _expire_soon
            wait_s = min(wait_s, max(0.0, verdict_due_s - self._verdict_margin_s() - now_s))
        return int(wait_s * 1000) + 1

    def _note_empty_sockets(self, events: dict, poll_start_s: float) -> None:
        """Remember when each socket was last seen empty: a message received later arrived
        after that (`_arrival_floor_s`). A socket that is not readable is empty now; after a
        poll that had to wait, the one that ended the wait was empty until just now."""
        now_s = self.now_s()
        waited = now_s - poll_start_s > POLL_WAITED_S
        for socket in (self.engine_socket, self.client_socket):
            if socket not in events or waited:
                self._seen_empty_s[socket] = now_s

    def _drain(self, socket: zmq.Socket, handle, max_messages: int = 1000) -> None:
        """Receive what is queued (bounded, so that one flooding peer cannot starve the loop)."""
        for _ in range(max_messages):
            try:
                frames = socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                self._seen_empty_s[socket] = self.now_s()
                return
            handle(frames)

    def _on_monitor_events(self, monitor: zmq.Socket, side: str) -> None:
        """Count (and log, rate-limited) failed handshakes and closed connections: a peer with
        the wrong CURVE keys, or one that does not speak ZeroMQ, gets nothing back, so this is
        the only place it shows."""
        for _ in range(1000):
            try:
                event = recv_monitor_message(monitor, zmq.NOBLOCK)["event"]
            except zmq.Again:
                return
            if event == zmq.EVENT_DISCONNECTED:
                self.metrics.disconnects.labels(side).inc()
                continue
            reason = handshake_failure_reason(event)
            self.metrics.handshake_failures.labels(side, reason).inc()
            self._log.warning(
                f"{side} handshake",
                "a peer failed the %s socket's handshake (%s)%s",
                side,
                reason,
                ": check its CURVE keys" if self.config.curve is not None else "",
            )

    def _housekeeping(self) -> None:
        now_s = self.now_s()
        self._log.tick()
        self._check_engines(now_s)
        self._check_clients(now_s)
        self._expire_soon(now_s)
        if self.core is None:
            return
        if now_s - self._last_gauges_s >= self.config.heartbeat_interval_s / 2:
            self._last_gauges_s = now_s
            self._update_queue_gauges()
        if now_s - self._last_tick_s < self.config.tick_interval_s:
            return
        due_s = self.core.next_timer_s()
        if due_s is not None and due_s <= now_s:
            self._last_tick_s = now_s
            self._apply("tick", self.core.tick, now_s)

    def _update_queue_gauges(self) -> None:
        self.metrics.queue_length.set(self.book.num_in_flight)
        for replica_id, (num_running, num_waiting) in self.core.queue_lengths().items():
            self.metrics.replica_requests.labels(str(replica_id), "running").set(num_running)
            self.metrics.replica_requests.labels(str(replica_id), "waiting").set(num_waiting)
        for link in self.engines.values():
            status = self.core.refit_status(link.replica_id)
            if status is not None:
                new_drifts = status.num_drifts - link.num_drifts_exported
                link.num_drifts_exported = status.num_drifts
                self.metrics.record_refit(link.engine_id, status, new_drifts)

    # ------------------------------------------------------------------ engines

    def _on_engine_frames(self, frames: list[bytes]) -> None:
        identity, body = frames[0], frames[1:]
        try:
            message = P.decode(body, P.ENGINE_TO_PLANNER, self.config.max_frame_bytes)
        except P.ProtocolError as exc:
            self._reject_frame(self.engine_socket, "engine", identity, exc)
            return
        now_s = self.now_s()
        link = self.engines.get(identity)
        if isinstance(message, P.Ready):
            self._on_ready(identity, message, now_s)
            return
        if link is None:  # a dead or unknown engine: it must READY again
            self._reject_frame(
                self.engine_socket,
                "engine",
                identity,
                P.ProtocolError("unknown engine: send READY first", "no_ready"),
            )
            return
        link.last_heard_s = now_s
        if isinstance(message, P.StepReport):
            self._on_progress(link, message, now_s)
        elif isinstance(message, P.Goodbye):
            self._declare_dead(link, now_s, f"left: {message.reason}" if message.reason else "left")

    def _on_ready(self, identity: bytes, ready: P.Ready, now_s: float) -> None:
        refusal = self._ready_refusal(identity, ready)
        if refusal is not None:
            self._reject_frame(self.engine_socket, "engine", identity, refusal)
            return
        try:
            perf_model = self._perf_model_of(ready)
            spec = ReplicaSpec(
                replica_id=self._next_replica_id,
                perf_model=perf_model,
                num_total_blocks=ready.num_total_blocks,
                block_size=ready.block_size,
                max_spec_tokens=ready.max_spec_tokens,
                kv_retention=ready.kv_retention and self.config.kv_retention,
                kv_host_blocks=ready.kv_host_blocks,
                kv_swap_s_per_token=ready.kv_swap_s_per_token,
            )
        except ValueError as exc:
            self._reject_frame(
                self.engine_socket, "engine", identity, P.ProtocolError(str(exc), "bad_ready")
            )
            return
        for old in [
            lk
            for lk in self.engines.values()
            if lk.identity == identity or lk.engine_id == ready.engine_id
        ]:  # the same engine on a fresh socket: its old connection is over
            self._declare_dead(old, now_s, "reconnected")
        self._next_replica_id += 1
        link = EngineLink(
            identity,
            ready.engine_id,
            spec.replica_id,
            perf_model,
            last_heard_s=now_s,
            engine_instance=ready.engine_instance,
        )
        self.engines[identity] = link
        self.metrics.engines.set(len(self.engines))
        log.info(
            "engine %s ready as replica %d (%s)", ready.engine_id, spec.replica_id, perf_model.name
        )
        self._send_engine(link, self._heartbeat(now_s))
        if self.core is None:
            try:
                self.core = build_core(self.config, spec)
            except Exception as exc:  # keep serving; the engine is told why
                log.exception("cannot build the planner core")
                self.engines.pop(identity, None)
                self._reject_frame(
                    self.engine_socket,
                    "engine",
                    identity,
                    P.ProtocolError(f"planner core: {exc}", "planner_error"),
                )
        else:
            self._apply("add_replica", self.core.add_replica, spec, now_s)

    def _ready_refusal(self, identity: bytes, ready: P.Ready) -> P.ProtocolError | None:
        """Why a READY is refused, if it is: another protocol version, or an engine id that a
        live engine of another process already uses (a reconnect of the same process, or an
        engine that sends no instance, replaces its old connection instead)."""
        if ready.protocol_version != P.PROTOCOL_VERSION:
            return P.ProtocolError(
                f"protocol version {ready.protocol_version} != {P.PROTOCOL_VERSION}", "version"
            )
        for link in self.engines.values():
            if (
                link.engine_id == ready.engine_id
                and link.identity != identity
                and ready.engine_instance
                and link.engine_instance
                and link.engine_instance != ready.engine_instance
            ):
                self._log.error(
                    "duplicate engine id",
                    "refused a second engine with the id %r (replica %d has it): "
                    "every engine needs its own --engine-id",
                    ready.engine_id,
                    link.replica_id,
                )
                return P.ProtocolError(
                    f"engine id {ready.engine_id!r} is already used by a live engine "
                    f"(replica {link.replica_id}); give every engine its own --engine-id",
                    "duplicate_engine_id",
                )
        return None

    def _perf_model_of(self, ready: P.Ready) -> PerfModel:
        """The engine's own model (a profiled engine knows its step times best), else the
        config's `[[replicas]]` row for its id, else the default."""
        configured = self.config.perf_model_for(ready.engine_id)
        if ready.perf_model is None:
            return configured or self.config.perf_model
        if configured is not None:
            log.warning(
                "engine %s sent its own performance model; the config's [[replicas]] row for "
                "it applies only to engines that send none",
                ready.engine_id,
            )
        return P.perf_model_from_wire(ready.perf_model)

    def _on_progress(self, link: EngineLink, report: P.StepReport, now_s: float) -> None:
        """Feed the report to the core and answer it at once: with the new plan it caused, or
        with an acknowledgement, so that the engine need not wait out its grace period. The
        report keeps the engine's step length and gets the planner's clock."""
        step_time_s = report.step_time_s
        report = msgspec.structs.replace(report, start_s=now_s - step_time_s, end_s=now_s)
        link.last_step_time_s = step_time_s
        output = self._call("on_step", self.core.on_step, link.replica_id, report, now_s)
        self._send_output(output, now_s, answer=(link, report.step_id))
        self._stream_tokens(report, now_s)  # after the engine's answer: it is the one waiting
        self.metrics.step_time_measured.labels(link.engine_id).observe(step_time_s)

    def _check_engines(self, now_s: float) -> None:
        """Declare dead the engines silent for `liveness` heartbeat intervals, measured up to the
        last time the engine socket was seen empty: while long core calls keep the loop from
        reading, an engine's heartbeats wait unread in the socket and it is not silent."""
        silence_limit_s = self.config.liveness * self.config.heartbeat_interval_s
        read_up_to_s = min(now_s, self._seen_empty_s.get(self.engine_socket, now_s))
        for link in list(self.engines.values()):
            if read_up_to_s - link.last_heard_s > silence_limit_s:
                self._declare_dead(link, now_s, "silent")
            elif now_s - link.last_sent_s >= self.config.heartbeat_interval_s:
                self._send_engine(link, self._heartbeat(now_s))

    def _declare_dead(self, link: EngineLink, now_s: float, why: str) -> None:
        """Forget the engine; the core moves its requests to the other replicas (recompute)."""
        log.warning(
            "engine %s (replica %d) is gone (%s); re-planning its requests",
            link.engine_id,
            link.replica_id,
            why,
        )
        self.engines.pop(link.identity, None)
        if not why.startswith("left"):  # a GOODBYE is a departure, not a death
            self.metrics.engine_deaths.inc()
        self.metrics.engines.set(len(self.engines))
        self.metrics.forget_engine(link.engine_id, link.replica_id)
        if self.core is not None:
            self._apply("remove_replica", self.core.remove_replica, link.replica_id, now_s)

    def _send_engine(self, link: EngineLink, message: P._Msg) -> None:
        self.engine_socket.send_multipart([link.identity, *P.encode(message)])
        link.last_sent_s = self.now_s()

    def _link_of(self, replica_id: int | None) -> EngineLink | None:
        return next((lk for lk in self.engines.values() if lk.replica_id == replica_id), None)

    # ------------------------------------------------------------------ clients

    def _on_client_frames(self, frames: list[bytes]) -> None:
        identity, body = frames[0], frames[1:]
        try:
            message = P.decode(body, P.CLIENT_TO_PLANNER, self.config.max_frame_bytes)
        except P.ProtocolError as exc:
            self._reject_frame(self.client_socket, "client", identity, exc)
            return
        now_s = self.now_s()
        self.clients.heard(identity, now_s)
        if isinstance(message, P.Submit):
            self._on_submit(identity, message, now_s)
        elif isinstance(message, P.Abort):
            self._on_abort(message, now_s)
        elif isinstance(message, P.StatsRequest):
            stats = msgspec.structs.replace(self.stats(), query_id=message.query_id)
            self._send_client(identity, stats)
        elif isinstance(message, P.Heartbeat):
            self._send_client(identity, self._heartbeat(now_s))

    def _on_submit(self, client: bytes, submit: P.Submit, now_s: float) -> None:
        if submit.request_id in self.book:
            self._send_client(
                client,
                P.ErrorMsg(
                    f"duplicate request id {submit.request_id!r}",
                    submit.request_id,
                    planner_id=self.planner_id,
                ),
            )
            return
        try:
            # Its arrival: the last time the socket was seen empty. It may have waited in the
            # socket behind a long core call; that wait counts against its TTFT budget, as it
            # does for the client, so that its verdict still comes in time (docs/SERVICE.md).
            arrival_s = self._seen_empty_s.get(self.client_socket, now_s)
            tracked = self.book.add(submit, client, arrival_s)
            self.clients.opened(client, submit.request_id)
        except ValueError as exc:
            self._reject_frame(
                self.client_socket,
                "client",
                client,
                P.ProtocolError(str(exc), "bad_request"),
                submit.request_id,
            )
            return
        if not self.engines or self.core is None:
            decision = Decision(Verdict.REJECTED, "no engine is connected")
            self._decide(tracked, decision, None, P.VERDICT_NO_ENGINE)
            return
        if self._too_late_to_decide(tracked.request, now_s):
            self._decide(tracked, Decision(Verdict.REJECTED, EXPIRED_REASON), None)
            return
        payload = P.EngineRequest(
            request_id=submit.request_id,
            num_prompt_tokens=tracked.request.num_prompt_tokens,
            max_new_tokens=submit.max_tokens,
            prompt_token_ids=submit.prompt_token_ids,
            temperature=submit.temperature,
            top_p=submit.top_p,
            seed=submit.seed,
            ignore_eos=submit.ignore_eos,
        )
        self._send_output(
            self._call("submit", self.core.submit, tracked.request, now_s, payload), now_s
        )

    def _too_late_to_decide(self, request: Request, now_s: float) -> bool:
        """A request that arrives (it waited in the socket behind core calls) with less than the
        verdict margin of its TTFT budget left cannot be decided and started in time: with the
        default fallback ("reject") and a formulation with admission control it is rejected at
        once, as the core would do at its deadline (a best-effort fallback is the core's to
        apply)."""
        core = self.core
        return (
            core.fallback == "reject"
            and any(core.replica(i).admission_control for i in core.replica_ids)
            and request.ttft_deadline_s <= now_s + self._verdict_margin_s()
        )

    def _on_abort(self, abort: P.Abort, now_s: float) -> None:
        tracked = self.book.get(abort.request_id)
        if tracked is None or tracked.done:
            return
        self._abort(tracked, now_s)

    def _abort(self, tracked: Tracked, now_s: float) -> None:
        """End a request its client gave up on, and free its engine (the core's output tells
        the engine, before `_finish` forgets where the request was sent)."""
        if self.core is not None:
            self._apply("abort", self.core.abort, tracked.request.request_id, now_s)
        self._finish(tracked, aborted=True)

    def _check_clients(self, now_s: float) -> None:
        """Abort the open requests of clients silent for `client_timeout_s`
        (planner_svc/client_liveness.py)."""
        if now_s - self._last_client_check_s < self.config.heartbeat_interval_s:
            return
        self._last_client_check_s = now_s
        read_up_to_s = min(now_s, self._seen_empty_s.get(self.client_socket, now_s))
        for client, silent_s, open_ids in self.clients.silent(read_up_to_s):
            if not open_ids:
                continue
            self.metrics.client_timeouts.inc()
            self._log.warning(
                "client timeout",
                "client %r silent for %.0f s: aborting its %d open request(s)",
                client[:64],
                silent_s,
                len(open_ids),
            )
            for request_id in open_ids:
                tracked = self.book.get(request_id)
                if tracked is not None and not tracked.done:
                    self._abort(tracked, now_s)

    def _send_client(self, client: bytes, message: P._Msg) -> None:
        self.client_socket.send_multipart([client, *P.encode(message)])

    # ------------------------------------------------------------------ core output

    def _call(self, event: str, call, *args) -> CoreOutput:
        """Run one core call (first giving the fallback verdict to requests the call would
        leave without one past their TTFT target)."""
        self._expire_soon(self.now_s())
        return self._timed_call(event, call, *args)

    def _timed_call(self, event: str, call, *args) -> CoreOutput:
        """Run one core call and time it. A planner bug must not take the service down: it is
        logged loudly and counted, and the call decides nothing."""
        start_s = time.perf_counter()
        try:
            output = call(*args)
        except Exception:
            log.exception("planner core failed on %s", event)
            self.metrics.core_errors.inc()
            return CoreOutput()
        elapsed_s = time.perf_counter() - start_s
        self._recent_call_s.append(elapsed_s)
        self.metrics.replan_time.labels(event).observe(elapsed_s)
        return output

    def _verdict_margin_s(self) -> float:
        """How long before a request's TTFT deadline it must be decided for the verdict to reach
        its client in time: twice the longest recent core call (nothing is sent during a call,
        and in a burst the next one may take longer than any before: a DP's cost grows with the
        queue) plus the loop turn and the loopback hop."""
        return VERDICT_DELIVERY_SLACK_S + CALL_SAFETY_FACTOR * max(self._recent_call_s, default=0.0)

    def _expire_soon(self, now_s: float) -> None:
        """Timely verdicts: a request still undecided within the verdict margin of its TTFT
        deadline gets the fallback verdict now (PlannerCore.expire_undecided) rather than
        after the deadline (at the core's own expiry, or from a re-plan that ends too late)."""
        if self.core is None:
            return
        due_s = self.core.next_verdict_deadline_s()
        margin_s = self._verdict_margin_s()
        if due_s is not None and due_s <= now_s + margin_s:
            output = self._timed_call("expire", self.core.expire_undecided, now_s + margin_s, now_s)
            self._send_output(output, now_s)

    def _apply(self, event: str, call, *args) -> None:
        """Run one core call and send what it decided (`args[-1]` is the time)."""
        self._send_output(self._call(event, call, *args), args[-1])

    def _send_output(
        self, output: CoreOutput, now_s: float, answer: tuple[EngineLink, int] | None = None
    ) -> None:
        """Send what the core decided. `answer`: the engine report this output answers; its plan
        (or, when the report caused none, a heartbeat) carries the acknowledgement."""
        for request_id, replica_id, decision in output.verdicts:
            tracked = self.book.get(request_id)
            if tracked is not None:
                self._decide(tracked, decision, replica_id)
        for request_id, reason in output.failed:  # nowhere left to run it: an explicit verdict
            tracked = self.book.get(request_id)
            if tracked is not None and not tracked.done:
                decision = Decision(Verdict.REJECTED, f"lost: {reason}")
                self._decide(tracked, decision, None, P.VERDICT_LOST)
        for request_id, replica_id in output.aborts:
            link = self._link_of(replica_id)
            if link is not None and request_id in link.sent_request_ids:
                self._send_engine(link, P.Abort(request_id, "planner abort"))
        self._send_releases(output)
        answered = None
        for replica_id, plan in output.plans.items():
            ack = answer[1] if answer is not None and answer[0].replica_id == replica_id else None
            if self._send_plan(replica_id, plan, ack, output.replan_expected.get(replica_id)):
                answered = answered or (ack is not None)
        if answer is not None and not answered and answer[0].identity in self.engines:
            link, step_id = answer
            flag = output.replan_expected.get(link.replica_id)
            self._send_engine(
                link, self._heartbeat(now_s, ack_step_id=step_id, replan_expected=flag)
            )
            link.replan_expected_sent = flag
        for link in list(self.engines.values()):  # outlooks that changed without a plan
            flag = output.replan_expected.get(link.replica_id)
            if flag is not None and flag != link.replan_expected_sent:
                self._send_engine(link, self._heartbeat(now_s, replan_expected=flag))
                link.replan_expected_sent = flag

    def _send_releases(self, output: CoreOutput) -> None:
        """Kept KV the core released, one RELEASE_KV per engine, sent before this output's plans
        (an engine gone has taken its KV with it)."""
        by_replica: dict[int, list[str]] = {}
        for chain_id, replica_id in output.kv_releases:
            by_replica.setdefault(replica_id, []).append(chain_id)
        for replica_id, chain_ids in by_replica.items():
            link = self._link_of(replica_id)
            if link is not None:
                self._send_engine(link, P.ReleaseKV(tuple(dict.fromkeys(chain_ids))))
                self.metrics.kv_releases.inc(len(chain_ids))

    def _decide(
        self, tracked: Tracked, decision: Decision, replica_id: int | None, code: str = ""
    ) -> None:
        """Tell the client; `code` names a rejection the service caused (VerdictMsg.code)."""
        record = tracked.record
        request = tracked.request
        if record.verdict is None:  # the first verdict (a request lost later gets a second)
            delay_s = self.now_s() - request.arrival_s
            self.metrics.verdict_delay.observe(delay_s / request.ttft_slo_s)
        record.verdict = decision.verdict
        record.replica_id = replica_id if replica_id is not None else record.replica_id
        self.book.count_verdict(decision.verdict)
        label = self.book.class_label(request.slo_class)
        self.metrics.verdicts.labels(decision.verdict.value, label).inc()
        if decision.reason == EXPIRED_REASON:
            code = P.VERDICT_TTFT_PASSED
        self._send_client(
            tracked.client,
            P.VerdictMsg(
                request_id=request.request_id,
                verdict=decision.verdict.value,
                reason=decision.reason,
                replica_id=replica_id,
                arrival_s=request.arrival_s,
                ttft_slo_s=request.ttft_slo_s,
                tpot_s=request.slo.tpot_s,
                thinking_tpot_s=request.slo.thinking_tpot_s,
                num_thinking_tokens=request.num_thinking_tokens,
                planner_id=self.planner_id,
                code=code,
            ),
        )
        if decision.verdict is Verdict.REJECTED:
            self._finish(tracked)

    def _send_plan(
        self, replica_id: int, plan: P.PlanMsg, ack_step_id: int | None, flag: bool | None
    ) -> bool:
        """Send a plan to its engine; False when that engine is gone (its removal re-plans)."""
        link = self._link_of(replica_id)
        if link is None:
            return False
        for payload in plan.new_requests:
            link.sent_request_ids.add(payload.request_id)
            tracked = self.book.get(payload.request_id)
            if tracked is None:
                continue
            record = tracked.record
            if record.replica_id is not None and record.replica_id != replica_id:
                self.num_moved_requests += 1
            record.replica_id = replica_id
        if ack_step_id is not None or flag is not None:
            plan = msgspec.structs.replace(plan, ack_step_id=ack_step_id, replan_expected=flag)
            link.replan_expected_sent = flag if flag is not None else link.replan_expected_sent
        self._send_engine(link, plan)
        self.metrics.plans_sent.inc()
        replica = self.core.replica(replica_id)  # its model may have been refitted since READY
        model, context = replica.spec.perf_model, replica.context_estimate()
        for step in plan.steps:
            self.metrics.step_time_predicted.labels(link.engine_id).observe(
                model.step_time_s(
                    step.num_batched_tokens, step.spec_steps, context * len(step.num_tokens)
                )
            )
        return True

    def _stream_tokens(self, report, now_s: float) -> None:
        for tracked, message in self.book.record_tokens(report, now_s):
            self._send_client(tracked.client, message)
            if message.finished:
                self._finish(tracked)

    def _finish(self, tracked: Tracked, aborted: bool = False) -> None:
        """The request is over (finished, rejected, lost, or `aborted` by its client): judge and
        count it once (planner_svc/request_book.py says how endings count)."""
        judgement = self.book.finish(tracked, self.now_s(), aborted)
        if judgement is None:
            return
        link = self._link_of(tracked.record.replica_id)
        if link is not None:
            link.sent_request_ids.discard(tracked.request.request_id)
        self.clients.ended(tracked.client, tracked.request.request_id)
        label = self.book.class_label(tracked.request.slo_class)
        if tracked.record.finished:
            self.metrics.finished.labels(label).inc()
        if judgement is Judgement.ATTAINED:
            self.metrics.attained.labels(label).inc()
        if aborted:
            self.metrics.aborted.labels(label).inc()
        counts = self.book.class_counts(label)
        self.metrics.record_attainment(label, counts.num_judged, counts.num_attained)

    def _reject_frame(
        self,
        socket: zmq.Socket,
        side: str,
        identity: bytes,
        exc: P.ProtocolError,
        request_id: str = "",
    ) -> None:
        self.num_rejected_frames += 1
        self.metrics.rejected_frames.labels(side, exc.kind).inc()
        self._log.warning(f"rejected {side} frame", "rejected %s frame: %s", side, exc)
        try:
            socket.send_multipart(
                [
                    identity,
                    *P.encode(P.ErrorMsg(str(exc)[:500], request_id, exc.kind, self.planner_id)),
                ],
                zmq.NOBLOCK,
            )
        except zmq.ZMQError:
            pass

    # ------------------------------------------------------------------ stats

    @property
    def requests(self) -> dict:
        return self.book.requests

    def records(self) -> list[RequestRecord]:
        return self.book.records()

    def stats(self) -> P.Stats:
        # No core before the first engine connects: no chain has been seen.
        chains = self.core.chains.stats if self.core is not None else ChainStats()
        stats = self.book.stats(
            {
                "num_rejected_frames": float(self.num_rejected_frames),
                "num_engine_deaths": float(self.metrics.engine_deaths._value.get()),
                "num_moved_requests": float(self.num_moved_requests),
                # tool chains' kept KV (planner_svc/chains.py): rounds that found it, claimed
                # KV their engine no longer held, entries released
                "num_kv_claims": float(chains.num_claims),
                "num_kv_misses": float(chains.num_misses),
                "num_kv_partial_hits": float(chains.num_partial_hits),
                "num_kv_releases": float(chains.num_releases),
                # later rounds of chains the planner did not know (served as fresh requests)
                "num_unknown_chain_rounds": float(chains.num_unknown_rounds),
            },
            num_engines=len(self.engines),
        )
        return msgspec.structs.replace(stats, planner_id=self.planner_id)


def build_core(config: PlannerConfig, first_replica: ReplicaSpec) -> PlannerCore:
    """The planner core the config names (formulation, router, core parameters), starting with
    the first engine that connected (the core needs at least one replica)."""
    params = dict(config.core_params)
    replan = ReplanPolicy(**params.pop("replan", {}))
    refit = params.pop("refit", None)
    router = make_router(config.router, config.max_forwards)

    def formulation_factory(spec: ReplicaSpec):
        return registry.create(config.formulation, **config.formulation_params)

    return PlannerCore(
        [first_replica],
        formulation_factory,
        router=router,
        replan=replan,
        announce_replans=True,
        lengths=config.lengths,
        length_predictor=make_predictor(
            config.lengths,
            **({"priors": config.length_priors} if config.lengths == "predicted" else {}),
        ),
        refit=RefitParams(**refit) if refit is not None else None,
        **params,
    )


def warm_up(config: PlannerConfig) -> None:
    """Plan two made-up requests once, on a throwaway core, so that the formulation's one-time
    costs (for slos_dp, numpy's lazy set-up: ~60 ms on the first plan) are paid at startup, not
    by the first real request while a burst queues behind it. Failures are left to the real
    core (it reports them)."""
    spec = ReplicaSpec(replica_id=0, perf_model=config.perf_model, num_total_blocks=1024)
    slo = next(iter(config.slo_classes.values()))
    try:
        core = build_core(config, spec)
        for i, num_prompt_tokens in enumerate((64, 512)):
            ttft_slo_s = slo.ttft_budget_s(config.perf_model, num_prompt_tokens)
            request = Request(f"warm-up-{i}", 0.0, num_prompt_tokens, 16, slo, ttft_slo_s)
            core.submit(request, 0.0)
    except Exception:
        log.debug("warm-up failed", exc_info=True)


def _check_core_params(params: dict) -> None:
    """Fail at startup (not at the first READY) on a bad [core] table."""
    params = dict(params)
    try:
        ReplanPolicy(**params.pop("replan", {}))
        if "refit" in params:
            RefitParams(**params.pop("refit"))
        inspect.signature(PlannerCore).bind_partial(**params)
    except TypeError as exc:
        raise ValueError(f"bad [core] parameter: {exc}") from None
    if "replicas" in params or "formulation_factory" in params or "router" in params:
        raise ValueError("[core] cannot set replicas, formulation_factory or router")
