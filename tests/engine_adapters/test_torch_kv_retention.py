"""The torch engine keeps a tool chain's paged KV between rounds (docs/AGENTS.md): the next round
served from the kept blocks is token-identical (greedy) to a full re-prefill of the same context
on a fresh engine, whatever block the cached length ends in and however the new tokens are
chunked; pinned KV is held until attached or released, evictable KV counts as free and is evicted
least recently kept first; a round whose entry is gone or does not match its prompt recomputes
(reported as a miss); and every block always has exactly one owner and comes back."""

from __future__ import annotations

import random

import pytest
import torch

from commands.make_model import make_model
from engine_adapters.engine import EngineRequest
from engine_adapters.torch_engine.checkpoint import load_model
from engine_adapters.torch_engine.engine import TorchEngine
from formulations.plan import Step

torch.set_num_threads(1)
BLOCK = 16


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_kv_retention")
    make_model("tiny", out, seed=0)
    return load_model(out)


def tokens(seed: int, length: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(2, 512) for _ in range(length)]


def round_request(rid, prompt, num_out, chain="c", retain="drop", cached=0) -> EngineRequest:
    return EngineRequest(
        rid,
        len(prompt),
        num_out,
        prompt_token_ids=tuple(prompt),
        chain_id=chain,
        num_cached_tokens=cached,
        retain_kv=retain,
    )


class Driver:
    """Runs rounds on an engine: pending tokens in chunks of at most `max_chunk`, then decodes;
    keeps every report and checks the block books after each step."""

    def __init__(self, engine: TorchEngine) -> None:
        self.engine = engine
        self.reports = []
        self.step_id = 0

    def execute(self, step: Step):
        report = self.engine.execute(step, self.step_id)
        self.step_id += 1
        self.reports.append(report)
        assert report.num_free_blocks == self.engine.num_free_blocks
        check_owners(self.engine)
        return report

    def run(self, request: EngineRequest, max_chunk: int = 1000) -> tuple[int, list[int]]:
        """Register and finish a round; -> (prompt tokens found cached, output tokens)."""
        num_cached = self.engine.add_request(request)
        out = self.finish(request.request_id, request.num_prompt_tokens - num_cached, max_chunk)
        return num_cached, out

    def finish(self, rid: str, num_pending: int, max_chunk: int = 1000) -> list[int]:
        out: list[int] = []
        while True:
            report = self.execute(Step({rid: min(num_pending, max_chunk)}))
            assert report.ok, report.error
            num_pending -= min(num_pending, max_chunk)
            new = report.new_token_ids.get(rid, [])
            out += new
            if rid in report.finished:
                return out
            if new:
                num_pending = 1


def run_alone(model, prompt: list[int], num_out: int) -> list[int]:
    """The reference: a fresh engine, the whole context prefilled at once, greedy decodes."""
    _, out = Driver(TorchEngine(model, num_blocks=64)).run(round_request("ref", prompt, num_out))
    return out


def check_owners(engine: TorchEngine) -> None:
    """Every target block is owned exactly once: free list, a request's table or a kept entry."""
    books = engine.target.blocks
    owned = list(books._free)
    owned += [b for table in books._tables.values() for b in table]
    kept = {**engine._kept._pinned, **engine._kept._evictable}
    owned += [b for entry in kept.values() for b in entry.block_table]
    assert sorted(owned) == list(range(books.num_blocks))
    counts = engine.kv_blocks()
    assert sum(counts.values()) == books.num_blocks
    assert engine.num_free_blocks == counts["free"] + counts["evictable"]


@pytest.mark.parametrize(
    ("num_prompt", "num_out", "num_tool", "max_chunk"),
    [
        (20, 5, 9, 1000),  # 24 cached: ends mid-block
        (28, 5, 12, 1000),  # 32 cached: exactly on a block boundary
        (70, 14, 30, 1000),  # 83 cached: six blocks, the last partly filled
        (45, 7, 41, 8),  # 51 cached, 42 new tokens prefilled 8 at a time
        (17, 16, 5, 2),  # 32 cached, on a boundary, new tokens 2 at a time
    ],
)
@pytest.mark.parametrize("retain", ["pinned", "evictable"])
def test_next_round_from_kept_kv_equals_full_reprefill(
    model, num_prompt, num_out, num_tool, max_chunk, retain
):
    engine = TorchEngine(model, num_blocks=40)
    driver = Driver(engine)
    # A request of another chain runs beside round 0 so that the kept blocks are not contiguous.
    engine.add_request(round_request("other", tokens(99, 37), 30, chain="o"))
    prompt0 = tokens(num_prompt, num_prompt)
    engine.add_request(round_request("r0", prompt0, num_out, retain=retain))
    outs = {"other": [], "r0": []}
    report = driver.execute(Step({"other": 37, "r0": num_prompt}))
    while "r0" not in report.finished:
        for rid, new in report.new_token_ids.items():
            outs[rid] += new
        report = driver.execute(Step(dict.fromkeys(outs, 1)))
    outs["r0"] += report.new_token_ids["r0"]
    assert outs["r0"] == run_alone(model, prompt0, num_out)
    num_cached = num_prompt + num_out - 1  # the last output token's KV was never computed
    num_blocks = -(-num_cached // BLOCK)
    assert engine.kept_chains() == {"c": (num_cached, num_blocks)}
    assert engine.kv_blocks()[retain] == num_blocks

    prompt1 = prompt0 + outs["r0"] + tokens(num_tool + 1000, num_tool)
    request1 = round_request("r1", prompt1, 12, cached=num_cached)
    begin = len(driver.reports)
    num_attached, out1 = driver.run(request1, max_chunk)
    assert num_attached == num_cached
    # Only the new tokens were prefilled, max_chunk at a time.
    num_new = len(prompt1) - num_cached
    prefill = [r.num_computed_tokens["r1"] for r in driver.reports[begin:]][
        : -(-num_new // max_chunk)
    ]
    assert sum(prefill) == num_new and max(prefill) == min(num_new, max_chunk)
    assert all(not r.kv_misses for r in driver.reports)
    assert out1 == run_alone(model, prompt1, 12)
    assert engine.kept_chains() == {}


def test_a_kept_speculative_round_is_reused_with_the_draft_catching_up(model):
    engine = TorchEngine(model, num_blocks=40, draft_model=model, max_spec_tokens=4)
    driver = Driver(engine)
    prompt0 = tokens(3, 21)
    engine.add_request(round_request("r0", prompt0, 10, retain="pinned"))
    out0, report = [], driver.execute(Step({"r0": 21}, {"r0": 3}))
    while "r0" not in report.finished:
        out0 += report.new_token_ids["r0"]
        report = driver.execute(Step({"r0": 1}, {"r0": 3}))
    out0 += report.new_token_ids["r0"]
    assert report.num_accepted_spec_tokens["r0"] > 0  # the draft (the target itself) was used
    prompt1 = prompt0 + out0 + tokens(4, 6)
    num_cached = 21 + 10 - 1
    assert engine.add_request(round_request("r1", prompt1, 14, cached=num_cached)) == num_cached
    out1, report = [], driver.execute(Step({"r1": len(prompt1) - num_cached}, {"r1": 3}))
    while "r1" not in report.finished:
        out1 += report.new_token_ids["r1"]
        report = driver.execute(Step({"r1": 1}, {"r1": 3}))
    out1 += report.new_token_ids["r1"]
    assert out1 == run_alone(model, prompt1, 14)
    assert engine.num_free_blocks == 40
    assert engine.draft.runner.blocks.num_free_blocks == 40


def test_pinned_kv_is_held_until_attached_or_released(model):
    engine = TorchEngine(model, num_blocks=20)
    driver = Driver(engine)
    assert engine.info().kv_retention
    _, out0 = driver.run(round_request("r0", tokens(1, 40), 5, retain="pinned"))
    assert engine.kept_chains() == {"c": (44, 3)}
    assert engine.num_free_blocks == 17  # pinned blocks are not free
    assert engine.kv_blocks() == {"free": 17, "evictable": 0, "pinned": 3, "held": 0}
    # A step that needs more than the truly free blocks is refused: pinned KV is never evicted.
    engine.add_request(round_request("big", tokens(2, 18 * BLOCK), 1, chain=None))
    report = driver.execute(Step({"big": 18 * BLOCK}))
    assert not report.ok and "out of KV blocks" in report.error
    assert engine.kept_chains() == {"c": (44, 3)} and report.kv_evicted == ()
    engine.abort("big")
    engine.release_kv("c")
    assert engine.num_free_blocks == 20 and engine.kept_chains() == {}
    # The next round finds nothing (released): a miss, then the whole prompt is recomputed.
    prompt1 = tokens(1, 40) + out0 + tokens(5, 7)
    num_cached, out1 = driver.run(round_request("r1", prompt1, 6, cached=44))
    assert num_cached == 0
    assert driver.reports[-len(out1)].kv_misses == ("r1",)
    assert driver.reports[-len(out1)].num_computed_tokens["r1"] == len(prompt1)
    assert all(not r.kv_misses for r in driver.reports[-len(out1) + 1 :])  # reported once
    assert out1 == run_alone(model, prompt1, 6)
    engine.release_kv("never-kept")  # ignored
    assert engine.num_free_blocks == 20


def test_evictable_kv_counts_free_and_is_evicted_least_recently_kept_first(model):
    engine = TorchEngine(model, num_blocks=10)
    driver = Driver(engine)
    prompts = {chain: tokens(10 + i, 40) for i, chain in enumerate("abc")}
    outs = {}
    for chain in "abc":
        _, outs[chain] = driver.run(
            round_request(f"{chain}0", prompts[chain], 5, chain=chain, retain="evictable")
        )
    assert engine.num_free_blocks == 10  # 3 entries of 3 blocks, all counted free
    assert engine.kv_blocks() == {"free": 1, "evictable": 9, "pinned": 0, "held": 0}
    # Attaching b takes its blocks out of the evictable pool; a is now the least recently kept.
    prompt_b = prompts["b"] + outs["b"] + tokens(20, 3)
    assert engine.add_request(round_request("b1", prompt_b, 4, chain="b", cached=44)) == 44
    assert engine.num_free_blocks == 7
    # A 4-block request: 1 block truly free, so a (3 blocks) is evicted, not c.
    engine.add_request(round_request("x", tokens(21, 60), 2, chain=None))
    report = driver.execute(Step({"x": 60}))
    assert report.ok and report.kv_evicted == ("a",)
    assert set(engine.kept_chains()) == {"c"}
    report = driver.execute(Step({"x": 1}))
    assert report.kv_evicted == ()  # reported once
    # The evicted chain's next round misses and recomputes correctly; the held round attaches.
    prompt_a = prompts["a"] + outs["a"] + tokens(22, 5)
    num_cached, out_a = driver.run(round_request("a1", prompt_a, 4, chain="a", cached=44))
    assert num_cached == 0 and driver.reports[-len(out_a)].kv_misses == ("a1",)
    assert out_a == run_alone(model, prompt_a, 4)
    assert driver.finish("b1", len(prompt_b) - 44) == run_alone(model, prompt_b, 4)
    engine.release_kv("c")
    assert engine.num_free_blocks == 10 and engine.kv_blocks()["free"] == 10


@pytest.mark.parametrize("mismatch", ["token_ids", "count_short", "count_long", "no_chain"])
def test_a_round_that_does_not_match_its_kept_entry_misses_and_recomputes(model, mismatch):
    engine = TorchEngine(model, num_blocks=20)
    driver = Driver(engine)
    prompt0 = tokens(30, 26)
    _, out0 = driver.run(round_request("r0", prompt0, 6, retain="pinned"))
    context = prompt0 + out0  # 31 cached tokens
    chain, cached = "c", 31
    if mismatch == "token_ids":  # e.g. the HTTP path tokenized the context differently
        context[7] = (context[7] + 1) % 512
    elif mismatch == "count_short":
        cached = 30
    elif mismatch == "count_long":
        cached = 32
    else:
        chain = None
    prompt1 = context + tokens(31, 4)
    request1 = round_request("r1", prompt1, 5, chain=chain, cached=cached)
    num_cached, out1 = driver.run(request1)
    assert num_cached == 0
    assert driver.reports[-len(out1)].kv_misses == ("r1",)
    assert out1 == run_alone(model, prompt1, 5)
    if chain is not None:  # a mismatched entry is dropped, its blocks freed
        assert engine.kept_chains() == {}
        assert engine.num_free_blocks == 20


def test_a_count_only_round_begins_with_its_kept_tokens(model):
    engine = TorchEngine(model, num_blocks=20)
    driver = Driver(engine)
    engine.add_request(EngineRequest("r0", 30, 4, chain_id="c", retain_kv="evictable"))
    context = engine.token_ids("r0")
    out0 = driver.finish("r0", 30)
    request1 = EngineRequest("r1", 41, 6, chain_id="c", num_cached_tokens=33)
    assert engine.add_request(request1) == 33
    prompt1 = engine.token_ids("r1")
    assert prompt1[:33] == context + out0[:3]
    assert driver.finish("r1", 41 - 33) == run_alone(model, prompt1, 6)


def test_attached_round_aborted_or_preempted(model):
    engine = TorchEngine(model, num_blocks=20)
    driver = Driver(engine)
    prompt0 = tokens(40, 35)
    _, out0 = driver.run(round_request("r0", prompt0, 4, retain="pinned"))
    prompt1 = prompt0 + out0 + tokens(41, 9)
    engine.add_request(round_request("r1", prompt1, 8, cached=38, retain="pinned"))
    assert engine.kv_blocks() == {"free": 17, "evictable": 0, "pinned": 0, "held": 3}
    report = driver.execute(Step({"r1": 4}))  # half of the new tokens
    assert report.ok
    engine.preempt("r1")  # its KV, attached and new, is dropped: recomputed from 0
    assert engine.num_free_blocks == 20
    out1 = driver.finish("r1", len(prompt1))
    assert out1 == run_alone(model, prompt1, 8)
    assert engine.kept_chains() == {"c": (len(prompt1) + 7, 4)}  # kept again (pinned)
    prompt2 = prompt1 + out1 + tokens(42, 3)
    engine.add_request(round_request("r2", prompt2, 3, cached=len(prompt1) + 7))
    driver.execute(Step({"r2": 2}))
    engine.abort("r2")  # aborted mid-round: the attached blocks go back
    assert engine.num_free_blocks == 20 and engine.kept_chains() == {}


def test_no_block_leaks_over_random_chains(model):
    """Random rounds of a few chains (pinned, evictable, dropped), claiming their kept KV or not
    (sometimes after it was evicted), with aborts mid-round, releases, superseded entries and
    evictions in a small pool: the kept entries are what a plain model of the rules says, every
    block has one owner after every step, and every block comes back at the end."""
    engine = TorchEngine(model, num_blocks=14)
    driver = Driver(engine)
    rng = random.Random(0)
    history: dict[str, list[int]] = {}  # chain -> the tokens its last finished round computed
    kept: dict[str, list[int]] = {}  # chain -> the tokens the engine should keep for it
    seen = dict.fromkeys(["attached", "missed", "evicted", "aborted", "superseded"], 0)
    for i in range(70):
        chain = rng.choice("abcd")
        context = history.get(chain, [])
        if len(context) > 100:  # start the chain over, so that rounds fit the pool
            context = []
        cached = len(context) if context and rng.random() < 0.8 else 0
        prompt = context + tokens(i, rng.randint(1, 30))
        retain = rng.choice(["pinned", "evictable", "evictable", "drop"])
        rid, begin = f"{chain}{i}", len(driver.reports)
        request = round_request(rid, prompt, rng.randint(1, 6), chain, retain, cached)
        num_cached = engine.add_request(request)
        if cached:
            expected = kept.pop(chain, None) == context
            assert num_cached == (cached if expected else 0)
            seen["attached" if num_cached else "missed"] += 1
        check_owners(engine)
        if rng.random() < 0.15:
            driver.execute(Step({rid: 1}))
            engine.abort(rid)
            seen["aborted"] += 1
        else:
            report = driver.execute(Step({rid: len(prompt) - num_cached}))
            if report.ok:
                out = report.new_token_ids[rid]
                if rid not in report.finished:
                    out += driver.finish(rid, 1)
                history[chain] = (prompt + out)[:-1]
                if retain != "drop":
                    seen["superseded"] += chain in kept
                    kept[chain] = history[chain]
            else:  # out of blocks (pinned entries hold them): the round ends unserved
                engine.abort(rid)
        for report in driver.reports[begin:]:
            seen["evicted"] += len(report.kv_evicted)
            for evicted in report.kv_evicted:
                del kept[evicted]
        if rng.random() < 0.1:
            engine.release_kv(chain)
            kept.pop(chain, None)
        assert {c: n for c, (n, _) in engine.kept_chains().items()} == {
            c: len(t) for c, t in kept.items()
        }
        check_owners(engine)
    assert all(seen.values()), seen  # every path was taken
    for chain in "abcd":
        engine.release_kv(chain)
    assert engine.kv_blocks() == {"free": 14, "evictable": 0, "pinned": 0, "held": 0}
