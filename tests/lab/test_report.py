"""The run report: attainment (with tool chains counted once), latency statistics, printing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from formulations.plan import Verdict
from formulations.request import Request, ToolChain, ToolRound
from formulations.slo import SLO
from lab.report import build_report, format_report
from lab.workloads.workload import Workload
from planner_svc.records import RequestRecord
from tests.factories import SIMPLE_MODEL

SLO_1S = SLO(ttft_s=1.0, tpot_s=0.1)


def make_request(rid, arrival_s=0.0, num_output=3, slo_class="chatbot", chain_id=None, k=0):
    return Request(
        rid,
        arrival_s,
        100,
        num_output,
        SLO_1S,
        1.0,
        slo_class=slo_class,
        chain_id=chain_id,
        round_index=k,
    )


def record(request, times, verdict=Verdict.ADMITTED, preemptions=0):
    return RequestRecord(
        request,
        verdict,
        0,
        list(times),
        num_preemptions=preemptions,
        finished=len(times) >= request.num_output_tokens,
    )


def test_single_requests_attainment_and_latency():
    good = record(make_request("a"), [0.5, 0.6, 0.7])
    late_first = record(make_request("b", 1.0, slo_class="coder"), [3.0, 3.1, 3.2])
    slow_decode = record(make_request("c", 2.0), [2.5, 3.0, 3.5], preemptions=2)
    rejected = record(make_request("d", 3.0), [], Verdict.REJECTED)
    never = make_request("e", 4.0)  # in the workload, never recorded
    workload = Workload(
        "w",
        (good.request, late_first.request, slow_decode.request, rejected.request, never),
        num_dropped=3,
    )
    report = build_report([good, late_first, slow_decode, rejected], workload, duration_s=10.0)

    assert report.num_items == 5 and report.num_attained == 1
    assert report.num_ttft_ok == 2  # good and slow_decode
    assert report.num_tpot_ok == 2  # good and late_first: a late first token moves the clock
    assert report.attainment == pytest.approx(0.2)
    assert report.num_completed_items == 3
    assert report.num_admitted == 3 and report.num_rejected == 1
    assert report.num_dropped == 3 and report.num_preemptions == 2
    assert report.goodput_rps == pytest.approx(0.1)
    assert report.request_throughput_rps == pytest.approx(0.3)
    assert report.total_output_tokens == 9 and report.total_input_tokens == 300

    ttfts = np.array([0.5, 2.0, 0.5]) * 1e3
    assert report.ttft.mean_ms == pytest.approx(ttfts.mean())
    assert report.ttft.median_ms == pytest.approx(np.median(ttfts))
    assert report.ttft.p99_ms == pytest.approx(np.percentile(ttfts, 99))
    assert report.tpot.mean_ms == pytest.approx((100 + 100 + 500) / 3)
    assert report.itl.median_ms == pytest.approx(100)
    assert report.itl.num_samples == 6
    assert report.e2el.mean_ms == pytest.approx((700 + 2200 + 1500) / 3)

    per_class = {c.slo_class: c for c in report.per_class}
    assert per_class["chatbot"].num_items == 4 and per_class["chatbot"].num_attained == 1
    assert per_class["coder"].num_items == 1 and per_class["coder"].attainment == 0.0


def chain(cid, num_rounds):
    rounds = tuple(ToolRound(100, 3, 0.5 if k else 0.0) for k in range(num_rounds))
    return ToolChain(cid, 0.0, rounds)


def test_tool_chain_counts_once_and_needs_every_round():
    full = chain("full", 2)
    partial = chain("partial", 3)
    one_miss = chain("miss", 2)
    records = [
        record(
            make_request("full#r0", 0.0, slo_class="tool_agent", chain_id="full"), [0.1, 0.2, 0.3]
        ),
        record(
            make_request("full#r1", 1.0, slo_class="tool_agent", chain_id="full", k=1),
            [1.1, 1.2, 1.3],
        ),
        # partial: only 2 of its 3 rounds ran (both fine)
        record(
            make_request("partial#r0", 0.0, slo_class="tool_agent", chain_id="partial"),
            [0.1, 0.2, 0.3],
        ),
        record(
            make_request("partial#r1", 1.0, slo_class="tool_agent", chain_id="partial", k=1),
            [1.1, 1.2, 1.3],
        ),
        # miss: round 1 was rejected
        record(
            make_request("miss#r0", 0.0, slo_class="tool_agent", chain_id="miss"), [0.1, 0.2, 0.3]
        ),
        record(
            make_request("miss#r1", 1.0, slo_class="tool_agent", chain_id="miss", k=1),
            [],
            Verdict.REJECTED,
        ),
    ]
    workload = Workload("agents", (), (full, partial, one_miss))
    report = build_report(records, workload, duration_s=2.0)
    assert report.num_items == 3 and report.num_attained == 1
    assert report.num_calls == 6
    assert report.num_completed_items == 1
    assert report.request_throughput_rps == pytest.approx(0.5)
    # Without the workload the expected round count falls back to the rounds recorded.
    assert build_report(records).num_attained == 2


def test_best_effort_does_not_attain():
    done = record(make_request("a"), [0.5, 0.6, 0.7], Verdict.BEST_EFFORT)
    report = build_report([done])
    assert report.num_attained == 0 and report.num_best_effort == 1
    assert report.num_completed_items == 1


def test_printed_block_has_vllm_labels_and_json_round_trips():
    records = [
        record(make_request("a"), [0.5, 0.6, 0.7]),
        record(make_request("b", slo_class="coder"), [], Verdict.REJECTED),
    ]
    report = build_report(records, duration_s=4.0)
    text = format_report(report)
    for label in (
        "============ Serving Benchmark Result ============",
        "Successful requests:",
        "Benchmark duration (s):",
        "Total input tokens:",
        "Total generated tokens:",
        "Request throughput (req/s):",
        "Request goodput (req/s):",
        "Output token throughput (tok/s):",
        "Total Token throughput (tok/s):",
        "---------------Time to First Token----------------",
        "Mean TTFT (ms):",
        "Median TTFT (ms):",
        "P99 TTFT (ms):",
        "-----Time per Output Token (excl. 1st token)------",
        "Mean TPOT (ms):",
        "---------------Inter-token Latency----------------",
        "Mean ITL (ms):",
        "----------------End-to-end Latency----------------",
        "P99 E2EL (ms):",
    ):
        assert label in text, label
    assert "Successful requests:                     1" in text
    coder_row = next(line for line in text.splitlines() if line.startswith("coder"))
    assert coder_row.split()[:6] == ["coder", "1", "0", "0.0", "0.0", "0.0"]
    assert coder_row.split()[6:] == ["1", "0.0", "0"]  # calls, call attainment, preemptions
    data = json.loads(report.to_json())
    assert data["attainment"] == 0.5 and data["num_rejected"] == 1
    assert data["ttft"]["mean_ms"] == pytest.approx(500.0)
    assert {c["slo_class"] for c in data["per_class"]} == {"chatbot", "coder"}


def test_empty_run_prints_without_numbers():
    report = build_report([])
    assert report.num_items == 0 and report.ttft.mean_ms is None
    assert "Mean TTFT (ms):                          n/a" in format_report(report)
    assert json.loads(report.to_json())["ttft"]["mean_ms"] is None


def test_tool_chain_kv_metrics():
    """KV hit rate over the prompts of rounds >= 2, the tokens recomputed, the pinned KV."""
    chain = ToolChain("c", 0.0, (ToolRound(100, 10), ToolRound(50, 5), ToolRound(40, 5)))
    records = []
    for k, cached in ((0, 0), (1, 109), (2, 0)):
        request = chain.round_request(k, float(k), SIMPLE_MODEL)
        times = [float(k)] * request.num_output_tokens
        records.append(RequestRecord(request, Verdict.ADMITTED, 0, times, num_cached_tokens=cached))
    report = build_report(records, kv_pinned_block_s=12.5)
    prompts = chain.round_prompt_tokens(1) + chain.round_prompt_tokens(2)
    assert report.kv_hit_rate == pytest.approx(109 / prompts)
    # Round 1 found round 0's 109 tokens cached; round 2 recomputed round 1's 50 + 5 - 1 more.
    assert report.num_recomputed_tokens == chain.round_prompt_tokens(1) + 5 - 1
    assert report.recompute_share == pytest.approx(report.num_recomputed_tokens / prompts)
    assert report.to_dict()["kv_hit_rate"] == report.kv_hit_rate
    assert "KV hit rate" in report.format_text() and "12.50" in report.format_text()
    assert build_report(records[:1]).kv_hit_rate is None  # no round >= 2
