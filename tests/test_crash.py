"""Crash-point testing (issue 8): SIGKILL `loki serve` under a mixed load at a seeded
moment, restart it, and check that nothing acknowledged was lost (tests/crash_kit.py,
docs/reliability.md).

Seeds: `LOKI_CRASH_SEEDS=N` runs seeds 0..N-1 (default 3, the fast variant of
`make test`); `LOKI_CRASH_SEED=17` (or `17,42`) runs exactly those.
`LOKI_CRASH_LOAD_SECONDS` (default 3) bounds the moment of the kill.
`LOKI_CRASH_REPORT=FILE` appends one summary line per seed to FILE.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from .crash_kit import run_seed

pytestmark = pytest.mark.e2e


def seeds() -> list[int]:
    chosen = os.environ.get("LOKI_CRASH_SEED", "").strip()
    if chosen:
        return [int(s) for s in chosen.split(",") if s.strip()]
    return list(range(int(os.environ.get("LOKI_CRASH_SEEDS", "3"))))


def append_report(line: str) -> None:
    report = os.environ.get("LOKI_CRASH_REPORT")
    if report:
        with open(report, "a") as out:
            out.write(line + "\n")


@pytest.mark.parametrize("seed", seeds(), ids=lambda s: f"seed{s}")
def test_sigkill_under_load_loses_nothing_acknowledged(seed: int, tmp_path: Path) -> None:
    # A trio.run of its own (not an async test): pytest.fail below is then reported as
    # the plain report, not wrapped in pytest-trio's exception group.
    outcome = trio.run(run_seed, seed, tmp_path)
    print(outcome.report)
    append_report(outcome.summary)
    if outcome.problems:
        pytest.fail(outcome.report, pytrace=False)
