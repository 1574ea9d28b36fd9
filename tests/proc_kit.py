"""Helpers for tests that look at real processes through `/proc`."""

from __future__ import annotations

import pathlib
import time


def running(pid: int, argv: list[str], timeout: float = 10.0) -> bool:
    """Whether `pid` runs `argv`, waited for (bounded): right after an exec its
    `/proc/<pid>/cmdline` reads empty for a moment."""
    want = "\0".join(argv).encode() + b"\0"
    deadline = time.monotonic() + timeout
    while True:
        try:
            found = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            found = b""
        if found == want or time.monotonic() > deadline:
            return found == want
        time.sleep(0.005)
