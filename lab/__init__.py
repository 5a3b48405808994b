"""The evaluation lab: simulator, workloads, capacity search, reports, plots, replay."""
