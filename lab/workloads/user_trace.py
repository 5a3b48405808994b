"""A user's own trace, replayed with `--trace FILE` (format documented in docs/WORKLOADS.md).

CSV (header required; column order free):

    arrival_s,prompt_tokens,output_tokens,slo_class[,thinking_tokens]

JSONL (one object per line; blank lines ignored): the same keys, or a tool chain with `rounds`:

    {"arrival_s": 0.5, "prompt_tokens": 900, "output_tokens": 120, "slo_class": "chatbot"}
    {"arrival_s": 1.0, "rounds": [{"prompt_tokens": 1500, "output_tokens": 40},
                                  {"prompt_tokens": 300, "output_tokens": 90, "tool_delay_s": 1.2}]}

`slo_class` names an SLO preset (formulations.slo.SLO_PRESETS). Every problem is reported as one
line naming the file, the line and what is wrong.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

from formulations.request import ToolChain, ToolRound
from formulations.slo import SLO_PRESETS

REQUIRED_COLUMNS = ("arrival_s", "prompt_tokens", "output_tokens", "slo_class")


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One single-call request of a user trace."""

    arrival_s: float
    num_prompt_tokens: int
    num_output_tokens: int
    slo_class: str
    num_thinking_tokens: int = 0

    @property
    def num_total_tokens(self) -> int:
        return self.num_prompt_tokens + self.num_output_tokens


TraceItem = TraceRequest | ToolChain


class TraceFormatError(ValueError):
    """A malformed user trace; the message names file and line."""


def read_user_trace(path: str | Path) -> list[TraceItem]:
    """Items of a user trace, sorted by arrival. `.jsonl`/`.json` files are JSON lines; anything
    else is read as CSV."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trace file {path} does not exist")
    if path.suffix.lower() in (".jsonl", ".json"):
        items = _read_jsonl(path)
    else:
        items = _read_csv(path)
    if not items:
        raise TraceFormatError(f"{path}: the trace holds no requests")
    return sorted(items, key=lambda item: item.arrival_s)


def _read_csv(path: Path) -> list[TraceItem]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise TraceFormatError(f"{path}:1: missing column(s) {', '.join(missing)}")
        items: list[TraceItem] = []
        for row in reader:
            where = f"{path}:{reader.line_num}"
            fields = {k: v for k, v in row.items() if k is not None and v not in (None, "")}
            if None in row:
                raise TraceFormatError(f"{where}: more fields than columns in the header")
            items.append(_request_from_fields(fields, where))
    return items


def _read_jsonl(path: Path) -> list[TraceItem]:
    items: list[TraceItem] = []
    with path.open() as f:
        for line_num, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_num}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TraceFormatError(f"{where}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise TraceFormatError(f"{where}: expected a JSON object")
            if "rounds" in obj:
                items.append(_chain_from_object(obj, where, f"trace-chain-{line_num}"))
            else:
                items.append(_request_from_fields(obj, where))
    return items


def _request_from_fields(fields: dict, where: str) -> TraceRequest:
    missing = [c for c in REQUIRED_COLUMNS if c not in fields]
    if missing:
        raise TraceFormatError(f"{where}: missing {', '.join(missing)}")
    slo_class = str(fields["slo_class"]).strip()
    if slo_class not in SLO_PRESETS:
        known = ", ".join(sorted(SLO_PRESETS))
        raise TraceFormatError(f"{where}: unknown slo_class {slo_class!r} (known: {known})")
    request = TraceRequest(
        arrival_s=_number(fields, "arrival_s", where),
        num_prompt_tokens=_count(fields, "prompt_tokens", where, minimum=1),
        num_output_tokens=_count(fields, "output_tokens", where, minimum=1),
        slo_class=slo_class,
        num_thinking_tokens=_count(fields, "thinking_tokens", where, minimum=0, default=0),
    )
    if request.num_thinking_tokens > request.num_output_tokens:
        raise TraceFormatError(f"{where}: thinking_tokens exceeds output_tokens")
    return request


def _chain_from_object(obj: dict, where: str, chain_id: str) -> ToolChain:
    rounds_data = obj["rounds"]
    if not isinstance(rounds_data, list) or not rounds_data:
        raise TraceFormatError(f"{where}: rounds must be a non-empty list")
    rounds = []
    for k, data in enumerate(rounds_data):
        if not isinstance(data, dict):
            raise TraceFormatError(f"{where}: round {k + 1} must be an object")
        round_where = f"{where}: round {k + 1}"
        delay_s = _number(data, "tool_delay_s", round_where, default=0.0)
        rounds.append(
            ToolRound(
                num_new_prompt_tokens=_count(data, "prompt_tokens", round_where, minimum=1),
                num_output_tokens=_count(data, "output_tokens", round_where, minimum=1),
                tool_delay_s=delay_s,
            )
        )
    return ToolChain(
        chain_id=str(obj.get("chain_id", chain_id)),
        arrival_s=_number(obj, "arrival_s", where),
        rounds=tuple(rounds),
        slo_class=str(obj.get("slo_class", "tool_agent")),
    )


def _number(fields: dict, key: str, where: str, default: float | None = None) -> float:
    if key not in fields:
        if default is None:
            raise TraceFormatError(f"{where}: missing {key}")
        return default
    try:
        value = float(fields[key])
    except (TypeError, ValueError):
        raise TraceFormatError(f"{where}: {key} must be a number, got {fields[key]!r}") from None
    if not math.isfinite(value) or value < 0:
        raise TraceFormatError(f"{where}: {key} must be a non-negative number, got {fields[key]!r}")
    return value


def _count(fields: dict, key: str, where: str, minimum: int, default: int | None = None) -> int:
    if key not in fields:
        if default is None:
            raise TraceFormatError(f"{where}: missing {key}")
        return default
    raw = fields[key]
    try:
        value = int(str(raw).strip()) if not isinstance(raw, bool) else None
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise TraceFormatError(f"{where}: {key} must be an integer >= {minimum}, got {raw!r}")
    return value
