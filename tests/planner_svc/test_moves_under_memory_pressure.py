"""Found while testing `slos-serve serve` on Ray (issue 15): when an engine goes away while the
others are short of KV blocks, the requests moved to them (recomputed: prompt + generated) were
planned into steps that needed more blocks than the engine had ("out of KV blocks: step needs 64,
48 free" with 48 in all); every step was refused, the core gave up on the replica and some
requests never got an ending (about 2 runs in 3). Plans are now checked against the replica's
free blocks before they are sent (formulations/overflow.py for slos_dp: a resume waits, the
request with the most slack is preempted); the baselines admit and resume by memory.
"""

from __future__ import annotations

import time

import pytest

from planner_svc.client import PlannerClient
from tests.planner_svc.service_helpers import Service, make_config


@pytest.mark.parametrize("formulation", ["slos_dp", "vllm_fcfs", "sarathi"])
def test_requests_moved_onto_engines_short_of_kv_blocks_all_end(formulation):
    svc = Service(make_config(formulation=formulation, liveness=4), num_engines=0)
    try:
        for i in range(3):
            svc.add_engine(f"engine-{i}", num_blocks=48)  # ~3 requests of 248 tokens each
        svc.wait_for_engines(3)
        with PlannerClient(svc.daemon.client_endpoint) as client:
            handles = [client.submit(num_prompt_tokens=200, max_tokens=48) for _ in range(30)]
            time.sleep(0.3)
            svc.adapters[0].stop()  # GOODBYE: its requests move to the two others at once
            deadline_s = time.monotonic() + 10  # all of them end within ~3 s once fixed
            for handle in handles:
                handle.wait(max(0.0, deadline_s - time.monotonic()))
            unended = [h.request_id for h in handles if not h.done]
        assert unended == [], f"{len(unended)} requests never ended"
        assert svc.daemon.metrics.core_errors._value.get() == 0
    finally:
        svc.close()
