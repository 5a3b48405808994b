"""`python -m commands.cli` (what the Makefile runs) turns user errors into one line and exit 2."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_cli_error_under_python_dash_m_is_one_line(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    argv = [sys.executable, "-m", "commands.cli", "capacity", "--formulation", "vllm_fcfs"]
    out = subprocess.run(
        [*argv, "--scenario", "chatbot", "--out", str(not_a_dir)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().count("\n") == 0 and "is not a directory" in out.stderr
