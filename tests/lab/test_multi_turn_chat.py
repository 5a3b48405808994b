"""The multi_turn_chat scenario (docs/AGENTS.md, "Multi-turn chat"): deterministic per seed, each
turn's prompt is the whole conversation so far plus the new message, turn lengths are rows of the
shipped conversation trace, contexts stay within the model's length, chatbot SLOs on every turn,
and it runs end to end in the simulator with chain attainment and KV hit rate reported."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from formulations.perf_model import perf_model_preset
from formulations.slo import slo_preset
from lab.experiment import Experiment
from lab.workloads import WorkloadOptions, build_workload
from lab.workloads.multi_turn_chat import MultiTurnChatParams, sample_conversation
from lab.workloads.tool_agent import chain_total_tokens
from lab.workloads.trace import load_trace

PERF = perf_model_preset("opt-13b-2xa100")
PARAMS = MultiTurnChatParams()
UNBOUNDED = 1 << 30  # a context no conversation reaches


def conversations(num, seed, max_total_tokens=UNBOUNDED, params=PARAMS):
    rng = np.random.default_rng(seed)
    return [sample_conversation(f"c{i}", 0.0, rng, params, max_total_tokens) for i in range(num)]


def test_the_generator_and_the_scenario_are_deterministic_per_seed():
    assert conversations(50, seed=3) == conversations(50, seed=3)
    assert conversations(50, seed=3) != conversations(50, seed=4)
    options = WorkloadOptions(rate_rps=0.5, num_requests=40, seed=5)
    workload = build_workload("multi_turn_chat", PERF, options)
    assert workload == build_workload("multi_turn_chat", PERF, options)
    assert workload != build_workload("multi_turn_chat", PERF, dataclasses.replace(options, seed=6))
    assert len(workload.chains) == 40 and not workload.requests


def test_each_turn_is_the_conversation_so_far_plus_a_trace_row():
    rows = {(r.num_prompt_tokens, r.num_output_tokens) for r in load_trace("azure_conv_2023")}
    for chain in conversations(300, seed=1):
        context = 0
        for k, turn in enumerate(chain.rounds):
            assert (turn.num_new_prompt_tokens, turn.num_output_tokens) in rows
            assert chain.round_prompt_tokens(k) == context + turn.num_new_prompt_tokens
            request = chain.round_request(k, 10.0 * k, PERF)
            assert request.num_prompt_tokens == context + turn.num_new_prompt_tokens
            assert request.slo == slo_preset("chatbot") and request.slo_class == "chatbot"
            assert (request.chain_id, request.round_index) == (chain.chain_id, k)
            context = request.num_prompt_tokens + turn.num_output_tokens
        assert chain_total_tokens(chain) == context


def test_turn_counts_and_think_times_follow_the_parameters():
    chains = conversations(4000, seed=2)
    turns = np.array([c.num_rounds for c in chains])
    # geometric with mean 4 capped at 12: E = (1 - 0.75**12) / 0.25
    assert turns.min() == 1 and turns.max() == PARAMS.max_turns
    assert turns.mean() == pytest.approx((1 - 0.75**12) / 0.25, rel=0.05)
    thinks = np.array([t.tool_delay_s for c in chains for t in c.rounds[1:]])
    assert all(c.rounds[0].tool_delay_s == 0.0 for c in chains)
    assert np.median(thinks) == pytest.approx(PARAMS.think_median_s, rel=0.1)
    assert thinks.max() <= PARAMS.max_think_s and thinks.min() > 0


def test_contexts_are_capped_at_the_model_length():
    capped = conversations(2000, seed=4, max_total_tokens=4000)
    free = conversations(2000, seed=4)
    over = [c for c in capped if chain_total_tokens(c) > 4000]
    assert all(c.num_rounds == 1 for c in over)  # only a first turn too long on its own
    assert max(chain_total_tokens(c) for c in free) > 4000  # the cap does cut conversations
    assert np.mean([c.num_rounds for c in capped]) < np.mean([c.num_rounds for c in free])
    # the scenario drops (and counts) the conversations whose first turn does not fit
    workload = build_workload(
        "multi_turn_chat", PERF, WorkloadOptions(rate_rps=1.0, num_requests=200, max_model_len=2000)
    )
    assert workload.num_dropped > 0
    assert all(chain_total_tokens(c) <= 2000 for c in workload.chains)


def test_bad_parameters_are_refused():
    for bad in (
        {"mean_turns": 0.5},
        {"max_turns": 0},
        {"think_median_s": 0.0},
        {"think_sigma": -1.0},
        {"trace": "sharegpt"},
        {"slo": "nope"},
    ):
        with pytest.raises(ValueError):
            MultiTurnChatParams(**bad)


@pytest.mark.parametrize("formulation", ["slos_dp", "vllm_fcfs"])
def test_runs_end_to_end_with_chain_attainment_and_kv_hit_rate(formulation):
    report, result = Experiment(scenario="multi_turn_chat", num_requests=30).run(formulation, 0.3)
    assert report.num_items == 30 and report.num_calls > 30  # conversations of several turns
    assert report.attainment > 0.8 and report.num_calls_attained / report.num_calls > 0.8
    # everything but each turn's new message is the previous turn's context: found cached
    assert 0.5 < report.kv_hit_rate < 1.0 and report.recompute_share < 0.05
    assert "KV hit rate" in report.format_text()
    assert all(r.finished for r in result.records)
