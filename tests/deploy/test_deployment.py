"""The deployment config: the embedded default, a file, flags on top; strict one-line errors; the
engine flags each replica gets parse back to the same engine options."""

from __future__ import annotations

import dataclasses

import pytest

from commands.cli import build_parser
from commands.engine import add_arguments as engine_arguments
from commands.serve import build_deployment
from deploy.deployment import DEFAULT_TOML, load_deployment, parse_option
from deploy.engine_processes import engine_flags, engine_id
from engine_adapters.registry import EngineOptions


def serve_args(*argv: str):
    return build_parser().parse_args(["serve", *argv])


def test_the_embedded_default_is_two_sim_engines_on_loopback():
    d = load_deployment()
    assert (d.engine, d.replicas, d.cluster) == ("sim", 2, "local")
    assert d.network.api_host == "127.0.0.1" and d.network.api_port == 8000
    assert d.engine_bind_host == "127.0.0.1" and not d.uses_curve
    assert d.planner_settings().formulation == "slos_dp"
    tables = d.planner_tables(7001, 7002)
    assert tables["planner"]["engine_endpoint"] == "tcp://127.0.0.1:7001"
    assert tables["planner"]["client_endpoint"] == "tcp://127.0.0.1:7002"


def test_flags_override_the_file(tmp_path):
    path = tmp_path / "d.toml"
    path.write_text(
        "replicas = 3\n[engine_options]\nnum_blocks = 100\n"
        '[planner_config]\nformulation = "sarathi"\n'
    )
    args = serve_args(
        "--config",
        str(path),
        "--replicas",
        "5",
        "--formulation",
        "slos_dp",
        "--engine-option",
        "time_scale=4",
        "--port",
        "0",
    )
    d = build_deployment(args, path)
    assert d.replicas == 5 and d.network.api_port == 0
    assert d.engine_options == {"num_blocks": 100, "time_scale": 4}
    assert d.planner_settings().formulation == "slos_dp"
    assert d.engine_options_for(2).seed == 2  # distinct seeds per replica


def test_an_address_means_ray_and_engines_listen_beyond_loopback_with_curve():
    d = build_deployment(serve_args("--address", "10.0.0.5:6379"), None)
    assert d.cluster == "ray" and d.engine_bind_host == "0.0.0.0" and d.uses_curve
    assert d.engine_dial_host("10.0.0.5") == "10.0.0.5"
    d = build_deployment(serve_args("--cluster", "ray", "--curve", "on"), None)
    assert d.engine_bind_host == "127.0.0.1" and d.uses_curve  # a local Ray, keys forced


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("replica = 2\n", "unknown key(s) replica"),
        ("[network]\napi_port = 70000\n", "api_port must be a port"),
        ("[engine_options]\nnum_blocks = 'many'\n", "num_blocks: expected int"),
        ("[planner_config.planner]\nengine_endpoint = 'tcp://x:1'\n", "set the ports under"),
        ("[planner_config]\ncurve = {}\n", "serve makes the CURVE keys"),
        ("cluster = 'k8s'\n", "cluster must be one of"),
        ("[ray]\nnum_gpus = -1\n", "num_gpus must be a number"),
    ],
)
def test_bad_files_are_one_line_errors_that_name_the_key(tmp_path, text, message):
    path = tmp_path / "d.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match="d.toml") as info:
        load_deployment(path)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_engine_flags_parse_back_to_the_same_options():
    import argparse

    options = dataclasses.replace(
        EngineOptions(),
        num_blocks=123,
        time_scale=2.5,
        advertise_perf_model=True,
        vllm_args=("max_model_len=64", "enforce_eager=true"),
        seed=7,
    )
    parser = argparse.ArgumentParser()
    engine_arguments(parser)
    args = parser.parse_args(engine_flags(options))
    names = {f.name for f in dataclasses.fields(EngineOptions)} - {"vllm_args"}
    parsed = EngineOptions(**{n: getattr(args, n) for n in names}, vllm_args=tuple(args.vllm_arg))
    assert parsed == options


def test_engine_ids_are_unique_per_launch_and_options_parse():
    assert [engine_id(3, n) for n in range(3)] == ["engine-3", "engine-3.1", "engine-3.2"]
    assert parse_option("time_scale=4") == ("time_scale", 4)
    assert parse_option("perf-model=opt-13b-h100") == ("perf_model", "opt-13b-h100")
    with pytest.raises(ValueError, match="NAME=VALUE"):
        parse_option("time_scale")


def test_print_config_is_the_embedded_file(capsys):
    from commands.serve import run

    assert run(serve_args("--print-config")) == 0
    assert capsys.readouterr().out == DEFAULT_TOML.read_text()


def test_time_scaled_sim_engines_get_a_planner_scaled_alike(tmp_path):
    """Engines that sleep 4x each step and a planner that plans with 4x step times and 4x TPOT
    targets: the same decisions as at full speed, a quarter of the planner's work per second."""
    from formulations.perf_model import perf_model_preset
    from planner_svc.config import config_from_dict

    d = build_deployment(serve_args("--engine-option", "time_scale=4"), None)
    assert d.time_scale == 4.0
    tables = d.time_scaled(d.planner_tables(1, 2), tmp_path)
    config = config_from_dict(tables)
    base = perf_model_preset("opt-13b-h100")
    for num_tokens in (1, 100, 2000):
        assert config.perf_model.step_time_s(num_tokens) == pytest.approx(
            4 * base.step_time_s(num_tokens)
        )
    assert config.slo_classes["chatbot"].tpot_s == pytest.approx(0.4)
    assert config.slo_classes["chatbot"].ttft_slowdown == 5.0  # relative: scales by itself
    assert config.slo_classes["reasoning"].thinking_tpot_s == pytest.approx(0.2)
    plain = load_deployment()
    assert plain.time_scaled(plain.planner_tables(1, 2), tmp_path) == plain.planner_tables(1, 2)


def test_each_ray_replica_asks_for_the_resources_configured(tmp_path):
    from deploy.ray_engines import replica_resources

    assert replica_resources(load_deployment()) == {"num_cpus": 1, "num_gpus": 0, "resources": {}}
    d = build_deployment(serve_args("--cluster", "ray", "--num-gpus", "2", "--num-cpus", "4"), None)
    assert replica_resources(d) == {"num_cpus": 4, "num_gpus": 2, "resources": {}}
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    d = build_deployment(serve_args("--engine", "torch", "--model-dir", str(model_dir)), None)
    assert replica_resources(d)["num_gpus"] == 1  # a real engine gets a GPU by default
    path = tmp_path / "d.toml"
    path.write_text('cluster = "ray"\n[ray]\nnum_gpus = 0.5\nresources = { pool_a = 1 }\n')
    d = load_deployment(path)
    assert replica_resources(d) == {"num_cpus": 1, "num_gpus": 0.5, "resources": {"pool_a": 1}}
