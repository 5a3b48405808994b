"""Engine replicas as Ray actors (`cluster = "ray"`): one actor per replica, with the resources
the deployment gives each replica (`[ray] num_gpus`, `num_cpus`, custom `resources`), placed by
Ray on any node of the cluster. The actor runs the ordinary engine adapter in a thread and dials
the planner over TCP (with the CURVE keys the launcher hands it when it leaves loopback).

A replica whose actor dies (its process, or its whole node) is launched again under a new engine
id; the new actor waits in Ray's queue until some node has the resources. The planner declares the
dead engine dead after `liveness` silent heartbeats and re-plans its requests on the others. A
replica scaled away is stopped cleanly: its adapter says GOODBYE, so its requests move at once.

Ray is optional (`pip install 'slos-serve[ray]'`); it is imported only here, only when used.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from deploy.control import ReplicaStatus
from deploy.deployment import Deployment
from deploy.engine_processes import engine_id
from engine_adapters.registry import EngineOptions
from wire.security import CurveKeys

LOOPBACK_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray's nodes use 127.0.0.1
AUTH_MODE_ENV = "RAY_AUTH_MODE"
AUTH_TOKEN_FILE = Path.home() / ".ray" / "auth_token"  # where `ray start` keeps its token
STOP_GRACE_S = 10.0  # a stopped actor that has not finished by then is killed
MIN_BACKOFF_S, MAX_BACKOFF_S = 0.5, 30.0  # before relaunching a replica whose actor died
STABLE_S = 60.0  # a replica that ran this long relaunches with the shortest backoff again


class EngineReplica:
    """The actor: one engine and its adapter. Built by Ray on the node it places it on."""

    def __init__(
        self, engine: str, options: EngineOptions, adapter: dict, curve: CurveKeys | None
    ) -> None:
        from engine_adapters import registry
        from engine_adapters.adapter import AdapterConfig, EngineAdapter

        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
        config = AdapterConfig(curve=curve, **adapter)
        self.adapter = EngineAdapter(registry.create(engine, options), config)
        self.thread = threading.Thread(target=self.adapter.run, name="adapter", daemon=True)
        self.thread.start()  # here, so that `wait` (called concurrently) finds it started

    def where(self) -> dict:
        """Where this replica runs (Ray node, address, process, GPUs)."""
        import ray

        context = ray.get_runtime_context()
        return {
            "node_id": context.get_node_id(),
            "node_ip": ray.util.get_node_ip_address(),
            "pid": os.getpid(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
        }

    def wait(self) -> str:
        """Returns when the adapter has stopped (a Ray error instead when the actor died)."""
        self.thread.join()
        return "stopped"

    def stop(self) -> None:
        self.adapter.stop()

    def stats(self) -> dict:
        s = self.adapter.stats
        return {"num_steps": s.num_steps, "busy_s": s.busy_s, "plan_wait_s": s.plan_wait_s}


@dataclass
class _Replica:
    index: int
    engine_id: str
    actor: object
    started_ref: object  # resolves once Ray placed the actor and its adapter runs
    done_ref: object  # resolves (or fails) when the actor stops or dies
    launch: int
    placement: dict | None = None
    placed_s: float | None = None
    stop_deadline_s: float | None = None
    history: list[str] = field(default_factory=list)


class RayEngines:
    def __init__(self, deployment: Deployment, engine_port: int, curve: CurveKeys | None, log):
        if not deployment.ray.address:
            # A Ray of our own on this machine only: keep it on loopback (Ray otherwise binds
            # this node's network address even for a single machine). Read when Ray is imported.
            os.environ.setdefault(LOOPBACK_ONLY_ENV, "0")
        elif AUTH_MODE_ENV not in os.environ and AUTH_TOKEN_FILE.is_file():
            # `ray start` turns on token authentication when a token exists, but a driver that
            # connects must be told to send it (ray 2.60).
            os.environ[AUTH_MODE_ENV] = "token"
            log.line("serve", f"Ray: authenticating with the token in {AUTH_TOKEN_FILE}")
        import ray

        self.ray = ray
        self.deployment = deployment
        self.log = log
        self.curve = curve
        self.started_ray = False
        if not ray.is_initialized():
            self._init_ray()
        host = deployment.engine_dial_host(ray.util.get_node_ip_address())
        self.connect = f"tcp://{host}:{engine_port}"
        settings = deployment.planner_settings()
        self.adapter = {
            "connect": self.connect,
            "heartbeat_interval_s": settings.heartbeat_interval_s,
            "liveness": settings.liveness,
        }
        self.replicas_by_index: dict[int, _Replica] = {}
        self.stopping: list[_Replica] = []
        self.relaunch_due_s: dict[int, float] = {}  # index -> when its next actor starts
        self._backoff_s: dict[int, float] = {}
        self._launches: dict[int, int] = {}
        resources = self.resources_per_replica()
        self.log.line("serve", f"Ray cluster: {ray.cluster_resources()}; per replica {resources}")

    def _init_ray(self) -> None:
        address = self.deployment.ray.address
        if address:
            self.ray.init(address=address, log_to_driver=True)
            return
        # A local Ray of our own: on loopback, with CPU slots for every sim replica (they sleep
        # most of the time, so more slots than cores is fine).
        per_replica = self.resources_per_replica()
        num_cpus = max(
            os.cpu_count() or 1, math.ceil(self.deployment.replicas * per_replica["num_cpus"])
        )
        self.ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            log_to_driver=True,
        )
        self.started_ray = True

    def resources_per_replica(self) -> dict:
        return replica_resources(self.deployment)

    # ------------------------------------------------------------------ launcher interface

    def start(self, index: int) -> None:
        launch = self._launches.get(index, 0)
        self._launches[index] = launch + 1
        name = engine_id(index, launch)
        actor_class = self.ray.remote(EngineReplica).options(
            name=f"slos-serve-{name}-{os.getpid()}",
            max_concurrency=4,  # where / wait / stop / stats run side by side
            max_restarts=0,  # a new actor with a new engine id instead (see the module doc)
            **self.resources_per_replica(),
        )
        actor = actor_class.remote(
            self.deployment.engine,
            self.deployment.engine_options_for(index),
            {**self.adapter, "engine_id": name},
            self.curve,
        )
        replica = _Replica(index, name, actor, actor.where.remote(), actor.wait.remote(), launch)
        self.replicas_by_index[index] = replica
        self.log.line("serve", f"launched {name} as a Ray actor (waiting for placement)")

    def stop(self, index: int) -> None:
        if self.relaunch_due_s.pop(index, None) is not None:
            return  # its actor is already gone
        replica = self.replicas_by_index.pop(index)
        replica.stop_deadline_s = time.monotonic() + STOP_GRACE_S
        replica.actor.stop.remote()
        self.stopping.append(replica)
        self.log.line("serve", f"stopping {replica.engine_id}")

    def check(self) -> None:
        """Note placements, relaunch replicas whose actor died, reap stopped actors."""
        for replica in list(self.replicas_by_index.values()):
            if replica.placement is None and self._ready(replica.started_ref):
                self._placed(replica)
            if self._ready(replica.done_ref):
                self._died(replica)
        for index, due_s in list(self.relaunch_due_s.items()):
            if time.monotonic() >= due_s:
                del self.relaunch_due_s[index]
                self.start(index)
        for replica in list(self.stopping):
            if self._ready(replica.done_ref) or time.monotonic() > replica.stop_deadline_s:
                self.ray.kill(replica.actor)
                self.stopping.remove(replica)
                self.log.line("serve", f"stopped {replica.engine_id}")

    def _ready(self, ref) -> bool:
        done, _ = self.ray.wait([ref], timeout=0)
        return bool(done)

    def _placed(self, replica: _Replica) -> None:
        replica.placed_s = time.monotonic()
        try:
            replica.placement = self.ray.get(replica.started_ref)
        except Exception as exc:  # the actor failed to build its engine: its done_ref fails too
            replica.placement = {"error": _first_line(exc)}
            return
        where = replica.placement
        gpus = f", GPUs {','.join(where['gpu_ids'])}" if where["gpu_ids"] else ""
        self.log.line(
            "serve",
            f"{replica.engine_id} runs on node {where['node_id'][:8]} ({where['node_ip']}, "
            f"pid {where['pid']}{gpus})",
        )

    def _died(self, replica: _Replica) -> None:
        try:
            self.ray.get(replica.done_ref)
            why = "its adapter stopped"
        except Exception as exc:
            why = _first_line(exc)
        index = replica.index
        ran_s = time.monotonic() - replica.placed_s if replica.placed_s is not None else 0.0
        backoff_s = (
            MIN_BACKOFF_S if ran_s >= STABLE_S else self._backoff_s.get(index, MIN_BACKOFF_S)
        )
        self._backoff_s[index] = min(2 * backoff_s, MAX_BACKOFF_S)
        self.log.line(
            "serve", f"{replica.engine_id} is gone ({why}); a new replica in {backoff_s:g}s"
        )
        self.ray.kill(replica.actor)
        del self.replicas_by_index[index]
        self.relaunch_due_s[index] = time.monotonic() + backoff_s

    @property
    def num_placed(self) -> int:
        return sum(1 for r in self.replicas_by_index.values() if r.placement is not None)

    @property
    def indices(self) -> set[int]:
        return set(self.replicas_by_index) | set(self.relaunch_due_s)

    def replicas(self) -> list[ReplicaStatus]:
        rows = []
        for index, r in sorted(self.replicas_by_index.items()):
            where, state = "", "pending"
            if r.placement is not None and "node_id" in r.placement:
                where = f"node {r.placement['node_id'][:8]} {r.placement['node_ip']}"
                state = "running"
            rows.append(ReplicaStatus(index, r.engine_id, state, where, r.launch))
        rows += [ReplicaStatus(i, "", "restarting") for i in sorted(self.relaunch_due_s)]
        rows += [ReplicaStatus(r.index, r.engine_id, "stopping") for r in self.stopping]
        return rows

    def placements(self) -> dict[str, dict]:
        """Engine id -> where its actor runs (placed replicas only)."""
        return {
            r.engine_id: r.placement
            for r in self.replicas_by_index.values()
            if r.placement is not None and "node_id" in r.placement
        }

    def close(self) -> None:
        self.relaunch_due_s.clear()
        for index in list(self.replicas_by_index):
            self.stop(index)
        deadline = time.monotonic() + STOP_GRACE_S
        while self.stopping and time.monotonic() < deadline:
            self.check()
            time.sleep(0.05)
        for replica in self.stopping:
            self.ray.kill(replica.actor)
        self.stopping.clear()
        if self.started_ray:
            self.ray.shutdown()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def replica_resources(deployment: Deployment) -> dict:
    """What Ray reserves for each replica: `[ray] num_gpus` (default 0 for sim engines, 1 for
    the others), `num_cpus` (default 1) and custom `resources`."""
    options = deployment.ray
    num_gpus = options.num_gpus
    if num_gpus is None:
        num_gpus = 0 if deployment.engine == "sim" else 1
    num_cpus = 1 if options.num_cpus is None else options.num_cpus
    return {"num_cpus": num_cpus, "num_gpus": num_gpus, "resources": dict(options.resources)}
