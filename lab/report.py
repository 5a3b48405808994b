"""The report of a serving run, computed from `RequestRecord`s only (simulator, daemon or HTTP bench
client alike), printed as vLLM's "Serving Benchmark Result" block plus SLO attainment, or as JSON.

Counting rules:
- An *item* is what an arrival rate counts: a single-call request, or a whole tool chain.
- A tool chain attains only if every one of its rounds was recorded, admitted and attained; the
  round count comes from the workload's chains (without a workload, from the rounds recorded).
- Items of the workload that have no record at all count as not attained.
- Latencies (TTFT, TPOT, ITL, E2EL) are per LLM call, like vLLM's; TPOT of a call is
  (last token - first token) / (output tokens - 1), ITL is every gap between consecutive tokens.
- Request throughput counts completed items, goodput attained items, both per second of run.
- Tool chains (docs/AGENTS.md): KV hit rate = prompt tokens of rounds >= 2 found cached (kept from
  the previous round) / all prompt tokens of rounds >= 2; tokens recomputed = context of rounds >= 2
  that the previous round had computed (its prompt and output but the last token) and that was
  prefilled again, not found cached; KV held in pauses = pinned KV block-seconds (the simulator's).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from formulations.deadlines import Attainment
from formulations.plan import Verdict
from lab.workloads.workload import Workload
from planner_svc.records import RequestRecord

WIDTH = 50  # vLLM's block width


@dataclass(frozen=True)
class LatencyStats:
    """Mean, median and 99th percentile in milliseconds; None when nothing was measured."""

    mean_ms: float | None
    median_ms: float | None
    p99_ms: float | None
    num_samples: int

    @classmethod
    def of_seconds(cls, values_s: Sequence[float]) -> LatencyStats:
        if not values_s:
            return cls(None, None, None, 0)
        ms = np.asarray(values_s, dtype=float) * 1e3
        return cls(float(ms.mean()), float(np.median(ms)), float(np.percentile(ms, 99)), len(ms))


@dataclass(frozen=True)
class ClassAttainment:
    slo_class: str
    num_items: int
    num_attained: int
    num_ttft_ok: int
    num_tpot_ok: int
    num_calls: int = 0  # LLM calls of the class (a tool chain's rounds count one each)
    num_calls_attained: int = 0
    num_preemptions: int = 0

    @property
    def attainment(self) -> float:
        return self.num_attained / self.num_items if self.num_items else 0.0

    @property
    def call_attainment(self) -> float:
        return self.num_calls_attained / self.num_calls if self.num_calls else 0.0


@dataclass(frozen=True)
class ItemOutcome:
    """One request or one whole tool chain."""

    item_id: str
    slo_class: str
    attainment: Attainment
    completed: bool


@dataclass(frozen=True)
class RunReport:
    name: str
    duration_s: float
    num_items: int
    num_completed_items: int
    num_attained: int
    num_ttft_ok: int
    num_tpot_ok: int
    num_calls: int  # LLM calls recorded (tool rounds count one each)
    num_calls_attained: int  # calls that attained on their own (a tool round counts alone)
    total_input_tokens: int
    total_output_tokens: int
    ttft: LatencyStats
    tpot: LatencyStats
    itl: LatencyStats
    e2el: LatencyStats
    num_admitted: int
    num_rejected: int
    num_best_effort: int
    num_undecided: int
    num_dropped: int
    num_preemptions: int
    per_class: tuple[ClassAttainment, ...] = field(default_factory=tuple)
    num_later_round_prompt_tokens: int = 0  # prompt tokens of tool rounds >= 2
    num_later_round_cached_tokens: int = 0  # of which cached from the previous round
    num_recomputed_tokens: int = 0  # context of rounds >= 2 computed before and again
    kv_pinned_block_s: float = 0.0  # KV pinned over tool pauses, block-seconds

    @property
    def kv_hit_rate(self) -> float | None:
        """Cached prompt tokens / prompt tokens of rounds >= 2 (None: no such round)."""
        if not self.num_later_round_prompt_tokens:
            return None
        return self.num_later_round_cached_tokens / self.num_later_round_prompt_tokens

    @property
    def recompute_share(self) -> float | None:
        """Recomputed context / prompt tokens of rounds >= 2 (None: no such round)."""
        if not self.num_later_round_prompt_tokens:
            return None
        return self.num_recomputed_tokens / self.num_later_round_prompt_tokens

    @property
    def attainment(self) -> float:
        return self.num_attained / self.num_items if self.num_items else 0.0

    @property
    def request_throughput_rps(self) -> float:
        return self._per_second(self.num_completed_items)

    @property
    def goodput_rps(self) -> float:
        return self._per_second(self.num_attained)

    @property
    def output_throughput_tps(self) -> float:
        return self._per_second(self.total_output_tokens)

    @property
    def total_throughput_tps(self) -> float:
        return self._per_second(self.total_input_tokens + self.total_output_tokens)

    def _per_second(self, count: float) -> float:
        return count / self.duration_s if self.duration_s > 0 else 0.0

    def to_dict(self) -> dict:
        data = asdict(self)
        data["per_class"] = [
            {**asdict(c), "attainment": c.attainment, "call_attainment": c.call_attainment}
            for c in self.per_class
        ]
        for key in (
            "kv_hit_rate",
            "recompute_share",
            "attainment",
            "request_throughput_rps",
            "goodput_rps",
            "output_throughput_tps",
            "total_throughput_tps",
        ):
            data[key] = getattr(self, key)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def format_text(self) -> str:
        return format_report(self)


# ---- building ------------------------------------------------------------------------------


def build_report(
    records: Iterable[RequestRecord],
    workload: Workload | None = None,
    duration_s: float | None = None,
    name: str | None = None,
    kv_pinned_block_s: float = 0.0,
) -> RunReport:
    """Summarise a run. `duration_s` defaults to first arrival .. last token;
    `kv_pinned_block_s`: the KV pinned over tool pauses (the simulator's `SimResult`)."""
    records = list(records)
    outcomes = item_outcomes(records, workload)
    if duration_s is None:
        duration_s = _observed_duration_s(records)
    calls = [r for r in records if r.token_times_s]
    finished = [r for r in calls if len(r.token_times_s) >= r.request.num_output_tokens]
    verdicts = [r.verdict for r in records]
    later = [r for r in records if r.request.round_index > 0]
    return RunReport(
        name=name or (workload.name if workload else "run"),
        duration_s=duration_s,
        num_items=len(outcomes),
        num_completed_items=sum(o.completed for o in outcomes),
        num_attained=sum(o.attainment.ok for o in outcomes),
        num_ttft_ok=sum(o.attainment.ttft_ok for o in outcomes),
        num_tpot_ok=sum(o.attainment.tpot_ok for o in outcomes),
        num_calls=len(records),
        num_calls_attained=sum(r.attainment.ok for r in records),
        total_input_tokens=sum(r.request.num_prompt_tokens for r in finished),
        total_output_tokens=sum(len(r.token_times_s) for r in calls),
        ttft=LatencyStats.of_seconds([r.token_times_s[0] - r.request.arrival_s for r in calls]),
        tpot=LatencyStats.of_seconds([_tpot_s(r) for r in finished if len(r.token_times_s) > 1]),
        itl=LatencyStats.of_seconds([g for r in calls for g in np.diff(r.token_times_s).tolist()]),
        e2el=LatencyStats.of_seconds([r.token_times_s[-1] - r.request.arrival_s for r in finished]),
        num_admitted=verdicts.count(Verdict.ADMITTED),
        num_rejected=verdicts.count(Verdict.REJECTED),
        num_best_effort=verdicts.count(Verdict.BEST_EFFORT),
        num_undecided=verdicts.count(None),
        num_dropped=workload.num_dropped if workload else 0,
        num_preemptions=sum(r.num_preemptions for r in records),
        per_class=_per_class(outcomes, records),
        num_later_round_prompt_tokens=sum(r.request.num_prompt_tokens for r in later),
        num_later_round_cached_tokens=sum(r.num_cached_tokens for r in later),
        num_recomputed_tokens=_recomputed_tokens(records),
        kv_pinned_block_s=kv_pinned_block_s,
    )


def item_outcomes(records: Sequence[RequestRecord], workload: Workload | None) -> list[ItemOutcome]:
    """Outcome per item: single requests as they are, tool-chain rounds grouped by chain."""
    outcomes: dict[str, ItemOutcome] = {}
    rounds: dict[str, list[RequestRecord]] = defaultdict(list)
    for record in records:
        chain_id = record.request.chain_id
        if chain_id is None:
            outcomes[record.request.request_id] = ItemOutcome(
                record.request.request_id,
                record.request.slo_class,
                record.attainment,
                _is_complete(record),
            )
        else:
            rounds[chain_id].append(record)
    expected_rounds = {c.chain_id: c.num_rounds for c in workload.chains} if workload else {}
    chain_classes = {c.chain_id: c.slo_class for c in workload.chains} if workload else {}
    for chain_id, chain_records in rounds.items():
        num_rounds = expected_rounds.get(
            chain_id, 1 + max(r.request.round_index for r in chain_records)
        )
        slo_class = chain_classes.get(chain_id, chain_records[0].request.slo_class)
        outcomes[chain_id] = _chain_outcome(chain_id, slo_class, chain_records, num_rounds)
    if workload is not None:
        for request in workload.requests:
            outcomes.setdefault(request.request_id, _missing(request.request_id, request.slo_class))
        for chain in workload.chains:
            outcomes.setdefault(chain.chain_id, _missing(chain.chain_id, chain.slo_class))
    return list(outcomes.values())


def _chain_outcome(
    chain_id: str, slo_class: str, records: Sequence[RequestRecord], num_rounds: int
) -> ItemOutcome:
    by_round = {r.request.round_index: r for r in records}
    if set(by_round) != set(range(num_rounds)):  # a round never arrived (or an unknown one did)
        return ItemOutcome(chain_id, slo_class, Attainment(False, False), completed=False)
    attainments = [r.attainment for r in by_round.values()]
    return ItemOutcome(
        chain_id,
        slo_class,
        Attainment(all(a.ttft_ok for a in attainments), all(a.tpot_ok for a in attainments)),
        completed=all(_is_complete(r) for r in by_round.values()),
    )


def _recomputed_tokens(records: Sequence[RequestRecord]) -> int:
    """Context of rounds >= 2 that their previous round had computed (prompt and output but the
    last token, which is never cached) and that was not found cached."""
    by_round = {
        (r.request.chain_id, r.request.round_index): r
        for r in records
        if r.request.chain_id is not None
    }
    total = 0
    for (chain_id, k), record in by_round.items():
        previous = by_round.get((chain_id, k - 1))
        if k == 0 or previous is None:
            continue
        computed = previous.request.num_prompt_tokens + len(previous.token_times_s) - 1
        total += max(0, min(computed, record.request.num_prompt_tokens) - record.num_cached_tokens)
    return total


def _missing(item_id: str, slo_class: str) -> ItemOutcome:
    return ItemOutcome(item_id, slo_class, Attainment(False, False), completed=False)


def _is_complete(record: RequestRecord) -> bool:
    return len(record.token_times_s) >= record.request.num_output_tokens


def _tpot_s(record: RequestRecord) -> float:
    times = record.token_times_s
    return (times[-1] - times[0]) / (len(times) - 1)


def _observed_duration_s(records: Sequence[RequestRecord]) -> float:
    if not records:
        return 0.0
    start_s = min(r.request.arrival_s for r in records)
    end_s = max((r.token_times_s[-1] for r in records if r.token_times_s), default=start_s)
    return end_s - start_s


def _per_class(
    outcomes: Sequence[ItemOutcome], records: Sequence[RequestRecord]
) -> tuple[ClassAttainment, ...]:
    groups: dict[str, list[ItemOutcome]] = defaultdict(list)
    for outcome in outcomes:
        groups[outcome.slo_class].append(outcome)
    calls: dict[str, list[RequestRecord]] = defaultdict(list)
    for record in records:
        calls[record.request.slo_class].append(record)
    return tuple(
        ClassAttainment(
            slo_class,
            len(group),
            sum(o.attainment.ok for o in group),
            sum(o.attainment.ttft_ok for o in group),
            sum(o.attainment.tpot_ok for o in group),
            len(calls[slo_class]),
            sum(r.attainment.ok for r in calls[slo_class]),
            sum(r.num_preemptions for r in calls[slo_class]),
        )
        for slo_class, group in sorted(groups.items())
    )


# ---- printing ------------------------------------------------------------------------------


def _title(text: str, fill: str) -> str:
    return f"{text:{fill}^{WIDTH}}"


def _row(label: str, value: object) -> str:
    if value is None:
        return f"{label:<40} {'n/a':<10}"
    if isinstance(value, float):
        return f"{label:<40} {value:<10.2f}"
    return f"{label:<40} {value!s:<10}"


def _latency_rows(title: str, short: str, stats: LatencyStats) -> list[str]:
    return [
        _title(title, "-"),
        _row(f"Mean {short} (ms):", stats.mean_ms),
        _row(f"Median {short} (ms):", stats.median_ms),
        _row(f"P99 {short} (ms):", stats.p99_ms),
    ]


def _percent(count: int, total: int) -> float:
    return 100.0 * count / total if total else 0.0


def _chain_rows(report: RunReport) -> list[str]:
    """KV reuse across tool pauses, when the run had rounds >= 2."""
    hit_rate = report.kv_hit_rate
    if hit_rate is None:
        return []
    return [
        _title("Tool chains: KV across pauses", "-"),
        _row("KV hit rate, rounds >= 2 (%):", 100.0 * hit_rate),
        _row("Context tokens recomputed, rounds >= 2:", report.num_recomputed_tokens),
        _row("KV held in pauses (block-s):", report.kv_pinned_block_s),
    ]


def format_report(report: RunReport) -> str:
    """vLLM's "Serving Benchmark Result" block (same labels), then SLO attainment per class."""
    lines = [
        _title(" Serving Benchmark Result ", "="),
        _row("Successful requests:", report.num_completed_items),
        _row("Benchmark duration (s):", report.duration_s),
        _row("Total input tokens:", report.total_input_tokens),
        _row("Total generated tokens:", report.total_output_tokens),
        _row("Request throughput (req/s):", report.request_throughput_rps),
        _row("Request goodput (req/s):", report.goodput_rps),
        _row("Output token throughput (tok/s):", report.output_throughput_tps),
        _row("Total Token throughput (tok/s):", report.total_throughput_tps),
        *_latency_rows("Time to First Token", "TTFT", report.ttft),
        *_latency_rows("Time per Output Token (excl. 1st token)", "TPOT", report.tpot),
        *_latency_rows("Inter-token Latency", "ITL", report.itl),
        *_latency_rows("End-to-end Latency", "E2EL", report.e2el),
        _title("SLO Attainment", "-"),
        _row("Requests (a tool chain counts once):", report.num_items),
        _row("SLO attainment (%):", _percent(report.num_attained, report.num_items)),
        _row("TTFT attainment (%):", _percent(report.num_ttft_ok, report.num_items)),
        _row("TPOT attainment (%):", _percent(report.num_tpot_ok, report.num_items)),
        _row("LLM calls (tool rounds count each):", report.num_calls),
        _row("Call SLO attainment (%):", _percent(report.num_calls_attained, report.num_calls)),
        _row("Admitted calls:", report.num_admitted),
        _row("Rejected calls:", report.num_rejected),
        _row("Best-effort calls:", report.num_best_effort),
        _row("Undecided calls:", report.num_undecided),
        _row("Dropped (longer than the context):", report.num_dropped),
        _row("Preemptions:", report.num_preemptions),
        *_chain_rows(report),
        _title("Attainment per SLO class", "-"),
        f"{'class':<14}{'items':>7}{'attained':>9}{'SLO %':>7}{'TTFT %':>8}{'TPOT %':>8}"
        f"{'calls':>7}{'call %':>8}{'preempt':>8}",
    ]
    for c in report.per_class:
        lines.append(
            f"{c.slo_class:<14}{c.num_items:>7}{c.num_attained:>9}"
            f"{_percent(c.num_attained, c.num_items):>7.1f}"
            f"{_percent(c.num_ttft_ok, c.num_items):>8.1f}"
            f"{_percent(c.num_tpot_ok, c.num_items):>8.1f}"
            f"{c.num_calls:>7}{_percent(c.num_calls_attained, c.num_calls):>8.1f}"
            f"{c.num_preemptions:>8}"
        )
    lines.append("=" * WIDTH)
    return "\n".join(lines)
