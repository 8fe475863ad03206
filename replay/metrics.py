"""Prometheus metrics of one replay shard, on the shard's own registry and HTTP port.

    metrics = ShardMetrics(tables=server.tables, shard_index=0)
    port = metrics.start_http_server(port=0)        # GET http://127.0.0.1:<port>/metrics
    with metrics.time_request("Sample"):
        ...
    metrics.stop()

Families (labels are bounded: ``shard`` comes from ``--shard-index``, ``table`` from the configured tables,
``method`` from the six RPCs, ``side`` is insert|sample, ``reason`` is stale_generation|unknown, ``code``
a gRPC status name):

    evergreen_replay_size{shard,table}                                  gauge, items held
    evergreen_replay_capacity{shard,table}                              gauge
    evergreen_replay_bytes{shard,table}                                 gauge, bytes held by the storage
    evergreen_replay_priority_mass{shard,table}                         gauge
    evergreen_replay_generation{shard,table}                            gauge, key generation (replay.keys)
    evergreen_replay_inserts_total{shard,table}                         counter, rows inserted
    evergreen_replay_samples_total{shard,table}                         counter, rows sampled
    evergreen_replay_rate_limiter_blocked_seconds_total{shard,table,side}  counter
    evergreen_replay_priority_updates_dropped_total{shard,table,reason} counter, keys not applied
    evergreen_replay_duplicate_inserts_total{shard,table}               counter, retried inserts not stored again
    evergreen_replay_refused_inserts_total{shard,table}                 counter, invalid inserts refused
    evergreen_replay_dropped_invalid_rows_total{shard,table}            counter, restored rows outside the bounds
    evergreen_replay_request_duration_seconds{shard,method}             histogram
    evergreen_replay_request_errors_total{shard,method,code}            counter, calls that ended with an error
    evergreen_replay_unauthenticated_calls_total{shard}                 counter, calls refused for the token

Table families are read from ``Table.info()`` at scrape time, so they cost nothing on the hot path and
can never disagree with the table. Each shard has its own ``CollectorRegistry`` (not the process-global
one) so that several shards in one process (tests) do not collide.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

METHODS = ("Insert", "Sample", "UpdatePriorities", "Info", "Checkpoint", "RebaseRateLimiter", "Clear", "ReleaseInserts")
# Request latencies span ~50us (small inserts) to seconds (rate-limited samples, checkpoints).
_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            10.0, 30.0)


class _TableCollector(Collector):
    def __init__(self, tables: Callable[[], Mapping], shard: str):
        self._tables = tables
        self._shard = shard

    def describe(self):
        # Without describe() the registry would call collect() at registration, before tables exist.
        return []

    def collect(self):
        labels = ["shard", "table"]
        size = GaugeMetricFamily("evergreen_replay_size", "Items held by the table.", labels=labels)
        capacity = GaugeMetricFamily("evergreen_replay_capacity", "Table capacity in items.", labels=labels)
        nbytes = GaugeMetricFamily("evergreen_replay_bytes", "Bytes held by the table's storage.", labels=labels)
        mass = GaugeMetricFamily("evergreen_replay_priority_mass",
                                 "Sum of p**alpha (prioritized) or the size (uniform, fifo).", labels=labels)
        inserts = CounterMetricFamily("evergreen_replay_inserts", "Rows inserted.", labels=labels)
        samples = CounterMetricFamily("evergreen_replay_samples", "Rows sampled.", labels=labels)
        blocked = CounterMetricFamily("evergreen_replay_rate_limiter_blocked_seconds",
                                      "Seconds callers spent blocked by the rate limiter.",
                                      labels=["shard", "table", "side"])
        generation = GaugeMetricFamily("evergreen_replay_generation", "Key generation of the table.", labels=labels)
        dropped = CounterMetricFamily("evergreen_replay_priority_updates_dropped",
                                      "Priority updates not applied: key of another generation, or not live.",
                                      labels=["shard", "table", "reason"])
        duplicates = CounterMetricFamily("evergreen_replay_duplicate_inserts",
                                         "Retried inserts acknowledged without storing them again.", labels=labels)
        refused = CounterMetricFamily("evergreen_replay_refused_inserts",
                                      "Inserts refused as invalid (schema, bounds, priorities).", labels=labels)
        invalid = CounterMetricFamily("evergreen_replay_dropped_invalid_rows",
                                      "Restored rows dropped for values outside the schema's bounds.", labels=labels)
        for name, table in self._tables().items():
            info = table.info()
            key = [self._shard, name]
            size.add_metric(key, info.size)
            capacity.add_metric(key, info.capacity)
            nbytes.add_metric(key, info.nbytes)
            mass.add_metric(key, info.priority_mass)
            inserts.add_metric(key, info.inserts)
            samples.add_metric(key, info.samples)
            blocked.add_metric([*key, "insert"], info.insert_blocked_s)
            blocked.add_metric([*key, "sample"], info.sample_blocked_s)
            generation.add_metric(key, info.generation)
            dropped.add_metric([*key, "stale_generation"], info.stale_generation_updates)
            dropped.add_metric([*key, "unknown"], info.unknown_key_updates)
            duplicates.add_metric(key, info.duplicate_inserts)
            refused.add_metric(key, info.refused_inserts)
            invalid.add_metric(key, info.dropped_invalid_rows)
        yield from (size, capacity, nbytes, mass, generation, inserts, samples, blocked, dropped, duplicates,
                    refused, invalid)


class ShardMetrics:
    """The metrics of one shard: table families read at scrape time plus a request-duration histogram."""

    def __init__(self, *, tables: Mapping | Callable[[], Mapping], shard_index: int = 0):
        self.registry = CollectorRegistry(auto_describe=False)
        self.shard = str(int(shard_index))
        get_tables = tables if callable(tables) else (lambda: tables)
        self.registry.register(_TableCollector(get_tables, self.shard))
        self.request_duration = Histogram(
            "evergreen_replay_request_duration_seconds", "Server-side duration of replay RPCs.",
            labelnames=["shard", "method"], buckets=_BUCKETS, registry=self.registry,
        )
        # Pre-create the children so that every method shows up (with zero counts) from the first scrape.
        self._children = {m: self.request_duration.labels(shard=self.shard, method=m) for m in METHODS}
        self.request_errors = Counter(
            "evergreen_replay_request_errors", "Replay RPCs that ended with an error status.",
            labelnames=["shard", "method", "code"], registry=self.registry,
        )
        self.unauthenticated = Counter(
            "evergreen_replay_unauthenticated_calls", "Calls refused because they lacked the run's token.",
            labelnames=["shard"], registry=self.registry,
        ).labels(shard=self.shard)
        self._http = None
        self._http_thread: threading.Thread | None = None
        self.host: str | None = None
        self.port: int | None = None

    def observe(self, method: str, seconds: float, code: str = "OK") -> None:
        """Record one request of ``method`` (one of METHODS) that took ``seconds`` and ended with ``code``."""
        self._children[method].observe(seconds)
        if code != "OK":
            self.request_errors.labels(shard=self.shard, method=method, code=code).inc()

    def count_unauthenticated(self, method: str) -> None:
        """One call refused for a missing or wrong token (the method is not a label: it is the caller's)."""
        self.unauthenticated.inc()

    @contextlib.contextmanager
    def time_request(self, method: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.observe(method, time.perf_counter() - start)

    def exposition(self) -> bytes:
        """The text exposition format of everything in this registry (what /metrics serves)."""
        return generate_latest(self.registry)

    def start_http_server(self, *, port: int = 0, host: str = "127.0.0.1") -> int:
        """Serve /metrics on ``host:port`` (0 = a free port; loopback unless a host is given) in a daemon
        thread; return the port."""
        if self._http is not None:
            raise RuntimeError(f"metrics server already running on port {self.port}")
        self._http, self._http_thread = start_http_server(port, addr=host, registry=self.registry)
        self.host = host
        self.port = int(self._http.server_address[1])
        return self.port

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            if self._http_thread is not None:
                self._http_thread.join(timeout=5)
            self._http = None
            self._http_thread = None
