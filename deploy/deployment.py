"""One deployment: what `slos-serve serve` runs, from the embedded default (`deploy/default.toml`),
a deployment TOML, and flags on top. Strict like the planner's config: an unknown key or a bad
value is a one-line error that names it."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from engine_adapters.registry import EngineOptions
from planner_svc.config import PlannerConfig, config_from_dict

DEFAULT_TOML = Path(__file__).with_name("default.toml")
CLUSTERS = ("local", "ray")
CURVE_MODES = ("auto", "on", "off")
PERF_MODEL_FILE = "perf_model.json"  # written by `slos-serve profile` into a model directory


@dataclass(frozen=True)
class Network:
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    planner_host: str = ""
    advertise_host: str = ""
    engine_port: int = 5557
    client_port: int = 5558
    control_port: int = 5559
    metrics_port: int = 0
    curve: str = "auto"

    def __post_init__(self) -> None:
        for name in ("api_port", "engine_port", "client_port", "control_port", "metrics_port"):
            port = getattr(self, name)
            if not isinstance(port, int) or not 0 <= port < 65536:
                raise ValueError(f"[network] {name} must be a port in [0, 65535], got {port!r}")
        if self.curve not in CURVE_MODES:
            raise ValueError(f"[network] curve must be one of {CURVE_MODES}, got {self.curve!r}")


@dataclass(frozen=True)
class RayOptions:
    address: str = ""
    num_cpus: float | None = None
    num_gpus: float | None = None
    resources: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("num_cpus", "num_gpus"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, float)) or value < 0):
                raise ValueError(f"[ray] {name} must be a number >= 0, got {value!r}")


@dataclass(frozen=True)
class Deployment:
    engine: str = "sim"
    replicas: int = 2
    model_dir: str = ""
    served_model_name: tuple[str, ...] = ()
    cluster: str = "local"
    api_config: str = ""
    startup_timeout_s: float = 300.0
    network: Network = field(default_factory=Network)
    ray: RayOptions = field(default_factory=RayOptions)
    engine_options: dict[str, Any] = field(default_factory=dict)
    planner_config: dict[str, Any] = field(default_factory=dict)
    source: str = "the embedded default"

    def __post_init__(self) -> None:
        if not isinstance(self.replicas, int) or self.replicas < 1:
            raise ValueError(f"replicas must be an integer >= 1, got {self.replicas!r}")
        if self.cluster not in CLUSTERS:
            raise ValueError(f"cluster must be one of {CLUSTERS}, got {self.cluster!r}")
        if self.startup_timeout_s <= 0:
            raise ValueError("startup_timeout_s must be > 0")
        _check_engine_options(self.engine_options)
        if self.engine != "sim" and not self.model_dir and "model_dir" not in self.engine_options:
            raise ValueError(f"engine {self.engine!r} needs a model directory (--model-dir)")
        if self.model_dir and not Path(self.model_dir).is_dir():
            raise ValueError(f"model directory {self.model_dir} does not exist")
        planner = self.planner_config.get("planner", {})
        for key in ("engine_endpoint", "client_endpoint", "metrics_port"):
            if key in planner:
                raise ValueError(f"[planner_config.planner] {key}: set the ports under [network]")
        if "curve" in self.planner_config:
            raise ValueError("[planner_config] curve: serve makes the CURVE keys ([network] curve)")

    # ------------------------------------------------------------------ derived

    @property
    def engine_bind_host(self) -> str:
        """Where the planner's engine socket listens."""
        if self.network.planner_host:
            return self.network.planner_host
        return "0.0.0.0" if self.cluster == "ray" and self.ray.address else "127.0.0.1"

    def engine_dial_host(self, node_ip: str | None = None) -> str:
        """The address engines dial: `advertise_host`, else the bind host unless it is a
        wildcard, else `node_ip` (this node's address as the cluster sees it)."""
        if self.network.advertise_host:
            return self.network.advertise_host
        host = self.engine_bind_host
        if host not in ("0.0.0.0", "::", "*"):
            return host
        return node_ip or socket.gethostbyname(socket.gethostname())

    @property
    def uses_curve(self) -> bool:
        if self.network.curve != "auto":
            return self.network.curve == "on"
        return not is_loopback(self.engine_bind_host)

    @property
    def model_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name[0]
        return Path(self.model_dir).name if self.model_dir else "slos-serve"

    def planner_tables(self, engine_port: int, client_port: int) -> dict[str, Any]:
        """The planner daemon's config as a dict (planner_svc/config.py's tables) on the given
        ports. A torch / vllm model directory with a profile gives the default performance model
        (for TTFT slowdowns) unless the tables name one."""
        tables = json.loads(json.dumps(self.planner_config))  # a deep copy
        planner = tables.setdefault("planner", {})
        planner["engine_endpoint"] = f"tcp://{self.engine_bind_host}:{engine_port}"
        planner["client_endpoint"] = f"tcp://127.0.0.1:{client_port}"
        planner["metrics_port"] = self.network.metrics_port
        profile = Path(self.model_dir) / PERF_MODEL_FILE if self.model_dir else None
        if profile is not None and profile.is_file() and "default_perf_model" not in planner:
            planner["default_perf_model"] = str(profile.resolve())
        return tables

    @property
    def time_scale(self) -> float:
        """Sim engines sleep this many times each step's modelled time (1: real time)."""
        return float(self.engine_options.get("time_scale", 1.0)) if self.engine == "sim" else 1.0

    def time_scaled(self, tables: dict[str, Any], directory: Path) -> dict[str, Any]:
        """The planner tables for sim engines slowed down `time_scale` times: the planner plans
        with the sim model's step times and every SLO's absolute targets (TPOTs, absolute TTFTs)
        scaled alike, so that it makes the same decisions as at full speed (TTFT slowdowns are
        relative to the model, so they scale by themselves). Writes the scaled model into
        `directory`. Used where 16 real-time replicas would not fit the machine's cores."""
        scale = self.time_scale
        if scale == 1.0:
            return tables
        from formulations.perf_model import Line, PerfModel, perf_model_preset
        from formulations.slo import SLO_PRESETS

        base = perf_model_preset(str(self.engine_options.get("perf_model", "opt-13b-h100")))
        lines = tuple(
            Line(*(scale * x for x in (ln.k_token_s, ln.k_spec_s, ln.intercept_s)))
            for ln in base.lines
        )
        scaled = PerfModel(lines, f"{base.name}-x{scale:g}")
        path = directory / f"{scaled.name}.json"
        path.write_text(json.dumps(scaled.to_dict()))
        tables["planner"]["default_perf_model"] = str(path)
        classes = {
            name: {
                "tpot_ms": 1000 * slo.tpot_s,
                **({"ttft_slowdown": slo.ttft_slowdown} if slo.ttft_slowdown else {}),
                **({"ttft_ms": 1000 * slo.ttft_s} if slo.ttft_s else {}),
                **({"thinking_tpot_ms": 1000 * slo.thinking_tpot_s} if slo.thinking_tpot_s else {}),
            }
            for name, slo in SLO_PRESETS.items()
        }
        classes.update(tables.get("slo_classes", {}))
        for spec in classes.values():
            for key in ("tpot_ms", "ttft_ms", "thinking_tpot_ms"):
                if key in spec:
                    spec[key] = scale * spec[key]
        tables["slo_classes"] = classes
        return tables

    def planner_settings(self) -> PlannerConfig:
        """The planner config these tables make (validated; the ports do not matter here)."""
        return config_from_dict(self.planner_tables(1, 2), source=f"{self.source} [planner_config]")

    def engine_options_for(self, index: int) -> EngineOptions:
        """Replica `index`'s engine options (sim engines get distinct seeds)."""
        options = dict(self.engine_options)
        options["seed"] = int(options.get("seed", 0)) + index
        if self.model_dir:
            options["model_dir"] = str(Path(self.model_dir).resolve())
        options["vllm_args"] = tuple(options.get("vllm_args", ()))
        return EngineOptions(**options)

    def replace(self, **changes) -> Deployment:
        return dataclasses.replace(self, **changes)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_TOP_KEYS = {f.name for f in dataclasses.fields(Deployment)} - {"source"}
_ENGINE_FIELDS = {f.name: f for f in dataclasses.fields(EngineOptions)}


def load_deployment(path: str | Path | None = None) -> Deployment:
    """The deployment in a TOML file (None: the embedded default)."""
    path = Path(path) if path is not None else DEFAULT_TOML
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML: {exc}") from None
    source = "the embedded default" if path == DEFAULT_TOML else str(path)
    return deployment_from_dict(data, source)


def deployment_from_dict(data: dict[str, Any], source: str = "deployment") -> Deployment:
    _check_keys(data, _TOP_KEYS, source)
    try:
        network = Network(**_table(data, "network", Network, source))
        ray = RayOptions(**_table(data, "ray", RayOptions, source))
        curve = data.get("network", {}).get("curve")
        if isinstance(curve, bool):  # curve = true / false reads naturally in TOML
            network = dataclasses.replace(network, curve="on" if curve else "off")
        return Deployment(
            engine=str(data.get("engine", "sim")),
            replicas=data.get("replicas", 2),
            model_dir=str(data.get("model_dir", "")),
            served_model_name=tuple(data.get("served_model_name", ())),
            cluster=str(data.get("cluster", "local")),
            api_config=str(data.get("api_config", "")),
            startup_timeout_s=float(data.get("startup_timeout_s", 300.0)),
            network=network,
            ray=ray,
            engine_options=dict(data.get("engine_options", {})),
            planner_config=dict(data.get("planner_config", {})),
            source=source,
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{source}: {exc}") from None


def _table(data: dict[str, Any], name: str, cls, source: str) -> dict[str, Any]:
    table = dict(data.get(name, {}))
    if name == "network" and isinstance(table.get("curve"), bool):
        table.pop("curve")
    _check_keys(table, {f.name for f in dataclasses.fields(cls)}, f"{source} [{name}]")
    return table


def _check_keys(table: dict[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(table) - known)
    if unknown:
        raise ValueError(
            f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})"
        )


def _check_engine_options(options: dict[str, Any]) -> None:
    _check_keys(options, set(_ENGINE_FIELDS), "[engine_options]")
    for name, value in options.items():
        expected = _ENGINE_FIELDS[name].type
        if name == "vllm_args":
            ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
        elif "bool" in expected:
            ok = isinstance(value, bool)
        elif "int" in expected:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif "float" in expected:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        else:
            ok = isinstance(value, str)
        if not ok:
            raise ValueError(f"[engine_options] {name}: expected {expected}, got {value!r}")


def parse_option(text: str) -> tuple[str, Any]:
    """`NAME=VALUE` from the command line: the value read as TOML when it parses, else a string
    (`time_scale=4` -> 4, `perf_model=opt-13b-h100` -> the string)."""
    name, sep, raw = text.partition("=")
    if not sep or not name:
        raise ValueError(f"expected NAME=VALUE, got {text!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return name.strip().replace("-", "_"), value
