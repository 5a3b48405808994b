"""Configuration of the HTTP front door: served model names, limits, and default SLOs per model name
and per API key. One TOML file (`slos-serve api --config FILE`), every key optional:

    default_slo_class = "chatbot"     # when neither the request, its API key nor its model says
    default_max_tokens = 256          # chat requests without max_tokens (completions: 16)
    max_model_len = 2048              # prompt + max_tokens; default: the model dir's config.json
    verdict_timeout_s = 5.0           # no verdict by then: 503 and the request is aborted
    require_api_key = false           # true: only the keys below may call /v1/*
    max_sessions = 65536              # sessions whose round count the front door keeps (LRU)
    session_ttl_s = 600.0             # a session silent this long restarts at round 0

    [models.slos-tiny]                # served model names (the first is the default)
    slo_class = "chatbot"
    [models.slos-tiny-coder]          # another name for the same engines, with other defaults
    slo_class = "coder"
    ttft_ms = 500                     # explicit targets override the class's

    [api_keys."sk-team-a"]
    slo_class = "summarizer"

Precedence, field by field: the request body's extension fields, then the API key's defaults, then
the model name's, then `default_slo_class`.

The front door does not resolve SLOs: it passes the class and any explicit targets on, and the
planner resolves them once (planner_svc/request_book.py) and says the result in its verdict. A
planner with admission control answers within each request's TTFT target (planner_svc/core.py);
`verdict_timeout_s` only bounds the wait for a planner that does not answer at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import tomllib

DEFAULT_MODEL_NAME = "slos-serve"


@dataclass(frozen=True)
class SloDefaults:
    """SLO fields that a model name or an API key supplies when the request does not."""

    slo_class: str | None = None
    ttft_ms: float | None = None
    ttft_slowdown: float | None = None
    tpot_ms: float | None = None
    thinking_tpot_ms: float | None = None

    def __post_init__(self) -> None:
        for name in ("ttft_ms", "ttft_slowdown", "tpot_ms", "thinking_tpot_ms"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}")

    def over(self, base: SloDefaults) -> SloDefaults:
        """These defaults, with `base` filling the fields left unset."""
        return replace(
            base,
            **{
                f.name: getattr(self, f.name)
                for f in fields(self)
                if getattr(self, f.name) is not None
            },
        )


@dataclass(frozen=True)
class ApiConfig:
    model_defaults: dict[str, SloDefaults] = field(
        default_factory=lambda: {DEFAULT_MODEL_NAME: SloDefaults()}
    )
    api_keys: dict[str, SloDefaults] = field(default_factory=dict)
    default_slo_class: str = "chatbot"
    default_max_tokens: int = 256
    default_completion_max_tokens: int = 16  # OpenAI's default for /v1/completions
    max_model_len: int | None = None  # None: from the model directory, else 8192
    verdict_timeout_s: float = 5.0
    require_api_key: bool = False
    max_body_bytes: int = 8 << 20
    # The round count per session (x-session-id / chain_id without round_index), bounded:
    # least recently used sessions beyond max_sessions are forgotten (at most ~20 MB with ids at
    # their 128-character limit), and so is a session silent for session_ttl_s (the planner's
    # CHAIN_IDLE_S: it has forgotten the chain by then too). A forgotten session starts at 0.
    max_sessions: int = 65536
    session_ttl_s: float = 600.0

    def __post_init__(self) -> None:
        if not self.model_defaults:
            raise ValueError("at least one served model name is needed")
        if self.default_max_tokens < 1 or self.default_completion_max_tokens < 1:
            raise ValueError("default_max_tokens must be at least 1")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError("max_model_len must be at least 2")
        if not self.verdict_timeout_s > 0:
            raise ValueError("verdict_timeout_s must be positive")
        if self.max_sessions < 1 or not self.session_ttl_s > 0:
            raise ValueError("max_sessions must be at least 1 and session_ttl_s positive")
        if self.require_api_key and not self.api_keys:
            raise ValueError("require_api_key is set but no [api_keys] are configured")

    @property
    def model_names(self) -> tuple[str, ...]:
        return tuple(self.model_defaults)

    def slo_defaults(self, model: str, api_key: str | None) -> SloDefaults:
        """The defaults that apply to a request for `model` sent with `api_key`."""
        base = SloDefaults(slo_class=self.default_slo_class)
        resolved = self.model_defaults.get(model, SloDefaults()).over(base)
        if api_key is not None and api_key in self.api_keys:
            resolved = self.api_keys[api_key].over(resolved)
        return resolved


_TOP_KEYS = {
    "default_slo_class",
    "default_max_tokens",
    "max_model_len",
    "verdict_timeout_s",
    "require_api_key",
    "max_body_bytes",
    "max_sessions",
    "session_ttl_s",
    "models",
    "api_keys",
}


def load_api_config(
    path: str | Path | None,
    served_model_names: list[str] | None = None,
    **overrides: Any,
) -> ApiConfig:
    """Read the TOML file (or none), then apply `served_model_names` (which replace the file's
    model list, keeping the defaults of names the file knows) and non-None `overrides`."""
    data: dict[str, Any] = {}
    source = "api config"
    if path is not None:
        source = str(path)
        try:
            data = tomllib.loads(Path(path).read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path}: not valid TOML: {exc}") from None
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise ValueError(
            f"{source}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(_TOP_KEYS))})"
        )
    models = _defaults_table(data.get("models", {}), f"{source} [models]")
    if served_model_names:
        models = {name: models.get(name, SloDefaults()) for name in served_model_names}
    scalars = {k: v for k, v in data.items() if k not in ("models", "api_keys")}
    scalars.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return ApiConfig(
            model_defaults=models or {DEFAULT_MODEL_NAME: SloDefaults()},
            api_keys=_defaults_table(data.get("api_keys", {}), f"{source} [api_keys]"),
            **scalars,
        )
    except TypeError as exc:
        raise ValueError(f"{source}: {exc}") from None


def _defaults_table(table: dict[str, Any], where: str) -> dict[str, SloDefaults]:
    known = {f.name for f in fields(SloDefaults)}
    result = {}
    for name, spec in table.items():
        if not isinstance(spec, dict):
            raise ValueError(f"{where}: {name!r} must be a table")
        unknown = sorted(set(spec) - known)
        if unknown:
            raise ValueError(
                f"{where} {name!r}: unknown key(s) {', '.join(unknown)} "
                f"(known: {', '.join(sorted(known))})"
            )
        try:
            result[name] = SloDefaults(**spec)
        except ValueError as exc:
            raise ValueError(f"{where} {name!r}: {exc}") from None
    return result
