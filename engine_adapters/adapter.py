"""The generic engine adapter loop: `receive -> execute -> report`, shared by every engine.

It connects a DEALER socket (a fresh identity per connection) to the planner's engine ROUTER,
sends READY (protocol version, KV blocks, block size, performance model, draft model), and then
runs engine steps as the streamed plans say (see `PlanCursor`), sending PROGRESS after each one.
While no newer plan has come it keeps running the plan's repeat tail, so a planner that is a little
late never stalls the engine.

Liveness (the ZeroMQ guide's reliable request-reply pattern): any message from the planner counts as
a heartbeat; the adapter sends HEARTBEAT when it has sent nothing for `heartbeat_interval_s`; when
the planner has been silent for `liveness` intervals the adapter drops every request (the planner
re-plans them elsewhere when it declares this engine dead), closes the socket, waits a backoff that
doubles up to `reconnect_max_s`, and connects again on a fresh socket with a fresh READY. Stopped
(`stop()`), it says GOODBYE, so that the planner re-plans its requests at once.

Kept KV of tool chains (engines whose `info().kv_retention` is set, docs/AGENTS.md): READY says
so, RELEASE_KV calls `engine.release_kv` for each chain, and the engine's evictions and misses ride
on its step reports. The planner forgets a replica's kept KV when it loses the engine, so the
adapter drops the kept KV of every chain it was asked to keep whenever it loses the planner.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

import msgspec
import zmq
from zmq.utils.monitor import recv_monitor_message

from engine_adapters.engine import Engine
from engine_adapters.plan_queue import PlanQueue
from formulations.plan import Step
from formulations.progress import TokenProgress
from wire import protocol as P
from wire.endpoint import check_endpoint
from wire.rate_limited_log import RateLimitedLog
from wire.security import HANDSHAKE_EVENTS, CurveKeys, handshake_failure_reason

log = logging.getLogger("slos_serve.adapter")


@dataclass(frozen=True)
class AdapterConfig:
    connect: str  # the planner's engine endpoint, e.g. tcp://127.0.0.1:5557
    engine_id: str
    heartbeat_interval_s: float = 0.5
    liveness: int = 6  # planner declared gone after this many silent intervals
    # After reporting step k, wait up to this long for the planner's answer to that report (a plan
    # or an acknowledgement) before running step k+1 from the current plan; 0 never waits.
    plan_grace_s: float = 0.01
    # True: wait only when the planner said it expects to re-plan at the next report (it says so
    # in its heartbeats and answers). False: wait after every report (the most on-time plans, at
    # the cost of one round trip per step).
    wait_only_when_expected: bool = True
    reconnect_min_s: float = 0.1
    reconnect_max_s: float = 4.0
    max_frame_bytes: int = P.DEFAULT_MAX_FRAME_BYTES
    curve: CurveKeys | None = None

    def __post_init__(self) -> None:
        check_endpoint(self.connect, "the planner's engine endpoint")
        if not self.engine_id:
            raise ValueError("an engine needs a non-empty engine id")
        if self.heartbeat_interval_s <= 0 or self.liveness < 1:
            raise ValueError("heartbeat_interval_s must be > 0 and liveness >= 1")


@dataclass
class AdapterStats:
    """Where the engine's time went. `plan_wait_s` is time with live requests but no step to run:
    the planner's lateness."""

    num_steps: int = 0
    num_step_errors: int = 0
    num_connects: int = 0
    num_rejected_frames: int = 0
    num_handshake_failures: int = 0  # e.g. wrong CURVE keys: the planner never hears us
    num_dropped_sends: int = 0  # messages the socket could not take (no planner to send to)
    num_late_plans: int = 0  # of finished connections (see PlanQueue for the current one)
    num_duplicate_plans: int = 0
    num_ack_timeouts: int = 0  # reports the planner did not answer within plan_grace_s
    busy_s: float = 0.0
    plan_wait_s: float = 0.0
    idle_s: float = 0.0
    rejected_reasons: deque = field(default_factory=lambda: deque(maxlen=100))  # the last ones
    # Report -> answer (plan or acknowledgement) round trips, engine clock; the last 100k kept.
    answer_latencies_s: deque = field(default_factory=lambda: deque(maxlen=100_000))

    @property
    def plan_wait_fraction(self) -> float:
        active_s = self.busy_s + self.plan_wait_s
        return self.plan_wait_s / active_s if active_s > 0 else 0.0


class _Tally(TokenProgress):
    """A registered request's tokens as this adapter has seen them executed."""

    __slots__ = ("num_computed_tokens", "num_generated_tokens", "num_prompt_tokens")

    def __init__(self, num_prompt_tokens: int) -> None:
        self.num_prompt_tokens = num_prompt_tokens
        self.num_computed_tokens = 0
        self.num_generated_tokens = 0


class _Connection:
    """One connected DEALER socket and what was exchanged on it. Sends never block: a socket
    whose handshake failed has nobody to send to, and a blocked send would make the engine deaf
    to SIGTERM; a message that cannot go out is dropped (the planner's silence then makes the
    adapter reconnect)."""

    def __init__(self, context: zmq.Context, config: AdapterConfig) -> None:
        self.socket = context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.IDENTITY, f"{config.engine_id}/{uuid.uuid4().hex[:8]}".encode())
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.MAXMSGSIZE, P.socket_frame_limit(config.max_frame_bytes))
        if config.curve is not None:
            config.curve.apply_client(self.socket)
        self.monitor = self.socket.get_monitor_socket(HANDSHAKE_EVENTS)
        self.socket.connect(config.connect)
        self.last_heard_s = time.monotonic()
        self.last_sent_s = 0.0
        self.num_dropped_sends = 0

    def send(self, message: P._Msg) -> None:
        try:
            self.socket.send_multipart(P.encode(message), zmq.NOBLOCK, copy=False)
        except zmq.Again:
            self.num_dropped_sends += 1
            return
        self.last_sent_s = time.monotonic()

    def handshake_failures(self) -> list[str]:
        """The reasons of the handshakes that failed since the last call."""
        reasons = []
        while True:
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)["event"]
            except zmq.Again:
                return reasons
            reasons.append(handshake_failure_reason(event))

    def close(self) -> None:
        """Close both sockets whatever happens: a context being terminated (the process or a
        test shutting down) makes `disable_monitor` raise, and a socket left open would block
        that termination for ever."""
        try:
            self.socket.disable_monitor()
        except zmq.ZMQError:
            pass  # ContextTerminated: the monitor goes with the sockets below
        finally:
            self.monitor.close(linger=0)
            self.socket.close()  # LINGER is 0 unless a GOODBYE is on its way


class EngineAdapter:
    def __init__(self, engine: Engine, config: AdapterConfig, context: zmq.Context | None = None):
        self.engine = engine
        self.config = config
        self.context = context or zmq.Context.instance()
        self.stats = AdapterStats()
        self.stop_event = threading.Event()
        self._log = RateLimitedLog(log)  # what the planner side can make us log at will
        # Constant across reconnects: the planner tells a reconnect of this engine (same
        # instance) from a second engine that uses the same id (refused).
        self.instance_id = uuid.uuid4().hex[:12]
        self.fatal_error = ""  # why the adapter gave up (run() returned for good)
        self._refused_since_s: float | None = None  # refused as a duplicate id since then
        # Chains whose KV the engine may keep (a round registered asking to keep it), until the
        # planner releases them or a later round of the chain attached and kept nothing; an
        # ordered set. Across connections: the engine's kept KV outlives them.
        self.kept_chains: dict[str, None] = {}
        self._reset_session()

    # ------------------------------------------------------------------ lifecycle

    def run(self) -> None:
        """Serve until `stop_event` is set, reconnecting with backoff whenever the planner goes
        silent."""
        backoff_s = self.config.reconnect_min_s
        while not self.stop_event.is_set():
            connection = _Connection(self.context, self.config)
            self.stats.num_connects += 1
            try:
                heard = self._serve(connection)
                if self.stop_event.is_set():
                    self._say_goodbye(connection)
            except zmq.ContextTerminated:  # the owner of the context shut it down: stop
                return
            finally:
                self.stats.num_dropped_sends += connection.num_dropped_sends
                connection.close()
            self._drop_all_requests()
            if self.stop_event.is_set():
                return
            if self._refused_since_s is not None:  # retry while a dead namesake times out
                self.stop_event.wait(self.config.heartbeat_interval_s)
                continue
            if heard:
                backoff_s = self.config.reconnect_min_s
            log.warning("lost the planner; reconnecting in %.2fs", backoff_s)
            self.stop_event.wait(backoff_s)
            backoff_s = min(2 * backoff_s, self.config.reconnect_max_s)

    def stop(self) -> None:
        self.stop_event.set()

    def _say_goodbye(self, connection: _Connection) -> None:
        """Tell the planner this engine is leaving, so that it re-plans the engine's requests now
        (not after `liveness` silent intervals). Best effort: the socket may be gone."""
        try:
            connection.socket.send_multipart(
                P.encode(P.Goodbye(engine_id=self.config.engine_id, reason="stopped")),
                zmq.NOBLOCK,
            )
            connection.socket.setsockopt(zmq.LINGER, 500)  # let the frame leave before close
        except zmq.ZMQError:
            pass

    def _reset_session(self) -> None:
        if hasattr(self, "queue"):  # keep the counts of the previous connection
            self.stats.num_late_plans += self.queue.num_late_plans
            self.stats.num_duplicate_plans += self.queue.num_duplicate_plans
        self.queue = PlanQueue()
        self.live: dict[str, _Tally] = {}  # requests registered with the engine, unfinished
        self._awaiting_ack: int | None = None  # step id whose report the planner has not answered
        self._last_report: tuple[int, float] = (-1, 0.0)  # (step id, time sent)
        self._replan_expected = True  # until the planner says otherwise
        self._must_reconnect = False
        self._ack_deadline_s = 0.0
        self._registered = False  # the planner answered this connection's READY

    def _drop_all_requests(self) -> None:
        """The planner is gone (or forgot us): drop every request and every chain's kept KV, which
        a planner that registers this engine anew knows nothing of (pinned KV would leak)."""
        for request_id in list(self.live):
            self.engine.abort(request_id)
        self._release_kv(tuple(self.kept_chains))
        self._reset_session()

    # ------------------------------------------------------------------ one connection

    def _serve(self, connection: _Connection) -> bool:
        """Run on one connection until the planner is silent too long (or stop). Returns whether
        the planner was ever heard on it."""
        connection.send(self._ready())
        heard = False
        silence_limit_s = self.config.liveness * self.config.heartbeat_interval_s
        while not self.stop_event.is_set():
            if self._awaiting_ack is not None:
                heard |= self._await_ack(connection)
            step = self.queue.next_step(self.live.__contains__, self._adopt)
            wait_ms = 0 if step is not None else int(1000 * self.config.heartbeat_interval_s / 2)
            heard |= self._receive(connection, wait_ms, waiting_for_plan=step is None)
            if time.monotonic() - connection.last_heard_s > silence_limit_s or self._must_reconnect:
                self._note_handshake_failures(connection)
                return heard
            if step is None:  # re-read: the messages just received may have brought a plan
                step = self.queue.next_step(self.live.__contains__, self._adopt)
            if step is not None:
                self._execute(connection, *step)
            if time.monotonic() - connection.last_sent_s >= self.config.heartbeat_interval_s:
                connection.send(P.Heartbeat(sender_id=self.config.engine_id, sent_s=time.time()))
        return heard

    def _note_handshake_failures(self, connection: _Connection) -> None:
        """Say why the planner stayed silent when the handshake failed (wrong CURVE keys, or
        CURVE on one side only): ZeroMQ itself says nothing."""
        reasons = connection.handshake_failures()
        self.stats.num_handshake_failures += len(reasons)
        if reasons:
            self._log.error(
                "handshake",
                "the handshake with the planner at %s failed (%s): check the CURVE keys "
                "(this engine's pair and --curve-server-key) and whether the planner uses CURVE",
                self.config.connect,
                ", ".join(sorted(set(reasons))),
            )

    def _ready(self) -> P.Ready:
        info = self.engine.info()
        return P.Ready(
            protocol_version=P.PROTOCOL_VERSION,
            engine_id=self.config.engine_id,
            num_total_blocks=info.num_total_blocks,
            block_size=info.block_size,
            perf_model=P.perf_model_to_wire(info.perf_model) if info.perf_model else None,
            max_spec_tokens=info.max_spec_tokens,
            max_model_len=info.max_model_len,
            engine_name=info.name,
            next_step_id=self.queue.last_step_id + 1,
            engine_instance=self.instance_id,
            kv_retention=info.kv_retention,
            kv_host_blocks=info.kv_host_blocks,
            kv_swap_s_per_token=info.kv_swap_s_per_token,
        )

    def _await_ack(self, connection: _Connection) -> bool:
        """Wait (at most `plan_grace_s`) for the planner's answer to the last report, so that a
        plan made from that report starts at the very next step instead of one step late."""
        deadline_s = self._ack_deadline_s
        heard = self._receive(connection, 0, waiting_for_plan=False)  # news that came meanwhile
        while self._awaiting_ack is not None:
            if self.config.wait_only_when_expected and not self._replan_expected:
                self._awaiting_ack = None
                break
            wait_s = deadline_s - time.monotonic()
            if wait_s <= 0:
                self._awaiting_ack = None
                self.stats.num_ack_timeouts += 1
                break
            heard |= self._receive(connection, max(1, int(wait_s * 1000)), waiting_for_plan=True)
        return heard

    def _receive(self, connection: _Connection, wait_ms: int, waiting_for_plan: bool) -> bool:
        """Wait up to `wait_ms` for a message, then drain the socket without blocking."""
        start_s = time.monotonic()
        heard = False
        if connection.socket.poll(wait_ms, zmq.POLLIN):
            while True:
                try:
                    frames = connection.socket.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                heard = True
                connection.last_heard_s = time.monotonic()
                self._handle(frames)
        waited_s = time.monotonic() - start_s
        if waiting_for_plan and self.live:
            self.stats.plan_wait_s += waited_s
        elif waiting_for_plan:
            self.stats.idle_s += waited_s
        return heard

    def _handle(self, frames: list[bytes]) -> None:
        try:
            message = P.decode(frames, P.PLANNER_TO_ENGINE, self.config.max_frame_bytes)
        except P.ProtocolError as exc:
            self.stats.num_rejected_frames += 1
            self.stats.rejected_reasons.append(str(exc))
            self._log.warning("rejected frame", "rejected frame from planner: %s", exc)
            return
        expected = getattr(message, "replan_expected", None)
        if expected is not None:
            self._replan_expected = expected
        ack = getattr(message, "ack_step_id", None)
        if ack is not None and ack == self._last_report[0]:
            self.stats.answer_latencies_s.append(time.monotonic() - self._last_report[1])
        if ack is not None and self._awaiting_ack is not None and ack >= self._awaiting_ack:
            self._awaiting_ack = None
        if isinstance(message, P.PlanMsg):
            self._on_plan(message)
        elif isinstance(message, P.Abort):
            self._abort(message.request_id)
        elif isinstance(message, P.ReleaseKV):
            self._release_kv(message.chain_ids)
        elif isinstance(message, P.ErrorMsg):
            self._on_error(message)
            return
        self._refused_since_s = None  # the planner talks to us: we are registered
        if not self._registered:
            self._registered = True
            log.info(
                "engine %s registered with the planner at %s (planner %s)",
                self.config.engine_id,
                self.config.connect,
                getattr(message, "planner_id", "") or "?",
            )

    def _on_error(self, error: P.ErrorMsg) -> None:
        if error.kind == "duplicate_engine_id":
            self._on_refused(error.reason)
            return
        log.error("planner says: %s", error.reason)
        if error.kind == "no_ready":  # the planner forgot us (it restarted): register again
            self._must_reconnect = True

    def _on_refused(self, reason: str) -> None:
        """Another live engine has our id. Retry for two liveness windows (a namesake that just
        died is declared dead by then: this may be its restart), then give up for good."""
        now_s = time.monotonic()
        if self._refused_since_s is None:
            self._refused_since_s = now_s
            log.warning("the planner refused this engine (retrying for a while): %s", reason)
        patience_s = 2 * self.config.liveness * self.config.heartbeat_interval_s
        if now_s - self._refused_since_s > patience_s:
            self.fatal_error = f"the planner refused this engine: {reason}"
            log.error("%s", self.fatal_error)
            self.stop()
        self._must_reconnect = True

    # ------------------------------------------------------------------ plans and steps

    def _on_plan(self, plan: P.PlanMsg) -> None:
        for new in plan.new_requests:
            self._add_request(new)
        for request_id in plan.aborts:
            self._abort(request_id)
        self.queue.offer(plan)

    def _adopt(self, plan: P.PlanMsg) -> None:
        for request_id in plan.preemptions:
            tally = self.live.get(request_id)
            if tally is not None:
                self.engine.preempt(request_id)
                tally.num_computed_tokens = 0

    def _add_request(self, new: P.EngineRequest) -> None:
        if new.request_id in self.live:
            return  # a duplicate payload (the planner resends after a stale plan)
        try:
            self.engine.add_request(new)
        except ValueError as exc:
            self.stats.num_rejected_frames += 1
            log.warning("bad request payload %s: %s", new.request_id, exc)
            return
        tally = _Tally(new.num_prompt_tokens)
        tally.num_computed_tokens = new.num_cached_tokens  # a miss resets it (_execute)
        self.live[new.request_id] = tally
        if new.chain_id is not None:
            if new.retain_kv != "drop":
                self.kept_chains[new.chain_id] = None
            elif new.num_cached_tokens:  # it takes the chain's kept KV and keeps nothing after
                self.kept_chains.pop(new.chain_id, None)

    def _release_kv(self, chain_ids: tuple[str, ...]) -> None:
        for chain_id in chain_ids:
            self.engine.release_kv(chain_id)
            self.kept_chains.pop(chain_id, None)

    def _abort(self, request_id: str) -> None:
        self.engine.abort(request_id)
        self.live.pop(request_id, None)

    def _execute(self, connection: _Connection, step_id: int, step: Step) -> None:
        step = self._clamp(step)
        start_s = time.monotonic()
        report = self.engine.execute(step, step_id)
        self.stats.busy_s += time.monotonic() - start_s
        self.stats.num_steps += 1
        for request_id in report.kv_misses:  # registered with cached KV it no longer held
            if request_id in self.live:
                self.live[request_id].num_computed_tokens = 0
        for request_id, num_found in report.kv_found.items():  # held only a part of it
            if request_id in self.live:
                self.live[request_id].num_computed_tokens = num_found
        if report.ok:
            for request_id, num_computed in report.num_computed_tokens.items():
                if request_id in self.live:
                    self.live[request_id].num_computed_tokens += num_computed
            for request_id, num_new in report.num_new_tokens.items():
                if request_id in self.live:
                    self.live[request_id].num_generated_tokens += num_new
            for request_id in report.finished:
                self.engine.abort(request_id)  # frees its KV blocks; the engine forgets it
                self.live.pop(request_id, None)
        else:
            self.stats.num_step_errors += 1
            self.queue.abandon()
        connection.send(
            msgspec.structs.replace(
                report,
                plan_id=self.queue.current_plan_id,
                num_stale_plans=self.queue.num_late_plans,
            )
        )
        self._last_report = (step_id, time.monotonic())
        if self.config.plan_grace_s > 0:
            self._awaiting_ack = step_id
            self._ack_deadline_s = time.monotonic() + self.config.plan_grace_s

    def _clamp(self, step: Step) -> Step:
        """Each entry cut to the tokens its request still needs before its next output token. A
        no-op for a plan that arrived in time; after a late plan (planned before the in-flight
        step ran) it keeps the plan's prefill chunks from overshooting the prompt."""
        num_tokens = {
            rid: min(n, self.live[rid].num_pending_tokens) for rid, n in step.num_tokens.items()
        }
        if num_tokens == step.num_tokens:
            return step
        num_spec = {
            rid: s
            for rid, s in step.num_spec_tokens.items()
            if self.live[rid].num_pending_tokens == 1
        }
        return Step(num_tokens=num_tokens, num_spec_tokens=num_spec)
