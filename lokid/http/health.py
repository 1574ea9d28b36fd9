"""Health probes and `/api/status`, on every surface, on the lean path.

Probes answer from in-memory state only (no store round trip), so a slow
disk or a busy store never makes a liveness probe time out:

* `/health/live`  - the event loop answered.
* `/health/ready` - start-up finished, the store is writable, not stopping.
* `/health`       - the core actors run (DESIGN.md §5); 503 lists what is down.
  The registry is not one: while it is down (docs/architecture.md,
  "Non-essential actors are isolated") both probes stay 200.
"""

from __future__ import annotations

from typing import Any, Protocol

from lokid.http.convert import api_converter
from lokid.http.gate import OPEN
from lokid.http.surface import LeanResponse, Scope, Surface, json_response
from lokid.timefmt import utc_now_iso

HEALTH_SCHEMA = {
    "type": "object",
    "required": ["status", "timestamp"],
    "properties": {
        "status": {"type": "string", "enum": ["healthy", "unhealthy"]},
        "timestamp": {"type": "string", "format": "date-time"},
        "details": {"type": "object", "description": "what is down (503)"},
    },
}
READY_SCHEMA = {
    "type": "object",
    "required": ["ready"],
    "properties": {
        "ready": {"type": "boolean"},
        "details": {"type": "object", "description": "why not (503)"},
    },
}
LIVE_SCHEMA = {
    "type": "object",
    "required": ["alive", "uptimeSeconds"],
    "properties": {"alive": {"const": True}, "uptimeSeconds": {"type": "number", "minimum": 0}},
}

STATUS_SCHEMA = {
    "type": "object",
    "required": ["status", "version", "provider", "session", "agents"],
    "properties": {
        "status": {"type": "string", "enum": ["running", "idle"]},
        "version": {"type": "string"},
        "provider": {"type": "string"},
        "session": {"type": ["object", "null"]},
        "agents": {
            "type": "object",
            "properties": {"active": {"type": "integer"}, "total": {"type": "integer"}},
        },
        "sessions": {"type": "object"},
        "uptimeSeconds": {"type": "number"},
        "stopBoundSeconds": {
            "type": "number",
            "exclusiveMinimum": 0,
            "description": "longest a stop takes: shutdown_grace + 2 s (docs/operations.md)",
        },
        "providers": {"type": "object"},
        "listeners": {"type": "object"},
        "supervisor": {"type": "object"},
    },
}


class HealthSource(Protocol):
    """What the probes need to know about the daemon (implemented by `lokid.daemon.Daemon`)."""

    def core_problems(self) -> dict[str, str]: ...

    def readiness_problems(self) -> dict[str, str]: ...

    def uptime_seconds(self) -> float: ...

    async def status(self) -> dict[str, Any]: ...


def install_health(surface: Surface, daemon: HealthSource) -> None:
    tags = ("health",)

    @surface.lean(
        "GET",
        "/health",
        "Daemon health",
        responses={200: "Healthy", 503: "Unhealthy (this body, not the error body)"},
        response_schema=HEALTH_SCHEMA,
        content={503: {"application/json": HEALTH_SCHEMA}},
        tags=tags,
        requires=OPEN,
    )
    async def health(scope: Scope) -> LeanResponse:
        problems = daemon.core_problems()
        if problems:
            return json_response(
                503, {"status": "unhealthy", "timestamp": utc_now_iso(), "details": problems}
            )
        return json_response(200, {"status": "healthy", "timestamp": utc_now_iso()})

    @surface.lean(
        "GET",
        "/health/ready",
        "Readiness probe",
        responses={200: "Ready", 503: "Not ready (this body, not the error body)"},
        response_schema=READY_SCHEMA,
        content={503: {"application/json": READY_SCHEMA}},
        tags=tags,
        requires=OPEN,
    )
    async def ready(scope: Scope) -> LeanResponse:
        problems = daemon.readiness_problems()
        if problems:
            return json_response(503, {"ready": False, "details": problems})
        return json_response(200, {"ready": True})

    @surface.lean(
        "GET",
        "/health/live",
        "Liveness probe",
        responses={200: "Alive"},
        response_schema=LIVE_SCHEMA,
        tags=tags,
        requires=OPEN,
    )
    async def live(scope: Scope) -> LeanResponse:
        return json_response(
            200, {"alive": True, "uptimeSeconds": round(daemon.uptime_seconds(), 3)}
        )

    @surface.lean(
        "GET",
        "/api/status",
        "Detailed daemon status",
        responses={200: "Status"},
        response_schema=STATUS_SCHEMA,
        tags=("status",),
        requires="read",
    )
    async def status(scope: Scope) -> LeanResponse:
        return json_response(200, api_converter.unstructure(await daemon.status()))
