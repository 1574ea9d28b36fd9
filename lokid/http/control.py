"""The control socket's application: the HTTP API, with the Dashboard API under /dashboard.

Docker-style HTTP over a Unix socket (DESIGN.md §2). The listener has
already checked the peer's uid (see `lokid.actors.listener`).
"""

from __future__ import annotations

from lokid.http.gate import origin_form
from lokid.http.surface import ASGIApp, Receive, Scope, Send

DASHBOARD_PREFIX = "/dashboard"


def control_app(api: ASGIApp, dashboard: ASGIApp) -> ASGIApp:
    """Requests under /dashboard go to the dashboard with `root_path` "/dashboard".

    As ASGI has it (and Quart expects), `path` stays the full path; a
    `Surface` routes on `local_path(scope)`, the part after `root_path`.
    """

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        scope = origin_form(scope)  # `GET http://l/dashboard/...` is under /dashboard too
        path: str = scope.get("path", "")
        if path == DASHBOARD_PREFIX or path.startswith(DASHBOARD_PREFIX + "/"):
            inner = dict(scope)
            inner["root_path"] = scope.get("root_path", "") + DASHBOARD_PREFIX
            await dashboard(inner, receive, send)
        else:
            await api(scope, receive, send)

    return app
