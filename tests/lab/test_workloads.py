"""Workloads: arrival processes, trace windows and filtering, the six scenarios, user traces."""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest

from formulations.perf_model import perf_model_preset
from formulations.slo import slo_preset
from lab.workloads import (
    SCENARIO_NAMES,
    BurstParams,
    ReasoningParams,
    ToolAgentParams,
    TraceWindow,
    WorkloadOptions,
    build_workload,
    trace_workload,
)
from lab.workloads.arrivals import bursty_arrivals, poisson_arrivals, rescale_timestamps
from lab.workloads.reasoning import sample_reasoning
from lab.workloads.tool_agent import chain_total_tokens
from lab.workloads.trace import load_trace
from lab.workloads.user_trace import TraceFormatError, read_user_trace

PERF = perf_model_preset("opt-13b-2xa100")


# ---- arrivals ------------------------------------------------------------------------------


def test_poisson_mean_rate_and_exponential_gaps():
    arrivals = poisson_arrivals(4.0, 20_000, np.random.default_rng(1))
    gaps = np.diff(arrivals)
    assert arrivals[0] == 0.0 and np.all(gaps >= 0)
    assert np.mean(gaps) == pytest.approx(0.25, rel=0.03)
    # Exponential: the standard deviation equals the mean.
    assert np.std(gaps) == pytest.approx(0.25, rel=0.05)


def test_bursty_keeps_mean_rate_with_geometric_bursts():
    params = BurstParams(mean_burst_size=5.0)
    arrivals = bursty_arrivals(2.0, 20_000, np.random.default_rng(2), params)
    assert len(arrivals) == 20_000 and np.all(np.diff(arrivals) >= 0)
    rate = (len(arrivals) - 1) / (arrivals[-1] - arrivals[0])
    assert rate == pytest.approx(2.0, rel=0.06)
    burst_sizes = list(collections.Counter(arrivals.tolist()).values())
    assert np.mean(burst_sizes) == pytest.approx(5.0, rel=0.06)


def test_rescale_sets_rate_and_keeps_gap_shape():
    times = [10.0, 11.0, 11.5, 14.0, 20.0]
    scaled = rescale_timestamps(times, 2.0)
    assert scaled[0] == 0.0
    assert (len(times) - 1) / scaled[-1] == pytest.approx(2.0)
    assert np.allclose(np.diff(scaled) / np.diff(times), np.diff(scaled)[0] / 1.0)


@pytest.mark.parametrize("rate", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_rates_are_rejected(rate):
    with pytest.raises(ValueError, match="rate"):
        poisson_arrivals(rate, 3, np.random.default_rng(0))
    with pytest.raises(ValueError, match="rate"):
        WorkloadOptions(rate_rps=rate)


# ---- scenarios -----------------------------------------------------------------------------

EXPECTED_CLASSES = {
    "chatbot": {"chatbot"},
    "coder": {"coder"},
    "summarizer": {"summarizer"},
    "reasoning": {"reasoning"},
    "tool_agent": set(),
    "multi_turn_chat": set(),
    "mixed": {"chatbot", "coder", "summarizer", "reasoning"},
}


@pytest.mark.parametrize("name", SCENARIO_NAMES)
def test_every_scenario_builds_deterministically(name):
    options = WorkloadOptions(rate_rps=3.0, num_requests=50, seed=7)
    first = build_workload(name, PERF, options)
    again = build_workload(name, PERF, options)
    other_seed = build_workload(name, PERF, WorkloadOptions(rate_rps=3.0, num_requests=50, seed=8))
    assert first == again
    assert first.num_items == 50
    assert {r.slo_class for r in first.requests} == EXPECTED_CLASSES[name]
    arrivals = [r.arrival_s for r in first.requests]
    assert arrivals == sorted(arrivals)
    ids = [r.request_id for r in first.requests] + [c.chain_id for c in first.chains]
    assert len(set(ids)) == len(ids)
    if name in ("summarizer", "reasoning", "tool_agent", "multi_turn_chat", "mixed"):  # seeded
        assert first != other_seed


def test_scenario_rate_matches_target():
    for name in ("chatbot", "coder", "summarizer", "tool_agent"):
        workload = build_workload(name, PERF, WorkloadOptions(rate_rps=5.0, num_requests=2000))
        rate = (workload.num_items - 1) / workload.duration_s
        assert rate == pytest.approx(5.0, rel=0.08), name


def test_ttft_target_is_resolved_with_the_perf_model():
    workload = build_workload("summarizer", PERF, WorkloadOptions(rate_rps=1.0, num_requests=5))
    for request in workload.requests:
        expected = 3.0 * PERF.prefill_time_s(request.num_prompt_tokens)
        assert request.ttft_slo_s == pytest.approx(expected)
        assert request.slo == slo_preset("summarizer")


def test_trace_window_and_timestamps_follow_the_trace():
    rows = load_trace("azure_conv_2023")
    options = WorkloadOptions(rate_rps=1.0, num_requests=20, start_index=100, max_model_len=1 << 20)
    workload = build_workload("chatbot", PERF, options)
    assert workload.num_dropped == 0
    window = rows[100:120]
    assert [r.num_prompt_tokens for r in workload.requests] == [w.num_prompt_tokens for w in window]
    expected = rescale_timestamps([w.arrival_s for w in window], 1.0)
    assert np.allclose([r.arrival_s for r in workload.requests], expected)


def test_coder_window_skips_the_opening_silence():
    rows = load_trace("azure_code_2023")
    assert rows[63].arrival_s - rows[62].arrival_s > 100  # the idle gap the default skips
    default = build_workload(
        "coder", PERF, WorkloadOptions(rate_rps=1.0, num_requests=5, max_model_len=1 << 20)
    )
    assert [r.num_prompt_tokens for r in default.requests] == [
        r.num_prompt_tokens for r in rows[63:68]
    ]
    from_zero = build_workload(
        "coder",
        PERF,
        WorkloadOptions(rate_rps=1.0, num_requests=5, start_index=0, max_model_len=1 << 20),
    )
    assert from_zero.requests[0].num_prompt_tokens == rows[0].num_prompt_tokens


def test_context_filter_drops_and_counts_long_sequences():
    max_model_len, spec = 2048, 4
    options = WorkloadOptions(
        rate_rps=1.0, num_requests=300, max_model_len=max_model_len, max_spec_tokens=spec
    )
    workload = build_workload("coder", PERF, options)
    assert workload.num_items == 300
    assert all(r.max_num_tokens <= max_model_len - spec for r in workload.requests)
    # Independent count: scan the trace from the default start until 300 rows fit.
    kept = dropped = 0
    for row in load_trace("azure_code_2023")[63:]:
        if kept == 300:
            break
        if row.num_prompt_tokens + row.num_output_tokens > max_model_len - spec:
            dropped += 1
        else:
            kept += 1
    assert workload.num_dropped == dropped > 0


def test_synthetic_context_filter_counts_drops():
    options = WorkloadOptions(rate_rps=1.0, num_requests=100, max_model_len=2500)
    workload = build_workload("tool_agent", PERF, options)
    assert all(chain_total_tokens(c) <= 2500 for c in workload.chains)
    assert workload.num_dropped > 0
    reasoning = build_workload("reasoning", PERF, options)
    assert reasoning.num_dropped > 0 and reasoning.num_items == 100


def test_duration_cut_keeps_arrivals_inside():
    options = WorkloadOptions(rate_rps=4.0, num_requests=None, duration_s=30.0)
    workload = build_workload("summarizer", PERF, options)
    assert all(r.arrival_s <= 30.0 for r in workload.requests)
    assert 80 <= workload.num_items <= 160


def test_mixed_is_an_even_mix_of_the_five():
    workload = build_workload("mixed", PERF, WorkloadOptions(rate_rps=5.0, num_requests=103))
    counts = collections.Counter(r.slo_class for r in workload.requests)
    counts["tool_agent"] = len(workload.chains)
    assert sorted(counts.values()) == [20, 20, 21, 21, 21]
    assert workload.num_items == 103


def test_reasoning_shape():
    samples = sample_reasoning(5000, np.random.default_rng(0), ReasoningParams())
    prompts = np.array([s.num_prompt_tokens for s in samples])
    thinking = np.array([s.num_thinking_tokens for s in samples])
    answers = np.array([s.num_answer_tokens for s in samples])
    assert 100 <= np.median(prompts) <= 1000
    assert 1500 <= np.median(thinking) <= 4000
    assert np.percentile(thinking, 99) > 2 * np.median(thinking)  # the long tail
    assert 100 <= np.median(answers) <= 1000
    workload = build_workload("reasoning", PERF, WorkloadOptions(rate_rps=1.0, num_requests=20))
    for request in workload.requests:
        assert 0 < request.num_thinking_tokens < request.num_output_tokens


def test_tool_agent_shape():
    params = ToolAgentParams()
    workload = build_workload("tool_agent", PERF, WorkloadOptions(rate_rps=1.0, num_requests=300))
    rounds = collections.Counter(c.num_rounds for c in workload.chains)
    assert set(rounds) == {2, 3, 4, 5}
    for chain in workload.chains:
        first, *later = chain.rounds
        assert params.min_first_prompt_tokens <= first.num_new_prompt_tokens <= 2000
        assert all(0.5 <= r.tool_delay_s <= 2.0 for r in later)
        assert all(20 <= r.num_output_tokens <= 150 for r in chain.rounds)
        assert chain.round_prompt_tokens(1) > first.num_new_prompt_tokens + first.num_output_tokens


def test_unknown_scenario_and_arrival_process():
    with pytest.raises(ValueError, match="unknown scenario 'nope'"):
        build_workload("nope", PERF, WorkloadOptions(rate_rps=1.0))
    with pytest.raises(ValueError, match="unknown arrival process"):
        WorkloadOptions(rate_rps=1.0, arrivals="weird")
    with pytest.raises(ValueError, match="no timestamps"):
        build_workload("summarizer", PERF, WorkloadOptions(rate_rps=1.0, arrivals="trace"))


def test_bursty_override_makes_simultaneous_arrivals():
    options = WorkloadOptions(rate_rps=2.0, num_requests=200, arrivals="bursty")
    workload = build_workload("summarizer", PERF, options)
    arrivals = [r.arrival_s for r in workload.requests]
    assert len(set(arrivals)) < len(arrivals)


# ---- user traces ---------------------------------------------------------------------------


def test_user_trace_csv_and_jsonl(tmp_path):
    csv_path = tmp_path / "t.csv"
    csv_path.write_text(
        "arrival_s,prompt_tokens,output_tokens,slo_class,thinking_tokens\n"
        "2.0,100,20,chatbot,\n"
        "0.5,50,300,reasoning,200\n"
        "1.0,9000,20,coder,\n"
    )
    workload = trace_workload(str(csv_path), PERF, max_model_len=8192)
    assert workload.num_dropped == 1
    assert [r.arrival_s for r in workload.requests] == [0.0, 1.5]
    assert workload.requests[0].num_thinking_tokens == 200

    jsonl_path = tmp_path / "t.jsonl"
    lines = [
        {"arrival_s": 0.0, "prompt_tokens": 100, "output_tokens": 10, "slo_class": "coder"},
        {
            "arrival_s": 1.0,
            "rounds": [
                {"prompt_tokens": 1500, "output_tokens": 40},
                {"prompt_tokens": 300, "output_tokens": 90, "tool_delay_s": 1.2},
            ],
        },
        {"arrival_s": 3.0, "prompt_tokens": 100, "output_tokens": 10, "slo_class": "chatbot"},
    ]
    jsonl_path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    workload = trace_workload(str(jsonl_path), PERF, rate_rps=2.0)
    assert workload.num_items == 3 and len(workload.chains) == 1
    chain = workload.chains[0]
    assert chain.rounds[1].tool_delay_s == 1.2 and chain.arrival_s == pytest.approx(1.0 / 3.0)
    assert workload.requests[-1].arrival_s == pytest.approx(1.0)  # 3 items over 1 s = 2 req/s


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("arrival_s,prompt_tokens,output_tokens\n1,2,3\n", ":1: missing column(s) slo_class"),
        (
            "arrival_s,prompt_tokens,output_tokens,slo_class\n0,10,5,chatbot\n0,ten,5,chatbot\n",
            ":3: prompt_tokens must be an integer",
        ),
        (
            "arrival_s,prompt_tokens,output_tokens,slo_class\n-1,10,5,chatbot\n",
            ":2: arrival_s must be a non-negative number",
        ),
        ("arrival_s,prompt_tokens,output_tokens,slo_class\n0,10,5,gold\n", ":2: unknown slo_class"),
        (
            "arrival_s,prompt_tokens,output_tokens,slo_class\n0,10,0,chatbot\n",
            ":2: output_tokens must be an integer >= 1",
        ),
        (
            "arrival_s,prompt_tokens,output_tokens,slo_class,thinking_tokens\n0,10,5,reasoning,9\n",
            ":2: thinking_tokens exceeds output_tokens",
        ),
        (
            "arrival_s,prompt_tokens,output_tokens,slo_class\n0,10,5,chatbot,extra\n",
            ":2: more fields than columns",
        ),
    ],
)
def test_malformed_csv_names_file_and_line(tmp_path, text, problem):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(TraceFormatError) as info:
        read_user_trace(path)
    assert str(path) in str(info.value) and problem in str(info.value)


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("{not json", ":2: not valid JSON"),
        ("[1, 2]", ":2: expected a JSON object"),
        ('{"arrival_s": 0, "rounds": []}', ":2: rounds must be a non-empty list"),
        (
            '{"arrival_s": 0, "rounds": [{"prompt_tokens": 5}]}',
            ":2: round 1: missing output_tokens",
        ),
    ],
)
def test_malformed_jsonl_names_file_and_line(tmp_path, line, problem):
    path = tmp_path / "bad.jsonl"
    good = '{"arrival_s": 0, "prompt_tokens": 1, "output_tokens": 1, "slo_class": "chatbot"}'
    path.write_text(good + "\n" + line + "\n")
    with pytest.raises(TraceFormatError) as info:
        read_user_trace(path)
    assert problem in str(info.value) and str(path) in str(info.value)


def test_missing_trace_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_user_trace(tmp_path / "absent.csv")


def test_window_past_the_end():
    with pytest.raises(ValueError, match="past the trace"):
        build_workload("chatbot", PERF, WorkloadOptions(rate_rps=1.0, start_index=10**6))
    with pytest.raises(ValueError, match="num_requests"):
        TraceWindow(num_requests=0)
