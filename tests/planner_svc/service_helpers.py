"""A planner daemon and simulated engines in threads of the test process, on loopback ports
chosen by the OS (the end-to-end tests in tests/e2e/ use real processes instead)."""

from __future__ import annotations

import dataclasses
import threading
import time

import zmq

from engine_adapters.adapter import AdapterConfig, EngineAdapter
from engine_adapters.sim_engine import SimEngine
from formulations.perf_model import Line, PerfModel
from planner_svc.config import PlannerConfig
from planner_svc.daemon import PlannerDaemon

# ~5 ms steps: fast tests, still real sleeping.
FAST_MODEL = PerfModel((Line(1e-5, 0.0, 0.005),), "fast-test")


def make_config(**overrides) -> PlannerConfig:
    base = PlannerConfig(
        formulation="vllm_fcfs",
        engine_endpoint="tcp://127.0.0.1:0",
        client_endpoint="tcp://127.0.0.1:0",
        heartbeat_interval_s=0.1,
        liveness=4,
        tick_interval_s=0.005,
    )
    return dataclasses.replace(base, **overrides)


class Service:
    """A daemon thread plus engine adapter threads; `close()` stops all of them."""

    def __init__(self, config: PlannerConfig | None = None, num_engines: int = 2) -> None:
        self.context = zmq.Context()
        self.daemon = PlannerDaemon(config or make_config(), self.context)
        self._threads = [threading.Thread(target=self.daemon.run, daemon=True)]
        self._threads[0].start()
        self.adapters: list[EngineAdapter] = []
        for i in range(num_engines):
            self.add_engine(f"engine-{i}")

    def add_engine(self, engine_id: str, num_blocks: int = 4096) -> EngineAdapter:
        return self.start_engine(engine_id, self.make_engine(num_blocks))

    def make_engine(self, num_blocks: int) -> SimEngine:
        return SimEngine(
            FAST_MODEL,
            num_blocks,
            clock=time.monotonic,
            sleep=time.sleep,
            emit_token_ids=True,
            advertised_perf_model=FAST_MODEL,
        )

    def start_engine(self, engine_id: str, engine) -> EngineAdapter:
        """An adapter thread for `engine`, connected to the daemon."""
        config = AdapterConfig(
            self.daemon.engine_endpoint,
            engine_id,
            heartbeat_interval_s=self.daemon.config.heartbeat_interval_s,
        )
        adapter = EngineAdapter(engine, config, self.context)
        thread = threading.Thread(target=adapter.run, daemon=True)
        thread.start()
        self.adapters.append(adapter)
        self._threads.append(thread)
        return adapter

    def wait_for_engines(self, count: int, timeout_s: float = 5.0) -> None:
        deadline = time.monotonic() + timeout_s
        # The daemon's loop lists an engine a moment before its core has the replica.
        while len(self.daemon.engines) < count or not self._core_has(count):
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(self.daemon.engines)} of {count} engines connected")
            time.sleep(0.01)

    def _core_has(self, count: int) -> bool:
        core = self.daemon.core
        return count == 0 or (core is not None and len(core.replica_ids) >= count)

    def close(self) -> None:
        # The planner first: engines that stop while it runs say GOODBYE, and it would end their
        # requests as lost before the tests that stop "the planner and its engines" look.
        self.daemon.stop()
        self._threads[0].join(5)  # the daemon's loop: it must not read a GOODBYE any more
        for adapter in self.adapters:
            adapter.stop()
        for thread in self._threads:
            thread.join(5)
        self.context.term()


def wait_for(condition, timeout_s: float = 5.0) -> bool:
    """Poll `condition` until it holds (True) or `timeout_s` passes (False)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True
