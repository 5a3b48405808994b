"""Workloads: the evaluation scenarios, trace replay, and arrival processes."""

from lab.workloads.arrivals import BurstParams
from lab.workloads.multi_turn_chat import MultiTurnChatParams
from lab.workloads.reasoning import ReasoningParams
from lab.workloads.scenario import (
    EVALUATION_SCENARIOS,
    SCENARIO_NAMES,
    WorkloadOptions,
    build_workload,
    trace_workload,
)
from lab.workloads.tool_agent import ToolAgentParams
from lab.workloads.trace import TraceWindow
from lab.workloads.workload import Workload

__all__ = [
    "EVALUATION_SCENARIOS",
    "SCENARIO_NAMES",
    "BurstParams",
    "MultiTurnChatParams",
    "ReasoningParams",
    "ToolAgentParams",
    "TraceWindow",
    "Workload",
    "WorkloadOptions",
    "build_workload",
    "trace_workload",
]
