"""Pieces of the HTTP front door without a server: incremental detokenization and stop strings
against a plain full decode, request parsing and validation, and the front door's config."""

from __future__ import annotations

import random

import pytest

from planner_svc.http.api_config import ApiConfig, SloDefaults, load_api_config
from planner_svc.http.openai_schema import ApiError, parse_job, parse_json_body
from planner_svc.http.output_text import OutputText
from planner_svc.http.tokenizer import IncrementalDetokenizer, TextTokenizer
from tests.planner_svc.http_support import VOCAB_SIZE, make_model_dir

TEXTS = [
    "Hello world, naïve café.",
    "東京タワー 😀 emoji and ünïcödé",
    "plain ascii words here",
    "mixed: ß∂ƒ©˙∆˚¬ 12345 !?",
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> TextTokenizer:
    return TextTokenizer.from_model_dir(make_model_dir(tmp_path_factory.mktemp("tok")))


def chunks_of(ids: list[int], rng: random.Random) -> list[list[int]]:
    out, i = [], 0
    while i < len(ids):
        n = rng.randint(1, 4)
        out.append(ids[i : i + n])
        i += n
    return out


@pytest.mark.parametrize("seed", range(6))
def test_incremental_deltas_concatenate_to_the_full_decode(tokenizer, seed):
    rng = random.Random(seed)
    text = TEXTS[seed % len(TEXTS)]
    ids = tokenizer.encode(text)
    if seed >= len(TEXTS):  # random ids: byte tokens that need not form valid UTF-8
        ids = [rng.randrange(2, VOCAB_SIZE) for _ in range(80)]
    detokenizer = IncrementalDetokenizer(tokenizer)
    pieces = [detokenizer.add(chunk) for chunk in chunks_of(ids, rng)]
    pieces.append(detokenizer.flush())
    assert "".join(pieces) == tokenizer.decode(ids)
    if seed < len(TEXTS):
        assert tokenizer.decode(ids) == text
        assert all("\ufffd" not in p for p in pieces)  # no broken character was ever sent


@pytest.mark.parametrize("seed", range(8))
def test_stop_strings_cut_at_the_first_occurrence(tokenizer, seed):
    rng = random.Random(100 + seed)
    text = " ".join(
        rng.choice(["alpha", "beta", "gamma", "delta", "café", "東京"]) for _ in range(30)
    )
    ids = tokenizer.encode(text)
    stops = tuple(rng.sample(["gamma delta", "é 東", "beta", "zzz", "a b"], 2))
    found = [i for s in stops if (i := text.find(s)) >= 0]
    expected = text[: min(found)] if found else text
    output = OutputText(tokenizer, stops)
    sent = []
    for chunk in chunks_of(ids, rng):
        sent.append(output.add(chunk))
        assert not any(s in "".join(sent) for s in stops)
        if output.stopped:
            break
    sent.append(output.finish())
    assert "".join(sent) == expected
    assert output.stopped == bool(found)


def test_without_a_tokenizer_the_text_is_empty():
    output = OutputText(None, ("x",))
    assert output.add([1, 2, 3]) == "" and output.finish() == "" and not output.stopped


# ---- parsing ------------------------------------------------------------------------------


CONFIG = ApiConfig(
    model_defaults={"m": SloDefaults(), "m-coder": SloDefaults(slo_class="coder")},
    api_keys={"k": SloDefaults(tpot_ms=30.0)},
    max_model_len=100,
)


def test_prompt_forms_and_defaults(tokenizer):
    for prompt in ("some text", ["some text"]):
        job = parse_job({"model": "m", "prompt": prompt}, False, CONFIG, tokenizer, None)
        assert job.prompt_token_ids == tokenizer.encode("some text")
        assert job.max_tokens == 16 and not job.stream and job.slo.slo_class == "chatbot"
    job = parse_job(
        {"model": "m", "prompt": [[5, 6, 7]], "max_tokens": 3}, False, CONFIG, None, None
    )
    assert job.prompt_token_ids == [5, 6, 7] and job.max_tokens == 3
    chat = parse_job(
        {
            "model": "m-coder",
            "messages": [{"role": "user", "content": "hi"}],
            "max_completion_tokens": 9,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        True,
        CONFIG,
        tokenizer,
        "k",
    )
    assert chat.max_tokens == 9 and chat.stream and chat.include_usage
    assert chat.slo.slo_class == "coder" and chat.slo.tpot_ms == 30.0  # key over model over global


def test_extension_fields(tokenizer):
    job = parse_job(
        {
            "model": "m",
            "prompt": [1, 2],
            "slo_class": "reasoning",
            "slo": {"ttft_slowdown": 4, "thinking_tokens": 8, "value": 2},
            "slo_targets": "tool_final",
            "chain_id": "c1",
            "round_index": 2,
            "chain_last_round": True,
            "ignore_eos": True,
            "stop": "END",
            "seed": 3,
            "temperature": 0,
        },
        False,
        CONFIG,
        tokenizer,
        "k",
    )
    slo = job.slo
    assert (slo.slo_class, slo.ttft_slowdown, slo.thinking_tokens, slo.value) == (
        "reasoning",
        4.0,
        8,
        2.0,
    )
    assert slo.tpot_ms is None  # a class named in the body brings its own targets, not the key's
    assert (slo.slo_targets, slo.chain_id, slo.round_index) == ("tool_final", "c1", 2)
    assert slo.chain_last_round
    assert job.ignore_eos and job.stop == ("END",) and job.seed == 3 and job.temperature == 0.0


@pytest.mark.parametrize(
    "body, chat, status, param",
    [
        (
            {"model": "m", "prompt": "x", "slo": {"ttft_ms": 5, "ttft_slowdown": 2}},
            False,
            400,
            "slo",
        ),
        ({"model": "m", "prompt": "x", "round_index": -1}, False, 400, "round_index"),
        ({"model": "m", "prompt": "x", "chain_last_round": 1}, False, 400, "chain_last_round"),
        ({"model": "m", "prompt": "x", "top_p": 0}, False, 400, "top_p"),
        ({"model": "m", "prompt": "x", "stream": "yes"}, False, 400, "stream"),
        ({"model": "m", "prompt": "x", "logprobs": 2}, False, 400, "logprobs"),
        ({"model": "m", "prompt": ["a", "b"]}, False, 400, "prompt"),
        ({"model": "m", "prompt": [1, True]}, False, 400, "prompt"),
        ({"model": "m", "prompt": [1] * 90, "max_tokens": 11}, False, 400, "prompt"),
        ({"model": "m", "messages": []}, True, 400, "messages"),
        (
            {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            True,
            400,
            "messages[0]",
        ),
        ({"model": "other", "prompt": "x"}, False, 404, "model"),
    ],
)
def test_invalid_requests(tokenizer, body, chat, status, param):
    with pytest.raises(ApiError) as info:
        parse_job(body, chat, CONFIG, tokenizer, None)
    assert info.value.status == status and info.value.param == param
    assert info.value.body()["error"]["message"]


def test_session_header_is_an_alias_of_chain_id(tokenizer):
    def parse(body_fields, header):
        body = {"model": "m", "prompt": [1, 2], **body_fields}
        return parse_job(body, False, CONFIG, tokenizer, None, header).slo

    assert (parse({}, "s-1").chain_id, parse({}, "s-1").round_index) == ("s-1", None)
    assert parse({"chain_id": "s-1"}, "s-1").chain_id == "s-1"  # the same in both: fine
    assert parse({"chain_id": "c", "round_index": 3}, None).round_index == 3
    assert (parse({}, None).chain_id, parse({}, None).round_index) == (None, None)
    with pytest.raises(ApiError, match="different sessions") as info:
        parse({"chain_id": "c-1"}, "s-1")
    assert (info.value.status, info.value.param) == (400, "x-session-id")


@pytest.mark.parametrize(
    "body_fields, header, param, message",
    [
        ({}, "", "x-session-id", "must not be empty"),
        ({}, "x" * 129, "x-session-id", "more than 128"),
        ({}, "caf\u00e9", "x-session-id", "printable ASCII"),
        ({}, "a\tb", "x-session-id", "printable ASCII"),
        ({"chain_id": ""}, None, "chain_id", "must not be empty"),
        ({"chain_id": "y" * 200}, None, "chain_id", "more than 128"),
    ],
)
def test_malformed_session_ids_are_refused(tokenizer, body_fields, header, param, message):
    body = {"model": "m", "prompt": [1, 2], **body_fields}
    with pytest.raises(ApiError, match=message) as info:
        parse_job(body, False, CONFIG, tokenizer, None, header)
    assert (info.value.status, info.value.param) == (400, param)
    assert "\n" not in info.value.message


def test_text_needs_a_tokenizer():
    for body, chat in (
        ({"model": "m", "prompt": "text"}, False),
        ({"model": "m", "messages": [{"role": "user", "content": "hi"}]}, True),
    ):
        with pytest.raises(ApiError) as info:
            parse_job(body, chat, CONFIG, None, None)
        assert info.value.code == "no_tokenizer"


def test_json_body_errors():
    assert parse_json_body(b'{"a": 1}') == {"a": 1}
    for raw in (b"", b"{", b"[]", b"\xff"):
        with pytest.raises(ApiError):
            parse_json_body(raw)


# ---- config -------------------------------------------------------------------------------


def test_config_file(tmp_path):
    path = tmp_path / "api.toml"
    path.write_text(
        'default_slo_class = "coder"\nmax_model_len = 512\n'
        "max_sessions = 100\nsession_ttl_s = 30.0\n"
        '[models.a]\n[models.b]\nslo_class = "summarizer"\nttft_ms = 700\n'
        '[api_keys."sk-1"]\ntpot_ms = 20\n'
    )
    config = load_api_config(path)
    assert config.model_names == ("a", "b") and config.max_model_len == 512
    assert (config.max_sessions, config.session_ttl_s) == (100, 30.0)
    assert config.slo_defaults("a", None) == SloDefaults(slo_class="coder")
    assert config.slo_defaults("b", "sk-1") == SloDefaults("summarizer", ttft_ms=700, tpot_ms=20)
    renamed = load_api_config(path, ["b", "c"], max_model_len=64)
    assert renamed.model_names == ("b", "c") and renamed.max_model_len == 64
    assert renamed.model_defaults["b"].ttft_ms == 700


@pytest.mark.parametrize(
    "text, message",
    [
        ("colour = 1\n", "unknown key"),
        ("[models.a]\ntpot = 1\n", "unknown key"),
        ("[models.a]\ntpot_ms = -1\n", "positive"),
        ("require_api_key = true\n", "no [api_keys]"),
        ("verdict_timeout_s = 0\n", "verdict_timeout_s"),
        ("max_sessions = 0\n", "max_sessions"),
        ("session_ttl_s = 0\n", "session_ttl_s"),
        ("max_model_len = [\n", "not valid TOML"),
        ('planner_config = "planner.toml"\n', "unknown key"),  # the front door resolves no SLO
    ],
)
def test_config_errors(tmp_path, text, message):
    path = tmp_path / "api.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        load_api_config(path)
