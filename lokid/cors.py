"""CORS for browser clients on other origins (DESIGN.md §4 "CORS"). Pure: strings in, headers out.

Rules:

* Off unless `LOKI_CORS_ORIGINS` lists origins (`CorsPolicy.from_setting`).
  Off means no CORS header on any response and every preflight refused; a
  browser page on another origin then cannot read lokid's answers, which is
  the point. Same-origin pages (the dashboard's own) need no CORS at all.
* Only listed origins are ever answered, each echoed back exactly as the
  browser sent it. There is no `*`, no pattern, no "reflect whatever
  `Origin` says" (the setting refuses `*`), and `null` (sandboxed frames,
  `file:` pages, some redirects) is never allowed: it is shared by every
  such page, so allowing it would allow all of them.
* An origin is `scheme://host[:port]` with scheme `http` or `https`, nothing
  else: no path (not even `/`), query, fragment, user name or wildcard. A
  bad entry in the setting is a `ValueError` naming it (the config loader
  turns it into a `ConfigError`). Origins are compared after normalising:
  scheme and host lower-case, the scheme's default port dropped
  (`HTTP://A.example:80` is `http://a.example`), IPv6 literals in
  compressed form. Non-ASCII host names must be written in their `xn--`
  form, which is what browsers send.
* Simple (non-preflight) responses to a listed origin carry
  `Access-Control-Allow-Origin: <origin>`, `Vary: Origin` and
  `Access-Control-Expose-Headers` naming the rate-limit headers and
  `Retry-After` (a script cannot read them otherwise). While CORS is on,
  every response carries `Vary: Origin`, so a cache never hands one
  origin's answer to another.
* Preflight (`OPTIONS` with `Origin` and `Access-Control-Request-Method`):
  answered 204 only for a listed origin asking for an allowed method
  (`ALLOWED_METHODS`) and only allowed headers (`ALLOWED_HEADERS`, case
  does not matter); `Access-Control-Max-Age: 600`. Anything else: `None`,
  and the caller answers 403 without CORS headers. A preflight never
  carries `Authorization`, so it is answered before authentication.

Decision: no `Access-Control-Allow-Credentials`. lokid authenticates with
an explicit `Authorization: Bearer` header (or `?token=`), which a script
sets itself and which needs only `Authorization` in
`Access-Control-Allow-Headers`. "Credentials" in CORS means what the
browser attaches on its own - cookies, HTTP authentication it remembers,
TLS client certificates - and lokid uses none of them. Leaving the header
out makes the browser refuse any `credentials: "include"` request, so no
ambient authority of the user's browser can ever reach lokid through CORS;
clients use the default `credentials: "same-origin"` (and `EventSource`
without `withCredentials`).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

import attrs

__all__ = [
    "ALLOWED_HEADERS",
    "ALLOWED_METHODS",
    "EXPOSED_HEADERS",
    "MAX_AGE_SECONDS",
    "MAX_ORIGINS",
    "CorsPolicy",
    "PreflightAnswer",
    "canonical_origin",
    "is_preflight",
]

ALLOWED_METHODS = ("GET", "POST", "PUT", "DELETE", "OPTIONS")
ALLOWED_HEADERS = ("Authorization", "Content-Type", "Idempotency-Key", "Last-Event-ID")
EXPOSED_HEADERS = ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset", "Retry-After")
MAX_AGE_SECONDS = 600
MAX_ORIGINS = 100
# Longer `Origin` / `Access-Control-Request-Headers` values are refused unread.
MAX_HEADER_CHARS = 2048

_DEFAULT_PORTS = {"http": 80, "https": 443}
_LABEL_RE = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
_PORT_RE = re.compile(r"[0-9]{1,5}")
_ALLOWED_METHOD_SET = frozenset(ALLOWED_METHODS)
_ALLOWED_HEADER_SET = frozenset(name.lower() for name in ALLOWED_HEADERS)

_VARY_ORIGIN = (b"vary", b"Origin")
_EXPOSE = (b"access-control-expose-headers", ", ".join(EXPOSED_HEADERS).encode())
_PREFLIGHT_FIXED = (
    (b"access-control-allow-methods", ", ".join(ALLOWED_METHODS).encode()),
    (b"access-control-allow-headers", ", ".join(ALLOWED_HEADERS).encode()),
    (b"access-control-max-age", b"%d" % MAX_AGE_SECONDS),
    (b"vary", b"Origin, Access-Control-Request-Method, Access-Control-Request-Headers"),
)


def canonical_origin(text: str) -> str:
    """`text` as a normalised origin; `ValueError` saying what is wrong with it.

    `HTTP://A.Example:80` -> `http://a.example`; `https://[::1]:8443` stays.
    """
    if "*" in text:
        raise ValueError(
            f"CORS origin {text!r}: '*' is not allowed; list each origin "
            "(lokid never answers arbitrary origins)"
        )
    if not text.isascii() or not text.isprintable() or any(c.isspace() for c in text):
        raise ValueError(
            f"CORS origin {text!r}: only printable ASCII without spaces "
            "(write a non-ASCII host name in its xn-- form)"
        )
    scheme, sep, rest = text.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in _DEFAULT_PORTS:
        raise ValueError(f"CORS origin {text!r}: must be http://host[:port] or https://host[:port]")
    for mark, what in (("/", "path"), ("?", "query"), ("#", "fragment")):
        if mark in rest:
            raise ValueError(
                f"CORS origin {text!r}: an origin has no {what} "
                f"(remove {rest[rest.index(mark) :]!r})"
            )
    if "@" in rest:
        raise ValueError(f"CORS origin {text!r}: an origin has no user name or password")
    if rest.startswith("["):
        end = rest.find("]")
        literal, after = rest[1:end], rest[end + 1 :]
        try:
            if end < 0 or "%" in literal:
                raise ValueError
            address = ipaddress.IPv6Address(literal)
        except ValueError:
            raise ValueError(
                f"CORS origin {text!r}: {rest!r} is not a bracketed IPv6 address (no zone)"
            ) from None
        host = f"[{address.compressed}]"
        if after and not after.startswith(":"):
            raise ValueError(f"CORS origin {text!r}: unexpected {after!r} after the host")
        port_text = after[1:] if after else None
    else:
        host, colon, port_text_raw = rest.partition(":")
        host = host.lower()
        port_text = port_text_raw if colon else None
        if not host or len(host) > 253 or not all(map(_LABEL_RE.fullmatch, host.split("."))):
            raise ValueError(f"CORS origin {text!r}: {host!r} is not a valid host name")
    if port_text is None:
        return f"{scheme}://{host}"
    if not _PORT_RE.fullmatch(port_text) or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"CORS origin {text!r}: the port must be 1-65535, got {port_text!r}")
    port = int(port_text)
    return f"{scheme}://{host}" if port == _DEFAULT_PORTS[scheme] else f"{scheme}://{host}:{port}"


def _origins_validator(
    _instance: CorsPolicy, _attribute: attrs.Attribute[frozenset[str]], value: frozenset[str]
) -> None:
    if len(value) > MAX_ORIGINS:
        raise ValueError(f"CORS: at most {MAX_ORIGINS} origins, got {len(value)}")
    for origin in value:
        if canonical_origin(origin) != origin:
            raise ValueError(
                f"CORS origin {origin!r} is not normalised; use CorsPolicy.from_origins"
            )


@attrs.frozen
class PreflightAnswer:
    """The answer to an allowed preflight: a 204 with these headers and no body."""

    headers: tuple[tuple[bytes, bytes], ...]
    status: int = 204


def is_preflight(method: str, origin: str | None, request_method: str | None) -> bool:
    """Whether a request is a CORS preflight (rather than a plain `OPTIONS`)."""
    return method == "OPTIONS" and origin is not None and request_method is not None


@attrs.frozen
class CorsPolicy:
    """The listed origins, normalised; empty = CORS off."""

    origins: frozenset[str] = attrs.field(default=frozenset(), validator=_origins_validator)

    @classmethod
    def from_setting(cls, setting: str | None) -> CorsPolicy:
        """`"https://a.example, http://localhost:3000"`; None or blank = off.

        Comma-separated; white space around entries and empty entries (a
        trailing comma) are ignored; duplicates after normalising count once.
        """
        if setting is None:
            return cls()
        return cls.from_origins(item.strip() for item in setting.split(","))

    @classmethod
    def from_origins(cls, origins: Iterable[str]) -> CorsPolicy:
        """A policy for these origins (normalised; `ValueError` names a bad one)."""
        return cls(frozenset(canonical_origin(origin) for origin in origins if origin))

    @property
    def enabled(self) -> bool:
        return bool(self.origins)

    def allowed(self, origin: str | None) -> bool:
        """Whether an `Origin` header value is one of the listed origins."""
        if not origin or not self.origins or len(origin) > MAX_HEADER_CHARS:
            return False
        try:
            return canonical_origin(origin) in self.origins
        except ValueError:
            return False

    def response_headers(self, origin: str | None) -> list[tuple[bytes, bytes]]:
        """Headers for a non-preflight response to a request with this `Origin`.

        CORS off: none. On: `Vary: Origin` always, and for a listed origin
        `Access-Control-Allow-Origin` (the request's value, as the browser
        compares it byte for byte) and `Access-Control-Expose-Headers`.
        """
        if not self.origins:
            return []
        if origin is None or not self.allowed(origin):
            return [_VARY_ORIGIN]
        return [(b"access-control-allow-origin", origin.encode("ascii")), _VARY_ORIGIN, _EXPOSE]

    def preflight(
        self, origin: str | None, request_method: str | None, request_headers: str | None
    ) -> PreflightAnswer | None:
        """The answer to a preflight, or None: refused (answer 403, no CORS headers).

        `request_method` and `request_headers` are the values of
        `Access-Control-Request-Method` and `Access-Control-Request-Headers`
        (None when absent). The method must be one of `ALLOWED_METHODS`,
        exactly (browsers upper-case the standard ones; a lower-case `patch`
        stays lower-case); every requested header one of `ALLOWED_HEADERS`,
        in any case.
        """
        if origin is None or request_method is None or not self.allowed(origin):
            return None
        if request_method not in _ALLOWED_METHOD_SET:
            return None
        if request_headers:
            if len(request_headers) > MAX_HEADER_CHARS:
                return None
            for name in request_headers.split(","):
                name = name.strip().lower()
                if name and name not in _ALLOWED_HEADER_SET:
                    return None
        return PreflightAnswer(
            headers=((b"access-control-allow-origin", origin.encode("ascii")), *_PREFLIGHT_FIXED)
        )
