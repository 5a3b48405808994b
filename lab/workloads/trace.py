"""The token-length traces shipped in `lab/workloads/data/` (see SOURCES.md there), and the
window and context-length filter applied to any list of trace rows."""

from __future__ import annotations

import csv
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import TypeVar

T = TypeVar("T")

# trace name -> file in lab/workloads/data
TRACE_FILES: dict[str, str] = {
    "azure_conv_2023": "azure_conv_2023.csv",
    "azure_code_2023": "azure_code_2023.csv",
    "arxiv_summarization": "arxiv_summarization.csv",
}


@dataclass(frozen=True, slots=True)
class TraceRow:
    """One request of a trace: its token lengths and, for timestamped traces, its arrival."""

    num_prompt_tokens: int
    num_output_tokens: int
    arrival_s: float | None = None  # None: the trace has no timestamps

    @property
    def num_total_tokens(self) -> int:
        return self.num_prompt_tokens + self.num_output_tokens


@dataclass(frozen=True)
class TraceWindow:
    """Which part of a trace to replay: skip `start_index` rows, then take `num_requests` rows that
    pass the context filter (all of them when None)."""

    start_index: int = 0
    num_requests: int | None = None

    def __post_init__(self) -> None:
        if self.start_index < 0:
            raise ValueError(f"start_index must be non-negative, got {self.start_index}")
        if self.num_requests is not None and self.num_requests < 1:
            raise ValueError(f"num_requests must be at least 1, got {self.num_requests}")


@functools.cache
def load_trace(name: str) -> tuple[TraceRow, ...]:
    """Rows of a shipped trace, in file order (cached: the files are read once per process)."""
    try:
        file_name = TRACE_FILES[name]
    except KeyError:
        raise ValueError(f"unknown trace {name!r} (known: {', '.join(TRACE_FILES)})") from None
    text = resources.files("lab.workloads").joinpath("data", file_name).read_text()
    reader = csv.DictReader(text.splitlines())
    rows = []
    for row in reader:
        arrival = row.get("arrived_at")
        rows.append(
            TraceRow(
                num_prompt_tokens=int(row["num_prefill_tokens"]),
                num_output_tokens=int(row["num_decode_tokens"]),
                arrival_s=float(arrival) if arrival is not None else None,
            )
        )
    return tuple(rows)


def max_sequence_tokens(max_model_len: int, max_spec_tokens: int) -> int:
    """Longest prompt + output kept: a verify step may hold `max_spec_tokens` draft tokens beyond
    the sequence, so they must fit in the context too."""
    if max_model_len < 2:
        raise ValueError(f"max_model_len must be at least 2, got {max_model_len}")
    if max_spec_tokens < 0:
        raise ValueError(f"max_spec_tokens must be non-negative, got {max_spec_tokens}")
    return max_model_len - max_spec_tokens


def select_window(
    rows: Sequence[T], window: TraceWindow, max_total_tokens: int, total_tokens: Callable[[T], int]
) -> tuple[list[T], list[int], int]:
    """Rows of the window whose `total_tokens` fit in `max_total_tokens`; for each kept row the
    number of rows dropped before it (so a prefix of k kept rows dropped `dropped_before[k-1]`);
    and the number of rows dropped in the whole scan.

    Rows are scanned from `start_index`; the ones too long are dropped and counted; the scan stops
    once `num_requests` rows were kept.
    """
    if window.start_index >= len(rows):
        raise ValueError(f"window start {window.start_index} is past the trace's {len(rows)} rows")
    kept: list[T] = []
    dropped_before: list[int] = []
    num_dropped = 0
    for row in rows[window.start_index :]:
        if window.num_requests is not None and len(kept) >= window.num_requests:
            break
        if total_tokens(row) > max_total_tokens:
            num_dropped += 1
        else:
            kept.append(row)
            dropped_before.append(num_dropped)
    return kept, dropped_before, num_dropped
