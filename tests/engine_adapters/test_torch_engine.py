"""TorchEngine executing plan steps: chunked prefill, mixed batches, preemption, sampling, EOS,
block accounting and refusals. Reference outputs come from plain one-request-at-a-time greedy
decoding (itself checked against a full-sequence reference in test_torch_model.py)."""

from __future__ import annotations

import copy
import dataclasses
import random

import msgspec
import pytest
import torch

from commands.make_model import make_model
from engine_adapters.engine import EngineRequest
from engine_adapters.torch_engine.checkpoint import load_model
from engine_adapters.torch_engine.engine import TorchEngine
from engine_adapters.torch_engine.model_runner import Chunk, ModelRunner
from formulations.plan import Step

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_engine")
    make_model("tiny", out, seed=0)
    return out


@pytest.fixture(scope="session")
def model(tiny_dir):
    return load_model(tiny_dir)


def prompt(seed: int, length: int) -> tuple[int, ...]:
    rng = random.Random(seed)
    return tuple(rng.randrange(2, 512) for _ in range(length))


def request(rid: str, prompt_seed: int, num_prompt: int, num_out: int, **kw) -> EngineRequest:
    tokens = prompt(prompt_seed, num_prompt)
    return EngineRequest(rid, num_prompt, num_out, prompt_token_ids=tokens, **kw)


def run_alone(model, req: EngineRequest) -> list[int]:
    """One-shot prefill then one decode per step: the plain greedy reference."""
    engine = TorchEngine(model, num_blocks=64)
    engine.add_request(req)
    out = []
    step = Step({req.request_id: req.num_prompt_tokens})
    while True:
        report = engine.execute(step, len(out))
        assert report.ok, report.error
        out += report.new_token_ids[req.request_id]
        if req.request_id in report.finished:
            return out
        step = Step({req.request_id: 1})


def test_chunked_prefill_logits_equal_one_shot(model):
    tokens = list(prompt(7, 90))
    rng = random.Random(0)
    cuts = sorted(rng.sample(range(1, 90), 6))
    chunks = [tokens[a:b] for a, b in zip([0, *cuts], [*cuts, 90])]
    runner_one, runner_chunked = ModelRunner(model, 16), ModelRunner(model, 16)
    (one_shot,) = runner_one.run([Chunk("r", tokens, 0, num_logits=90)])
    pieces, done = [], 0
    for chunk in chunks:
        (logits,) = runner_chunked.run([Chunk("r", chunk, done, num_logits=len(chunk))])
        pieces.append(logits)
        done += len(chunk)
    torch.testing.assert_close(torch.cat(pieces), one_shot, atol=1e-4, rtol=1e-4)


def test_chunked_prefill_gives_same_greedy_tokens(model):
    req = request("a", 1, 70, 20)
    reference = run_alone(model, req)
    for seed in range(3):
        engine = TorchEngine(model, num_blocks=64)
        engine.add_request(req)
        rng, out, step_id = random.Random(seed), [], 0
        remaining = req.num_prompt_tokens
        while remaining:
            n = min(remaining, rng.randint(1, 30))
            report = engine.execute(Step({"a": n}), step_id)
            assert report.ok and report.num_computed_tokens == {"a": n}
            remaining -= n
            step_id += 1
        out += report.new_token_ids["a"]
        while "a" not in report.finished:
            report = engine.execute(Step({"a": 1}), step_id)
            out += report.new_token_ids["a"]
            step_id += 1
        assert out == reference


def test_mixed_step_logits_equal_separate_runs(model):
    """Decodes, a prefill chunk and a multi-token continuation in one ragged pass."""
    contexts = {
        "d1": list(prompt(1, 33)),
        "d2": list(prompt(2, 5)),
        "p": [],
        "c": list(prompt(3, 20)),
    }
    new = {"d1": [11], "d2": [12], "p": list(prompt(4, 40)), "c": list(prompt(5, 4))}
    mixed = ModelRunner(model, 64)
    warm = [Chunk(r, ctx, 0) for r, ctx in contexts.items() if ctx]
    mixed.run(warm)
    together = mixed.run([Chunk(r, new[r], len(contexts[r]), len(new[r])) for r in contexts])
    for rid, logits in zip(contexts, together):
        alone = ModelRunner(model, 64)
        (expected,) = alone.run([Chunk(rid, contexts[rid] + new[rid], 0, len(new[rid]))])
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def test_mixed_prefill_decode_steps_equal_running_alone(model):
    reqs = [request("a", 1, 40, 12), request("b", 2, 9, 15), request("c", 3, 100, 6)]
    reference = {r.request_id: run_alone(model, r) for r in reqs}
    engine = TorchEngine(model, num_blocks=64)
    for r in reqs:
        engine.add_request(r)
    out = drive(engine, reqs, max_chunk=25)
    assert out == reference
    assert engine.num_free_blocks == 64


def drive(engine: TorchEngine, reqs, max_chunk: int, spec: int = 0) -> dict[str, list[int]]:
    """Simple scheduler: every unfinished request gets min(pending, max_chunk) tokens per step."""
    pending = {r.request_id: r.num_prompt_tokens for r in reqs}
    out = {r.request_id: [] for r in reqs}
    step_id = 0
    while pending:
        num_tokens = {rid: min(p, max_chunk) for rid, p in pending.items()}
        num_spec = {rid: spec for rid, p in pending.items() if spec and p <= max_chunk}
        report = engine.execute(Step(num_tokens, num_spec), step_id)
        assert report.ok, report.error
        for rid, n in num_tokens.items():
            pending[rid] -= n
            new = report.new_token_ids.get(rid, [])
            out[rid] += new
            if new:
                pending[rid] = 1
            if rid in report.finished:
                del pending[rid]
        step_id += 1
    return out


def test_preempted_request_is_recomputed_identically(model):
    req = request("a", 4, 30, 16)
    reference = run_alone(model, req)
    engine = TorchEngine(model, num_blocks=64)
    engine.add_request(req)
    out = engine.execute(Step({"a": 30}), 0).new_token_ids["a"]
    for i in range(5):
        out += engine.execute(Step({"a": 1}), 1 + i).new_token_ids["a"]
    engine.preempt("a")
    assert engine.num_free_blocks == 64
    known = 30 + len(out)
    report = engine.execute(Step({"a": known - 10}), 10)  # recompute in two chunks
    assert report.ok and report.new_token_ids == {}
    report = engine.execute(Step({"a": 10}), 11)
    out += report.new_token_ids["a"]
    while "a" not in report.finished:
        report = engine.execute(Step({"a": 1}), 12)
        out += report.new_token_ids["a"]
    assert out == reference


def test_seeded_sampling_is_reproducible_and_batch_independent(model):
    sampled = request("s", 5, 12, 20, temperature=0.9, top_p=0.9, seed=123)
    alone_1, alone_2 = run_alone(model, sampled), run_alone(model, sampled)
    assert alone_1 == alone_2
    assert alone_1 != run_alone(model, request("s", 5, 12, 20))  # differs from greedy
    engine = TorchEngine(model, num_blocks=64)
    batch = [sampled, request("x", 6, 50, 25), request("y", 7, 3, 30, temperature=1.0, seed=9)]
    for r in batch:
        engine.add_request(r)
    assert drive(engine, batch, max_chunk=16)["s"] == alone_1


def test_eos_stops_unless_ignored(model):
    req = request("a", 8, 10, 20)
    reference = run_alone(model, req)
    eos = reference[5]
    eos_model = _with_eos(model, eos)
    stopping = run_alone(eos_model, msgspec.structs.replace(req, ignore_eos=False))
    assert stopping == reference[: reference.index(eos) + 1]
    assert run_alone(eos_model, req) == reference  # ignore_eos=True (the default) runs on


def _with_eos(model, eos: int):
    clone = copy.copy(model)  # shares the weights
    clone.config = dataclasses.replace(model.config, eos_token_id=eos)
    return clone


def test_blocks_do_not_leak_over_finish_abort_preempt(model):
    engine = TorchEngine(model, num_blocks=40)
    rng = random.Random(0)
    live: dict[str, int] = {}
    for i in range(120):
        if len(live) < 6:
            rid = f"r{i}"
            engine.add_request(request(rid, i, rng.randint(1, 60), rng.randint(1, 8)))
            live[rid] = 0
        rid = rng.choice(sorted(live))
        action = rng.random()
        if action < 0.1:
            engine.abort(rid)
            del live[rid]
            continue
        if action < 0.2:
            engine.preempt(rid)
        pending = len(engine.token_ids(rid)) - _computed(engine, rid)
        report = engine.execute(Step({rid: min(pending, rng.randint(1, 40))}), i)
        assert report.ok, report.error
        assert report.num_free_blocks == engine.num_free_blocks
        if rid in report.finished:
            del live[rid]
        used = sum(-(-_computed(engine, r) // 16) for r in live)
        assert engine.num_free_blocks == 40 - used
    for rid in list(live):
        engine.abort(rid)
    assert engine.num_free_blocks == 40
    engine.abort("never-seen")  # ignored


def _computed(engine: TorchEngine, rid: str) -> int:
    return engine._seqs[rid].num_computed_tokens


def test_out_of_blocks_is_an_error_report_and_changes_nothing(model):
    engine = TorchEngine(model, num_blocks=4)  # 64 token slots
    engine.add_request(request("a", 1, 40, 5))
    engine.add_request(request("b", 2, 40, 5))
    assert engine.execute(Step({"a": 40}), 0).ok
    report = engine.execute(Step({"b": 40}), 1)
    assert "out of KV blocks" in report.error
    assert report.num_free_blocks == 1 == engine.num_free_blocks
    assert engine.execute(Step({"b": 16}), 2).ok  # a step that fits still runs
    assert engine.info().num_total_blocks == 4 and engine.info().block_size == 16


@pytest.mark.parametrize(
    "step, message",
    [
        (Step({"nope": 1}), "unknown request"),
        (Step({"a": 11}), "only 10 remain"),
        (Step({"a": 0}), "at least 1 token"),
        (Step({"a": 10}, {"a": 2}), "without a draft model"),
        (Step({"a": 5}, {"b": 1}), "computes nothing for"),
    ],
)
def test_bad_steps_are_refused_with_nothing_executed(model, step, message):
    engine = TorchEngine(model, num_blocks=16)
    engine.add_request(request("a", 1, 10, 3))
    report = engine.execute(step, 7)
    assert message in report.error and not report.ok
    assert report.step_id == 7
    assert report.num_computed_tokens == {} and engine.num_free_blocks == 16
    assert (
        engine.execute(Step({"a": 10}), 8).new_token_ids["a"]
        == run_alone(model, request("a", 1, 10, 3))[:1]
    )


def test_finished_requests_are_refused_and_bad_requests_rejected(model):
    engine = TorchEngine(model, num_blocks=16)
    engine.add_request(request("a", 1, 10, 1))
    assert engine.execute(Step({"a": 10}), 0).finished == ("a",)
    assert "finished request" in engine.execute(Step({"a": 1}), 1).error
    engine.add_request(request("b", 1, 10, 1))
    with pytest.raises(ValueError, match="already registered"):
        engine.add_request(request("b", 1, 10, 1))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add_request(EngineRequest("c", 2, 1, prompt_token_ids=(3, 512)))


def test_placeholder_prompts_are_deterministic(model):
    outs = []
    for _ in range(2):
        engine = TorchEngine(model, num_blocks=16)
        engine.add_request(EngineRequest("p", 25, 4))
        outs.append((engine.token_ids("p"), engine.execute(Step({"p": 25}), 0).new_token_ids))
    assert outs[0] == outs[1] and len(outs[0][0]) == 25


def test_a_failing_forward_pass_is_rolled_back_and_reported(model, monkeypatch):
    req = request("a", 2, 20, 4)
    reference = run_alone(model, req)
    engine = TorchEngine(model, num_blocks=16)
    engine.add_request(req)
    assert engine.execute(Step({"a": 8}), 0).ok

    def broken_run(chunks):
        engine.target.blocks.allocate("a", 20)  # it got as far as taking blocks
        raise RuntimeError("simulated device out of memory")

    monkeypatch.setattr(engine.target, "run", broken_run)
    report = engine.execute(Step({"a": 12}), 1)
    assert "simulated device out of memory" in report.error
    assert engine.num_free_blocks == 15 and _computed(engine, "a") == 8
    monkeypatch.undo()
    out = engine.execute(Step({"a": 12}), 2).new_token_ids["a"]
    for i in range(3):
        out += engine.execute(Step({"a": 1}), 3 + i).new_token_ids["a"]
    assert out == reference


def test_an_empty_step_does_nothing(model):
    engine = TorchEngine(model, num_blocks=8)
    report = engine.execute(Step({}), 5)
    assert report.ok and report.num_computed_tokens == {} and report.num_free_blocks == 8


def test_decodes_with_very_different_contexts_share_a_step(model):
    """Context lengths 1..300 land in different attention buckets; logits equal separate runs."""
    contexts = {f"r{n}": list(prompt(n, n)) for n in (1, 2, 17, 40, 90, 300)}
    mixed = ModelRunner(model, 64)
    mixed.run([Chunk(rid, ctx, 0) for rid, ctx in contexts.items()])
    batch = mixed.run([Chunk(rid, [7], len(ctx), 1) for rid, ctx in contexts.items()])
    for (rid, ctx), logits in zip(contexts.items(), batch):
        (alone,) = ModelRunner(model, 64).run([Chunk(rid, ctx + [7], 0, 1)])
        torch.testing.assert_close(logits, alone, atol=1e-4, rtol=1e-4)
