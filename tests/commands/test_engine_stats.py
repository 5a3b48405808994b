"""`slos-serve engine --stats-json PATH` writes where its time went when it is stopped (the scaling
benchmark reads it from engine processes)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

from deploy.processes import free_port


def test_a_stopped_engine_writes_its_stats(tmp_path):
    path = tmp_path / "stats.json"
    argv = [sys.executable, "-m", "commands.cli", "engine", "--engine-id", "engine-7"]
    argv += ["--connect", f"tcp://127.0.0.1:{free_port()}", "--stats-json", str(path)]
    engine = subprocess.Popen(argv)
    try:
        time.sleep(1.5)  # no planner: it keeps trying to connect
        engine.send_signal(signal.SIGTERM)
        assert engine.wait(20) == 0
    finally:
        engine.kill()
    stats = json.loads(path.read_text())
    assert stats["engine_id"] == "engine-7" and stats["num_steps"] == 0
    assert stats["busy_s"] == 0.0 and stats["answer_p99_s"] is None
