"""What the SLOs-Serve formulations (DP, CP-SAT) plan over, extracted from a `ReplicaView`.

- `decoders`: admitted requests that are decoding (fixed load; never dropped);
- `mandatory`: admitted requests still prefilling or recomputing (never dropped);
- `candidates`: waiting requests that may be admitted;
- `best_effort`: running best-effort requests (served from leftovers, preemptible);
- `too_large`: waiting requests whose KV at full length would not fit the replica at all.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from formulations.batch_planner import BestEffortWork
from formulations.budget import Decoder, Job
from formulations.memory_timeline import Footprint, Growth, footprints
from formulations.perf_model import PerfModel
from formulations.plan import Verdict
from formulations.request import Request
from formulations.state import ExpectedRound, ReplicaView, RequestState


def remaining_tpot_s(request: Request, first_gap_token: int) -> float:
    """Tightest TPOT over the gaps before output tokens first_gap_token..end."""
    slo = request.slo
    if slo.thinking_tpot_s is not None and first_gap_token <= request.num_thinking_tokens:
        return min(slo.thinking_tpot_s, slo.tpot_s)
    return slo.tpot_s


@dataclass(frozen=True)
class PlanningProblem:
    now_s: float
    decoders: tuple[Decoder, ...]
    mandatory: tuple[Job, ...]
    candidates: tuple[Job, ...]
    best_effort: tuple[RequestState, ...]
    too_large: tuple[str, ...]
    reserved_blocks: int  # peak KV of the running decoders
    num_total_blocks: int
    block_size: int
    # Per-request KV bounds over time (decoders, admitted jobs and candidates; memory_timeline.py),
    # one per outcome of its length, the growth bound they use, and each one's planned output
    # tokens still to come (on average over its outcomes).
    footprints: Mapping[str, tuple[Footprint, ...]] = field(default_factory=dict)
    growth: Growth | None = None
    planned_remaining: Mapping[str, int] = field(default_factory=dict)
    # The layout decodes early from leftover budget (batch_planner.py): trajectories then run at
    # least one token per step of every decoder together, on this performance model.
    eager_decodes: bool = False
    perf_model: PerfModel | None = None
    # Tool chains planned as programs (docs/AGENTS.md): the paused chains' expected next rounds,
    # footprints from their expected arrivals.
    expected_rounds: tuple[Footprint, ...] = ()

    @property
    def tpots_s(self) -> set[float]:
        jobs = self.mandatory + self.candidates
        return {d.tpot_s for d in self.decoders} | {j.tpot_s for j in jobs if j.tpot_s is not None}

    @property
    def memory_cap_blocks(self) -> int:
        """Blocks the DP may reserve for jobs (mandatory and new)."""
        return self.num_total_blocks - self.reserved_blocks


def _job(state: RequestState, block_size: int, mandatory: bool) -> Job:
    request = state.request
    num_after = state.num_remaining_output_tokens - 1  # decodes after the next (prefill) token
    next_token = state.num_generated_tokens + 1
    return Job(
        request_id=request.request_id,
        num_prefill_tokens=state.num_pending_tokens,
        deadline_s=state.next_token_deadline_s,
        tpot_s=remaining_tpot_s(request, next_token + 1) if num_after > 0 else None,
        num_decode_tokens=num_after,
        peak_blocks=state.num_peak_blocks(block_size),
        value=request.value,
        mandatory=mandatory,
        arrival_s=request.arrival_s,
    )


def _decoder(state: RequestState) -> Decoder:
    return Decoder(
        request_id=state.request_id,
        tpot_s=remaining_tpot_s(state.request, state.num_generated_tokens + 1),
        next_deadline_s=state.next_token_deadline_s,
        num_remaining_tokens=state.num_remaining_output_tokens,
    )


def extract_problem(
    view: ReplicaView,
    distributed_lengths: bool = False,
    eager_decodes: bool = False,
    plan_chains: bool = False,
) -> PlanningProblem:
    """The problem of `view`; `distributed_lengths`: footprints on the predicted distribution of
    each length (memory_timeline.planned_lengths), else on its predicted quantile;
    `eager_decodes`: the layout will decode early (`PlanningProblem.eager_decodes`);
    `plan_chains`: the paused tool chains' next rounds are planned for
    (`ReplicaView.expected_rounds`, footprints in time)."""
    decoders: list[Decoder] = []
    mandatory: list[Job] = []
    best_effort: list[RequestState] = []
    reserved = 0
    prints: dict[str, tuple[Footprint, ...]] = {}
    growth = Growth.for_model(view.perf_model, view.max_spec_tokens)
    for state in view.running:
        if state.is_finished:
            continue
        if state.verdict is Verdict.BEST_EFFORT:
            best_effort.append(state)
        elif state.is_decoding:
            prints[state.request_id] = footprints(state, view.now_s, growth, distributed_lengths)
            decoders.append(_decoder(state))
            reserved += state.num_peak_blocks(view.block_size)
        else:
            prints[state.request_id] = footprints(state, view.now_s, growth, distributed_lengths)
            mandatory.append(_job(state, view.block_size, mandatory=True))
    candidates: list[Job] = []
    too_large: list[str] = []
    for state in view.waiting:
        if state.num_peak_blocks(view.block_size) > view.num_total_blocks:
            too_large.append(state.request_id)
        else:
            prints[state.request_id] = footprints(state, view.now_s, growth, distributed_lengths)
            candidates.append(_job(state, view.block_size, mandatory=False))
    return PlanningProblem(
        now_s=view.now_s,
        decoders=tuple(decoders),
        mandatory=tuple(mandatory),
        candidates=tuple(candidates),
        best_effort=tuple(best_effort),
        too_large=tuple(too_large),
        reserved_blocks=reserved,
        num_total_blocks=view.num_total_blocks,
        block_size=view.block_size,
        footprints=prints,
        growth=growth,
        planned_remaining={
            rid: round(sum(f.weight * f.num_remaining_outputs for f in outcomes))
            for rid, outcomes in prints.items()
        },
        eager_decodes=eager_decodes,
        perf_model=view.perf_model,
        expected_rounds=tuple(_expected_footprint(r) for r in view.expected_rounds)
        if plan_chains
        else (),
    )


def _expected_footprint(expected: ExpectedRound) -> Footprint:
    """A paused chain's next round: its KV from its expected arrival to its expected end, an
    outcome of the chance that it comes (memory_timeline.peak_blocks plans the sum's quantile)."""
    return Footprint(
        f"{expected.chain_id}#next",
        num_start_tokens=expected.num_tokens,
        num_peak_tokens=expected.num_tokens,
        release_s=expected.end_s,
        tokens_per_s=0.0,
        num_extra_tokens=0,
        weight=expected.probability,
        start_s=expected.start_s,
    )


def best_effort_work(state: RequestState, block_size: int, preempted: bool) -> BestEffortWork:
    computed = 0 if preempted else state.num_computed_tokens
    return BestEffortWork(
        request_id=state.request_id,
        num_pending_tokens=state.num_tokens - computed,
        num_remaining_outputs=state.num_remaining_output_tokens,
        num_computed_tokens=computed,
        num_blocks=0 if preempted else state.num_blocks,
        has_output=state.num_generated_tokens > 0,
        peak_blocks=state.num_peak_blocks(block_size),
    )
