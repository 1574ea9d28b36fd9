"""Prometheus metrics of one daemon (`GET /metrics`; docs/metrics.md).

Rules:

* **Scrape time, not request time.** Almost everything is read when
  Prometheus scrapes, from the `statistics()` every long-lived object
  already keeps (event bus, agent pool, store, supervisors, listeners,
  `/ws` hub, gate, audit writer) by one custom collector, so the hot paths
  pay nothing for it. Sessions by status come from one store read per
  scrape (`SessionManager.counts`, as `/api/status` does).
* **Two things are observed as they happen**, because a histogram cannot
  be rebuilt from totals: each HTTP request's latency
  (`lokid.http.metrics`) and each store commit's duration (the store's
  `commit_observer`). `Histogram.observe` is a bisect and two additions:
  no lock (everything runs on the daemon's one trio thread), no label
  lookup (the caller keeps the series).
* **Bounded labels.** Request series are keyed by listener, method (a
  fixed set, else `other`), route *template* (`/api/sessions/{id}`, never
  the raw path; `unmatched` for no route) and status class (`2xx`), so
  their number is bounded by the route table; `LabelledHistogram` folds
  anything past `max_series` into one `other` series anyway.
  Dynamic supervisor children (one per session) are summed into one series.
* **One registry per daemon** (`DaemonMetrics.registry`), never the
  process-global one, so several daemons in one process (tests) do not
  collide. prometheus-client's process, platform and GC collectors are
  registered on it too (they read `/proc` and `gc` at scrape time only).
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

import trio
from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from lokid import __version__
from lokid.actor import ActorStatistics
from lokid.actors.listener import ListenerStatistics
from lokid.actors.session_manager import SessionManagerStatistics
from lokid.errors import LokiError
from lokid.session_state import Status
from lokid.supervisor import ChildStatistics, SupervisorStatistics

if TYPE_CHECKING:
    from lokid.daemon import Daemon

__all__ = [
    "COMMIT_BUCKETS",
    "CONTENT_TYPE",
    "REQUEST_BUCKETS",
    "DaemonMetrics",
    "Histogram",
    "LabelledHistogram",
]

log = logging.getLogger("lokid.metrics")

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
"""The Prometheus text exposition format, which every Prometheus version reads."""

REQUEST_BUCKETS = (
    0.0005,
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
)
# Commits take less time than requests: two finer buckets at the bottom, none at 10 s.
COMMIT_BUCKETS = (0.0001, 0.00025, *REQUEST_BUCKETS[:-1])
MAX_SERIES = 4096  # request series; the route table bounds them far below this
SESSION_COUNTS_SECONDS = 5.0  # a scrape waits at most this long for the store's counts
DYNAMIC_CHILDREN = "session"  # the child label of the session supervisor's summed children


class Histogram:
    """One histogram series: counts per bucket (`le` bounds), their sum; not thread-safe."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        if list(self.bounds) != sorted(set(self.bounds)):
            raise ValueError("histogram bounds must be increasing")
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative (`le`, count) pairs, ending with `+Inf`, as Prometheus wants them."""
        running = 0
        answer: list[tuple[str, float]] = []
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            answer.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return answer


class LabelledHistogram:
    """Histogram series by label values; at most `max_series`, the rest folded into `other`."""

    def __init__(
        self, labels: Sequence[str], bounds: Sequence[float], *, max_series: int = MAX_SERIES
    ) -> None:
        self.labels = tuple(labels)
        self.bounds = tuple(bounds)
        self.max_series = max_series
        self.series: dict[tuple[str, ...], Histogram] = {}
        self.folded = 0  # label sets that found the table full

    def child(self, values: tuple[str, ...]) -> Histogram:
        """The series of `values` (created on first use): keep it, observing is then cheap."""
        found = self.series.get(values)
        if found is None:
            if len(self.series) >= self.max_series:
                self.folded += 1
                values = ("other",) * len(self.labels)
                found = self.series.get(values)
            if found is None:
                found = self.series[values] = Histogram(self.bounds)
        return found

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        family = HistogramMetricFamily(name, documentation, labels=self.labels)
        for values, histogram in sorted(self.series.items()):
            family.add_metric(list(values), histogram.buckets(), histogram.total)
        return family


class DaemonMetrics:
    """The daemon's registry, its collector and the two observed histograms."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.requests = LabelledHistogram(
            ("listener", "method", "route", "status_class"), REQUEST_BUCKETS
        )
        self.store_commits = Histogram(COMMIT_BUCKETS)
        self.scrapes = 0
        self.session_counts: dict[str, int] | None = None  # fetched by `render`
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_DaemonCollector(self))
        # The global registry's default collectors, on ours: each reads at scrape time only.
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)

    async def render(self) -> bytes:
        """The exposition, text format 0.0.4 (`CONTENT_TYPE`)."""
        self.scrapes += 1
        self.session_counts = None
        with trio.move_on_after(SESSION_COUNTS_SECONDS):
            try:
                self.session_counts = await self.daemon.sessions.counts()
            except LokiError as exc:
                log.warning("metrics: no session counts this scrape: %s", exc)
        return generate_latest(self.registry)


class _DaemonCollector(Collector):
    """Reads the daemon's statistics at scrape time (module rules)."""

    def __init__(self, metrics: DaemonMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        metrics = self.metrics
        daemon = metrics.daemon
        info = GaugeMetricFamily("lokid_info", "The daemon's version (value 1)", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        yield GaugeMetricFamily(
            "lokid_healthy",
            "1 while the core actors run (what /health says)",
            value=0 if daemon.core_problems() else 1,
        )
        yield GaugeMetricFamily(
            "lokid_ready",
            "1 once start-up finished, while the store is writable and the daemon not stopping",
            value=0 if daemon.readiness_problems() else 1,
        )
        yield from self._sessions(daemon)
        yield from self._agents(daemon)
        yield from self._events(daemon)
        yield metrics.requests.family(
            "lokid_http_request_duration_seconds",
            "HTTP request latency until the response head is handed to the connection, by "
            "listener, method, route template and status class",
        )
        yield from self._store(daemon)
        yield from self._tree(daemon)
        yield from self._gate(daemon)
        yield CounterMetricFamily(
            "lokid_metrics_scrapes", "Scrapes of /metrics, this one included", value=metrics.scrapes
        )

    def _sessions(self, daemon: Daemon) -> Iterator[Metric]:
        counts = self.metrics.session_counts
        by_status = GaugeMetricFamily(
            "lokid_sessions",
            "Sessions in the store by status (no samples when the store could not be read)",
            labels=["status"],
        )
        if counts is not None:
            for status in sorted({*(s.value for s in Status), *counts}):
                by_status.add_metric([status], counts.get(status, 0))
        yield by_status
        stats = daemon.sessions.statistics()
        yield GaugeMetricFamily(
            "lokid_sessions_live", "Session actors running (one per live session)", value=stats.live
        )
        yield CounterMetricFamily(
            "lokid_sessions_created",
            "Sessions created since the daemon started",
            value=stats.created,
        )

    def _agents(self, daemon: Daemon) -> Iterator[Metric]:
        pool = daemon.pool.statistics()
        yield GaugeMetricFamily("lokid_agents_active", "Live agent processes", value=pool.active)
        yield GaugeMetricFamily(
            "lokid_agents_capacity", "The agent pool's cap (max_agents)", value=pool.capacity
        )
        yield GaugeMetricFamily(
            "lokid_agents_waiting", "Requests waiting for an agent slot", value=pool.waiting_total
        )
        yield CounterMetricFamily(
            "lokid_agents_started", "Agent processes started", value=pool.started_total
        )
        yield CounterMetricFamily(
            "lokid_agents_start_failures",
            "Agent processes that failed to start",
            value=pool.start_failures,
        )
        yield CounterMetricFamily(
            "lokid_agents_rejected",
            "Agent slot requests refused at once (the pool was busy: 503)",
            value=pool.rejected_total,
        )

    def _events(self, daemon: Daemon) -> Iterator[Metric]:
        bus = daemon.bus.statistics()
        hub = daemon.hub.statistics()
        yield CounterMetricFamily(
            "lokid_events_published", "Events published on the event bus", value=bus.published
        )
        yield GaugeMetricFamily("lokid_events_last_id", "The newest event's id", value=bus.last_id)
        subscribers = GaugeMetricFamily(
            "lokid_subscribers",
            "Open subscribers: SSE event streams (sse) and /ws connections (ws)",
            labels=["kind"],
        )
        subscribers.add_metric(["sse"], bus.subscribers)
        subscribers.add_metric(["ws"], hub.clients)
        yield subscribers
        dropped = CounterMetricFamily(
            "lokid_subscribers_dropped",
            "Subscribers closed because they fell behind (their queue was full). The bus "
            "never drops an event: it stays in history, and an SSE client resumes with "
            "Last-Event-ID",
            labels=["kind"],
        )
        dropped.add_metric(["sse"], bus.subscribers_cut_slow)
        dropped.add_metric(["ws"], hub.closed_slow)
        yield dropped
        yield CounterMetricFamily(
            "lokid_ws_messages_published", "Messages offered to /ws clients", value=hub.published
        )
        yield CounterMetricFamily(
            "lokid_ws_messages_delivered", "Messages queued to a /ws client", value=hub.delivered
        )

    def _store(self, daemon: Daemon) -> Iterator[Metric]:
        commits = self.metrics.store_commits
        family = HistogramMetricFamily(
            "lokid_store_commit_duration_seconds",
            "Duration of the store's COMMIT statements (the WAL fsync), one per batch",
            buckets=commits.buckets(),
            sum_value=commits.total,
        )
        yield family
        store = daemon.store.statistics()
        yield GaugeMetricFamily(
            "lokid_store_writable",
            "1 while the store is open and its last batch did not fail for the disk",
            value=1 if store.writable else 0,
        )
        yield CounterMetricFamily(
            "lokid_store_writes", "Writes run by the store", value=store.writes
        )
        yield CounterMetricFamily(
            "lokid_store_commit_failures",
            "Store batches whose COMMIT (or BEGIN) failed",
            value=store.commit_failures,
        )
        audit = daemon.audit.statistics()
        yield CounterMetricFamily(
            "lokid_audit_entries", "Entries appended to the audit log", value=audit.appended
        )
        yield GaugeMetricFamily(
            "lokid_audit_chain_ok",
            "0 from the moment the audit chain's head disagreed until the writer restarts",
            value=1 if audit.head_ok else 0,
        )

    def _tree(self, daemon: Daemon) -> Iterator[Metric]:
        restarts = CounterMetricFamily(
            "lokid_supervisor_restarts",
            "Restarts of a supervised child (the children of a session supervisor are summed "
            f'as child="{DYNAMIC_CHILDREN}")',
            labels=["supervisor", "child"],
        )
        mailbox = GaugeMetricFamily(
            "lokid_actor_mailbox_messages",
            "Messages waiting in an actor's mailbox",
            labels=["actor"],
        )
        capacity = GaugeMetricFamily(
            "lokid_actor_mailbox_capacity", "An actor's mailbox bound", labels=["actor"]
        )
        crashes = CounterMetricFamily(
            "lokid_actor_crashes", "Crashes of an actor's task", labels=["actor"]
        )
        connections = GaugeMetricFamily(
            "lokid_listener_connections", "Open connections of a listener", labels=["listener"]
        )
        accepted = CounterMetricFamily(
            "lokid_listener_connections_accepted",
            "Connections a listener accepted",
            labels=["listener"],
        )
        down = GaugeMetricFamily(
            "lokid_supervisor_down",
            "1 while a back-off supervisor keeps its children down (the registry's 'optional')",
            labels=["supervisor"],
        )
        for supervisor, child in _walk(daemon.root.statistics()):
            restarts.add_metric([supervisor.name, child.id], child.restarts)
            detail = child.detail
            if isinstance(detail, SupervisorStatistics) and detail.backoff is not None:
                down.add_metric([detail.name], 1 if detail.backoff.down else 0)
            if isinstance(detail, SessionManagerStatistics):
                dynamic = detail.supervisor
                restarts.add_metric([dynamic.name, DYNAMIC_CHILDREN], dynamic.restarts_total)
            if isinstance(detail, ActorStatistics):
                mailbox.add_metric([child.id], detail.mailbox_used)
                capacity.add_metric([child.id], detail.mailbox_size)
                crashes.add_metric([child.id], detail.crashes)
            elif isinstance(detail, ListenerStatistics):
                connections.add_metric([child.id], detail.connections_open)
                accepted.add_metric([child.id], detail.connections_total)
        yield from (restarts, down, mailbox, capacity, crashes, connections, accepted)

    def _gate(self, daemon: Daemon) -> Iterator[Metric]:
        gate = daemon.gate.statistics()
        refusals = CounterMetricFamily(
            "lokid_gate_refusals", "Requests the gate refused, by reason", labels=["reason"]
        )
        refusals.add_metric(["unauthorized"], gate.unauthorized)
        refusals.add_metric(["forbidden"], gate.forbidden)
        refusals.add_metric(["rate_limited"], gate.rate_limited)
        yield refusals
        yield CounterMetricFamily(
            "lokid_gate_audit_failures",
            "Requests answered 503 because their audit entry could not be recorded",
            value=gate.audit_failures,
        )


def _walk(tree: SupervisorStatistics) -> Iterator[tuple[SupervisorStatistics, ChildStatistics]]:
    """(supervisor, child) for every child of the static tree, depth first."""
    for child in tree.children:
        yield tree, child
        if isinstance(child.detail, SupervisorStatistics):
            yield from _walk(child.detail)
