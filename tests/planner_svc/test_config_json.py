"""`slos-serve serve` hands the planner daemon its tables as JSON (no TOML writer needed)."""

from __future__ import annotations

import json

import pytest

from planner_svc.config import load_config


def test_a_planner_config_can_be_json(tmp_path):
    path = tmp_path / "planner.json"
    path.write_text(json.dumps({"formulation": "slos_dp", "planner": {"liveness": 3}}))
    config = load_config(path)
    assert config.formulation == "slos_dp" and config.liveness == 3


def test_bad_json_and_unknown_keys_are_named(tmp_path):
    path = tmp_path / "planner.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_config(path)
    path.write_text(json.dumps({"formulaton": "slos_dp"}))
    with pytest.raises(ValueError, match="unknown key"):
        load_config(path)
