"""The Dashboard API surface (its own port): seed "Dashboard API"."""

from __future__ import annotations

from lokid import __version__
from lokid.http.health import HealthSource, install_health
from lokid.http.surface import Surface


def create_dashboard_surface(daemon: HealthSource) -> Surface:
    surface = Surface(
        "lokid Dashboard API",
        __version__,
        description=(
            "Projects, Kanban board, registry and enterprise endpoints (seed: Dashboard API)."
        ),
    )
    install_health(surface, daemon)
    return surface
