"""The Dashboard API surface (its own port): seed "Dashboard API", and the web page.

Besides the seed's dashboard routes, this listener serves the session routes
(`/api/sessions…`) of the HTTP API, so the web page at `/` calls only its own
origin (no CORS). `/api/tasks` here is the Kanban board's; tasks across
sessions stay on the API listener.
"""

from __future__ import annotations

from lokid import __version__
from lokid.actors.session_manager import SessionManager
from lokid.actors.store import StoreActor
from lokid.http.health import HealthSource, install_health
from lokid.http.sessions import install_session_reads, install_session_writes
from lokid.http.surface import Surface
from lokid.http.web import install_web


def create_dashboard_surface(
    daemon: HealthSource,
    store: StoreActor | None = None,
    sessions: SessionManager | None = None,
) -> Surface:
    surface = Surface(
        "lokid Dashboard API",
        __version__,
        description=(
            "Projects, Kanban board, registry and enterprise endpoints (seed: Dashboard API), "
            "the session routes for the web page, and the web page itself at /."
        ),
    )
    install_health(surface, daemon)
    install_web(surface)
    if store is not None:
        install_session_reads(surface, store)
    if sessions is not None:
        install_session_writes(surface, sessions)
    return surface
