"""Fault injection and abuse with real processes on loopback (slos-serve planner + sim engines +
clients), each test bounded in time. Every test asserts that every request ends (finished, or an
explicit verdict or error), that the service keeps serving, and that the fault is counted in the
metrics (the planner's Prometheus endpoint, or the front door's / client's counters for faults
only they can see)."""

from __future__ import annotations

import json
import threading
import urllib.request

import pytest

from planner_svc.client import PlannerClient
from planner_svc.http.api_config import ApiConfig
from planner_svc.http.server import ApiServer, ServerThread
from tests.e2e.service_processes import ServiceProcesses, wait_until

pytestmark = pytest.mark.slow

# Every request must have ended this long after a fault (planner and engines use 0.1 s heartbeats
# and a liveness of 5, so a fault is noticed within about half a second).
END_WITHIN_S = 15.0


@pytest.fixture
def service_factory(tmp_path):
    services = []

    def make(**kwargs) -> ServiceProcesses:
        services.append(ServiceProcesses(tmp_path, **kwargs))
        return services[-1]

    yield make
    for service in services:
        service.close()


class SseReader:
    """Reads one streaming /v1/completions answer in a thread: its data payloads in order."""

    def __init__(self, url: str, body: dict) -> None:
        self.payloads: list[str] = []
        request = urllib.request.Request(
            f"{url}/v1/completions",
            data=json.dumps(body).encode(),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        self.thread = threading.Thread(target=self._read, args=(request,), daemon=True)
        self.thread.start()

    def _read(self, request) -> None:
        with urllib.request.urlopen(request, timeout=60) as response:
            for line in response:
                if line.startswith(b"data: "):
                    self.payloads.append(line[6:].strip().decode())

    @property
    def num_token_chunks(self) -> int:
        return sum(1 for p in self.payloads if p.startswith('{"id"'))


def test_planner_kill_9_and_restart_ends_every_request_with_an_error(service_factory):
    """Requests in flight when the planner dies never end there: the client notices the new
    planner's instance id and ends each with an explicit error; an HTTP stream ends with an error
    event; the engines register with the new planner, which serves new requests."""
    service = service_factory(formulation="vllm_fcfs")  # no admission control: all of them run
    client = service.client
    front_client = PlannerClient(service.client_endpoint)
    server = ServerThread(ApiServer(front_client, ApiConfig(verdict_timeout_s=10)))
    try:
        handles = [client.submit(num_prompt_tokens=300, max_tokens=400) for _ in range(12)]
        stream = SseReader(
            server.url,
            {"model": "slos-serve", "prompt": [5] * 20, "max_tokens": 400, "stream": True},
        )
        wait_until(
            lambda: all(h.token_times_s for h in handles) and stream.num_token_chunks > 0,
            20,
            "every request streams tokens",
        )
        old_planner = client.planner_id
        service.kill("planner")
        service.start_planner()
        for handle in handles:
            assert handle.wait(END_WITHIN_S), f"{handle.request_id} never ended"
            assert not handle.finished and "planner restarted" in handle.error
        stream.thread.join(END_WITHIN_S)
        assert not stream.thread.is_alive(), "the HTTP stream hangs"
        assert json.loads(stream.payloads[-2])["error"]["code"] == "request_lost"
        assert "planner restarted" in stream.payloads[-2] and stream.payloads[-1] == "[DONE]"
        assert client.planner_id != old_planner and client.num_planner_restarts == 1
        service.wait_for_engines(2, timeout_s=END_WITHIN_S)  # they register with the new one
        again = client.submit(num_prompt_tokens=100, max_tokens=5)
        assert again.wait(END_WITHIN_S) and again.finished
        text = urllib.request.urlopen(f"{server.url}/metrics", timeout=5).read().decode()
        assert "slos_http_planner_restarts 1.0" in text
    finally:
        server.close()
        front_client.close()
