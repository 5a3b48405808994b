"""Which clients the planner daemon still hears, and which of their requests are open: a client
silent for the timeout (its process died, its network went away) has its open requests aborted,
so that no engine keeps generating for nobody. Clients heartbeat while idle (PlannerClient: every
second), so a live one is never that silent."""

from __future__ import annotations


class ClientLiveness:
    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._heard_s: dict[bytes, float] = {}  # client identity -> its last frame
        self._open: dict[bytes, set[str]] = {}  # client identity -> its requests not yet ended

    def heard(self, client: bytes, now_s: float) -> None:
        self._heard_s[client] = now_s

    def opened(self, client: bytes, request_id: str) -> None:
        self._open.setdefault(client, set()).add(request_id)

    def ended(self, client: bytes, request_id: str) -> None:
        open_ids = self._open.get(client)
        if open_ids is not None:
            open_ids.discard(request_id)
            if not open_ids:
                del self._open[client]

    def silent(self, read_up_to_s: float) -> list[tuple[bytes, float, set[str]]]:
        """Forget the clients silent for longer than the timeout, as of `read_up_to_s` (the last
        time the daemon read the client socket: frames still unread do not make a client
        silent). Returns each with how long it was silent and its open requests."""
        gone = []
        for client, heard_s in list(self._heard_s.items()):
            silent_s = read_up_to_s - heard_s
            if silent_s > self.timeout_s:
                del self._heard_s[client]
                gone.append((client, silent_s, self._open.pop(client, set())))
        return gone
