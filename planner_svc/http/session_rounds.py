"""The front door's count of rounds per session (`x-session-id` header or `chain_id` field), so
that a client sending only the session id gets round_index 0, 1, 2, ... on successive requests.

Memory is bounded both ways: a session not heard of for `ttl_s` is forgotten (its next request is
round 0 again, as the planner, which forgets chains idle for CHAIN_IDLE_S, would treat it anyway),
and beyond `max_sessions` the least recently used one is forgotten first. Used from the event loop
only (one thread), so there is no lock.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Session:
    next_round_index: int
    last_used_s: float


class SessionRounds:
    def __init__(
        self, max_sessions: int, ttl_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if max_sessions < 1 or not ttl_s > 0:
            raise ValueError("max_sessions must be at least 1 and ttl_s positive")
        self.max_sessions = max_sessions
        self.ttl_s = ttl_s
        self._clock = clock
        # least recently used first: expiry and eviction both take from the front
        self._sessions: OrderedDict[str, _Session] = OrderedDict()
        self.num_expired = 0
        self.num_evicted = 0

    def __len__(self) -> int:
        return len(self._sessions)

    def assign(self, session_id: str, round_index: int | None) -> int:
        """The round index of this request of `session_id`: `round_index` when the client gave
        one, else the session's next (0 for a session not known or forgotten). The session's next
        index becomes this one plus 1 either way."""
        now_s = self._clock()
        self._expire(now_s)
        session = self._sessions.pop(session_id, None)
        if round_index is None:
            round_index = session.next_round_index if session is not None else 0
        self._sessions[session_id] = _Session(round_index + 1, now_s)
        while len(self._sessions) > self.max_sessions:
            self._sessions.popitem(last=False)
            self.num_evicted += 1
        return round_index

    def _expire(self, now_s: float) -> None:
        while self._sessions:
            oldest = next(iter(self._sessions.values()))
            if oldest.last_used_s + self.ttl_s > now_s:
                return
            self._sessions.popitem(last=False)
            self.num_expired += 1
