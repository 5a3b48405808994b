"""Running `slos-serve serve` as a real process in tests: start it, read its prefixed log until the
ready line, find every process it left (by an environment marker its children inherit)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

READY = re.compile(
    r"ready: send requests to (http://\S+)/v1 .*PlannerClient\(\"(tcp://\S+)\"\).*--control (tcp://\S+)`"
)


class ServeProcess:
    def __init__(self, args: list[str], cwd: Path | None = None, env: dict | None = None) -> None:
        self.marker = uuid.uuid4().hex
        self.lines: list[str] = []
        self.url = self.planner = self.control = ""
        environ = {**os.environ, **(env or {}), "SLOS_SERVE_TEST_MARKER": self.marker}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "commands.cli", "serve", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=environ,
            cwd=cwd,
        )
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)
            match = READY.search(line)
            if match:
                self.url, self.planner, self.control = match.groups()
                self._ready.set()

    def wait_ready(self, timeout_s: float = 90.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not self._ready.wait(0.2):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("serve did not get ready:\n" + self.log())
        time.sleep(0.05)

    def wait_for_line(self, pattern: str, timeout_s: float = 30.0, start: int = 0) -> re.Match:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in self.lines[start:]:
                match = re.search(pattern, line)
                if match:
                    return match
            time.sleep(0.1)
        raise AssertionError(f"no line matching {pattern!r}:\n" + self.log())

    def pid_of(self, name: str) -> int:
        """The pid of the child `name` as last started."""
        pids = [
            int(m.group(1))
            for line in self.lines
            if (m := re.search(rf"started {re.escape(name)} \(pid (\d+)\)", line))
        ]
        assert pids, f"{name} was never started:\n" + self.log()
        return pids[-1]

    def log(self) -> str:
        return "".join(self.lines)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def processes_with_marker(marker: str) -> list[int]:
    """Live (not zombie) processes whose environment holds `marker`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker.encode() not in (entry / "environ").read_bytes():
                continue
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if state != "Z":
            found.append(int(entry.name))
    return found


def wait_until_gone(marker: str, timeout_s: float = 15.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while (left := processes_with_marker(marker)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left
