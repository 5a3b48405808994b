"""What the planner daemon knows of each request it serves: who asked, the request as the planner
sees it (its SLO resolved, once, here), the tokens produced so far, and how it ended. The daemon
owns one `RequestBook`; it never touches sockets or the core.

Endings are judged once, when a request ends (`finish`), into running counts per SLO class; STATS
and the attainment gauge read those counts, so that the book need not keep every request:
- finished with all its tokens: attained when it met every SLO (RequestRecord.attainment);
- finished early at the engine (EOS, a stop): judged on the tokens it produced;
- rejected, or lost after admission: a miss;
- aborted by its client (a disconnect, a stop string cut at the front door, a client that went
  silent): a miss if a deadline had already passed unmet, else not counted either way (the client
  ended it, not the service) — only tallied as aborted.
Records of ended requests are kept for the last `max_ended_history` of them (for STATS queries of
recent requests and duplicate-id checks within that window), then forgotten: memory stays flat.
SLO classes that the config does not name are counted under one label, "custom", so that clients
cannot make the counters grow without bound.
"""

from __future__ import annotations

import dataclasses
import enum
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from formulations.deadlines import TOLERANCE, decode_offset_s
from formulations.perf_model import PerfModel
from formulations.plan import Verdict
from formulations.request import Request
from formulations.slo import SLO
from planner_svc.records import RequestRecord
from wire import protocol as P

CUSTOM_CLASS = "custom"  # the counting label of a class the config does not name
DEFAULT_MAX_ENDED_HISTORY = 10_000


class Judgement(enum.Enum):
    ATTAINED = "attained"
    MISSED = "missed"
    NOT_COUNTED = "not_counted"  # aborted by the client while on track


@dataclass(slots=True)
class Tracked:
    """A request being served: who asked and what happened (its record). Kept small: the book
    holds thousands of ended ones (neither the prompt nor the output ids are kept: the engine
    payload went to the core, the tokens to the client)."""

    client: bytes
    record: RequestRecord
    done: bool = False  # finished, rejected or aborted
    aborted: bool = False  # ended by its client

    @property
    def request(self) -> Request:
        return self.record.request

    @property
    def num_generated_tokens(self) -> int:
        return len(self.record.token_times_s)


@dataclass
class ClassCounts:
    """Running counts of one SLO class (label)."""

    num_requests: int = 0
    num_judged: int = 0  # ended and counted for attainment
    num_attained: int = 0
    num_aborted: int = 0  # ended by the client (judged only when a deadline was already missed)

    @property
    def attainment(self) -> float:
        return self.num_attained / self.num_judged if self.num_judged else 0.0


class RequestBook:
    def __init__(
        self,
        slo_classes: Mapping[str, SLO],
        perf_model: PerfModel,
        max_ended_history: int = DEFAULT_MAX_ENDED_HISTORY,
    ) -> None:
        if max_ended_history < 0:
            raise ValueError("max_ended_history must be >= 0")
        self.slo_classes = slo_classes
        self.perf_model = perf_model  # turns TTFT slowdowns into seconds
        self.max_ended_history = max_ended_history
        self.requests: dict[str, Tracked] = {}  # in flight, plus the latest ended ones
        self._ended: deque[str] = deque()  # ended ids still in `requests`, oldest first
        self.num_done = 0
        self.counts: dict[str, ClassCounts] = {}  # by class label
        self.counters: Counter[str] = Counter()  # requests, verdicts, finished (STATS counters)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self.requests

    def get(self, request_id: str) -> Tracked | None:
        return self.requests.get(request_id)

    @property
    def num_in_flight(self) -> int:
        return self.counters["num_requests"] - self.num_done

    def records(self) -> list[RequestRecord]:
        """The records still kept: every request in flight and the latest ended ones."""
        return [t.record for t in self.requests.values()]

    def class_label(self, slo_class: str) -> str:
        """The label `slo_class` is counted under (CUSTOM_CLASS when the config does not name
        it)."""
        return slo_class if slo_class in self.slo_classes else CUSTOM_CLASS

    def class_counts(self, slo_class: str) -> ClassCounts:
        return self.counts.setdefault(self.class_label(slo_class), ClassCounts())

    # ------------------------------------------------------------------ arrivals

    def add(self, submit: P.Submit, client: bytes, now_s: float) -> Tracked:
        """Register a SUBMIT that arrived at `now_s`. Raises ValueError for an unknown SLO class
        without explicit targets (the caller has checked the id is new)."""
        tracked = Tracked(client, RequestRecord(self._request(submit, now_s)))
        self.requests[submit.request_id] = tracked
        self.counters["num_requests"] += 1
        self.class_counts(submit.slo_class).num_requests += 1
        return tracked

    def _request(self, submit: P.Submit, now_s: float) -> Request:
        """The request as the planner sees it: `max_tokens` is its output cap (it may stop
        earlier); a reasoning request without a thinking budget may think until its cap, as far
        as the planner knows, until its engine reports the end of its thinking."""
        slo = resolve_slo(submit, self.slo_classes)
        num_prompt_tokens = submit.prompt_length
        thinking = submit.thinking_tokens
        if slo.thinking_tpot_s is not None and thinking == 0:
            thinking = submit.max_tokens
        return Request(
            request_id=submit.request_id,
            arrival_s=now_s,
            num_prompt_tokens=num_prompt_tokens,
            num_output_tokens=submit.max_tokens,
            slo=slo,
            ttft_slo_s=slo.ttft_budget_s(self.perf_model, num_prompt_tokens),
            slo_class=submit.slo_class,
            num_thinking_tokens=min(thinking, submit.max_tokens),
            value=submit.value,
            chain_id=submit.chain_id,
            round_index=submit.round_index,
            chain_last_round=submit.chain_last_round and submit.chain_id is not None,
            hint_output_tokens=submit.expected_output_tokens,
        )

    def count_verdict(self, verdict: Verdict) -> None:
        self.counters[f"num_{verdict.value}"] += 1

    # ------------------------------------------------------------------ engines

    def record_tokens(self, report: P.StepReport, now_s: float) -> list[tuple[Tracked, P.Tokens]]:
        """Record the output tokens of a step (stamped `now_s`) and return the TOKENS message
        each request's client gets. Requests already over are skipped."""
        finished = set(report.finished) if report.ok else set()
        messages = []
        for request_id, num_new in report.num_new_tokens.items():
            tracked = self.requests.get(request_id)
            if tracked is None or tracked.done or (num_new == 0 and request_id not in finished):
                continue
            token_ids = list(report.new_token_ids.get(request_id, ()))
            num_before = len(tracked.record.token_times_s)
            tracked.record.token_times_s.extend([now_s] * num_new)
            done = request_id in finished
            tracked.record.finished = done
            self._learn_lengths(tracked, report, num_before, done)
            messages.append(
                (
                    tracked,
                    P.Tokens(
                        request_id=request_id,
                        num_tokens=num_new,
                        token_ids=token_ids,
                        num_generated_tokens=tracked.num_generated_tokens,
                        finished=done,
                        planner_time_s=now_s,
                    ),
                )
            )
        return messages

    @staticmethod
    def _learn_lengths(tracked: Tracked, report: P.StepReport, num_before: int, done: bool) -> None:
        """The record's request as it turned out: its thinking length once the engine saw it
        end, its output length once it finished (before its cap: EOS or a stop)."""
        request = tracked.record.request
        num_in_step = report.thinking_ended.get(request.request_id)
        if num_in_step is not None:
            thinking = min(request.num_output_tokens, num_before + num_in_step)
            request = dataclasses.replace(request, num_thinking_tokens=thinking)
        if done:
            length = len(tracked.record.token_times_s)
            request = dataclasses.replace(
                request,
                num_output_tokens=length,
                num_thinking_tokens=min(request.num_thinking_tokens, length),
            )
        tracked.record.request = request

    # ------------------------------------------------------------------ endings

    def finish(self, tracked: Tracked, now_s: float, aborted: bool = False) -> Judgement | None:
        """Mark the request over (finished, rejected, lost, or `aborted` by its client) and
        judge it; None if it already was over."""
        if tracked.done:
            return None
        tracked.done = True
        tracked.aborted = aborted
        self.num_done += 1
        counts = self.class_counts(tracked.request.slo_class)
        judgement = judge(tracked.record, now_s, aborted)
        if aborted:
            counts.num_aborted += 1
            self.counters["num_aborted"] += 1
        if tracked.record.finished:
            self.counters["num_finished"] += 1
        if judgement is not Judgement.NOT_COUNTED:
            counts.num_judged += 1
            counts.num_attained += judgement is Judgement.ATTAINED
        self._remember_ended(tracked.request.request_id)
        return judgement

    def _remember_ended(self, request_id: str) -> None:
        self._ended.append(request_id)
        while len(self._ended) > self.max_ended_history:
            self.requests.pop(self._ended.popleft(), None)

    def stats(self, extra_counters: Mapping[str, float], num_engines: int) -> P.Stats:
        counters = {
            "num_requests": float(self.counters["num_requests"]),
            "num_admitted": float(self.counters["num_admitted"]),
            "num_rejected": float(self.counters["num_rejected"]),
            "num_best_effort": float(self.counters["num_best_effort"]),
            "num_finished": float(self.counters["num_finished"]),
            "num_aborted": float(self.counters["num_aborted"]),
            "num_in_flight": float(self.num_in_flight),
            "num_records_kept": float(len(self.requests)),
            **extra_counters,
        }
        return P.Stats(
            counters=counters,
            attainment_by_class={c: n.attainment for c, n in self.counts.items()},
            num_requests_by_class={c: n.num_requests for c, n in self.counts.items()},
            num_engines=num_engines,
        )


def judge(record: RequestRecord, now_s: float, aborted: bool) -> Judgement:
    """How an ended request counts for attainment (see the module docstring)."""
    admitted = record.verdict is Verdict.ADMITTED
    request, times = record.request, record.token_times_s
    if aborted:
        on_track = admitted and met_so_far(request, times, now_s)
        return Judgement.NOT_COUNTED if on_track else Judgement.MISSED
    if record.finished and times and len(times) < request.num_output_tokens:  # EOS or a stop
        return Judgement.ATTAINED if admitted and met_so_far(request, times) else Judgement.MISSED
    return Judgement.ATTAINED if record.attainment.ok else Judgement.MISSED


def met_so_far(
    request: Request, token_times_s: Sequence[float], now_s: float | None = None
) -> bool:
    """Did every token produced so far meet its deadline (with the attainment check's
    tolerance), and, when none was produced, had the TTFT deadline not yet passed at `now_s`?"""
    ttft_limit_s = (1 + TOLERANCE) * request.ttft_slo_s
    if not token_times_s:
        return now_s is not None and now_s - request.arrival_s <= ttft_limit_s
    first_s = token_times_s[0]
    if first_s - request.arrival_s > ttft_limit_s:
        return False
    start_s = max(request.ttft_deadline_s, first_s)
    produced_on_time = all(
        t - start_s <= (1 + TOLERANCE) * decode_offset_s(request, n)
        for n, t in enumerate(token_times_s, start=1)
    )
    if now_s is None or not produced_on_time:
        return produced_on_time
    next_n = len(token_times_s) + 1  # was the next token already overdue (a stall)?
    return now_s - start_s <= (1 + TOLERANCE) * decode_offset_s(request, next_n)


def resolve_slo(submit: P.Submit, slo_classes: Mapping[str, SLO]) -> SLO:
    """The SLO of a SUBMIT: its class's targets (`slo_targets` names another class whose targets
    apply, as tool rounds do), each overridden by an explicit target when one is given."""
    targets = submit.slo_targets or submit.slo_class
    base = slo_classes.get(targets)
    explicit = (submit.ttft_ms, submit.ttft_slowdown, submit.tpot_ms, submit.thinking_tpot_ms)
    if base is None and submit.tpot_ms is None:
        known = ", ".join(sorted(slo_classes))
        raise ValueError(
            f"unknown SLO class {targets!r} and no explicit tpot_ms (known classes: {known})"
        )
    if all(v is None for v in explicit):
        return base
    has_ttft = submit.ttft_ms is not None or submit.ttft_slowdown is not None
    if not has_ttft and base is None:
        raise ValueError(f"SLO class {targets!r} is unknown: give ttft_ms or ttft_slowdown too")
    return SLO(
        tpot_s=submit.tpot_ms / 1000 if submit.tpot_ms is not None else base.tpot_s,
        ttft_slowdown=submit.ttft_slowdown if has_ttft else base.ttft_slowdown,
        ttft_s=submit.ttft_ms / 1000
        if submit.ttft_ms is not None
        else (None if has_ttft else base.ttft_s),
        thinking_tpot_s=submit.thinking_tpot_ms / 1000
        if submit.thinking_tpot_ms is not None
        else (base.thinking_tpot_s if base is not None else None),
    )
