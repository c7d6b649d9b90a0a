"""Every Prometheus metric, in one place, owned by the main process.

Names follow ``starttls_proxy_<noun>_<unit|total>``; label values come from
the configuration (listener names) or from closed sets (protocol, result),
so their number is bounded.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

CONNECTIONS = Counter(
    "starttls_proxy_connections_accepted_total",
    "Client connections accepted.",
    ["listener", "protocol"],
    registry=REGISTRY,
)
REFUSED_BUSY = Counter(
    "starttls_proxy_connections_refused_busy_total",
    "Client connections refused because the listener was at max_connections.",
    ["listener"],
    registry=REGISTRY,
)
PROXY_HEADER_REFUSED = Counter(
    "starttls_proxy_inbound_proxy_header_refused_total",
    "Connections from trusted_proxies closed for a missing or malformed PROXY header.",
    ["listener"],
    registry=REGISTRY,
)
DISCARDED_BYTES = Counter(
    "starttls_proxy_discarded_after_starttls_bytes_total",
    "Plaintext bytes a client sent after its TLS upgrade command (injection attempts).",
    ["listener", "protocol"],
    registry=REGISTRY,
)
HANDSHAKES = Counter(
    "starttls_proxy_tls_handshakes_total",
    "TLS handshakes by result.",
    ["listener", "protocol", "result"],
    registry=REGISTRY,
)
BACKEND_FAILURES = Counter(
    "starttls_proxy_backend_connect_failures_total",
    "Backend connections that could not be made.",
    ["listener"],
    registry=REGISTRY,
)
BACKEND_CONNECT_SECONDS = Histogram(
    "starttls_proxy_backend_connect_seconds",
    "Time to connect the backend.",
    ["listener"],
    registry=REGISTRY,
)
SESSIONS_CLOSED = Counter(
    "starttls_proxy_sessions_closed_total",
    "Sessions ended, by whether the protocol ended them cleanly.",
    ["listener", "protocol", "end"],
    registry=REGISTRY,
)
WORKER_EXITS = Counter(
    "starttls_proxy_worker_exits_total",
    "TLS worker processes that ended, by exit reason.",
    ["reason"],
    registry=REGISTRY,
)
