"""Named crash points: a test makes the daemon signal itself at one exact moment.

`LOKI_CRASH_AT=<point>[#<n>][:<SIGNAL>]` (read once, at import) sends
`<SIGNAL>` (default `SIGKILL`) to this process the `n`-th time (default the
first) the code passes `crash_point("<point>")`. A crash the harness of
`tests/crash_kit.py` can only hit by chance (a SIGKILL at a seeded moment)
becomes one the tests hit every time: "between the rename of
`HUMAN_INPUT.md` and the commit of its input", "after the agent was recorded
and before it was released", "while `loki serve` holds its pid file but has
no signal handling yet". The points are listed in docs/faults.md.

Unset (the only case outside the tests), `crash_point` is one comparison of
the name against `None`. The variable is for tests only: an operator has no
use for it, and it is not a setting (docs/configuration.md).
"""

from __future__ import annotations

import os
import signal
import sys
import threading

ENV = "LOKI_CRASH_AT"


def _parse(spec: str) -> tuple[str | None, int, signal.Signals]:
    """`point#n:SIGNAL` -> (point, n, signal); a malformed value is refused loudly, since
    a test that thinks it crashes the daemon and does not would pass for the wrong reason."""
    if not spec:
        return None, 0, signal.SIGKILL
    where, _, name = spec.partition(":")
    point, _, count = where.partition("#")
    try:
        signum = signal.Signals[name or "SIGKILL"]
        nth = int(count or "1")
    except (KeyError, ValueError):
        raise SystemExit(f"lokid: {ENV}={spec!r}: expected <point>[#<n>][:<SIGNAL>]") from None
    if not point or nth < 1:
        raise SystemExit(f"lokid: {ENV}={spec!r}: expected <point>[#<n>][:<SIGNAL>]")
    return point, nth, signum


_POINT, _NTH, _SIGNAL = _parse(os.environ.get(ENV, ""))
_passed = 0
_lock = threading.Lock()  # points are passed from worker threads too


def crash_point(name: str) -> None:
    """Signal this process here if `LOKI_CRASH_AT` names this point (module docstring)."""
    global _passed
    if _POINT is None or name != _POINT:
        return
    with _lock:
        _passed += 1
        if _passed != _NTH:
            return
    print(f"lokid: crash point {name}: sending {_SIGNAL.name} to myself", file=sys.stderr)
    sys.stderr.flush()
    os.kill(os.getpid(), _SIGNAL)
