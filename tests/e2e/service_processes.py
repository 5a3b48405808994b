"""The service as real processes on loopback, for the end-to-end and fault-injection tests:
`slos-serve planner` (with a metrics port) and `slos-serve engine --engine sim` processes, each in
its own process group, plus a PlannerClient in the test process. Processes can be killed, stopped,
restarted (the planner on the same ports) and their Prometheus metrics read."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
import urllib.request
from pathlib import Path

from commands.demo import ProcessGroup, free_port, wait_for_engines
from planner_svc.client import PlannerClient

PERF_MODEL = "opt-13b-h100"
NUM_BLOCKS = 3500
HEARTBEAT_INTERVAL_S = 0.1
LIVENESS = 5

CONFIG = """\
formulation = "{formulation}"
[planner]
engine_endpoint = "tcp://127.0.0.1:{engine_port}"
client_endpoint = "tcp://127.0.0.1:{client_port}"
metrics_port = {metrics_port}
heartbeat_interval_s = {heartbeat_interval_s}
liveness = {liveness}
max_frame_bytes = {max_frame_bytes}
default_perf_model = "{perf_model}"
{extra}
"""
CLI = [sys.executable, "-m", "commands.cli"]
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[^}]*\})?) (\S+)$")


class ServiceProcesses:
    def __init__(
        self,
        tmp_path: Path,
        formulation: str = "slos_dp",
        num_engines: int = 2,
        max_frame_bytes: int = 65536,
        extra_config: str = "",
    ) -> None:
        self.engine_port, self.client_port, self.metrics_port = (
            free_port(),
            free_port(),
            free_port(),
        )
        self.config_path = tmp_path / f"planner-{self.client_port}.toml"
        # a replay's true lengths: read by the sim engines only, never by the planner
        self.true_lengths = tmp_path / f"lengths-{self.client_port}.jsonl"
        self.config_path.write_text(
            CONFIG.format(
                formulation=formulation,
                engine_port=self.engine_port,
                client_port=self.client_port,
                metrics_port=self.metrics_port,
                heartbeat_interval_s=HEARTBEAT_INTERVAL_S,
                liveness=LIVENESS,
                max_frame_bytes=max_frame_bytes,
                perf_model=PERF_MODEL,
                extra=extra_config,
            )
        )
        self.group = ProcessGroup()
        self.start_planner()
        for i in range(num_engines):
            self.start_engine(f"engine-{i}")
        self.client = PlannerClient(self.client_endpoint)
        if num_engines:
            self.wait_for_engines(num_engines)

    @property
    def engine_endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.engine_port}"

    @property
    def client_endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.client_port}"

    def start_planner(self) -> None:
        argv = [*CLI, "planner", "--config", str(self.config_path), "--log-level", "WARNING"]
        self.group.start("planner", argv)

    def start_engine(self, name: str, *extra: str, engine_id: str | None = None):
        argv = [
            *CLI,
            "engine",
            "--engine",
            "sim",
            "--engine-id",
            engine_id or name,
            "--connect",
            self.engine_endpoint,
            "--perf-model",
            PERF_MODEL,
            "--num-blocks",
            str(NUM_BLOCKS),
            "--heartbeat-interval-s",
            str(HEARTBEAT_INTERVAL_S),
            "--liveness",
            str(LIVENESS),
            "--log-level",
            "WARNING",
            "--output-lengths",
            str(self.true_lengths),
            *extra,
        ]
        return self.group.start(name, argv)

    def signal(self, name: str, signum: int) -> None:
        os.killpg(self.group.processes[name].pid, signum)

    def kill(self, name: str) -> None:
        """kill -9, and reap it."""
        process = self.group.processes[name]
        self.signal(name, signal.SIGKILL)
        process.wait(10)

    def wait_for_engines(self, count: int, timeout_s: float = 60.0) -> None:
        wait_for_engines(self.client, count, self.group, timeout_s=timeout_s)

    def metrics(self) -> dict[str, float]:
        """The planner's Prometheus samples, `name{labels}` -> value."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        samples = {}
        for line in text.splitlines():
            match = _SAMPLE.match(line)
            if match:
                samples[match.group(1)] = float(match.group(2))
        return samples

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples of `name` whose labels include `labels` (0 if none)."""
        total = 0.0
        for key, value in self.metrics().items():
            base, _, rest = key.partition("{")
            if base == name and all(f'{k}="{v}"' in rest for k, v in labels.items()):
                total += value
        return total

    def close(self) -> None:
        self.client.close()
        self.group.stop_all()


def wait_until(condition, timeout_s: float, what: str, poll_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:g} s: {what}")
        time.sleep(poll_s)


def record_fault_counts(fault: str, **counts: float) -> None:
    """Append what a fault test read from the metrics to the file SLOS_FAULT_COUNTS names (the
    soak benchmark tabulates them); nothing without it."""
    path = os.environ.get("SLOS_FAULT_COUNTS")
    if path:
        with open(path, "a") as out:
            out.write(json.dumps({"fault": fault, "counts": counts}) + "\n")
