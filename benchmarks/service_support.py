"""What the service benchmarks share: a planner config on free loopback ports."""

from __future__ import annotations

from pathlib import Path

from commands.demo import free_port

PLANNER_TOML = """\
formulation = "{formulation}"
[planner]
engine_endpoint = "tcp://127.0.0.1:{engine_port}"
client_endpoint = "tcp://127.0.0.1:{client_port}"
heartbeat_interval_s = 0.5
default_perf_model = "{perf_model}"
"""


def write_planner_config(
    directory: Path, formulation: str, perf_model: str
) -> tuple[Path, int, int]:
    """A planner TOML in `directory` on two free ports: (its path, engine port, client port)."""
    engine_port, client_port = free_port(), free_port()
    path = directory / f"planner-{engine_port}.toml"
    fields = {"engine_port": engine_port, "client_port": client_port}
    path.write_text(PLANNER_TOML.format(formulation=formulation, perf_model=perf_model, **fields))
    return path, engine_port, client_port
