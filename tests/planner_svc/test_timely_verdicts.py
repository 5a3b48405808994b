"""Every verdict reaches its client within the request's TTFT budget, even when core calls are
long: the daemon gives the fallback verdict to a request the next call would leave undecided past
its deadline (expiring it one call early, not at the deadline), counts the time a request waited
in the socket behind a call against its budget, and rejects at once one that arrives with less
than a call's time left. Made deterministic with a formulation that takes 60 ms per plan and never
decides (a stand-in for a slow DP in a burst)."""

from __future__ import annotations

import threading
import time

from engine_adapters.adapter import AdapterConfig, EngineAdapter
from formulations.interface import Formulation
from formulations.plan import Plan
from formulations.state import ReplicaView
from planner_svc.client import PlannerClient
from tests.planner_svc.service_helpers import Service, make_config

PLAN_S = 0.06
TTFT_MS = 150.0
NUM_REQUESTS = 8


class SlowUndecided(Formulation):
    """Admission control on, 60 ms per plan, no decision, no steps."""

    def plan(self, view: ReplicaView) -> Plan:
        time.sleep(PLAN_S)
        return Plan()


def test_verdicts_in_a_burst_arrive_within_the_ttft_budget():
    formulation = f"{__name__}:SlowUndecided"
    service = Service(make_config(formulation=formulation), num_engines=1)
    try:
        service.wait_for_engines(1)
        with PlannerClient(service.daemon.client_endpoint) as client:
            received_s: dict[str, float] = {}
            lock = threading.Lock()
            handles = []
            for _ in range(NUM_REQUESTS):
                handle = client.submit(num_prompt_tokens=20, max_tokens=4, ttft_ms=TTFT_MS)

                def on_event(event, rid=handle.request_id):
                    with lock:
                        received_s.setdefault(rid, client.now_s())

                handle.add_callback(on_event)
                handles.append(handle)
            for handle in handles:
                assert handle.verdict(10).verdict == "rejected"
            late = [
                round(received_s[h.request_id] - h.arrival_s, 3)
                for h in handles
                if received_s[h.request_id] - h.arrival_s > TTFT_MS / 1000
            ]
            assert not late, f"verdicts after the {TTFT_MS:g} ms budget: {late}"
        delay = service.daemon.metrics.verdict_delay  # the same on the planner's clock
        within = delay.collect()[0].samples
        counts = {s.labels.get("le"): s.value for s in within if s.name.endswith("_bucket")}
        assert counts["1.0"] == counts["+Inf"] == NUM_REQUESTS
    finally:
        service.close()


class VerySlowUndecided(SlowUndecided):
    """Each plan takes longer than the engines' liveness window (0.4 s here)."""

    def plan(self, view: ReplicaView) -> Plan:
        time.sleep(0.6)
        return Plan()


def test_engines_are_not_declared_dead_while_core_calls_keep_the_loop_busy():
    """The planner's liveness window is 0.4 s, its plans take 0.6 s; the engine (patient: 2 s)
    heartbeats every 0.1 s into a socket the busy loop reads only between plans."""
    formulation = f"{__name__}:VerySlowUndecided"
    service = Service(make_config(formulation=formulation), num_engines=0)
    try:
        config = AdapterConfig(
            service.daemon.engine_endpoint, "engine-0", heartbeat_interval_s=0.1, liveness=20
        )
        adapter = EngineAdapter(service.make_engine(1024), config, service.context)
        service.adapters.append(adapter)
        thread = threading.Thread(target=adapter.run, daemon=True)
        thread.start()
        service._threads.append(thread)
        service.wait_for_engines(1)
        with PlannerClient(service.daemon.client_endpoint) as client:
            handle = client.submit(num_prompt_tokens=20, max_tokens=4, ttft_ms=1500.0)
            assert handle.verdict(10).verdict == "rejected"  # undecided until its deadline
        assert service.daemon.metrics.engine_deaths._value.get() == 0
        assert len(service.daemon.engines) == 1
    finally:
        service.close()
