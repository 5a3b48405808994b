"""An experiment: one scenario (or a user trace) served by one configuration, run in the
virtual-time simulator at a chosen arrival rate. `slos-serve simulate`, `slos-serve capacity` and
the capacity benchmark all go through it, so they build workloads and configurations the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from formulations import registry
from formulations.perf_model import PerfModel, TruthModel, perf_model_preset
from formulations.refit import RefitParams
from lab.report import RunReport, build_report
from lab.workloads import (
    BurstParams,
    TraceWindow,
    WorkloadOptions,
    build_workload,
    trace_workload,
)
from lab.workloads.workload import Workload


def load_perf_model(name_or_path: str) -> PerfModel:
    """A preset name (`opt-13b-2xa100`, ...) or a JSON file written by the profiler
    (`{"name": ..., "lines": [[k_token_s, k_spec_s, intercept_s], ...]}`)."""
    path = Path(name_or_path)
    if name_or_path.endswith(".json") or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"performance model file {path} does not exist")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc.msg})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object with 'lines'")
        return PerfModel.from_dict(data)
    return perf_model_preset(name_or_path)


def check_formulation(name: str) -> str:
    """The formulation name if it is registered (or a `module:Class` path); a clear error
    otherwise."""
    registry.formulation_class(name)
    return name


@dataclass(frozen=True)
class Experiment:
    """Everything but the formulation and the rate. `num_replicas=None` uses the fewest replicas a
    formulation can run on (2 for a disaggregated one: a prefill and a decode replica, else 1)."""

    scenario: str = "chatbot"
    trace_path: str | None = None  # a user trace replaces the scenario
    perf_model: str = "opt-13b-2xa100"
    num_replicas: int | None = None
    max_spec_tokens: int = 0
    num_requests: int | None = 300
    duration_s: float | None = None
    start_index: int | None = None  # None: the scenario's default window start
    seed: int = 0
    arrivals: str | None = None
    mean_burst_size: float = 4.0  # for bursty arrivals
    max_model_len: int = 8192
    lengths: str = "predicted"  # what the planner knows of output lengths (SimConfig.lengths)
    num_kv_blocks: int | None = None  # KV blocks per replica (None: the preset's GPU memory)
    # The engines' truth beyond the planner's model (TruthModel): seconds per context token
    # attended and multiplicative noise; each run draws its noise from a fresh generator seeded
    # with `seed`, so that a run is reproducible whatever ran before it.
    truth_context_s: float = 0.0
    truth_noise: float = 0.0
    refit: RefitParams | None = None  # the planner refits its model online (planner_svc/refit.py)
    sim_params: dict[str, Any] = field(default_factory=dict)  # extra SimConfig fields

    def __post_init__(self) -> None:
        if self.num_replicas is not None and self.num_replicas < 1:
            raise ValueError(f"the number of replicas must be at least 1, got {self.num_replicas}")
        if self.max_spec_tokens < 0:
            raise ValueError(f"--spec must be non-negative, got {self.max_spec_tokens}")
        if self.truth_context_s < 0:
            raise ValueError(f"--truth-context-s must be >= 0, got {self.truth_context_s}")
        if not 0 <= self.truth_noise < 1:
            raise ValueError(f"--truth-noise must be in [0, 1), got {self.truth_noise}")

    @property
    def label(self) -> str:
        return Path(self.trace_path).stem if self.trace_path else self.scenario

    def perf_model_obj(self) -> PerfModel:
        return load_perf_model(self.perf_model)

    def workload(self, rate_rps: float | None) -> Workload:
        """The workload at `rate_rps` (a user trace without a rate keeps its own timestamps)."""
        perf_model = self.perf_model_obj()
        if self.trace_path is not None:
            return trace_workload(
                self.trace_path,
                perf_model,
                rate_rps=rate_rps,
                window=TraceWindow(self.start_index or 0, self.num_requests),
                max_model_len=self.max_model_len,
                max_spec_tokens=self.max_spec_tokens,
            )
        if rate_rps is None:
            raise ValueError("a scenario needs a rate (--rate)")
        options = WorkloadOptions(
            rate_rps=rate_rps,
            num_requests=self.num_requests,
            duration_s=self.duration_s,
            start_index=self.start_index,
            seed=self.seed,
            arrivals=self.arrivals,
            burst=BurstParams(self.mean_burst_size),
            max_model_len=self.max_model_len,
            max_spec_tokens=self.max_spec_tokens,
        )
        return build_workload(self.scenario, perf_model, options)

    def replicas_for(self, formulation: str) -> int:
        if self.num_replicas is not None:
            return self.num_replicas
        return 2 if registry.formulation_class(formulation).disaggregated else 1

    @property
    def has_truth_error(self) -> bool:
        return self.truth_context_s > 0 or self.truth_noise > 0

    def truth(self, perf_model: PerfModel) -> TruthModel | None:
        """The engines' truth (None: exactly the planner's model)."""
        if not self.has_truth_error:
            return None
        return TruthModel(perf_model, self.truth_context_s, self.truth_noise, seed=self.seed)

    def sim_config(self, formulation: str):
        from lab.simulator import SimConfig

        perf_model = self.perf_model_obj()
        params: dict[str, Any] = {"lengths": self.lengths, "max_model_len": self.max_model_len}
        if self.num_kv_blocks is not None:
            params["num_blocks_per_replica"] = self.num_kv_blocks
        if self.has_truth_error:
            params["truth"] = self.truth(perf_model)
        if self.refit is not None:
            params["refit"] = self.refit
        params.update(self.sim_params)
        return SimConfig(
            formulation=check_formulation(formulation),
            num_replicas=self.replicas_for(formulation),
            perf_model=perf_model,
            max_spec_tokens=self.max_spec_tokens,
            seed=self.seed,
            **params,
        )

    def num_gpus(self, formulation: str) -> int:
        config = self.sim_config(formulation)
        return config.num_replicas * config.gpus_per_replica()

    def run(self, formulation: str, rate_rps: float | None) -> tuple[RunReport, Any]:
        """Simulate and report; returns (report, SimResult)."""
        from lab.simulator import simulate

        config = self.sim_config(formulation)
        workload = self.workload(rate_rps)
        result = simulate(workload, config)
        name = f"{self.label} / {formulation}" + (f" @ {rate_rps:g} req/s" if rate_rps else "")
        report = build_report(
            result.records,
            workload,
            duration_s=result.sim_duration_s,
            name=name,
            kv_pinned_block_s=result.kv_pinned_block_s,
        )
        return report, result

    def attainment(self, formulation: str, rate_rps: float) -> float:
        """Share of items (a tool chain counts once) attaining every stage SLO at this rate."""
        report, _ = self.run(formulation, rate_rps)
        return report.attainment
