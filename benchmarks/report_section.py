"""Benchmarks write their results into docs/BENCHMARKS.md, each into its own marked section, so
that running one benchmark never erases another's numbers."""

from __future__ import annotations

import datetime
import platform
import re
from pathlib import Path

BENCHMARKS_MD = Path(__file__).resolve().parent.parent / "docs" / "BENCHMARKS.md"
HEADER = (
    "# Benchmarks\n\n"
    "Every section below is written by the benchmark script it names (`make bench` runs them all).\n"
    "Numbers come from the machine named in each section; ratios are measured within one run.\n"
)


def machine_line() -> str:
    import os

    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def write_section(name: str, body_md: str, command: str) -> None:
    """Replace (or append) the section `name` of docs/BENCHMARKS.md."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    block = (
        f"<!-- BEGIN {name} -->\n{body_md.rstrip()}\n\n"
        f"_Produced by `{command}` on {stamp} ({machine_line()})._\n<!-- END {name} -->"
    )
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else HEADER
    pattern = re.compile(
        rf"<!-- BEGIN {re.escape(name)} -->.*?<!-- END {re.escape(name)} -->", re.S
    )
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    BENCHMARKS_MD.parent.mkdir(parents=True, exist_ok=True)
    BENCHMARKS_MD.write_text(text)
