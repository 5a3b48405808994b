"""The DP's admitted value equals brute force over all subsets on small random instances."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from formulations.deadlines import token_deadline_s
from formulations.perf_model import Line, PerfModel, perf_model_preset
from formulations.planning_problem import extract_problem
from formulations.progress import num_blocks_for
from formulations.slos_dp import solve_candidates
from tests.formulations import brute_force as bf
from tests.formulations.factories import decoding_state, request, view

# The published OPT-13B model, and a slow toy model on which a few decoders fill a step (so the
# steady-state decode check and the tier periods matter).
MODELS = (perf_model_preset("opt-13b-2xa100"), PerfModel((Line(2e-3, 0.0, 0.02),), "toy-slow"))
PERF = MODELS[0]
TPOTS = (0.05, 0.1, 0.15)
BLOCK = 16


@st.composite
def instances(draw):
    now_s = 1.0
    perf = draw(st.sampled_from(MODELS))
    small = perf is MODELS[1]
    num_decoders = draw(st.integers(0, 12 if small else 3))
    num_waiting = draw(st.integers(1, 7))
    running = []
    for i in range(num_decoders):
        # TTFT targets up to 1.6 s: some decoders are ahead of their deadlines (deferred slots)
        req = request(
            f"d{i}",
            0.0,
            draw(st.integers(10, 400)),
            draw(st.integers(5, 300)),
            draw(st.floats(0.5, 1.6)),
            draw(st.sampled_from(TPOTS)),
        )
        generated = draw(st.integers(1, 4))
        first_s = draw(st.floats(0.2, 1.0))
        running.append(decoding_state(req, generated, first_s, BLOCK))
    waiting = []
    for i in range(num_waiting):
        output = draw(st.integers(1, 200))
        waiting.append(
            request(
                f"w{i}",
                draw(st.floats(0.6, 1.0)),
                draw(st.integers(5, 120) if small else st.integers(20, 1500)),
                output,
                draw(st.floats(0.1, 1.2)),
                draw(st.sampled_from(TPOTS)),
                value=draw(st.sampled_from((1.0, 1.0, 2.0, 3.0))),
            )
        )
    total_blocks = draw(st.integers(60, 300))
    return perf, now_s, running, waiting, total_blocks


def reference_value(perf, now_s, running, waiting, total_blocks) -> float:
    decoders = [
        bf.RunningDecoder(
            s.request.slo.tpot_s,
            token_deadline_s(s.request, s.num_generated_tokens + 1, s.first_token_s),
            num_blocks_for(s.request.num_peak_kv_tokens, BLOCK),
            s.request_id,
        )
        for s in sorted(running, key=lambda s: s.request_id)
    ]
    new = [
        bf.NewRequest(
            r.request_id,
            r.num_prompt_tokens,
            r.arrival_s + r.ttft_slo_s,
            r.slo.tpot_s if r.num_output_tokens > 1 else None,
            num_blocks_for(r.num_peak_kv_tokens, BLOCK),
            r.value,
            r.arrival_s,
        )
        for r in waiting
        if num_blocks_for(r.num_peak_kv_tokens, BLOCK) <= total_blocks
    ]
    return bf.best_value(perf, now_s, decoders, new, total_blocks)


@settings(
    max_examples=300, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(instances())
def test_dp_value_equals_brute_force(instance):
    perf, now_s, running, waiting, total_blocks = instance
    v = view(perf, now_s, running, waiting, total_blocks, BLOCK)
    choice = solve_candidates(extract_problem(v), v, max_spec_tokens=0, use_bursts=False)
    dp_value = -1.0 if choice is None else choice.admission.value
    assert dp_value == reference_value(*instance)


def test_brute_force_is_not_trivial():
    """The random instances exercise both outcomes: some requests admitted, some refused."""
    import random

    rng = random.Random(0)
    partial = 0
    for _ in range(30):
        waiting = [
            request(f"w{i}", 0.9, rng.randint(200, 1500), 50, rng.uniform(0.1, 0.6), 0.05)
            for i in range(5)
        ]
        value = reference_value(PERF, 1.0, [], waiting, 10_000)
        partial += 0 < value < 5
    assert partial >= 5
