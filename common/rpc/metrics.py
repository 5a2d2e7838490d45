"""Prometheus metrics of the aggregator and the nodes, served on an opt-in port (`metrics_listen`).

One process-wide set of metric objects (prometheus_client's default registry); the servers only
call the small `on_*` functions below, so what is measured and how it is named stays here.
"""

import platform
import time
from importlib import metadata

from prometheus_client import Counter, Gauge, Histogram, Info, start_http_server

BUILD = Info("cdimf_build", "the cdimf build this process runs")
ROUNDS_CLOSED = Counter("cdimf_rounds_closed", "consensus rounds the aggregator closed")
ROUND_DURATION = Histogram(
    "cdimf_round_duration_seconds", "time from a round's opening to its close (aggregator)",
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, float("inf")),
)
ROUNDS_APPLIED = Counter("cdimf_rounds_applied", "consensus rounds this node applied", ["domain"])
BYTES_PUSHED = Counter("cdimf_bytes_pushed", "contribution payload bytes (X + U) pushed by a domain", ["domain"])
BYTES_PULLED = Counter("cdimf_bytes_pulled", "consensus payload bytes (Z) pulled by a domain", ["domain"])
CONTRIBUTIONS_LATE = Counter("cdimf_contributions_late", "contributions accepted for an older round than they were tagged", ["domain"])
REFUSED = Counter("cdimf_refused_requests", "requests refused by the round rules, by call and status", ["call", "status"])
REGISTRATIONS = Counter("cdimf_registrations", "domain registrations accepted", ["domain"])
VALIDATION = Gauge("cdimf_validation_metric", "latest per-round validation metric of a domain", ["domain", "metric"])
DP_EPSILON = Gauge("cdimf_dp_epsilon", "epsilon of what this node pushed in the run so far (at cdimf_dp_delta)", ["domain"])
DP_DELTA = Gauge("cdimf_dp_delta", "delta of this node's reported epsilon", ["domain"])
SOLVER_BACKEND = Gauge("cdimf_solver_backend", "1 for the iALS backend this node's half-steps run on", ["domain", "backend"])

_round_opened = {"at": time.monotonic()}


def start_metrics_server(listen: str, role: str) -> int:
    """Serve /metrics on host:port `listen` (port 0: any free one) and record the build; the bound port."""
    try:
        version = metadata.version("cdimf")
    except metadata.PackageNotFoundError:
        version = "unknown"
    BUILD.info({"version": version, "python": platform.python_version(), "role": role})
    host, port = listen.rsplit(":", 1)
    server, _ = start_http_server(int(port), addr=host.strip("[]"))
    return int(server.server_port)


def on_run_started() -> None:
    """A run started: its first round opens now."""
    _round_opened["at"] = time.monotonic()


def on_round_closed() -> None:
    """The aggregator closed a round (the next one opens now)."""
    now = time.monotonic()
    ROUNDS_CLOSED.inc()
    ROUND_DURATION.observe(now - _round_opened["at"])
    _round_opened["at"] = now


def on_contribution(domain: str, nbytes: int, tagged_round: int, accepted_round: int) -> None:
    """A contribution was accepted (late when it counted in another round than its tag)."""
    BYTES_PUSHED.labels(domain).inc(nbytes)
    if accepted_round != tagged_round:
        CONTRIBUTIONS_LATE.labels(domain).inc()


def on_push(domain: str, nbytes: int) -> None:
    """A node pushed a contribution of `nbytes` payload bytes."""
    BYTES_PUSHED.labels(domain).inc(nbytes)


def on_pull(domain: str, nbytes: int) -> None:
    """Z of `nbytes` bytes was sent to (or received by) `domain`."""
    BYTES_PULLED.labels(domain).inc(nbytes)


def on_refused(call: str, status: str) -> None:
    """A request was refused with gRPC status `status`."""
    REFUSED.labels(call, status).inc()


def on_registration(domain: str) -> None:
    """A domain registered."""
    REGISTRATIONS.labels(domain).inc()


def on_validation(domain: str, metrics: dict[str, float]) -> None:
    """A domain's validation metrics of a round."""
    for name, value in metrics.items():
        VALIDATION.labels(domain, name).set(value)


def on_round_applied(domain: str) -> None:
    """A node applied a round's Z."""
    ROUNDS_APPLIED.labels(domain).inc()


def on_solver_backend(domain: str, backend: str) -> None:
    """The solver backend a node runs on."""
    SOLVER_BACKEND.labels(domain, backend).set(1)


def on_privacy(domain: str, epsilon: float, delta: float) -> None:
    """A node's (epsilon, delta) of what it pushed so far."""
    DP_EPSILON.labels(domain).set(epsilon)
    DP_DELTA.labels(domain).set(delta)
