"""EDF with chunked prefill and no admission control (docs/ALGORITHM.md section 8).

Every request on the replica is served in order of its next deadline (the TTFT deadline before the
first token, the cumulative deadline of the next token after), earliest first: a decoding request
takes one token, a prefilling one the largest chunk left in the budget. The step budget follows the
same rule as Sarathi (`perf_model.max_tokens` of the tightest TPOT present). Everything is admitted
if it fits memory at all (`batching.admit_by_memory`), so the baseline isolates the value of
admission control. When a started request cannot grow, the started request with the latest
deadline is preempted by recompute (possibly itself); a not-started request that does not fit is
skipped, and later-deadline ones may still run.
"""

from __future__ import annotations

from operator import itemgetter

from formulations.baselines.batching import (
    BlockLedger,
    QueueingBaseline,
    plan_step,
    schedule_in_order,
)
from formulations.plan import Decision, Plan
from formulations.registry import register
from formulations.state import ReplicaView, RequestState


def deadline_order(
    queue: list[RequestState], cache: dict[str, tuple[int, float, float]]
) -> tuple[list[RequestState], float]:
    """Earliest next deadline first (ties: arrival, then id), and the tightest TPOT among them.
    `cache` maps a request id to (output tokens so far, next deadline, tightest TPOT) from the
    previous call: a deadline changes only when a token is produced. It is rebuilt with the
    current requests only."""
    keyed = []
    fresh: dict[str, tuple[int, float, float]] = {}
    tightest_tpot_s = float("inf")
    for s in queue:
        request = s.request
        rid = request.request_id
        cached = cache.get(rid)
        if cached is None or cached[0] != s.num_generated_tokens:
            cached = (s.num_generated_tokens, s.next_token_deadline_s, request.slo.min_tpot_s)
        fresh[rid] = cached
        if cached[2] < tightest_tpot_s:
            tightest_tpot_s = cached[2]
        keyed.append((cached[1], request.arrival_s, rid, s))
    cache.clear()
    cache.update(fresh)
    keyed.sort(key=_SORT_KEY)
    return [k[3] for k in keyed], tightest_tpot_s


_SORT_KEY = itemgetter(0, 1, 2)


@register("edf")
class Edf(QueueingBaseline):
    tpot_budget = True

    def __init__(self, max_num_seqs: int = 256) -> None:
        super().__init__(max_num_seqs)
        self._deadline_cache: dict[str, tuple[int, float, float]] = {}  # see deadline_order

    def schedule(
        self, view: ReplicaView, decisions: dict[str, Decision], queue: list[RequestState]
    ) -> Plan:
        order, tightest_tpot_s = deadline_order(queue, self._deadline_cache)
        budget = max(1, view.perf_model.max_tokens(tightest_tpot_s))  # as Sarathi's
        ledger = BlockLedger(view)
        num_tokens, preempted = schedule_in_order(order, ledger, budget, self.max_num_seqs)
        max_num_decodes = min(budget, self.max_num_seqs)
        return plan_step(order, num_tokens, ledger, decisions, preempted, max_num_decodes)
