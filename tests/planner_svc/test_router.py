"""Routers: round-robin first tries, ring-order forwarding, least-loaded choice."""

import pytest

from planner_svc.router import LeastLoadedRouter, RoundRobinRouter, make_router
from tests.factories import make_req

REQ = make_req("a")


def test_round_robin_takes_turns():
    router = RoundRobinRouter()
    loads = {0: 5, 1: 0, 2: 9}
    assert [router.route(REQ, loads, ()) for _ in range(5)] == [0, 1, 2, 0, 1]


def test_round_robin_forwards_in_ring_order_skipping_tried():
    router = RoundRobinRouter(max_forwards=3)
    loads = {0: 0, 1: 0, 2: 0, 3: 0}
    assert router.route(REQ, loads, (2,)) == 3
    assert router.route(REQ, loads, (2, 3)) == 0
    assert router.route(REQ, loads, (3, 0)) == 1
    assert router.route(REQ, loads, (0, 1, 2, 3)) is None


def test_least_loaded_picks_the_emptiest_untried():
    router = LeastLoadedRouter()
    loads = {0: 4, 1: 2, 2: 2, 3: 7}
    assert router.route(REQ, loads, ()) == 1
    assert router.route(REQ, loads, (1,)) == 2
    assert router.route(REQ, {0: 1}, (0,)) is None


def test_make_router_by_name():
    assert make_router("least_loaded", 2).max_forwards == 2
    with pytest.raises(ValueError, match="unknown router"):
        make_router("random")
    with pytest.raises(ValueError):
        RoundRobinRouter(-1)
