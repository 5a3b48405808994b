"""Every message that crosses a process boundary: typed MessagePack structs (msgspec).

A message travels as two ZeroMQ frames, `[type, payload]` (a ROUTER sees the peer identity in
front): `type` is one byte naming the struct, `payload` is the struct in MessagePack. The receiver
decodes the payload *against the struct its type byte names*, and only for the types it expects on
that socket, so malformed input fails here, at the boundary, with a `ProtocolError` that the caller
counts; it never reaches the planner. Nothing is ever unpickled.

Conversation (see docs/SERVICE.md):

    engine  --READY-->  planner            (first message; carries PROTOCOL_VERSION)
    engine <--PLAN---   planner            (steps from `start_step_id`, a repeat tail, payloads)
    engine  --PROGRESS-> planner           (after every step)
    engine  --GOODBYE--> planner           (leaving on purpose: its requests are re-planned now)
    engine <-RELEASE_KV- planner           (drop tool chains' kept KV; engines that keep KV only)
    engine <-HEARTBEAT-> planner           (any message counts as a heartbeat)
    client  --SUBMIT-->  planner  --VERDICT--> client, then TOKENS... (last one has finished=True)
    client  --ABORT-->   planner  --ABORT--> engine
    client  --STATS_REQUEST--> planner --STATS--> client
    anyone <--ERROR--    planner           (a rejected frame or request, with the reason)

The engine-side structs (`PlanMsg`, `EngineRequest`, `StepReport`) are also what the planner core
and the engines exchange in process (the simulator), so nothing is converted on the way.

Version 2. A receiver rejects a READY of another version; unknown fields are ignored so that
fields may be added (with defaults) without a version bump. RELEASE_KV, a type added in version
2, goes only to engines whose READY set `kv_retention` (a field older engines do not send), so an
older engine never sees it.
"""

from __future__ import annotations

import enum
from typing import Annotated, Literal

import msgspec

from formulations.perf_model import PerfModel, perf_model_preset
from formulations.plan import Step

PROTOCOL_VERSION = 2
DEFAULT_MAX_FRAME_BYTES = 8 << 20  # a larger payload is rejected before decoding
# Frames up to this much over the limit are still read (and answered as oversized); ZeroMQ drops
# the connection of a peer that sends a larger one before reading it (see socket_frame_limit).
FRAME_LIMIT_SLACK_BYTES = 64 << 10

NonNegInt = Annotated[int, msgspec.Meta(ge=0)]
PosInt = Annotated[int, msgspec.Meta(ge=1)]
NonNegFloat = Annotated[float, msgspec.Meta(ge=0.0)]
PosFloat = Annotated[float, msgspec.Meta(gt=0.0)]
Id = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


class ProtocolError(ValueError):
    """A frame that is not a valid message of an expected type. `kind` is one of a fixed set of
    short names (a metrics label): frames, unknown_type, unexpected_type, oversized, malformed,
    or a caller's own (e.g. no_ready, version, bad_ready, bad_request)."""

    def __init__(self, message: str, kind: str = "malformed") -> None:
        super().__init__(message)
        self.kind = kind


class _Msg(msgspec.Struct, frozen=True, omit_defaults=True, forbid_unknown_fields=False):
    pass


# --------------------------------------------------------------------------- engine <-> planner


class PerfModelSpec(_Msg):
    """A performance model by preset name (`lines` empty) or by its max-of-lines coefficients,
    each line `[k_token_s, k_spec_s, intercept_s]`, with each line's context slope in
    `k_context_s` (empty: no context term; a separate field so that planners that predate it
    still read the lines)."""

    name: str = ""
    lines: list[tuple[NonNegFloat, NonNegFloat, float]] = []
    k_context_s: list[NonNegFloat] = []


class Ready(_Msg):
    protocol_version: int
    engine_id: Id
    num_total_blocks: PosInt
    block_size: PosInt
    perf_model: PerfModelSpec | None = None  # None: the planner uses its configured model
    max_spec_tokens: NonNegInt = 0  # 0: no draft model
    max_model_len: PosInt = 1 << 20
    engine_name: str = "engine"
    next_step_id: NonNegInt = 0
    # Random per engine process, the same across its reconnects: a READY with a connected engine
    # id but another instance is a second engine using the id (refused), not a reconnect.
    engine_instance: str = ""
    # The engine keeps a tool chain's KV between rounds when a payload asks (`retain_kv`) and
    # honours RELEASE_KV; False (older engines): the planner sends only the defaults.
    kv_retention: bool = False
    # With kv_retention: host memory for kept KV in blocks (0: none; then "host" is never sent)
    # and the seconds to copy one token's KV back in.
    kv_host_blocks: NonNegInt = 0
    kv_swap_s_per_token: NonNegFloat = 0.0


class EngineRequest(_Msg):
    """What an engine needs to run a request: the planner core's output carries it to the engine
    (the same struct in process and on the wire). After a move (recompute on another replica) the
    prompt holds the original prompt plus the tokens generated so far. `max_new_tokens` is where
    the engine stops (with EOS and stop strings); the planner does not plan with it."""

    request_id: Id
    num_prompt_tokens: PosInt
    max_new_tokens: PosInt
    prompt_token_ids: list[int] | None = None  # None: the engine makes placeholder tokens
    temperature: NonNegFloat = 0.0  # 0: greedy
    top_p: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 1.0
    seed: int | None = None
    ignore_eos: bool = True
    # Simulated engines only: where the request's thinking ends (0: no thinking). Real engines see
    # the end-of-thinking token; the simulator knows it from the trace. Never sent to the planner.
    sim_thinking_tokens: NonNegInt = 0
    # Tool chains (docs/AGENTS.md). `chain_id`: the chain this round belongs to.
    # `num_cached_tokens`: the leading prompt tokens whose KV the engine kept for the chain after
    # its previous round (attach them; only the rest is prefilled). `retain_kv`: what the engine
    # does with this round's KV when it finishes: "drop" it, keep it "pinned" under the chain id
    # until the planner releases it, or keep it "evictable" (a prefix-cache entry, LRU). Only
    # engines that keep KV (the sim engine) are ever sent anything but the defaults.
    chain_id: str | None = None
    num_cached_tokens: NonNegInt = 0
    retain_kv: Literal["drop", "pinned", "evictable", "host"] = "drop"

    def __post_init__(self) -> None:
        if (
            self.prompt_token_ids is not None
            and len(self.prompt_token_ids) != self.num_prompt_tokens
        ):
            raise ValueError(f"request {self.request_id}: prompt length mismatch")
        if self.num_prompt_tokens < 1 or self.max_new_tokens < 1:
            raise ValueError(f"request {self.request_id}: empty prompt or output")
        if self.num_cached_tokens >= self.num_prompt_tokens:
            raise ValueError(f"request {self.request_id}: cached tokens must leave a prompt token")

    def resumed(self, generated_token_ids: list[int] | None, num_generated: int) -> EngineRequest:
        """The request as another engine must run it after `num_generated` output tokens: prompt
        plus output so far (recomputed), the rest of the output to go. Token ids are kept only
        when all the generated ones are known."""
        if num_generated <= 0:
            return self
        prompt_ids = None
        ids_known = generated_token_ids is not None and len(generated_token_ids) == num_generated
        if self.prompt_token_ids is not None and ids_known:
            prompt_ids = [*self.prompt_token_ids, *generated_token_ids]
        return msgspec.structs.replace(
            self,
            num_prompt_tokens=self.num_prompt_tokens + num_generated,
            max_new_tokens=max(1, self.max_new_tokens - num_generated),
            prompt_token_ids=prompt_ids,
            sim_thinking_tokens=max(0, self.sim_thinking_tokens - num_generated),
            num_cached_tokens=0,
        )


class PlanMsg(_Msg):
    """A plan for one engine (PLAN on the wire, and the planner core's output in process): steps
    for engine steps `start_step_id, start_step_id + 1, ...`, then `repeat` cyclically until a
    newer plan takes over (`wire/plan_cursor.py` numbers them). `plan_id` grows per engine; an
    engine drops a plan whose id it has seen. New requests and aborts are applied on receipt even
    from a late plan; preemptions when the plan is adopted. Each step is the formulations'
    phase-free `Step`; `decode` checks its counts at the socket."""

    plan_id: NonNegInt
    start_step_id: NonNegInt
    steps: tuple[Step, ...] = ()
    repeat: tuple[Step, ...] = ()
    new_requests: tuple[EngineRequest, ...] = ()  # register before running the plan
    aborts: tuple[str, ...] = ()
    preemptions: tuple[str, ...] = ()  # drop these requests' KV when the plan is adopted
    ack_step_id: int | None = None  # the engine report this plan answers, if any
    replan_expected: bool | None = None  # see Heartbeat.replan_expected

    @property
    def end_step_id(self) -> int:
        """Step id right after the explicit steps (the first repeat step's id)."""
        return self.start_step_id + len(self.steps)


class StepReport(_Msg):
    """One executed (or refused: `error` set, nothing changed) engine step: PROGRESS on the wire,
    and what every engine returns in process. Times are on the engine's clock; the daemon keeps
    the step's length and re-stamps its end with its own receive time."""

    step_id: NonNegInt
    start_s: float = 0.0
    end_s: float = 0.0
    num_computed_tokens: dict[str, NonNegInt] = {}  # tokens computed per request
    num_new_tokens: dict[str, NonNegInt] = {}  # output tokens produced per request
    num_accepted_spec_tokens: dict[str, NonNegInt] = {}
    num_proposed_spec_tokens: dict[str, NonNegInt] = {}
    new_token_ids: dict[str, list[int]] = {}  # empty for the sim engine in the simulator
    num_free_blocks: NonNegInt = 0
    finished: tuple[str, ...] = ()  # produced their last token (or hit EOS / a stop) this step
    # Reasoning requests whose thinking ended in this step: request -> how many of the tokens the
    # step produced for it were thinking tokens, the last of them ending the thinking (the engine
    # sees the end-of-thinking token; the planner cannot know where it comes before it does).
    thinking_ended: dict[str, NonNegInt] = {}
    error: str = ""  # non-empty: the step was not executed (e.g. out of KV blocks)
    # Engines that keep KV across tool pauses (EngineRequest.retain_kv): chains whose evictable KV
    # the engine evicted since its last report, and requests registered with cached tokens that it
    # no longer held (they recompute their whole prompt).
    kv_evicted: tuple[str, ...] = ()
    kv_misses: tuple[str, ...] = ()
    # Requests registered with cached tokens of which the engine held only a leading part (vLLM's
    # prefix cache keeps whole blocks only): request -> the tokens it held, fewer than claimed.
    # They start there and compute the rest; the core applies this as a miss does, before the
    # report's counts (a hold of 0 tokens is a miss).
    kv_found: dict[str, NonNegInt] = {}
    plan_id: NonNegInt = 0  # the plan the step came from (diagnostic)
    num_stale_plans: NonNegInt = 0  # plans dropped by the engine so far (diagnostic)

    @property
    def step_time_s(self) -> float:
        return max(0.0, self.end_s - self.start_s)

    @property
    def ok(self) -> bool:
        return not self.error


class ReleaseKV(_Msg):
    """Drop the KV the engine keeps for these tool chains (a time-to-live passed, the chain's next
    round went elsewhere or ended). Applied on receipt, in socket order: it reaches the engine
    before any plan the planner sent after it, so it can never drop KV a later round keeps. Sent
    only to engines whose READY said `kv_retention`; unknown chains are ignored."""

    chain_ids: tuple[Id, ...]


class Goodbye(_Msg):
    """An engine leaving on purpose (stopped, or scaled down): the planner re-plans its requests
    on the other replicas at once instead of after `liveness` silent heartbeat intervals."""

    engine_id: Id
    reason: str = ""


class Heartbeat(_Msg):
    """Liveness. From the planner to an engine it may also acknowledge the engine's report of step
    `ack_step_id` when that report brought no new plan (see PlanMsg.ack_step_id), and say whether
    it expects to re-plan at the engine's next report (`replan_expected`; None: no news), so that
    the engine waits for the answer to that report only when a plan is likely to come."""

    sender_id: str = ""
    sent_s: float = 0.0
    ack_step_id: int | None = None
    replan_expected: bool | None = None
    planner_id: str = ""  # from the planner: its instance id (see VerdictMsg.planner_id)


# --------------------------------------------------------------------------- client <-> planner


class Submit(_Msg):
    """A request. The prompt is given as token ids or as a length; the output as `max_tokens`
    (the planner treats it as the known output length). SLOs come from `slo_class` (a preset or a
    class of the planner's config) unless explicit targets are given: `ttft_ms` or
    `ttft_slowdown`, and `tpot_ms`; a reasoning request sets `thinking_tokens` (its thinking
    budget) and `thinking_tpot_ms`. A tool-calling round sets `chain_id` and `round_index` (and
    `chain_last_round` on its last); the client runs the tools and submits the next round when
    this one finishes."""

    request_id: Id
    max_tokens: PosInt
    prompt_token_ids: list[int] | None = None
    num_prompt_tokens: PosInt | None = None
    slo_class: str = "chatbot"
    slo_targets: str | None = None  # take the targets from this class instead (tool rounds)
    ttft_ms: PosFloat | None = None
    ttft_slowdown: PosFloat | None = None
    tpot_ms: PosFloat | None = None
    thinking_tokens: NonNegInt = 0
    thinking_tpot_ms: PosFloat | None = None
    temperature: NonNegFloat = 0.0
    top_p: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 1.0
    seed: int | None = None
    ignore_eos: bool = True
    chain_id: str | None = None
    round_index: NonNegInt = 0
    # The chain's last round: nothing follows, so its engine keeps none of its KV (without it the
    # planner keeps the KV for a next round that never comes, until its time-to-live).
    chain_last_round: bool = False
    value: PosFloat = 1.0
    # The client's expectation of the output length, if it has one: a hint the planner's length
    # predictor uses (formulations/lengths.py); the engine still stops at EOS or max_tokens.
    expected_output_tokens: PosInt | None = None

    @property
    def prompt_length(self) -> int:
        if self.prompt_token_ids is not None:
            return len(self.prompt_token_ids)
        if self.num_prompt_tokens is None:
            raise ValueError(
                f"request {self.request_id}: give prompt_token_ids or num_prompt_tokens"
            )
        return self.num_prompt_tokens


class VerdictMsg(_Msg):
    """The planner's answer to a SUBMIT: `admitted`, `rejected` or `best_effort`. Carries the
    request's arrival (planner clock) and its resolved SLO, so that a client can check attainment
    against the same deadlines."""

    request_id: Id
    verdict: str
    reason: str = ""
    replica_id: int | None = None
    arrival_s: float = 0.0
    ttft_slo_s: float = 0.0
    tpot_s: float = 0.0
    thinking_tpot_s: float | None = None
    num_thinking_tokens: int = 0
    # The planner process that decided (random per start): a client that hears another id knows
    # the planner restarted and that requests decided by the old one will never end there.
    planner_id: str = ""
    # Why a rejection happened, for machines: "" (the SLOs cannot be met), or one of the VERDICT_*
    # codes below (the service could not serve it; HTTP answers those with 503, not 429).
    code: str = ""


VERDICT_NO_ENGINE = "no_engine"  # no engine is connected
VERDICT_LOST = "lost"  # admitted, but its engine died and no other can take it
VERDICT_TTFT_PASSED = "ttft_target_passed"  # undecided when its TTFT target passed


class Tokens(_Msg):
    """Output tokens of one request produced by one engine step (ids empty for the sim engine)."""

    request_id: Id
    num_tokens: NonNegInt
    token_ids: list[int] = []
    num_generated_tokens: NonNegInt = 0  # total so far
    finished: bool = False
    planner_time_s: float = 0.0  # when the planner received the step's report


class Abort(_Msg):
    request_id: Id
    reason: str = ""


class StatsRequest(_Msg):
    query_id: int = 0  # echoed in the answer, so concurrent queries each get their own


class Stats(_Msg):
    counters: dict[str, float] = {}
    attainment_by_class: dict[str, float] = {}
    num_requests_by_class: dict[str, int] = {}
    num_engines: int = 0
    query_id: int = 0  # the StatsRequest's
    planner_id: str = ""


class ErrorMsg(_Msg):
    """A refusal. `kind` is ProtocolError.kind; an engine told `no_ready` (the planner does not
    know it, e.g. after a planner restart) registers again with a fresh READY; one told
    `duplicate_engine_id` (another live engine has its id) retries for a while, then gives up.
    Errors the client makes up itself (the planner restarted or went silent) carry the kinds
    `planner_restarted` / `planner_unreachable`."""

    reason: str
    request_id: str = ""
    kind: str = ""
    planner_id: str = ""


# --------------------------------------------------------------------------- framing


class MessageType(bytes, enum.Enum):
    READY = b"R"
    PLAN = b"P"
    PROGRESS = b"G"
    HEARTBEAT = b"H"
    SUBMIT = b"S"
    VERDICT = b"V"
    TOKENS = b"T"
    ABORT = b"A"
    STATS_REQUEST = b"Q"
    STATS = b"s"
    ERROR = b"E"
    GOODBYE = b"B"
    RELEASE_KV = b"K"


MESSAGE_CLASSES: dict[MessageType, type[_Msg]] = {
    MessageType.READY: Ready,
    MessageType.PLAN: PlanMsg,
    MessageType.PROGRESS: StepReport,
    MessageType.HEARTBEAT: Heartbeat,
    MessageType.SUBMIT: Submit,
    MessageType.VERDICT: VerdictMsg,
    MessageType.TOKENS: Tokens,
    MessageType.ABORT: Abort,
    MessageType.STATS_REQUEST: StatsRequest,
    MessageType.STATS: Stats,
    MessageType.ERROR: ErrorMsg,
    MessageType.GOODBYE: Goodbye,
    MessageType.RELEASE_KV: ReleaseKV,
}
_TYPE_OF: dict[type[_Msg], MessageType] = {cls: t for t, cls in MESSAGE_CLASSES.items()}
_DECODERS = {t: msgspec.msgpack.Decoder(cls) for t, cls in MESSAGE_CLASSES.items()}
_ENCODER = msgspec.msgpack.Encoder()

# What each side accepts.
ENGINE_TO_PLANNER = frozenset(
    {MessageType.READY, MessageType.PROGRESS, MessageType.HEARTBEAT, MessageType.GOODBYE}
)
PLANNER_TO_ENGINE = frozenset(
    {
        MessageType.PLAN,
        MessageType.HEARTBEAT,
        MessageType.ABORT,
        MessageType.ERROR,
        MessageType.RELEASE_KV,
    }
)
CLIENT_TO_PLANNER = frozenset(
    {MessageType.SUBMIT, MessageType.ABORT, MessageType.STATS_REQUEST, MessageType.HEARTBEAT}
)
PLANNER_TO_CLIENT = frozenset(
    {
        MessageType.VERDICT,
        MessageType.TOKENS,
        MessageType.STATS,
        MessageType.HEARTBEAT,
        MessageType.ERROR,
    }
)


def socket_frame_limit(max_frame_bytes: int) -> int:
    """ZeroMQ's MAXMSGSIZE for a socket that accepts payloads of up to `max_frame_bytes`."""
    return max_frame_bytes + FRAME_LIMIT_SLACK_BYTES


def encode(message: _Msg) -> list[bytes]:
    """The two frames `[type, payload]` of a message."""
    return [_TYPE_OF[type(message)].value, _ENCODER.encode(message)]


def decode(
    frames: list[bytes],
    allowed: frozenset[MessageType],
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
) -> _Msg:
    """Decode `[type, payload]` into the struct the type names, if that type is `allowed`.

    Raises ProtocolError for a wrong frame count, an unknown or unexpected type, an oversized
    payload, or a payload that is not a valid instance of the struct.
    """
    if len(frames) != 2:
        raise ProtocolError(f"expected 2 frames (type, payload), got {len(frames)}", "frames")
    type_frame, payload = frames
    try:
        message_type = MessageType(bytes(type_frame))
    except ValueError:
        raise ProtocolError(
            f"unknown message type {bytes(type_frame)[:8]!r}", "unknown_type"
        ) from None
    if message_type not in allowed:
        raise ProtocolError(
            f"message type {message_type.name} is not expected here", "unexpected_type"
        )
    if len(payload) > max_frame_bytes:
        raise ProtocolError(
            f"{message_type.name} payload of {len(payload)} bytes exceeds "
            f"the limit of {max_frame_bytes}",
            "oversized",
        )
    try:
        message = _DECODERS[message_type].decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(f"malformed {message_type.name}: {exc}") from None
    if isinstance(message, PlanMsg):
        _check_steps(message)
    return message


def _check_steps(plan: PlanMsg) -> None:
    """Token counts of a decoded plan: at least 1 per entry, drafts >= 0 and only for entries
    that compute (the dataclass `Step` carries no such constraint of its own)."""
    for step in (*plan.steps, *plan.repeat):
        if any(type(n) is not int or n < 1 for n in step.num_tokens.values()):
            raise ProtocolError("malformed PLAN: a step entry has fewer than 1 token")
        for rid, n in step.num_spec_tokens.items():
            if type(n) is not int or n < 0 or rid not in step.num_tokens:
                raise ProtocolError(f"malformed PLAN: bad speculative tokens for {rid!r}")


# --------------------------------------------------------------------------- conversions


def perf_model_to_wire(perf_model: PerfModel) -> PerfModelSpec:
    lines = [(ln.k_token_s, ln.k_spec_s, ln.intercept_s) for ln in perf_model.lines]
    context = [ln.k_context_s for ln in perf_model.lines] if perf_model.has_context_term else []
    return PerfModelSpec(name=perf_model.name, lines=lines, k_context_s=context)


def perf_model_from_wire(spec: PerfModelSpec) -> PerfModel:
    """A PerfModel from its coefficients, or the preset of that name when no lines are given."""
    if not spec.lines:
        return perf_model_preset(spec.name)
    if spec.k_context_s and len(spec.k_context_s) != len(spec.lines):
        raise ValueError(
            f"performance model: {len(spec.k_context_s)} context slopes for {len(spec.lines)} lines"
        )
    context = spec.k_context_s or [0.0] * len(spec.lines)
    rows = [[*line, k] for line, k in zip(spec.lines, context)]
    return PerfModel.from_dict({"name": spec.name or "engine", "lines": rows})
