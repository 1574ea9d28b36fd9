"""A stand-in for the supervisor's `ChildStatus`, for running one actor in a test."""

from __future__ import annotations

from typing import Any

import attrs
import trio


@attrs.define
class StubChildStatus:
    """What a supervisor hands an actor's `run`: a stop request and `started()`."""

    shutdown_requested: trio.Event = attrs.Factory(trio.Event)
    started_event: trio.Event = attrs.Factory(trio.Event)
    value: Any = None

    def started(self, value: Any = None) -> None:
        self.value = value
        self.started_event.set()
