"""Where simulated engines serving real traffic stop: the true lengths of a replayed trace.

A simulated engine has no model to say when a request ends. In the simulator it is told through
each request's payload; behind the planner daemon the payload carries only what a client sends (a
`max_tokens` cap), because the planner must never see the true length. `slos-serve engine --engine
sim --output-lengths FILE` reads the true lengths from a JSON-lines file that the replaying client
writes before it submits (`lab/replay.py`): one object per request,
`{"request_id", "prompt_tokens", "output_tokens", "thinking_tokens"}`. The engine stops a listed
request at its true length (its payload's cap still applies) and reports the end of its thinking;
an unlisted request runs to its cap. The file is read again whenever it changed and an unknown
request arrives, so the engine can start before the replay writes it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class TrueLength:
    num_prompt_tokens: int  # the original prompt (a moved request's payload holds more)
    num_output_tokens: int
    num_thinking_tokens: int = 0


class TrueLengths:
    """The lengths file, read lazily (see the module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._stamp: tuple[float, int] | None = None
        self._lengths: dict[str, TrueLength] = {}

    def get(self, request_id: str) -> TrueLength | None:
        if request_id not in self._lengths:
            self._reload()
        return self._lengths.get(request_id)

    def _reload(self) -> None:
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            return
        stamp = (stat.st_mtime, stat.st_size)
        if stamp == self._stamp:
            return
        self._stamp = stamp
        lengths: dict[str, TrueLength] = {}
        for number, line in enumerate(self.path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                lengths[str(row["request_id"])] = TrueLength(
                    int(row["prompt_tokens"]),
                    int(row["output_tokens"]),
                    int(row.get("thinking_tokens", 0)),
                )
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{self.path}:{number}: not a length row: {exc}") from None
        self._lengths = lengths


def write_true_lengths(path: str | Path, rows: list[tuple[str, int, int, int]]) -> None:
    """(request id, prompt tokens, output tokens, thinking tokens) rows, written atomically."""
    path = Path(path)
    text = "".join(
        json.dumps(
            {
                "request_id": rid,
                "prompt_tokens": prompt,
                "output_tokens": output,
                "thinking_tokens": thinking,
            }
        )
        + "\n"
        for rid, prompt, output, thinking in rows
    )
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(text)
    temporary.replace(path)
