"""The planner daemon's configuration: one TOML file per deployment (docs/ARCHITECTURE.md).

formulation = "sarathi"            # any registered name; swapping it changes nothing else
router = "round_robin"
max_forwards = 1
lengths = "predicted"              # what the planner knows of output lengths: "predicted"
                                   # (learned from finished requests), "max_tokens" or
                                   # "oracle" (both: plan with each request's max_tokens)
kv_retention = true                # keep tool chains' KV between rounds on engines that can
                                   # (their READY says so); false: every round recomputes

[length_priors.reasoning]          # cold-start belief per class (or "class/thinking"):
median = 2000                      # a log-normal by its median and 90th percentile,
p90 = 6000                         # worth `weight` requests (default 20)

[formulation_params]               # keyword arguments of the formulation's constructor

[planner]
engine_endpoint = "tcp://127.0.0.1:5557"   # engines connect here (ROUTER)
client_endpoint = "tcp://127.0.0.1:5558"   # clients connect here (ROUTER)
metrics_port = 0                           # Prometheus /metrics; 0 = off
metrics_address = "127.0.0.1"              # where /metrics listens ("0.0.0.0": every interface)
heartbeat_interval_s = 0.5
liveness = 6                               # an engine silent this many intervals is dead
tick_interval_s = 0.01                     # planner timer resolution
max_frame_bytes = 8388608
max_ended_history = 10000                  # ended requests kept for STATS and duplicate-id checks
client_timeout_s = 10.0                    # a client silent this long: its requests are aborted
default_perf_model = "opt-13b-h100"        # for engines that send none and for TTFT slowdowns
                                           # (a preset name or a profile's perf_model.json)

[slo_classes.chatbot]                      # overrides / additions to the published presets
ttft_slowdown = 5.0                        # or ttft_ms = 800
tpot_ms = 100                              # thinking_tpot_ms = 50 for reasoning classes

[[replicas]]                               # optional: per-engine models, by engine id, for
engine_id = "engine-0"                     # engines that send none (their own model wins)
perf_model = "opt-13b-h100"                # a preset name, or
# perf_model_lines = [[4.18e-5, 0.0, 0.0274]]

[core.refit]                               # optional: refit each engine's model online from its
overrun_target = 0.5                       # step reports (formulations/refit.py RefitParams)

[curve]                                    # optional CURVE encryption beyond loopback
public_key = "..."
secret_key = "..."
allowed_client_keys = []                   # empty: any client that knows the server key
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from formulations.lengths import LENGTH_MODES, LengthPrior
from formulations.perf_model import PerfModel, perf_model_preset
from formulations.slo import SLO, SLO_PRESETS
from wire.endpoint import check_endpoint
from wire.security import check_key, check_key_pair


@dataclass(frozen=True)
class CurveConfig:
    public_key: str
    secret_key: str
    allowed_client_keys: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_key_pair(self.public_key, self.secret_key, "[curve]")
        for i, key in enumerate(self.allowed_client_keys):
            check_key(key, f"[curve] allowed_client_keys[{i}]")


@dataclass(frozen=True)
class PlannerConfig:
    formulation: str = "sarathi"
    formulation_params: dict[str, Any] = field(default_factory=dict)
    router: str = "round_robin"
    max_forwards: int = 1
    engine_endpoint: str = "tcp://127.0.0.1:5557"
    client_endpoint: str = "tcp://127.0.0.1:5558"
    metrics_port: int = 0
    metrics_address: str = "127.0.0.1"
    heartbeat_interval_s: float = 0.5
    liveness: int = 6
    tick_interval_s: float = 0.01
    max_frame_bytes: int = 8 << 20
    max_ended_history: int = 10_000
    client_timeout_s: float = 10.0
    default_perf_model: str = "opt-13b-h100"
    slo_classes: dict[str, SLO] = field(default_factory=lambda: dict(SLO_PRESETS))
    replica_perf_models: dict[str, PerfModel] = field(default_factory=dict)  # by engine id
    curve: CurveConfig | None = None
    core_params: dict[str, Any] = field(default_factory=dict)  # passed to the planner core
    lengths: str = "predicted"
    length_priors: dict[str, LengthPrior] = field(default_factory=dict)
    kv_retention: bool = True  # engines that keep KV keep tool chains' KV (docs/AGENTS.md)

    def __post_init__(self) -> None:
        if self.heartbeat_interval_s <= 0 or self.liveness < 1 or self.tick_interval_s <= 0:
            raise ValueError("heartbeat_interval_s and tick_interval_s must be > 0, liveness >= 1")
        if self.max_frame_bytes < 1024:
            raise ValueError("max_frame_bytes must be at least 1024")
        if self.lengths not in LENGTH_MODES:
            known = ", ".join(LENGTH_MODES)
            raise ValueError(f"lengths must be one of {known}, got {self.lengths!r}")
        if not isinstance(self.kv_retention, bool):
            raise ValueError(f"kv_retention must be true or false, got {self.kv_retention!r}")
        if self.max_ended_history < 0 or not self.client_timeout_s > 0:
            raise ValueError("max_ended_history must be >= 0 and client_timeout_s > 0")
        check_endpoint(self.engine_endpoint, "[planner] engine_endpoint", bind=True)
        check_endpoint(self.client_endpoint, "[planner] client_endpoint", bind=True)
        if not isinstance(self.metrics_port, int) or not 0 <= self.metrics_port < 65536:
            raise ValueError(f"[planner] metrics_port must be in [0, 65535]: {self.metrics_port!r}")
        _ = self.perf_model  # fails early on a bad name or file

    @property
    def perf_model(self) -> PerfModel:
        """`default_perf_model`: a preset name, or a JSON file written by `slos-serve profile`."""
        if self.default_perf_model.endswith(".json"):
            path = Path(self.default_perf_model)
            try:
                return PerfModel.from_dict(json.loads(path.read_text()))
            except (OSError, json.JSONDecodeError) as exc:
                raise ValueError(f"cannot read performance model {path}: {exc}") from None
        return perf_model_preset(self.default_perf_model)

    def perf_model_for(self, engine_id: str) -> PerfModel | None:
        return self.replica_perf_models.get(engine_id)


_TOP_KEYS = {
    "kv_retention",
    "lengths",
    "length_priors",
    "formulation",
    "formulation_params",
    "router",
    "max_forwards",
    "planner",
    "slo_classes",
    "replicas",
    "curve",
    "core",
}
_PLANNER_KEYS = {
    "engine_endpoint",
    "client_endpoint",
    "metrics_port",
    "metrics_address",
    "heartbeat_interval_s",
    "liveness",
    "tick_interval_s",
    "max_frame_bytes",
    "max_ended_history",
    "client_timeout_s",
    "default_perf_model",
}


def load_config(path: str | Path) -> PlannerConfig:
    """Read and validate a planner TOML file (or the same tables as JSON, as `slos-serve serve`
    writes them); errors name the offending key."""
    path = Path(path)
    if path.suffix == ".json":
        try:
            return config_from_dict(json.loads(path.read_text()), source=str(path))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON: {exc}") from None
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML: {exc}") from None
    return config_from_dict(data, source=str(path))


def config_from_dict(data: dict[str, Any], source: str = "config") -> PlannerConfig:
    _check_keys(data, _TOP_KEYS, source)
    planner = data.get("planner", {})
    _check_keys(planner, _PLANNER_KEYS, f"{source} [planner]")
    try:
        return PlannerConfig(
            formulation=str(data.get("formulation", "sarathi")),
            formulation_params=dict(data.get("formulation_params", {})),
            router=str(data.get("router", "round_robin")),
            max_forwards=int(data.get("max_forwards", 1)),
            slo_classes=_slo_classes(data.get("slo_classes", {}), source),
            replica_perf_models=_replica_perf_models(data.get("replicas", []), source),
            curve=_curve(data.get("curve"), source),
            core_params=dict(data.get("core", {})),
            lengths=str(data.get("lengths", "predicted")),
            length_priors=_length_priors(data.get("length_priors", {}), source),
            kv_retention=data.get("kv_retention", True),
            **planner,
        )
    except TypeError as exc:
        raise ValueError(f"{source}: {exc}") from None


def _check_keys(table: dict[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(table) - known)
    if unknown:
        raise ValueError(
            f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})"
        )


def _slo_classes(table: dict[str, Any], source: str) -> dict[str, SLO]:
    classes = dict(SLO_PRESETS)
    for name, spec in table.items():
        where = f"{source} [slo_classes.{name}]"
        _check_keys(spec, {"ttft_slowdown", "ttft_ms", "tpot_ms", "thinking_tpot_ms"}, where)
        if "tpot_ms" not in spec:
            raise ValueError(f"{where}: tpot_ms is required")
        try:
            classes[name] = SLO(
                tpot_s=spec["tpot_ms"] / 1000,
                ttft_slowdown=spec.get("ttft_slowdown"),
                ttft_s=spec["ttft_ms"] / 1000 if "ttft_ms" in spec else None,
                thinking_tpot_s=spec["thinking_tpot_ms"] / 1000
                if "thinking_tpot_ms" in spec
                else None,
            )
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
    return classes


def _replica_perf_models(rows: list[dict[str, Any]], source: str) -> dict[str, PerfModel]:
    models: dict[str, PerfModel] = {}
    for i, row in enumerate(rows):
        where = f"{source} [[replicas]] #{i}"
        _check_keys(row, {"engine_id", "perf_model", "perf_model_lines"}, where)
        if "engine_id" not in row:
            raise ValueError(f"{where}: engine_id is required")
        if "perf_model_lines" in row:
            models[row["engine_id"]] = PerfModel.from_dict(
                {"name": row.get("perf_model", "custom"), "lines": row["perf_model_lines"]}
            )
        elif "perf_model" in row:
            models[row["engine_id"]] = perf_model_preset(row["perf_model"])
    return models


def _curve(table: dict[str, Any] | None, source: str) -> CurveConfig | None:
    if table is None:
        return None
    _check_keys(table, {"public_key", "secret_key", "allowed_client_keys"}, f"{source} [curve]")
    try:
        return CurveConfig(
            public_key=table["public_key"],
            secret_key=table["secret_key"],
            allowed_client_keys=tuple(table.get("allowed_client_keys", ())),
        )
    except KeyError as exc:
        raise ValueError(f"{source} [curve]: missing {exc}") from None


def _length_priors(table: dict[str, Any], source: str) -> dict[str, LengthPrior]:
    priors = {}
    for name, spec in table.items():
        where = f"{source} [length_priors.{name}]"
        if not isinstance(spec, dict):
            raise ValueError(f"{where}: must be a table")
        _check_keys(spec, {"median", "p90", "weight"}, where)
        try:
            priors[name] = LengthPrior(**spec)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: {exc}") from None
    return priors
