"""Which performance model the planner uses for an engine: the engine's own (a profiled engine
knows its step times best), else the config's [[replicas]] row for its id, else the default. The
example configs used to name engine-0 and engine-1, overriding a profiled engine's model."""

from __future__ import annotations

import os

from engine_adapters.sim_engine import SimEngine
from formulations.perf_model import perf_model_preset
from planner_svc.config import load_config
from tests.planner_svc.service_helpers import FAST_MODEL, Service, make_config

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "examples")


def test_an_engines_own_model_wins_over_a_config_row_for_its_id():
    row_model = perf_model_preset("opt-13b-h100")
    config = make_config(replica_perf_models={"engine-0": row_model, "silent": row_model})
    service = Service(config, num_engines=1)  # engine-0 sends FAST_MODEL in READY
    try:
        silent = SimEngine(FAST_MODEL, 1024)  # sends no model
        service.start_engine("silent", silent)
        service.wait_for_engines(2)
        models = {link.engine_id: link.perf_model for link in service.daemon.engines.values()}
        assert models["engine-0"].name == FAST_MODEL.name
        assert models["silent"].name == row_model.name
    finally:
        service.close()


def test_the_example_configs_name_no_engine():
    for name in ("planner_slos_dp.toml", "planner_sarathi.toml"):
        assert load_config(os.path.join(EXAMPLES, name)).replica_perf_models == {}
