"""Prometheus metrics of the planner daemon (served by prometheus_client's HTTP server).

Each daemon owns its own `CollectorRegistry`, so several daemons (tests) can live in one process.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_TIME_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


class PlannerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.verdicts = Counter(
            "slos_verdicts",
            "Verdicts given, by verdict and SLO class",
            ["verdict", "slo_class"],
            registry=r,
        )
        self.finished = Counter(
            "slos_requests_finished", "Requests that produced all tokens", ["slo_class"], registry=r
        )
        self.attained = Counter(
            "slos_requests_attained",
            "Finished requests that met every SLO",
            ["slo_class"],
            registry=r,
        )
        self.attainment = Gauge(
            "slos_attainment_ratio",
            "Attained / decided requests, by SLO class",
            ["slo_class"],
            registry=r,
        )
        self.replan_time = Histogram(
            "slos_replan_seconds",
            "Planner core time per call",
            ["event"],
            buckets=_TIME_BUCKETS_S,
            registry=r,
        )
        self.step_time_measured = Histogram(
            "slos_step_seconds_measured",
            "Engine step time as reported",
            ["engine_id"],
            buckets=_TIME_BUCKETS_S,
            registry=r,
        )
        self.step_time_predicted = Histogram(
            "slos_step_seconds_predicted",
            "Engine step time per the planner's model",
            ["engine_id"],
            buckets=_TIME_BUCKETS_S,
            registry=r,
        )
        self.queue_length = Gauge(
            "slos_requests_in_flight", "Requests not yet finished or rejected", registry=r
        )
        self.replica_requests = Gauge(
            "slos_replica_requests",
            "Requests per replica, running or waiting for a verdict",
            ["replica", "state"],
            registry=r,
        )
        self.engines = Gauge("slos_engines_alive", "Engines connected and alive", registry=r)
        self.engine_deaths = Counter("slos_engine_deaths", "Engines declared dead", registry=r)
        self.rejected_frames = Counter(
            "slos_rejected_frames",
            "Frames rejected at the socket",
            ["socket", "reason"],
            registry=r,
        )
        self.core_errors = Counter("slos_core_errors", "Planner core calls that raised", registry=r)
        self.plans_sent = Counter("slos_plans_sent", "PLAN messages sent", registry=r)
        # Online refit of each replica's performance model (planner_svc/refit.py).
        self.model_scale = Gauge(
            "slos_perf_model_scale",
            "Refitted model / configured model, on the (tokens, draft steps) part",
            ["engine_id"],
            registry=r,
        )
        self.model_k_context = Gauge(
            "slos_perf_model_context_seconds_per_token",
            "Refitted cost per cached context token a step attends over",
            ["engine_id"],
            registry=r,
        )
        self.model_margin = Gauge(
            "slos_perf_model_margin_ratio",
            "Safety margin the planner adds to the refitted step times",
            ["engine_id"],
            registry=r,
        )
        self.model_overrun = Gauge(
            "slos_perf_model_overrun_ratio",
            "Share of recent steps longer than the planning model predicted",
            ["engine_id"],
            registry=r,
        )
        self.model_drifts = Counter(
            "slos_perf_model_drifts",
            "Drifts of the engine's step times away from the model (each refitted at once)",
            ["engine_id"],
            registry=r,
        )

    def serve(self, port: int) -> None:
        """Start the /metrics HTTP server on `port` (loopback)."""
        start_http_server(port, addr="127.0.0.1", registry=self.registry)

    def record_refit(self, engine_id: str, status, num_new_drifts: int) -> None:
        """Export one replica's refit status (planner_svc.refit.RefitStatus)."""
        self.model_scale.labels(engine_id).set(status.scale)
        self.model_k_context.labels(engine_id).set(status.k_context_s)
        self.model_margin.labels(engine_id).set(status.margin)
        self.model_overrun.labels(engine_id).set(status.overrun_rate)
        if num_new_drifts > 0:
            self.model_drifts.labels(engine_id).inc(num_new_drifts)

    def record_attainment(self, slo_class: str, num_decided: int, num_attained: int) -> None:
        self.attainment.labels(slo_class).set(num_attained / num_decided if num_decided else 0.0)
