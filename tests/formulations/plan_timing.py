"""Replays a plan on the performance model (no simulator, no planner code) and reports every output
token's time, so tests can check admitted requests' deadlines on the plan itself."""

from __future__ import annotations

from formulations.deadlines import token_deadline_s
from formulations.plan import Plan, Step
from formulations.state import ReplicaView, RequestState


def replay(plan: Plan, view: ReplicaView, max_cycles: int = 2000) -> dict[str, list[float]]:
    """Token times per request: explicit steps, then the repeat cycle until admitted decoders are
    done. Finished requests are skipped in the cycle, as engines do."""
    states: dict[str, list[int]] = {}  # rid -> [pending, remaining outputs]
    preempted = set(plan.preempt)
    for s in view.running:
        computed = 0 if s.request_id in preempted else s.num_computed_tokens
        states[s.request_id] = [s.num_tokens - computed, s.num_remaining_output_tokens]
    for s in view.waiting:
        states[s.request_id] = [s.request.num_prompt_tokens, s.request.num_output_tokens]
    times: dict[str, list[float]] = {rid: [] for rid in states}
    clock = [view.now_s]

    def run(step: Step, skip_finished: bool) -> None:
        tokens = {
            r: n for r, n in step.num_tokens.items() if not (skip_finished and states[r][1] <= 0)
        }
        spec = {r: s for r, s in step.num_spec_tokens.items() if r in tokens}
        if not tokens:
            return
        clock[0] += view.perf_model.step_time_s(
            sum(tokens.values()) + sum(spec.values()), max(spec.values(), default=0)
        )
        for rid, n in tokens.items():
            entry = states[rid]
            assert entry[1] > 0, f"{rid} scheduled after finishing"
            assert 1 <= n <= entry[0], f"{rid}: {n} tokens with {entry[0]} pending"
            entry[0] -= n
            if entry[0] == 0:
                entry[1] -= 1
                entry[0] = 1
                times[rid].append(clock[0])

    for step in plan.steps:
        run(step, False)
    in_cycle = {r for step in plan.repeat for r in step.num_tokens}
    for _ in range(max_cycles):
        if all(states[r][1] <= 0 for r in in_cycle):
            break
        for step in plan.repeat:
            run(step, True)
    return times


def deadline_misses(
    plan: Plan, view: ReplicaView, ids: set[str], slack_s: float = 1e-9
) -> list[str]:
    """Requests in `ids` whose tokens in the replay miss a cumulative deadline (strict: no 5%)."""
    times = replay(plan, view)
    by_id: dict[str, RequestState] = {
        s.request_id: s for s in list(view.running) + list(view.waiting)
    }
    misses = []
    for rid in ids:
        state = by_id[rid]
        first = state.first_token_s
        done = state.num_generated_tokens
        token_times = times[rid]
        if done + len(token_times) < state.request.num_output_tokens:
            misses.append(f"{rid}: unfinished ({done + len(token_times)} tokens)")
            continue
        for i, t in enumerate(token_times):
            n = done + i + 1
            if first is None:
                first = (
                    t  # the first token sets the decode clock (capped below by the TTFT deadline)
                )
            due_s = (
                state.request.ttft_deadline_s
                if n == 1
                else token_deadline_s(state.request, n, first)
            )
            if t > due_s + slack_s:
                misses.append(f"{rid}: token {n} at {t:.4f} > {due_s:.4f}")
                break
    return misses
