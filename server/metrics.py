"""What one process tells Prometheus: its own registry, rendered on the
metrics port (server/metrics_http.py).

Counted where it happens: calls (a histogram by method and outcome, whose
``_count`` is the number of calls), events handed to sockets, 1013 closes,
bookings settled and events the relay published late with how late. The
rest is read from the process's state when scraped (sockets, pools,
replicas, Redis, the periodic loops), so the code that owns that state
keeps plain attributes and pays nothing per operation.

The hot counters are plain integers in ``TALLY`` rather than prometheus
counters: a fan-out to thousands of sockets should not take a lock per
socket. A process serves one application, so the registry is the module's.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Iterator

from prometheus_client import CollectorRegistry, Histogram, ProcessCollector, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from server import periodic
from server.db.replicas import redact

if TYPE_CHECKING:
    from server.health import RedisHealth
    from server.services import Services

# ``_created`` series double every counter's series for a value nobody
# alerts on; rate() copes with resets without them.
disable_created_metrics()

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)  # memory, CPU, open file descriptors

# A method name the server does not know: a client chooses it, so it must
# not become a label value of its own.
UNKNOWN_METHOD = "unknown"

CALL_SECONDS = Histogram(
    "hangout_call_duration_seconds",
    "RPC calls by method and outcome (ok or the error code), from the frame's arrival to its reply",
    ("method", "outcome"),
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
    registry=REGISTRY,
)

RELAY_DELAY_SECONDS = Histogram(
    "hangout_relay_delay_seconds",
    "For each user event the relay published because its fast path did not, its age at publish",
    buckets=(1, 2, 5, 10, 30, 60, 300, 1800, 3600),
    registry=REGISTRY,
)


class Tally:
    """Counters bumped on hot paths; read at scrape time."""

    __slots__ = ("events_out", "slow_closes", "settled", "relayed_late")

    def __init__(self) -> None:
        self.events_out = 0  # events queued to a socket (after a fan-out, or direct)
        self.slow_closes = 0  # sockets closed 1013: the outgoing queue past its bound
        self.settled = 0  # bookings this process completed
        self.relayed_late = 0  # user events the relay published


TALLY = Tally()


_CALL_SERIES: dict[tuple[str, str], Histogram] = {}


def observe_call(method: str, outcome: str, started: float) -> None:
    """``started``: ``time.perf_counter()`` when the call's frame was read."""
    series = _CALL_SERIES.get((method, outcome))
    if series is None:  # labels() checks and locks: once per pair, not per call
        series = _CALL_SERIES[(method, outcome)] = CALL_SECONDS.labels(method, outcome)
    series.observe(time.perf_counter() - started)


def _gauge(name: str, doc: str, value: float | None, labels: dict[str, str] | None = None) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=list(labels or ()))
    if value is not None:
        family.add_metric(list((labels or {}).values()), value)
    return family


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


class StateCollector(Collector):
    """Reads a process's services when Prometheus scrapes."""

    def __init__(self, services: "Services", health: "RedisHealth") -> None:
        self.services = services
        self.health = health

    def collect(self) -> Iterator[Metric]:
        yield from self._sockets()
        yield from self._database()
        yield from self._redis()
        yield from self._loops()

    def _sockets(self) -> Iterator[Metric]:
        services = self.services
        yield _gauge("hangout_sockets_open", "WebSocket connections being served", len(services.connections))
        yield _gauge("hangout_sockets_admitted", "Sockets from admission (before the upgrade) to teardown",
                     services.sockets.total)
        yield _counter("hangout_events_fanned_out", "Events queued to sockets", TALLY.events_out)
        yield _counter("hangout_slow_socket_closes", "Sockets closed with 1013 because their outgoing queue "
                       "passed its bound", TALLY.slow_closes)

    def _database(self) -> Iterator[Metric]:
        db = self.services.db
        yield _gauge("hangout_primary_up", "1 while the primary answers the health loop", int(db.primary_answers))
        yield _counter("hangout_primary_reads", "Reads the primary answered (no replica could, or the read "
                       "had to see every write)", db.primary_reads)
        pool = db.primary
        yield _gauge("hangout_db_pool_waiting", "Calls waiting for a primary connection now",
                     pool.waiting if pool is not None else 0)
        yield _counter("hangout_db_pool_waits", "Primary connection requests that had to wait",
                       pool.waits if pool is not None else 0)
        merged = db.merged_write_stats()
        yield _counter("hangout_merged_write_batches", "Merged writes: batches of two calls or more",
                       merged["batches"])
        yield _counter("hangout_merged_write_calls", "Merged writes: calls made in a batch", merged["calls"])
        yield _counter("hangout_merged_write_failed", "Merged writes: batches that failed (their calls "
                       "were then made one by one)", merged["failed"])
        yield _gauge("hangout_merged_write_waiting", "Merged writes: calls waiting for a batch now",
                     merged["waiting"])
        up = GaugeMetricFamily("hangout_replica_up", "1 while the replica is healthy and within the lag "
                               "bound", labels=["replica"])
        lag = GaugeMetricFamily("hangout_replica_lag_bytes", "WAL bytes the replica is behind the primary",
                                labels=["replica"])
        reads = CounterMetricFamily("hangout_replica_reads", "Reads the replica served", labels=["replica"])
        for replica in db.replicas:
            name = redact(replica.url)
            up.add_metric([name], int(replica.healthy))
            if replica.lag_bytes is not None:
                lag.add_metric([name], replica.lag_bytes)
            reads.add_metric([name], replica.served)
        yield from (up, lag, reads)

    def _redis(self) -> Iterator[Metric]:
        outbox = self.services.outbox
        yield _gauge("hangout_redis_up", "1 while Redis answers pings and the outbox sends", int(self.health.ok))
        yield _gauge("hangout_redis_subscriber_connected", "1 while the pub/sub link to Redis is up",
                     int(self.services.hub.connected.is_set()))
        yield _counter("hangout_redis_outages", "Times the outbox stopped sending because Redis did not "
                       "answer", outbox.outages)
        yield _counter("hangout_redis_pipelines", "Pipelines the outbox sent", outbox.pipelines)

    def _loops(self) -> Iterator[Metric]:
        now = time.monotonic()
        since = GaugeMetricFamily("hangout_loop_seconds_since_pass", "Seconds since the periodic loop last "
                                  "finished a pass without error (settlement, relay, cleanup, health)",
                                  labels=["loop"])
        passes = CounterMetricFamily("hangout_loop_passes", "Passes the periodic loop finished without error",
                                     labels=["loop"])
        for loop in periodic.running():
            if loop.last_pass is not None:
                since.add_metric([loop.name], now - loop.last_pass)
            passes.add_metric([loop.name], loop.passes)
        yield from (since, passes)
        yield _counter("hangout_bookings_settled", "Bookings this process settled", TALLY.settled)
        yield _counter("hangout_events_relayed_late", "User events the relay published because their "
                       "fast path did not", TALLY.relayed_late)
