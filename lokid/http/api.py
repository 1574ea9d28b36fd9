"""The HTTP API surface (port 8420): seed "HTTP API Server"."""

from __future__ import annotations

from lokid import __version__
from lokid.actors.session_manager import SessionManager
from lokid.actors.store import StoreActor
from lokid.http.health import HealthSource, install_health
from lokid.http.metrics import install_metrics
from lokid.http.sessions import install_session_reads, install_session_writes, install_task_reads
from lokid.http.surface import Surface
from lokid.metrics import DaemonMetrics


def create_api_surface(
    daemon: HealthSource,
    store: StoreActor | None = None,
    sessions: SessionManager | None = None,
    metrics: DaemonMetrics | None = None,
) -> Surface:
    surface = Surface(
        "lokid HTTP API",
        __version__,
        description="Sessions, tasks, events and status (seed: HTTP API Server, port 8420).",
    )
    install_health(surface, daemon)
    if store is not None:
        install_session_reads(surface, store)
        install_task_reads(surface, store)
    if sessions is not None:
        install_session_writes(surface, sessions)
    if metrics is not None:
        install_metrics(surface, metrics)  # GET /metrics: this listener and the control socket
    return surface
