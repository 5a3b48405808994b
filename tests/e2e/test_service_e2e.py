"""End to end with real processes on loopback: `slos-serve planner` + two `slos-serve engine
--engine
sim` + the Python client in the test process.

- The same short workload is served under two formulations that differ only by the config line;
  the attainment the client measures is compared with what the virtual-time simulator predicts for
  the same workload, within ATTAINMENT_TOLERANCE (the service runs on a busy wall clock with
  network hops and OS scheduling noise; the simulator does not).
- kill -9 of one engine mid-run loses no request: each finishes (moved to the other engine) or
  gets an explicit verdict.
- random bytes, wrong types and oversized frames on both sockets leave the daemon serving, and are
  counted.
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
import zmq

from commands.demo import ProcessGroup, free_port, wait_for_engines
from formulations.perf_model import perf_model_preset
from formulations.request import make_request
from lab.replay import replay
from lab.simulator import SimConfig, simulate
from lab.workloads.workload import Workload
from planner_svc.client import PlannerClient
from wire import protocol as P

PERF_MODEL = "opt-13b-h100"
NUM_BLOCKS = 3500
# Absolute, on the fraction of requests that attain every SLO. Observed on a shared 2-core
# machine under load average 5-7: the service 0 to 0.17 below the simulator (30 requests, so one
# request is 0.033).
ATTAINMENT_TOLERANCE = 0.2
# Above this load average per core, sleeping engines overshoot their step times and the planner is
# descheduled so much that the wall clock no longer follows the model: the comparison is skipped
# (everything else is still checked).
MAX_LOAD_PER_CORE = 4.0
MAX_FRAME_BYTES = 65536
MAX_MODEL_LEN = 4096

CONFIG = """\
formulation = "{formulation}"
[planner]
engine_endpoint = "tcp://127.0.0.1:{engine_port}"
client_endpoint = "tcp://127.0.0.1:{client_port}"
heartbeat_interval_s = 0.1
liveness = 5
max_frame_bytes = {max_frame_bytes}
default_perf_model = "{perf_model}"
"""

pytestmark = pytest.mark.slow


class Service:
    def __init__(self, tmp_path, formulation="slos_dp", num_engines=2):
        self.engine_port, self.client_port = free_port(), free_port()
        self.true_lengths = tmp_path / f"lengths-{formulation}.jsonl"  # read by the engines only
        config = tmp_path / f"planner-{formulation}.toml"
        config.write_text(
            CONFIG.format(
                formulation=formulation,
                engine_port=self.engine_port,
                client_port=self.client_port,
                perf_model=PERF_MODEL,
                max_frame_bytes=MAX_FRAME_BYTES,
            )
        )
        self.group = ProcessGroup()
        cli = ["python", "-m", "commands.cli"]
        cli[0] = __import__("sys").executable
        self.group.start(
            "planner", [*cli, "planner", "--config", str(config), "--log-level", "WARNING"]
        )
        for i in range(num_engines):
            self.group.start(
                f"engine-{i}",
                [
                    *cli,
                    "engine",
                    "--engine",
                    "sim",
                    "--engine-id",
                    f"engine-{i}",
                    "--connect",
                    f"tcp://127.0.0.1:{self.engine_port}",
                    "--perf-model",
                    PERF_MODEL,
                    "--num-blocks",
                    str(NUM_BLOCKS),
                    "--heartbeat-interval-s",
                    "0.1",
                    "--output-lengths",
                    str(self.true_lengths),
                ],
            )
        self.client = PlannerClient(f"tcp://127.0.0.1:{self.client_port}")
        wait_for_engines(self.client, num_engines, self.group, timeout_s=60)

    def close(self):
        self.client.close()
        self.group.stop_all()


@pytest.fixture
def service_factory(tmp_path):
    services = []

    def make(**kwargs):
        services.append(Service(tmp_path, **kwargs))
        return services[-1]

    yield make
    for service in services:
        service.close()


def short_workload(num_requests=30, rate_rps=40.0, seed=0) -> Workload:
    """Chatbot and coder requests with short outputs, Poisson arrivals."""
    rng = np.random.default_rng(seed)
    perf_model = perf_model_preset(PERF_MODEL)
    arrivals = np.cumsum(rng.exponential(1 / rate_rps, num_requests))
    requests = tuple(
        make_request(
            f"r{i}",
            float(a),
            int(rng.integers(200, 2000)),
            int(rng.integers(8, 32)),
            "coder" if i % 3 == 0 else "chatbot",
            perf_model,
        )
        for i, a in enumerate(arrivals)
    )
    return Workload("e2e", requests)


def attainment(records) -> float:
    return sum(r.attainment.ok for r in records) / len(records)


@pytest.mark.parametrize("formulation", ["slos_dp", "sarathi"])
def test_service_attainment_matches_the_simulator(service_factory, formulation):
    """Lengths hidden from the planner: the client asks for the rest of the context as max_tokens,
    the simulated engines stop at the trace's lengths (read from a file the planner never sees),
    and the planner plans with its predictions, as the simulator's "predicted" mode does."""
    workload = short_workload()
    service = service_factory(formulation=formulation)
    result = replay(
        service.client,
        workload,
        drain_timeout_s=20,
        show_summary=False,
        true_lengths=service.true_lengths,
        max_model_len=MAX_MODEL_LEN,
    )
    assert result.num_unfinished == 0
    assert all(r.verdict is not None for r in result.records)
    assert all(r.finished for r in result.records if r.verdict.value != "rejected")
    predicted = simulate(
        workload,
        SimConfig(
            formulation=formulation,
            num_replicas=2,
            perf_model=perf_model_preset(PERF_MODEL),
            num_blocks_per_replica=NUM_BLOCKS,
            lengths="predicted",
            max_model_len=MAX_MODEL_LEN,
        ),
    )
    # What reached the planner: the caps, never the true lengths.
    submits = [h.submit for h in service.client.handles()]
    assert all(s.max_tokens == MAX_MODEL_LEN - s.num_prompt_tokens for s in submits)
    assert all(s.expected_output_tokens is None for s in submits)
    measured = attainment(result.records)
    print(f"{formulation}: service {measured:.3f} simulator {predicted.attainment:.3f}")
    load_per_core = os.getloadavg()[0] / os.cpu_count()
    if load_per_core > MAX_LOAD_PER_CORE:
        pytest.skip(
            f"machine overloaded (load {load_per_core:.1f} per core): wall-clock "
            f"attainment {measured:.2f} vs simulator {predicted.attainment:.2f} not compared"
        )
    assert abs(measured - predicted.attainment) <= ATTAINMENT_TOLERANCE, (
        f"{formulation}: service {measured:.2f} vs simulator {predicted.attainment:.2f}"
    )
    stats = service.client.stats()
    assert stats.counters["num_requests"] == len(workload.requests)


def test_kill_9_of_an_engine_loses_no_request(service_factory):
    service = service_factory()
    handles = [service.client.submit(num_prompt_tokens=300, max_tokens=80) for _ in range(10)]
    time.sleep(1.0)  # every request is running, on both engines
    assert sum(len(h.token_times_s) > 0 for h in handles) >= 2
    victim = service.group.processes["engine-1"]
    os.killpg(victim.pid, signal.SIGKILL)
    for handle in handles:
        assert handle.wait(30), f"{handle.request_id} neither finished nor got a verdict"
    assert all(h.finished or h.verdict_msg.verdict == "rejected" for h in handles)
    assert all(h.finished for h in handles)  # the surviving engine has room for all of them
    stats = service.client.stats()
    assert stats.counters["num_engine_deaths"] == 1 and stats.num_engines == 1
    assert stats.counters["num_moved_requests"] >= 1
    assert all(len(h.token_ids) == 80 for h in handles)


def test_garbage_frames_leave_the_daemon_serving_and_are_counted(service_factory):
    service = service_factory(num_engines=1)
    context = zmq.Context()
    try:
        bad_client = [
            [os.urandom(1), os.urandom(100)],
            [b"S", os.urandom(100)],
            [b"G", P.encode(P.Heartbeat("x"))[1]],  # an engine message on the client socket
            [b"S", b"\x00" * (MAX_FRAME_BYTES + 1)],  # oversized
            [b"S", b"", b""],
        ]
        bad_engine = [
            [b"R", os.urandom(50)],
            [b"S", P.encode(P.Submit(request_id="x", max_tokens=1, num_prompt_tokens=1))[1]],
            P.encode(P.StepReport(step_id=0, plan_id=0)),
        ]
        for endpoint, frames_list in (
            (service.client_port, bad_client),
            (service.engine_port, bad_engine),
        ):
            sock = context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(f"tcp://127.0.0.1:{endpoint}")
            for frames in frames_list:
                sock.send_multipart(frames)
            replies = 0
            while replies < len(frames_list) and sock.poll(3000):
                sock.recv_multipart()
                replies += 1
            assert replies == len(frames_list)  # every bad frame was answered with ERROR
            sock.close()
        handle = service.client.submit(num_prompt_tokens=100, max_tokens=5)
        assert handle.wait(10) and handle.finished
        stats = service.client.stats()
        assert stats.counters["num_rejected_frames"] == len(bad_client) + len(bad_engine)
        assert not service.group.any_died()
    finally:
        context.term()
