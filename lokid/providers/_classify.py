"""Why a provider run failed, and how long to wait before the next one. Pure.

Rules:

* Four kinds. `OK`: the run did its job. `PERMANENT`: retrying cannot help
  (bad or missing credentials, unknown model, no credit, permission refused,
  the CLI is gone): the session fails at once. `RATE_LIMIT`: the provider
  refused work for now; wait for its reset time when it gave one.
  `TRANSIENT`: anything else (crash, timeout, overload, network, an error
  result, no result, no output): retry with exponential backoff and jitter.
* Exit code 0 plus a successful result (stream-json), or plus some output
  (text providers), is `OK` whatever the text says: agents write about
  "401" and "rate limits" all day, and a run that succeeded succeeded.
* Otherwise the evidence is read in this order: structured signals from the
  stream (`RateLimited`, `ApiError`), then the text: stderr's tail, the
  tail of non-JSON output, and the result text *only when the result is an
  error* (a successful result's text is the agent's prose). Permanent
  patterns are checked before rate-limit patterns (OpenAI's
  `insufficient_quota` is a 429 that no waiting cures), rate-limit
  patterns before the transient refinements.
* Patterns are deliberately specific ("Invalid API key", `invalid
  x-api-key`, `authentication_error`, "There's an issue with the selected
  model"): a permanent verdict ends the session, so a false one is worse
  than a few wasted retries. A bare "permission denied" or "401" in an
  agent's output is *not* permanent.
* Reset times: "Claude AI usage limit reached|<epoch>", "resets 4pm
  (America/New_York)", "reset at Oct 6, 10am", "try again at Jul 5th, 2026
  8:19 PM" (wall-clock times: in the named zone, else in the zone of
  `now`), ISO 8601 times after "resets at", `"resets_at": <epoch>`; and
  delays: "try again in 2 days 3 hours 5 minutes", "Please retry in
  23.5s", "Retry-After: 30", `"retryDelay": "23s"`, `"resets_in_seconds":
  N`. When several appear, the last one in the text wins (tails are
  chronological). "Retrying in N seconds" is a client's own retry loop, not
  a reset hint.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import math
import os
import random
import re
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import attrs

from lokid.providers._records import ApiError, RateLimited, Result

# Seconds added to a provider's reset time (its clock and ours differ, and
# "resets 4pm" has minute resolution).
RESET_MARGIN = 60.0
# Random seconds added to a rate-limit wait, so sessions sharing an account
# do not all retry in the same second.
RESET_JITTER = 30.0
# The least a rate-limited retry waits without a hint: 60 s, doubling per
# consecutive rate-limited attempt, up to an hour. Also applied when the hint
# is shorter (stale "resets at" messages in the past must not spin).
RATE_LIMIT_FLOOR = 60.0
RATE_LIMIT_FLOOR_CAP = 3600.0
# How much of the text tails is searched (the newest part).
MAX_SCAN_CHARS = 32 * 1024


class FailureKind(enum.Enum):
    OK = "ok"
    TRANSIENT = "transient"
    RATE_LIMIT = "rate_limit"
    PERMANENT = "permanent"


@attrs.frozen
class Failure:
    """The verdict on one provider run.

    `code` is machine-readable: `ok`; permanent `auth`, `unknown_model`,
    `billing`, `permission`, `cli_missing`, `workdir_missing`, `budget`;
    `rate_limit`; transient `overloaded`, `server_error`, `network`,
    `timeout`, `signal`, `error_result`, `no_result`, `empty_output`, `exit`,
    `spawn_failed`.
    """

    kind: FailureKind
    code: str
    reason: str
    exit_code: int | None = None
    reset_at: datetime | None = None
    retry_after: float | None = None

    @property
    def ok(self) -> bool:
        return self.kind is FailureKind.OK

    @property
    def retryable(self) -> bool:
        return self.kind in (FailureKind.TRANSIENT, FailureKind.RATE_LIMIT)

    def wait_hint(self, now: datetime) -> float | None:
        """Seconds until the provider said it would take work again (+ margin), if it said."""
        if self.reset_at is not None:
            return max(0.0, (self.reset_at - now).total_seconds()) + RESET_MARGIN
        if self.retry_after is not None:
            return self.retry_after
        return None


OK = Failure(FailureKind.OK, "ok", "completed", exit_code=0)

# -- patterns ---------------------------------------------------------------------

_I = re.IGNORECASE

PERMANENT_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (code, re.compile(pattern, _I))
    for code, pattern in (
        # credentials
        ("auth", r"invalid api key"),
        ("auth", r"invalid x-api-key"),
        ("auth", r"authentication_error|authentication_failed"),
        ("auth", r"incorrect api key provided"),
        ("auth", r"api key not valid"),
        ("auth", r"missing api key|no api key (?:found|provided|was provided)"),
        ("auth", r"could not resolve authentication method"),
        ("auth", r"oauth token (?:has )?expired"),
        ("auth", r"must specify the \w+ environment variable"),
        ("auth", r"\b401 unauthorized\b|(?:api error|status(?: code)?):? 401\b"),
        ("auth", r"please run /login|\brun /login\b"),
        # model
        ("unknown_model", r"there[\u2019']s an issue with the selected model"),
        ("unknown_model", r"not_found_error[^\n]{0,120}\bmodel\b"),
        ("unknown_model", r"model_not_found"),
        ("unknown_model", r"\bmodel [`'\"]?[\w.:/@\[\]-]+[`'\"]? does not exist"),
        ("unknown_model", r"\bmodels/[\w.-]+ is not found"),
        ("unknown_model", r"(?m)^\W*(?:error:?\s*)?(?:unknown|invalid|unsupported) model\b"),
        # money
        ("billing", r"credit balance is too low"),
        ("billing", r"insufficient_quota|billing_error"),
        ("billing", r"quota exceeded\. check your plan and billing"),
        ("billing", r"insufficient (?:credits|funds|balance)"),
        ("billing", r"\b402 payment required"),
        # permission
        ("permission", r"permission_error|\bPERMISSION_DENIED\b"),
        ("permission", r"(?:api error|unexpected status|status(?: code)?):? 403\b"),
    )
)

RATE_LIMIT_PATTERNS: tuple[re.Pattern[str], ...] = tuple(
    re.compile(pattern, _I)
    for pattern in (
        r"usage[ _]limit[ _]reached|usage limit has been reached",
        r"\b\d+-hour limit reached|\bweekly limit reached|\bsession limit reached",
        r"you[\u2019']ve hit your (?:usage )?limit",
        r"rate_limit_error|rate_limit_exceeded|ratelimiterror",
        r"rate limit (?:exceeded|reached)|rate-limited|\brate limited\b",
        r"too many requests",
        r"(?:status|error|code|http|api error)[\s:=\"]*429\b|\b429 too many|\b429 \{",
        r"resource_exhausted|resource has been exhausted",
        r"exceeded your current quota|\bquota exceeded\b",
    )
)

TRANSIENT_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (code, re.compile(pattern, _I))
    for code, pattern in (
        ("overloaded", r"overloaded"),
        ("server_error", r"(?:api error|status(?: code)?|unexpected status):? 5\d\d\b"),
        ("server_error", r"internal server error|service unavailable|bad gateway"),
        ("network", r"econnreset|econnrefused|etimedout|enotfound|eai_again|socket hang up"),
        ("network", r"connection (?:error|reset|refused)|network error|stream disconnected"),
        ("timeout", r"\btimed? ?out\b"),
    )
)

# -- reset times ----------------------------------------------------------------------

_MONTHS = {
    m: i + 1
    for i, m in enumerate(
        ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
    )
}
_EPOCH_RE = re.compile(r"limit reached\|(\d{9,13})\b", _I)
_WHEN = (
    r"(?:(?P<mon>jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)[a-z]*\.?\s+"
    r"(?P<day>\d{1,2})(?:st|nd|rd|th)?(?:,?\s+(?P<year>\d{4}))?(?:,|\s+at)?\s+)?"
    r"(?P<hour>\d{1,2})(?::(?P<minute>\d{2}))?\s*(?P<ampm>[ap]\.?m\b\.?)?"
    r"(?:\s*\((?P<tz>[A-Za-z]+(?:/[A-Za-z0-9_+-]+)*)\))?"
)
_CLOCK_RE = re.compile(r"(?:\bresets?\s+(?:at\s+)?|\btry again at\s+)" + _WHEN, _I)
_UNIT = r"(?:days?|d|hours?|hrs?|h|minutes?|mins?|ms|m|seconds?|secs?|s)(?![a-z])"
_DURATION = rf"\d+(?:\.\d+)?\s*{_UNIT}(?:[\s,]*(?:and\s+)?\d+(?:\.\d+)?\s*{_UNIT})*"
_DELAY_RE = re.compile(
    rf"(?:\btry again in|\bretry in|\bretry after|\bresets? in|\bwait)\s+(?P<dur>{_DURATION})",
    _I,
)
_PART_RE = re.compile(rf"(\d+(?:\.\d+)?)\s*({_UNIT})", _I)
_ISO_RE = re.compile(
    r"(?:\bresets?(?:_at|At)?\"?\s*(?:at\s+|[:=]\s*\"?)|\btry again at\s+)"
    r"(\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:?\d{2})?)",
    _I,
)
_EPOCH_FIELD_RE = re.compile(r"\"?(?:resets_at|resetsAt)\"?\s*:\s*(\d{9,13})\b")
_SECONDS_FIELD_RE = re.compile(r"\"?resets_in_seconds\"?\s*:\s*(\d+(?:\.\d+)?)")
_RETRY_AFTER_RE = re.compile(r"retry-after\"?\s*[:=]\s*\"?(\d+(?:\.\d+)?)", _I)
_RETRY_DELAY_RE = re.compile(r"\"retryDelay\"\s*:\s*\"(\d+(?:\.\d+)?)s\"", _I)
_UNIT_SECONDS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}


def _seconds(duration: str) -> float:
    total = 0.0
    for number, unit in _PART_RE.findall(duration):
        unit = unit.lower()
        if unit == "ms":
            total += float(number) / 1000.0
        elif unit.startswith("mi") or unit == "m":
            total += float(number) * 60.0
        else:
            total += float(number) * _UNIT_SECONDS[unit[0]]
    return total


def _clock_time(match: re.Match[str], now: datetime) -> datetime | None:
    hour = int(match["hour"])
    minute = int(match["minute"] or 0)
    ampm = (match["ampm"] or "").replace(".", "").lower()
    if ampm:
        if not 1 <= hour <= 12:
            return None
        hour = hour % 12 + (12 if ampm.startswith("p") else 0)
    elif match["minute"] is None:
        return None  # a bare number ("resets 5") is not a time
    if hour > 23 or minute > 59:
        return None
    zone = now.tzinfo or UTC
    if match["tz"]:
        with contextlib.suppress(ZoneInfoNotFoundError, ValueError):
            zone = ZoneInfo(match["tz"])
    local_now = now.astimezone(zone)
    try:
        if match["mon"]:
            month = _MONTHS[match["mon"][:3].lower()]
            year = int(match["year"]) if match["year"] else local_now.year
            when = datetime(year, month, int(match["day"]), hour, minute, tzinfo=zone)
            if not match["year"] and when < local_now - timedelta(days=180):
                when = when.replace(year=year + 1)
        else:
            when = local_now.replace(hour=hour, minute=minute, second=0, microsecond=0)
            if when <= local_now:
                when += timedelta(days=1)
    except ValueError:  # Feb 30, and the like
        return None
    return when.astimezone(UTC)


def parse_reset(text: str, now: datetime) -> tuple[datetime | None, float | None]:
    """(reset time, delay in seconds) named by the last rate-limit hint in `text`.

    `now` must be timezone-aware; wall-clock times without a zone are read in its zone.
    """
    found: list[tuple[int, datetime | None, float | None]] = []
    for regex in (_EPOCH_RE, _EPOCH_FIELD_RE):
        for m in regex.finditer(text):
            value = int(m[1])
            if value >= 10**12:  # milliseconds
                value //= 1000
            found.append((m.start(), datetime.fromtimestamp(value, UTC), None))
    for m in _ISO_RE.finditer(text):
        try:
            when = datetime.fromisoformat(m[1])
        except ValueError:
            continue
        if when.tzinfo is None:
            when = when.replace(tzinfo=now.tzinfo or UTC)
        found.append((m.start(), when.astimezone(UTC), None))
    for m in _CLOCK_RE.finditer(text):
        clock = _clock_time(m, now)
        if clock is not None:
            found.append((m.start(), clock, None))
    for m in _DELAY_RE.finditer(text):
        found.append((m.start(), None, _seconds(m["dur"])))
    for regex in (_RETRY_AFTER_RE, _RETRY_DELAY_RE, _SECONDS_FIELD_RE):
        for m in regex.finditer(text):
            found.append((m.start(), None, float(m[1])))
    if not found:
        return None, None
    _, reset_at, delay = max(found, key=lambda item: item[0])
    return reset_at, delay


def is_rate_limit_text(text: str) -> bool:
    return any(p.search(text) for p in RATE_LIMIT_PATTERNS)


def rate_limited_from_text(text: str, now: datetime, *, source: str) -> RateLimited | None:
    """A `RateLimited` record when `text` reports a rate or usage limit."""
    if not is_rate_limit_text(text):
        return None
    reset_at, delay = parse_reset(text, now)
    return RateLimited(reset_at, delay, None, _one_line(text), source)


# -- classify ---------------------------------------------------------------------------


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _first_match(text: str, pattern: re.Pattern[str]) -> str:
    m = pattern.search(text)
    if m is None:
        return ""
    start = text.rfind("\n", 0, m.start()) + 1
    end = text.find("\n", m.end())
    return _one_line(text[start : end if end >= 0 else len(text)])


def _exit_text(exit_code: int) -> str:
    if exit_code < 0:
        return f"killed by signal {-exit_code}"
    return f"exit code {exit_code}"


def classify(
    exit_code: int,
    stderr_tail: str,
    result: Result | None,
    *,
    expects_result: bool = False,
    output_tail: str = "",
    output_bytes: int | None = None,
    rate_limit: RateLimited | None = None,
    api_error: ApiError | None = None,
    now: datetime | None = None,
) -> Failure:
    """Classify one finished provider run.

    `exit_code` is the process's (negative: killed by that signal, as
    `subprocess` reports it). `stderr_tail` is the end of its stderr;
    `output_tail` the end of its non-JSON stdout. `expects_result`: the
    provider speaks stream-json, so exiting without a `result` is a failure.
    `output_bytes`: how much stdout there was (0 with exit 0 is a failure,
    as an agent that said nothing did nothing). `now` (aware; default: the
    local time) anchors reset times such as "resets 4pm".
    """
    if now is None:
        now = datetime.now(UTC).astimezone()
    if exit_code == 0:
        if result is not None and not result.is_error:
            return OK
        if result is None and not expects_result and output_bytes != 0:
            return OK

    parts = [stderr_tail[-MAX_SCAN_CHARS:], output_tail[-MAX_SCAN_CHARS:]]
    if result is not None and result.is_error:
        parts.append(result.text[-MAX_SCAN_CHARS:])
    if api_error is not None:
        parts.append(api_error.text[-MAX_SCAN_CHARS:])
    text = "\n".join(p for p in parts if p)

    def failure(kind: FailureKind, code: str, reason: str) -> Failure:
        return Failure(kind, code, reason, exit_code)

    if result is not None and result.subtype == "error_max_budget_usd":
        return failure(FailureKind.PERMANENT, "budget", "the provider's budget cap was reached")
    if api_error is not None and api_error.error in ("authentication_failed", "billing_error"):
        code = "auth" if api_error.error == "authentication_failed" else "billing"
        return failure(FailureKind.PERMANENT, code, _one_line(api_error.text) or api_error.error)
    for code, pattern in PERMANENT_PATTERNS:
        if pattern.search(text):
            return failure(FailureKind.PERMANENT, code, _first_match(text, pattern))
    if exit_code == 127:
        return failure(FailureKind.PERMANENT, "cli_missing", "command not found (exit code 127)")
    if exit_code == 126:
        return failure(FailureKind.PERMANENT, "permission", "cannot execute (exit code 126)")

    if rate_limit is None:
        rate_limit = rate_limited_from_text(text, now, source="text")
    elif rate_limit.reset_at is None and rate_limit.retry_after is None:
        reset_at, delay = parse_reset(text, now)
        rate_limit = attrs.evolve(rate_limit, reset_at=reset_at, retry_after=delay)
    if rate_limit is not None:
        return Failure(
            FailureKind.RATE_LIMIT,
            "rate_limit",
            rate_limit.message or "rate limited",
            exit_code,
            reset_at=rate_limit.reset_at,
            retry_after=rate_limit.retry_after,
        )

    for code, pattern in TRANSIENT_PATTERNS:
        if pattern.search(text):
            return failure(FailureKind.TRANSIENT, code, _first_match(text, pattern))
    if exit_code == 124:
        return failure(FailureKind.TRANSIENT, "timeout", "timed out (exit code 124)")
    if exit_code < 0 or exit_code in (130, 137, 143):
        return failure(FailureKind.TRANSIENT, "signal", f"interrupted ({_exit_text(exit_code)})")
    if result is not None and result.is_error:
        detail = _one_line(result.text) or result.subtype
        return failure(FailureKind.TRANSIENT, "error_result", f"error result: {detail}")
    if exit_code == 0 and result is None and expects_result:
        return failure(FailureKind.TRANSIENT, "no_result", "exited without a result")
    if exit_code == 0:
        return failure(FailureKind.TRANSIENT, "empty_output", "exited 0 without any output")
    last = _one_line(stderr_tail.strip().splitlines()[-1]) if stderr_tail.strip() else ""
    reason = f"{_exit_text(exit_code)}: {last}" if last else _exit_text(exit_code)
    return failure(FailureKind.TRANSIENT, "exit", reason)


def timeout_failure(which: str, seconds: float) -> Failure:
    """The verdict when lokid itself killed the run (`which`: "idle" or "hard")."""
    what = "no output" if which == "idle" else "running"
    return Failure(
        FailureKind.TRANSIENT, "timeout", f"{which} timeout: {what} for {seconds:g} s", None
    )


# Spawn errors about the executable itself: it is missing or cannot be run.
SPAWN_CLI_ERRNOS = frozenset(
    {errno.ENOENT, errno.EACCES, errno.EPERM, errno.ENOEXEC, errno.ENOTDIR, errno.EISDIR}
)


def spawn_failure(exc: OSError, program: str, cwd: str) -> Failure:
    """The verdict when the agent could not be started at all (`OSError` from the spawn).

    By what failed: the working folder (`exc.filename` is `cwd`: the child's
    `chdir`) is `workdir_missing` (gone) or `permission`, permanent; the
    executable (`ENOENT`, `EACCES`, `ENOEXEC`...) is `cli_missing`, permanent, as
    exit 127 is; a shortage (`EMFILE`, `ENFILE`, `ENOMEM`, `EAGAIN`: out of
    descriptors, processes or memory) or any other error is `spawn_failed`,
    transient: the machine, not the session, is at fault, and the retries are bounded.
    """
    why = exc.strerror or str(exc)
    if exc.filename is not None and os.fspath(exc.filename) == cwd:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return Failure(
                FailureKind.PERMANENT,
                "workdir_missing",
                f"cannot start {program}: its working folder {cwd} is gone ({why})",
            )
        return Failure(
            FailureKind.PERMANENT,
            "permission",
            f"cannot start {program}: cannot enter its working folder {cwd} ({why})",
        )
    if exc.errno in SPAWN_CLI_ERRNOS:
        return Failure(FailureKind.PERMANENT, "cli_missing", f"cannot start {program}: {why}")
    return Failure(FailureKind.TRANSIENT, "spawn_failed", f"cannot start {program}: {why}")


# -- waiting -------------------------------------------------------------------------------


def backoff(attempt: int, *, base: float = 2.0, cap: float = 300.0, rng: random.Random) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2**(attempt-1))].

    `attempt` counts consecutive failures (1 = the first retry). Full jitter
    (AWS, "Exponential Backoff And Jitter") spreads retries of many sessions
    best; the expected wait still doubles per attempt, and never exceeds `cap`.
    """
    if attempt < 1:
        raise ValueError(f"attempt must be >= 1, got {attempt}")
    if not (base > 0 and math.isfinite(base)) or not (cap >= 0 and math.isfinite(cap)):
        raise ValueError(f"base must be > 0 and cap >= 0 (finite), got {base}, {cap}")
    upper = min(cap, base * 2.0 ** min(attempt - 1, 1023))
    return rng.uniform(0.0, upper)


def retry_delay(
    failure: Failure,
    attempt: int,
    *,
    rng: random.Random,
    now: datetime,
    base: float = 2.0,
    cap: float = 300.0,
) -> float | None:
    """Seconds to wait before the next attempt, or None when there must be none.

    `OK` and `PERMANENT` → None. `TRANSIENT` → `backoff(attempt)`.
    `RATE_LIMIT` → the provider's hint (reset time + `RESET_MARGIN`, or its
    delay), never less than `RATE_LIMIT_FLOOR` doubling per attempt up to
    `RATE_LIMIT_FLOOR_CAP`, plus up to `RESET_JITTER` s. The hint is not
    capped: a weekly limit really is days away; the runner compares the wait
    with the session's deadline and waits in short ticks that notice stop
    and pause.
    """
    if failure.kind in (FailureKind.OK, FailureKind.PERMANENT):
        return None
    if failure.kind is FailureKind.TRANSIENT:
        return backoff(attempt, base=base, cap=cap, rng=rng)
    if attempt < 1:
        raise ValueError(f"attempt must be >= 1, got {attempt}")
    floor = min(RATE_LIMIT_FLOOR_CAP, RATE_LIMIT_FLOOR * 2.0 ** min(attempt - 1, 64))
    hint = failure.wait_hint(now) or 0.0
    return max(floor, hint) + rng.uniform(0.0, RESET_JITTER)
