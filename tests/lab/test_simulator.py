"""The virtual-time simulator against analytic cases: exact TTFT and token gaps under an exact
truth model, preemption by recompute that still finishes everything, determinism, tool chains."""

import pytest

from formulations.perf_model import TruthModel
from formulations.plan import Verdict
from formulations.request import ToolChain, ToolRound
from lab.simulator import SimConfig, simulate
from lab.workloads.workload import Workload
from tests.factories import SIMPLE_MODEL, make_req


def config(**kwargs):
    kwargs.setdefault("perf_model", SIMPLE_MODEL)
    kwargs.setdefault("num_blocks_per_replica", 10_000)
    return SimConfig(**kwargs)


def test_lone_request_ttft_is_the_prefill_time():
    request = make_req("a", arrival_s=2.0, prompt=700, output=5)
    result = simulate(Workload("one", (request,)), config())
    (record,) = result.records
    assert record.finished and record.verdict is Verdict.ADMITTED
    assert record.ttft_s == pytest.approx(SIMPLE_MODEL.prefill_time_s(700), abs=1e-12)
    gaps = [b - a for a, b in zip(record.token_times_s, record.token_times_s[1:])]
    assert gaps == pytest.approx([SIMPLE_MODEL.step_time_s(1)] * 4, abs=1e-12)


def test_decode_batch_gaps_equal_the_batch_step_time():
    n, output = 6, 12
    requests = tuple(make_req(f"r{i}", 0.0, prompt=50, output=output) for i in range(n))
    result = simulate(Workload("batch", requests), config())
    by_id = {r.request.request_id: r for r in result.records}
    t_full, t_less = SIMPLE_MODEL.step_time_s(n), SIMPLE_MODEL.step_time_s(n - 1)
    # r0 is prefilled alone (it arrived first and found the engine idle); the others are prefilled
    # in the next step, beside r0's decode; from then on all n decode together.
    r0 = by_id["r0"].token_times_s
    gaps0 = [b - a for a, b in zip(r0, r0[1:])]
    assert gaps0[0] == pytest.approx(SIMPLE_MODEL.step_time_s(1 + 50 * (n - 1)), abs=1e-12)
    assert gaps0[1:] == pytest.approx([t_full] * (output - 2), abs=1e-12)
    for i in range(1, n):
        times = by_id[f"r{i}"].token_times_s
        gaps = [b - a for a, b in zip(times, times[1:])]
        assert gaps == pytest.approx([t_full] * (output - 2) + [t_less], abs=1e-12)


def test_preemption_by_recompute_still_finishes_everything():
    requests = tuple(make_req(f"r{i}", 0.01 * i, prompt=64, output=64) for i in range(4))
    # Each request peaks at ceil(127 / 16) = 8 blocks; four need 32 but only 20 exist.
    result = simulate(Workload("tight", requests), config(num_blocks_per_replica=20))
    assert all(r.finished and len(r.token_times_s) == 64 for r in result.records)
    assert sum(r.num_preemptions for r in result.records) > 0
    assert all(r.verdict is Verdict.ADMITTED for r in result.records)


def test_same_seed_same_result_with_a_noisy_truth():
    requests = tuple(make_req(f"r{i}", 0.05 * i, prompt=100 + 10 * i, output=20) for i in range(20))
    workload = Workload("noisy", requests)

    def run(seed):
        truth = TruthModel(SIMPLE_MODEL, k_context_s=1e-6, noise_frac=0.2, seed=seed)
        result = simulate(workload, config(truth=truth, seed=seed))
        return [r.token_times_s for r in result.records]

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_tool_chain_rounds_follow_their_delays():
    chain = ToolChain(
        "c0",
        1.0,
        (
            ToolRound(200, 10),
            ToolRound(50, 8, tool_delay_s=0.5),
            ToolRound(30, 5, tool_delay_s=2.0),
        ),
    )
    result = simulate(Workload("agent", (), (chain,)), config())
    rounds = sorted(result.records, key=lambda r: r.request.round_index)
    assert [r.request.round_index for r in rounds] == [0, 1, 2]
    assert all(r.finished for r in rounds)
    assert rounds[0].request.arrival_s == 1.0
    for k, delay in ((1, 0.5), (2, 2.0)):
        assert rounds[k].request.arrival_s == pytest.approx(rounds[k - 1].token_times_s[-1] + delay)
        assert rounds[k].request.num_prompt_tokens == chain.round_prompt_tokens(k)
    assert rounds[2].request.slo_class == "tool_agent"


def test_unfinished_requests_are_recorded_when_time_runs_out():
    requests = (make_req("a", 0.0, prompt=100, output=1000),)
    result = simulate(Workload("cut", requests), config(max_sim_time_s=0.5))
    (record,) = result.records
    assert not record.finished and 0 < len(record.token_times_s) < 1000


def test_result_accounting():
    requests = tuple(make_req(f"r{i}", 0.1 * i, prompt=100, output=10) for i in range(10))
    result = simulate(Workload("acct", requests), config(num_replicas=2))
    assert len(result.records) == 10 and result.num_gpus == 2
    assert {r.replica_id for r in result.records} == {0, 1}  # round robin
    assert result.num_steps > 0 and result.num_replans > 0 and result.sim_duration_s > 0.9
    assert result.attainment == 1.0


def test_distserve_hands_requests_from_prefill_to_decode_replicas():
    from lab.simulator import Simulation

    requests = tuple(make_req(f"r{i}", 0.05 * i, prompt=400, output=20) for i in range(10))
    cfg = config(
        formulation="distserve",
        num_replicas=2,
        kv_bytes_per_token=1_000_000,
        kv_link_bytes_per_s=1e9,
    )
    sim = Simulation(Workload("disagg", requests), cfg)
    result = sim.run()
    transfer_s = cfg.kv_transfer_s(400)  # 400 tokens * 1 MB / 1 GB/s = 0.4 s
    assert transfer_s == pytest.approx(0.4)
    for record in result.records:
        assert record.finished and record.replica_id == 0  # verdict from the prefill replica
        first, second = record.token_times_s[:2]
        assert second - first >= transfer_s + SIMPLE_MODEL.step_time_s(1) - 1e-9
    assert sim.runners[0].engine.num_free_blocks == cfg.num_blocks()  # all KV sent away
    assert sim.runners[0].engine.num_steps <= 10  # prefill steps only
    assert sim.runners[1].engine.num_steps >= 19  # the decode replica did the decoding
    assert result.num_gpus == 2


@pytest.mark.parametrize(
    "formulation, num_replicas, max_sim_time_s",
    [
        ("vllm_fcfs", 1, None),
        ("sarathi", 2, None),
        ("edf", 1, None),
        ("distserve", 3, None),
        ("vllm_fcfs", 2, 7.3),
    ],
)
def test_fast_forward_gives_the_same_run_as_single_steps(formulation, num_replicas, max_sim_time_s):
    import numpy as np

    rng = np.random.default_rng(7)
    arrivals = np.cumsum(rng.exponential(0.08, size=120))
    requests = tuple(
        make_req(
            f"r{i}",
            float(t),
            prompt=int(rng.integers(20, 600)),
            output=int(rng.integers(2, 150)),
            ttft_s=0.5,
        )
        for i, t in enumerate(arrivals)
    )
    workload = Workload("ff", requests)

    def run(fast_forward):
        cfg = config(
            formulation=formulation,
            num_replicas=num_replicas,
            num_blocks_per_replica=400,
            fast_forward=fast_forward,
            replica_failures=((3.0, 0),) if num_replicas == 2 else (),
            max_sim_time_s=max_sim_time_s,
        )
        result = simulate(workload, cfg)
        return result, {
            r.request.request_id: (r.token_times_s, r.num_preemptions, r.replica_id)
            for r in result.records
        }

    slow, slow_records = run(False)
    fast, fast_records = run(True)
    assert fast_records == slow_records
    assert fast.num_steps == slow.num_steps
    assert fast.num_replans == slow.num_replans
    assert fast.sim_duration_s == slow.sim_duration_s
    assert max_sim_time_s or all(r.finished for r in fast.records)
    assert slow.num_fast_forward_steps == 0 and fast.num_fast_forward_steps > 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"formulation": "no_such_policy"}, "unknown formulation"),
        ({"formulation": "distserve", "num_replicas": 1}, "at least 2 replicas"),
        ({"router": "random"}, "unknown router"),
        ({"fallback": "drop"}, "fallback"),
        ({"num_replicas": 0}, "at least 1"),
        ({"formulation": "vllm_fcfs", "formulation_params": {"bogus": 1}}, "bad parameters"),
    ],
)
def test_bad_configs_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        simulate(Workload("one", (make_req("a"),)), config(**kwargs))


def test_least_loaded_routing_and_best_effort_fallback_in_the_simulator():
    requests = tuple(make_req(f"r{i}", 0.01 * i, prompt=100, output=20) for i in range(30))
    result = simulate(
        Workload("ll", requests),
        config(num_replicas=3, router="least_loaded", fallback="best_effort"),
    )
    assert {r.replica_id for r in result.records} == {0, 1, 2}
    assert all(r.finished for r in result.records)


class SpeculatingFcfs:
    """A test formulation: vllm_fcfs, with every decode verifying `num_spec` draft tokens.
    It records the acceptance estimates the core hands it."""

    name = "speculating_fcfs"
    disaggregated = False

    def __init__(self, num_spec: int = 3):
        from formulations.registry import create

        self.inner = create("vllm_fcfs")
        self.num_spec = num_spec
        self.estimates = []

    def plan(self, view):
        from formulations.plan import Plan, Step

        self.estimates.append(view.spec_acceptance_rate)
        plan = self.inner.plan(view)
        steps = plan.steps or plan.repeat[:1]
        if not steps:
            return plan
        (step,) = steps
        spec = {rid: self.num_spec for rid in step.num_tokens if _is_decoding(view, rid)}
        return Plan(
            steps=(Step(step.num_tokens, spec),), decisions=plan.decisions, preempt=plan.preempt
        )


def _is_decoding(view, rid):
    return any(s.request_id == rid and s.is_decoding for s in view.running)


def test_speculative_decoding_end_to_end_and_the_acceptance_estimate():
    from formulations.interface import Formulation

    Formulation.register(SpeculatingFcfs)
    requests = tuple(make_req(f"r{i}", 0.2 * i, prompt=60, output=800) for i in range(6))
    cfg = config(
        formulation=f"{__name__}:SpeculatingFcfs",
        max_spec_tokens=3,
        true_acceptance_rate=0.6,
        spec_acceptance_prior=0.9,
    )
    from lab.simulator import Simulation

    sim = Simulation(Workload("spec", requests), cfg)
    result = sim.run()
    assert all(r.finished and len(r.token_times_s) == 800 for r in result.records)
    # fewer steps than tokens: drafts were accepted; the fast-forward never runs speculative steps
    assert result.num_steps < 800 and result.num_fast_forward_steps == 0
    estimates = sim.core.replica(0).formulation.estimates
    assert estimates[0] == pytest.approx(0.9)
    # about 3,500 draft-token trials: the estimate's standard deviation is about 0.008
    assert sim.core.replica(0).spec_acceptance_rate == pytest.approx(0.6, abs=0.03)
