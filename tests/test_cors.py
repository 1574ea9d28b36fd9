"""CORS (`lokid.cors`): which origins are answered, with which headers, and bad settings."""

from __future__ import annotations

import pytest

from lokid.cors import (
    ALLOWED_HEADERS,
    ALLOWED_METHODS,
    MAX_ORIGINS,
    CorsPolicy,
    PreflightAnswer,
    canonical_origin,
    is_preflight,
)

POLICY = CorsPolicy.from_setting(
    "https://a.example, http://localhost:3000,HTTP://[0:0::1]:8443 , https://b.example:8443,"
)

EXPOSE = (
    b"access-control-expose-headers",
    b"X-RateLimit-Limit, X-RateLimit-Remaining, X-RateLimit-Reset, Retry-After",
)


# -- the setting -------------------------------------------------------------


def test_setting_is_normalised() -> None:
    assert POLICY.origins == {
        "https://a.example",
        "http://localhost:3000",
        "http://[::1]:8443",
        "https://b.example:8443",
    }
    assert POLICY.enabled


@pytest.mark.parametrize("setting", [None, "", "   ", " , ,"])
def test_empty_setting_is_off(setting: str | None) -> None:
    policy = CorsPolicy.from_setting(setting)
    assert not policy.enabled
    assert policy == CorsPolicy()
    assert not policy.allowed("https://a.example")
    assert policy.response_headers("https://a.example") == []
    assert policy.preflight("https://a.example", "GET", None) is None


def test_duplicates_count_once() -> None:
    policy = CorsPolicy.from_setting("http://a.example, HTTP://A.EXAMPLE:80, http://a.example")
    assert policy.origins == {"http://a.example"}


@pytest.mark.parametrize(
    ("origin", "canonical"),
    [
        ("http://a.example", "http://a.example"),
        ("HTTP://A.Example:80", "http://a.example"),
        ("https://a.example:443", "https://a.example"),
        ("https://a.example:80", "https://a.example:80"),
        ("http://a.example:443", "http://a.example:443"),
        ("http://localhost:3000", "http://localhost:3000"),
        ("http://127.0.0.1:8420", "http://127.0.0.1:8420"),
        ("http://[::1]", "http://[::1]"),
        ("http://[0:0:0:0:0:0:0:1]:3000", "http://[::1]:3000"),
        ("https://[2001:DB8::1]:443", "https://[2001:db8::1]"),
        ("https://xn--bcher-kva.example", "https://xn--bcher-kva.example"),
        ("http://my_host.internal:8080", "http://my_host.internal:8080"),
        ("https://a.example:08443", "https://a.example:8443"),
    ],
)
def test_canonical_origin(origin: str, canonical: str) -> None:
    assert canonical_origin(origin) == canonical


@pytest.mark.parametrize(
    ("origin", "reason"),
    [
        ("*", "'*' is not allowed"),
        ("https://*.a.example", "'*' is not allowed"),
        ("null", "must be http://host[:port] or https://host[:port]"),
        ("a.example", "must be http://host[:port] or https://host[:port]"),
        ("ftp://a.example", "must be http://host[:port] or https://host[:port]"),
        ("file://", "must be http://host[:port] or https://host[:port]"),
        ("https:/a.example", "must be http://host[:port] or https://host[:port]"),
        ("https://a.example/", "an origin has no path (remove '/')"),
        ("https://a.example/app", "an origin has no path (remove '/app')"),
        ("https://a.example?x=1", "an origin has no query"),
        ("https://a.example#top", "an origin has no fragment"),
        ("https://user:pw@a.example", "no user name or password"),
        ("https://a.example:0", "the port must be 1-65535, got '0'"),
        ("https://a.example:65536", "the port must be 1-65535, got '65536'"),
        ("https://a.example:", "the port must be 1-65535, got ''"),
        ("https://a.example:http", "the port must be 1-65535"),
        ("https://a.example:80:80", "the port must be 1-65535"),
        ("https://", "'' is not a valid host name"),
        ("https://:443", "'' is not a valid host name"),
        ("https://a..example", "is not a valid host name"),
        ("https://a.example.", "is not a valid host name"),
        ("https://-a.example", "is not a valid host name"),
        ("https://" + "a" * 64 + ".example", "is not a valid host name"),
        ("https://[::1", "is not a bracketed IPv6 address"),
        ("https://[zz::1]", "is not a bracketed IPv6 address"),
        ("https://[fe80::1%eth0]", "is not a bracketed IPv6 address"),
        ("https://[::1]x", "unexpected 'x' after the host"),
        ("https://bücher.example", "xn-- form"),
        ("https://a.example\r\nX-Evil: 1", "only printable ASCII"),
        ("https://a example", "only printable ASCII without spaces"),
    ],
)
def test_bad_origins_are_named(origin: str, reason: str) -> None:
    with pytest.raises(ValueError) as caught:
        CorsPolicy.from_setting(f"https://good.example, {origin}")
    message = str(caught.value)
    assert message.startswith(f"CORS origin {origin!r}")
    assert reason in message


def test_too_many_origins() -> None:
    setting = ",".join(f"https://o{i}.example" for i in range(MAX_ORIGINS + 1))
    with pytest.raises(ValueError, match=f"at most {MAX_ORIGINS} origins, got {MAX_ORIGINS + 1}"):
        CorsPolicy.from_setting(setting)


def test_direct_construction_needs_normalised_origins() -> None:
    assert CorsPolicy(frozenset({"https://a.example"})).allowed("https://a.example")
    with pytest.raises(ValueError, match="is not normalised"):
        CorsPolicy(frozenset({"HTTPS://A.example"}))
    with pytest.raises(ValueError, match="'\\*' is not allowed"):
        CorsPolicy(frozenset({"*"}))


# -- allowed -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        ("https://a.example", True),
        ("HTTPS://A.EXAMPLE", True),
        ("https://a.example:443", True),
        ("http://localhost:3000", True),
        ("http://[::1]:8443", True),
        ("https://b.example:8443", True),
        ("http://a.example", False),  # other scheme
        ("https://a.example:8443", False),  # other port
        ("https://b.example", False),  # listed only with its port
        ("http://localhost", False),
        ("http://localhost:3001", False),
        ("http://127.0.0.1:3000", False),  # not the same origin as localhost
        ("https://x.a.example", False),  # no sub-domains
        ("https://a.example.evil.example", False),
        ("https://evila.example", False),
        ("null", False),
        ("", False),
        (None, False),
        ("*", False),
        ("https://a.example/", False),
        ("https://a.example, https://evil.example", False),
        ("https://a.example" + "/" * 5000, False),
    ],
)
def test_allowed(origin: str | None, allowed: bool) -> None:
    assert POLICY.allowed(origin) is allowed


def test_null_cannot_be_configured() -> None:
    with pytest.raises(ValueError, match="'null'"):
        CorsPolicy.from_setting("null")


# -- simple responses --------------------------------------------------------


def test_response_headers_for_an_allowed_origin() -> None:
    assert POLICY.response_headers("https://a.example") == [
        (b"access-control-allow-origin", b"https://a.example"),
        (b"vary", b"Origin"),
        EXPOSE,
    ]


def test_the_origin_is_echoed_as_the_browser_sent_it() -> None:
    headers = dict(POLICY.response_headers("HTTPS://A.example:443"))
    assert headers[b"access-control-allow-origin"] == b"HTTPS://A.example:443"


@pytest.mark.parametrize("origin", ["https://evil.example", "null", None, "https://a.example/"])
def test_response_headers_for_a_refused_origin_only_vary(origin: str | None) -> None:
    assert POLICY.response_headers(origin) == [(b"vary", b"Origin")]


def test_no_credentials_header_ever() -> None:
    preflight = POLICY.preflight("https://a.example", "POST", "authorization")
    assert preflight is not None
    for headers in (POLICY.response_headers("https://a.example"), preflight.headers):
        assert headers
        assert all(name != b"access-control-allow-credentials" for name, _ in headers)


# -- preflight ---------------------------------------------------------------


def test_preflight_allowed() -> None:
    answer = POLICY.preflight(
        "https://a.example", "POST", "authorization, content-type, idempotency-key"
    )
    assert answer == PreflightAnswer(
        status=204,
        headers=(
            (b"access-control-allow-origin", b"https://a.example"),
            (b"access-control-allow-methods", b"GET, POST, PUT, DELETE, OPTIONS"),
            (
                b"access-control-allow-headers",
                b"Authorization, Content-Type, Idempotency-Key, Last-Event-ID",
            ),
            (b"access-control-max-age", b"600"),
            (b"vary", b"Origin, Access-Control-Request-Method, Access-Control-Request-Headers"),
        ),
    )


@pytest.mark.parametrize("method", ALLOWED_METHODS)
def test_preflight_every_allowed_method(method: str) -> None:
    assert POLICY.preflight("http://localhost:3000", method, None) is not None


@pytest.mark.parametrize(
    "request_headers",
    [
        None,
        "",
        "Authorization",
        "AUTHORIZATION,Content-Type",
        "last-event-id",
        " idempotency-key , authorization ,",
        ", ".join(ALLOWED_HEADERS),
    ],
)
def test_preflight_allowed_headers_any_case(request_headers: str | None) -> None:
    assert POLICY.preflight("https://a.example", "GET", request_headers) is not None


@pytest.mark.parametrize("method", ["PATCH", "patch", "delete", "get", "HEAD", "TRACE", "", " GET"])
def test_preflight_refused_methods(method: str) -> None:
    assert POLICY.preflight("https://a.example", method, None) is None


@pytest.mark.parametrize(
    "request_headers",
    [
        "x-custom",
        "authorization, x-requested-with",
        "cookie",
        "authorization;content-type",
        "authorization, " * 1000,
    ],
)
def test_preflight_refused_headers(request_headers: str) -> None:
    assert POLICY.preflight("https://a.example", "GET", request_headers) is None


@pytest.mark.parametrize("origin", ["https://evil.example", "null", None, "http://a.example"])
def test_preflight_refused_origins(origin: str | None) -> None:
    assert POLICY.preflight(origin, "GET", "authorization") is None


def test_preflight_without_a_request_method_is_refused() -> None:
    assert POLICY.preflight("https://a.example", None, None) is None


@pytest.mark.parametrize(
    ("method", "origin", "request_method", "preflight"),
    [
        ("OPTIONS", "https://a.example", "POST", True),
        ("OPTIONS", "https://evil.example", "POST", True),  # a preflight, to be refused
        ("OPTIONS", "https://a.example", None, False),
        ("OPTIONS", None, "POST", False),
        ("POST", "https://a.example", "POST", False),
    ],
)
def test_is_preflight(
    method: str, origin: str | None, request_method: str | None, preflight: bool
) -> None:
    assert is_preflight(method, origin, request_method) is preflight
