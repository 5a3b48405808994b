"""Routing new requests across replicas (docs/ALGORITHM.md section 7).

A router picks the replica whose planner first tries a request, and where to forward it when that
planner rejects it. The core calls `route(request, candidates, tried)` with the replicas that can
take new requests (alive, role "mixed" or "prefill") and the ones that already rejected this
request; the router returns a replica id or None (nowhere left to try). The core enforces
`max_forwards`; routers only choose.

- `round_robin`: the first try goes to the next replica in turn; a forward goes to the next replica
  after the one that rejected it (ring order), skipping those already tried.
- `least_loaded`: every try goes to the untried replica with the fewest requests (lowest id on
ties).

Session affinity (`Router.choose`, every router): a tool chain's round goes first to the replica
that keeps its chain's KV (docs/AGENTS.md).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence

from formulations.named import Registry
from formulations.request import Request


class Router(ABC):
    name = ""

    def __init__(self, max_forwards: int = 1) -> None:
        if max_forwards < 0:
            raise ValueError("max_forwards must be >= 0")
        self.max_forwards = max_forwards

    @abstractmethod
    def route(self, request: Request, loads: Mapping[int, int], tried: Sequence[int]) -> int | None:
        """Replica to try next. `loads`: candidate replica id -> requests on it (ids ascending);
        `tried`: replicas that already rejected the request, in order."""

    def choose(
        self,
        request: Request,
        loads: Mapping[int, int],
        tried: Sequence[int],
        home: int | None = None,
    ) -> int | None:
        """Session affinity: a tool round goes first to `home`, the replica that keeps its chain's
        KV, when that replica takes new requests and has not rejected it; otherwise (no home, home
        dead or rejected it) the router's own choice, the round recomputing its context there."""
        if home is not None and home in loads and home not in tried:
            return home
        return self.route(request, loads, tried)


ROUTERS: Registry[type[Router]] = Registry("router")


def register(name: str):
    """Class decorator: make a router available by name (as formulations and engines are)."""

    def decorate(cls: type[Router]) -> type[Router]:
        cls.name = name
        return ROUTERS.register(name)(cls)

    return decorate


@register("round_robin")
class RoundRobinRouter(Router):
    def __init__(self, max_forwards: int = 1) -> None:
        super().__init__(max_forwards)
        self._turn = 0

    def route(self, request: Request, loads: Mapping[int, int], tried: Sequence[int]) -> int | None:
        ids = sorted(loads)
        if not ids:
            return None
        if not tried:
            choice = ids[self._turn % len(ids)]
            self._turn += 1
            return choice
        # Ring order after the last replica that rejected it.
        last = tried[-1]
        after = [i for i in ids if i > last] + [i for i in ids if i <= last]
        return next((i for i in after if i not in tried), None)


@register("least_loaded")
class LeastLoadedRouter(Router):
    def route(self, request: Request, loads: Mapping[int, int], tried: Sequence[int]) -> int | None:
        options = [(load, i) for i, load in loads.items() if i not in tried]
        return min(options)[1] if options else None


def make_router(name: str, max_forwards: int = 1) -> Router:
    return ROUTERS.get(name, lambda c: isinstance(c, type) and issubclass(c, Router))(max_forwards)
