"""Prometheus metrics of the HTTP front door, in their own registry (served at /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS_S = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
_OVERHEAD_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1)
_ITL_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST
MAX_CLASS_LABELS = 32


class HttpMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._class_labels: set[str] = set()
        r = self.registry
        self.requests = Counter(
            "slos_http_requests",
            "HTTP requests answered, by path and status",
            ["path", "status"],
            registry=r,
        )
        self.rejected = Counter(
            "slos_http_rejected",
            "Requests answered 429 (planner rejected)",
            ["slo_class"],
            registry=r,
        )
        self.verdicts = Counter(
            "slos_http_verdicts",
            "Planner verdicts seen, by verdict and class",
            ["verdict", "slo_class"],
            registry=r,
        )
        self.disconnects = Counter(
            "slos_http_client_disconnects",
            "Requests aborted because the client went away",
            registry=r,
        )
        self.planner_restarts = Gauge(
            "slos_http_planner_restarts",
            "Planner restarts noticed (a new planner instance id); requests in flight were failed",
            registry=r,
        )
        self.in_flight = Gauge(
            "slos_http_requests_in_flight", "Generation requests being served", registry=r
        )
        self.prompt_tokens = Counter(
            "slos_http_prompt_tokens", "Prompt tokens of served requests", registry=r
        )
        self.completion_tokens = Counter(
            "slos_http_completion_tokens", "Tokens generated", registry=r
        )
        self.ttft = Histogram(
            "slos_http_ttft_seconds",
            "Time to first token, HTTP arrival to first token leaving the server",
            ["slo_class"],
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.itl = Histogram(
            "slos_http_itl_seconds",
            "Gap between consecutive token messages",
            buckets=_ITL_BUCKETS_S,
            registry=r,
        )
        self.e2e = Histogram(
            "slos_http_e2e_seconds",
            "HTTP arrival to last token",
            ["slo_class"],
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.session_rounds = Counter(
            "slos_http_session_rounds",
            "Requests with a session id, by how their round index was set: counted (the "
            "session's next), new (a session the front door does not know: round 0), explicit",
            ["kind"],
            registry=r,
        )
        self.sessions = Gauge(
            "slos_http_sessions", "Sessions whose round count the front door keeps", registry=r
        )
        self.sessions_forgotten = Counter(
            "slos_http_sessions_forgotten",
            "Sessions forgotten, by reason: ttl (silent for session_ttl_s), lru (max_sessions)",
            ["reason"],
            registry=r,
        )

        self.ingress = Histogram(
            "slos_http_ingress_seconds",
            "Request handler start (headers "
            "parsed) to the planner client's arrival stamp of its SUBMIT",
            buckets=_OVERHEAD_BUCKETS_S,
            registry=r,
        )
        self.delivery = Histogram(
            "slos_http_token_delivery_seconds",
            "TOKENS message received by the planner client to its SSE chunk written",
            buckets=_OVERHEAD_BUCKETS_S,
            registry=r,
        )

    def class_label(self, slo_class: str) -> str:
        """`slo_class` as a label: the first MAX_CLASS_LABELS distinct names keep their own, later
        ones share "other" (clients name the class: the label set must stay bounded)."""
        if slo_class in self._class_labels:
            return slo_class
        if len(self._class_labels) < MAX_CLASS_LABELS:
            self._class_labels.add(slo_class)
            return slo_class
        return "other"

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
