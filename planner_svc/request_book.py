"""What the planner daemon knows of each request it serves: who asked, the request as the planner
sees it (its SLO resolved, once, here), the tokens produced so far, and how it
ended. The daemon owns one `RequestBook`; it never touches sockets or the core.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from formulations.perf_model import PerfModel
from formulations.plan import Verdict
from formulations.request import Request
from formulations.slo import SLO
from planner_svc.records import RequestRecord
from wire import protocol as P


@dataclass
class Tracked:
    """A request being served: who asked, what the engine needs, what happened."""

    submit: P.Submit
    client: bytes
    record: RequestRecord
    generated_token_ids: list[int] = field(default_factory=list)
    done: bool = False  # finished, rejected or aborted

    @property
    def request(self) -> Request:
        return self.record.request

    @property
    def num_generated_tokens(self) -> int:
        return len(self.record.token_times_s)


class RequestBook:
    def __init__(self, slo_classes: Mapping[str, SLO], perf_model: PerfModel) -> None:
        self.slo_classes = slo_classes
        self.perf_model = perf_model  # turns TTFT slowdowns into seconds
        self.requests: dict[str, Tracked] = {}
        self.num_done = 0
        self.num_done_by_class: Counter[str] = Counter()
        self.num_attained_by_class: Counter[str] = Counter()

    def __contains__(self, request_id: str) -> bool:
        return request_id in self.requests

    def get(self, request_id: str) -> Tracked | None:
        return self.requests.get(request_id)

    @property
    def num_in_flight(self) -> int:
        return len(self.requests) - self.num_done

    def records(self) -> list[RequestRecord]:
        return [t.record for t in self.requests.values()]

    # ------------------------------------------------------------------ arrivals

    def add(self, submit: P.Submit, client: bytes, now_s: float) -> Tracked:
        """Register a SUBMIT that arrived at `now_s`. Raises ValueError for an unknown SLO class
        without explicit targets (the caller has checked the id is new)."""
        tracked = Tracked(submit, client, RequestRecord(self._request(submit, now_s)))
        self.requests[submit.request_id] = tracked
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
            hint_output_tokens=submit.expected_output_tokens,
        )

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
            tracked.generated_token_ids.extend(token_ids)
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

    def finish(self, tracked: Tracked) -> bool:
        """Mark the request over (finished, rejected or aborted). Returns False if it already
        was."""
        if tracked.done:
            return False
        tracked.done = True
        slo_class = tracked.request.slo_class
        self.num_done += 1
        self.num_done_by_class[slo_class] += 1
        self.num_attained_by_class[slo_class] += tracked.record.attainment.ok
        return True

    def stats(self, extra_counters: Mapping[str, float], num_engines: int) -> P.Stats:
        by_class: dict[str, list[RequestRecord]] = {}
        for record in self.records():
            by_class.setdefault(record.request.slo_class, []).append(record)
        verdicts = [r.verdict for r in self.records()]
        counters = {
            "num_requests": float(len(self.requests)),
            "num_admitted": float(verdicts.count(Verdict.ADMITTED)),
            "num_rejected": float(verdicts.count(Verdict.REJECTED)),
            "num_best_effort": float(verdicts.count(Verdict.BEST_EFFORT)),
            "num_finished": float(sum(r.finished for r in self.records())),
            "num_in_flight": float(self.num_in_flight),
            **extra_counters,
        }
        return P.Stats(
            counters=counters,
            attainment_by_class={
                c: sum(r.attainment.ok for r in rs) / len(rs) for c, rs in by_class.items()
            },
            num_requests_by_class={c: len(rs) for c, rs in by_class.items()},
            num_engines=num_engines,
        )


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
