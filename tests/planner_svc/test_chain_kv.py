"""Tool chains' KV over the daemon (docs/AGENTS.md): a real daemon and real-time sim engines over
ZeroMQ (threads, loopback). The engine keeps a chain's KV between rounds when its READY says it
can, the next round attaches it (its prefill is shorter), rounds go home, a dead home makes the
next round recompute elsewhere, RELEASE_KV frees pinned KV at its time-to-live, and the engines'
block counts return to their start value."""

from __future__ import annotations

import dataclasses
import time

import pytest

from engine_adapters.engine import EngineInfo
from engine_adapters.sim_engine import SimEngine
from formulations.request import ToolChain, ToolRound
from planner_svc.client import PlannerClient
from tests.planner_svc.service_helpers import FAST_MODEL, Service, make_config, wait_for
from wire.protocol import EngineRequest, StepReport

# Many blocks: holding a round's KV over the pause prior costs slos_dp less than recomputing it,
# so it pins (SlosDP.kv_retention); vllm_fcfs leaves it evictable (prefix caching).
NUM_BLOCKS = 65536
# Loose targets: the tests check KV, not attainment, on a loaded 2-core machine.
LOOSE_SLO = {"ttft_ms": 5000.0, "tpot_ms": 1000.0}
CHAIN = ToolChain(
    "agent",
    0.0,
    (ToolRound(600, 8), ToolRound(100, 8, tool_delay_s=0.05), ToolRound(100, 8, tool_delay_s=0.05)),
)


class RecordingEngine(SimEngine):
    """A real-time sim engine that records each payload, the cached tokens it found for it, and
    the tokens it computed per request. `says_kv_retention` False: an engine of the old kind."""

    def __init__(self, says_kv_retention: bool = True) -> None:
        super().__init__(
            FAST_MODEL,
            NUM_BLOCKS,
            clock=time.monotonic,
            sleep=time.sleep,
            emit_token_ids=True,
            advertised_perf_model=FAST_MODEL,
        )
        self.says_kv_retention = says_kv_retention
        self.added: dict[str, tuple[EngineRequest, int]] = {}
        self.computed: dict[str, int] = {}
        self.finished_s: dict[str, float] = {}  # request -> when its last step ended
        self.releases: list[tuple[str, float, int]] = []  # (chain, when, pinned blocks before)
        self.start_blocks = self.kv_blocks()

    def info(self) -> EngineInfo:
        return dataclasses.replace(super().info(), kv_retention=self.says_kv_retention)

    def add_request(self, request: EngineRequest) -> int:
        found = super().add_request(request)
        self.added[request.request_id] = (request, found)
        return found

    def execute(self, step, step_id: int) -> StepReport:
        report = super().execute(step, step_id)
        for rid, num_tokens in report.num_computed_tokens.items():
            self.computed[rid] = self.computed.get(rid, 0) + num_tokens
        for rid in report.finished:
            self.finished_s[rid] = time.monotonic()
        return report

    def release_kv(self, chain_id: str) -> None:
        self.releases.append((chain_id, time.monotonic(), self.kv_blocks()["pinned"]))
        super().release_kv(chain_id)


def start(config, *engines: RecordingEngine) -> Service:
    svc = Service(config, num_engines=0)
    for i, engine in enumerate(engines):
        svc.start_engine(f"engine-{i}", engine)
    svc.wait_for_engines(len(engines))
    return svc


def round_id(k: int) -> str:
    return f"{CHAIN.chain_id}#r{k}"


@pytest.mark.parametrize(
    ("formulation", "kept_as"), [("slos_dp", "pinned"), ("vllm_fcfs", "evictable")]
)
def test_later_rounds_attach_the_kept_kv_and_nothing_leaks(formulation, kept_as):
    engine = RecordingEngine()
    svc = start(make_config(formulation=formulation), engine)
    try:
        assert svc.daemon.core.replica(0).spec.kv_retention  # from the engine's READY
        with PlannerClient(svc.daemon.client_endpoint) as client:
            handles = client.run_tool_chain(CHAIN, timeout_s=10, **LOOSE_SLO)
        assert [h.finished for h in handles] == [True] * 3
        assert [h.verdict().verdict for h in handles] == ["admitted"] * 3
        sent = [engine.added[round_id(k)][0] for k in range(3)]
        assert [p.retain_kv for p in sent] == [kept_as, kept_as, "drop"]  # the last keeps nothing
        for k in (1, 2):
            payload, found = engine.added[round_id(k)]
            previous = CHAIN.round_prompt_tokens(k - 1) + CHAIN.rounds[k - 1].num_output_tokens
            assert payload.num_cached_tokens == previous - 1  # all the previous round computed
            assert found == payload.num_cached_tokens  # the engine attached it
            # Its prefill is only the new tokens: computed = prompt - cached + output - 1.
            prompt = CHAIN.round_prompt_tokens(k)
            expected = prompt - found + CHAIN.rounds[k].num_output_tokens - 1
            assert engine.computed[round_id(k)] == expected < prompt
        assert svc.daemon.core.chains.stats.num_claims == 2
        counters = svc.daemon.stats().counters  # what STATS tells an operator
        assert counters["num_kv_claims"] == 2 and counters["num_kv_misses"] == 0
        assert counters["num_unknown_chain_rounds"] == 0
        assert wait_for(lambda: engine.kv_blocks() == engine.start_blocks), engine.kv_blocks()
        assert not engine.kept_chains()
    finally:
        svc.close()


@pytest.mark.parametrize("goodbye", [True, False], ids=["goodbye", "killed"])
def test_rounds_go_home_and_recompute_elsewhere_when_home_dies(goodbye):
    engines = [RecordingEngine(), RecordingEngine()]
    svc = start(make_config(formulation="slos_dp"), *engines)
    by_replica = {link.replica_id: link.engine_id for link in svc.daemon.engines.values()}
    adapters = {a.config.engine_id: a for a in svc.adapters}
    home: list[int] = []

    def tool(k: int, previous) -> None:
        if k == 1:
            home.append(previous.verdict().replica_id)
            return
        adapter = adapters[by_replica[home[0]]]  # between rounds 1 and 2: the home dies
        if not goodbye:
            adapter._say_goodbye = lambda connection: None  # gone without a word
        adapter.stop()
        assert wait_for(lambda: len(svc.daemon.engines) == 1)

    try:
        with PlannerClient(svc.daemon.client_endpoint) as client:
            handles = client.run_tool_chain(CHAIN, tool=tool, timeout_s=10, **LOOSE_SLO)
        assert [h.finished for h in handles] == [True] * 3
        replicas = [h.verdict().replica_id for h in handles]
        assert replicas[1] == replicas[0] == home[0]  # round robin alone would alternate
        assert replicas[2] != home[0]
        home_engine = engines[int(by_replica[home[0]].split("-")[1])]
        other_engine = engines[1 - engines.index(home_engine)]
        assert home_engine.added[round_id(1)][1] > 0  # attached at home
        payload, found = other_engine.added[round_id(2)]
        assert payload.num_cached_tokens == 0 and found == 0  # recomputed elsewhere
        prompt = CHAIN.round_prompt_tokens(2)
        assert other_engine.computed[round_id(2)] == prompt + CHAIN.rounds[2].num_output_tokens - 1
        # The engine that left dropped the KV it kept for the chain; the other keeps nothing.
        for engine in engines:
            assert wait_for(lambda e=engine: e.kv_blocks() == e.start_blocks), engine.kv_blocks()
    finally:
        svc.close()


@pytest.mark.parametrize("off_by", ["engine", "config"])
def test_without_kv_retention_every_round_drops_its_kv(off_by):
    engine = RecordingEngine(says_kv_retention=off_by != "engine")
    config = make_config(formulation="slos_dp", kv_retention=off_by != "config")
    svc = start(config, engine)
    try:
        assert not svc.daemon.core.replica(0).spec.kv_retention
        with PlannerClient(svc.daemon.client_endpoint) as client:
            handles = client.run_tool_chain(CHAIN, timeout_s=10, **LOOSE_SLO)
        assert [h.finished for h in handles] == [True] * 3
        sent = [engine.added[round_id(k)][0] for k in range(3)]
        assert [(p.retain_kv, p.num_cached_tokens) for p in sent] == [("drop", 0)] * 3
        assert engine.computed[round_id(2)] > CHAIN.round_prompt_tokens(2)  # recomputed
        assert engine.kv_blocks() == engine.start_blocks
    finally:
        svc.close()


def test_a_chain_whose_next_round_never_comes_frees_its_kv_at_the_time_to_live():
    ttl_s = 0.4
    engine = RecordingEngine()
    config = make_config(formulation="slos_dp", core_params={"kv_ttl_s": ttl_s})
    svc = start(config, engine)
    try:
        with PlannerClient(svc.daemon.client_endpoint) as client:
            handle = client.submit(
                request_id="lonely#r0",
                num_prompt_tokens=600,
                max_tokens=8,
                slo_class="tool_agent",
                slo_targets="tool_intermediate",
                chain_id="lonely",
                round_index=0,
                **LOOSE_SLO,
            )
            assert handle.wait(10) and handle.finished
            assert engine.added["lonely#r0"][0].retain_kv == "pinned"
            assert wait_for(lambda: engine.kv_blocks() == engine.start_blocks), engine.kv_blocks()
        [(chain_id, released_s, num_pinned)] = engine.releases
        assert chain_id == "lonely" and num_pinned > 0  # held for a next round until then
        assert released_s - engine.finished_s["lonely#r0"] >= ttl_s  # by the time-to-live
        assert svc.daemon.metrics.kv_releases._value.get() == 1
        assert not svc.daemon.core.replica(0).kept
    finally:
        svc.close()


def test_stats_before_any_engine_connected_count_no_kept_kv():
    """STATS before the first engine connects (no planner core yet) answered nothing: the planner
    process died reading the core's chain counters (seen in the vLLM end-to-end test)."""
    svc = Service(make_config(), num_engines=0)
    try:
        counters = svc.daemon.stats().counters
        assert counters["num_kv_claims"] == 0 and counters["num_kv_partial_hits"] == 0
        with PlannerClient(svc.daemon.client_endpoint) as client:
            assert client.stats(timeout_s=5).counters["num_kv_misses"] == 0
    finally:
        svc.close()
