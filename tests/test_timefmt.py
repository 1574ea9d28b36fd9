"""lokid.timefmt: the wire's timestamps."""

from __future__ import annotations

import datetime as dt

from hypothesis import given
from hypothesis import strategies as st

from lokid import timefmt
from lokid.timefmt import iso, iso_from_ns, utc_now, utc_now_iso

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


@given(st.integers(min_value=0, max_value=253_402_300_799_999_999_999))  # to 9999-12-31
def test_iso_from_ns_is_iso_of_the_same_moment_truncated_to_the_millisecond(ns: int) -> None:
    assert iso_from_ns(ns) == iso(EPOCH + dt.timedelta(microseconds=ns // 1000))


def test_the_cached_second_is_not_reused_for_another_second() -> None:
    second = 1_700_000_000 * 10**9
    assert iso_from_ns(second + 999_999_999) == "2023-11-14T22:13:20.999Z"
    assert iso_from_ns(second + 10**9) == "2023-11-14T22:13:21.000Z"
    assert iso_from_ns(second - 1) == "2023-11-14T22:13:19.999Z"
    assert timefmt._second[0] == 1_700_000_000 - 1


def test_utc_now_iso_is_now() -> None:
    before = iso(utc_now())
    now = utc_now_iso()
    after = iso(utc_now())
    assert before <= now <= after
    assert len(now) == len("2026-11-29T15:00:00.000Z") and now.endswith("Z")
