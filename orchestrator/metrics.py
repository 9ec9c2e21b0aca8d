"""The orchestrator's Prometheus metrics: request outcomes, latencies, and each request's time-to-
first-token waterfall (queue, prefill, KV transfer with bytes, first decode step), plus per-worker KV usage read at scrape.

One registry per app (not the global default), so that tests and several apps in one process
do not collide.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from tandem.orchestrator.cluster import Cluster
from tandem.orchestrator.pipeline import Waterfall

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self, cluster: Cluster) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("tandem_requests", "Requests by endpoint and HTTP status", ["endpoint", "status"], registry=r)
        self.ttft = Histogram("tandem_time_to_first_token_seconds", "Time to first token", buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("tandem_inter_token_seconds", "Time between streamed tokens", buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("tandem_request_seconds", "Request latency, end to end", buckets=_LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("tandem_queue_seconds", "Wait on the context worker before prefill", buckets=_LATENCY_BUCKETS, registry=r)
        self.prefill = Histogram("tandem_prefill_seconds", "Prefill call on the context worker", buckets=_LATENCY_BUCKETS, registry=r)
        self.transfer = Histogram("tandem_kv_transfer_seconds", "KV READ on the generation worker", buckets=_LATENCY_BUCKETS, registry=r)
        self.first_decode = Histogram(
            "tandem_first_decode_step_seconds", "First to second token, less the KV transfer", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.transfer_bytes = Counter("tandem_kv_transfer_bytes", "KV bytes moved between workers", registry=r)
        self.routes = Counter("tandem_routes", "Routing decisions", ["reason"], registry=r)
        self.retries = Counter("tandem_retries", "Requests retried on another worker", registry=r)
        self.output_tokens = Counter("tandem_output_tokens", "Tokens streamed to clients", registry=r)
        r.register(_WorkerCollector(cluster))

    def observe_waterfall(self, waterfall: Waterfall) -> None:
        if waterfall.route is not None:
            self.routes.labels(waterfall.route.reason).inc()
        if waterfall.prefill_s:
            self.queue.observe(waterfall.queue_s)
            self.prefill.observe(waterfall.prefill_s)
        if waterfall.first_decode_s:
            self.first_decode.observe(waterfall.first_decode_s)
        if waterfall.transfer_bytes:
            self.transfer.observe(waterfall.transfer_s)
            self.transfer_bytes.inc(waterfall.transfer_bytes)
        self.retries.inc(len(waterfall.retries))


class _WorkerCollector:
    """KV usage and load per worker, from the cluster's last Stats, computed at scrape time."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    def collect(self):
        used = GaugeMetricFamily("tandem_worker_kv_blocks_used", "KV blocks in use", labels=["worker", "role"])
        total = GaugeMetricFamily("tandem_worker_kv_blocks", "KV blocks in the cache", labels=["worker", "role"])
        running = GaugeMetricFamily("tandem_worker_running", "Sequences running", labels=["worker", "role"])
        healthy = GaugeMetricFamily("tandem_worker_healthy", "1 when the worker is routable", labels=["worker", "role"])
        for load in self.cluster.loads():
            labels = [load.worker_id, load.role]
            used.add_metric(labels, load.num_total_blocks - load.num_free_blocks)
            total.add_metric(labels, load.num_total_blocks)
            running.add_metric(labels, load.num_running)
            healthy.add_metric(labels, 1.0 if load.healthy else 0.0)
        expired = CounterMetricFamily("tandem_worker_leases_expired", "KV leases that expired unacknowledged", labels=["worker"])
        moved = CounterMetricFamily("tandem_worker_kv_received_bytes", "KV bytes a worker READ from others", labels=["worker"])
        for stats in self.cluster.last_stats():
            expired.add_metric([stats.worker_id], stats.num_leases_expired)
            moved.add_metric([stats.worker_id], stats.num_transferred_bytes)
        yield from (used, total, running, healthy, expired, moved)
