"""The planner core's online refit of each replica's performance model (docs/PLANNER.md,
"Robustness"): one `formulations.refit.OnlineRefit` per replica, fed by that replica's step
reports, whose planning model (fitted model x (1 + margin)) replaces the replica's model for its
next plans without a restart. The simulator and the daemon both get it through the core
(`PlannerCore(refit=RefitParams(...))`; the daemon's TOML: `[core.refit]`).

What one report tells: the step computed n = sum(computed) + sum(proposed) - sum(accepted) tokens
(verified drafts count whether or not they were accepted), with the longest speculation as its
draft steps, and attended over the context its requests held before it: the sum of their computed
tokens as the core knows them (read before the core applies the report). A fast-forwarded run of
k identical decode steps (the simulator) is one sample of the mean step.

Drifts are logged (logger `slos_serve.refit`, INFO) and counted; the daemon exports the status as
metrics.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from formulations.perf_model import PerfModel, StepSample
from formulations.refit import OnlineRefit, RefitParams
from planner_svc.replica import ReplicaState
from wire.protocol import StepReport

log = logging.getLogger("slos_serve.refit")


@dataclass(frozen=True)
class RefitStatus:
    """One replica's refit, for metrics and reports."""

    replica_id: int
    num_samples: int
    num_refits: int
    num_drifts: int
    margin: float
    overrun_rate: float
    scale: float  # fitted / prior, on the prior's (tokens, draft steps) part
    k_context_s: float
    planning_model: PerfModel


def step_sample(rep: ReplicaState, report: StepReport, num_steps: int = 1) -> StepSample | None:
    """The step's shape and time as the refit needs them; None for a refused or empty step. Call
    before the report is applied (the context is the requests' computed tokens before it)."""
    if report.error or not report.num_computed_tokens or num_steps < 1:
        return None
    proposed = report.num_proposed_spec_tokens
    num_batched = sum(report.num_computed_tokens.values())
    if proposed:
        num_batched += sum(proposed.values()) - sum(report.num_accepted_spec_tokens.values())
    context = 0
    running = rep.running
    for rid in report.num_computed_tokens:
        state = running.get(rid)
        if state is not None:
            context += state.num_computed_tokens
    members = len(report.num_computed_tokens)
    # k identical decode steps: each request gains a token per step; the mean step's context.
    mean_context = context + members * (num_steps - 1) // 2
    return StepSample(
        num_batched // num_steps,
        max(proposed.values(), default=0),
        report.step_time_s / num_steps,
        mean_context,
    )


class ReplicaRefits:
    """One online refit per replica, keyed by replica id."""

    def __init__(self, params: RefitParams) -> None:
        self.params = params
        self._refits: dict[int, OnlineRefit] = {}

    def add(self, rep: ReplicaState) -> None:
        self._refits[rep.replica_id] = OnlineRefit(rep.spec.perf_model, self.params)

    def remove(self, replica_id: int) -> None:
        self._refits.pop(replica_id, None)

    def observe(self, rep: ReplicaState, report: StepReport, num_steps: int = 1) -> None:
        """Feed one report (before the core applies it); swap the replica's model on a refit."""
        refit = self._refits.get(rep.replica_id)
        sample = step_sample(rep, report, num_steps)
        if refit is None or sample is None:
            return
        num_drifts = refit.num_drifts
        if not refit.observe(sample):
            return
        if refit.num_drifts > num_drifts:
            log.info(
                "replica %d: step times drifted from the model (drift %d after %d steps); "
                "refitted on the last %d steps: x%.3f, %.3g s per context token, margin %.1f%%",
                rep.replica_id,
                refit.num_drifts,
                refit.num_samples,
                refit.num_window_samples,
                refit.correction.scale,
                refit.correction.k_context_s,
                100 * refit.margin,
            )
        rep.set_perf_model(refit.planning_model)

    def status(self, replica_id: int) -> RefitStatus | None:
        refit = self._refits.get(replica_id)
        if refit is None:
            return None
        return RefitStatus(
            replica_id,
            refit.num_samples,
            refit.num_refits,
            refit.num_drifts,
            refit.margin,
            refit.overrun_rate,
            refit.correction.scale,
            refit.correction.k_context_s,
            refit.planning_model,
        )
