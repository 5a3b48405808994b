"""CURVE as an operator meets it: rejected handshakes are counted and logged by the planner and
explained by the peer; an engine whose handshake fails still stops on SIGTERM; `slos-serve api`
talks to a CURVE planner."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import urllib.request

import pytest

from commands.demo import free_port
from engine_adapters.adapter import AdapterConfig, EngineAdapter
from planner_svc.client import PlannerClient
from planner_svc.config import CurveConfig
from tests.e2e.service_processes import wait_until
from tests.planner_svc.service_helpers import Service, make_config
from wire.security import CurveKeys, make_keypair


@pytest.fixture(scope="module")
def secure():
    """A CURVE planner that admits one engine key and one client key, with one engine."""
    server_public, server_secret = make_keypair()
    keys = {
        name: CurveKeys(*make_keypair(), server_public_key=server_public)
        for name in ("engine", "client", "stranger")
    }
    curve = CurveConfig(
        server_public,
        server_secret,
        allowed_client_keys=(keys["engine"].public_key, keys["client"].public_key),
    )
    service = Service(make_config(curve=curve), num_engines=0)
    adapter = start_engine(service, "secure-engine", keys["engine"])
    service.wait_for_engines(1)
    yield service, keys, server_public
    adapter.stop()
    service.close()


def start_engine(service: Service, engine_id: str, keys: CurveKeys) -> EngineAdapter:
    config = AdapterConfig(
        service.daemon.engine_endpoint,
        engine_id,
        curve=keys,
        heartbeat_interval_s=0.1,
        liveness=3,
    )
    adapter = EngineAdapter(service.make_engine(1024), config, service.context)
    adapter.thread = threading.Thread(target=adapter.run, daemon=True)
    adapter.thread.start()
    return adapter


def handshake_failures(service: Service, side: str) -> float:
    counter = service.daemon.metrics.handshake_failures
    return sum(counter.labels(side, r)._value.get() for r in ("auth", "protocol", "no_detail"))


def test_rejected_clients_are_counted_and_told_why(secure):
    service, keys, _ = secure
    with PlannerClient(
        service.daemon.client_endpoint, curve=keys["client"], context=service.context
    ) as client:
        assert client.submit(num_prompt_tokens=30, max_tokens=3).wait(10)
    before = handshake_failures(service, "client")
    with PlannerClient(
        service.daemon.client_endpoint,
        curve=keys["stranger"],
        context=service.context,
        heartbeat_interval_s=0.1,
        liveness=5,
    ) as stranger:
        refused = stranger.submit(num_prompt_tokens=30, max_tokens=3)
        assert refused.wait(5) and not refused.finished
        assert "planner unreachable (the handshake with the planner failed (auth)" in refused.error
    with PlannerClient(service.daemon.client_endpoint, context=service.context) as plain:
        plain.submit(num_prompt_tokens=30, max_tokens=3)
        wait_until(lambda: handshake_failures(service, "client") >= before + 2, 5, "counted")
    assert handshake_failures(service, "client") >= before + 2


def test_an_engine_with_a_wrong_server_key_explains_itself_and_stops(secure):
    service, keys, _ = secure
    wrong = CurveKeys(keys["engine"].public_key, keys["engine"].secret_key, make_keypair()[0])
    before = handshake_failures(service, "engine")
    adapter = start_engine(service, "lost-engine", wrong)
    wait_until(lambda: adapter.stats.num_handshake_failures >= 1, 5, "the engine noticed")
    assert handshake_failures(service, "engine") > before
    adapter.stop()
    adapter.thread.join(2)
    assert not adapter.thread.is_alive()
    assert [link.engine_id for link in service.daemon.engines.values()] == ["secure-engine"]


def test_engine_process_refused_by_curve_stops_on_sigterm(secure):
    """Its sends used to block on a socket with no peer, deaf to SIGTERM (`docker stop`)."""
    service, keys, server_public = secure
    stranger = keys["stranger"]
    before = handshake_failures(service, "engine")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "commands.cli",
            "engine",
            "--connect",
            service.daemon.engine_endpoint,
            f"--curve-public-key={stranger.public_key}",
            f"--curve-secret-key={stranger.secret_key}",
            f"--curve-server-key={server_public}",
            "--heartbeat-interval-s",
            "0.1",
            "--liveness",
            "3",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(
            lambda: handshake_failures(service, "engine") >= before + 2, 10, "its handshakes fail"
        )
        process.send_signal(signal.SIGTERM)
        assert process.wait(5) == 0
        assert "the handshake with the planner" in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_api_command_talks_to_a_curve_planner(secure):
    service, keys, server_public = secure
    port = free_port()
    client = keys["client"]
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "commands.cli",
            "api",
            "--planner",
            service.daemon.client_endpoint,
            "--port",
            str(port),
            f"--curve-public-key={client.public_key}",
            f"--curve-secret-key={client.secret_key}",
            f"--curve-server-key={server_public}",
            "--log-level",
            "WARNING",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout.readline().startswith("api ready")
        body = json.dumps({"model": "slos-serve", "prompt": [1, 2, 3], "max_tokens": 2}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert len(json.loads(response.read())["choices"][0]["token_ids"]) == 2
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
