"""Where agent processes run: the narrow seam of DESIGN.md §10, and the local implementation.

A session talks to an agent run through four things only - start it, read
its output lines, stop it, learn how it exited - so that running agents
elsewhere (the planned Temporal workers) is a new `AgentHost`, not a new
session actor.

Rules of the local implementation:

* Every agent is started in **its own session and process group**
  (`start_new_session=True`, so pgid == pid); whatever it forks stays in
  that group unless it calls setsid itself.
* Its identity is **(pid, start time)**, read right after spawn; the caller
  records it in the store before waiting on the run (a restarted daemon
  kills what a crashed one left, and never a reused pid).
* **Held start** (`start(spec, held=True)`, what the agent pool does): the
  process is spawned as `/bin/sh -c 'read … || exit; exec "$@"' <argv>`,
  which waits for one line on its stdin before it execs the agent. The
  caller records the identity (the same pid and start time before and after
  the exec), then calls `release()`. A daemon killed between spawn and
  release leaves a shell that sees end-of-file and exits without ever running
  the agent, instead of an agent nobody knows about; with a `held_dir` it
  first creates `<held_dir>/<its pid>.<its start ticks>`, so that the next start knows this
  agent never ran (what its prompt carried was not delivered; `still_held`
  tells the same of a shell not yet gone). The executable is looked up
  before the spawn, so a missing one still fails `start`; the timeouts
  count from the release.
* **Signals only go to a group whose leader we have not reaped.** The
  leader's exit is detected through a pidfd without reaping it, so its pid -
  the group id - cannot be reused while we may still signal the group. The
  leader is reaped only once the group is empty.
* **Stop** = SIGTERM to the group, up to `grace` seconds for the group to
  empty, SIGKILL to the group, then a bounded wait until no member is left;
  survivors (only possible in uninterruptible sleep) are reported, not
  ignored. A later stop with a shorter grace shortens the one in progress
  (a hurried daemon stop: `stop(0)` sends the SIGKILL at once).
* Output: stdout and stderr lines, in arrival order per stream, in batches
  (the complete lines of one pipe read) through a bounded channel
  (`OUTPUT_BUFFER_BATCHES` batches of at most one 64 KiB read each): a slow
  consumer makes the agent block on its pipe, nothing is dropped. A line
  longer than `MAX_LINE_BYTES` is cut there and flagged `truncated`; the
  rest of it, up to its newline, is read and discarded (never buffered), so
  an endless line costs at most `MAX_LINE_BYTES` + one read of memory and
  comes out as one truncated line, not as a stream of fragments.
  Batches, not lines, cross the channel: one task switch per read instead
  of two per line (`batches()`; `lines()` flattens them).
* Timeouts: `idle_timeout` (no output) and `hard_timeout` (total) stop the
  run with that reason. Output counts when it is written, not when it is
  read: an idle deadline that passes while output waits unread in a pipe
  (the daemon was frozen or starved, or a slow consumer holds the reader
  back) is pushed back instead of ending the run.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import math
import os
import select
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import attrs
import trio

from lokid.crashpoints import crash_point
from lokid.process import ProcessIdentity, group_scanner, start_ticks

MAX_LINE_BYTES = 1024 * 1024
OUTPUT_BUFFER_BATCHES = 16
READ_BYTES = 65536
GROUP_POLL_SECONDS = 0.02
KILL_WAIT_SECONDS = 5.0  # after SIGKILL, how long members may take to disappear
# A held start: wait for one line on stdin (the release), then become the agent; EOF
# first (the daemon died before it released the agent) and the agent never runs, and
# says so in `<held dir>/<pid>.<start ticks>` (its first argument; empty: nowhere) for
# the next start. The start time (field 22 of /proc/$$/stat; the command name is `sh`,
# no spaces) tells this launcher from a later process given the same pid.
HOLD_SCRIPT = (
    'm=$1; shift; IFS= read -r _ || { [ -z "$m" ] || { set -f; read -r s </proc/$$/stat'
    ' && set -- $s && : >"$m/$$.${22}"; } 2>/dev/null; exit 125; }; exec "$@"'
)
HOLD_ARGV = ("/bin/sh", "-c", HOLD_SCRIPT, "lokid-agent")
"""Followed by the held dir (or ``""``) and the agent's argv."""


def still_held(pid: int) -> bool:
    """Whether process `pid` is a held start that was never released: still the
    launcher shell of `HOLD_ARGV`, not yet the agent it execs (`/proc/<pid>/cmdline`)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            words = file.read().split(b"\0")
    except OSError:
        return False
    return tuple(word.decode(errors="replace") for word in words[:4]) == HOLD_ARGV


class Stream(enum.Enum):
    STDOUT = "stdout"
    STDERR = "stderr"


@attrs.frozen
class OutputLine:
    stream: Stream
    data: bytes  # without the line ending
    truncated: bool = False


class EndReason(enum.Enum):
    EXITED = "exited"
    STOPPED = "stopped"
    IDLE_TIMEOUT = "idle-timeout"
    HARD_TIMEOUT = "hard-timeout"


@attrs.frozen
class RunResult:
    exit_code: int  # negative: killed by that signal
    reason: EndReason
    survivors: tuple[int, ...] = ()  # pids still in the group after SIGKILL (should be none)
    escalated: bool = False  # SIGKILL was needed


@attrs.frozen
class AgentSpec:
    argv: tuple[str, ...]
    cwd: Path
    env: Mapping[str, str] = attrs.field(factory=dict)
    stdin: bytes | None = None
    idle_timeout: float = math.inf
    hard_timeout: float = math.inf
    stop_grace: float = 5.0  # SIGTERM -> SIGKILL after a timeout, or for leftovers of an exit


class AgentRun(Protocol):
    """One running agent, as the session sees it."""

    identity: ProcessIdentity

    def lines(self) -> AsyncIterator[OutputLine]: ...

    def batches(self) -> AsyncIterator[list[OutputLine]]: ...

    async def stop(self, grace: float) -> RunResult:
        """SIGTERM, `grace`, SIGKILL; a shorter grace brings a pending SIGKILL forward."""
        ...

    async def wait(self) -> RunResult: ...


class AgentHost(Protocol):
    async def start(self, spec: AgentSpec, *, held: bool = False) -> AgentRun: ...


class LocalAgentHost:
    """Agents as trio subprocesses on this machine. Construct runs inside a nursery."""

    def __init__(self, nursery: trio.Nursery, *, held_dir: Path | None = None) -> None:
        self._nursery = nursery
        self.held_dir = held_dir
        """Where a held start whose daemon died before releasing it writes
        `<pid>.<start ticks>`."""

    async def start(self, spec: AgentSpec, *, held: bool = False) -> LocalAgentRun:
        """Spawn the agent; `held`: it waits for `release()` before it runs (module rules)."""
        run = LocalAgentRun(spec, held=held, held_dir=self.held_dir)
        await self._nursery.start(run._run)
        return run


class LocalAgentRun:
    def __init__(
        self, spec: AgentSpec, *, held: bool = False, held_dir: Path | None = None
    ) -> None:
        self.spec = spec
        self.held = held
        self.held_dir = held_dir
        self.identity = ProcessIdentity(0, 0)
        self._released = trio.Event()
        if not held:
            self._released.set()
        self._send, self._receive = trio.open_memory_channel[list[OutputLine]](
            OUTPUT_BUFFER_BATCHES
        )
        self._done = trio.Event()
        self._result: RunResult | None = None
        self._stop_requested: tuple[float, EndReason] | None = None
        self._leader_wait: trio.CancelScope | None = None  # cancelled by a stop request
        self._timing_from: float | None = None  # when the timeouts began to count (release)
        self._readers_left = 0
        self._readers_done = trio.Event()
        self._grace_scope: trio.CancelScope | None = None  # between SIGTERM and SIGKILL
        self._last_output = 0.0
        self._pipe_fds: set[int] = set()  # the output pipes still open, for `_output_waiting`
        self._escalated = False
        self._group_empty = False  # the last look at the agent's group found no live member

    # -- what the session uses ----------------------------------------------------

    async def lines(self) -> AsyncIterator[OutputLine]:
        async for batch in self.batches():
            for line in batch:
                yield line

    async def batches(self) -> AsyncIterator[list[OutputLine]]:
        async with self._receive.clone() as receive:
            async for batch in receive:
                yield batch

    def release(self) -> None:
        """Let a held agent run (it has been recorded); a no-op for one not held."""
        if not self._released.is_set():
            self._released.set()
            self._start_timing()

    def _start_timing(self) -> None:
        self._timing_from = self._last_output = trio.current_time()
        if self._leader_wait is not None:
            self._leader_wait.deadline = self._timeout_deadline()

    def _timeout_deadline(self) -> float:
        """When the next timeout may be due (the idle one moves with output: look again)."""
        if self._timing_from is None:
            return math.inf
        spec = self.spec
        return min(self._timing_from + spec.hard_timeout, self._last_output + spec.idle_timeout)

    def _check_timeouts(self) -> None:
        """Ask for the stop of a timeout that is due."""
        if self._timing_from is None:
            return
        spec, now = self.spec, trio.current_time()
        if now >= self._timing_from + spec.hard_timeout:
            self._request_stop(spec.stop_grace, EndReason.HARD_TIMEOUT)
        elif now >= self._last_output + spec.idle_timeout:
            if self._output_waiting():
                self._last_output = now  # written, not read yet: the agent is not idle
            else:
                self._request_stop(spec.stop_grace, EndReason.IDLE_TIMEOUT)

    async def stop(self, grace: float) -> RunResult:
        self.request_stop(grace)
        return await self.wait()

    def request_stop(self, grace: float) -> None:
        """`stop` without waiting for the end (the agent pool hurrying every agent at once)."""
        self._request_stop(grace, EndReason.STOPPED)

    async def wait(self) -> RunResult:
        await self._done.wait()
        assert self._result is not None
        return self._result

    @property
    def result(self) -> RunResult | None:
        return self._result

    # -- the supervising task -----------------------------------------------------

    def _request_stop(self, grace: float, reason: EndReason) -> None:
        """Ask for a stop; one already asked for keeps its reason and takes the shorter grace."""
        if self._stop_requested is None:
            self._stop_requested = (grace, reason)
            if self._leader_wait is not None:
                self._leader_wait.cancel()
        elif grace < self._stop_requested[0]:
            self._stop_requested = (grace, self._stop_requested[1])
        if self._grace_scope is not None:  # SIGTERM sent already: bring the SIGKILL forward
            deadline = trio.current_time() + grace
            self._grace_scope.deadline = min(self._grace_scope.deadline, deadline)

    async def _run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        spec = self.spec
        env = {**os.environ, **spec.env} if spec.env else None
        argv = list(spec.argv)
        if self.held:
            _check_executable(argv[0], (env or os.environ).get("PATH"), spec.cwd)
            argv = [*HOLD_ARGV, os.fspath(self.held_dir or ""), *argv]
        process = await trio.lowlevel.open_process(
            argv,
            cwd=os.fspath(spec.cwd),
            env=env,
            stdin=subprocess.PIPE if spec.stdin is not None or self.held else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        pid = process.pid
        # The child is not reaped before we say so: its /proc entry is there.
        self.identity = ProcessIdentity(pid, start_ticks(pid) or 0)
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:  # out of file descriptors: a child nobody would supervise
            await _discard(process)
            raise
        self._last_output = trio.current_time()
        if not self.held:
            self._start_timing()
        reason = EndReason.EXITED
        try:
            task_status.started(self)
            async with trio.open_nursery() as nursery:
                if process.stdin is not None:  # the release line first, if held
                    opening = b"\n" if self.held else b""
                    data = opening + (spec.stdin or b"")
                    nursery.start_soon(self._feed_when_released, process.stdin, data)
                pipes = [(Stream.STDOUT, process.stdout), (Stream.STDERR, process.stderr)]
                for stream, pipe in pipes:
                    if pipe is not None:
                        self._readers_left += 1
                        nursery.start_soon(self._read_lines, stream, pipe)
                if not self._readers_left:
                    self._readers_done.set()
                # Wait for the leader to exit (without reaping), a stop request (which
                # cancels the wait) or a timeout (its deadline): one task, no race.
                while self._stop_requested is None:
                    with trio.CancelScope(deadline=self._timeout_deadline()) as wait:
                        self._leader_wait = wait
                        await trio.lowlevel.wait_readable(pidfd)
                    self._leader_wait = None
                    if not wait.cancelled_caught:
                        break  # the leader exited
                    if self._stop_requested is None:
                        self._check_timeouts()
                if self._stop_requested is not None:
                    grace, reason = self._stop_requested
                    await self._terminate_group(pid, grace)
                else:
                    # The leader is gone; helpers it left in the group go too.
                    await self._terminate_group(pid, spec.stop_grace, quiet_if_empty=True)
                with trio.move_on_after(KILL_WAIT_SECONDS):
                    await self._readers_done.wait()
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                survivors: tuple[int, ...] = ()
                if not self._group_empty:  # else nothing is left to find: no second pass
                    members = await group_scanner().members(pid)
                    survivors = tuple(p for p, state in members if p != pid and state != "Z")
                exit_code = await process.wait()  # reap only now: the group is empty
                os.close(pidfd)
                self._send.close()
                self._result = RunResult(exit_code, reason, survivors, self._escalated)
                self._done.set()

    async def _terminate_group(
        self, pgid: int, grace: float, *, quiet_if_empty: bool = False
    ) -> None:
        """TERM the group, wait `grace` for it to empty, KILL, wait until it is empty."""
        if quiet_if_empty and not await self._live_members(pgid):
            return
        if self._stop_requested is not None:  # asked (again) while we looked
            grace = min(grace, self._stop_requested[0])
        _signal_group(pgid, signal.SIGTERM)
        # Polling /proc: the kernel offers no event for "this group is now empty".
        with trio.move_on_after(grace) as self._grace_scope:
            while await self._live_members(pgid):  # noqa: ASYNC110
                await trio.sleep(GROUP_POLL_SECONDS)
        self._grace_scope = None
        if await self._live_members(pgid):
            self._escalated = True
            _signal_group(pgid, signal.SIGKILL)
            with trio.move_on_after(KILL_WAIT_SECONDS):
                while await self._live_members(pgid):  # noqa: ASYNC110
                    await trio.sleep(GROUP_POLL_SECONDS)

    async def _live_members(self, pgid: int) -> list[int]:
        """Live members of the agent's group (`_live_members`); remembers whether any."""
        live = await _live_members(pgid)
        self._group_empty = not live
        return live

    async def _read_lines(self, stream: Stream, pipe: trio.abc.ReceiveStream) -> None:
        buffer = bytearray()
        skipping = False  # inside the rest of a line already cut at MAX_LINE_BYTES
        fd = pipe.fileno() if isinstance(pipe, trio.lowlevel.FdStream) else -1
        async with pipe:
            self._pipe_fds.add(fd)
            try:
                while True:
                    try:
                        chunk = await pipe.receive_some(READ_BYTES)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        chunk = b""
                    if not chunk:
                        break
                    self._last_output = trio.current_time()
                    if skipping:
                        newline = chunk.find(b"\n")
                        if newline < 0:
                            continue
                        skipping = False
                        chunk = chunk[newline + 1 :]
                    buffer += chunk
                    batch: list[OutputLine] = []
                    start = 0
                    while (end := buffer.find(b"\n", start)) >= 0:
                        batch.append(_line(stream, bytes(buffer[start:end]).removesuffix(b"\r")))
                        start = end + 1
                    del buffer[:start]
                    if len(buffer) > MAX_LINE_BYTES:
                        batch.append(OutputLine(stream, bytes(buffer[:MAX_LINE_BYTES]), True))
                        buffer.clear()
                        skipping = True
                    if batch:
                        await self._emit(batch)
            finally:
                self._pipe_fds.discard(fd)  # before the close: the number may be reused
        if buffer:
            await self._emit([_line(stream, bytes(buffer))])
        self._readers_left -= 1
        if not self._readers_left:
            self._readers_done.set()

    async def _emit(self, batch: list[OutputLine]) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self._send.send(batch)

    async def _feed_when_released(self, stdin: trio.abc.SendStream, data: bytes) -> None:
        await self._released.wait()
        await _feed(stdin, data)
        crash_point("agent.released")  # the agent runs now, whatever becomes of us

    def _output_waiting(self) -> bool:
        """Whether an output pipe holds bytes not read yet (a zero-time poll).

        After the daemon was frozen (SIGSTOP) or starved, this task may run
        before the readers, although the agent kept printing; and a reader
        held back by a slow consumer leaves the output in its pipe.
        """
        poller = select.poll()
        for fd in self._pipe_fds:
            if fd >= 0:
                poller.register(fd, select.POLLIN)
        return any(events & select.POLLIN for _, events in poller.poll(0))


async def _discard(process: trio.Process) -> None:
    """Kill the group of a child that cannot be supervised, close its pipes, reap it.

    Only right after the spawn: nothing of the run was reported yet (a held
    start never let the agent run), so there is nothing to stop gently.
    """
    _signal_group(process.pid, signal.SIGKILL)  # the leader is not reaped yet
    with trio.CancelScope(shield=True):
        for pipe in (process.stdin, process.stdout, process.stderr):
            if pipe is not None:
                await pipe.aclose()
        with trio.move_on_after(KILL_WAIT_SECONDS):
            await process.wait()


def _line(stream: Stream, data: bytes) -> OutputLine:
    if len(data) > MAX_LINE_BYTES:
        return OutputLine(stream, data[:MAX_LINE_BYTES], True)
    return OutputLine(stream, data)


async def _live_members(pgid: int) -> list[int]:
    """Members other than zombies (the unreaped leader is one), from a shared /proc pass."""
    return [pid for pid, state in await group_scanner().members(pgid) if state != "Z"]


def _signal_group(pgid: int, signum: int) -> None:
    # Safe: the caller holds the unreaped leader, so `pgid` is still our group.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signum)


def _check_executable(program: str, path: str | None, cwd: Path) -> None:
    """Raise what spawning `program` directly would (FileNotFoundError) if it cannot be
    found: a held start spawns the shell, which would only fail at the release. A name
    with a slash is taken as it is, relative to the agent's `cwd`; a bare one is looked
    up on `path`."""
    if os.sep in program:
        found = shutil.which(os.path.join(cwd, program), path="") is not None
    else:
        found = shutil.which(program, path=path) is not None
    if not found:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), program)


async def _feed(stdin: trio.abc.SendStream, data: bytes) -> None:
    async with stdin:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stdin.send_all(data)
