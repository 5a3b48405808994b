"""Shared pieces of the vLLM adapter tests (imported only by tests that need vLLM)."""

from __future__ import annotations

import random

import pytest

from engine_adapters.vllm.engine import VLLMEngine
from formulations.plan import Step

BLOCK_SIZE = 32  # vLLM's CPU attention needs a multiple of 32
NUM_BLOCKS = 64  # one of them is vLLM's null block
ENGINE_ARGS = {
    "skip_tokenizer_init": True,
    "max_model_len": 512,
    "max_num_batched_tokens": 512,
    "max_num_seqs": 16,
    "num_gpu_blocks_override": NUM_BLOCKS,
    "block_size": BLOCK_SIZE,
    "gpu_memory_utilization": 0.1,  # on CPU: the share of host memory vLLM may claim
    "kv_cache_memory_bytes": 1 << 26,  # explicit: several engines share this test process
    "dtype": "float32",
    "enforce_eager": True,
    "seed": 0,
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from commands.make_model import make_model

    path = tmp_path_factory.mktemp("vllm-model") / "tiny"
    make_model("tiny", path)
    return str(path)


class ExecutorRecorder:
    """Records what vLLM's model executor was asked to compute, step by step (vLLM's view)."""

    def __init__(self, engine: VLLMEngine):
        executor = engine._llm_engine.engine_core.engine_core.model_executor
        self.num_scheduled_tokens: list[dict[str, int]] = []
        self.num_spec_tokens: list[dict[str, int]] = []
        original = executor.execute_model

        def execute_model(scheduler_output, *args, **kwargs):
            self.num_scheduled_tokens.append(dict(scheduler_output.num_scheduled_tokens))
            spec = scheduler_output.scheduled_spec_decode_tokens
            self.num_spec_tokens.append({rid: len(ids) for rid, ids in spec.items()})
            return original(scheduler_output, *args, **kwargs)

        executor.execute_model = execute_model

    def scheduled_ids(self) -> set[str]:
        return {rid for step in self.num_scheduled_tokens for rid in step}


@pytest.fixture(scope="module")
def engine(model_dir):
    engine = VLLMEngine(model_dir, ENGINE_ARGS)
    engine.recorder = ExecutorRecorder(engine)
    return engine


@pytest.fixture(scope="module")
def reference(model_dir):
    """Greedy outputs from vLLM with its own scheduler (same model, same numerics)."""
    from vllm import LLM, SamplingParams

    args = {k: v for k, v in ENGINE_ARGS.items() if k != "num_gpu_blocks_override"}
    llm = LLM(model=model_dir, enable_prefix_caching=False, **args)

    def generate(prompts: dict[str, tuple[list[int], int]]) -> dict[str, list[int]]:
        ids = list(prompts)
        inputs = [{"prompt_token_ids": prompts[rid][0]} for rid in ids]
        params = [
            SamplingParams(max_tokens=prompts[rid][1], temperature=0.0, ignore_eos=True)
            for rid in ids
        ]
        outputs = llm.generate(inputs, params, use_tqdm=False)
        return {rid: list(out.outputs[0].token_ids) for rid, out in zip(ids, outputs)}

    return generate


def make_prompt(seed: int, length: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 512) for _ in range(length)]


def run_plan(engine: VLLMEngine, steps: list[Step]):
    reports = [engine.execute(step, i) for i, step in enumerate(steps)]
    for report in reports:
        assert report.ok, report.error
    return reports


def outputs_of(reports) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    for report in reports:
        for rid, ids in report.new_token_ids.items():
            tokens.setdefault(rid, []).extend(ids)
    return tokens
