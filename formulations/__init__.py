"""Pure planning math for SLOs-Serve: requests and SLOs, the performance model, the plan type, the
formulation interface and its implementations. No torch, no zmq, no clocks, no I/O."""

from formulations.deadlines import check_attainment, token_deadline_s
from formulations.interface import Formulation
from formulations.perf_model import PerfModel, TruthModel, perf_model_preset
from formulations.plan import Decision, Plan, Step, Verdict
from formulations.request import Request, ToolChain, ToolRound, make_request
from formulations.slo import SLO, slo_preset
from formulations.state import ReplicaView, RequestState

__all__ = [
    "SLO",
    "Decision",
    "Formulation",
    "PerfModel",
    "Plan",
    "ReplicaView",
    "Request",
    "RequestState",
    "Step",
    "ToolChain",
    "ToolRound",
    "TruthModel",
    "Verdict",
    "check_attainment",
    "make_request",
    "perf_model_preset",
    "slo_preset",
    "token_deadline_s",
]
