"""`slos-serve engine` that also writes what it measured when it stops, for the fidelity
benchmarks: its adapter's statistics (AdapterStats: steps, busy time, time waiting for plans) and
every executed step's shape and time (tokens, draft steps, context attended: the tokens its
requests had cached, counted from the reports as the profiler and the planner core count them).

    python benchmarks/engine_with_stats.py STATS.json [slos-serve engine arguments...]
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from commands import engine as engine_command
from engine_adapters.adapter import AdapterConfig, EngineAdapter
from engine_adapters.engine import Engine, EngineInfo, EngineRequest
from formulations.plan import Step
from wire.protocol import StepReport


class StepLog(Engine):
    """Delegates to an engine and logs each executed step as [tokens, draft steps, context, s]."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.cached: dict[str, int] = {}
        self.steps: list[list[float]] = []

    def info(self) -> EngineInfo:
        return self.engine.info()

    def add_request(self, request: EngineRequest) -> None:
        self.engine.add_request(request)
        self.cached[request.request_id] = 0

    def execute(self, step: Step, step_id: int) -> StepReport:
        context = sum(self.cached.get(rid, 0) for rid in step.num_tokens)
        report = self.engine.execute(step, step_id)
        if report.ok and report.num_computed_tokens:
            self.steps.append(
                [step.num_batched_tokens, step.spec_steps, context, report.step_time_s]
            )
        for rid, num in report.num_computed_tokens.items():
            self.cached[rid] = self.cached.get(rid, 0) + num
        for rid in report.finished:
            self.cached.pop(rid, None)
        return report

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)
        self.cached.pop(request_id, None)

    def preempt(self, request_id: str) -> None:
        self.engine.preempt(request_id)
        if request_id in self.cached:
            self.cached[request_id] = 0

    @property
    def num_free_blocks(self) -> int:
        return self.engine.num_free_blocks


def main(argv: list[str]) -> int:
    stats_path = Path(argv[0])
    parser = argparse.ArgumentParser()
    engine_command.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    engine = StepLog(engine_command.build_engine(args))
    config = AdapterConfig(connect=args.connect, engine_id=args.engine_id)
    adapter = EngineAdapter(engine, config)
    signal.signal(signal.SIGTERM, lambda *_: adapter.stop())
    try:
        adapter.run()
    except KeyboardInterrupt:
        adapter.stop()
    stats = adapter.stats
    summary = {
        "num_steps": stats.num_steps,
        "num_step_errors": stats.num_step_errors,
        "busy_s": stats.busy_s,
        "plan_wait_s": stats.plan_wait_s,
        "idle_s": stats.idle_s,
        "plan_wait_fraction": stats.plan_wait_fraction,
        "num_late_plans": stats.num_late_plans,
        "steps": engine.steps,
    }
    stats_path.write_text(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
