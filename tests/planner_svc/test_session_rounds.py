"""The front door's round count per session: successive rounds, explicit indices, and its bounds
(time-to-live and least-recently-used eviction)."""

from __future__ import annotations

import pytest

from planner_svc.http.session_rounds import SessionRounds


class Clock:
    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s


def test_rounds_count_per_session_and_follow_explicit_indices():
    rounds = SessionRounds(max_sessions=10, ttl_s=60.0, clock=Clock())
    assert [rounds.assign("a", None) for _ in range(3)] == [0, 1, 2]
    assert rounds.assign("b", None) == 0  # sessions are counted apart
    assert rounds.assign("a", 7) == 7  # an explicit index is used as given...
    assert rounds.assign("a", None) == 8  # ...and the count continues after it
    assert rounds.assign("b", None) == 1


def test_a_silent_session_is_forgotten_after_its_ttl():
    clock = Clock()
    rounds = SessionRounds(max_sessions=10, ttl_s=60.0, clock=clock)
    rounds.assign("a", None)
    rounds.assign("b", None)
    clock.now_s = 50.0
    assert rounds.assign("b", None) == 1  # b is used again: its time starts again
    clock.now_s = 100.0  # a silent for 100 s, b for 50 s
    assert rounds.assign("c", None) == 0
    assert len(rounds) == 2 and rounds.num_expired == 1
    assert rounds.assign("a", None) == 0  # forgotten: a fresh session
    assert rounds.assign("b", None) == 2


def test_the_least_recently_used_session_is_evicted_beyond_the_bound():
    rounds = SessionRounds(max_sessions=3, ttl_s=1e9, clock=Clock())
    for name in "abc":
        rounds.assign(name, None)
    rounds.assign("a", None)  # a is now the most recently used; b the least
    rounds.assign("d", None)
    assert len(rounds) == 3 and rounds.num_evicted == 1
    assert rounds.assign("b", None) == 0  # b was evicted (and c now goes)
    assert rounds.assign("a", None) == 2
    for i in range(1000):
        rounds.assign(f"s{i}", None)
    assert len(rounds) == 3


@pytest.mark.parametrize("max_sessions, ttl_s", [(0, 1.0), (1, 0.0), (1, -1.0)])
def test_bad_bounds_are_refused(max_sessions, ttl_s):
    with pytest.raises(ValueError, match="max_sessions"):
        SessionRounds(max_sessions, ttl_s)
