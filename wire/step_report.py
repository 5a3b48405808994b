"""What an engine reports after each step: the one progress type shared by the simulator's
in-process engines, the engine adapters and the planner core (the wire PROGRESS message carries
the same fields)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class StepReport:
    replica_id: int
    step_id: int
    start_s: float
    end_s: float
    num_computed_tokens: dict[str, int] = field(default_factory=dict)  # tokens computed per request
    num_new_tokens: dict[str, int] = field(
        default_factory=dict
    )  # output tokens produced per request
    num_accepted_spec_tokens: dict[str, int] = field(default_factory=dict)
    num_proposed_spec_tokens: dict[str, int] = field(default_factory=dict)
    new_token_ids: dict[str, list[int]] = field(default_factory=dict)  # empty for the sim engine
    num_free_blocks: int = 0
    finished: tuple[str, ...] = ()  # requests that produced their last token (or hit EOS) this step
    error: str = ""  # non-empty: the step was not executed (e.g. out of KV blocks), nothing changed

    @property
    def step_time_s(self) -> float:
        return self.end_s - self.start_s

    @property
    def ok(self) -> bool:
        return not self.error
