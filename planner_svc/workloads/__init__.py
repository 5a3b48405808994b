"""Workloads: the six evaluation scenarios, trace replay, and arrival processes."""

from planner_svc.workloads.arrivals import BurstParams
from planner_svc.workloads.reasoning import ReasoningParams
from planner_svc.workloads.scenario import (
    SCENARIO_NAMES,
    WorkloadOptions,
    build_workload,
    trace_workload,
)
from planner_svc.workloads.tool_agent import ToolAgentParams
from planner_svc.workloads.trace import TraceWindow
from planner_svc.workloads.workload import Workload

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
