"""The seed's error body, and the one table from error codes to HTTP statuses.

    {"error": {"code": "NOT_FOUND", "message": "Session not found", "details": {}}}

Every non-2xx answer of every route, lean or Quart, present or future, is
built here, so a client never has to parse two shapes.
"""

from __future__ import annotations

import json
from typing import Any

from lokid.errors import LokiError

STATUS_BY_CODE: dict[str, int] = {
    "BAD_REQUEST": 400,
    "UNAUTHORIZED": 401,
    "FORBIDDEN": 403,
    "NOT_FOUND": 404,
    "METHOD_NOT_ALLOWED": 405,
    "CONFLICT": 409,
    "PAYLOAD_TOO_LARGE": 413,
    "UNSUPPORTED_MEDIA_TYPE": 415,
    "VALIDATION_ERROR": 422,
    "RATE_LIMITED": 429,
    "HEADERS_TOO_LARGE": 431,
    "INTERNAL_ERROR": 500,
    "UNAVAILABLE": 503,
}

CODE_BY_STATUS: dict[int, str] = {status: code for code, status in STATUS_BY_CODE.items()}


class ApiError(Exception):
    """An error answer; raise it from any handler."""

    def __init__(
        self,
        code: str,
        message: str,
        details: dict[str, Any] | None = None,
        *,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        if code not in STATUS_BY_CODE:
            raise ValueError(f"unknown error code {code!r}")
        self.code = code
        self.status = STATUS_BY_CODE[code]
        self.message = message
        self.details = details or {}
        self.headers = headers or {}
        self.extra = extra or {}

    @classmethod
    def from_loki(cls, exc: LokiError) -> ApiError:
        code = exc.code if exc.code in STATUS_BY_CODE else "INTERNAL_ERROR"
        return cls(code, exc.message, exc.details)

    @classmethod
    def for_status(cls, status: int, message: str) -> ApiError:
        return cls(
            CODE_BY_STATUS.get(status, "BAD_REQUEST" if status < 500 else "INTERNAL_ERROR"), message
        )

    def body(self) -> dict[str, Any]:
        return error_body(self.code, self.message, self.details, **self.extra)

    def body_bytes(self) -> bytes:
        return json.dumps(self.body(), separators=(",", ":")).encode()


def error_body(
    code: str, message: str, details: dict[str, Any] | None = None, **extra: Any
) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details or {}, **extra}}
