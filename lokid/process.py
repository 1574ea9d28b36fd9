"""Process identity: a pid is only trusted together with its start time.

Pids are reused. Whenever lokid records a process to signal it later (the
daemon in its pid file, agent process groups in the store) it records the
pair (pid, start time in clock ticks since boot, field 22 of
/proc/<pid>/stat), and `is_same_process` checks both before any signal.
"""

from __future__ import annotations

import os
from pathlib import Path

import attrs
import trio


@attrs.frozen
class ProcessIdentity:
    pid: int
    start_ticks: int

    def render(self) -> str:
        return f"{self.pid} {self.start_ticks}"

    @classmethod
    def parse(cls, text: str) -> ProcessIdentity | None:
        parts = text.split()
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            return None
        return cls(int(parts[0]), int(parts[1]))


def start_ticks(pid: int) -> int | None:
    """The start time of `pid`, or None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[19])


def identity(pid: int | None = None) -> ProcessIdentity | None:
    pid = os.getpid() if pid is None else pid
    ticks = start_ticks(pid)
    return None if ticks is None else ProcessIdentity(pid, ticks)


def is_same_process(recorded: ProcessIdentity) -> bool:
    return start_ticks(recorded.pid) == recorded.start_ticks


def is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False
    return stat[stat.rindex(")") + 2 :].split()[0] == "Z"


def scan_groups(pgids: set[int]) -> dict[int, list[tuple[int, str]]]:
    """(pid, state) of every process in each of `pgids`, zombies included: one pass over /proc.

    Bytes and plain descriptors (no file objects, no decoding, only the first
    four fields split): the pass reads every process's stat, about twice as
    fast as with `open()`.
    """
    found: dict[int, list[tuple[int, str]]] = {}
    if not pgids:
        return found
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            fd = os.open(f"/proc/{name}/stat", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            stat = os.read(fd, 4096)
        except OSError:
            continue
        finally:
            os.close(fd)
        # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
        try:
            state, _ppid, pgid, _rest = stat[stat.rindex(b")") + 2 :].split(b" ", 3)
        except ValueError:  # not a stat line (the process went while it was read)
            continue
        if int(pgid) in pgids:
            found.setdefault(int(pgid), []).append((int(name), state.decode()))
    return found


def group_members(pgid: int) -> list[tuple[int, str]]:
    """(pid, state) of every process in process group `pgid`, zombies included."""
    return scan_groups({pgid}).get(pgid, [])


class GroupScanner:
    """`group_members` for many process groups at once: one /proc pass serves them all.

    A pass reads every /proc/<pid>/stat - thousands of files on a busy
    machine - so when many agents end together (a shutdown, 500 sessions)
    one pass per agent would cost the trio thread seconds. Callers join the
    next pass; passes run one at a time in a worker thread; a caller that
    arrives during a pass waits for the following one (it must not get an
    answer older than its question).
    """

    def __init__(self) -> None:
        self._lock = trio.Lock()
        self._next: _Round | None = None
        self.passes = 0

    async def members(self, pgid: int) -> list[tuple[int, str]]:
        """(pid, state) of every process in group `pgid`, zombies included."""
        current = self._next
        if current is None:
            current = self._next = _Round()
        current.pgids.add(pgid)
        async with self._lock:
            if not current.done:
                if self._next is current:
                    self._next = None  # later callers start the next round
                current.found = await trio.to_thread.run_sync(scan_groups, set(current.pgids))
                current.done = True
                self.passes += 1
        return current.found.get(pgid, [])


@attrs.define
class _Round:
    pgids: set[int] = attrs.Factory(set)
    found: dict[int, list[tuple[int, str]]] = attrs.Factory(dict)
    done: bool = False


_SCANNER: trio.lowlevel.RunVar[GroupScanner] = trio.lowlevel.RunVar("group_scanner")


def group_scanner() -> GroupScanner:
    """The scanner of the current trio run."""
    try:
        return _SCANNER.get()
    except LookupError:
        scanner = GroupScanner()
        _SCANNER.set(scanner)
        return scanner
