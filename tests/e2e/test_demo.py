"""`slos-serve demo` stops every process it started, also when interrupted with Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purpose; read its state.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def start_demo() -> subprocess.Popen:
    argv = [sys.executable, "-m", "commands.cli", "demo", "--duration-s", "60", "--rate", "2"]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_ctrl_c_stops_the_planner_and_the_engines():
    demo = start_demo()
    pids, lines = [], []
    deadline = time.monotonic() + 60
    try:
        for line in demo.stdout:
            lines.append(line)
            match = re.search(r"started (\S+) \(pid (\d+)\)", line)
            if match:
                pids.append(int(match.group(2)))
            if "submitted" in line or time.monotonic() > deadline:  # the replay is running
                break
        assert len(pids) == 3, "".join(lines)
        assert all(alive(pid) for pid in pids)
        demo.send_signal(signal.SIGINT)
        rest, _ = demo.communicate(timeout=30)
    finally:
        if demo.poll() is None:
            demo.kill()
    assert demo.returncode == 130, "".join(lines) + rest
    time.sleep(0.5)
    assert not any(alive(pid) for pid in pids)


def test_children_die_with_a_killed_demo():
    demo = start_demo()
    pids = []
    try:
        for line in demo.stdout:
            match = re.search(r"started (\S+) \(pid (\d+)\)", line)
            if match:
                pids.append(int(match.group(2)))
            if len(pids) == 3:
                break
        demo.kill()  # SIGKILL: no cleanup code runs in the demo
        demo.wait(10)
    finally:
        if demo.poll() is None:
            demo.kill()
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(pids) == 3 and not any(alive(pid) for pid in pids)


def test_torch_demo_config_gives_absolute_ttft_and_keeps_each_tpot(tmp_path):
    from commands.demo import PLANNER_TOML, TORCH_DEMO_TTFT_MS, _torch_slos
    from formulations.slo import SLO_PRESETS
    from planner_svc.config import load_config

    path = tmp_path / "planner.toml"
    path.write_text(
        PLANNER_TOML.format(
            formulation="slos_dp",
            engine_port=1,
            client_port=2,
            metrics_port=0,
            perf_model="opt-13b-h100",
        )
        + _torch_slos()
    )
    classes = load_config(path).slo_classes
    assert set(SLO_PRESETS) <= set(classes)
    for name, preset in SLO_PRESETS.items():
        assert classes[name].ttft_s == TORCH_DEMO_TTFT_MS / 1000
        assert classes[name].ttft_slowdown is None
        assert classes[name].tpot_s == preset.tpot_s
        assert classes[name].thinking_tpot_s == preset.thinking_tpot_s
