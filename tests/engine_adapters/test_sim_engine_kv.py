"""The simulated engine keeps tool chains' KV between rounds (docs/AGENTS.md): pinned KV is held
until attached or released, evictable KV counts as free and is evicted least recently kept first,
a round whose kept KV is gone recomputes (reported as a miss), and every block comes back."""

from engine_adapters.engine import EngineRequest
from engine_adapters.sim_engine import SimEngine, VirtualClock
from formulations.plan import Step
from tests.factories import SIMPLE_MODEL


def make_engine(num_blocks=100):
    return SimEngine(SIMPLE_MODEL, num_blocks, 16, clock=VirtualClock(0.0))


def run_round(engine, rid, num_prompt, num_output, retain="drop", cached=0, chain="c"):
    """Register a round and run it to its end (a prefill step, then decodes); the reports."""
    request = EngineRequest(
        rid, num_prompt, num_output, chain_id=chain, num_cached_tokens=cached, retain_kv=retain
    )
    num_attached = engine.add_request(request)
    reports = [engine.execute(Step({rid: num_prompt - num_attached}), 0)]
    for i in range(num_output - 1):
        reports.append(engine.execute(Step({rid: 1}), i + 1))
    assert all(r.ok for r in reports)
    return num_attached, reports


def test_pinned_kv_is_held_then_attached_then_freed():
    engine = make_engine()
    run_round(engine, "r0", 40, 5, retain="pinned")
    # 44 tokens cached (the last output token is never computed): 3 blocks, not free.
    assert engine.kept_chains() == {"c": (44, 3)}
    assert engine.num_free_blocks == 97
    assert engine.kv_blocks()["pinned"] == 3
    num_attached, reports = run_round(engine, "r1", 45 + 10, 4, cached=44)
    assert num_attached == 44
    assert reports[0].num_computed_tokens == {"r1": 11}  # only the new tokens are prefilled
    assert engine.kept_chains() == {}
    assert engine.num_free_blocks == 100  # the last round drops its KV: all blocks back


def test_pinned_kv_released_by_the_planner_and_by_abort():
    engine = make_engine()
    run_round(engine, "r0", 40, 5, retain="pinned")
    engine.clock.now_s = 2.0
    engine.release_kv("c")
    assert engine.num_free_blocks == 100 and engine.kv_blocks()["pinned"] == 0
    assert engine.pinned_block_seconds() > 0  # 3 blocks were held until the release
    run_round(engine, "r1", 40, 5, retain="pinned", chain="d")
    engine.add_request(EngineRequest("r2", 60, 4, chain_id="d", num_cached_tokens=44))
    assert engine.num_free_blocks == 97  # attached, held by r2
    engine.abort("r2")
    assert engine.num_free_blocks == 100


def test_evictable_kv_counts_free_and_is_evicted_lru_first():
    engine = make_engine(num_blocks=10)
    run_round(engine, "a0", 40, 5, retain="evictable", chain="a")  # 3 blocks
    run_round(engine, "b0", 40, 5, retain="evictable", chain="b")  # 3 blocks
    assert engine.num_free_blocks == 10  # evictable blocks count as free
    assert engine.kv_blocks() == {"free": 4, "evictable": 6, "pinned": 0, "held": 0}
    # A 70-token prompt needs 5 blocks: 4 are truly free, so the oldest entry (a) goes.
    engine.add_request(EngineRequest("x", 70, 2))
    report = engine.execute(Step({"x": 70}), 0)
    assert report.ok and report.kv_evicted == ("a",)
    assert set(engine.kept_chains()) == {"b"}
    # Chain b comes back before eviction: a hit; chain a after it: a miss, recomputed.
    assert engine.add_request(EngineRequest("b1", 50, 2, chain_id="b", num_cached_tokens=44)) == 44
    assert engine.add_request(EngineRequest("a1", 50, 2, chain_id="a", num_cached_tokens=44)) == 0
    report = engine.execute(Step({"x": 1, "b1": 6}), 1)
    assert report.ok and report.kv_misses == ("a1",)
    engine.abort("a1")
    for rid in ("x", "b1"):
        engine.abort(rid)
    assert engine.num_free_blocks == 10
    assert engine.kv_blocks()["held"] == 0


def make_host_engine(num_blocks=100, host_blocks=6, swap_s_per_token=0.001):
    return SimEngine(
        SIMPLE_MODEL,
        num_blocks,
        16,
        clock=VirtualClock(0.0),
        host_blocks=host_blocks,
        swap_s_per_token=swap_s_per_token,
    )


def test_host_kv_frees_the_gpu_and_its_copy_in_delays_the_first_step():
    engine = make_host_engine()
    assert engine.info().kv_host_blocks == 6
    run_round(engine, "r0", 40, 5, retain="host")
    assert engine.kept_chains() == {"c": (44, 3)}
    assert engine.num_free_blocks == 100 and engine.num_host_blocks == 3  # off the GPU
    plain = make_engine()  # the same round with its KV recomputed-free: no copy to wait for
    plain.add_request(EngineRequest("r1", 55, 4))
    plain_s = plain.execute(Step({"r1": 11}), 0).end_s
    engine.clock.now_s = 0.0
    num_attached = engine.add_request(
        EngineRequest("r1", 55, 4, chain_id="c", num_cached_tokens=44)
    )
    assert num_attached == 44 and engine.num_free_blocks == 97 and engine.num_host_blocks == 0
    first = engine.execute(Step({"r1": 11}), 0)
    waited_s = (first.end_s - first.start_s) - (plain_s - 0.0)
    assert waited_s > 0.044 - 1e-9  # 44 tokens at 1 ms each, minus nothing: it started at once
    engine.clock.now_s = first.end_s
    second = engine.execute(Step({"r1": 1}), 1)
    assert second.end_s - second.start_s < first.end_s - first.start_s  # waited once only


def test_host_kv_is_evicted_lru_first_and_released_and_nothing_leaks():
    engine = make_host_engine(host_blocks=6)
    run_round(engine, "a0", 40, 5, retain="host", chain="a")  # 3 blocks
    run_round(engine, "b0", 40, 5, retain="host", chain="b")  # 3 blocks: host full
    report = run_round(engine, "c0", 40, 5, retain="host", chain="c")[1][-1]
    assert report.kv_evicted == ("a",)  # the least recently kept left host memory
    assert set(engine.kept_chains()) == {"b", "c"}
    run_round(engine, "big", 120, 5, retain="host", chain="big")  # 8 blocks > the host pool
    assert "big" not in engine.kept_chains()
    engine.release_kv("b")
    num_attached, _ = run_round(engine, "c1", 60, 3, cached=44, chain="c")
    assert num_attached == 44
    num_attached, _ = run_round(engine, "a1", 60, 3, cached=44, chain="a")
    assert num_attached == 0  # evicted from host memory: a miss, recomputed
    assert engine.num_host_blocks == 0 and engine.kept_chains() == {}
    assert engine.num_free_blocks == 100 and engine.kv_blocks()["held"] == 0
