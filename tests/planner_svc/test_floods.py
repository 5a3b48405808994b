"""Floods of bad input: each rejected frame is counted but the log gets a few lines and a summary,
not one line per frame; a frame far over the size limit is dropped by ZeroMQ before it is read."""

from __future__ import annotations

import logging
import os

import zmq

from planner_svc.client import PlannerClient
from tests.e2e.service_processes import wait_until
from tests.planner_svc.service_helpers import Service, make_config
from wire.rate_limited_log import RateLimitedLog

NUM_JUNK_FRAMES = 20_000


def test_a_flood_of_junk_frames_is_counted_not_logged_line_by_line(caplog):
    service = Service(num_engines=1)
    context = zmq.Context()
    flooder = context.socket(zmq.DEALER)
    flooder.setsockopt(zmq.LINGER, 0)
    flooder.setsockopt(zmq.SNDHWM, 0)
    flooder.connect(service.daemon.client_endpoint)
    try:
        service.wait_for_engines(1)
        with caplog.at_level(logging.WARNING, logger="slos_serve.daemon"):
            for _ in range(NUM_JUNK_FRAMES):
                flooder.send_multipart([b"S", os.urandom(16)])
            wait_until(
                lambda: service.daemon.num_rejected_frames == NUM_JUNK_FRAMES, 60, "all counted"
            )
        lines = [r for r in caplog.records if r.name == "slos_serve.daemon"]
        assert 1 <= len(lines) <= 10, f"{len(lines)} log lines for {NUM_JUNK_FRAMES} bad frames"
        counter = service.daemon.metrics.rejected_frames.labels("client", "malformed")
        assert counter._value.get() == NUM_JUNK_FRAMES
        with PlannerClient(service.daemon.client_endpoint) as client:
            assert client.submit(num_prompt_tokens=20, max_tokens=2).wait(10)  # still serving
    finally:
        flooder.close()
        context.term()
        service.close()


def test_rate_limited_log_summarises_what_it_did_not_log(caplog):
    now = [0.0]
    limited = RateLimitedLog(logging.getLogger("test.flood"), 10.0, 3, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="test.flood"):
        for i in range(100):
            limited.warning("junk", "bad frame %d", i)
        limited.warning("other", "another kind")  # its own budget
        now[0] = 10.5
        limited.tick()
    messages = [r.getMessage() for r in caplog.records]
    assert messages[:3] == ["bad frame 0", "bad frame 1", "bad frame 2"]
    assert messages[3] == "another kind"
    assert messages[4].startswith("97 more junk event(s) in 10 s")
    assert len(messages) == 5


def test_a_frame_far_over_the_limit_is_never_read():
    service = Service(make_config(max_frame_bytes=64 << 10), num_engines=1)
    context = zmq.Context()
    sender = context.socket(zmq.DEALER)
    sender.setsockopt(zmq.LINGER, 0)
    sender.connect(service.daemon.client_endpoint)
    try:
        service.wait_for_engines(1)
        sender.send_multipart([b"S", b"\x00" * (4 << 20)])
        disconnects = service.daemon.metrics.disconnects.labels("client")
        wait_until(lambda: disconnects._value.get() >= 1, 10, "the sender is dropped")
        assert service.daemon.num_rejected_frames == 0  # ZeroMQ dropped it unread
        with PlannerClient(service.daemon.client_endpoint) as client:
            assert client.submit(num_prompt_tokens=20, max_tokens=2).wait(10)
    finally:
        sender.close()
        context.term()
        service.close()
