"""Per-client rate limiting (DESIGN.md §4 "Rate limiting"). Pure: no I/O, no trio, no clock.

Rules:

* Off by default; `LOKI_RATE_LIMIT=<limit>/<window>` turns it on
  (`parse_rate_limit`). One `RateLimiter` per daemon holds one budget *per
  client key*; there is no global or per-route bucket (the older server's
  global string keys let one client lock everybody out).
* A key is `tok:<token id>` for an authenticated request, else
  `ip:<address>` of the socket peer (`client_key`). It is never derived from
  request headers (`Host`, `X-Forwarded-For`, ...): those are the client's to
  choose, and the older server's Host-header "localhost" bypass was exactly
  that mistake. A loopback peer is limited like any other.
* `/health`, `/health/...` are never limited and carry no rate-limit headers
  (`is_exempt`). Every other response, allowed or not, carries
  `X-RateLimit-Limit`, `X-RateLimit-Remaining` and `X-RateLimit-Reset`
  (`headers`); a refused one is a 429 `RATE_LIMITED` with `retry_after`
  inside `error` (`error_details`) and a `Retry-After` header.
* The clock is injected: `check(key, now)` takes monotonic seconds
  (`trio.current_time()` or `time.monotonic()`); a `now` smaller than one
  seen before is treated as the latest one (time never runs backwards
  here). Wall-clock time appears only where the header needs an epoch
  (`headers(decision, wall_now=time.time())`), so a wall-clock step never
  changes anybody's budget.
* Memory is bounded: at most `max_keys` keys (default 100,000, about 180
  bytes each: under 20 MB). Policies below.

Algorithm: GCRA, the token bucket written as one number per key.

* The bucket holds `limit` tokens and refills continuously at
  `limit / window` tokens per second; a request takes one token or is
  refused. GCRA stores, instead of (tokens, last refill), the single
  "theoretical arrival time" `tat`: the instant at which the bucket will be
  full again. With `interval = window / limit`, a request at `now` is allowed
  iff `max(tat, now) + interval - now <= window`, and then
  `tat = max(tat, now) + interval`. Refused requests change nothing.
* Why this and not a sliding-window counter: both are O(1) per key, but the
  counter (two fixed windows, the older one weighted by its overlap) is an
  estimate that assumes the previous window's requests were spread evenly,
  so it has no exact bound of its own; a fixed window lets `2 * limit`
  through in an instant (the end of one window and the start of the next).
  GCRA has an exact, simple guarantee, one float of state, and
  `X-RateLimit-Reset` falls out of it (`tat` *is* the reset time).
* The guarantee, exactly: for one key, the number of requests allowed in
  any closed time interval of length `d` is at most
  `limit + d * limit / window` (rounded down). So at most `limit` at once, at
  most `2 * limit` in any `window` seconds (a full bucket spent, then refilled
  while in use), and never more than `limit / window` per second in the long
  run. The stronger "at most `limit` in *every* sliding window" needs the
  time of each of the last `limit` requests (O(limit) memory per key) or a
  rate well below `limit / window`; neither is worth it here.
* Float time: sums of `interval` round, so the admission test has a
  tolerance of `interval / 1000` seconds. In the guarantee it counts as `d`
  being that much longer (0.001 of a request more before rounding down), so
  a burst still never exceeds `limit`; it keeps the `limit`-th request of a
  burst from being refused by a rounding error. (At a million requests per second, below a
  microsecond per request, float seconds are too coarse for exactness.)
* Headers: `X-RateLimit-Remaining` is the whole tokens left after this
  request; `X-RateLimit-Reset` is the epoch second (rounded up) at which the
  bucket is full again, i.e. `Remaining` equals `Limit` from then on if the
  client stays quiet; `Retry-After` (refused requests only) is the whole
  seconds, rounded up and at least 1, until one request will be allowed.

Memory policies:

* Expiry: a key whose bucket is full again (`tat <= now`) is in exactly the
  state of a key never seen, so dropping it loses nothing. Keys are kept in
  least-recently-used order; each `check` drops up to `EXPIRE_PER_CHECK`
  full-bucket keys from the least-recently-used end (worst case O(1) per
  call; `expire` sweeps them all). Because `tat <= last use + window` (plus the
  tolerance), a key idle for a full window has a full bucket: once the sweep has caught
  up, every key held was used within the last `window` seconds.
* Eviction: when a new key arrives and `max_keys` are held (after expiry),
  the least recently used key is evicted; if it comes back it starts with a
  full bucket. That favours the client, and is acceptable: `max_keys`
  distinct clients within one window is a distributed flood that per-client
  limits cannot stop anyway (an attacker with that many addresses or tokens
  already has that many budgets), and the evicted key is the one that has
  waited longest, never one that is busy right now - a client flooding from
  one key stays at the recently-used end. Memory stays bounded either way.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections import OrderedDict

import attrs

__all__ = [
    "DEFAULT_MAX_KEYS",
    "ERROR_CODE",
    "ERROR_MESSAGE",
    "EXPIRE_PER_CHECK",
    "MAX_LIMIT",
    "MAX_WINDOW_SECONDS",
    "Decision",
    "RateLimit",
    "RateLimiter",
    "RateLimiterStatistics",
    "client_key",
    "error_details",
    "headers",
    "is_exempt",
    "parse_rate_limit",
    "retry_after_seconds",
]

MAX_LIMIT = 1_000_000
MAX_WINDOW_SECONDS = 86_400
DEFAULT_MAX_KEYS = 100_000
EXPIRE_PER_CHECK = 8
ERROR_CODE = "RATE_LIMITED"
ERROR_MESSAGE = "Too many requests"

_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86_400}
_RATE_RE = re.compile(r"(?P<limit>[0-9]+)/(?P<count>[0-9]+)(?P<unit>[smhd]?)")
# Tolerance of the admission test, as a fraction of `interval` ("Float time" above).
_TOLERANCE = 1e-3
# IPv6 clients are keyed by their /64: one host usually owns a whole /64 and
# could otherwise take a fresh budget per address.
_IPV6_PREFIX = 64


@attrs.frozen
class RateLimit:
    """`limit` requests per `window` seconds."""

    limit: int
    window: float

    @property
    def interval(self) -> float:
        """Seconds one request's token takes to come back (`window / limit`)."""
        return self.window / self.limit

    def __str__(self) -> str:
        return f"{self.limit}/{self.window:g}"


def parse_rate_limit(text: str) -> RateLimit:
    """`"100/60"` -> `RateLimit(100, 60.0)`; `ValueError` naming the problem otherwise.

    Form: `<limit>/<window>`, surrounding white space ignored. `limit` is a
    whole number 1-1,000,000. `window` is a whole number of seconds with an
    optional unit, `s`, `m`, `h` or `d` (`100/60`, `100/60s`, `100/1m`,
    `5000/1h`, `10000/1d`), and comes to 1-86,400 seconds. Nothing else: no
    fractions, no spaces inside, no `per`, no unit words; switching the limit
    off is the config loader's business (leave the setting unset).
    """
    match = _RATE_RE.fullmatch(text.strip())
    if match is None:
        raise ValueError(
            f"rate limit {text!r} is not <limit>/<window>, e.g. '100/60' (100 requests per "
            "60 seconds); the window is whole seconds, optionally with a unit s, m, h or d"
        )
    limit = int(match["limit"])
    window = int(match["count"]) * _UNIT_SECONDS[match["unit"]]
    if not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"rate limit {text!r}: the limit must be 1-{MAX_LIMIT:,}, got {limit}")
    if not 1 <= window <= MAX_WINDOW_SECONDS:
        raise ValueError(
            f"rate limit {text!r}: the window must be 1-{MAX_WINDOW_SECONDS:,} seconds "
            f"(at most 1d), got {window} s"
        )
    return RateLimit(limit=limit, window=float(window))


@attrs.frozen
class Decision:
    """The answer for one request.

    `reset_after` and `retry_after` are seconds from the `now` given to
    `check`: until the key's bucket is full again, and until one request
    will be allowed (0.0 when this one was).
    """

    allowed: bool
    limit: int
    remaining: int
    reset_after: float
    retry_after: float


@attrs.frozen
class RateLimiterStatistics:
    """`RateLimiter.statistics()`; the counters count since the limiter was made."""

    limit: int
    window: float
    keys: int
    max_keys: int
    allowed: int
    limited: int
    expired: int
    evicted: int


class RateLimiter:
    """One GCRA bucket per key, at most `max_keys` of them (see the module docstring)."""

    def __init__(self, rate: RateLimit, *, max_keys: int = DEFAULT_MAX_KEYS) -> None:
        if max_keys < 1:
            raise ValueError(f"max_keys must be at least 1, got {max_keys}")
        self.rate = rate
        self.max_keys = max_keys
        self._interval = rate.interval
        self._tolerance = self._interval * _TOLERANCE
        # key -> tat (monotonic seconds), least recently used first
        self._tat: OrderedDict[str, float] = OrderedDict()
        self._now = -math.inf
        self._allowed = 0
        self._limited = 0
        self._expired = 0
        self._evicted = 0

    def check(self, key: str, now: float) -> Decision:
        """Count one request of `key` at monotonic time `now`; allowed or not."""
        now = self._clock(now)
        self._expire(now, EXPIRE_PER_CHECK)
        window = self.rate.window
        tat = self._tat.get(key)
        start = now if tat is None or tat < now else tat
        new_tat = start + self._interval
        if new_tat - now > window + self._tolerance:
            # Refused: the state does not change (a refused request costs nothing).
            self._limited += 1
            if tat is not None:
                self._tat.move_to_end(key)
            return Decision(
                allowed=False,
                limit=self.rate.limit,
                remaining=0,
                reset_after=max(0.0, start - now),
                retry_after=new_tat - window - now,
            )
        if tat is None:
            if len(self._tat) >= self.max_keys:
                self._tat.popitem(last=False)
                self._evicted += 1
            self._tat[key] = new_tat
        else:
            self._tat[key] = new_tat
            self._tat.move_to_end(key)
        self._allowed += 1
        return Decision(
            allowed=True,
            limit=self.rate.limit,
            remaining=self._whole_tokens(window - (new_tat - now)),
            reset_after=new_tat - now,
            retry_after=0.0,
        )

    def expire(self, now: float) -> int:
        """Drop every expired key now (`check` does this a few at a time); how many."""
        return self._expire(self._clock(now), None)

    def statistics(self) -> RateLimiterStatistics:
        return RateLimiterStatistics(
            limit=self.rate.limit,
            window=self.rate.window,
            keys=len(self._tat),
            max_keys=self.max_keys,
            allowed=self._allowed,
            limited=self._limited,
            expired=self._expired,
            evicted=self._evicted,
        )

    def __len__(self) -> int:
        return len(self._tat)

    def __contains__(self, key: object) -> bool:
        return key in self._tat

    def _clock(self, now: float) -> float:
        if now > self._now:
            self._now = now
        return self._now

    def _expire(self, now: float, budget: int | None) -> int:
        """Drop full-bucket keys from the least-recently-used end, at most `budget`."""
        dropped = 0
        table = self._tat
        while table and (budget is None or dropped < budget):
            key, tat = next(iter(table.items()))
            if tat > now:
                break
            del table[key]
            dropped += 1
        self._expired += dropped
        return dropped

    def _whole_tokens(self, seconds_of_tokens: float) -> int:
        tokens = math.floor(seconds_of_tokens / self._interval + _TOLERANCE)
        return min(self.rate.limit, max(0, tokens))


def retry_after_seconds(decision: Decision) -> int:
    """`Retry-After` / `retry_after`: whole seconds, rounded up, at least 1."""
    return max(1, math.ceil(decision.retry_after))


def headers(decision: Decision, *, wall_now: float) -> list[tuple[bytes, bytes]]:
    """The rate-limit response headers (ASGI form: lower-case names, bytes).

    `wall_now` is `time.time()` when the response is made: `X-RateLimit-Reset`
    is `ceil(wall_now + reset_after)`, epoch seconds (DESIGN.md §4).
    `Retry-After` is added when the request was refused.
    """
    answer = [
        (b"x-ratelimit-limit", b"%d" % decision.limit),
        (b"x-ratelimit-remaining", b"%d" % decision.remaining),
        (b"x-ratelimit-reset", b"%d" % math.ceil(wall_now + decision.reset_after)),
    ]
    if not decision.allowed:
        answer.append((b"retry-after", b"%d" % retry_after_seconds(decision)))
    return answer


def error_details(decision: Decision) -> dict[str, int]:
    """What goes inside `error` of the 429 body besides code and message.

    `ApiError(ERROR_CODE, ERROR_MESSAGE, extra=error_details(decision))` gives
    `{"error": {"code": "RATE_LIMITED", "message": "Too many requests",
    "details": {}, "retry_after": 60}}`.
    """
    return {"retry_after": retry_after_seconds(decision)}


def is_exempt(path: str) -> bool:
    """True for `/health` and `/health/...` only (never limited, no headers).

    Not `/healthz`, `/health-check`, `/api/health`, and not a path with a
    `.` or `..` segment (`/health/../api/sessions`): whatever a router might
    make of that, it is not a health probe.
    """
    if path == "/health":
        return True
    if not path.startswith("/health/"):
        return False
    return not any(segment in (".", "..") for segment in path.split("/"))


def client_key(token_id: str | None, peer: str | None) -> str:
    """The limiter key of a request: its token's id, else its socket peer's address.

    * `tok:<id>` when the request authenticated with a token: the token is the
      client, whichever address it comes from.
    * `ip:<address>` otherwise, from the *socket* peer (the ASGI `client`),
      never from a header. IPv4-mapped IPv6 (`::ffff:192.0.2.1`) is the IPv4
      address; any other IPv6 address but `::1` is keyed by its /64
      (`ip:2001:db8::/64`), since a single host is usually given a whole /64.
    * `peer:<value>` for a peer that is not an IP address (a Unix socket: the
      owner's control socket), `peer:-` when there is none; all such requests
      share one budget.
    """
    if token_id:
        return f"tok:{token_id}"
    if not peer:
        return "peer:-"
    try:
        address = ipaddress.ip_address(peer.split("%", 1)[0])
    except ValueError:
        return f"peer:{peer}"
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return f"ip:{address.ipv4_mapped}"
        if address.is_loopback:
            return f"ip:{address}"
        network = ipaddress.IPv6Network((address, _IPV6_PREFIX), strict=False)
        return f"ip:{network}"
    return f"ip:{address}"
