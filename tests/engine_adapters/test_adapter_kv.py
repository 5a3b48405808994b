"""The adapter and tool chains' kept KV (docs/AGENTS.md), against a hand-driven planner socket:
READY says whether the engine keeps KV, RELEASE_KV drops a chain's kept KV, a round registered
with cached tokens is clamped to its new tokens (and to all of them after a miss), and losing the
planner drops every kept entry (a planner that registers the engine anew knows none of them)."""

from __future__ import annotations

import time

from engine_adapters.sim_engine import SimEngine
from tests.engine_adapters.test_adapter import FAST, plan, planner, start_adapter, stop
from tests.planner_svc.service_helpers import wait_for
from wire import protocol as P

__all__ = ["planner"]  # the fixture, imported


def sim_engine() -> SimEngine:
    return SimEngine(FAST, 64, block_size=16, clock=time.monotonic, sleep=time.sleep)


def keep_a_round(planner, identity) -> list[P.StepReport]:
    """Run round `a` of chain `c` (40 prompt tokens, 2 output) asking to keep its KV pinned."""
    first = P.EngineRequest("a", 40, 2, chain_id="c", retain_kv="pinned")
    planner.send(identity, plan(0, 0, [{"a": 40}, {"a": 1}], [], [first]))
    return [planner.recv()[1] for _ in range(2)]


def test_ready_says_the_engine_keeps_kv_and_release_kv_drops_it(planner):
    engine = sim_engine()
    adapter, thread = start_adapter(planner.endpoint, engine)
    try:
        identity, ready = planner.recv()
        assert ready.kv_retention is True  # SimEngine.info()
        assert keep_a_round(planner, identity)[-1].finished == ("a",)
        assert engine.kv_blocks()["pinned"] == 3  # 41 tokens computed
        planner.send(identity, P.ReleaseKV(("unknown", "c")))
        assert wait_for(lambda: engine.kv_blocks()["pinned"] == 0, 1.0), engine.kv_blocks()
        assert engine.kv_blocks()["free"] == 64 and not adapter.kept_chains
        assert adapter.stats.num_connects == 1  # released by RELEASE_KV, not by a reconnect
    finally:
        stop(adapter, thread)


def test_cached_tokens_are_not_planned_again_and_a_miss_recomputes_them(planner):
    engine = sim_engine()
    adapter, thread = start_adapter(planner.endpoint, engine)
    try:
        identity, _ = planner.recv()
        keep_a_round(planner, identity)
        # Round b attaches the 41 kept tokens; a plan made as if nothing were cached is clamped.
        second = P.EngineRequest("b", 50, 1, chain_id="c", num_cached_tokens=41)
        # Round m claims KV its engine does not hold: a miss, it prefills its whole prompt.
        missed = P.EngineRequest("m", 40, 1, chain_id="gone", num_cached_tokens=10)
        planner.send(identity, plan(1, 2, [{"b": 50, "m": 40}, {"m": 10}], [], [second, missed]))
        reports = [planner.recv()[1] for _ in range(2)]
        assert [r.error for r in reports] == ["", ""]
        assert reports[0].num_computed_tokens == {"b": 9, "m": 30}  # m clamped as if cached
        assert reports[0].kv_misses == ("m",) and reports[0].finished == ("b",)
        assert reports[1].num_computed_tokens == {"m": 10} and reports[1].finished == ("m",)
        assert engine.kv_blocks()["free"] == 64
    finally:
        stop(adapter, thread)


def test_losing_the_planner_drops_the_kept_kv(planner):
    engine = sim_engine()
    adapter, thread = start_adapter(
        planner.endpoint, engine, heartbeat_interval_s=0.05, liveness=3, reconnect_min_s=0.05
    )
    try:
        identity, _ = planner.recv()
        keep_a_round(planner, identity)
        assert engine.kv_blocks()["pinned"] == 3
        # Say nothing more: the adapter gives the planner up, re-READYs, and keeps nothing.
        second_identity, ready = planner.recv(timeout_s=5)
        assert isinstance(ready, P.Ready) and second_identity != identity
        assert engine.kv_blocks()["pinned"] == 0 and engine.kv_blocks()["free"] == 64
    finally:
        stop(adapter, thread)


class WholeBlocksEngine(SimEngine):
    """A stand-in for vLLM's prefix cache in the sim engine: of a chain's kept KV it attaches only
    the whole blocks and says how many tokens those hold (StepReport.kv_found)."""

    def __init__(self) -> None:
        super().__init__(FAST, 64, block_size=16, clock=time.monotonic, sleep=time.sleep)
        self.found: dict[str, int] = {}

    def _attach(self, request, seq) -> None:
        super()._attach(request, seq)
        num_whole = seq.num_computed_tokens // 16 * 16
        if 0 < num_whole < seq.num_computed_tokens:
            seq.num_computed_tokens = num_whole  # its blocks stay: the last one is refilled
            self.found[request.request_id] = num_whole

    def _kv_news(self) -> dict:
        news = {**super()._kv_news(), "kv_found": dict(self.found)}
        self.found.clear()
        return news


def test_a_partial_hit_is_clamped_to_the_tokens_found(planner):
    """Round b claims 41 kept tokens, the engine holds 32 (two whole blocks): after the report
    that says so, the adapter lets the next plan step compute the 9 tokens that are really left
    (counting from 41, it would cut the step to one token)."""
    engine = WholeBlocksEngine()
    adapter, thread = start_adapter(planner.endpoint, engine)
    try:
        identity, _ = planner.recv()
        keep_a_round(planner, identity)
        second = P.EngineRequest("b", 50, 1, chain_id="c", num_cached_tokens=41)
        planner.send(identity, plan(1, 2, [{"b": 50}, {"b": 50}], [], [second]))
        reports = [planner.recv()[1] for _ in range(2)]
        assert [r.error for r in reports] == ["", ""]
        assert reports[0].num_computed_tokens == {"b": 9} and reports[0].kv_found == {"b": 32}
        assert reports[1].num_computed_tokens == {"b": 9} and reports[1].finished == ("b",)
        assert engine.kv_blocks()["free"] == 64
    finally:
        stop(adapter, thread)
