"""`lokid.startsignals`: what `loki serve` does with a signal before its watcher is up.

End to end (a real `loki serve` signalled at each step of its start): tests/test_e2e_signals.py.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator

import pytest

from lokid.startsignals import MAX_NOTED, EarlySignals


def _until(check: Callable[[], object], what: str) -> None:
    """A signal sent to ourselves is handled at the main thread's next bytecode: at
    once in practice; bounded all the same."""
    deadline = time.monotonic() + 5
    while not check() and time.monotonic() < deadline:
        time.sleep(0.001)
    assert check(), what


@pytest.fixture
def hangup_ignored() -> Iterator[None]:
    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    yield
    signal.signal(signal.SIGHUP, before)


def test_signals_are_noted_handed_over_once_and_the_handlers_restored() -> None:
    before = signal.getsignal(signal.SIGTERM)
    early = EarlySignals.install()
    try:
        assert early.stop_requested() is None
        os.kill(os.getpid(), signal.SIGUSR1)  # not a stop
        _until(lambda: early._noted, "SIGUSR1 noted")
        assert early.stop_requested() is None
        os.kill(os.getpid(), signal.SIGTERM)  # noted, not the default action (our death)
        _until(lambda: early.stop_requested() is not None, "SIGTERM noted")
        assert early.stop_requested() is signal.SIGTERM
        assert early.take() == [signal.SIGUSR1, signal.SIGTERM]
        assert early.take() == [] and early.stop_requested() is None
    finally:
        early.restore()
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_storm_is_counted_not_kept() -> None:
    early = EarlySignals([signal.SIGUSR2])  # not installed: the handler called directly
    for _ in range(MAX_NOTED + 3):
        early._note(signal.SIGUSR2, None)
    assert (len(early.take()), early.dropped) == (MAX_NOTED, 3)


@pytest.mark.usefixtures("hangup_ignored")
def test_a_signal_ignored_at_start_stays_ignored() -> None:
    """`nohup loki serve`: SIGHUP ignored by the operator is neither noted nor handled
    later by the watcher (which takes `early.signals`, decided before our handlers)."""
    early = EarlySignals.install()
    try:
        assert signal.SIGHUP not in early.signals
        assert signal.SIGTERM in early.signals and signal.SIGINT in early.signals
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        early.restore()


EXITING = """
import signal, sys, trio, httpx  # a finalization with modules to tear down
from lokid.startsignals import EarlySignals
early = EarlySignals.install()
print("noting", flush=True)
sys.stdin.readline()  # the test signals us from now on
early.settle()
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_a_settled_process_exits_0_whatever_signals_come_as_python_finalizes(
    signum: signal.Signals,
) -> None:
    """Regression: Python's finalization puts SIG_DFL back for every signal it had a
    Python handler for, so a stop signal in the last milliseconds of an orderly exit
    killed the daemon (status 143 or 130). `settle` ignores them for good. The signal
    is sent without pause until the process is gone, so it lands in that window."""
    import subprocess
    import sys

    child = subprocess.Popen(
        [sys.executable, "-c", EXITING],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline() == b"noting\n"
        child.stdin.write(b"go\n")
        child.stdin.close()
        deadline = time.monotonic() + 20
        while child.poll() is None and time.monotonic() < deadline:
            os.kill(child.pid, signum)
        child.wait(timeout=5)
        err = child.stderr.read() if child.stderr is not None else b""
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 0, err.decode()
