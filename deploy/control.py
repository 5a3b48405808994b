"""The control channel of a running `slos-serve serve`: `slos-serve scale N` (and status queries)
as JSON over a ZeroMQ REQ/REP pair on loopback. Bad input is answered with an error, never fatal.
"""

from __future__ import annotations

import msgspec
import zmq


class ReplicaStatus(msgspec.Struct, frozen=True):
    index: int
    engine_id: str
    state: str  # starting | running | pending (waiting for resources) | restarting | stopping
    where: str = ""  # pid, or Ray node id and address
    num_restarts: int = 0


class ScaleRequest(msgspec.Struct, tag="scale", frozen=True):
    replicas: int


class StatusRequest(msgspec.Struct, tag="status", frozen=True):
    pass


class ControlReply(msgspec.Struct):
    ok: bool
    error: str = ""
    target_replicas: int = 0
    num_engines: int = 0  # registered with the planner
    replicas: list[ReplicaStatus] = []


ControlRequest = ScaleRequest | StatusRequest
_DECODER = msgspec.json.Decoder(ControlRequest)
_REPLY_DECODER = msgspec.json.Decoder(ControlReply)


class ControlServer:
    """A REP socket on 127.0.0.1; `serve_one` answers at most one request per call."""

    def __init__(self, port: int, context: zmq.Context | None = None) -> None:
        self.socket = (context or zmq.Context.instance()).socket(zmq.REP)
        self.socket.setsockopt(zmq.LINGER, 0)
        try:
            self.socket.bind(f"tcp://127.0.0.1:{port}")
        except zmq.ZMQError as exc:
            self.socket.close()
            raise ValueError(f"cannot listen on the control port 127.0.0.1:{port}: {exc}") from None

    @property
    def endpoint(self) -> str:
        return self.socket.getsockopt_string(zmq.LAST_ENDPOINT)

    def serve_one(self, handle, wait_ms: int) -> None:
        """Wait up to `wait_ms` for a request and answer it with `handle(request) -> reply`."""
        if not self.socket.poll(wait_ms, zmq.POLLIN):
            return
        raw = self.socket.recv()
        try:
            reply = handle(_DECODER.decode(raw))
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            reply = ControlReply(ok=False, error=f"bad control request: {exc}")
        except ValueError as exc:
            reply = ControlReply(ok=False, error=str(exc))
        self.socket.send(msgspec.json.encode(reply))

    def close(self) -> None:
        self.socket.close(linger=0)


def ask(endpoint: str, request: ControlRequest, timeout_s: float = 10.0) -> ControlReply:
    """One request to a running serve; ValueError when nothing answers in time."""
    context = zmq.Context.instance()
    socket = context.socket(zmq.REQ)
    socket.setsockopt(zmq.LINGER, 0)
    try:
        socket.connect(endpoint)
        socket.send(msgspec.json.encode(request))
        if not socket.poll(int(timeout_s * 1000), zmq.POLLIN):
            raise ValueError(f"no slos-serve serve answered at {endpoint} within {timeout_s:g}s")
        return _REPLY_DECODER.decode(socket.recv())
    finally:
        socket.close()
