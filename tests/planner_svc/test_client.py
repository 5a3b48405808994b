"""The Python client against an in-process daemon: verdicts, token streams (blocking and async),
abort, tool chains, reasoning requests, and client-side records that the report can use."""

from __future__ import annotations

import asyncio
import threading

import pytest

from formulations.deadlines import check_attainment
from formulations.plan import Verdict
from formulations.request import ToolChain, ToolRound
from lab.report import build_report
from planner_svc.client import PlannerClient
from tests.planner_svc.service_helpers import Service
from wire import protocol as P


@pytest.fixture(scope="module")
def service():
    svc = Service()
    svc.wait_for_engines(2)
    yield svc
    svc.close()


@pytest.fixture
def client(service):
    with PlannerClient(service.daemon.client_endpoint) as c:
        yield c


def test_token_stream_in_order_and_record_times(client):
    handle = client.submit(prompt_token_ids=list(range(64)), max_tokens=10)
    events = list(handle.tokens(timeout_s=10))
    assert sum(e.num_tokens for e in events) == 10
    assert [e.num_generated_tokens for e in events] == sorted(
        e.num_generated_tokens for e in events
    )
    assert events[-1].finished and not any(e.finished for e in events[:-1])
    assert len(handle.token_ids) == 10
    record = handle.record()
    assert record.verdict is Verdict.ADMITTED and record.finished
    assert record.token_times_s == sorted(record.token_times_s)
    assert record.token_times_s[0] >= record.request.arrival_s
    # The record is checked against the SLO the planner resolved (carried by the verdict).
    assert record.request.ttft_slo_s == pytest.approx(handle.verdict().ttft_slo_s)
    assert record.attainment == check_attainment(record.request, record.token_times_s)


def test_async_events_for_asyncio_servers(client):
    async def consume():
        handle = client.submit(num_prompt_tokens=30, max_tokens=5)
        return [event async for event in handle.events_async()]

    events = asyncio.run(consume())
    assert isinstance(events[0], P.VerdictMsg) and events[0].verdict == "admitted"
    assert sum(e.num_tokens for e in events if isinstance(e, P.Tokens)) == 5


def test_submit_from_many_threads(client):
    handles = []
    lock = threading.Lock()

    def worker():
        for _ in range(3):
            h = client.submit(num_prompt_tokens=40, max_tokens=4)
            with lock:
                handles.append(h)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({h.request_id for h in handles}) == 12
    assert all(h.wait(15) and h.finished for h in handles)


def test_abort_stops_the_request_and_frees_the_engine(client, service):
    handle = client.submit(num_prompt_tokens=30, max_tokens=5000)
    assert handle.verdict(5).verdict == "admitted"
    client.abort(handle.request_id)
    assert handle.wait(1) and not handle.finished
    follow_up = client.submit(num_prompt_tokens=30, max_tokens=3)
    assert follow_up.wait(10) and follow_up.finished
    assert service.daemon.core.request_state(handle.request_id) is None


def test_tool_chain_rounds_run_in_order_with_growing_prompts(client):
    chain = ToolChain(
        "agent-1", 0.0, (ToolRound(100, 5), ToolRound(20, 4, 0.05), ToolRound(30, 3, 0.05))
    )
    calls = []
    handles = client.run_tool_chain(chain, tool=lambda k, h: calls.append((k, h.finished)))
    assert [h.request_id for h in handles] == ["agent-1#r0", "agent-1#r1", "agent-1#r2"]
    assert calls == [(1, True), (2, True)]
    assert [h.submit.num_prompt_tokens for h in handles] == [100, 125, 159]
    assert all(h.finished for h in handles)
    verdicts = [h.verdict() for h in handles]
    assert [v.tpot_s for v in verdicts] == [0.05, 0.05, 0.1]  # intermediate, intermediate, final
    report = build_report([h.record() for h in handles])
    assert report.num_items == 1  # a chain counts once


def test_reasoning_request_carries_its_thinking_budget(client):
    handle = client.submit(
        num_prompt_tokens=50, max_tokens=30, slo_class="reasoning", thinking_tokens=20
    )
    assert handle.wait(10) and handle.finished
    verdict = handle.verdict()
    assert verdict.num_thinking_tokens == 20 and verdict.thinking_tpot_s == pytest.approx(0.05)
    assert handle.record().request.num_thinking_tokens == 20


def test_stats_answer(client):
    client.submit(num_prompt_tokens=30, max_tokens=2).wait(10)
    stats = client.stats()
    assert stats.counters["num_finished"] >= 1 and stats.num_engines == 2
    assert "chatbot" in stats.attainment_by_class


def test_concurrent_stats_queries_each_get_their_own_answer(client):
    # An answer nobody waits for (a query that timed out) is dropped, not handed to the next caller.
    client._route(P.Stats(num_engines=-1, query_id=10_000), now_s=0.0)
    answers: list[P.Stats] = []
    threads = [threading.Thread(target=lambda: answers.append(client.stats())) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(answers) == 6
    assert len({a.query_id for a in answers}) == 6 and all(a.num_engines == 2 for a in answers)


def test_submit_without_prompt_fails_locally(client):
    with pytest.raises(ValueError, match="prompt"):
        client.submit(max_tokens=3)


def test_open_requests_fail_when_the_planner_goes_away():
    svc = Service(num_engines=1)
    svc.wait_for_engines(1)
    with PlannerClient(svc.daemon.client_endpoint, heartbeat_interval_s=0.1, liveness=3) as client:
        handle = client.submit(num_prompt_tokens=30, max_tokens=5000)
        assert handle.verdict(5).verdict == "admitted"
        svc.close()  # the planner and its engine are gone
        assert handle.wait(3) and handle.error == "planner unreachable" and not handle.finished


def test_a_request_failed_by_the_client_ends_with_an_error_event():
    """Consumers of the event stream (the HTTP front door) learn why a request ended when the
    client itself ends it (planner gone): an ErrorMsg event, not a silent end."""
    svc = Service(num_engines=1)
    svc.wait_for_engines(1)
    with PlannerClient(svc.daemon.client_endpoint, heartbeat_interval_s=0.1, liveness=3) as client:
        handle = client.submit(num_prompt_tokens=30, max_tokens=5000)
        assert handle.verdict(5).verdict == "admitted"
        assert client.planner_id == svc.daemon.planner_id == handle.planner_id
        svc.close()
        assert handle.wait(3)
        events = list(handle._events.queue)
        assert isinstance(events[-2], P.ErrorMsg) and events[-2].kind == "planner_unreachable"
