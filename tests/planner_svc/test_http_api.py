"""The HTTP front door with the official openai client on loopback, against a real planner daemon
and simulated engines (threads of this process): completions and chat, streamed and not, text
through the model directory's tokenizer, SLO extension fields, defaults per model name and API key,
429 on rejection, best-effort marking, abort on disconnect, bad input, models / health / metrics.

The simulated engines emit token ids prompt_len, prompt_len + 1, ... so the expected output text is
known independently: `tokenizer.decode(range(P, P + n))`."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import openai
import pytest

from formulations.plan import Verdict
from planner_svc.http.api_config import ApiConfig, SloDefaults
from tests.planner_svc.http_support import SLOW_MODEL, Stack, make_model_dir

MODEL = "slos-serve"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def stack(model_dir):
    config = ApiConfig(
        model_defaults={MODEL: SloDefaults(), "coder-model": SloDefaults(slo_class="coder")},
        api_keys={
            "key-summaries": SloDefaults(slo_class="summarizer"),
            "key-strict": SloDefaults(ttft_ms=900.0, tpot_ms=45.0),
        },
        max_model_len=256,
    )
    s = Stack(model_dir, config)
    yield s
    s.close()


def expected_ids(num_prompt_tokens: int, num_tokens: int) -> list[int]:
    return list(range(num_prompt_tokens, num_prompt_tokens + num_tokens))


def get(url: str) -> tuple[int, dict, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def post(url: str, body: bytes, headers: dict | None = None) -> tuple[int, dict, dict]:
    request = urllib.request.Request(
        url,
        data=body,
        method="POST",
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read())


# ---- completions and chat -------------------------------------------------------------------


def test_completion_text_in_text_out(stack):
    prompt = "Hello there, general kenobi."
    prompt_ids = stack.tokenizer.encode(prompt)
    response = stack.openai().completions.create(model=MODEL, prompt=prompt, max_tokens=12)
    choice = response.choices[0]
    assert choice.token_ids == expected_ids(len(prompt_ids), 12)
    assert choice.text == stack.tokenizer.decode(choice.token_ids)
    assert choice.finish_reason == "length"
    assert response.usage.prompt_tokens == len(prompt_ids)
    assert (
        response.usage.completion_tokens == 12
        and response.usage.total_tokens == len(prompt_ids) + 12
    )
    assert response.slo["verdict"] == "admitted" and response.slo["slo_class"] == "chatbot"
    record = stack.tracked(response.id).record
    assert record.finished and record.request.num_prompt_tokens == len(prompt_ids)


def test_completion_stream_concatenates_to_the_full_text(stack):
    stream = stack.openai().completions.create(
        model=MODEL,
        prompt=list(range(3, 43)),
        max_tokens=30,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    token_chunks = [c for c in chunks if c.choices]
    ids = [t for c in token_chunks for t in c.choices[0].token_ids]
    assert ids == expected_ids(40, 30)
    assert "".join(c.choices[0].text for c in token_chunks) == stack.tokenizer.decode(ids)
    assert [c.choices[0].finish_reason for c in token_chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in token_chunks[:-1])
    assert token_chunks[0].slo["verdict"] == "admitted"
    assert chunks[-1].usage.completion_tokens == 30 and chunks[-1].usage.prompt_tokens == 40
    assert len({c.id for c in chunks}) == 1


def test_chat_non_streaming_and_streaming(stack):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Say something."}]},
    ]
    prompt_ids = stack.tokenizer.encode(
        stack.tokenizer.render_chat([("system", "Be brief."), ("user", "Say something.")])
    )
    client = stack.openai()
    response = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8)
    message = response.choices[0].message
    assert message.role == "assistant"
    assert message.content == stack.tokenizer.decode(expected_ids(len(prompt_ids), 8))
    assert response.object == "chat.completion" and response.usage.prompt_tokens == len(prompt_ids)

    chunks = list(
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, stream=True)
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_string_cuts_the_text_and_aborts(stack):
    disconnects = stack.api.metrics.disconnects._value.get()
    client = stack.openai()
    full = client.completions.create(model=MODEL, prompt=list(range(2, 12)), max_tokens=60)
    text = full.choices[0].text
    stop = text[20:23]
    cut = text.find(stop)
    assert cut >= 0 and stop.strip()
    for stream in (False, True):
        result = client.completions.create(
            model=MODEL, prompt=list(range(2, 12)), max_tokens=60, stop=[stop], stream=stream
        )
        if stream:
            chunks = [c for c in result if c.choices]
            got = "".join(c.choices[0].text for c in chunks)
            finish_reason = chunks[-1].choices[0].finish_reason
            request_id = chunks[0].id
        else:
            got, finish_reason, request_id = (
                result.choices[0].text,
                result.choices[0].finish_reason,
                result.id,
            )
        assert got == text[:cut]
        assert finish_reason == "stop"
        assert_request_ends(stack, request_id, finished=False)
    assert stack.api.metrics.disconnects._value.get() == disconnects  # not counted as one


# ---- SLOs -----------------------------------------------------------------------------------


def test_slo_class_and_explicit_targets_reach_the_planner(stack):
    client = stack.openai()
    coder = client.completions.create(
        model=MODEL, prompt=[5] * 20, max_tokens=4, extra_body={"slo_class": "coder"}
    )
    assert coder.slo["slo_class"] == "coder" and coder.slo["tpot_ms"] == pytest.approx(50.0)
    assert stack.tracked(coder.id).request.slo_class == "coder"

    explicit = client.completions.create(
        model=MODEL,
        prompt=[5] * 20,
        max_tokens=4,
        extra_body={
            "slo": {"ttft_ms": 800, "tpot_ms": 40, "thinking_tokens": 2, "thinking_tpot_ms": 20}
        },
    )
    request = stack.tracked(explicit.id).request
    assert request.ttft_slo_s == pytest.approx(0.8) and request.slo.tpot_s == pytest.approx(0.04)
    assert request.num_thinking_tokens == 2 and request.slo.thinking_tpot_s == pytest.approx(0.02)
    assert explicit.slo["ttft_ms"] == pytest.approx(800.0)

    hinted = client.completions.create(
        model=MODEL, prompt=[5] * 20, max_tokens=40, extra_body={"expected_output_tokens": 12}
    )
    assert stack.tracked(hinted.id).request.hint_output_tokens == 12
    with pytest.raises(openai.BadRequestError, match="expected_output_tokens"):
        client.completions.create(
            model=MODEL, prompt=[5] * 20, max_tokens=4, extra_body={"expected_output_tokens": 0}
        )


# ---- sessions (x-session-id) -------------------------------------------------------------------


def test_session_header_makes_successive_chats_rounds_of_one_chain(stack):
    unknown_before = stack.service.daemon.core.chains.stats.num_unknown_rounds
    chat = openai.OpenAI(
        base_url=f"{stack.url}/v1",
        api_key="none",
        max_retries=0,
        timeout=20.0,
        default_headers={"x-session-id": "conversation-1"},
    )
    messages = [{"role": "user", "content": "Hello there."}]
    first = chat.chat.completions.create(model=MODEL, messages=messages, max_tokens=4)
    messages += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And then?"},
    ]
    second = chat.chat.completions.create(model=MODEL, messages=messages, max_tokens=4)
    rounds = [stack.tracked(r.id).request for r in (first, second)]
    assert [(r.chain_id, r.round_index) for r in rounds] == [
        ("conversation-1", 0),
        ("conversation-1", 1),
    ]
    assert rounds[1].num_prompt_tokens > rounds[0].num_prompt_tokens
    # another session starts at 0, and the body's chain_id is the same session as the header's
    other = stack.openai().completions.create(
        model=MODEL, prompt=[3] * 10, max_tokens=2, extra_body={"chain_id": "conversation-2"}
    )
    assert stack.tracked(other.id).request.round_index == 0
    same = chat.completions.create(
        model=MODEL, prompt=[3] * 10, max_tokens=2, extra_body={"chain_id": "conversation-1"}
    )
    assert stack.tracked(same.id).request.round_index == 2
    # an explicit round index is used as given, and the count goes on after it
    explicit = chat.completions.create(
        model=MODEL, prompt=[3] * 10, max_tokens=2, extra_body={"round_index": 5}
    )
    after = chat.completions.create(model=MODEL, prompt=[3] * 10, max_tokens=2)
    assert [stack.tracked(r.id).request.round_index for r in (explicit, after)] == [5, 6]
    # every round above belonged to a chain the planner admitted: none was an unknown one
    assert stack.service.daemon.core.chains.stats.num_unknown_rounds == unknown_before
    _, _, metrics = get(f"{stack.url}/metrics")
    for kind in ("counted", "new", "explicit"):
        assert f'slos_http_session_rounds_total{{kind="{kind}"}}'.encode() in metrics
    assert b"slos_http_sessions " in metrics


def test_a_later_round_of_a_session_unknown_to_the_planner_is_served_and_counted(stack):
    stats = stack.service.daemon.core.chains.stats
    unknown_before = stats.num_unknown_rounds
    response = stack.openai().completions.create(
        model=MODEL,
        prompt=[4] * 10,
        max_tokens=3,
        extra_headers={"x-session-id": "never-seen"},
        extra_body={"round_index": 3},  # e.g. after a restart of the front door or the planner
    )
    assert response.choices[0].finish_reason == "length" and len(response.choices[0].token_ids) == 3
    request = stack.tracked(response.id).request
    assert (request.chain_id, request.round_index) == ("never-seen", 3)
    assert stats.num_unknown_rounds == unknown_before + 1
    # admitted, that round made the chain known: its next round is a protected later round
    following = stack.openai().completions.create(
        model=MODEL, prompt=[4] * 14, max_tokens=3, extra_headers={"x-session-id": "never-seen"}
    )
    assert stack.tracked(following.id).request.round_index == 4
    assert stats.num_unknown_rounds == unknown_before + 1


@pytest.mark.parametrize(
    "headers, body, message",
    [
        ({"x-session-id": ""}, {}, "must not be empty"),
        ({"x-session-id": "s" * 129}, {}, "more than 128"),
        ({"x-session-id": "caf\u00e9"}, {}, "printable ASCII"),  # sent as latin-1 by urllib
        ({"x-session-id": "a"}, {"chain_id": "b"}, "different sessions"),
    ],
)
def test_malformed_session_headers_are_a_400(stack, headers, body, message):
    payload = json.dumps({"model": MODEL, "prompt": [1, 2], "max_tokens": 1, **body}).encode()
    code, _, error = post(f"{stack.url}/v1/completions", payload, headers)
    assert code == 400 and error["error"]["param"] == "x-session-id"
    assert message in error["error"]["message"] and "\n" not in error["error"]["message"]


def test_defaults_per_model_name_and_api_key(stack):
    by_model = stack.openai().completions.create(model="coder-model", prompt=[7] * 10, max_tokens=3)
    assert stack.tracked(by_model.id).request.slo_class == "coder"
    by_key = stack.openai("key-summaries").completions.create(
        model="coder-model", prompt=[7] * 10, max_tokens=3
    )
    assert stack.tracked(by_key.id).request.slo_class == "summarizer"  # the key beats the model
    strict = stack.openai("key-strict").completions.create(
        model=MODEL, prompt=[7] * 10, max_tokens=3
    )
    request = stack.tracked(strict.id).request
    assert request.ttft_slo_s == pytest.approx(0.9) and request.slo.tpot_s == pytest.approx(0.045)
    # the request body beats both
    body = stack.openai("key-summaries").completions.create(
        model="coder-model", prompt=[7] * 10, max_tokens=3, extra_body={"slo_class": "chatbot"}
    )
    assert stack.tracked(body.id).request.slo_class == "chatbot"


@pytest.fixture(scope="module")
def slow_stack(model_dir):
    """slos_dp with a slow performance model: a 100-token prompt needs ~5 s of prefill."""
    s = Stack(model_dir, perf_model=SLOW_MODEL, num_engines=1, formulation="slos_dp")
    yield s
    s.close()


def test_planner_rejection_is_a_429_with_retry_after_and_reason(slow_stack):
    start_s = time.monotonic()
    with pytest.raises(openai.RateLimitError) as info:
        slow_stack.openai().completions.create(
            model=MODEL,
            prompt=[9] * 100,
            max_tokens=4,
            extra_body={"slo": {"ttft_ms": 2000, "tpot_ms": 100}},
        )
    elapsed_s = time.monotonic() - start_s
    # answered within the TTFT target (the prefill alone needs ~5 s), not queued until it passed
    assert elapsed_s < 2.0
    error = info.value.body
    assert error["code"] == "slo_rejected" and "rejected" in error["message"]
    assert int(info.value.response.headers["retry-after"]) >= 1
    rejected = [
        t
        for t in slow_stack.service.daemon.requests.values()
        if t.record.verdict is Verdict.REJECTED
    ]
    assert len(rejected) == 1
    _, _, metrics = get(f"{slow_stack.url}/metrics")
    assert b'slos_http_rejected_total{slo_class="chatbot"} 1.0' in metrics


def test_an_unmeetable_ttft_target_is_a_429_at_once(slow_stack):
    """A planner with admission control answers within the TTFT target: here at once, since
    no step can end within 1 us (the core's expiry would answer by the deadline otherwise)."""
    with pytest.raises(openai.RateLimitError) as info:
        slow_stack.openai().completions.create(
            model=MODEL, prompt=[3] * 10, max_tokens=4, extra_body={"slo": {"ttft_ms": 0.001}}
        )
    assert int(info.value.response.headers["retry-after"]) >= 1
    assert info.value.body["code"] in ("slo_rejected", "ttft_target_passed")


def test_best_effort_answers_are_marked(model_dir):
    s = Stack(
        model_dir,
        perf_model=SLOW_MODEL,
        num_engines=1,
        formulation="slos_dp",
        core_params={"fallback": "best_effort"},
    )
    try:
        raw = s.openai().completions.with_raw_response.create(
            model=MODEL,
            prompt=[9] * 20,
            max_tokens=2,
            extra_body={"slo": {"ttft_ms": 300, "tpot_ms": 100}},
        )
        assert raw.headers["x-slo-verdict"] == "best_effort"
        response = raw.parse()
        assert response.slo["verdict"] == "best_effort" and len(response.choices[0].token_ids) == 2
    finally:
        s.close()


# ---- disconnects ----------------------------------------------------------------------------


def assert_request_ends(stack, request_id: str, finished: bool, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not stack.tracked(request_id).done:
        assert time.monotonic() < deadline, f"{request_id} still running at the planner"
        time.sleep(0.02)
    assert stack.tracked(request_id).record.finished == finished


def test_client_disconnect_aborts_at_the_planner(stack):
    before = stack.api.metrics.disconnects._value.get()
    stream = stack.openai().completions.create(
        model=MODEL, prompt=[4] * 10, max_tokens=200, stream=True
    )
    first = next(iter(stream))
    stream.response.close()
    assert_request_ends(stack, first.id, finished=False)
    tokens_at_end = len(stack.tracked(first.id).record.token_times_s)
    assert tokens_at_end < 200
    deadline = time.monotonic() + 5
    while stack.api.metrics.disconnects._value.get() == before:
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_non_streaming_client_that_times_out_is_aborted(stack):
    before = {rid for rid in stack.service.daemon.requests}
    body = json.dumps({"model": MODEL, "prompt": [4] * 10, "max_tokens": 240}).encode()
    request = urllib.request.Request(
        f"{stack.url}/v1/completions",
        data=body,
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(TimeoutError):  # the client gives up and closes the connection
        urllib.request.urlopen(request, timeout=0.5)
    (request_id,) = set(stack.service.daemon.requests) - before
    assert_request_ends(stack, request_id, finished=False)
    assert len(stack.tracked(request_id).record.token_times_s) < 240


# ---- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, status, param",
    [
        (b"{not json", 400, None),
        (b"[1, 2]", 400, None),
        (json.dumps({"model": "nope", "prompt": "hi"}).encode(), 404, "model"),
        (json.dumps({"prompt": "hi"}).encode(), 400, "model"),
        (
            json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": -5}).encode(),
            400,
            "max_tokens",
        ),
        (
            json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": "many"}).encode(),
            400,
            "max_tokens",
        ),
        (json.dumps({"model": MODEL, "prompt": "hi " * 400}).encode(), 400, "prompt"),
        (
            json.dumps({"model": MODEL, "prompt": [1] * 200, "max_tokens": 100}).encode(),
            400,
            "prompt",
        ),
        (json.dumps({"model": MODEL, "prompt": [1, 99999]}).encode(), 400, "prompt"),
        (json.dumps({"model": MODEL, "prompt": ""}).encode(), 400, "prompt"),
        (json.dumps({"model": MODEL, "prompt": "hi", "n": 3}).encode(), 400, "n"),
        (
            json.dumps({"model": MODEL, "prompt": "hi", "temperature": 7}).encode(),
            400,
            "temperature",
        ),
        (json.dumps({"model": MODEL, "prompt": "hi", "slo": {"ttft_ms": -1}}).encode(), 400, "slo"),
        (json.dumps({"model": MODEL, "prompt": "hi", "slo": {"tpot": 1}}).encode(), 400, "slo"),
        (json.dumps({"model": MODEL, "prompt": "hi", "stop": [1]}).encode(), 400, "stop"),
    ],
)
def test_bad_completion_bodies_get_openai_errors(stack, body, status, param):
    code, _, error = post(f"{stack.url}/v1/completions", body)
    assert code == status
    assert set(error["error"]) == {"message", "type", "param", "code"}
    assert error["error"]["message"] and error["error"]["param"] == param


def test_oversized_prompt_names_the_context_length(stack):
    with pytest.raises(openai.BadRequestError) as info:
        stack.openai().completions.create(model=MODEL, prompt=[1] * 250, max_tokens=10)
    assert info.value.body["code"] == "context_length_exceeded"
    assert "256" in info.value.body["message"]


def test_unknown_slo_class_is_refused_by_the_planner(stack):
    with pytest.raises(openai.BadRequestError) as info:
        stack.openai().completions.create(
            model=MODEL, prompt=[1] * 5, max_tokens=2, extra_body={"slo_class": "no-such-class"}
        )
    assert "no-such-class" in info.value.body["message"]


def test_bad_chat_bodies_and_huge_bodies(stack):
    code, _, error = post(
        f"{stack.url}/v1/chat/completions", json.dumps({"model": MODEL, "messages": "hi"}).encode()
    )
    assert code == 400 and error["error"]["param"] == "messages"
    code, _, error = post(
        f"{stack.url}/v1/chat/completions",
        json.dumps({"model": MODEL, "messages": [{"content": "x"}]}).encode(),
    )
    assert code == 400 and error["error"]["param"] == "messages[0]"
    code, _, error = post(f"{stack.url}/v1/completions", b"{" + b" " * (9 << 20) + b"}")
    assert code == 413 and "exceeds" in error["error"]["message"]


def test_server_stays_up_after_bad_input(stack):
    for _ in range(3):
        post(f"{stack.url}/v1/completions", b"\xff\xfe garbage")
    status, _, body = get(f"{stack.url}/health")
    assert status == 200 and json.loads(body)["num_engines"] == 2
    response = stack.openai().completions.create(model=MODEL, prompt=[1, 2, 3], max_tokens=2)
    assert len(response.choices[0].token_ids) == 2


# ---- models, health, metrics, auth ---------------------------------------------------------


def test_models_health_metrics_and_unknown_paths(stack):
    models = stack.openai().models.list()
    assert [m.id for m in models.data] == [MODEL, "coder-model"]
    status, _, body = get(f"{stack.url}/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, headers, body = get(f"{stack.url}/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    text = body.decode()
    assert 'slos_http_requests_total{path="/v1/completions",status="200"}' in text
    assert "slos_http_ttft_seconds_bucket" in text and "slos_http_itl_seconds_count" in text
    status, _, body = get(f"{stack.url}/v1/nothing-here")
    assert status == 404 and "error" in json.loads(body)


def test_required_api_keys(model_dir):
    config = ApiConfig(api_keys={"good-key": SloDefaults()}, require_api_key=True)
    s = Stack(model_dir, config, num_engines=1)
    try:
        with pytest.raises(openai.AuthenticationError):
            s.openai("bad-key").completions.create(model=MODEL, prompt=[1, 2], max_tokens=1)
        ok = s.openai("good-key").completions.create(model=MODEL, prompt=[1, 2], max_tokens=1)
        assert len(ok.choices[0].token_ids) == 1
    finally:
        s.close()


# ---- the command ----------------------------------------------------------------------------


def test_api_command_serves_and_stops_on_sigterm(stack, model_dir, tmp_path):
    """`slos-serve api` as its own process, in front of the test's planner daemon."""
    import signal
    import subprocess
    import sys

    from commands.demo import free_port

    port = free_port()
    config = tmp_path / "api.toml"
    config.write_text('[models.tiny-chat]\n[models.tiny-coder]\nslo_class = "coder"\n')
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "commands.cli",
            "api",
            "--planner",
            stack.service.daemon.client_endpoint,
            "--port",
            str(port),
            "--model-dir",
            str(model_dir),
            "--config",
            str(config),
            "--log-level",
            "WARNING",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout.readline().startswith(f"api ready http://127.0.0.1:{port}")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny-chat", "tiny-coder"]
        response = client.chat.completions.create(
            model="tiny-coder", messages=[{"role": "user", "content": "hello"}], max_tokens=5
        )
        assert response.choices[0].message.content == stack.tokenizer.decode(
            response.choices[0].token_ids
        )
        assert stack.tracked(response.id).request.slo_class == "coder"
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_api_command_errors(tmp_path):
    from commands.cli import main

    assert main(["api", "--model-dir", str(tmp_path / "missing")]) == 2
    bad = tmp_path / "api.toml"
    bad.write_text("nonsense = 1\n")
    assert main(["api", "--config", str(bad)]) == 2


# ---- load and planner trouble ---------------------------------------------------------------


def test_many_concurrent_streams(stack):
    import asyncio

    async def one(client, i):
        stream = await client.completions.create(
            model=MODEL, prompt=[3 + i] * (5 + i), max_tokens=10 + i, stream=True
        )
        return [t async for c in stream for t in c.choices[0].token_ids]

    async def run():
        client = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key="x", max_retries=0)
        return await asyncio.gather(*(one(client, i) for i in range(24)))

    outputs = asyncio.run(run())
    assert outputs == [expected_ids(5 + i, 10 + i) for i in range(24)]


def test_no_planner_gives_503_not_a_hang():
    from commands.demo import free_port
    from planner_svc.client import PlannerClient
    from planner_svc.http.server import ApiServer, ServerThread

    client = PlannerClient(f"tcp://127.0.0.1:{free_port()}")  # nothing listens there
    server = ServerThread(ApiServer(client, ApiConfig(verdict_timeout_s=0.3)))
    try:
        start_s = time.monotonic()
        code, headers, error = post(
            f"{server.url}/v1/completions", json.dumps({"model": MODEL, "prompt": [1, 2]}).encode()
        )
        assert code == 503 and error["error"]["code"] == "planner_timeout"
        assert headers["Retry-After"] == "1" and time.monotonic() - start_s < 3
        status, _, body = get(f"{server.url}/health")
        assert status == 503 and json.loads(body)["status"] == "unavailable"
    finally:
        server.close()
        client.close()


def test_a_planner_that_never_answers_is_a_503_after_the_verdict_timeout():
    """The front door resolves no SLO itself; it bounds only the wait for a silent planner."""
    from commands.demo import free_port
    from planner_svc.client import PlannerClient
    from planner_svc.http.server import ApiServer, ServerThread

    config = ApiConfig(verdict_timeout_s=0.5)
    client = PlannerClient(f"tcp://127.0.0.1:{free_port()}")  # nothing listens there
    server = ServerThread(ApiServer(client, config))
    try:
        start_s = time.monotonic()
        code, _, error = post(
            f"{server.url}/v1/completions",
            json.dumps({"model": MODEL, "prompt": [1] * 20}).encode(),
        )
        assert code == 503 and error["error"]["code"] == "planner_timeout"
        assert 0.5 <= time.monotonic() - start_s < 1.5
    finally:
        server.close()
        client.close()


def test_the_slo_in_the_answer_is_the_planners(stack):
    """The SLO a client sees (`slo.ttft_ms`) comes from the planner's verdict: the planner's own
    classes and performance model resolved it, once."""
    from formulations.slo import SLO

    daemon_config = stack.service.daemon.config
    for slo_class, extra in (
        ("chatbot", {}),
        ("coder", {}),
        ("summarizer", {}),
        ("chatbot", {"slo": {"ttft_slowdown": 7}}),
    ):
        response = stack.openai().completions.create(
            model=MODEL,
            prompt=[5] * 100,
            max_tokens=2,
            extra_body={"slo_class": slo_class, **extra},
        )
        slowdown = extra.get("slo", {}).get("ttft_slowdown")
        slo = daemon_config.slo_classes[slo_class]
        if slowdown is not None:
            slo = SLO(tpot_s=slo.tpot_s, ttft_slowdown=slowdown)
        budget_s = slo.ttft_budget_s(daemon_config.perf_model, 100)
        assert budget_s == pytest.approx(response.slo["ttft_ms"] / 1e3)
