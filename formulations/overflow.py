"""The safe overflow path: preempt before an engine runs out of KV blocks.

Memory is planned on predicted lengths and paces (memory_timeline.py), so reality can run past the
plan: a request longer than its predicted quantile, drafts accepted more slowly, a re-plan that
changes a request's pace. Before a plan is sent, `overflow_victim` walks its explicit steps and one
pass of its repeat cycle against the replica's free blocks, each request holding
ceil(computed tokens / block size) blocks and reserving its draft tokens during a step (as engines
do). A request whose output reaches its cap frees its blocks; requests that may stop earlier (EOS)
are assumed not to, so the walk never overestimates what is free. If some step would not get its
blocks, something is set aside and the replica planned again: first an admitted request that holds
no KV (preempted earlier, or not started) and that the plan would compute now waits for a later
plan (it resumes only when memory allows, so that preempting does not turn into thrashing); then
the running admitted request with the most slack is preempted (by recompute: it keeps its output
and its verdict, and waits out this plan).

Slack of a request = the time to its next token's deadline, less the time to recompute its KV
alone (a request that can afford to lose its KV loses it, not one that then misses for sure).
Best-effort requests are preempted earlier, by the best-effort memory rule (admission.py).
"""

from __future__ import annotations

import dataclasses

from formulations.plan import Plan, Verdict
from formulations.progress import num_blocks_for
from formulations.state import ReplicaView, RequestState

# Preemptions one plan may make before it gives up (the core's safety net still catches the rest).
MAX_VICTIMS_PER_PLAN = 8


def waiting_resumes(view: ReplicaView, plan: Plan) -> list[RequestState]:
    """When `plan` does not fit the replica's KV blocks: the admitted requests holding no KV
    (preempted earlier, or not started) that the plan would (re)compute; they wait for a later
    plan, so that a preempted request resumes only when memory allows (no thrashing)."""
    if fits(view, plan):
        return []
    named = {rid for step in (*plan.steps, *plan.repeat) for rid in step.num_tokens}
    return [
        s
        for s in view.running
        if s.verdict is Verdict.ADMITTED and s.num_blocks == 0 and s.request_id in named
    ]


def overflow_victim(view: ReplicaView, plan: Plan) -> RequestState | None:
    """The admitted request with the most slack that holds KV, to preempt so that `plan` fits;
    None when it fits (or no admitted request holds KV)."""
    if fits(view, plan):
        return None
    preempted = set(plan.preempt)
    holding = [
        s
        for s in view.running
        if s.verdict is Verdict.ADMITTED and s.num_blocks > 0 and s.request_id not in preempted
    ]
    if not holding:
        return None
    return max(holding, key=lambda s: (_slack_s(s, view), s.request_id))


def set_aside(view: ReplicaView, states: list[RequestState], drop_kv: bool) -> ReplicaView:
    """The view the replica is planned with once `states` wait out this plan (their KV freed when
    `drop_kv`): the core keeps them admitted and running, and later plans resume them."""
    ids = {s.request_id for s in states}
    running = tuple(s for s in view.running if s.request_id not in ids)
    freed = sum(s.num_blocks for s in states) if drop_kv else 0
    return dataclasses.replace(view, running=running, num_free_blocks=view.num_free_blocks + freed)


def _slack_s(state: RequestState, view: ReplicaView) -> float:
    recompute_s = view.perf_model.step_time_s(state.num_tokens)
    return state.next_token_deadline_s - view.now_s - recompute_s


def fits(view: ReplicaView, plan: Plan) -> bool:
    """Walk the explicit steps and one pass of the repeat cycle (the module docstring)."""
    block_size = view.block_size
    states = {s.request_id: s for s in (*view.running, *view.waiting)}
    preempted = set(plan.preempt)
    computed: dict[str, int] = {}
    held: dict[str, int] = {}
    generated: dict[str, int] = {}
    done: set[str] = set()  # produced their last token within the walk: the engine skips them
    free = view.num_free_blocks
    for rid in preempted:
        state = states.get(rid)
        if state is not None:
            free += state.num_blocks
    for step in (*plan.steps, *plan.repeat):
        entries = [(rid, n) for rid, n in step.num_tokens.items() if rid not in done]
        need = 0
        for rid, num_tokens in entries:
            if rid not in computed:
                state = states[rid]
                was_preempted = rid in preempted
                computed[rid] = 0 if was_preempted else state.num_computed_tokens
                held[rid] = 0 if was_preempted else state.num_blocks
                generated[rid] = state.num_generated_tokens
            total = computed[rid] + num_tokens + step.num_spec_tokens.get(rid, 0)
            need += max(0, num_blocks_for(total, block_size) - held[rid])
        if need > free:
            return False
        for rid, num_tokens in entries:
            state = states[rid]
            computed[rid] += num_tokens
            if computed[rid] == state.num_prompt_tokens + generated[rid]:  # a token is sampled
                generated[rid] += 1
            if generated[rid] >= state.request.num_output_tokens:  # done: its blocks are freed
                free += held[rid]
                done.add(rid)
                continue
            blocks = num_blocks_for(computed[rid], block_size)
            free -= blocks - held[rid]
            held[rid] = blocks
    return True
