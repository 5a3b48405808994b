"""What an operator reads must mean what it says: the attainment gauge does not count requests
their clients ended while on track (a stop string, a disconnect) as misses; no engine is a 503
(the service's trouble), not a 429 (the client's SLO); engines log when they register; the HTTP
front door writes an access log."""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request

import pytest

from commands.cli import build_parser
from formulations.plan import Verdict
from planner_svc.client import PlannerClient
from planner_svc.http.api_config import ApiConfig
from planner_svc.http.server import ApiServer, ServerThread
from planner_svc.records import RequestRecord
from planner_svc.request_book import Judgement, judge
from tests.e2e.service_processes import wait_until
from tests.factories import make_req
from tests.planner_svc.http_support import Stack, make_model_dir
from tests.planner_svc.service_helpers import Service

MODEL = "slos-serve"


def gauge(stack: Stack, slo_class: str = "chatbot") -> float:
    return stack.service.daemon.metrics.attainment.labels(slo_class)._value.get()


def test_stop_strings_and_disconnects_are_not_counted_as_misses(tmp_path):
    stack = Stack(make_model_dir(tmp_path / "model"), ApiConfig(max_model_len=256))
    try:
        client = stack.openai()
        full = client.completions.create(model=MODEL, prompt=list(range(2, 12)), max_tokens=60)
        assert gauge(stack) == 1.0
        text = full.choices[0].text
        cut = client.completions.create(
            model=MODEL, prompt=list(range(2, 12)), max_tokens=60, stop=[text[20:23]]
        )
        assert cut.choices[0].finish_reason == "stop"
        stream = client.completions.create(
            model=MODEL, prompt=[4] * 10, max_tokens=200, stream=True
        )
        next(iter(stream))
        stream.response.close()  # the client goes away while its request is on track
        daemon = stack.service.daemon
        aborted = daemon.metrics.aborted.labels("chatbot")
        wait_until(lambda: aborted._value.get() == 2, 10, "both requests aborted")
        assert gauge(stack) == 1.0
        stats = stack.client.stats()
        assert stats.attainment_by_class["chatbot"] == 1.0
        assert stats.counters["num_aborted"] == 2 and stats.counters["num_finished"] == 1
    finally:
        stack.close()


@pytest.mark.parametrize(
    "times, aborted, now_s, expected",
    [
        ([0.5, 0.6, 0.7], False, 1.0, Judgement.ATTAINED),  # ended early (EOS) on time
        ([2.0, 2.1], False, 3.0, Judgement.MISSED),  # ended early, first token late
        ([0.5, 0.6], True, 0.65, Judgement.NOT_COUNTED),  # aborted on track
        ([], True, 0.5, Judgement.NOT_COUNTED),  # aborted before its TTFT deadline
        ([], True, 1.5, Judgement.MISSED),  # aborted after its TTFT deadline passed
        ([0.5], True, 3.0, Judgement.MISSED),  # aborted during a stall: token 2 overdue
    ],
)
def test_how_endings_are_judged(times, aborted, now_s, expected):
    record = RequestRecord(make_req(output=10, ttft_s=1.0, tpot_s=0.1), Verdict.ADMITTED)
    record.token_times_s = list(times)
    record.finished = not aborted
    assert judge(record, now_s, aborted) is expected


def test_no_engine_is_a_503_not_a_429():
    service = Service(num_engines=0)
    client = PlannerClient(service.daemon.client_endpoint)
    server = ServerThread(ApiServer(client, ApiConfig()))
    try:
        request = urllib.request.Request(
            f"{server.url}/v1/completions",
            data=json.dumps({"model": MODEL, "prompt": [1, 2], "max_tokens": 2}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(request, timeout=10)
        body = json.loads(info.value.read())
        assert info.value.code == 503 and body["error"]["code"] == "no_engine"
        assert info.value.headers["Retry-After"] == "1"
    finally:
        server.close()
        client.close()
        service.close()


def test_engines_log_when_they_register(caplog):
    assert build_parser().parse_args(["engine"]).log_level == "INFO"
    with caplog.at_level(logging.INFO, logger="slos_serve.adapter"):
        service = Service(num_engines=1)
        try:
            service.wait_for_engines(1)
            wait_until(lambda: "registered with the planner" in caplog.text, 5, "a log line")
        finally:
            service.close()
    assert "engine-0 registered with the planner at tcp://127.0.0.1:" in caplog.text


def test_the_http_front_door_writes_an_access_log(caplog):
    stack = Stack(None, num_engines=1)
    try:
        with caplog.at_level(logging.INFO, logger="slos_serve.http.access"):
            response = stack.openai().completions.create(model=MODEL, prompt=[1, 2], max_tokens=2)
            wait_until(lambda: "POST /v1/completions" in caplog.text, 5, "an access log line")
        line = next(r.getMessage() for r in caplog.records if r.name == "slos_serve.http.access")
        assert '"POST /v1/completions HTTP/1.1" 200' in line
        assert response.id in line and line.endswith(" admitted")
    finally:
        stack.close()
