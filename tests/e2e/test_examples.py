"""The example scripts run against a live (in-process) planner and two simulated engines."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.planner_svc.service_helpers import Service

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def endpoint():
    service = Service()
    service.wait_for_engines(2)
    yield service.daemon.client_endpoint
    service.close()


def test_single_request(endpoint, capsys):
    assert load("single_request").main(["--planner", endpoint, "--max-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "admitted" in out and "attained: True" in out


def test_tool_agent(endpoint, capsys):
    assert load("tool_agent").main(["--planner", endpoint, "--rounds", "2"]) == 0
    out = capsys.readouterr().out
    assert "#r0: admitted" in out and "#r1: admitted" in out and "tool call" in out


def test_replay_scenario(endpoint, capsys):
    argv = ["--planner", endpoint, "--scenario", "coder", "--rate", "4", "--duration-s", "1.5"]
    assert load("replay_scenario").main(argv) == 0
    out = capsys.readouterr().out
    assert "Serving Benchmark Result" in out and "submitted" in out


def test_single_request_with_an_unknown_class_is_one_line(endpoint, capsys):
    argv = ["--planner", endpoint, "--max-tokens", "2", "--slo-class", "no-such-class"]
    assert load("single_request").main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown SLO class 'no-such-class'" in err


def test_tool_agent_runs_started_in_the_same_second_do_not_collide(endpoint, capsys, monkeypatch):
    agent = load("tool_agent")
    monkeypatch.setattr(agent.time, "time", lambda: 1_700_000_000.0)  # the same second
    monkeypatch.setattr(agent.time, "sleep", lambda s: None)
    for _ in range(2):
        assert agent.main(["--planner", endpoint, "--rounds", "2"]) == 0
        out = capsys.readouterr().out
        assert "#r0: admitted" in out and "#r1: admitted" in out and "error" not in out
