"""Rate limiting (`lokid.ratelimit`) on an injected clock: no test sleeps.

`ExactBucket` below is the token bucket written the obvious way, in exact
fractions; the limiter (GCRA, floats) must answer like it on a time grid
where float rounding cannot matter, and must keep the documented guarantee
on any times at all.
"""

from __future__ import annotations

import math
from fractions import Fraction

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lokid.http.errors import ApiError
from lokid.ratelimit import (
    ERROR_CODE,
    ERROR_MESSAGE,
    EXPIRE_PER_CHECK,
    Decision,
    RateLimit,
    RateLimiter,
    RateLimiterStatistics,
    client_key,
    error_details,
    headers,
    is_exempt,
    parse_rate_limit,
    retry_after_seconds,
)

WALL = 1_700_000_000.25  # a `time.time()` for the headers


def limiter(limit: int = 5, window: float = 10.0, **kwargs: int) -> RateLimiter:
    return RateLimiter(RateLimit(limit, window), **kwargs)


# -- parse_rate_limit --------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "limit", "window"),
    [
        ("100/60", 100, 60.0),
        ("100/60s", 100, 60.0),
        ("100/1m", 100, 60.0),
        ("5000/1h", 5000, 3600.0),
        ("10000/1d", 10000, 86400.0),
        ("  1/1  ", 1, 1.0),
        ("1000000/86400", 1_000_000, 86400.0),
        ("007/030", 7, 30.0),
    ],
)
def test_parse_rate_limit(text: str, limit: int, window: float) -> None:
    assert parse_rate_limit(text) == RateLimit(limit=limit, window=window)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "is not <limit>/<window>"),
        ("100", "is not <limit>/<window>"),
        ("100/", "is not <limit>/<window>"),
        ("/60", "is not <limit>/<window>"),
        ("-1/60", "is not <limit>/<window>"),
        ("100/1.5", "is not <limit>/<window>"),
        ("100 / 60", "is not <limit>/<window>"),
        ("100/60 s", "is not <limit>/<window>"),
        ("100/1w", "is not <limit>/<window>"),
        ("100/minute", "is not <limit>/<window>"),
        ("100/1M", "is not <limit>/<window>"),
        ("1_000/60", "is not <limit>/<window>"),
        ("１００/60", "is not <limit>/<window>"),  # full-width digits  # noqa: RUF001
        ("0/60", "the limit must be 1-1,000,000, got 0"),
        ("1000001/60", "the limit must be 1-1,000,000, got 1000001"),
        ("100/0", "the window must be 1-86,400 seconds (at most 1d), got 0 s"),
        ("100/86401", "got 86401 s"),
        ("100/25h", "got 90000 s"),
        ("100/2d", "got 172800 s"),
    ],
)
def test_parse_rate_limit_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match="rate limit") as caught:
        parse_rate_limit(text)
    assert repr(text) in str(caught.value)
    assert message in str(caught.value)


def test_rate_limit_str_and_interval() -> None:
    rate = parse_rate_limit("100/1m")
    assert str(rate) == "100/60"
    assert rate.interval == pytest.approx(0.6)


# -- check -------------------------------------------------------------------


def test_limit_reached_exactly_at_n_and_remaining_counts_down() -> None:
    rl = limiter(5, 10.0)
    answers = [rl.check("ip:192.0.2.1", 0.0) for _ in range(6)]
    assert [a.allowed for a in answers] == [True] * 5 + [False]
    assert [a.remaining for a in answers] == [4, 3, 2, 1, 0, 0]
    assert all(a.limit == 5 for a in answers)


def test_reset_is_when_the_bucket_is_full_again() -> None:
    rl = limiter(5, 10.0)  # one token back every 2 s
    for spent in range(1, 6):
        decision = rl.check("k", 100.0)
        assert decision.reset_after == pytest.approx(2.0 * spent)
    refused = rl.check("k", 100.0)
    assert refused.reset_after == pytest.approx(10.0)
    # at the reset time the full limit is available again
    after = rl.check("k", 110.0)
    assert after.allowed and after.remaining == 4


def test_retry_after_is_when_one_request_is_allowed() -> None:
    rl = limiter(5, 10.0)
    for _ in range(5):
        rl.check("k", 0.0)
    refused = rl.check("k", 0.5)
    assert not refused.allowed
    assert refused.retry_after == pytest.approx(1.5)
    assert rl.check("k", 1.99).allowed is False
    assert rl.check("k", 2.0).allowed is True
    assert rl.check("k", 2.0).allowed is False


def test_refill_is_continuous() -> None:
    rl = limiter(5, 10.0)
    for _ in range(5):
        rl.check("k", 0.0)
    # 4 s later two tokens are back: two requests pass, the third does not
    assert [rl.check("k", 4.0).allowed for _ in range(3)] == [True, True, False]
    # a full window after the last request the bucket is full
    assert [rl.check("k", 14.0).allowed for _ in range(6)] == [True] * 5 + [False]


def test_refused_requests_cost_nothing() -> None:
    rl = limiter(2, 10.0)
    rl.check("k", 0.0)
    rl.check("k", 0.0)
    for t in range(1, 5):
        assert not rl.check("k", float(t)).allowed
    assert rl.check("k", 5.0).allowed  # not pushed back by the refused hammering


def test_keys_are_independent() -> None:
    rl = limiter(3, 60.0)
    flood = [rl.check("ip:198.51.100.7", 1.0) for _ in range(100)]
    assert sum(d.allowed for d in flood) == 3
    other = rl.check("ip:198.51.100.8", 1.0)
    token = rl.check("tok:tok-abc", 1.0)
    assert other.allowed and other.remaining == 2
    assert token.allowed and token.remaining == 2


def test_steady_rate_at_the_limit_is_never_refused() -> None:
    rl = limiter(3, 1.0)  # interval 1/3 s: float sums round
    t = 1e7  # a large monotonic clock (a machine up for months)
    for _ in range(3):
        assert rl.check("k", t).allowed
    for i in range(1, 3001):
        assert rl.check("k", t + i / 3).allowed


def test_guarantee_is_two_limits_in_one_closed_window_and_no_more() -> None:
    """Pins the documented bound: a spent bucket is full again one window later."""
    rl = limiter(4, 10.0)
    burst = [rl.check("k", 0.0).allowed for _ in range(5)]
    again = [rl.check("k", 10.0).allowed for _ in range(5)]
    assert burst == again == [True] * 4 + [False]


def test_clock_never_runs_backwards() -> None:
    rl = limiter(1, 10.0)
    assert rl.check("k", 5.0).allowed
    late = rl.check("k", 3.0)  # taken as 5.0
    assert not late.allowed
    assert late.retry_after == pytest.approx(10.0)


def test_max_keys_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_keys must be at least 1, got 0"):
        limiter(max_keys=0)


# -- memory: expiry and eviction ---------------------------------------------


def test_idle_keys_expire() -> None:
    rl = limiter(5, 10.0)
    for _ in range(5):
        rl.check("old", 0.0)
    rl.check("new", 9.0)
    assert "old" in rl  # its bucket is full again only at 10.0
    rl.check("new", 10.0)
    assert "old" not in rl
    assert "new" in rl
    assert rl.statistics().expired == 1


def test_a_busy_key_is_not_expired() -> None:
    rl = limiter(5, 10.0)
    for _ in range(5):
        rl.check("busy", 0.0)
    rl.check("busy", 1.0)  # refused, but a use: it moves to the recent end
    assert rl.expire(9.9) == 0
    assert "busy" in rl
    assert rl.expire(10.0) == 1


def test_expiry_is_bounded_per_check_and_catches_up() -> None:
    rl = limiter(5, 10.0)
    for i in range(100):
        rl.check(f"ip:10.0.0.{i}", 0.0)
    rl.check("ip:10.0.1.1", 20.0)
    assert len(rl) == 101 - EXPIRE_PER_CHECK
    for i in range(20):
        rl.check("ip:10.0.1.1", 20.0 + i)
    assert len(rl) == 1
    assert rl.statistics().expired == 100


def test_max_keys_evicts_the_least_recently_used() -> None:
    rl = limiter(2, 60.0, max_keys=3)
    for key in ("a", "b", "c"):
        rl.check(key, 0.0)
        rl.check(key, 0.0)
    assert not rl.check("a", 1.0).allowed  # "a" is now the most recently used
    rl.check("d", 2.0)
    assert "b" not in rl
    assert {"a", "c", "d"} == {key for key in ("a", "b", "c", "d") if key in rl}
    assert len(rl) == 3
    # the evicted key starts afresh: a full bucket (the documented client-favouring policy)
    back = rl.check("b", 3.0)
    assert back.allowed and back.remaining == 1
    assert "c" not in rl
    stats = rl.statistics()
    assert (stats.keys, stats.max_keys, stats.evicted) == (3, 3, 2)


def test_a_flooding_key_is_never_evicted() -> None:
    rl = limiter(1, 60.0, max_keys=10)
    rl.check("flood", 0.0)
    for i in range(1000):
        assert not rl.check("flood", i / 100).allowed
        rl.check(f"ip:10.0.{i // 256}.{i % 256}", i / 100)
        assert len(rl) <= 10
    assert "flood" in rl


def test_statistics() -> None:
    rl = limiter(2, 30.0, max_keys=50)
    for _ in range(3):
        rl.check("k", 0.0)
    rl.check("j", 0.0)
    assert rl.statistics() == RateLimiterStatistics(
        limit=2, window=30.0, keys=2, max_keys=50, allowed=3, limited=1, expired=0, evicted=0
    )


# -- headers and the 429 body ------------------------------------------------


def test_headers_of_an_allowed_request() -> None:
    rl = limiter(100, 60.0)
    decision = rl.check("k", 0.0)
    assert headers(decision, wall_now=WALL) == [
        (b"x-ratelimit-limit", b"100"),
        (b"x-ratelimit-remaining", b"99"),
        (b"x-ratelimit-reset", b"%d" % math.ceil(WALL + 0.6)),
    ]


def test_headers_of_a_refused_request() -> None:
    rl = limiter(2, 60.0)
    rl.check("k", 0.0)
    rl.check("k", 0.0)
    decision = rl.check("k", 0.0)
    assert headers(decision, wall_now=WALL) == [
        (b"x-ratelimit-limit", b"2"),
        (b"x-ratelimit-remaining", b"0"),
        (b"x-ratelimit-reset", b"%d" % math.ceil(WALL + 60.0)),
        (b"retry-after", b"30"),
    ]


def test_reset_header_is_epoch_seconds_rounded_up() -> None:
    decision = Decision(allowed=True, limit=5, remaining=4, reset_after=2.0, retry_after=0.0)
    reset = dict(headers(decision, wall_now=1000.0))[b"x-ratelimit-reset"]
    assert reset == b"1002"
    reset = dict(headers(decision, wall_now=1000.01))[b"x-ratelimit-reset"]
    assert reset == b"1003"


@pytest.mark.parametrize(
    ("retry_after", "seconds"), [(1e-9, 1), (0.5, 1), (1.0, 1), (1.01, 2), (59.2, 60)]
)
def test_retry_after_is_whole_seconds_rounded_up_at_least_one(
    retry_after: float, seconds: int
) -> None:
    decision = Decision(
        allowed=False, limit=1, remaining=0, reset_after=retry_after, retry_after=retry_after
    )
    assert retry_after_seconds(decision) == seconds
    assert error_details(decision) == {"retry_after": seconds}
    assert dict(headers(decision, wall_now=0.0))[b"retry-after"] == b"%d" % seconds


def test_waiting_retry_after_is_enough() -> None:
    rl = limiter(7, 13.0)
    t = 0.0
    for _ in range(50):
        decision = rl.check("k", t)
        if not decision.allowed:
            t += retry_after_seconds(decision)
            assert rl.check("k", t).allowed
        t += 0.1


def test_the_429_body_has_retry_after_inside_error() -> None:
    rl = limiter(1, 60.0)
    rl.check("k", 0.0)
    decision = rl.check("k", 0.0)
    error = ApiError(ERROR_CODE, ERROR_MESSAGE, extra=error_details(decision))
    assert error.status == 429
    assert error.body() == {
        "error": {
            "code": "RATE_LIMITED",
            "message": "Too many requests",
            "details": {},
            "retry_after": 60,
        }
    }


# -- exempt paths and keys ---------------------------------------------------


@pytest.mark.parametrize(
    ("path", "exempt"),
    [
        ("/health", True),
        ("/health/", True),
        ("/health/ready", True),
        ("/health/live", True),
        ("/healthz", False),
        ("/healthz-foo", False),
        ("/health-check", False),
        ("/api/health", False),
        ("/HEALTH", False),
        ("//health", False),
        ("/health/../api/sessions", False),
        ("/health/./ready", False),
        ("/", False),
        ("/api/sessions", False),
    ],
)
def test_is_exempt(path: str, exempt: bool) -> None:
    assert is_exempt(path) is exempt


@pytest.mark.parametrize(
    ("token_id", "peer", "key"),
    [
        ("tok-abc", "192.0.2.1", "tok:tok-abc"),
        ("tok-abc", None, "tok:tok-abc"),
        (None, "192.0.2.1", "ip:192.0.2.1"),
        (None, "127.0.0.1", "ip:127.0.0.1"),
        (None, "::ffff:192.0.2.1", "ip:192.0.2.1"),
        (None, "2001:DB8:0:0:1::5", "ip:2001:db8::/64"),
        (None, "2001:db8::99", "ip:2001:db8::/64"),
        (None, "2001:db8:0:1::5", "ip:2001:db8:0:1::/64"),
        (None, "fe80::1%eth0", "ip:fe80::/64"),
        (None, "::1", "ip:::1"),
        (None, "/run/loki/control.sock", "peer:/run/loki/control.sock"),
        (None, None, "peer:-"),
        ("", "192.0.2.1", "ip:192.0.2.1"),
    ],
)
def test_client_key(token_id: str | None, peer: str | None, key: str) -> None:
    assert client_key(token_id, peer) == key


# -- properties --------------------------------------------------------------


@attrs.define
class ExactBucket:
    """The token bucket in exact arithmetic: `limit` tokens, `limit / window` per second."""

    limit: int
    window: int
    tokens: dict[str, Fraction] = attrs.Factory(dict)
    last: dict[str, Fraction] = attrs.Factory(dict)

    def check(self, key: str, now: Fraction) -> tuple[bool, int, Fraction, Fraction]:
        rate = Fraction(self.limit, self.window)
        tokens = self.tokens.get(key, Fraction(self.limit))
        tokens = min(Fraction(self.limit), tokens + (now - self.last.get(key, now)) * rate)
        self.last[key] = now
        allowed = tokens >= 1
        if allowed:
            tokens -= 1
        self.tokens[key] = tokens
        reset_after = (self.limit - tokens) / rate
        retry_after = Fraction(0) if allowed else (1 - tokens) / rate
        return allowed, math.floor(tokens), reset_after, retry_after


# times on a grid of 1/8 s (exact in binary), windows of whole seconds <= 100:
# token counts are then multiples of 1/(8 * window) >= 1/800 apart from a whole
# number, more than the limiter's tolerance of 1/1000 token, so it must agree.
grid_calls = st.lists(
    st.tuples(st.integers(0, 3), st.integers(0, 40)),  # (key, eighths of a second later)
    max_size=300,
)


@settings(max_examples=300, deadline=None)
@given(limit=st.integers(1, 12), window=st.integers(1, 100), calls=grid_calls)
def test_agrees_with_an_exact_token_bucket(
    limit: int, window: int, calls: list[tuple[int, int]]
) -> None:
    """Also shows that expiry loses nothing: the exact bucket never forgets a key."""
    rl = limiter(limit, float(window))
    exact = ExactBucket(limit, window)
    eighths = 0
    for key_index, step in calls:
        eighths += step
        key = f"ip:10.0.0.{key_index}"
        got = rl.check(key, eighths / 8)
        allowed, remaining, reset_after, retry_after = exact.check(key, Fraction(eighths, 8))
        assert got.allowed is allowed
        assert got.remaining == remaining
        assert got.reset_after == pytest.approx(float(reset_after), abs=1e-6)
        assert got.retry_after == pytest.approx(float(retry_after), abs=1e-6)


calls_at_any_time = st.lists(
    st.tuples(
        st.integers(0, 2),
        st.one_of(st.just(0.0), st.floats(0.0, 5.0), st.floats(0.0, 200.0)),
    ),
    max_size=400,
)


@settings(max_examples=300, deadline=None)
@given(
    limit=st.integers(1, 20),
    window=st.integers(1, 100),
    start=st.floats(0.0, 1e7),
    calls=calls_at_any_time,
    max_keys=st.integers(1, 4),
)
def test_guarantee_on_any_times(
    limit: int, window: int, start: float, calls: list[tuple[int, float]], max_keys: int
) -> None:
    """For one key, requests allowed in any closed interval of length d number at most
    `limit + d * limit / window` (with the documented 1/1000-token tolerance), while it
    has not been evicted; and the limiter never holds more than `max_keys` keys."""
    rl = limiter(limit, float(window), max_keys=max_keys)
    allowed: dict[str, list[float]] = {}
    t = start
    for key_index, delta in calls:
        t += delta
        key = f"tok:{key_index}"
        decision = rl.check(key, t)
        interval = window / limit
        if decision.allowed:
            allowed.setdefault(key, []).append(t)
        else:
            assert 0 < decision.retry_after <= interval * 1.001 + 1e-6
            assert decision.remaining == 0
        assert 0 <= decision.remaining < limit
        assert 0 <= decision.reset_after <= window + interval * 0.001 + 1e-6
        assert len(rl) <= max_keys
        if rl.statistics().evicted:
            break  # an evicted key starts afresh (the documented policy): stop here
    rate = limit / window
    for times in allowed.values():
        # requests i..j (i <= j) number j - i + 1 <= limit + (t_j - t_i) * rate, i.e.
        # a_j - a_i + 1 <= limit with a_k = k - t_k * rate: check against the running minimum
        lowest = math.inf
        for k, time in enumerate(times):
            a = k - time * rate
            lowest = min(lowest, a)
            assert a - lowest + 1 <= limit + 0.002


@settings(max_examples=100, deadline=None)
@given(calls=st.lists(st.tuples(st.integers(0, 50), st.floats(0.0, 3.0)), max_size=300))
def test_memory_stays_bounded(calls: list[tuple[int, float]]) -> None:
    rl = limiter(3, 10.0, max_keys=8)
    t = 0.0
    for key_index, delta in calls:
        t += delta
        rl.check(f"ip:10.0.0.{key_index}", t)
        assert len(rl) <= 8
    stats = rl.statistics()
    assert stats.allowed + stats.limited == len(calls)
    assert rl.expire(t + 11.0) == stats.keys
    assert len(rl) == 0
