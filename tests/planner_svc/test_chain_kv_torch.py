"""A tool chain over the daemon on the torch engine (docs/AGENTS.md): the next round attaches the
paged KV its engine kept from the previous round and generates exactly the tokens of plain
full-sequence greedy decoding of its whole prompt; the engine's blocks all come back after."""

from __future__ import annotations

import threading

import pytest

torch = pytest.importorskip("torch")

from commands.make_model import make_model  # noqa: E402
from engine_adapters.adapter import AdapterConfig, EngineAdapter  # noqa: E402
from engine_adapters.torch_engine.engine import TorchEngine  # noqa: E402
from planner_svc.client import PlannerClient  # noqa: E402
from tests.planner_svc.service_helpers import Service, make_config, wait_for  # noqa: E402
from tests.planner_svc.test_http_torch import greedy_reference  # noqa: E402

LOOSE_SLO = {"ttft_ms": 30000.0, "tpot_ms": 5000.0}  # the check is tokens and KV, not latency


class Recording(TorchEngine):
    """Records the cached tokens the engine found for each request."""

    found: dict[str, int] = {}

    def add_request(self, request):
        found = super().add_request(request)
        Recording.found[request.request_id] = found
        return found


@pytest.mark.parametrize("formulation", ["slos_dp", "vllm_fcfs"])
def test_next_round_from_kept_kv_is_greedy_identical(tmp_path, formulation):
    torch.set_num_threads(1)
    make_model("tiny", tmp_path, seed=0)
    service = Service(make_config(formulation=formulation, liveness=30), num_engines=0)
    engine = Recording.from_pretrained(tmp_path, kv_memory_gb=0.05)
    start_blocks = engine.kv_blocks()
    adapter = EngineAdapter(
        engine, AdapterConfig(service.daemon.engine_endpoint, "torch-0"), service.context
    )
    thread = threading.Thread(target=adapter.run, daemon=True)
    thread.start()
    service.adapters.append(adapter)
    service._threads.append(thread)
    try:
        service.wait_for_engines(1, timeout_s=30)
        assert service.daemon.core.replica(0).spec.kv_retention  # the torch engine says so
        prompt = [(7 * i + 3) % 200 + 5 for i in range(37)]  # 37: the kept KV ends mid-block
        with PlannerClient(service.daemon.client_endpoint) as client:
            outputs = []
            for k in range(3):
                handle = client.submit(
                    request_id=f"c#r{k}",
                    prompt_token_ids=prompt,
                    max_tokens=6,
                    chain_id="c",
                    round_index=k,
                    chain_last_round=k == 2,
                    **LOOSE_SLO,
                )
                assert handle.wait(60) and handle.finished
                outputs.append(list(handle.token_ids))
                assert outputs[-1] == greedy_reference(tmp_path, prompt, 6)
                prompt = prompt + outputs[-1] + [11 + k, 12 + k, 13 + k]  # the tool's output
        assert Recording.found["c#r0"] == 0
        for k in (1, 2):
            assert Recording.found[f"c#r{k}"] > 0  # attached, not recomputed
        assert wait_for(lambda: engine.kv_blocks() == start_blocks), engine.kv_blocks()
    finally:
        service.close()
