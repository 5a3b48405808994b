"""The part of vLLM's internal interface the adapter relies on, recorded and checked.

`REQUIRED` names every class member the adapter touches. `record()` describes those members in the
installed vLLM (method signatures, attribute presence, dataclass fields) and is written to
`vllm_interface.json` beside this file. Three checks use it:

- `drift(recorded, live)`: the installed vLLM differs from the recording (run where vLLM is
  installed, by `make test-vllm`);
- `missing(recorded)`: the recording does not cover `REQUIRED` (runs everywhere);
- `undeclared_uses()`: scheduler.py, kept_prefix.py or engine.py touch a vLLM member not listed in
  `REQUIRED` (an AST scan; runs everywhere), so the recording cannot silently fall behind the code.

Regenerate after a deliberate upgrade: `python -m engine_adapters.vllm.interface_check --write`.
Compare another release without replacing the recording: `... --out FILE [--release vllm==X]`
(how vllm 0.33.0 was checked, from its unpacked wheel: docs/VLLM_ADAPTER.md).
This module imports vLLM only inside `record()`.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import json
import re
import sys
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent
RECORDING_PATH = HERE / "vllm_interface.json"

# qualified class name -> member kind -> names used by the adapter.
REQUIRED: dict[str, dict[str, list[str]]] = {
    "vllm.v1.core.sched.scheduler.Scheduler": {
        "methods": [
            "__init__",
            "schedule",
            "update_from_output",
            "_make_cached_request_data",
            "_update_after_schedule",
            "_preempt_request",
            "_get_new_block_ids_to_zero",
            "_free_blocks",
        ],
        "attributes": [
            "requests",
            "running",
            "waiting",
            "kv_cache_manager",
            "block_size",
            "max_model_len",
            "max_num_scheduled_tokens",
            "max_num_running_reqs",
            "num_lookahead_tokens",
            "num_spec_tokens",
            "num_sampled_tokens_per_step",
            "current_step",
            "use_v2_model_runner",
            "model_uses_mrope",
            "prev_step_scheduled_req_ids",
            "defer_block_free",
            "sched_step_seq",
            "reset_preempted_req_ids",
            "finished_req_ids",
            "encoder_cache_manager",
            "log_stats",
            "_inflight_prefills",
            "cache_config",
            "scheduler_config",
            "kv_cache_config",
            "lora_config",
            "connector",
            "ec_connector",
            "is_encoder_decoder",
            "use_pp",
            "has_mamba_layers",
            "hash_block_size",
        ],
    },
    "vllm.v1.core.sched.output.SchedulerOutput": {
        "fields": [
            "scheduled_new_reqs",
            "scheduled_cached_reqs",
            "num_scheduled_tokens",
            "total_num_scheduled_tokens",
            "scheduled_spec_decode_tokens",
            "scheduled_encoder_inputs",
            "preempted_req_ids",
            "finished_req_ids",
            "free_encoder_mm_hashes",
            "new_block_ids_to_zero",
            "num_spec_tokens_to_schedule",
        ],
    },
    "vllm.v1.core.sched.output.NewRequestData": {"methods": ["from_request"]},
    "vllm.v1.core.kv_cache_manager.KVCacheManager": {
        "methods": [
            "allocate_slots",
            "get_blocks",
            "get_block_ids",
            "new_step_starts",
            "take_kv_cache_block_copies",
            "create_kv_cache_blocks",
        ],
        "attributes": ["block_pool", "watermark_blocks", "coordinator"],
    },
    # The coordinator vLLM uses for one KV cache group with prefix caching on.
    "vllm.v1.core.kv_cache_coordinator.UnitaryKVCacheCoordinator": {
        "methods": ["find_longest_cache_hit"],
    },
    "vllm.v1.core.block_pool.BlockPool": {
        "methods": ["get_num_free_blocks", "touch", "free_blocks", "get_cached_block"],
        "attributes": ["num_gpu_blocks"],
    },
    "vllm.v1.core.kv_cache_manager.KVCacheBlocks": {"fields": ["blocks"]},
    "vllm.v1.core.kv_cache_utils.KVCacheBlock": {"fields": ["block_id", "ref_cnt"]},
    "vllm.v1.core.sched.request_queue.RequestQueue": {"methods": ["remove_request"]},
    "vllm.v1.request.Request": {
        "methods": ["is_finished", "record_event"],
        "attributes": [
            "request_id",
            "status",
            "num_tokens",
            "num_computed_tokens",
            "spec_token_ids",
            "_all_token_ids",
            "all_token_ids",
            "block_hashes",
        ],
    },
    "vllm.v1.request.RequestStatus": {
        "attributes": [
            "RUNNING",
            "PREEMPTED",
            "WAITING",
            "FINISHED_STOPPED",
            "FINISHED_LENGTH_CAPPED",
        ]
    },
    "vllm.v1.engine.EngineCoreOutput": {"fields": ["request_id", "new_token_ids", "finish_reason"]},
    "vllm.v1.engine.EngineCoreOutputs": {"fields": ["outputs"]},
    "vllm.v1.engine.llm_engine.LLMEngine": {
        "methods": ["add_request", "step", "abort_request"],
        "attributes": ["engine_core", "model_config"],
    },
    "vllm.v1.engine.core_client.InprocClient": {"attributes": ["engine_core"]},
    "vllm.entrypoints.llm.LLM": {"attributes": ["llm_engine"]},
    "vllm.config.model.ModelConfig": {"methods": ["get_vocab_size"]},
    "vllm.sampling_params.SamplingParams": {
        "fields": [
            "max_tokens",
            "temperature",
            "top_p",
            "seed",
            "ignore_eos",
            "detokenize",
            "output_kind",
        ],
    },
    "vllm.sampling_params.RequestOutputKind": {"attributes": ["DELTA"]},
    "vllm.v1.engine.core.EngineCore": {"attributes": ["scheduler"]},
}

_SCHEDULER = "vllm.v1.core.sched.scheduler.Scheduler"
_KV_MANAGER = "vllm.v1.core.kv_cache_manager.KVCacheManager"
_BLOCK_POOL = "vllm.v1.core.block_pool.BlockPool"
# Adapter sources scanned by undeclared_uses(): file -> (receiver expression -> its vLLM class).
# Members the adapter's own classes define (PlanScheduler.submit, ...) are allowed on any receiver
# of a class they extend.
SCANNED_RECEIVERS: dict[str, dict[str, str]] = {
    "scheduler.py": {
        "self": _SCHEDULER,
        "scheduler": _SCHEDULER,
        "self.kv_cache_manager": _KV_MANAGER,
        "self.kv_cache_manager.block_pool": _BLOCK_POOL,
        "self.kv_cache_manager.coordinator": (
            "vllm.v1.core.kv_cache_coordinator.UnitaryKVCacheCoordinator"
        ),
        "self.waiting": "vllm.v1.core.sched.request_queue.RequestQueue",
        "request": "vllm.v1.request.Request",
        "outputs": "vllm.v1.engine.EngineCoreOutputs",
        "core_output": "vllm.v1.engine.EngineCoreOutput",
        "scheduler_output": "vllm.v1.core.sched.output.SchedulerOutput",
    },
    "kept_prefix.py": {
        "self._pool": _BLOCK_POOL,
        "request": "vllm.v1.request.Request",
    },
    "engine.py": {
        "self._scheduler": _SCHEDULER,
        "scheduler": _SCHEDULER,
        "scheduler.kv_cache_manager": _KV_MANAGER,
        "scheduler.kv_cache_manager.block_pool": _BLOCK_POOL,
        "self._llm_engine": "vllm.v1.engine.llm_engine.LLMEngine",
        "self._llm_engine.engine_core": "vllm.v1.engine.core_client.InprocClient",
        "self._llm_engine.engine_core.engine_core": "vllm.v1.engine.core.EngineCore",
        "self._llm_engine.model_config": "vllm.config.model.ModelConfig",
        "self._llm": "vllm.entrypoints.llm.LLM",
        "RequestOutputKind": "vllm.sampling_params.RequestOutputKind",
    },
}


# ----- describing the installed vLLM -------------------------------------------------------------


def record() -> dict:
    """Describe the REQUIRED members in the installed vLLM."""
    from engine_adapters.vllm.version import installed_releases

    classes = {}
    for qualname, kinds in REQUIRED.items():
        cls = _load(qualname)
        classes[qualname] = {kind: _describe(cls, kind, names) for kind, names in kinds.items()}
    return {"vllm": installed_releases(), "classes": classes}


def _load(qualname: str) -> type:
    module_name, _, class_name = qualname.rpartition(".")
    return getattr(importlib.import_module(module_name), class_name)


def _describe(cls: type, kind: str, names: list[str]) -> dict[str, str]:
    """name -> description ('absent' when the class lacks it)."""
    if kind == "methods":
        return {name: _signature(cls, name) for name in names}
    if kind == "fields":
        fields = _field_names(cls)
        return {name: "field" if name in fields else "absent" for name in names}
    attributes = _attribute_names(cls)
    return {name: "attribute" if name in attributes else "absent" for name in names}


def _signature(cls: type, name: str) -> str:
    member = inspect.getattr_static(cls, name, None)
    if member is None:
        return "absent"
    function = member.__func__ if isinstance(member, (classmethod, staticmethod)) else member
    # Default values that are objects print with their address; keep only their type.
    return re.sub(r" at 0x[0-9a-f]+", "", str(inspect.signature(function)))


def _field_names(cls: type) -> set[str]:
    dataclass_fields = getattr(cls, "__dataclass_fields__", None)
    if dataclass_fields is not None:
        return set(dataclass_fields)
    return set(getattr(cls, "__struct_fields__", ()))  # msgspec.Struct


def _attribute_names(cls: type) -> set[str]:
    """Class attributes, properties, enum members and every `self.x = ...` in the MRO's source."""
    names = set(dir(cls))
    for klass in cls.__mro__:
        if klass.__module__.startswith("vllm"):
            names |= _assigned_self_attributes(klass)
    return names


def _assigned_self_attributes(cls: type) -> set[str]:
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    names = set()
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
            targets = [node.target]
        for target in targets:
            if isinstance(target, ast.Attribute) and _is_name(target.value, "self"):
                names.add(target.attr)
    return names


def _is_name(node: ast.AST, name: str) -> bool:
    return isinstance(node, ast.Name) and node.id == name


# ----- checks ------------------------------------------------------------------------------------


def load_recording(path: Path = RECORDING_PATH) -> dict:
    return json.loads(path.read_text())


def drift(recorded: dict, live: dict) -> list[str]:
    """Members whose description differs between the recording and the installed vLLM."""
    problems = []
    for qualname, kinds in live["classes"].items():
        for kind, members in kinds.items():
            recorded_members = recorded["classes"].get(qualname, {}).get(kind, {})
            for name, description in members.items():
                if recorded_members.get(name) != description:
                    problems.append(
                        f"{qualname}.{name}: recorded {recorded_members.get(name)!r}, "
                        f"installed {description!r}"
                    )
    return problems


def missing(recorded: dict) -> list[str]:
    """REQUIRED members the recording lacks or records as absent."""
    problems = []
    for qualname, kinds in REQUIRED.items():
        for kind, names in kinds.items():
            members = recorded.get("classes", {}).get(qualname, {}).get(kind, {})
            for name in names:
                if members.get(name, "absent") == "absent":
                    problems.append(f"{qualname}.{name} ({kind})")
    return problems


def undeclared_uses(sources: dict[str, str] | None = None) -> list[str]:
    """vLLM members touched in the scanned adapter sources but not listed in REQUIRED.

    `sources` (file name -> text) replaces the files on disk, for tests."""
    sources = sources or {name: (HERE / name).read_text() for name in SCANNED_RECEIVERS}
    trees = {name: ast.parse(sources[name]) for name in SCANNED_RECEIVERS}
    own = set().union(*(_own_members(tree) for tree in trees.values()))
    problems = set()
    for file_name, receivers in SCANNED_RECEIVERS.items():
        for receiver, name in _attribute_uses(trees[file_name], set(receivers)):
            qualname = receivers[receiver]
            declared = {n for names in REQUIRED[qualname].values() for n in names}
            if name not in declared and not (qualname == _SCHEDULER and name in own):
                problems.add(f"{file_name}: {receiver}.{name} ({qualname}) is not in REQUIRED")
    return sorted(problems)


def _own_members(tree: ast.Module) -> set[str]:
    """Methods and attributes the adapter's own classes define."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    names.add(item.name)
        targets = node.targets if isinstance(node, ast.Assign) else []
        if isinstance(node, ast.AnnAssign):
            targets = [node.target]
        for target in targets:
            elements = target.elts if isinstance(target, ast.Tuple) else [target]
            for element in elements:
                if isinstance(element, ast.Attribute) and _is_name(element.value, "self"):
                    names.add(element.attr)
    return names


def _attribute_uses(tree: ast.Module, receivers: set[str]) -> list[tuple[str, str]]:
    """(receiver expression, member) for every `receiver.member` in the tree."""
    uses = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            receiver = _dotted(node.value)
            if receiver in receivers:
                uses.append((receiver, node.attr))
    return uses


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"(re)write {RECORDING_PATH.name}")
    parser.add_argument(
        "--out", type=Path, help="write the recording here instead (a release being checked)"
    )
    parser.add_argument(
        "--release",
        metavar="DIST==VERSION",
        help="the release recorded, when its sources are imported from a path that its "
        "installed metadata does not describe (e.g. an unpacked wheel on PYTHONPATH)",
    )
    args = parser.parse_args(argv)
    live = record()
    if args.release:
        name, _, version = args.release.partition("==")
        live["vllm"] = {name: version}
    if args.write or args.out:
        path = args.out or RECORDING_PATH
        path.write_text(json.dumps(live, indent=1, sort_keys=True) + "\n")
        print(f"wrote {path}")
    problems = drift(load_recording(), live) + missing(live)
    for problem in problems:
        print(problem)
    if not problems:
        print(f"{live['vllm']}: the interface the adapter uses equals {RECORDING_PATH.name}")
    return 1 if problems and not args.write else 0


if __name__ == "__main__":
    sys.exit(main())
