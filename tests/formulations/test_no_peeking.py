"""The planner never peeks: in every length mode but the `oracle` ablation, no formulation is
shown a request's true output or thinking length. A spy formulation records every request it is
shown; the true lengths are read from the workload, which only the simulated engines see. Before a
reasoning request's engine reports the end of its thinking, its thinking length is the cap; after,
it is what the engine reported (observed, not peeked)."""

from __future__ import annotations

import pytest

from formulations.slos_dp import SlosDP
from formulations.state import ReplicaView
from lab.experiment import Experiment

MAX_MODEL_LEN = 8192


class Spy(SlosDP):
    """slos_dp, recording (request, tokens generated) for every request of every view."""

    seen: list = []

    def plan(self, view: ReplicaView):
        for state in (*view.running, *view.waiting):
            Spy.seen.append((state.request, state.num_generated_tokens))
        return super().plan(view)


def shown(scenario: str, lengths: str) -> tuple[list, dict]:
    Spy.seen = []
    experiment = Experiment(
        scenario=scenario, num_requests=40, lengths=lengths, max_model_len=MAX_MODEL_LEN
    )
    _, result = experiment.run(f"{__name__}:Spy", 0.2)
    truth = {r.request.request_id: r.request for r in result.records}
    assert Spy.seen and len(truth) == 40
    return Spy.seen, truth


@pytest.mark.parametrize("lengths", ["predicted", "max_tokens"])
@pytest.mark.parametrize("scenario", ["reasoning", "chatbot"])
def test_no_true_length_reaches_the_formulation(scenario, lengths):
    seen, truth = shown(scenario, lengths)
    num_thinking_checked = 0
    for request, num_generated in seen:
        true = truth[request.request_id]
        cap = MAX_MODEL_LEN - true.num_prompt_tokens
        assert request.num_output_tokens == cap != true.num_output_tokens
        assert request.hint_output_tokens is None
        if true.num_thinking_tokens and num_generated < true.num_thinking_tokens:
            assert request.num_thinking_tokens == cap  # not ended yet: only the cap is known
            num_thinking_checked += 1
    assert (num_thinking_checked > 0) == (scenario == "reasoning")


def test_the_spy_sees_the_true_lengths_in_the_oracle_ablation():
    """The check above can fail: told the truth, the formulation is shown it."""
    seen, truth = shown("reasoning", "oracle")
    assert all(
        request.num_output_tokens == truth[request.request_id].num_output_tokens
        and request.num_thinking_tokens == truth[request.request_id].num_thinking_tokens
        for request, _ in seen
    )


@pytest.mark.parametrize("lengths", ["predicted", "oracle"])
def test_the_planner_is_not_told_which_round_ends_a_chain(lengths):
    """Whether a tool chain's round is its last is the trace's, not the planner's: it predicts
    whether another round follows (chain_forecast.py). The oracle ablation is told."""
    Spy.seen = []
    experiment = Experiment(scenario="tool_agent", num_requests=20, lengths=lengths)
    _, result = experiment.run(f"{__name__}:Spy", 0.2)
    assert any(r.request.chain_last_round for r in result.records)
    told = any(request.chain_last_round for request, _ in Spy.seen)
    assert told == (lengths == "oracle")
