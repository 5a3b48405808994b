"""A tool chain over the daemon on the vLLM engine (docs/AGENTS.md "The vLLM engine keeps KV"):
the planner claims the chain's kept KV for each later round, vLLM starts the round with the whole
cached blocks of that claim (fewer tokens than claimed: the core starts the round there and
re-plans the rest), every round generates exactly vLLM's own greedy tokens for its whole prompt,
and the engine's blocks all come back.

Run with `make test-vllm` (needs .venv-vllm); skipped when vLLM is not importable."""

from __future__ import annotations

import os
import threading
import time

import pytest

pytest.importorskip("vllm")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"


from engine_adapters.adapter import AdapterConfig, EngineAdapter
from engine_adapters.vllm.engine import VLLMEngine
from planner_svc.client import PlannerClient
from tests.engine_adapters import vllm_support
from tests.engine_adapters.vllm_support import ENGINE_ARGS, make_prompt
from tests.planner_svc.service_helpers import Service, make_config

model_dir = vllm_support.model_dir
reference = vllm_support.reference

pytestmark = pytest.mark.vllm

LOOSE_SLO = {"ttft_ms": 30000.0, "tpot_ms": 5000.0}  # the check is tokens and KV, not latency


class Recording(VLLMEngine):
    """Records what each step report said of kept KV."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.kv_found: dict[str, int] = {}
        self.kv_misses: list[str] = []

    def execute(self, step, step_id):
        report = super().execute(step, step_id)
        self.kv_found.update(report.kv_found)
        self.kv_misses += report.kv_misses
        return report


def run_chain(service, outputs: dict, errors: list) -> None:
    """The client's side: three rounds, each prompt the previous context plus a tool's output."""
    try:
        service.wait_for_engines(1, timeout_s=60)
        prompt = make_prompt(21, 70)
        with PlannerClient(service.daemon.client_endpoint) as client:
            for k in range(3):
                rid = f"c#r{k}"
                handle = client.submit(
                    request_id=rid,
                    prompt_token_ids=prompt,
                    max_tokens=8,
                    ignore_eos=True,
                    chain_id="c",
                    round_index=k,
                    chain_last_round=k == 2,
                    **LOOSE_SLO,
                )
                if not (handle.wait(120) and handle.finished):
                    errors.append(f"{rid} did not finish: {handle}")
                    return
                outputs[rid] = (prompt, list(handle.token_ids))
                prompt = prompt + outputs[rid][1] + make_prompt(30 + k, 20)  # the tool's output
    except Exception as exc:  # reported by the test's main thread
        errors.append(repr(exc))


@pytest.fixture(scope="module")
def engine(model_dir):
    return Recording(model_dir, ENGINE_ARGS)


@pytest.mark.parametrize("formulation", ["slos_dp", "vllm_fcfs"])
def test_later_rounds_start_from_the_cached_blocks_and_are_greedy_identical(
    engine, reference, formulation
):
    """Round 0: 70 prompt tokens, 8 out: 77 tokens kept, 64 in whole blocks. Round 1 (prompt 78 +
    20 tool tokens = 98, 8 out) claims 77 and starts at 64; round 2 claims 105 and starts at 96.
    The adapter runs in this (the main) thread, as `slos-serve engine` runs it: vLLM's CPU
    attention checks that the thread running it has the OpenMP thread count the engine was built
    with."""
    engine.kv_found, engine.kv_misses = {}, []
    start_free = engine.num_free_blocks
    service = Service(make_config(formulation=formulation, liveness=30), num_engines=0)
    adapter = EngineAdapter(
        engine, AdapterConfig(service.daemon.engine_endpoint, "vllm-0"), service.context
    )
    outputs: dict[str, tuple[list[int], list[int]]] = {}
    errors: list[str] = []

    after: list[tuple[int, dict]] = []  # free blocks and kept chains once the chain ended
    kv_retention: list[bool] = []

    def client_side() -> None:
        run_chain(service, outputs, errors)
        kv_retention.append(service.daemon.core.replica(0).spec.kv_retention)
        deadline_s = time.monotonic() + 5  # before the adapter stops (it drops kept KV then)
        while engine.num_free_blocks != start_free and time.monotonic() < deadline_s:
            time.sleep(0.05)
        after.append((engine.num_free_blocks, engine.kept_chains()))
        adapter.stop()

    client = threading.Thread(target=client_side, daemon=True)
    try:
        client.start()
        adapter.run()
        client.join(10)
        assert errors == []
        assert kv_retention == [True]  # the vLLM engine says so in READY
        for rid, (prompt, output) in outputs.items():
            assert output == reference({rid: (prompt, 8)})[rid], rid
        assert len(outputs) == 3
        assert engine.kv_found == {"c#r1": 64, "c#r2": 96} and engine.kv_misses == []
        stats = service.daemon.core.chains.stats  # the core claimed, then started them there
        assert (stats.num_claims, stats.num_partial_hits, stats.num_misses) == (2, 2, 0)
        assert service.daemon.stats().counters["num_kv_partial_hits"] == 2  # what STATS says
        assert after == [(start_free, {})]
    finally:
        service.close()
