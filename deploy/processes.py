"""Child processes that cannot outlive their parent: each in its own session (process group), with
PR_SET_PDEATHSIG on Linux, stopped together with SIGTERM then SIGKILL. `ProcessGroup` is the plain
group the demo and the benchmarks use; `deploy.supervisor.Supervisor` adds log prefixes and
restarts on top of the same start and stop."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time


class ProcessGroup:
    """Child processes, each in its own session (process group), stopped together."""

    def __init__(self, label: str = "demo") -> None:
        self.label = label
        self.processes: dict[str, subprocess.Popen] = {}

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        process = spawn(argv)
        self.processes[name] = process
        print(f"{self.label}: started {name} (pid {process.pid})", flush=True)
        return process

    def died(self) -> list[str]:
        return [
            f"{name} (exit {p.returncode})"
            for name, p in self.processes.items()
            if p.poll() is not None
        ]

    def any_died(self) -> bool:
        return any(p.poll() is not None for p in self.processes.values())

    def stop_all(self, grace_s: float = 5.0) -> None:
        """SIGTERM every group (engines before the planner), SIGKILL what outlives `grace_s`."""
        stop_processes(list(reversed(self.processes.values())), grace_s)


def spawn(argv: list[str], **popen_kwargs) -> subprocess.Popen:
    """A child in its own session that gets SIGTERM when this process dies."""
    return subprocess.Popen(
        argv, start_new_session=True, preexec_fn=_die_with_parent, **popen_kwargs
    )


def stop_processes(processes: list[subprocess.Popen], grace_s: float = 5.0) -> None:
    """SIGTERM each one's process group in the order given, SIGKILL what outlives `grace_s`."""
    for process in processes:
        signal_group(process, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            signal_group(process, signal.SIGKILL)
            process.wait()


def signal_group(process: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        pass


def wait_for_engines(client, count: int, group, timeout_s: float = 120.0) -> None:
    """Until the planner counts `count` engines; fails at once when a process of `group` died."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if group.any_died():
            raise ValueError(f"a service process exited early: {group.died()}")
        try:
            if client.stats(timeout_s=1.0).num_engines >= count:
                return
        except Exception:  # the planner is still starting
            pass
        time.sleep(0.2)
    raise ValueError(f"{count} engine(s) did not connect within {timeout_s:g}s")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def cli() -> list[str]:
    """The argv prefix that runs `slos-serve` with this interpreter."""
    return [sys.executable, "-m", "commands.cli"]


def _load_libc():
    if sys.platform != "linux":
        return None
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return None


_LIBC = _load_libc()  # loaded here: the child between fork and exec must not import anything
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: on Linux, get SIGTERM when the parent dies, so that a killed
    parent (or test) cannot leave a planner or engine running (they live in their own sessions)."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
