"""Large and hostile bodies at the HTTP front door: a long prompt is tokenized off the event loop
(a small request is served meanwhile), a prompt that cannot fit is refused before tokenizing, and
deeply nested JSON is a 400, not a 500."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import pytest

from planner_svc.http.api_config import ApiConfig
from planner_svc.http.tokenizer import TextTokenizer
from tests.planner_svc.http_support import Stack, make_model_dir

MODEL = "slos-serve"
BIG_PROMPT_CHARS = 50_000  # over the size parsed on the event loop, within the context


class WatchedTokenizer(TextTokenizer):
    """The test tokenizer, counting its calls; `encode` of a big text waits for `release` (a
    stand-in for the seconds a long prompt takes)."""

    def __init__(self, inner: TextTokenizer) -> None:
        super().__init__(inner.tokenizer, inner.max_model_len, inner.name)
        self.release = threading.Event()
        self.num_encodes = 0

    def encode(self, text: str, max_tokens: int | None = None) -> list[int]:
        self.num_encodes += 1
        if len(text) >= BIG_PROMPT_CHARS:
            self.release.wait(30)
        return super().encode(text, max_tokens)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    model_dir = make_model_dir(tmp_path_factory.mktemp("model"))
    s = Stack(model_dir, ApiConfig(max_model_len=100_000), num_engines=1)
    s.api.tokenizer = WatchedTokenizer(s.tokenizer)
    yield s
    s.api.tokenizer.release.set()
    s.close()


def post(url: str, body: bytes, timeout_s: float = 20) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"{url}/v1/completions", data=body, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_a_small_request_is_served_while_a_long_prompt_is_tokenized(stack):
    tokenizer = stack.api.tokenizer
    tokenizer.release.clear()
    big = json.dumps({"model": MODEL, "prompt": "ab " * (BIG_PROMPT_CHARS // 3 + 1)}).encode()
    answers = []
    sender = threading.Thread(target=lambda: answers.append(post(stack.url, big)), daemon=True)
    sender.start()
    try:
        small = json.dumps({"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 2}).encode()
        status, body = post(stack.url, small, timeout_s=5)
        assert status == 200 and len(body["choices"][0]["token_ids"]) == 2
        assert sender.is_alive() and not answers  # the long prompt is still being tokenized
    finally:
        tokenizer.release.set()
    sender.join(20)
    assert answers and answers[0][0] in (200, 400)


def test_a_prompt_that_cannot_fit_is_refused_before_tokenizing(tmp_path):
    model_dir = make_model_dir(tmp_path / "model")
    s = Stack(model_dir, ApiConfig(max_model_len=256), num_engines=1)
    try:
        tokenizer = s.api.tokenizer = WatchedTokenizer(s.tokenizer)
        tokenizer.release.set()
        huge = json.dumps({"model": MODEL, "prompt": "x" * (2 << 20)}).encode()
        status, body = post(s.url, huge)
        assert status == 400 and body["error"]["code"] == "context_length_exceeded"
        assert tokenizer.num_encodes == 0
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "y" * (1 << 20)}]}
        request = urllib.request.Request(
            f"{s.url}/v1/chat/completions",
            data=json.dumps(chat).encode(),
            headers={"Content-Type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(request, timeout=20)
        assert info.value.code == 400 and tokenizer.num_encodes == 0
    finally:
        s.close()


@pytest.mark.parametrize("opening", [b"[", b'{"a":'])
def test_deeply_nested_json_is_a_400(stack, opening):
    status, body = post(stack.url, opening * 100_000)
    assert status == 400 and "nested too deeply" in body["error"]["message"]
