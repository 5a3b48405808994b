"""ZeroMQ endpoints as users write them, checked before a socket sees them: ZeroMQ itself answers a
malformed endpoint with a bare "Invalid argument" (or, in a background thread, not at all), so a
typo such as `--connect 5557` or `--connect http://host:5557` gets a one-line error here instead.

Accepted: `tcp://HOST:PORT` (HOST a name, an IPv4 address or a bracketed IPv6 address; a bind may
use `*` for every interface and port 0 or `*` for any free port), `ipc://PATH`, `inproc://NAME`.
"""

from __future__ import annotations

import re

_TCP = re.compile(r"^tcp://(?P<host>\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):(?P<port>\d{1,5}|\*)$")
_OTHER_TRANSPORTS = ("ipc://", "inproc://")
EXAMPLE = "tcp://127.0.0.1:5557"


def check_endpoint(endpoint: object, what: str, bind: bool = False) -> str:
    """`endpoint` if it is one ZeroMQ can `bind` (bind=True) or `connect` to; else ValueError
    naming `what` (e.g. "--connect", "[planner] engine_endpoint")."""
    if not isinstance(endpoint, str):
        raise ValueError(f"{what} must be a string such as {EXAMPLE}, got {endpoint!r}")
    if endpoint.startswith(_OTHER_TRANSPORTS) and endpoint.split("://", 1)[1]:
        return endpoint
    match = _TCP.match(endpoint)
    if match is None:
        raise ValueError(f"{what} {endpoint!r} is not a ZeroMQ endpoint: expected tcp://HOST:PORT")
    host, port = match["host"], match["port"]
    if not bind and (host == "*" or port == "*" or int(port) == 0):
        raise ValueError(f"{what} {endpoint!r}: a peer must connect to a host and a port")
    if port != "*" and int(port) > 65535:
        raise ValueError(f"{what} {endpoint!r}: port {port} is out of range")
    return endpoint
