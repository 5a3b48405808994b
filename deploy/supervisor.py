"""Child processes under supervision: each one's output prefixed with its name, a child that exits
restarted after a backoff, all of them stopped together (engines and API before the planner).

Every child lives in its own session and gets SIGTERM when this process dies
(`deploy.processes.spawn`). PR_SET_PDEATHSIG fires when the *thread* that forked the child ends,
so children must be started (and restarted) from the main thread, which `Service` does.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

from deploy.processes import spawn, stop_processes

# generation (0 for the first start, +1 per restart) -> argv
ArgvFactory = Callable[[int], list[str]]


class PrefixedLog:
    """Lines from several sources on one stream, each as `name | text`, one writer at a time."""

    def __init__(self, out: TextIO | None = None, width: int = 10) -> None:
        self.out = out or sys.stdout
        self.width = width
        self._lock = threading.Lock()

    def line(self, name: str, text: str) -> None:
        with self._lock:
            self.out.write(f"{name:<{self.width}}| {text.rstrip()}\n")
            self.out.flush()

    def pump(self, name: str, stream) -> threading.Thread:
        """A thread copying `stream` (a child's output, bytes) line by line until it closes."""

        def copy() -> None:
            for raw in iter(stream.readline, b""):
                self.line(name, raw.decode("utf-8", errors="replace"))
            stream.close()

        thread = threading.Thread(target=copy, name=f"log-{name}", daemon=True)
        thread.start()
        return thread


@dataclass
class Child:
    name: str
    make_argv: ArgvFactory
    env: dict[str, str] | None
    restart: bool
    process: subprocess.Popen | None = None
    generation: int = 0
    restart_due_s: float | None = None  # set while the child is down and waiting to restart
    backoff_s: float = 0.0
    started_s: float = 0.0
    last_exit: int | None = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


class Supervisor:
    """Starts, restarts and stops named children. `check()` is called from the service's loop."""

    MIN_BACKOFF_S = 0.5
    MAX_BACKOFF_S = 30.0
    STABLE_S = 60.0  # a child that ran this long restarts with the shortest backoff again

    def __init__(self, log: PrefixedLog) -> None:
        self.log = log
        self.children: dict[str, Child] = {}

    def start(
        self,
        name: str,
        make_argv: ArgvFactory,
        env: dict[str, str] | None = None,
        restart: bool = True,
    ) -> Child:
        if name in self.children:
            raise ValueError(f"a child named {name} is already supervised")
        child = Child(name, make_argv, env, restart, backoff_s=self.MIN_BACKOFF_S)
        self.children[name] = child
        self._launch(child)
        return child

    def _launch(self, child: Child) -> None:
        child.process = spawn(
            child.make_argv(child.generation),
            env=child.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        child.started_s = time.monotonic()
        child.restart_due_s = None
        self.log.pump(child.name, child.process.stdout)
        self.log.line("serve", f"started {child.name} (pid {child.process.pid})")

    def check(self) -> list[Child]:
        """Notice children that exited (scheduling their restart) and restart those that are due.
        Returns the children found dead in this call."""
        now_s = time.monotonic()
        died = []
        for child in list(self.children.values()):
            if child.process is not None and child.restart_due_s is None:
                code = child.process.poll()
                if code is not None:
                    died.append(child)
                    self._schedule_restart(child, code, now_s)
            if child.restart_due_s is not None and now_s >= child.restart_due_s:
                child.generation += 1
                self._launch(child)
        return died

    def _schedule_restart(self, child: Child, code: int, now_s: float) -> None:
        child.last_exit = code
        if not child.restart:
            self.log.line("serve", f"{child.name} exited with status {code}")
            child.process = None
            return
        if now_s - child.started_s >= self.STABLE_S:
            child.backoff_s = self.MIN_BACKOFF_S
        self.log.line(
            "serve",
            f"{child.name} exited with status {code}; restarting in {child.backoff_s:g}s",
        )
        child.restart_due_s = now_s + child.backoff_s
        child.backoff_s = min(2 * child.backoff_s, self.MAX_BACKOFF_S)

    def stop(self, name: str, grace_s: float = 10.0) -> None:
        """Stop one child for good (SIGTERM, then SIGKILL after `grace_s`)."""
        child = self.children.pop(name)
        if child.process is not None:
            stop_processes([child.process], grace_s)
            self.log.line("serve", f"stopped {name}")

    def stop_all(self, grace_s: float = 10.0) -> None:
        """Stop every child, the last started first (the planner, started first, goes last)."""
        processes = [c.process for c in reversed(self.children.values()) if c.process is not None]
        stop_processes(processes, grace_s)
        self.children.clear()

    def pids(self) -> list[int]:
        return [c.process.pid for c in self.children.values() if c.process is not None]
