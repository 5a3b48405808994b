"""Speculative decoding: under greedy sampling the output is token-identical to plain decoding for
any draft (the same weights: all accepted; a draft that always proposes BOS: all rejected; an
unrelated or a perturbed draft: in between), and the sampled acceptance rule reproduces the
target distribution."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from commands.make_model import make_model
from engine_adapters.engine import EngineRequest
from engine_adapters.torch_engine.checkpoint import load_model
from engine_adapters.torch_engine.engine import TorchEngine
from engine_adapters.torch_engine.sampling import SamplingParams
from engine_adapters.torch_engine.speculative import verify
from formulations.plan import Step

torch.set_num_threads(1)
NUM_BLOCKS = 64


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_spec")
    make_model("tiny", out, draft=True, seed=0)
    target = load_model(out)
    unrelated = load_model(out / "draft")
    perturbed = copy.deepcopy(target)
    with torch.no_grad():
        for param in perturbed.parameters():
            param.add_(
                0.5
                * param.std()
                * torch.randn(param.shape, generator=torch.Generator().manual_seed(1))
            )
    bos_only = copy.deepcopy(unrelated)
    with torch.no_grad():
        bos_only.model.norm.weight.zero_()  # all logits 0: argmax is token 0 (BOS) every time
    return {
        "target": target,
        "same": target,
        "unrelated": unrelated,
        "perturbed": perturbed,
        "bos_only": bos_only,
    }


def requests() -> list[EngineRequest]:
    rng = random.Random(0)
    out = []
    for i, (num_prompt, num_out) in enumerate([(12, 30), (40, 17), (5, 25)]):
        tokens = tuple(rng.randrange(2, 512) for _ in range(num_prompt))
        out.append(EngineRequest(f"r{i}", num_prompt, num_out, prompt_token_ids=tokens))
    return out


def run(engine: TorchEngine, reqs, spec: int, max_chunk: int = 16):
    """Every unfinished request gets min(pending, max_chunk) tokens, plus `spec` draft tokens in
    steps that sample; returns outputs and (accepted, proposed) totals."""
    for r in reqs:
        engine.add_request(r)
    pending = {r.request_id: r.num_prompt_tokens for r in reqs}
    out = {r.request_id: [] for r in reqs}
    accepted = proposed = step_id = 0
    while pending:
        num_tokens = {rid: min(p, max_chunk) for rid, p in pending.items()}
        num_spec = {rid: spec for rid, p in pending.items() if spec and p <= max_chunk}
        report = engine.execute(Step(num_tokens, num_spec), step_id)
        assert report.ok, report.error
        for rid in num_tokens:
            new = report.new_token_ids.get(rid, [])
            assert report.num_new_tokens.get(rid, 0) == len(new)
            if rid in num_spec:
                assert len(new) == 1 + report.num_accepted_spec_tokens[rid]
                assert report.num_proposed_spec_tokens[rid] == spec
                assert (
                    report.num_computed_tokens[rid]
                    == num_tokens[rid] + report.num_accepted_spec_tokens[rid]
                )
            out[rid] += new
            pending[rid] = 1 if new else pending[rid] - num_tokens[rid]
            if rid in report.finished:
                del pending[rid]
        accepted += sum(report.num_accepted_spec_tokens.values())
        proposed += sum(report.num_proposed_spec_tokens.values())
        step_id += 1
    return out, accepted, proposed


@pytest.fixture(scope="session")
def plain_output(models):
    out, _, _ = run(TorchEngine(models["target"], NUM_BLOCKS), requests(), spec=0)
    return out


@pytest.mark.parametrize("draft", ["same", "unrelated", "perturbed", "bos_only"])
@pytest.mark.parametrize("spec", [1, 3, 6])
def test_greedy_speculation_is_token_identical(models, plain_output, draft, spec):
    engine = TorchEngine(models["target"], NUM_BLOCKS, draft_model=models[draft], max_spec_tokens=6)
    out, accepted, proposed = run(engine, requests(), spec)
    assert out == plain_output
    if draft == "same":  # every proposal accepted, except past a request's output limit
        assert proposed - spec * len(out) <= accepted < proposed
    if draft == "bos_only":
        assert all(0 not in toks for toks in plain_output.values())
        assert accepted == 0 and proposed > 0
    assert engine.num_free_blocks == NUM_BLOCKS
    assert engine.draft.runner.blocks.num_free_blocks == NUM_BLOCKS


def test_perturbed_draft_accepts_some_but_not_all(models):
    engine = TorchEngine(models["target"], NUM_BLOCKS, draft_model=models["perturbed"])
    _, accepted, proposed = run(engine, requests(), spec=3)
    assert 0 < accepted < proposed


def test_speculation_survives_preemption_and_mixed_steps(models, plain_output):
    engine = TorchEngine(models["target"], NUM_BLOCKS, draft_model=models["perturbed"])
    reqs = requests()
    for r in reqs:
        engine.add_request(r)
    r0 = reqs[0]
    out = engine.execute(Step({"r0": r0.num_prompt_tokens}, {"r0": 2}), 0).new_token_ids["r0"]
    out += engine.execute(Step({"r0": 1, "r1": 30}, {"r0": 4}), 1).new_token_ids["r0"]
    engine.preempt("r0")
    known = len(engine.token_ids("r0"))
    report = engine.execute(Step({"r0": known, "r1": 10}, {"r0": 3}), 2)
    out += report.new_token_ids["r0"]
    while "r0" not in report.finished:
        report = engine.execute(Step({"r0": 1}, {"r0": 5}), 3)
        out += report.new_token_ids["r0"]
    assert out == plain_output["r0"]


def test_speculation_refusals(models):
    engine = TorchEngine(
        models["target"], NUM_BLOCKS, draft_model=models["same"], max_spec_tokens=4
    )
    engine.add_request(requests()[0])
    assert "0..4" in engine.execute(Step({"r0": 12}, {"r0": 5}), 0).error
    assert "finishes its pending tokens" in engine.execute(Step({"r0": 6}, {"r0": 2}), 0).error
    assert engine.info().max_spec_tokens == 4
    small = TorchEngine(models["target"], 1, draft_model=models["same"])  # 16 slots
    small.add_request(requests()[0])  # 12 prompt tokens + 5 speculative > 16 slots
    assert "out of KV blocks" in small.execute(Step({"r0": 12}, {"r0": 5}), 0).error
    assert small.num_free_blocks == 1 and small.execute(Step({"r0": 12}, {"r0": 4}), 1).ok


def test_sampled_acceptance_rule_preserves_target_distribution():
    """Empirical distribution of the first emitted token == the target's p_1, whatever q is."""
    logits_p = torch.tensor([[1.0, 0.2, -0.5, 0.7], [0.0, 1.0, 0.5, -1.0]])
    q = torch.tensor([[0.1, 0.6, 0.2, 0.1]])
    params = SamplingParams(temperature=1.0)
    p1 = torch.softmax(logits_p[0], -1)
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(4)
    num_trials = 4000
    for _ in range(num_trials):
        draft = int(torch.multinomial(q[0], 1, generator=generator))
        tokens, accepted = verify([draft], q, logits_p, params, generator)
        assert len(tokens) == accepted + 1
        counts[tokens[0]] += 1
    assert (counts / num_trials - p1).abs().max() < 0.03


def test_top_p_keeps_the_smallest_nucleus():
    from engine_adapters.torch_engine.sampling import probabilities

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    probs = probabilities(logits, SamplingParams(temperature=1.0, top_p=0.7))
    torch.testing.assert_close(probs, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))


def test_sampled_speculation_is_seeded_and_completes(models):
    reqs = [
        EngineRequest(
            r.request_id,
            r.num_prompt_tokens,
            r.max_new_tokens,
            r.prompt_token_ids,
            temperature=0.8,
            top_p=0.95,
            seed=i,
        )
        for i, r in enumerate(requests())
    ]
    outputs = []
    for _ in range(2):
        engine = TorchEngine(models["target"], NUM_BLOCKS, draft_model=models["perturbed"])
        out, accepted, proposed = run(engine, reqs, spec=3)
        outputs.append(out)
        assert 0 < accepted < proposed
        assert engine.num_free_blocks == NUM_BLOCKS
    assert outputs[0] == outputs[1]
    assert {rid: len(toks) for rid, toks in outputs[0].items()} == {
        r.request_id: r.max_new_tokens for r in reqs
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_schedules_match_plain_greedy(models, plain_output, seed):
    """Random chunk sizes, speculation lengths, preemptions and batch mixes never change a greedy
    request's output."""
    rng = random.Random(seed)
    engine = TorchEngine(models["target"], NUM_BLOCKS, draft_model=models["perturbed"])
    reqs = requests()
    for r in reqs:
        engine.add_request(r)
    out = {r.request_id: [] for r in reqs}
    live = {r.request_id for r in reqs}
    for step_id in range(400):
        if not live:
            break
        chosen = rng.sample(sorted(live), rng.randint(1, len(live)))
        if rng.random() < 0.08:
            engine.preempt(chosen[0])
            continue
        num_tokens, num_spec = {}, {}
        for rid in chosen:
            seq = engine._seqs[rid]
            pending = seq.num_pending_tokens
            num_tokens[rid] = rng.randint(1, pending) if rng.random() < 0.5 else pending
            if num_tokens[rid] == pending and rng.random() < 0.6:
                num_spec[rid] = rng.randint(1, 6)
        report = engine.execute(Step(num_tokens, num_spec), step_id)
        assert report.ok, report.error
        for rid, new in report.new_token_ids.items():
            out[rid] += new
        live -= set(report.finished)
    assert not live
    assert out == plain_output
    assert engine.num_free_blocks == NUM_BLOCKS
    assert engine.draft.runner.blocks.num_free_blocks == NUM_BLOCKS


def test_early_exit_draft_accepts_often_and_keeps_output(tmp_path, plain_output):
    make_model("tiny", tmp_path, draft=True, seed=0, draft_kind="early-exit")
    target, draft = load_model(tmp_path), load_model(tmp_path / "draft")
    assert draft.config.num_hidden_layers == 1 and draft.config.hidden_size == 64
    assert torch.equal(draft.lm_head.weight, target.lm_head.weight)
    engine = TorchEngine(target, NUM_BLOCKS, draft_model=draft)
    out, accepted, proposed = run(engine, requests(), spec=2)
    assert out == plain_output
    assert 0.1 * proposed < accepted < proposed
