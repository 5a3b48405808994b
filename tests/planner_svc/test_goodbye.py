"""An engine that is stopped says GOODBYE: the daemon removes its replica at once (not after
`liveness` silent heartbeat intervals) and its requests finish on the other engines."""

from __future__ import annotations

import time

from planner_svc.client import PlannerClient
from tests.planner_svc.service_helpers import Service, make_config
from wire import protocol as P


def test_a_stopped_engine_leaves_at_once_and_its_requests_finish_elsewhere():
    # Silence alone would take 100 x 0.1 s = 10 s to notice.
    svc = Service(make_config(liveness=100), num_engines=2)
    try:
        svc.wait_for_engines(2)
        with PlannerClient(svc.daemon.client_endpoint) as client:
            handles = [client.submit(num_prompt_tokens=100, max_tokens=150) for _ in range(6)]
            deadline = time.monotonic() + 10
            while not all(h.token_times_s for h in handles) and time.monotonic() < deadline:
                time.sleep(0.01)
            leaving = svc.adapters[0]
            assert leaving.live, "the engine to stop has no request running"
            stopped_s = time.monotonic()
            leaving.stop()
            while len(svc.daemon.engines) > 1 and time.monotonic() - stopped_s < 5:
                time.sleep(0.01)
            left_after_s = time.monotonic() - stopped_s
            for handle in handles:
                assert handle.wait(20), handle.request_id
                assert handle.finished and len(handle.token_times_s) > 0
        assert left_after_s < 2.0, f"replica removed only after {left_after_s:.1f}s"
        assert svc.daemon.num_moved_requests > 0
        assert svc.daemon.metrics.engine_deaths._value.get() == 0  # a departure, not a death
    finally:
        svc.close()


def test_goodbye_is_a_valid_engine_message():
    frames = P.encode(P.Goodbye(engine_id="engine-3", reason="scaled down"))
    message = P.decode(frames, P.ENGINE_TO_PLANNER)
    assert message == P.Goodbye(engine_id="engine-3", reason="scaled down")
