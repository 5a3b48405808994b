"""Prometheus metrics of the planner daemon (served by prometheus_client's HTTP server).

Each daemon owns its own `CollectorRegistry`, so several daemons (tests) can live in one process.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_TIME_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
_BUDGET_FRACTIONS = (0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 1.0, 1.1, 1.5, 2.0)


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
            "Attained / judged requests, by SLO class (rejections and lost requests count as "
            "misses; client aborts only when a deadline had already passed unmet)",
            ["slo_class"],
            registry=r,
        )
        self.verdict_delay = Histogram(
            "slos_verdict_delay_budget_fraction",
            "Arrival to verdict on the planner's clock, as a fraction of the request's TTFT "
            "budget (over 1: the verdict came after the TTFT target)",
            buckets=_BUDGET_FRACTIONS,
            registry=r,
        )
        self.aborted = Counter(
            "slos_requests_aborted",
            "Requests ended by their client (disconnect, stop string, client gone)",
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
        self.handshake_failures = Counter(
            "slos_handshake_failures",
            "Connections whose handshake failed (wrong CURVE keys, not ZeroMQ), by socket and "
            "reason (auth, protocol, no_detail)",
            ["socket", "reason"],
            registry=r,
        )
        self.disconnects = Counter(
            "slos_peer_disconnects",
            "Peer connections closed (also those ZeroMQ drops for a frame over the limit)",
            ["socket"],
            registry=r,
        )
        self.client_timeouts = Counter(
            "slos_client_timeouts",
            "Clients that went silent with requests open (their requests were aborted)",
            registry=r,
        )
        self.core_errors = Counter("slos_core_errors", "Planner core calls that raised", registry=r)
        self.plans_sent = Counter("slos_plans_sent", "PLAN messages sent", registry=r)
        self.kv_releases = Counter(
            "slos_kv_releases",
            "Tool chains' kept KV entries the planner told engines to drop (RELEASE_KV)",
            registry=r,
        )
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

    def serve(self, port: int, address: str = "127.0.0.1") -> None:
        """Start the /metrics HTTP server on `address:port`; a taken port is a one-line
        ValueError."""
        try:
            start_http_server(port, addr=address, registry=self.registry)
        except OSError as exc:
            raise ValueError(
                f"cannot serve metrics on {address}:{port}: {exc.strerror or exc}"
            ) from None

    def forget_engine(self, engine_id: str, replica_id: int) -> None:
        """Drop the label sets of a gone engine, so that engine churn (every restart brings a new
        replica id) does not grow the metrics without bound."""
        for metric, labels in (
            (self.step_time_measured, (engine_id,)),
            (self.step_time_predicted, (engine_id,)),
            (self.replica_requests, (str(replica_id), "running")),
            (self.replica_requests, (str(replica_id), "waiting")),
        ):
            try:
                metric.remove(*labels)
            except KeyError:  # never observed
                pass

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
