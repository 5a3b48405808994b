"""The daemon's memory does not grow with the requests it served: ended requests are kept only for
a bounded history (counts stay exact), engines forget the ids they were sent, a gone engine's
metric labels are dropped, and a client that disappears has its requests aborted."""

from __future__ import annotations

import zmq

from planner_svc.client import PlannerClient
from tests.e2e.service_processes import wait_until
from tests.planner_svc.service_helpers import Service, make_config
from wire import protocol as P


def test_ended_requests_are_kept_for_a_bounded_history_only():
    service = Service(make_config(max_ended_history=3), num_engines=2)
    try:
        service.wait_for_engines(2)
        with PlannerClient(service.daemon.client_endpoint) as client:
            handles = [client.submit(num_prompt_tokens=50, max_tokens=4) for _ in range(10)]
            assert all(h.wait(10) and h.finished for h in handles)
            stats = client.stats()
        daemon = service.daemon
        assert len(daemon.requests) == 3  # the three that ended last, nothing older
        assert set(daemon.requests) <= {h.request_id for h in handles}
        assert stats.counters["num_requests"] == 10 and stats.counters["num_finished"] == 10
        assert stats.counters["num_admitted"] == 10 and stats.counters["num_in_flight"] == 0
        assert stats.num_requests_by_class == {"chatbot": 10}
        assert all(not link.sent_request_ids for link in daemon.engines.values())
        assert daemon.core.num_unfinished == 0
    finally:
        service.close()


def test_a_client_that_disappears_has_its_requests_aborted():
    service = Service(make_config(client_timeout_s=0.5), num_engines=1)
    context = zmq.Context()
    ghost = context.socket(zmq.DEALER)  # submits, then never says anything again
    ghost.setsockopt(zmq.LINGER, 0)
    ghost.connect(service.daemon.client_endpoint)
    try:
        service.wait_for_engines(1)
        submit = P.Submit(request_id="ghost-1", num_prompt_tokens=40, max_tokens=20_000)
        ghost.send_multipart(P.encode(submit))
        daemon = service.daemon
        wait_until(lambda: "ghost-1" in daemon.requests, 5, "the request arrives")
        wait_until(lambda: daemon.requests["ghost-1"].done, 10, "the ghost's request is aborted")
        assert daemon.requests["ghost-1"].aborted
        assert daemon.metrics.client_timeouts._value.get() == 1
        assert daemon.core.request_state("ghost-1") is None  # its engine is free
        with PlannerClient(daemon.client_endpoint) as client:  # a live client is not timed out
            handle = client.submit(num_prompt_tokens=20, max_tokens=60)
            assert handle.wait(10) and handle.finished
        assert daemon.metrics.client_timeouts._value.get() == 1
    finally:
        ghost.close()
        context.term()
        service.close()


def test_a_gone_engine_leaves_no_metric_labels_behind():
    service = Service(num_engines=2)
    try:
        service.wait_for_engines(2)
        with PlannerClient(service.daemon.client_endpoint) as client:
            assert all(client.submit(num_prompt_tokens=30, max_tokens=3).wait(10) for _ in range(4))
        registry = service.daemon.metrics.registry
        service.daemon._update_queue_gauges()

        def samples(engine_id: str, replica: str) -> list:
            return [
                s
                for metric in registry.collect()
                for s in metric.samples
                if s.labels.get("engine_id") == engine_id or s.labels.get("replica") == replica
            ]

        (replica,) = [
            str(link.replica_id)
            for link in service.daemon.engines.values()
            if link.engine_id == "engine-1"
        ]
        assert samples("engine-1", replica)
        service.adapters[1].stop()
        wait_until(lambda: len(service.daemon.engines) == 1, 10, "engine-1 declared dead")
        wait_until(lambda: not samples("engine-1", replica), 5, "engine-1's labels dropped")
        service.daemon._update_queue_gauges()
        assert not samples("engine-1", replica)
    finally:
        service.close()
