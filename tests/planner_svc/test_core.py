"""The planner core: plan validation, forward-on-rejection and fallbacks, verdicts given once,
re-planning triggers, error safety net, and a dead replica's requests finishing elsewhere."""

from collections import Counter

import pytest

from formulations import registry
from formulations.interface import Formulation
from formulations.plan import Decision, Plan, Step, Verdict
from lab.simulator import SimConfig, simulate
from lab.workloads.workload import Workload
from planner_svc.core import PlannerCore
from planner_svc.plan_check import PlanError
from planner_svc.replica import ReplicaSpec
from planner_svc.router import RoundRobinRouter
from planner_svc.triggers import ReplanPolicy
from tests.factories import SIMPLE_MODEL, make_req
from wire.protocol import StepReport


class Scripted(Formulation):
    """A formulation whose plan is a function of the view (for tests)."""

    name = "scripted"

    def __init__(self, fn):
        self.fn = fn
        self.calls = 0

    def plan(self, view):
        self.calls += 1
        return self.fn(view)


def spec(i, blocks=1000, max_spec=0, role="mixed"):
    return ReplicaSpec(i, SIMPLE_MODEL, blocks, 16, max_spec, role)


def admit_and_prefill(view):
    decisions = {s.request_id: Decision(Verdict.ADMITTED) for s in view.waiting}
    states = [*view.running, *view.waiting]
    step = Step({s.request_id: s.num_pending_tokens for s in states if not s.is_finished})
    return Plan(steps=(step,) if step.num_tokens else (), decisions=decisions)


def core_with(fn, n=1, **kwargs):
    return PlannerCore([spec(i) for i in range(n)], lambda s: Scripted(fn), **kwargs)


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "bad_plan, message",
    [
        (
            lambda v: Plan(
                steps=(Step({"nobody": 1}),), decisions={"a": Decision(Verdict.ADMITTED)}
            ),
            "unknown request",
        ),
        (
            lambda v: Plan(steps=(Step({"a": 101}),), decisions={"a": Decision(Verdict.ADMITTED)}),
            "101 tokens",
        ),
        (lambda v: Plan(steps=(Step({"a": 50}),), decisions={}), "unknown request"),  # not admitted
        (
            lambda v: Plan(
                steps=(Step({"a": 100}, {"a": 1}),), decisions={"a": Decision(Verdict.ADMITTED)}
            ),
            "speculative",
        ),
        (lambda v: Plan(decisions={"zz": Decision(Verdict.ADMITTED)}), "not a waiting request"),
        (lambda v: Plan(preempt=("a",)), "not running"),
        (lambda v: Plan(steps=(Step({}),)), "empty"),
        (
            lambda v: Plan(
                repeat=(Step({"a": 1, "nobody": 1}),), decisions={"a": Decision(Verdict.ADMITTED)}
            ),
            "unknown request",
        ),
        (
            lambda v: Plan(repeat=(Step({"a": 101}),), decisions={"a": Decision(Verdict.ADMITTED)}),
            "101 tokens",
        ),
    ],
)
def test_bad_plans_raise_naming_the_formulation(bad_plan, message):
    core = core_with(bad_plan)
    with pytest.raises(PlanError, match=message) as info:
        core.submit(make_req("a", prompt=100), 0.0)
    assert "'scripted'" in str(info.value)


def test_tokens_after_the_last_output_are_rejected():
    def plan(view):
        return Plan(
            steps=(Step({"a": 100}), Step({"a": 1}), Step({"a": 1})),
            decisions={"a": Decision(Verdict.ADMITTED)},
        )

    with pytest.raises(PlanError, match="all its output tokens"):
        core_with(plan).submit(make_req("a", prompt=100, output=2), 0.0)


def test_spec_tokens_beyond_the_engine_maximum():
    def plan(view):
        if view.waiting:
            return Plan(steps=(Step({"a": 10}),), decisions={"a": Decision(Verdict.ADMITTED)})
        return Plan(steps=(Step({"a": 1}, {"a": 3}),))

    core = PlannerCore([spec(0, max_spec=2)], lambda s: Scripted(plan))
    core.submit(make_req("a", prompt=10, output=50), 0.0)
    report = StepReport(0, 0.0, 0.1, {"a": 10}, {"a": 1}, num_free_blocks=999)
    with pytest.raises(PlanError, match="3 speculative tokens"):
        core.on_step(0, report, 0.1)


# ---------------------------------------------------------------- routing and verdicts


def reject_on(replicas):
    def make(s):
        def fn(view):
            if view.replica_id in replicas:
                return Plan(
                    decisions={
                        w.request_id: Decision(Verdict.REJECTED, "full") for w in view.waiting
                    }
                )
            return admit_and_prefill(view)

        return Scripted(fn)

    return make


def test_forward_on_rejection_reaches_an_admitting_replica():
    core = PlannerCore([spec(0), spec(1)], reject_on({0}), router=RoundRobinRouter(max_forwards=1))
    out = core.submit(make_req("a"), 0.0)
    assert out.forwards == [("a", 0, 1)]
    assert [(rid, rep, d.verdict) for rid, rep, d in out.verdicts] == [("a", 1, Verdict.ADMITTED)]
    assert out.plans[1].new_requests[0].request_id == "a"
    assert out.plans[0].new_requests == () and not out.plans[0].steps


def test_rejected_everywhere_is_rejected_once():
    core = PlannerCore(
        [spec(0), spec(1)], reject_on({0, 1}), router=RoundRobinRouter(max_forwards=1)
    )
    out = core.submit(make_req("a"), 0.0)
    assert out.forwards == [("a", 0, 1)]
    assert len(out.verdicts) == 1
    rid, replica_id, decision = out.verdicts[0]
    assert (rid, replica_id, decision.verdict) == ("a", None, Verdict.REJECTED)
    assert core.num_unfinished == 0


def test_max_forwards_zero_rejects_at_once():
    core = PlannerCore([spec(0), spec(1)], reject_on({0}), router=RoundRobinRouter(max_forwards=0))
    out = core.submit(make_req("a"), 0.0)
    assert out.forwards == [] and out.verdicts[0][2].verdict is Verdict.REJECTED


def test_best_effort_fallback():
    core = PlannerCore(
        [spec(0), spec(1)], reject_on({0, 1}), router=RoundRobinRouter(1), fallback="best_effort"
    )
    out = core.submit(make_req("a"), 0.0)
    ((rid, replica_id, decision),) = out.verdicts
    assert decision.verdict is Verdict.BEST_EFFORT and replica_id in (0, 1)
    assert core.request_state("a").verdict is Verdict.BEST_EFFORT
    assert any(r.request_id == "a" for r in out.plans[replica_id].new_requests)


def test_undecided_waiting_request_stays_and_is_retried_on_the_timer():
    decide = {"now": False}

    def fn(view):
        if not decide["now"]:
            return Plan()
        return admit_and_prefill(view)

    core = core_with(fn, replan=ReplanPolicy(timer_s=0.5))
    out = core.submit(make_req("a"), 0.0)
    assert out.verdicts == [] and core.queue_lengths() == {0: (0, 1)}
    assert core.next_timer_s() == pytest.approx(0.5)
    assert core.tick(0.2).plans == {}  # not due
    decide["now"] = True
    out = core.tick(0.5)
    assert out.verdicts[0][2].verdict is Verdict.ADMITTED


def test_verdicts_are_final_and_given_once_in_a_busy_multi_replica_run():
    requests = tuple(
        make_req(f"r{i}", 0.01 * i, prompt=300, output=30, ttft_s=0.5) for i in range(300)
    )
    seen = Counter()
    original = PlannerCore.submit

    from planner_svc import core as core_module

    class Counting(core_module.PlannerCore):
        def _count(self, out):
            for rid, _, _ in out.verdicts:
                seen[rid] += 1
            return out

        def submit(self, request, now_s, payload=None):
            return self._count(original(self, request, now_s, payload))

        def on_step(self, replica_id, report, now_s, num_steps=1):
            return self._count(super().on_step(replica_id, report, now_s, num_steps))

        def tick(self, now_s):
            return self._count(super().tick(now_s))

    import lab.simulator as sim_module

    saved = sim_module.PlannerCore
    sim_module.PlannerCore = Counting
    try:
        result = simulate(
            Workload("busy", requests),
            SimConfig(perf_model=SIMPLE_MODEL, num_replicas=3, num_blocks_per_replica=200),
        )
    finally:
        sim_module.PlannerCore = saved
    assert set(seen) == {r.request_id for r in requests}
    assert set(seen.values()) == {1}
    assert all(r.finished for r in result.records)


# ---------------------------------------------------------------- triggers and safety net


def test_busy_replica_replans_only_at_step_boundaries():
    fn_calls = []

    def fn(view):
        fn_calls.append(view.now_s)
        return admit_and_prefill(view)

    core = core_with(fn)
    core.submit(make_req("a", prompt=50, output=5), 0.0)
    assert len(fn_calls) == 1
    out = core.submit(make_req("b", prompt=50, output=5), 0.01)  # engine busy with step 0
    assert out.plans == {} and len(fn_calls) == 1
    out = core.on_step(0, StepReport(0, 0.0, 0.06, {"a": 50}, {"a": 1}, num_free_blocks=996), 0.06)
    assert len(fn_calls) == 2 and out.plans[0].start_step_id == 1
    assert {r.request_id for r in out.plans[0].new_requests} == {"b"}


def test_stale_and_duplicate_reports_are_ignored():
    core = core_with(admit_and_prefill)
    core.submit(make_req("a", prompt=50, output=5), 0.0)
    report = StepReport(0, 0.0, 0.06, {"a": 50}, {"a": 1}, num_free_blocks=996)
    core.on_step(0, report, 0.06)
    assert core.request_state("a").num_generated_tokens == 1
    assert core.on_step(0, report, 0.07).plans == {}
    assert core.request_state("a").num_generated_tokens == 1


def test_repeated_errors_make_the_core_preempt():
    def fn(view):
        decisions = {s.request_id: Decision(Verdict.ADMITTED) for s in view.waiting}
        states = [*view.running, *view.waiting]
        return Plan(
            steps=(
                Step(
                    {s.request_id: 1 for s in states if not s.is_finished and s.num_pending_tokens}
                ),
            ),
            decisions=decisions,
        )

    core = core_with(fn)
    core.submit(make_req("a", prompt=1, output=50), 0.0)
    core.on_step(0, StepReport(0, 0.0, 0.01, {"a": 1}, {"a": 1}, num_free_blocks=999), 0.01)
    out = core.submit(make_req("b", prompt=1, output=50), 0.01)
    error = StepReport(1, 0.01, 0.01, num_free_blocks=0, error="out of KV blocks")
    out = core.on_step(0, error, 0.01)
    assert out.preempted == [] and 0 in out.plans
    error2 = StepReport(2, 0.01, 0.01, num_free_blocks=0, error="out of KV blocks")
    out = core.on_step(0, error2, 0.01)
    assert [rid for rid, _ in out.preempted] == ["a"]  # the newest holding KV (b has none yet)
    assert out.plans[0].preemptions == tuple(rid for rid, _ in out.preempted)


def test_slow_step_triggers_a_replan_at_the_boundary():
    calls = []

    def fn(view):
        calls.append(view.now_s)
        if not view.waiting:
            return Plan(repeat=(Step({"a": 1}),))
        decisions = {"a": Decision(Verdict.ADMITTED)}
        return Plan(steps=(Step({"a": 10}), Step({"a": 1}), Step({"a": 1})), decisions=decisions)

    core = core_with(fn, replan=ReplanPolicy(slow_step_ratio=1.5))
    core.submit(make_req("a", prompt=10, output=20), 0.0)
    predicted = SIMPLE_MODEL.step_time_s(10)
    core.on_step(
        0, StepReport(0, 0.0, predicted, {"a": 10}, {"a": 1}, num_free_blocks=999), predicted
    )
    assert len(calls) == 1  # on time, plan not used up
    slow_end = predicted + 2 * SIMPLE_MODEL.step_time_s(1)
    core.on_step(
        0, StepReport(1, predicted, slow_end, {"a": 1}, {"a": 1}, num_free_blocks=999), slow_end
    )
    assert len(calls) == 2


# ---------------------------------------------------------------- faults


def test_dead_replica_requests_finish_elsewhere():
    requests = tuple(make_req(f"r{i}", 0.02 * i, prompt=200, output=100) for i in range(40))
    cfg = SimConfig(
        perf_model=SIMPLE_MODEL,
        num_replicas=2,
        num_blocks_per_replica=2000,
        replica_failures=((1.0, 0),),
    )
    result = simulate(Workload("fault", requests), cfg)
    assert all(r.finished and len(r.token_times_s) == 100 for r in result.records)
    moved = [r for r in result.records if r.replica_id == 0 and r.token_times_s[-1] > 1.0]
    assert moved, "some requests of replica 0 were unfinished when it died"


def test_removing_the_last_replica_reports_requests_as_failed():
    core = core_with(admit_and_prefill)
    core.submit(make_req("a"), 0.0)
    out = core.remove_replica(0, 0.1)
    assert out.failed == [("a", "no replica left for a mixed request")]


def test_real_baseline_factory_from_the_registry():
    core = PlannerCore([spec(0)], lambda s: registry.create("vllm_fcfs"))
    out = core.submit(make_req("a", prompt=100), 0.0)
    assert out.plans[0].steps[0].num_tokens == {"a": 100}


# ---------------------------------------------------------------- accessors, spec estimate, abort


def test_acceptance_rate_estimate_moves_from_the_prior_to_the_reports():
    seen = []

    def fn(view):
        seen.append(view.spec_acceptance_rate)
        if view.waiting:
            return Plan(steps=(Step({"a": 10}),), decisions={"a": Decision(Verdict.ADMITTED)})
        return Plan(steps=(Step({"a": 1}, {"a": 4}),))

    core = PlannerCore([spec(0, max_spec=4)], lambda s: Scripted(fn), spec_acceptance_prior=0.5)
    core.submit(make_req("a", prompt=10, output=1000), 0.0)
    assert seen == [0.5]
    core.on_step(0, StepReport(0, 0.0, 0.02, {"a": 10}, {"a": 1}, num_free_blocks=999), 0.02)
    t = 0.02
    for i in range(1, 200):  # every draft accepted
        report = StepReport(
            i, t, t + 0.011, {"a": 5}, {"a": 5}, {"a": 4}, {"a": 4}, num_free_blocks=999
        )
        t += 0.011
        core.on_step(0, report, t)
    # prior worth 20 proposals at 0.5, then 199 * 4 proposals all accepted
    expected = (0.5 * 20 + 199 * 4) / (20 + 199 * 4)
    assert core.replica(0).spec_acceptance_rate == pytest.approx(expected)
    assert seen[-1] == pytest.approx(expected)  # the formulation sees it in its view


def test_abort_frees_the_request_and_tells_the_engine():
    core = core_with(admit_and_prefill)
    core.submit(make_req("a", prompt=50, output=5), 0.0)
    out = core.abort("a", 0.01)
    assert out.aborts == [("a", 0)] and core.num_unfinished == 0
    assert core.abort("unknown", 0.02).aborts == []


def test_least_loaded_routing_and_added_replicas():
    from planner_svc.router import LeastLoadedRouter

    core = PlannerCore([spec(0)], lambda s: Scripted(admit_and_prefill), router=LeastLoadedRouter())
    core.submit(make_req("a", prompt=50, output=50), 0.0)
    core.add_replica(spec(1), 0.0)
    out = core.submit(make_req("b", prompt=50, output=50), 0.0)
    assert out.verdicts[0][1] == 1  # the new, empty replica
    assert core.queue_lengths() == {0: (1, 0), 1: (1, 0)}
    with pytest.raises(ValueError, match="already exists"):
        core.add_replica(spec(1), 0.0)


def test_duplicate_request_ids_are_refused():
    core = core_with(admit_and_prefill)
    core.submit(make_req("a"), 0.0)
    with pytest.raises(ValueError, match="already being served"):
        core.submit(make_req("a"), 0.1)


def test_an_undecided_request_gets_its_verdict_by_its_ttft_deadline():
    """A formulation with admission control that leaves a request waiting: the core answers for
    it (the fallback verdict) at its TTFT deadline, and its timer says when; a queueing policy
    (admission_control False) is left alone."""
    from planner_svc.core import EXPIRED_REASON

    def undecided(view):
        return Plan()

    core = core_with(undecided)
    request = make_req("a", prompt=100, ttft_s=0.3)
    assert core.submit(request, 0.0).verdicts == []
    assert core.next_timer_s() == pytest.approx(min(0.1, request.ttft_deadline_s))
    assert core.tick(0.29).verdicts == []
    out = core.tick(request.ttft_deadline_s)
    assert [(v.request_id, v.replica_id, v.decision.verdict) for v in out.verdicts] == [
        ("a", None, Verdict.REJECTED)
    ]
    assert out.verdicts[0].decision.reason == EXPIRED_REASON and core.num_unfinished == 0

    class Queueing(Scripted):
        admission_control = False

    queueing = PlannerCore([spec(0)], lambda s: Queueing(undecided))
    queueing.submit(make_req("b", prompt=100, ttft_s=0.3), 0.0)
    assert queueing.tick(1.0).verdicts == [] and queueing.num_unfinished == 1


@pytest.mark.parametrize("kv_migration", [True, False])
def test_a_prefilled_request_leaves_the_prefill_replica(kv_migration):
    """Disaggregation: after its first token a request moves to the decode replica, with its KV
    (a Migration the shell carries out) or, without KV transfer, recomputing there (the prefill
    engine drops it and the decode engine gets the payload resumed after that token)."""
    core = PlannerCore(
        [spec(0, role="prefill"), spec(1, role="decode")],
        lambda s: Scripted(admit_and_prefill),
        kv_migration=kv_migration,
    )
    core.submit(make_req("a", prompt=50, output=5), 0.0)
    report = StepReport(0, 0.0, 0.06, {"a": 50}, {"a": 1}, num_free_blocks=996)
    out = core.on_step(0, report, 0.06)
    if kv_migration:
        (migration,) = out.migrations
        assert (migration.from_replica, migration.to_replica) == (0, 1)
        assert migration.num_computed_tokens == 50 and migration.num_generated_tokens == 1
        assert migration.payload.num_prompt_tokens == 50 and out.aborts == []
    else:
        assert out.migrations == [] and out.aborts == [("a", 0)]
        (payload,) = out.plans[1].new_requests
        assert (payload.num_prompt_tokens, payload.max_new_tokens) == (51, 4)
        assert core.request_state("a").num_computed_tokens == 0  # recomputed on replica 1


def test_a_timer_is_due_at_the_time_next_timer_names():
    """next_timer_s names last_plan_s + timer_s; a tick at exactly that float re-plans (the
    difference now - last_plan_s can round below timer_s, which left the simulator ticking at one
    instant for ever)."""
    from planner_svc.triggers import should_replan

    core = PlannerCore(
        [ReplicaSpec(0, SIMPLE_MODEL, num_total_blocks=100)], lambda s: registry.create("slos_dp")
    )
    rep = core.replica(0)
    rep.waiting["r"] = None  # work, and no plan running
    rep.last_plan_s = 77.39213956933683
    due_s = rep.last_plan_s + 0.1
    assert due_s - rep.last_plan_s < 0.1  # the rounding that hid it
    assert should_replan(rep, ReplanPolicy(timer_s=0.1), due_s, at_boundary=False)


def test_a_protected_round_past_its_ttft_sets_no_timer():
    """A later round of an admitted chain is never expired for want of a verdict (it waits for
    the next plan), so its TTFT deadline must not be a timer: on a busy replica a past deadline
    would be due at every instant."""
    from formulations.state import RequestState

    core = PlannerCore(
        [ReplicaSpec(0, SIMPLE_MODEL, num_total_blocks=100)], lambda s: registry.create("slos_dp")
    )
    rep = core.replica(0)
    rep.num_live_repeat = 1  # busy: re-planned only at its next step boundary
    rep.waiting["r"] = RequestState(make_req("r", 0.0, ttft_s=1.0), protected=True)
    assert core.next_timer_s() is None and core.next_verdict_deadline_s() is None
    out = core.tick(5.0)
    assert not out.verdicts and "r" in rep.waiting
