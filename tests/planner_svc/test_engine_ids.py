"""Engine ids: a second engine that uses the id of a live one is refused, with a clear error on
both sides, and the first keeps serving (two engines with one id used to evict each other in a
loop); an engine restarted under its old id is let in once its dead namesake timed out; the CLI's
default id is unique per process."""

from __future__ import annotations

import os
import threading
import time

from commands.cli import build_parser
from engine_adapters.adapter import AdapterConfig, EngineAdapter
from planner_svc.client import PlannerClient
from tests.planner_svc.service_helpers import Service


def start_adapter(service: Service, engine_id: str) -> tuple[EngineAdapter, threading.Thread]:
    """An engine with the daemon's heartbeat settings (it gives up after two of its windows)."""
    config = AdapterConfig(
        service.daemon.engine_endpoint, engine_id, heartbeat_interval_s=0.1, liveness=4
    )
    adapter = EngineAdapter(service.make_engine(4096), config, service.context)
    thread = threading.Thread(target=adapter.run, daemon=True)
    thread.start()
    return adapter, thread


def refusals(service: Service) -> float:
    counter = service.daemon.metrics.rejected_frames.labels("engine", "duplicate_engine_id")
    return counter._value.get()


def test_a_second_engine_with_a_live_id_is_refused_and_the_first_keeps_serving():
    service = Service(num_engines=1)
    try:
        service.wait_for_engines(1)
        with PlannerClient(service.daemon.client_endpoint) as client:
            long_request = client.submit(num_prompt_tokens=50, max_tokens=300)
            assert long_request.verdict(5).verdict == "admitted"
            intruder, thread = start_adapter(service, "engine-0")
            thread.join(10)
            assert not thread.is_alive(), "the second engine never gave up"
            assert "already used by a live engine" in intruder.fatal_error
            assert refusals(service) >= 1
            assert service.daemon.metrics.engine_deaths._value.get() == 0
            assert [link.engine_id for link in service.daemon.engines.values()] == ["engine-0"]
            assert long_request.wait(20) and long_request.finished
    finally:
        service.close()


def test_an_engine_restarted_under_its_id_gets_in_once_its_namesake_timed_out():
    service = Service(num_engines=0)
    try:
        first, first_thread = start_adapter(service, "engine-a")
        service.wait_for_engines(1)
        first._say_goodbye = lambda connection: None  # a crash: no GOODBYE
        first.stop()  # gone without a word: the planner still lists it
        first_thread.join(5)
        second, second_thread = start_adapter(service, "engine-a")
        deadline = time.monotonic() + 10
        while not (
            len(service.daemon.engines) == 1
            and next(iter(service.daemon.engines.values())).engine_instance == second.instance_id
        ):
            assert time.monotonic() < deadline, "the restarted engine never got in"
            time.sleep(0.02)
        assert second.fatal_error == "" and second_thread.is_alive()
        assert service.daemon.metrics.engine_deaths._value.get() == 1  # its namesake timed out
        with PlannerClient(service.daemon.client_endpoint) as client:
            assert client.submit(num_prompt_tokens=20, max_tokens=3).wait(10)
        second.stop()
        second_thread.join(5)
    finally:
        service.close()


def test_the_default_engine_id_is_unique_per_process():
    args = build_parser().parse_args(["engine"])
    assert args.engine_id.endswith(f"-{os.getpid()}") and args.engine_id != "engine-0"
