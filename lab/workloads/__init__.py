"""Workloads: the six evaluation scenarios, trace replay, and arrival processes."""

from lab.workloads.arrivals import BurstParams
from lab.workloads.reasoning import ReasoningParams
from lab.workloads.scenario import (
    SCENARIO_NAMES,
    WorkloadOptions,
    build_workload,
    trace_workload,
)
from lab.workloads.tool_agent import ToolAgentParams
from lab.workloads.trace import TraceWindow
from lab.workloads.workload import Workload

__all__ = [
    "SCENARIO_NAMES",
    "BurstParams",
    "ReasoningParams",
    "ToolAgentParams",
    "TraceWindow",
    "Workload",
    "WorkloadOptions",
    "build_workload",
    "trace_workload",
]
