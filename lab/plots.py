"""Plots of capacity searches: attainment against arrival rate, one line per formulation, the
target as a
horizontal line. Drawn with matplotlib's Agg backend (no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lab.capacity import CapacityResult


def plot_attainment_curves(
    results: Sequence[CapacityResult], path: str | Path, title: str = "", per_gpu: bool = False
) -> Path:
    """Write a PNG (or any format matplotlib infers from the suffix) and return its path.

    With `per_gpu`, the x axis is the rate divided by each configuration's GPU count."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    if not results:
        raise ValueError("nothing to plot: no capacity results")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    try:
        for result in results:
            scale = result.num_gpus if per_gpu else 1
            points = sorted(result.points, key=lambda p: p.rate_rps)
            rates = [p.rate_rps / scale for p in points]
            attainments = [100 * p.attainment for p in points]
            (line,) = ax.plot(rates, attainments, marker="o", markersize=3, label=result.label)
            if result.capacity_rps > 0:
                ax.axvline(
                    result.capacity_rps / scale, color=line.get_color(), linestyle=":", linewidth=1
                )
        target = results[0].target
        ax.axhline(
            100 * target,
            color="black",
            linestyle="--",
            linewidth=1,
            label=f"target {100 * target:.0f}%",
        )
        ax.set_xlabel("arrival rate (req/s per GPU)" if per_gpu else "arrival rate (req/s)")
        ax.set_ylabel("requests attaining every SLO (%)")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        if title:
            ax.set_title(title)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return path


def plot_capacity_bars(
    capacities: dict[str, dict[str, float]],
    path: str | Path,
    ylabel: str = "capacity (req/s per GPU)",
    title: str = "",
) -> Path:
    """Grouped bars: `capacities[scenario][formulation]`, one group per scenario, one bar per
    formulation."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    scenarios = list(capacities)
    formulations = list(dict.fromkeys(p for row in capacities.values() for p in row))
    if not scenarios or not formulations:
        raise ValueError("nothing to plot: no capacities")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    width = 0.8 / len(formulations)
    fig, ax = plt.subplots(figsize=(max(6.4, 1.3 * len(scenarios) + 2), 4.0))
    try:
        for j, formulation in enumerate(formulations):
            xs = [i - 0.4 + (j + 0.5) * width for i in range(len(scenarios))]
            ys = [capacities[s].get(formulation, 0.0) for s in scenarios]
            ax.bar(xs, ys, width=width, label=formulation)
        ax.set_xticks(range(len(scenarios)), scenarios)
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
        if title:
            ax.set_title(title)
        ax.legend(fontsize=8, ncol=min(3, len(formulations)))
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return path
