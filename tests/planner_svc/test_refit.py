"""The core's online refit: what a report says about the step (tokens, drafts, context), the
replica's model swapped for the refitted one without a restart, the planner seeing the context,
and, in the simulator under a noisy truth with a context term, the overrun rate near its target."""

import dataclasses

import pytest

from formulations.perf_model import Line, PerfModel, TruthModel, perf_model_preset
from formulations.plan import Decision, Plan, Step, Verdict
from formulations.refit import RefitParams
from formulations.state import RequestState
from lab.experiment import Experiment
from planner_svc.core import PlannerCore
from planner_svc.refit import step_sample
from planner_svc.replica import ReplicaSpec, ReplicaState
from tests.factories import SIMPLE_MODEL, make_req
from tests.planner_svc.test_core import Scripted
from wire.protocol import StepReport


def replica_with(*states: RequestState, model=SIMPLE_MODEL) -> ReplicaState:
    rep = ReplicaState(ReplicaSpec(0, model, 1000), Scripted(lambda v: Plan()), 0.7)
    for state in states:
        rep.add_running(state)
    return rep


def test_step_sample_reads_tokens_drafts_and_the_context_before_the_step():
    decoding = RequestState(make_req("d", prompt=200, output=50), Verdict.ADMITTED, 210, 10)
    prefilling = RequestState(make_req("p", prompt=500, output=5), Verdict.ADMITTED, 256, 0)
    rep = replica_with(decoding, prefilling)
    report = StepReport(
        step_id=0,
        start_s=1.0,
        end_s=1.05,
        num_computed_tokens={"d": 3, "p": 244},  # d verified 3 drafts and kept 2
        num_new_tokens={"d": 3, "p": 1},
        num_accepted_spec_tokens={"d": 2},
        num_proposed_spec_tokens={"d": 3},
    )
    sample = step_sample(rep, report)
    assert (sample.num_tokens, sample.spec_steps) == (1 + 3 + 244, 3)
    assert sample.num_context_tokens == 210 + 256
    assert sample.step_time_s == pytest.approx(0.05)
    assert step_sample(rep, StepReport(step_id=1, error="out of blocks")) is None
    # k identical decode steps reported at once: the mean step
    cruise = StepReport(step_id=9, start_s=0.0, end_s=0.5, num_computed_tokens={"d": 10})
    mean = step_sample(rep, cruise, num_steps=10)
    assert (mean.num_tokens, mean.num_context_tokens) == (1, 210 + 4)
    assert mean.step_time_s == pytest.approx(0.05)


def test_view_carries_the_context_per_decode_only_for_a_context_model():
    short = RequestState(make_req("d", prompt=300, output=50), Verdict.ADMITTED, 305, 5)
    long = RequestState(make_req("e", prompt=900, output=50), Verdict.ADMITTED, 900, 0)
    assert replica_with(short, long).view(0.0).context_tokens_per_decode == 0
    context_model = PerfModel((Line(1e-4, 0.0, 0.02, 1e-6),))
    view = replica_with(short, long, model=context_model).view(0.0)
    assert view.context_tokens_per_decode == (305 + 900 + 1) // 2  # the mean KV, rounded up


def test_core_swaps_the_replica_model_after_enough_reports():
    def serve(view):
        decisions = {s.request_id: Decision(Verdict.ADMITTED) for s in view.waiting}
        states = [*view.running, *view.waiting]
        tokens = {s.request_id: min(64, s.num_pending_tokens) for s in states if not s.is_finished}
        return Plan(steps=(Step(tokens),) if tokens else (), decisions=decisions)

    params = RefitParams(min_samples=8, refit_every=4, window=32)
    core = PlannerCore(
        [ReplicaSpec(0, SIMPLE_MODEL, 1000)], lambda s: Scripted(serve), refit=params
    )
    core.submit(make_req("a", prompt=64, output=40), 0.0)
    now_s, step_id = 0.0, 0
    slower = SIMPLE_MODEL.scaled(1.5)  # the engine runs 1.5x slower than the planner believes
    while core.replica(0).running and step_id < 30:
        state = core.replica(0).running["a"]
        n = 1 if state.is_decoding else min(64, state.num_pending_tokens)
        now_s += slower.step_time_s(n)
        report = StepReport(
            step_id=step_id,
            start_s=now_s - slower.step_time_s(n),
            end_s=now_s,
            num_computed_tokens={"a": n},
            num_new_tokens={"a": 1} if state.num_computed_tokens + n >= 64 else {},
        )
        core.on_step(0, report, now_s)
        step_id += 1
    status = core.refit_status(0)
    assert status.num_refits >= 1
    assert core.replica(0).spec.perf_model is status.planning_model
    assert status.scale == pytest.approx(1.5, rel=0.05)
    assert core.replica(0).view(now_s).perf_model.step_time_s(1) > 1.4 * SIMPLE_MODEL.step_time_s(1)


@pytest.mark.parametrize("target", [0.1, 0.4])
def test_tuned_margin_keeps_the_overrun_rate_near_its_target_in_the_simulator(target):
    experiment = Experiment(
        scenario="chatbot",
        perf_model="opt-13b-h100",
        num_requests=60,
        truth_context_s=2e-7,
        truth_noise=0.1,
        refit=RefitParams(overrun_target=target),
    )
    report, result = experiment.run("slos_dp", 2.0)
    (status,) = result.refits
    assert status.num_samples > 300
    assert status.overrun_rate == pytest.approx(target, abs=0.07)
    assert status.k_context_s > 0  # the context cost was found
    assert "refit" in status.planning_model.name


def test_without_refit_the_model_never_changes():
    experiment = Experiment(scenario="chatbot", perf_model="opt-13b-h100", num_requests=20)
    _, result = experiment.run("slos_dp", 2.0)
    assert result.refits == []
    config = experiment.sim_config("slos_dp")
    assert config.truth is None and config.refit is None
    noisy = dataclasses.replace(experiment, truth_noise=0.1, truth_context_s=1e-7, seed=3)
    truth = noisy.sim_config("slos_dp").truth
    assert isinstance(truth, TruthModel) and truth.seed == 3 and truth.noise_frac == 0.1
    assert truth.base == perf_model_preset("opt-13b-h100")
