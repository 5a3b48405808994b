"""DistServe-style disaggregation (docs/ALGORITHM.md section 8): separate prefill and decode
replicas.

One instance runs per replica, with the replica's role:
- `prefill`: FCFS batches of whole prompts (no chunking) up to `max_num_batched_tokens` (one longer
  prompt runs alone) while their KV fits in memory. When a request gets its first token the planner
  core hands it to a decode replica (`PlannerCore` migrations); the shell moves its KV with a
  transfer delay (see `lab/simulator.py` for the bandwidth model).
- `decode`: FCFS continuous decoding of every request handed over, preempting the newest by
  recompute when memory runs out; a request whose KV did not arrive (no room) or was preempted is
  recomputed with chunked prefill in the budget left.
- `mixed` (no disaggregation): prefill first, then decode, as vLLM v0.
Admission is by memory only. The prefill:decode split is the simulator's `num_prefill_replicas`
(default 1:1); capacity is normalised by all GPUs of both pools.
"""

from __future__ import annotations

from typing import ClassVar

from formulations.baselines.sarathi import decode_first_step
from formulations.baselines.vllm import TokenBudgetBaseline, VllmPrefillFirst
from formulations.plan import Decision, Plan
from formulations.registry import register
from formulations.state import ReplicaView, RequestState

ROLES = ("prefill", "decode", "mixed")


@register("distserve")
class DistServe(TokenBudgetBaseline):
    disaggregated: ClassVar[bool] = True

    def __init__(
        self, role: str = "prefill", max_num_batched_tokens: int = 8192, max_num_seqs: int = 256
    ) -> None:
        if role not in ROLES:
            raise ValueError(f"distserve role must be one of {ROLES}, got {role!r}")
        super().__init__(max_num_batched_tokens, max_num_seqs)
        self.role = role
        self._prefill_first = VllmPrefillFirst(max_num_batched_tokens, max_num_seqs)

    def plan(self, view: ReplicaView) -> Plan:
        if self.role == "decode":
            return super().plan(view)
        return self._prefill_first.plan(view)  # a prefill replica hands requests off at once

    def schedule(
        self, view: ReplicaView, decisions: dict[str, Decision], queue: list[RequestState]
    ) -> Plan:
        """A decode replica: decodes first, recompute (chunked prefill) in the budget left."""
        budget = self.max_num_batched_tokens
        return decode_first_step(view, decisions, queue, budget, self.max_num_seqs)
