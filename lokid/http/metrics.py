"""`GET /metrics` (Prometheus) and the per-request latency observer of a surface.

Rules:

* `/metrics` is a lean route of the HTTP API surface, so the API listener
  and the control socket serve it; it requires `read` (with auth on,
  Prometheus sends a bearer token: docs/metrics.md). The body is the text
  exposition format 0.0.4 (`lokid.metrics.CONTENT_TYPE`), documented as
  `text/plain` in `/openapi.json`.
* `RouteObserver` is what `Surface.observer` holds: the ASGI path calls
  `timed` once per request, the inline path (`lokid.http.fastpath`) calls
  `observe` once per answer. Its labels are bounded: the listener (`control`
  for a request over the control socket, whose scope carries `lokid.peer`),
  the method (a fixed set, else `other`), the route *template* the path
  matches (`unmatched` when none does) and the status class.
* Cost per request: one dict look-up ((raw path, method, status) -> its
  series), a bisect and two additions; the route template is found once per
  raw path. Raw paths are remembered in a bounded dict (cleared when full),
  so a flood of distinct paths cannot grow memory.
"""

from __future__ import annotations

import time
from typing import Any

from lokid.http.gate import local_path
from lokid.http.surface import LeanResponse, Scope, Send, Surface
from lokid.metrics import CONTENT_TYPE, DaemonMetrics, Histogram, LabelledHistogram

__all__ = ["METRICS_PATH", "RouteObserver", "install_metrics", "observe_requests"]

METRICS_PATH = "/metrics"
UNMATCHED = "unmatched"
CONTROL = "control"  # the listener label of requests over the control socket
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
STATUS_CLASSES = ("other", "1xx", "2xx", "3xx", "4xx", "5xx")  # by status // 100
MAX_REMEMBERED = 4096  # (raw path, method, status) keys; cleared when full

_perf_counter = time.perf_counter


class RouteObserver:
    """Observes request latency into `histogram`, labelled as the module says."""

    def __init__(self, surface: Surface, listener: str, histogram: LabelledHistogram) -> None:
        self.surface = surface
        self.listener = listener
        self.histogram = histogram
        self._series: dict[tuple[str, str, int, bool], Histogram] = {}
        self._known = -1  # len(surface.routes) when `_series` was last cleared

    def timed(self, scope: Scope, send: Send) -> Send:
        """`send` that observes the time from now until the response head is sent."""
        started = _perf_counter()

        async def timing(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                self.observe(scope, message["status"], _perf_counter() - started)
            await send(message)

        return timing

    def observe(self, scope: Scope, status: int, seconds: float) -> None:
        key = (scope["path"], scope["method"], status, "lokid.peer" in scope)
        series = self._series.get(key)
        if series is None:
            series = self._series_for(key, scope)
        series.observe(seconds)

    def _series_for(self, key: tuple[str, str, int, bool], scope: Scope) -> Histogram:
        """The series of a (raw path, method, status, over the control socket) seen first."""
        if len(self.surface.routes) != self._known or len(self._series) >= MAX_REMEMBERED:
            self._series.clear()  # raw paths are remembered, but boundedly
            self._known = len(self.surface.routes)
        _, method, status, control = key
        labels = (
            CONTROL if control else self.listener,
            method if method in METHODS else "other",
            self.surface.route_path(local_path(scope)) or UNMATCHED,
            STATUS_CLASSES[status // 100] if 0 <= status < 600 else "other",
        )
        series = self._series[key] = self.histogram.child(labels)
        return series


def observe_requests(surface: Surface, listener: str, metrics: DaemonMetrics) -> RouteObserver:
    """Observe every request `surface` answers (its listener's name: `listener`)."""
    observer = RouteObserver(surface, listener, metrics.requests)
    surface.observer = observer
    return observer


def install_metrics(surface: Surface, metrics: DaemonMetrics) -> None:
    @surface.lean(
        "GET",
        METRICS_PATH,
        "Prometheus metrics (text exposition format 0.0.4; see docs/metrics.md)",
        responses={200: "The metrics"},
        response_schema={"type": "string"},
        tags=("metrics",),
        requires="read",
        media_type=CONTENT_TYPE.decode().partition(";")[0],
    )
    async def scrape(scope: Scope) -> LeanResponse:
        body = await metrics.render()
        return LeanResponse(200, body, ((b"content-type", CONTENT_TYPE), NO_STORE))


NO_STORE = (b"cache-control", b"no-store")
