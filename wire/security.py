"""Optional ZeroMQ CURVE encryption and authentication for sockets that leave loopback.

The planner holds a server key pair; every engine and client holds its own key pair and the
planner's public key. Keys are Z85 strings of 40 characters (`slos-serve`'s docs show how to make
them with `zmq.curve_keypair()`). Without keys the sockets are plain TCP, which is the loopback
default. Keys are checked when they are given (a malformed key or a secret key that does not match
its public key is a one-line ValueError), never first by ZeroMQ deep in a socket call.

A failed handshake is invisible to ZeroMQ's sockets (nothing arrives); `HANDSHAKE_EVENTS` are the
socket-monitor events that reveal it, and `handshake_failure_reason` names one for logs and
metrics.
"""

from __future__ import annotations

from dataclasses import dataclass

import zmq
from zmq.utils import z85

Z85_KEY_LENGTH = 40  # a 32-byte key in Z85

HANDSHAKE_EVENTS = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


def check_key(key: object, what: str) -> str:
    """`key` if it is a Z85-encoded 32-byte CURVE key; else a ValueError naming `what`."""
    if not isinstance(key, str) or len(key) != Z85_KEY_LENGTH:
        shown = f"{len(key)} characters" if isinstance(key, str) else repr(key)
        raise ValueError(f"{what} must be a {Z85_KEY_LENGTH}-character Z85 key, got {shown}")
    try:
        z85.decode(key.encode("ascii"))
    except (ValueError, KeyError, UnicodeEncodeError):
        raise ValueError(f"{what} is not a valid Z85 key") from None
    return key


def check_key_pair(public_key: str, secret_key: str, what: str) -> None:
    """Both keys well formed and the public key the one of the secret key (a mismatched pair
    makes every handshake fail, silently)."""
    check_key(public_key, f"{what} public key")
    check_key(secret_key, f"{what} secret key")
    if zmq.curve_public(secret_key.encode()).decode() != public_key:
        raise ValueError(f"{what}: the public key does not belong to the secret key")


@dataclass(frozen=True, slots=True)
class CurveKeys:
    """A peer's (engine's or client's) key pair plus the planner's public key."""

    public_key: str
    secret_key: str
    server_public_key: str

    def __post_init__(self) -> None:
        check_key_pair(self.public_key, self.secret_key, "CURVE")
        check_key(self.server_public_key, "the planner's CURVE public key (server key)")

    def apply_client(self, socket: zmq.Socket) -> None:
        socket.curve_secretkey = self.secret_key.encode()
        socket.curve_publickey = self.public_key.encode()
        socket.curve_serverkey = self.server_public_key.encode()


def make_keypair() -> tuple[str, str]:
    """A fresh (public, secret) Z85 key pair."""
    public, secret = zmq.curve_keypair()
    return public.decode(), secret.decode()


def handshake_failure_reason(event: int) -> str:
    """A short name of a handshake-failure monitor event (a metrics label)."""
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return "auth"  # the key is not allowed (the planner's ZAP handler said no)
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        return "protocol"  # e.g. a plain socket talking to a CURVE one
    return "no_detail"  # e.g. the wrong server key: the crypto does not work out
