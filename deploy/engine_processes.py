"""Engine replicas as processes on this machine (`cluster = "local"`), under the supervisor: a
replica whose process exits is restarted under a new engine id, and the planner re-plans the dead
one's requests when it declares it dead."""

from __future__ import annotations

import dataclasses
import os

from deploy.control import ReplicaStatus
from deploy.deployment import Deployment
from deploy.processes import cli
from deploy.supervisor import Supervisor
from engine_adapters.registry import EngineOptions
from wire.security import CurveKeys

# What `slos-serve engine` and `api` read their CURVE keys from when no flag gives them
# (commands/curve_options.py): keys never appear in the process list.
CURVE_ENV = {
    "public_key": "SLOS_SERVE_CURVE_PUBLIC_KEY",
    "secret_key": "SLOS_SERVE_CURVE_SECRET_KEY",
    "server_public_key": "SLOS_SERVE_CURVE_SERVER_KEY",
}


def engine_id(index: int, launch: int) -> str:
    """Unique per launch: `engine-3` the first time, then `engine-3.1`, `engine-3.2`, ... so that
    a restarted or re-added replica never reuses the id of one the planner may still hold."""
    return f"engine-{index}" if launch == 0 else f"engine-{index}.{launch}"


def engine_flags(options: EngineOptions) -> list[str]:
    """`slos-serve engine` flags for the options that differ from the defaults."""
    defaults = EngineOptions()
    flags: list[str] = []
    for f in dataclasses.fields(EngineOptions):
        value = getattr(options, f.name)
        if value == getattr(defaults, f.name):
            continue
        if f.name == "vllm_args":
            for arg in value:
                flags += ["--vllm-arg", arg]
        elif isinstance(value, bool):
            flags.append(f"--{f.name.replace('_', '-')}")
        else:
            flags += [f"--{f.name.replace('_', '-')}", str(value)]
    return flags


def curve_env(curve: CurveKeys | None) -> dict[str, str]:
    """The environment that hands a child its CURVE keys (empty without CURVE)."""
    if curve is None:
        return {}
    return {variable: getattr(curve, field) for field, variable in CURVE_ENV.items()}


class ProcessEngines:
    def __init__(
        self,
        supervisor: Supervisor,
        deployment: Deployment,
        connect: str,
        curve: CurveKeys | None,
    ) -> None:
        self.supervisor = supervisor
        self.deployment = deployment
        self.connect = connect
        self.curve = curve
        settings = deployment.planner_settings()
        self.heartbeat_flags = [
            "--heartbeat-interval-s",
            str(settings.heartbeat_interval_s),
            "--liveness",
            str(settings.liveness),
        ]
        self.indices: set[int] = set()
        self._launches: dict[int, int] = {}  # index -> launches so far (ids stay unique)

    def start(self, index: int) -> None:
        first = self._launches.get(index, 0)
        flags = engine_flags(self.deployment.engine_options_for(index))
        keys_env = curve_env(self.curve)

        def argv(generation: int) -> list[str]:
            self._launches[index] = first + generation + 1
            return [
                *cli(),
                "engine",
                "--engine",
                self.deployment.engine,
                "--connect",
                self.connect,
                "--engine-id",
                engine_id(index, first + generation),
                *self.heartbeat_flags,
                *flags,
            ]

        env = {**os.environ, **keys_env} if keys_env else None
        self.supervisor.start(_name(index), argv, env=env)
        self.indices.add(index)

    def stop(self, index: int) -> None:
        self.indices.discard(index)
        self.supervisor.stop(_name(index))  # SIGTERM: the engine says GOODBYE

    def check(self) -> None:
        """Nothing to do: the supervisor restarts engine processes with the other children."""

    @property
    def num_placed(self) -> int:
        return len(self.indices)

    def replicas(self) -> list[ReplicaStatus]:
        rows = []
        for index in sorted(self.indices):
            child = self.supervisor.children[_name(index)]
            launch = self._launches.get(index, 1) - 1
            state = "running" if child.running else "restarting"
            where = f"pid {child.process.pid}" if child.process is not None else ""
            rows.append(
                ReplicaStatus(index, engine_id(index, launch), state, where, child.generation)
            )
        return rows

    def close(self) -> None:
        """The supervisor stops the processes with the other children."""


def _name(index: int) -> str:
    return f"engine-{index}"
