"""`slos-serve serve`: the planner daemon, N engine replicas and the OpenAI-compatible front door
as one service, until SIGINT / SIGTERM.

    serve (this process, main thread)
      |- planner   child process        planner daemon on the deployment's ports
      |- engine-i  child processes      (cluster = local)  or  Ray actors (cluster = ray)
      |- api       child process        slos-serve api in front of the planner
      `- control   REP socket           slos-serve scale N / status

Every child's output is printed with its name as a prefix; a child that exits is restarted after
a backoff (an engine under a new engine id, its requests re-planned by the planner); the config
file, when one is given, is watched and a new `replicas` value applied. On the way out every
child is stopped (SIGTERM, then SIGKILL), every actor too, and a local Ray this process started
is shut down.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from deploy.control import ControlReply, ControlServer, ScaleRequest, StatusRequest
from deploy.deployment import Deployment
from deploy.engine_processes import ProcessEngines, curve_env
from deploy.processes import cli, free_port
from deploy.supervisor import PrefixedLog, Supervisor
from wire.security import CurveKeys, make_keypair

LOOP_INTERVAL_MS = 100
CONFIG_POLL_S = 1.0
PLACEMENT_SETTLE_S = 10.0  # ready with fewer replicas when the rest wait this long for resources


class ServiceError(ValueError):
    """The service could not start (a one-line reason; the parts' logs are above it)."""


class Service:
    def __init__(
        self,
        deployment: Deployment,
        log: PrefixedLog,
        config_path: Path | None = None,
        reload: Callable[[], Deployment] | None = None,
    ) -> None:
        """`reload` reads the deployment again (the file at `config_path` with the same flags
        on top) when that file changes."""
        self.deployment = deployment
        self.log = log
        self.config_path = config_path if reload is not None else None
        self.reload = reload
        self._config_mtime = self.config_path.stat().st_mtime if self.config_path else None
        self._config_checked_s = 0.0
        self.supervisor = Supervisor(log)
        self.stop_event = threading.Event()
        self.target_replicas = deployment.replicas
        self.engines = None
        self.client = None
        self.control = None
        self.tmp = Path(tempfile.mkdtemp(prefix="slos-serve-"))
        net = deployment.network
        self.engine_port = net.engine_port or free_port()
        self.client_port = net.client_port or free_port()
        self.api_port = net.api_port or free_port()
        self.control_port = net.control_port or free_port()
        self.server_keys, self.peer_keys = _curve_keys() if deployment.uses_curve else (None, None)

    # ------------------------------------------------------------------ lifecycle

    def run(self) -> int:
        """Serve until stopped; 0 when stopped by a signal after a clean start."""
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.start()
            if self.stop_event.is_set():
                return 0
            self.log.line("serve", self.ready_line())
            while not self.stop_event.is_set():
                self.step()
            self.log.line("serve", "stopping: engines, front door, planner")
            return 0
        finally:
            self.close()
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _on_signal(self, signum, frame) -> None:
        self.stop_event.set()

    def start(self) -> None:
        from planner_svc.client import PlannerClient

        self.control = ControlServer(self.control_port)
        self._start_planner()
        self.client = PlannerClient(self.client_endpoint, curve=self._client_curve())
        self.engines = self._make_engines()
        signal.signal(signal.SIGINT, self._on_signal)  # Ray installs its own on init
        signal.signal(signal.SIGTERM, self._on_signal)
        for index in range(self.target_replicas):
            self.engines.start(index)
        self._start_api()
        self._wait_until_ready()

    def step(self) -> None:
        """One turn of the loop: restarts, engine checks, a control request, the config file."""
        self.supervisor.check()
        self.engines.check()
        self.control.serve_one(self.handle_control, LOOP_INTERVAL_MS)
        self._watch_config()

    def close(self) -> None:
        if self.control is not None:
            self.control.close()
        if self.engines is not None:
            self.engines.close()
        self.supervisor.stop_all()
        if self.client is not None:
            self.client.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # ------------------------------------------------------------------ the parts

    def _start_planner(self) -> None:
        tables = self.deployment.planner_tables(self.engine_port, self.client_port)
        tables = self.deployment.time_scaled(tables, self.tmp)
        if self.deployment.time_scale != 1.0:
            self.log.line(
                "serve",
                f"sim engines slowed down x{self.deployment.time_scale:g}: the planner's step "
                "times and SLO targets are scaled alike",
            )
        if self.server_keys is not None:
            public_key, secret_key = self.server_keys
            tables["curve"] = {
                "public_key": public_key,
                "secret_key": secret_key,
                "allowed_client_keys": [self.peer_keys.public_key],
            }
        path = self.tmp / "planner.json"
        path.touch(mode=0o600)  # it may hold the planner's secret key
        path.write_text(json.dumps(tables, indent=2))
        argv = [*cli(), "planner", "--config", str(path), "--log-level", "INFO"]
        self.supervisor.start("planner", lambda generation: argv)

    def _make_engines(self):
        curve = self.peer_keys
        if self.deployment.cluster == "ray":
            from deploy.ray_engines import RayEngines

            return RayEngines(self.deployment, self.engine_port, curve, self.log)
        connect = f"tcp://{self.deployment.engine_dial_host()}:{self.engine_port}"
        return ProcessEngines(self.supervisor, self.deployment, connect, curve)

    def _start_api(self) -> None:
        d = self.deployment
        argv = [
            *cli(),
            "api",
            "--planner",
            self.client_endpoint,
            "--host",
            d.network.api_host,
            "--port",
            str(self.api_port),
            "--log-level",
            "WARNING",
        ]
        if d.model_dir and (Path(d.model_dir) / "tokenizer.json").is_file():
            argv += ["--model-dir", d.model_dir]
        if d.api_config:
            argv += ["--config", d.api_config]
        if d.served_model_name or not d.model_dir:
            argv += ["--served-model-name", *(d.served_model_name or (d.model_name,))]
        keys_env = curve_env(self._client_curve())
        env = {**os.environ, **keys_env} if keys_env else None
        self.supervisor.start("api", lambda generation: argv, env=env)

    @property
    def client_endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.client_port}"

    def _client_curve(self) -> CurveKeys | None:
        return self.peer_keys

    # ------------------------------------------------------------------ readiness

    def _wait_until_ready(self) -> None:
        deadline_s = time.monotonic() + self.deployment.startup_timeout_s
        last_placed, placed_since_s = -1, time.monotonic()
        while not self.stop_event.is_set():
            for child in self.supervisor.check():
                raise ServiceError(
                    f"{child.name} exited with status {child.last_exit} before the service was "
                    "ready (its log is above)"
                )
            self.engines.check()
            if self.engines.num_placed != last_placed:
                last_placed, placed_since_s = self.engines.num_placed, time.monotonic()
            settled = self.engines.num_placed == self.target_replicas or (
                time.monotonic() - placed_since_s > PLACEMENT_SETTLE_S
            )
            num_engines = self._num_engines()
            if settled and num_engines >= max(1, self.engines.num_placed) and self._api_healthy():
                return
            if time.monotonic() > deadline_s:
                raise ServiceError(
                    f"not ready within {self.deployment.startup_timeout_s:g}s: {num_engines} of "
                    f"{self.target_replicas} engines registered, {self.engines.num_placed} placed"
                )
            self.stop_event.wait(0.2)

    def _num_engines(self) -> int:
        try:
            return self.client.stats(timeout_s=1.0).num_engines
        except Exception:  # the planner is still starting
            return 0

    def _api_healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    @property
    def api_url(self) -> str:
        host = self.deployment.network.api_host
        host = "127.0.0.1" if host in ("0.0.0.0", "", "*") else host
        return f"http://{host}:{self.api_port}"

    def ready_line(self) -> str:
        d = self.deployment
        num_engines = self._num_engines()
        waiting = self.target_replicas - num_engines
        replicas = f"{num_engines} {d.engine} engine(s)" + (
            f" ({waiting} more waiting for resources)" if waiting > 0 else ""
        )
        where = "Ray actors" if d.cluster == "ray" else "processes"
        prompts = "" if d.model_dir else "; no tokenizer: send prompts as token ids"
        return (
            f"ready: send requests to {self.api_url}/v1 (OpenAI-compatible, model "
            f'"{d.model_name}"{prompts}); {replicas} as {where}, formulation '
            f"{d.planner_settings().formulation}; Python clients: PlannerClient("
            f'"{self.client_endpoint}"); scale with `slos-serve scale N --control '
            f"tcp://127.0.0.1:{self.control_port}`"
        )

    # ------------------------------------------------------------------ scaling

    def handle_control(self, request) -> ControlReply:
        if isinstance(request, ScaleRequest):
            self.scale(request.replicas)
        elif not isinstance(request, StatusRequest):
            raise ValueError(f"unknown control request {request!r}")
        return ControlReply(
            ok=True,
            target_replicas=self.target_replicas,
            num_engines=self._num_engines(),
            replicas=self.engines.replicas(),
        )

    def scale(self, num_replicas: int) -> None:
        if num_replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {num_replicas}")
        current = sorted(self.engines.indices)
        if num_replicas != len(current):
            self.log.line("serve", f"scaling from {len(current)} to {num_replicas} replica(s)")
        for index in current[num_replicas:]:  # the highest indices go first
            self.engines.stop(index)
        free = (i for i in range(10**6) if i not in self.engines.indices)
        for _ in range(num_replicas - len(current)):
            self.engines.start(next(free))
        self.target_replicas = num_replicas

    def _watch_config(self) -> None:
        now_s = time.monotonic()
        if self.config_path is None or now_s - self._config_checked_s < CONFIG_POLL_S:
            return
        self._config_checked_s = now_s
        try:
            mtime = self.config_path.stat().st_mtime
            if mtime == self._config_mtime:
                return
            self._config_mtime = mtime
            new = self.reload()
        except (OSError, ValueError) as exc:
            self.log.line("serve", f"config not reloaded: {exc}")
            return
        if new.replace(replicas=self.deployment.replicas) != self.deployment:
            self.log.line("serve", "config changed: only `replicas` applies while serving")
        if new.replicas != self.target_replicas:
            self.scale(new.replicas)
        self.deployment = self.deployment.replace(replicas=new.replicas)


def _curve_keys() -> tuple[tuple[str, str], CurveKeys]:
    """The planner's (public, secret) key pair, and the one pair every engine and the front door
    share (its public key is the only client key the planner allows)."""
    server_public, server_secret = make_keypair()
    peer_public, peer_secret = make_keypair()
    return (server_public, server_secret), CurveKeys(peer_public, peer_secret, server_public)
