"""The signals `loki serve` handles, and what it does with one that comes during its start.

The daemon's signal watcher (`Daemon._watch_signals`, a trio signal receiver)
is only up once the listeners are bound, just before the supervisor tree
starts, and `lokid.daemon` itself takes a second or so to import on a busy
machine. Before, a stop signal in that time had its default action: SIGTERM
killed the process at once, leaving `lokid.pid` and `lokid.sock` behind, and
SIGINT raised `KeyboardInterrupt` wherever the start was. And one that came
while the tree started was taken, but the start went on to "ready".

`EarlySignals.install()` runs first thing in `loki serve` (light: this module
imports only `signal`): a plain handler notes each signal. The daemon looks
at the notes between the steps of its start (`stop_requested`) and undoes
what it did so far, as a stop does; once its watcher is up it takes them over
(`take`), and the handler is back in place after the watcher is gone, so a
signal in the last moments of the exit is noted, not fatal; when `loki serve`
returned in a process that exits next, `settle` ignores them until the end. A start that a
stop signal ended exits 0, as any graceful stop (docs/operations.md).

Only from the interpreter's start until `install` (the import of
`lokid.cli`, ~0.1-0.3 s) does a signal keep its default action; nothing of
the daemon exists yet then (`lokid/__main__.py` turns a Ctrl-C there into
exit 130 without a traceback).
"""

from __future__ import annotations

import signal
from collections.abc import Sequence
from types import FrameType
from typing import Any

# Signals whose default action would end the daemon at once, leaving its agents running
# (docs/operations.md, "Signals and exit codes"). A stop signal starts the graceful stop
# and a second one hurries it; SIGHUP is the terminal of `loki serve` going away (not a
# reload). SIGUSR1/SIGUSR2 mean nothing to lokid: logged, not fatal. SIGABRT (systemd's
# watchdog) and the fault signals keep their default action.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
IGNORED_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)
ALWAYS_HANDLED = frozenset({signal.SIGTERM, signal.SIGINT})
MAX_NOTED = 64
"""Signals noted before the watcher takes over, at most; more are counted, not kept (a
storm of them says nothing more than the first stop signal)."""


def signals_to_handle() -> list[signal.Signals]:
    """The signals lokid handles: SIGTERM and SIGINT always; SIGHUP, SIGQUIT, SIGUSR1 and
    SIGUSR2 unless they were ignored when we started (`nohup` ignores SIGHUP, a
    non-interactive shell's `&` SIGQUIT): an operator's choice we keep.

    Through a handler, not SIG_IGN, which agents would inherit across exec. Decided
    once, before any handler of ours is in place (`EarlySignals.signals`)."""
    return [
        signum
        for signum in (*STOP_SIGNALS, *IGNORED_SIGNALS)
        if signum in ALWAYS_HANDLED or signal.getsignal(signum) != signal.SIG_IGN
    ]


class EarlySignals:
    """The signals that came while `loki serve` started, before its watcher was up."""

    def __init__(self, signals: Sequence[signal.Signals]) -> None:
        self.signals = tuple(signals)
        """What lokid handles in this process (`signals_to_handle()` at install)."""
        self._noted: list[signal.Signals] = []
        self._previous: dict[signal.Signals, Any] = {}  # what `signal.signal` returned
        self.dropped = 0

    @classmethod
    def install(cls) -> EarlySignals:
        """Note every signal lokid handles from now on (main thread only)."""
        early = cls(signals_to_handle())
        for signum in early.signals:
            early._previous[signum] = signal.signal(signum, early._note)
        return early

    def settle(self) -> None:
        """The process exits next (`loki serve` returned): ignore every signal lokid
        handles from now on, so none changes the exit status. A handler of ours is not
        enough: Python's finalization puts the default action back for each signal it
        had a Python handler for, and a SIGTERM in those last milliseconds ended an
        orderly stop with status 143 (SIGINT: 130). SIG_IGN it keeps; no child is
        started after this to inherit it."""
        for signum in self.signals:
            signal.signal(signum, signal.SIG_IGN)
        self._previous.clear()

    def restore(self) -> None:
        """Put back the handlers `install` replaced (`loki serve` returning in-process)."""
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def _note(self, signum: int, frame: FrameType | None) -> None:
        # A signal handler: no lock, no I/O, no allocation beyond the list's own.
        if len(self._noted) < MAX_NOTED:
            self._noted.append(signal.Signals(signum))
        else:
            self.dropped += 1

    def stop_requested(self) -> signal.Signals | None:
        """The first stop signal noted and not taken yet, if any."""
        for signum in self._noted:
            if signum in STOP_SIGNALS:
                return signum
        return None

    def take(self) -> list[signal.Signals]:
        """The signals noted so far, oldest first; they are the caller's now."""
        noted, self._noted = self._noted, []
        return noted
