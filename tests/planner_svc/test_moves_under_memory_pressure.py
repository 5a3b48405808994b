"""Found while testing `slos-serve serve` on Ray (issue 15), left to the planner core's owner:
when an engine goes away while the others are short of KV blocks, the requests moved to them
(recomputed: prompt + generated) are planned into steps that need more blocks than the engine
has ("out of KV blocks: step needs 64, 48 free" with 48 in all); every step is refused, the core
gives up on the replica (`PlanError: ... consecutive steps could not be executed`) and some
requests never get an ending. It reproduces in about 2 runs out of 3 (it depends on where the
stopped engine's requests stand), so it is skipped rather than an xfail that would flip at random:
un-skip it (and run it a few times) when working on the core's moves.
"""

from __future__ import annotations

import time

import pytest

from planner_svc.client import PlannerClient
from tests.planner_svc.service_helpers import Service, make_config


@pytest.mark.skip(reason="planner core bug, reproduces ~2 runs in 3: moved requests overfill KV")
def test_requests_moved_onto_engines_short_of_kv_blocks_all_end():
    svc = Service(make_config(formulation="slos_dp", liveness=4), num_engines=0)
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
