"""Planning without the true output lengths (formulations/lengths.py): the predictor against an
empirical reference, what the planner may see in each length mode, the overflow path when reality
runs past the predictions, and the guarantee when it does not."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from formulations.lengths import (
    NUM_ATOMS,
    LengthEstimate,
    LengthPredictor,
    LengthPrior,
    OnlineLengthPredictor,
)
from formulations.perf_model import perf_model_preset
from formulations.plan import Verdict
from formulations.request import make_request
from lab.simulator import SimConfig, Simulation
from lab.workloads.workload import Workload

OPT13B = perf_model_preset("opt-13b-2xa100")


# ---------------------------------------------------------------- the predictor


def empirical_rest(samples: np.ndarray, generated: int, q: float) -> tuple[float, float]:
    """E[L - g | L > g] and the q-quantile of L - g given L > g, computed directly."""
    longer = samples[samples > generated]
    return float(longer.mean() - generated), float(
        np.quantile(longer, q, method="inverted_cdf") - generated
    )


@settings(max_examples=30, derandomize=True, deadline=None)
@given(
    st.sampled_from(["lognormal", "exponential", "uniform"]),
    st.integers(0, 600),
    st.sampled_from([0.5, 0.9]),
)
def test_conditional_estimates_match_the_empirical_distribution(kind, generated, q):
    rng = np.random.default_rng(7)
    draw = {
        "lognormal": lambda n: rng.lognormal(5.0, 0.8, n),
        "exponential": lambda n: rng.exponential(300.0, n),
        "uniform": lambda n: rng.uniform(1, 1200, n),
    }[kind]
    samples = np.maximum(1, draw(1500).astype(int))
    predictor = OnlineLengthPredictor(quantile=q, max_samples=1500, min_bucket_samples=10**9)
    for length in samples:
        predictor.observe("c", 100, int(length))
    estimate = predictor.remaining("c", 100, generated)
    if not (samples > generated).any():
        return
    mean_rest, q_rest = empirical_rest(samples, generated, q)
    assert estimate.expected == pytest.approx(max(1, mean_rest), abs=1.0)
    assert estimate.quantile == max(estimate.expected, math.ceil(q_rest))
    # the distribution: NUM_ATOMS equally likely values at the conditional (i + 1/2) / n quantiles
    for i, atom in enumerate(estimate.atoms):
        _, q_atom = empirical_rest(samples, generated, (i + 0.5) / NUM_ATOMS)
        assert atom == max(1, math.ceil(q_atom))
    assert len(estimate.atoms) == NUM_ATOMS


def test_the_estimate_grows_as_a_heavy_tailed_request_outlives_it():
    predictor = OnlineLengthPredictor()
    rng = np.random.default_rng(0)
    for length in rng.lognormal(5.5, 1.2, 2000):
        predictor.observe("reasoning", 200, max(1, int(length)))
    rests = [predictor.remaining("reasoning", 200, g).expected for g in (0, 200, 1000, 4000)]
    assert rests == sorted(rests) and rests[-1] > 2 * rests[0]


def test_memory_is_bounded_and_the_prior_gives_way_to_data():
    predictor = OnlineLengthPredictor(default_prior=LengthPrior(50, 100, weight=20), max_samples=50)
    before = predictor.remaining("chatbot", 10, 0)
    for _ in range(500):
        predictor.observe("chatbot", 10, 1000)
    after = predictor.remaining("chatbot", 10, 0)
    assert before.expected < 100 and after == LengthEstimate(1000, 1000, (1000,) * NUM_ATOMS)
    assert all(len(s.sorted) <= 50 for s in predictor._samples.values())


def test_a_client_hint_sets_the_expected_length():
    predictor = OnlineLengthPredictor()
    estimate = predictor.remaining("chatbot", 100, 10, hint=400)
    assert estimate.expected == 390 and estimate.quantile >= 390


# ---------------------------------------------------------------- the simulator's length modes


class Fixed(LengthPredictor):
    """Predicts the same total output for every request (a wrong predictor, for the tests)."""

    def __init__(self, total: int) -> None:
        self.total = total

    def remaining(self, slo_class, num_prompt_tokens, num_generated, kind="output", hint=None):
        rest = max(1, self.total - num_generated)
        return LengthEstimate(rest, rest)

    def observe(self, slo_class, num_prompt_tokens, length, kind="output") -> None:
        pass


def long_requests(n: int, gap_s: float, output: tuple[int, int]) -> Workload:
    rng = np.random.default_rng(5)
    requests = tuple(
        make_request(
            f"q{i}",
            i * gap_s,
            int(rng.integers(100, 400)),
            int(rng.integers(*output)),
            "chatbot",
            OPT13B,
        )
        for i in range(n)
    )
    return Workload("long", requests)


def run(workload: Workload, errors: list[str], **config):
    original = Simulation._on_step

    def on_step(self, now_s, event, run_ends_s=None):
        if event[1].error:
            errors.append(event[1].error)
        return original(self, now_s, event, run_ends_s)

    Simulation._on_step = on_step
    try:
        config = SimConfig(formulation="slos_dp", perf_model=OPT13B, **config)
        return Simulation(workload, config).run()
    finally:
        Simulation._on_step = original


def test_lengths_past_the_predictions_are_preempted_before_the_engine_overflows():
    """Every request runs about 3x past what the planner predicts: memory planned on predictions
    oversubscribes the replica, the planner preempts (most slack first) before any step is
    refused, and every request ends."""
    errors: list[str] = []
    result = run(
        long_requests(40, 0.25, (600, 900)),
        errors,
        num_blocks_per_replica=700,  # 11,200 tokens
        predictor=lambda: Fixed(250),
    )
    assert not errors, errors[:3]
    assert sum(r.num_preemptions for r in result.records) > 0
    assert all(r.finished for r in result.records if r.verdict is not Verdict.REJECTED)
    assert any(r.verdict is Verdict.ADMITTED for r in result.records)


def test_predictions_that_hold_keep_the_guarantee_and_the_engine_never_overflows():
    """Lengths hidden, truth = model, every true length at or under the predicted quantile: every
    admitted request attains and no step is refused."""
    errors: list[str] = []
    result = run(
        long_requests(40, 0.25, (300, 500)),
        errors,
        num_blocks_per_replica=700,
        predictor=lambda: Fixed(500),
    )
    admitted = [r for r in result.records if r.verdict is Verdict.ADMITTED]
    assert admitted and all(r.attainment.ok for r in admitted)
    assert not errors, errors[:3]


# ---------------------------------------------------------------- no false rejections when idle


@st.composite
def lone_requests(draw):
    """A request alone on an idle replica: a preset class or explicit targets, any prompt length,
    any shipped performance model."""
    from formulations.perf_model import PERF_MODEL_PRESETS
    from formulations.slo import SLO, SLO_PRESETS

    perf = PERF_MODEL_PRESETS[draw(st.sampled_from(sorted(PERF_MODEL_PRESETS)))]
    prompt = draw(st.integers(1, 6000))
    output = draw(st.integers(1, 600))
    if draw(st.booleans()):
        slo = SLO_PRESETS[draw(st.sampled_from(sorted(SLO_PRESETS)))]
    else:
        slo = SLO(
            tpot_s=draw(st.floats(0.02, 0.3)),
            ttft_s=draw(st.floats(0.01, 3.0)),
            thinking_tpot_s=draw(st.one_of(st.none(), st.floats(0.02, 0.3))),
        )
    thinking = draw(st.integers(0, output)) if slo.thinking_tpot_s else 0
    request = make_request("r", 5.0, prompt, output, slo, perf, num_thinking_tokens=thinking)
    return perf, request


def servable_alone(perf, request) -> bool:
    """Alone on a replica: the prompt prefills in one step within the TTFT target and a decode
    step keeps the tightest TPOT."""
    prefill_ok = perf.prefill_time_s(request.num_prompt_tokens) <= request.ttft_slo_s
    decode_ok = request.num_output_tokens == 1 or perf.step_time_s(1) <= request.slo.min_tpot_s
    return prefill_ok and decode_ok


@settings(max_examples=300, derandomize=True, deadline=None)
@given(lone_requests())
def test_an_idle_replica_admits_every_request_it_could_serve_alone(case):
    from formulations.slos_dp import SlosDP
    from formulations.state import RequestState
    from tests.formulations.factories import view

    perf, request = case
    if not servable_alone(perf, request):
        return
    plan = SlosDP().plan(view(perf, request.arrival_s, [], [RequestState(request)]))
    decision = plan.decisions["r"]
    assert decision.verdict is Verdict.ADMITTED, (
        f"{request.slo} prompt {request.num_prompt_tokens}: {decision.reason} "
        f"(prefill {perf.prefill_time_s(request.num_prompt_tokens):.4f} s, "
        f"TTFT {request.ttft_slo_s:.4f} s, decode {perf.step_time_s(1):.4f} s)"
    )


def test_the_six_row_trace_of_the_issue_is_served_by_an_idle_h100():
    """Short summarizer / chatbot / tool_final requests, five seconds apart, on opt-13b-h100: an
    idle replica admits them all (they used to be rejected: no candidate step fit their TTFT)."""
    from lab.simulator import SimConfig, simulate

    perf = perf_model_preset("opt-13b-h100")
    rows = [
        (0, 100, "summarizer"),
        (5, 100, "summarizer"),
        (10, 140, "summarizer"),
        (15, 160, "summarizer"),
        (20, 100, "chatbot"),
        (25, 60, "tool_final"),
    ]
    requests = tuple(
        make_request(f"r{i}", float(t), p, 20, cls, perf) for i, (t, p, cls) in enumerate(rows)
    )
    result = simulate(Workload("six", requests), SimConfig(formulation="slos_dp", perf_model=perf))
    assert [r.verdict for r in result.records] == [Verdict.ADMITTED] * 6
    assert all(r.attainment.ok for r in result.records)


# ---------------------------------------------------------------- baselines are length-blind


@pytest.mark.parametrize(
    "formulation", ["vllm_fcfs", "vllm_prefill_first", "vllm_spec", "sarathi", "edf"]
)
def test_baselines_give_identical_results_in_every_length_mode(formulation):
    """Like vLLM, the baselines never use output lengths: whatever the planner may know (the
    truth, a prediction, the cap), they serve the same steps at the same times."""
    from lab.experiment import Experiment

    outcomes = []
    for lengths in ("predicted", "oracle", "max_tokens"):
        experiment = Experiment(
            scenario="mixed", num_requests=60, seed=2, max_spec_tokens=3, lengths=lengths
        )
        _, result = experiment.run(formulation, 2.0)
        outcomes.append(
            [(r.request.request_id, r.verdict, tuple(r.token_times_s)) for r in result.records]
        )
    assert outcomes[0] == outcomes[1] == outcomes[2]
    assert any(times for _, _, times in outcomes[0])


def test_distserve_gives_identical_results_in_every_length_mode():
    from lab.experiment import Experiment

    outcomes = []
    for lengths in ("predicted", "oracle", "max_tokens"):
        experiment = Experiment(
            scenario="chatbot", num_requests=60, sim_params={"lengths": lengths}
        )
        _, result = experiment.run("distserve", 2.0)
        outcomes.append([(r.request.request_id, tuple(r.token_times_s)) for r in result.records])
    assert outcomes[0] == outcomes[1] == outcomes[2]


# ---------------------------------------------------------------- the end of thinking


def test_the_planner_learns_where_thinking_ends_from_the_engine():
    """Blind: a reasoning request's thinking TPOT applies to every token the planner has not
    seen end; the engine reports the end of thinking and the planner switches to the answer TPOT
    then (and re-plans)."""
    from formulations.registry import create
    from planner_svc.core import PlannerCore
    from planner_svc.replica import ReplicaSpec
    from wire.protocol import StepReport

    true = make_request("q", 0.0, 100, 40, "reasoning", OPT13B, num_thinking_tokens=10)
    config = SimConfig(formulation="slos_dp", perf_model=OPT13B)
    blind = config.planner_request(true)
    assert blind.num_thinking_tokens == blind.num_output_tokens > true.num_output_tokens
    core = PlannerCore([ReplicaSpec(0, OPT13B, 1000)], lambda s: create("slos_dp"))
    core.submit(blind, 0.0)
    core.on_step(0, StepReport(0, 0.0, 0.05, {"q": 100}, {"q": 1}, num_free_blocks=990), 0.05)
    state = core.request_state("q")
    assert state.current_tpot_s == true.slo.thinking_tpot_s
    # tokens 2..10 think; the step producing token 10 reports it as the end of the thinking
    step_id = 1
    for t in range(9):
        ended = {"q": 1} if t == 8 else {}
        report = StepReport(
            step_id,
            0.1 * t,
            0.1 * t + 0.04,
            {"q": 1},
            {"q": 1},
            num_free_blocks=990,
            thinking_ended=ended,
        )
        core.on_step(0, report, 0.1 * t + 0.04)
        step_id += 1
    assert state.request.num_thinking_tokens == 10 and state.num_generated_tokens == 10
    assert state.current_tpot_s == true.slo.tpot_s  # the answer TPOT from token 11 on


def test_the_sim_engine_reports_the_end_of_thinking_also_in_a_fast_forward():
    from engine_adapters.sim_engine import SimEngine
    from formulations.plan import Step
    from wire.protocol import EngineRequest

    engine = SimEngine(OPT13B, 100)
    engine.add_request(EngineRequest("a", 10, 30, sim_thinking_tokens=5))
    first = engine.execute(Step({"a": 10}), 0)
    assert first.thinking_ended == {}
    runs = engine.repeatable_steps(Step({"a": 1}))
    assert runs == 4  # a cruise stops where thinking ends (token 5)
    report = engine.execute_repeated(Step({"a": 1}), 4, runs, first.end_s)
    assert report.thinking_ended == {"a": 4}  # of the 4 tokens of the cruise, 4 were thinking
