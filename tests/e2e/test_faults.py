"""Fault injection and abuse with real processes on loopback (slos-serve planner + sim engines +
clients), each test bounded in time. Every test asserts that every request ends (finished, or an
explicit verdict or error), that the service keeps serving, and that the fault is counted in the
metrics (the planner's Prometheus endpoint, or the front door's / client's counters for faults
only they can see)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import zmq

from commands.demo import wait_for_engines
from planner_svc.client import PlannerClient
from planner_svc.http.api_config import ApiConfig
from planner_svc.http.server import ApiServer, ServerThread
from tests.e2e.service_processes import CLI, ServiceProcesses, record_fault_counts, wait_until
from wire import protocol as P
from wire.security import CurveKeys, make_keypair

pytestmark = pytest.mark.slow

# Every request must have ended this long after a fault (planner and engines use 0.1 s heartbeats
# and a liveness of 5, so a fault is noticed within about half a second).
END_WITHIN_S = 15.0


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
        record_fault_counts(
            "planner kill -9 + restart, 13 requests in flight",
            slos_http_planner_restarts=1,
            requests_failed_with_planner_restarted=len(handles) + 1,
            client_num_planner_restarts=client.num_planner_restarts,
        )
    finally:
        server.close()
        front_client.close()


def test_engine_kill_9_mid_run_loses_no_request(service_factory):
    service = service_factory()
    handles = [service.client.submit(num_prompt_tokens=300, max_tokens=80) for _ in range(10)]
    wait_until(lambda: sum(bool(h.token_times_s) for h in handles) >= 4, 20, "tokens flow")
    service.kill("engine-1")
    for handle in handles:
        assert handle.wait(END_WITHIN_S), f"{handle.request_id} neither finished nor got a verdict"
    assert all(h.finished and len(h.token_ids) == 80 for h in handles)  # moved to engine-0
    assert service.metric("slos_engine_deaths_total") == 1
    assert service.metric("slos_engines_alive") == 1
    moved = service.client.stats().counters["num_moved_requests"]
    assert moved >= 1
    record_fault_counts(
        "engine kill -9, 10 requests in flight",
        slos_engine_deaths_total=service.metric("slos_engine_deaths_total"),
        num_moved_requests=moved,
    )


def test_engine_stopped_longer_than_the_liveness_window_then_resumed(service_factory):
    """SIGSTOP: the planner declares the engine dead and moves its requests; SIGCONT: the engine
    notices it was dropped, registers again, and serves new requests."""
    service = service_factory()
    handles = [service.client.submit(num_prompt_tokens=200, max_tokens=60) for _ in range(8)]
    wait_until(lambda: sum(bool(h.token_times_s) for h in handles) >= 4, 20, "tokens flow")
    service.signal("engine-1", signal.SIGSTOP)
    try:
        wait_until(lambda: service.metric("slos_engine_deaths_total") == 1, 10, "declared dead")
        for handle in handles:
            assert handle.wait(END_WITHIN_S) and handle.finished and len(handle.token_ids) == 60
    finally:
        service.signal("engine-1", signal.SIGCONT)
    service.wait_for_engines(2, timeout_s=END_WITHIN_S)  # it registered again
    later = [service.client.submit(num_prompt_tokens=100, max_tokens=5) for _ in range(6)]
    assert all(h.wait(END_WITHIN_S) and h.finished for h in later)
    assert service.metric("slos_engine_deaths_total") == 1
    record_fault_counts(
        "engine SIGSTOP past the liveness window, then SIGCONT",
        slos_engine_deaths_total=service.metric("slos_engine_deaths_total"),
        slos_engines_alive=service.metric("slos_engines_alive"),
    )


GONE_CLIENT = """
import sys, time
from planner_svc.client import PlannerClient
client = PlannerClient(sys.argv[1])
handles = [client.submit(num_prompt_tokens=200, max_tokens=3000) for _ in range(4)]
assert all(h.verdict(30).verdict == "admitted" for h in handles)
print("streaming", flush=True)
time.sleep(120)
"""


def test_a_client_that_disappears_mid_stream_has_its_requests_aborted(service_factory):
    service = service_factory(extra_config="client_timeout_s = 1.0")
    process = subprocess.Popen(
        [sys.executable, "-c", GONE_CLIENT, service.client_endpoint],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout.readline().strip() == "streaming"
        process.kill()  # no goodbye: the planner only sees it go silent
        process.wait(10)
        wait_until(
            lambda: service.metric("slos_requests_aborted_total") == 4, END_WITHIN_S, "aborted"
        )
        assert service.metric("slos_client_timeouts_total") == 1
        assert service.client.stats().counters["num_in_flight"] == 0
        record_fault_counts(
            "client process kill -9 with 4 streams open",
            slos_client_timeouts_total=service.metric("slos_client_timeouts_total"),
            slos_requests_aborted_total=service.metric("slos_requests_aborted_total"),
        )
        again = service.client.submit(num_prompt_tokens=100, max_tokens=5)
        assert again.wait(END_WITHIN_S) and again.finished
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_duplicate_engine_ids(service_factory):
    """A second engine with a live engine's id exits with one line on stderr; engines started
    without --engine-id get unique ones; nobody is evicted."""
    service = service_factory(num_engines=1)
    duplicate = subprocess.run(
        [*engine_argv(service), "--engine-id", "engine-0"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert duplicate.returncode == 2
    last_line = duplicate.stderr.strip().splitlines()[-1]
    assert "already used by a live engine" in last_line and "Traceback" not in duplicate.stderr
    assert service.metric("slos_rejected_frames_total", reason="duplicate_engine_id") >= 1
    service.group.start("unnamed-a", engine_argv(service))
    service.group.start("unnamed-b", engine_argv(service))
    service.wait_for_engines(3)
    assert service.metric("slos_engine_deaths_total") == 0
    handles = [service.client.submit(num_prompt_tokens=50, max_tokens=4) for _ in range(6)]
    assert all(h.wait(END_WITHIN_S) and h.finished for h in handles)
    record_fault_counts(
        "a second engine with a live engine's id",
        refused_duplicate_engine_id=service.metric(
            "slos_rejected_frames_total", reason="duplicate_engine_id"
        ),
        slos_engine_deaths_total=service.metric("slos_engine_deaths_total"),
    )


def engine_argv(service: ServiceProcesses) -> list[str]:
    return [
        *CLI,
        "engine",
        "--connect",
        service.engine_endpoint,
        "--heartbeat-interval-s",
        "0.1",
        "--liveness",
        "5",
        "--log-level",
        "WARNING",
    ]


def bad_frames(max_frame_bytes: int) -> list[list[bytes]]:
    """Random, truncated, wrong-type and oversized frames (each one is rejected and counted)."""
    submit = P.encode(P.Submit(request_id="x", max_tokens=1, num_prompt_tokens=1))
    return [
        [b"\x00", os.urandom(100)],  # random (an unknown type byte, random bytes)
        [b"S", os.urandom(100)],
        [submit[0], submit[1][: len(submit[1]) // 2]],  # truncated
        [b"S", b"", b""],  # a wrong number of frames
        [b"P", P.encode(P.PlanMsg(plan_id=0, start_step_id=0))[1]],  # wrong type for the socket
        [b"S", b"\x00" * (max_frame_bytes + 1)],  # oversized (read, answered, counted)
    ]


def test_garbage_at_every_socket(service_factory):
    max_frame_bytes = 65536
    service = service_factory(num_engines=1, max_frame_bytes=max_frame_bytes)
    context = zmq.Context()
    try:
        for side, endpoint in (
            ("client", service.client_endpoint),
            ("engine", service.engine_endpoint),
        ):
            sock = context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(endpoint)
            frames = bad_frames(max_frame_bytes)
            for frame in frames:
                sock.send_multipart(frame)
            replies = [sock.recv_multipart() for _ in frames if sock.poll(5000)]
            assert len(replies) == len(frames)  # each one answered with ERROR
            assert service.metric("slos_rejected_frames_total", socket=side) == len(frames)
            sock.send_multipart([b"S", b"\x00" * (4 << 20)])  # far over: dropped unread
            wait_until(
                lambda side=side: service.metric("slos_peer_disconnects_total", socket=side) >= 1,
                10,
                f"the {side} socket drops the sender",
            )
            sock.close()
            port = int(endpoint.rsplit(":", 1)[1])
            with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:  # not ZeroMQ
                raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            wait_until(
                lambda side=side: service.metric("slos_handshake_failures_total", socket=side) >= 1,
                10,
                f"the {side} socket counts the failed handshake",
            )
        rejected = {k: v for k, v in service.metrics().items() if "rejected_frames" in k}
        assert service.metric("slos_rejected_frames_total") == 2 * len(bad_frames(1024)), rejected
        record_fault_counts(
            "6 bad frames, 1 frame of 4 MB and non-ZeroMQ bytes at each planner socket",
            slos_rejected_frames_total=service.metric("slos_rejected_frames_total"),
            slos_peer_disconnects_total=service.metric("slos_peer_disconnects_total"),
            slos_handshake_failures_total=service.metric("slos_handshake_failures_total"),
        )
        handle = service.client.submit(num_prompt_tokens=100, max_tokens=5)
        assert handle.wait(END_WITHIN_S) and handle.finished  # still serving
        assert not service.group.any_died()
    finally:
        context.term()


def test_garbage_from_the_planner_side_leaves_an_engine_serving():
    """An engine process connected to a fake planner that sends it junk: it drops the frames,
    logs a few lines (not one per frame), and keeps talking to the planner."""
    context = zmq.Context()
    fake = context.socket(zmq.ROUTER)
    fake.setsockopt(zmq.LINGER, 0)
    port = fake.bind_to_random_port("tcp://127.0.0.1")
    argv = [*CLI, "engine", "--connect", f"tcp://127.0.0.1:{port}", "--engine-id", "e"]
    engine = subprocess.Popen(
        [*argv, "--heartbeat-interval-s", "0.1", "--liveness", "50", "--log-level", "WARNING"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert fake.poll(20_000), "no READY"
        identity, *ready = fake.recv_multipart()
        assert isinstance(P.decode(ready, P.ENGINE_TO_PLANNER), P.Ready)
        for _ in range(200):
            for frame in bad_frames(P.DEFAULT_MAX_FRAME_BYTES):
                fake.send_multipart([identity, *frame])
        fake.send_multipart([identity, *P.encode(P.Heartbeat("planner"))])
        deadline = time.monotonic() + 10
        heard = 0
        while heard < 5 and time.monotonic() < deadline:  # it keeps heartbeating
            if fake.poll(500):
                fake.recv_multipart()
                heard += 1
        assert heard == 5 and engine.poll() is None
    finally:
        engine.terminate()
        _, err = engine.communicate(timeout=10)
        fake.close()
        context.term()
    assert engine.returncode == 0
    rejected_lines = [line for line in err.splitlines() if "rejected frame from planner" in line]
    assert 1 <= len(rejected_lines) <= 5  # 1,200 bad frames, a few lines
    record_fault_counts(
        "1,200 bad frames from a fake planner at an engine",
        engine_log_lines=len(rejected_lines),
        heartbeats_after=heard,
    )


def test_garbage_at_the_http_front_door(service_factory):
    service = service_factory(num_engines=1)
    front = PlannerClient(service.client_endpoint)
    server = ServerThread(ApiServer(front, ApiConfig(max_body_bytes=1 << 20)))
    try:
        host, port = "127.0.0.1", server.port
        with socket.create_connection((host, port), timeout=5) as raw:  # not HTTP at all
            raw.sendall(os.urandom(256))
        bodies = [b'{"model": "slos-serve", "prompt": [1, 2', b"[" * 50_000, b"x" * (2 << 20)]
        statuses = []
        for body in bodies:
            request = urllib.request.Request(f"{server.url}/v1/completions", data=body)
            try:
                urllib.request.urlopen(request, timeout=10)
            except urllib.error.HTTPError as exc:
                statuses.append(exc.code)
        assert statuses == [400, 400, 413]
        text = urllib.request.urlopen(f"{server.url}/metrics", timeout=5).read().decode()
        assert 'slos_http_requests_total{path="/v1/completions",status="400"} 2.0' in text
        assert 'slos_http_requests_total{path="/v1/completions",status="413"} 1.0' in text
        body = json.dumps({"model": "slos-serve", "prompt": [1, 2, 3], "max_tokens": 3}).encode()
        request = urllib.request.Request(
            f"{server.url}/v1/completions", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=20) as response:
            assert len(json.loads(response.read())["choices"][0]["token_ids"]) == 3
        record_fault_counts(
            "garbage at the HTTP front door (non-HTTP bytes, truncated JSON, deep nesting, 2 MB)",
            http_400=2,
            http_413=1,
        )
    finally:
        server.close()
        front.close()


def test_curve_with_wrong_keys(service_factory, tmp_path):
    server_public, server_secret = make_keypair()
    engine_public, engine_secret = make_keypair()
    client_keys = CurveKeys(*make_keypair(), server_public_key=server_public)
    curve = (
        f'\n[curve]\npublic_key = "{server_public}"\nsecret_key = "{server_secret}"\n'
        f'allowed_client_keys = ["{engine_public}", "{client_keys.public_key}"]\n'
    )
    service = service_factory(num_engines=0, extra_config=curve)
    good = [f"--curve-public-key={engine_public}", f"--curve-secret-key={engine_secret}"]
    service.start_engine("engine-0", *good, f"--curve-server-key={server_public}")
    wrong_server = make_keypair()[0]
    service.start_engine("lost", *good, f"--curve-server-key={wrong_server}")
    stranger = [f"--curve-{k}-key={v}" for k, v in zip(("public", "secret"), make_keypair())]
    service.start_engine("stranger", *stranger, f"--curve-server-key={server_public}")
    with PlannerClient(service.client_endpoint, curve=client_keys) as client:
        wait_for_engines(client, 1, service.group, timeout_s=30)
        handle = client.submit(num_prompt_tokens=50, max_tokens=4)
        assert handle.wait(END_WITHIN_S) and handle.finished
        wait_until(
            lambda: service.metric("slos_handshake_failures_total", socket="engine") >= 2,
            10,
            "both refused engines counted",
        )
        assert client.stats().num_engines == 1
    plain = PlannerClient(service.client_endpoint, heartbeat_interval_s=0.1, liveness=5)
    try:
        refused = plain.submit(num_prompt_tokens=50, max_tokens=4)
        assert refused.wait(END_WITHIN_S) and "planner unreachable" in refused.error
    finally:
        plain.close()
    assert service.metric("slos_handshake_failures_total", socket="client") >= 1
    for name in ("lost", "stranger"):  # refused engines still stop on SIGTERM
        service.signal(name, signal.SIGTERM)
        assert service.group.processes[name].wait(5) == 0
    record_fault_counts(
        "CURVE: an engine with a wrong server key, one with an unknown key, a plain client",
        engine_handshake_failures=service.metric("slos_handshake_failures_total", socket="engine"),
        client_handshake_failures=service.metric("slos_handshake_failures_total", socket="client"),
    )
