"""Parsing and validation of OpenAI request bodies into one `GenerationJob`, with OpenAI-style
errors (`{"error": {"message", "type", "param", "code"}}`) for anything we cannot serve.

Standard fields honoured: model, prompt (text, token ids, or a one-element list of either) /
messages, max_tokens (max_completion_tokens for chat), stream, stream_options.include_usage,
temperature, top_p, seed, stop. Refused with a 400 rather than silently ignored: n > 1, best_of,
logprobs, echo, suffix, tools / functions. Other unknown fields are ignored, as vLLM does.

Extension fields (the openai client sends them with `extra_body={...}`):
    slo_class      "coder"                  an application class of the planner's config
    slo            {"ttft_ms": 800, "tpot_ms": 50, "ttft_slowdown": 3,
                    "thinking_tokens": 256, "thinking_tpot_ms": 30, "value": 2.0}
    slo_targets    "tool_final"             take the targets of this class (tool-calling rounds)
    chain_id, round_index                   a session's (agent's, conversation's) round; without
                                            round_index the front door counts the session's
                                            rounds itself: 0, 1, 2, ... (session_rounds.py)
    chain_last_round  true                  the chain's last round: its KV is not kept after it
    expected_output_tokens  300             the client's expectation of the output length, a hint
                                            for the planner's length predictor (max_tokens stays
                                            the cap)
    ignore_eos     true                     run to max_tokens (vLLM's field)

Header: `x-session-id: <id>` is another way to give `chain_id` (1 to MAX_SESSION_ID_CHARS
printable ASCII characters, as the body field must be too). Given both, they must be equal: a
request naming two sessions is refused (400) rather than served under either.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import msgspec

from planner_svc.http.api_config import ApiConfig, SloDefaults
from planner_svc.http.tokenizer import PromptTooLong, TextTokenizer

DEFAULT_MAX_MODEL_LEN = 8192
SESSION_HEADER = "x-session-id"
MAX_SESSION_ID_CHARS = 128  # a UUID is 36; bounds the front door's session table (ApiConfig)
_JSON_DECODER = msgspec.json.Decoder()  # several times faster than json.loads on token lists


class ApiError(Exception):
    """An error answered as an OpenAI error body with HTTP status `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        error_type: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.error_type = error_type
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code)


@dataclass(frozen=True)
class SloRequest:
    """The SLO fields sent to the planner (protocol.Submit), after defaults."""

    slo_class: str
    slo_targets: str | None = None
    ttft_ms: float | None = None
    ttft_slowdown: float | None = None
    tpot_ms: float | None = None
    thinking_tokens: int = 0
    thinking_tpot_ms: float | None = None
    value: float = 1.0
    chain_id: str | None = None  # the session (body chain_id or the x-session-id header)
    round_index: int | None = None  # None: not given (the front door counts a session's rounds)
    chain_last_round: bool = False
    expected_output_tokens: int | None = None


@dataclass(frozen=True)
class GenerationJob:
    """One validated request for either endpoint."""

    chat: bool
    model: str
    prompt_token_ids: list[int]
    max_tokens: int
    slo: SloRequest
    stream: bool = False
    include_usage: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()


_REFUSED = {
    "n": lambda v: v not in (None, 1),
    "best_of": lambda v: v not in (None, 1),
    "logprobs": lambda v: v not in (None, False, 0),
    "top_logprobs": lambda v: v not in (None, 0),
    "echo": lambda v: v not in (None, False),
    "suffix": lambda v: v not in (None, ""),
    "tools": lambda v: bool(v),
    "functions": lambda v: bool(v),
}


def parse_json_body(raw: bytes) -> dict[str, Any]:
    try:
        body = _JSON_DECODER.decode(raw)
    except msgspec.DecodeError as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise bad_request("the request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    return body


def parse_job(
    body: dict[str, Any],
    chat: bool,
    config: ApiConfig,
    tokenizer: TextTokenizer | None,
    api_key: str | None,
    session_header: str | None = None,
) -> GenerationJob:
    """Validate a /v1/completions (`chat` False) or /v1/chat/completions body, with the value
    of its x-session-id header (None: no such header)."""
    model = _model(body, config)
    for name, refused in _REFUSED.items():
        if refused(body.get(name)):
            raise bad_request(f"'{name}' is not supported by this server", name, "unsupported")
    max_model_len = context_length(config, tokenizer)
    if chat:
        prompt_ids = _chat_prompt(body, tokenizer, max_model_len)
    else:
        prompt_ids = _completion_prompt(body, tokenizer, max_model_len)
    max_tokens = _max_tokens(body, chat, config)
    if len(prompt_ids) + max_tokens > max_model_len:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {len(prompt_ids) + max_tokens} tokens ({len(prompt_ids)} in the prompt, "
            f"{max_tokens} for the completion). Please reduce the prompt or max_tokens.",
            "messages" if chat else "prompt",
            "context_length_exceeded",
        )
    stream_options = _optional(body, "stream_options", dict) or {}
    return GenerationJob(
        chat=chat,
        model=model,
        prompt_token_ids=prompt_ids,
        max_tokens=max_tokens,
        slo=_slo(body, config.slo_defaults(model, api_key), session_header),
        stream=bool(_optional(body, "stream", bool)),
        include_usage=bool(stream_options.get("include_usage", False)),
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        seed=_optional(body, "seed", int),
        ignore_eos=bool(_optional(body, "ignore_eos", bool)),
        stop=_stop(body),
    )


# ---- fields ---------------------------------------------------------------------------------


def _model(body: dict[str, Any], config: ApiConfig) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("you must provide a model parameter", "model")
    if model not in config.model_defaults:
        raise ApiError(
            404,
            f"The model `{model}` does not exist. Served models: {', '.join(config.model_names)}",
            "model",
            "model_not_found",
        )
    return model


def _completion_prompt(
    body: dict[str, Any], tokenizer: TextTokenizer | None, max_model_len: int
) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return _encode(prompt, tokenizer, "prompt", max_model_len)
    if isinstance(prompt, list) and prompt and set(map(type, prompt)) == {int}:  # C-speed check
        return _check_token_ids(prompt, tokenizer)
    if isinstance(prompt, list) and len(prompt) > 1:
        raise bad_request(
            "batched prompts are not supported: send one prompt per request",
            "prompt",
            "unsupported",
        )
    raise bad_request(
        "'prompt' must be a non-empty string or a non-empty list of token ids", "prompt"
    )


def _chat_prompt(
    body: dict[str, Any], tokenizer: TextTokenizer | None, max_model_len: int
) -> list[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list", "messages")
    rendered = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise bad_request(f"{where} must be an object with a 'role'", where)
        rendered.append((message["role"], _content_text(message.get("content"), where)))
    if tokenizer is None:
        raise bad_request(
            "this server has no tokenizer (start it with --model-dir): chat "
            "messages cannot be tokenized; use /v1/completions with token ids",
            "messages",
            "no_tokenizer",
        )
    return _encode(tokenizer.render_chat(rendered), tokenizer, "messages", max_model_len)


def _content_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (
                isinstance(part, dict)
                and part.get("type") == "text"
                and isinstance(part.get("text"), str)
            ):
                raise bad_request(f"{where}.content: only text parts are supported", where)
            parts.append(part["text"])
        return "".join(parts)
    raise bad_request(f"{where}.content must be a string or a list of text parts", where)


def _encode(
    text: str, tokenizer: TextTokenizer | None, param: str, max_model_len: int
) -> list[int]:
    if tokenizer is None:
        raise bad_request(
            "this server has no tokenizer (start it with --model-dir): send the "
            "prompt as a list of token ids",
            param,
            "no_tokenizer",
        )
    max_chars = max_model_len * tokenizer.max_token_bytes
    if len(text) > max_chars:  # certainly too long: no need to spend seconds tokenizing it
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens, and a token covers "
            f"at most {tokenizer.max_token_bytes} bytes: a {param} of {len(text)} characters "
            f"(more than {max_chars}) cannot fit. Please reduce the {param}.",
            param,
            "context_length_exceeded",
        )
    try:
        ids = tokenizer.encode(text, max_tokens=max_model_len)
    except PromptTooLong as exc:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, your "
            f"{param} has {exc.num_tokens} tokens. Please reduce the {param}.",
            param,
            "context_length_exceeded",
        ) from None
    if not ids:
        raise bad_request(f"'{param}' is empty after tokenization", param)
    return ids


def _check_token_ids(ids: list[int], tokenizer: TextTokenizer | None) -> list[int]:
    """`ids` (all of type int) if every id is within the vocabulary."""
    upper = tokenizer.vocab_size if tokenizer is not None else None
    lowest, highest = min(ids), max(ids)
    if lowest < 0 or (upper is not None and highest >= upper):
        bad = lowest if lowest < 0 else highest
        bound = f"[0, {upper})" if upper is not None else "non-negative"
        raise bad_request(f"token id {bad} in 'prompt' is out of range (must be {bound})", "prompt")
    return ids


def context_length(config: ApiConfig, tokenizer: TextTokenizer | None) -> int:
    """The most prompt + max_tokens a request may ask for (also told by GET /v1/models)."""
    if config.max_model_len is not None:
        return config.max_model_len
    if tokenizer is not None and tokenizer.max_model_len is not None:
        return tokenizer.max_model_len
    return DEFAULT_MAX_MODEL_LEN


def _max_tokens(body: dict[str, Any], chat: bool, config: ApiConfig) -> int:
    name = (
        "max_completion_tokens"
        if chat and body.get("max_completion_tokens") is not None
        else "max_tokens"
    )
    value = body.get(name)
    if value is None:
        return config.default_max_tokens if chat else config.default_completion_max_tokens
    if not _is_int(value) or value < 1:
        raise bad_request(f"'{name}' must be a positive integer, got {value!r}", name)
    return int(value)


def _positive_int(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_int(value) or value < 1:
        raise bad_request(f"'{name}' must be a positive integer, got {value!r}", name)
    return int(value)


def _slo(
    body: dict[str, Any], defaults: SloDefaults, session_header: str | None = None
) -> SloRequest:
    slo = _optional(body, "slo", dict) or {}
    known = {"ttft_ms", "ttft_slowdown", "tpot_ms", "thinking_tokens", "thinking_tpot_ms", "value"}
    unknown = sorted(set(slo) - known)
    if unknown:
        raise bad_request(
            f"unknown field(s) in 'slo': {', '.join(unknown)} (known: {', '.join(sorted(known))})",
            "slo",
        )
    requested_class = _optional(body, "slo_class", str)
    if requested_class:  # a class named in the request brings its own targets, not the defaults'
        defaults = SloDefaults(slo_class=requested_class)
    slo_class = defaults.slo_class
    explicit = {
        k: _positive(slo, k) for k in ("ttft_ms", "ttft_slowdown", "tpot_ms", "thinking_tpot_ms")
    }
    if explicit["ttft_ms"] is not None and explicit["ttft_slowdown"] is not None:
        raise bad_request("give at most one of slo.ttft_ms and slo.ttft_slowdown", "slo")
    if explicit["ttft_ms"] is None and explicit["ttft_slowdown"] is None:  # TTFT from defaults
        explicit["ttft_ms"], explicit["ttft_slowdown"] = defaults.ttft_ms, defaults.ttft_slowdown
    for key in ("tpot_ms", "thinking_tpot_ms"):
        if explicit[key] is None:
            explicit[key] = getattr(defaults, key)
    thinking_tokens = slo.get("thinking_tokens", 0)
    if not _is_int(thinking_tokens) or thinking_tokens < 0:
        raise bad_request("slo.thinking_tokens must be a non-negative integer", "slo")
    round_index = body.get("round_index")
    if round_index is not None and (not _is_int(round_index) or round_index < 0):
        raise bad_request("'round_index' must be a non-negative integer", "round_index")
    return SloRequest(
        slo_class=slo_class,
        slo_targets=_optional(body, "slo_targets", str),
        thinking_tokens=int(thinking_tokens),
        value=_positive(slo, "value") or 1.0,
        chain_id=_session_id(body, session_header),
        round_index=None if round_index is None else int(round_index),
        chain_last_round=bool(_optional(body, "chain_last_round", bool)),
        expected_output_tokens=_positive_int(body, "expected_output_tokens"),
        **explicit,
    )


def _session_id(body: dict[str, Any], session_header: str | None) -> str | None:
    """The request's session: the body's chain_id, the x-session-id header, or None; both given
    and different is an error."""
    from_body = _optional(body, "chain_id", str)
    if from_body is not None:
        _check_session_id(from_body, "chain_id")
    if session_header is not None:
        _check_session_id(session_header, SESSION_HEADER)
        if from_body is not None and from_body != session_header:
            raise bad_request(
                f"the {SESSION_HEADER} header ({session_header!r}) and the body's chain_id "
                f"({from_body!r}) name different sessions: give one, or the same in both",
                SESSION_HEADER,
            )
    return from_body if from_body is not None else session_header


def _check_session_id(value: str, param: str) -> None:
    if not value:
        raise bad_request(f"'{param}' must not be empty", param)
    if len(value) > MAX_SESSION_ID_CHARS:
        raise bad_request(
            f"'{param}' has {len(value)} characters, more than {MAX_SESSION_ID_CHARS}", param
        )
    if not (value.isascii() and value.isprintable()):
        raise bad_request(f"'{param}' must be printable ASCII, got {ascii(value)}", param)


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if (
        not isinstance(stop, list)
        or len(stop) > 4
        or not all(isinstance(s, str) and s for s in stop)
    ):
        raise bad_request("'stop' must be a non-empty string or a list of up to 4 of them", "stop")
    return tuple(stop)


def _optional(body: dict[str, Any], name: str, kind: type) -> Any:
    value = body.get(name)
    if value is None:
        return None
    ok = _is_int(value) if kind is int else isinstance(value, kind)
    if not ok:
        raise bad_request(f"'{name}' must be of type {kind.__name__}, got {value!r}", name)
    return value


def _number(
    body: dict[str, Any], name: str, default: float, low: float, high: float, low_open: bool = False
) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not _is_number(value) or value > high or value < low or (low_open and value == low):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise bad_request(f"'{name}' must be a number in {interval}, got {value!r}", name)
    return float(value)


def _positive(table: dict[str, Any], name: str) -> float | None:
    value = table.get(name)
    if value is None:
        return None
    if not _is_number(value) or value <= 0:
        raise bad_request(f"slo.{name} must be a positive number, got {value!r}", "slo")
    return float(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
