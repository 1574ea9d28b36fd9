"""Exceptions with one precise meaning each.

`LokiError` subclasses are *expected* failures: an actor that raises one while
answering an `ask` sends it back to the caller and keeps running. Anything
else raised inside an actor is a bug or a broken resource, crashes the actor
and lets its supervisor decide.

Each API-facing error carries the error `code` of the seed's error body; the
HTTP layer maps codes to statuses in one table (`lokid.http.errors`).
"""

from __future__ import annotations

from typing import Any


class LokiError(Exception):
    """Base of every expected lokid failure."""

    code = "INTERNAL_ERROR"

    def __init__(self, message: str, *, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = details or {}


# -- actors ----------------------------------------------------------------


class ActorError(LokiError):
    """Base of the failures of talking to an actor."""

    code = "UNAVAILABLE"


class MailboxFull(ActorError):
    """The actor's bounded mailbox is full and its policy is to reject."""


class AskTimeout(ActorError):
    """No reply within the `ask` timeout (mailbox wait included)."""


class ActorUnavailable(ActorError):
    """The actor stopped or crashed before it replied."""


# -- domain ----------------------------------------------------------------


class BadRequest(LokiError):
    code = "BAD_REQUEST"


class InvalidQuery(BadRequest):
    """A query-string value that cannot be used; names the parameter (DESIGN.md §4: 400)."""

    def __init__(self, message: str, *, field: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message, details={"field": field, **(details or {})})
        self.field = field


class NotFound(LokiError):
    code = "NOT_FOUND"


class Conflict(LokiError):
    code = "CONFLICT"


class ValidationFailed(LokiError):
    """A request value is well-formed but not acceptable; names the field."""

    code = "VALIDATION_ERROR"

    def __init__(self, message: str, *, field: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message, details={"field": field, **(details or {})})
        self.field = field


class Unavailable(LokiError):
    """The daemon cannot serve this now (starting, stopping, store down)."""

    code = "UNAVAILABLE"


# -- start-up --------------------------------------------------------------


class StartupError(LokiError):
    """The daemon cannot start; the message is what the operator reads."""


class AlreadyRunning(StartupError):
    """Another daemon holds the data directory's lock."""


class StoreOpenError(StartupError):
    """The database file is missing, unreadable, corrupt or from the future."""


class ConfigError(StartupError):
    """A configuration value (file, environment or flag) is invalid."""
