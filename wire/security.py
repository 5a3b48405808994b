"""Optional ZeroMQ CURVE encryption and authentication for sockets that leave loopback.

The planner holds a server key pair; every engine and client holds its own key pair and the
planner's public key. Keys are Z85 strings (`slos-serve`'s docs show how to make them with
`zmq.curve_keypair()`). Without keys the sockets are plain TCP, which is the loopback default.
"""

from __future__ import annotations

from dataclasses import dataclass

import zmq


@dataclass(frozen=True, slots=True)
class CurveKeys:
    public_key: str
    secret_key: str
    server_public_key: str = ""  # peers only: the planner's public key

    def apply_client(self, socket: zmq.Socket) -> None:
        if not self.server_public_key:
            raise ValueError("a CURVE peer needs the planner's public key (server_public_key)")
        socket.curve_secretkey = self.secret_key.encode()
        socket.curve_publickey = self.public_key.encode()
        socket.curve_serverkey = self.server_public_key.encode()


def make_keypair() -> tuple[str, str]:
    """A fresh (public, secret) Z85 key pair."""
    public, secret = zmq.curve_keypair()
    return public.decode(), secret.decode()
