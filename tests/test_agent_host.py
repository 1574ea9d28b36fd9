"""LocalAgentHost with real processes: groups, stop escalation, output, timeouts."""

from __future__ import annotations

import errno
import math
import os
import pathlib
import subprocess
import sys
import textwrap
import time

import pytest
import trio

from lokid.agent_host import (
    HOLD_ARGV,
    AgentSpec,
    EndReason,
    LocalAgentHost,
    OutputLine,
    Stream,
    still_held,
)
from lokid.process import (
    group_members,
    group_scanner,
    is_same_process,
    scan_groups,
    start_ticks,
)

from .proc_kit import running

PY = sys.executable

# A process that ignores SIGTERM and leaves a grandchild (same group) that ignores it too.
STUBBORN = textwrap.dedent(
    """
    import os, signal, sys, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if os.fork() == 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(300)
        os._exit(0)
    print("ready", flush=True)
    time.sleep(300)
    """
)


def live(pgid: int) -> list[int]:
    return [pid for pid, state in group_members(pgid) if state != "Z"]


async def run_host(spec: AgentSpec) -> tuple[list[OutputLine], object]:
    lines: list[OutputLine] = []
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            run = await LocalAgentHost(nursery).start(spec)
            async for line in run.lines():
                lines.append(line)
            result = await run.wait()
    return lines, result


async def test_output_lines_exit_code_and_stdin(tmp_path: pathlib.Path) -> None:
    script = (
        "import sys; data = sys.stdin.read(); print('got', data);"
        "print('oops', file=sys.stderr); sys.exit(3)"
    )
    spec = AgentSpec((PY, "-c", script), tmp_path, stdin=b"hello")
    lines, result = await run_host(spec)
    assert OutputLine(Stream.STDOUT, b"got hello") in lines
    assert OutputLine(Stream.STDERR, b"oops") in lines
    assert result.exit_code == 3  # type: ignore[attr-defined]
    assert result.reason is EndReason.EXITED  # type: ignore[attr-defined]


async def test_long_lines_are_cut_and_flagged(tmp_path: pathlib.Path) -> None:
    script = "import sys; sys.stdout.write('x' * (2 * 1024 * 1024) + '\\nshort\\n')"
    lines, _ = await run_host(AgentSpec((PY, "-c", script), tmp_path))
    stdout = [line for line in lines if line.stream is Stream.STDOUT]
    assert stdout[0].truncated and len(stdout[0].data) == 1024 * 1024
    assert stdout[-1] == OutputLine(Stream.STDOUT, b"short")


async def test_agent_runs_in_its_own_group_with_a_verified_identity(tmp_path: pathlib.Path) -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            run = await LocalAgentHost(nursery).start(AgentSpec(("sleep", "30"), tmp_path))
            assert os.getpgid(run.identity.pid) == run.identity.pid
            assert os.getpgid(run.identity.pid) != os.getpgid(0)
            assert is_same_process(run.identity)
            result = await run.stop(grace=2)
    assert result.reason is EndReason.STOPPED
    assert result.exit_code == -15  # SIGTERM was enough
    assert not result.escalated
    assert live(run.identity.pid) == []


async def test_stop_escalates_to_kill_and_leaves_no_process(tmp_path: pathlib.Path) -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            run = await LocalAgentHost(nursery).start(AgentSpec((PY, "-c", STUBBORN), tmp_path))
            async for line in run.lines():
                assert line.data == b"ready"
                break
            pgid = run.identity.pid
            assert len(live(pgid)) == 2  # the agent and its grandchild
            started = trio.current_time()
            result = await run.stop(grace=0.5)
            assert trio.current_time() - started >= 0.5
    assert result.escalated
    assert result.exit_code == -9
    assert result.survivors == ()
    assert live(pgid) == []


async def test_leftovers_of_an_agent_that_exited_are_stopped(tmp_path: pathlib.Path) -> None:
    script = "import os, time\nif os.fork() == 0:\n    time.sleep(300)\nprint('bye')"
    spec = AgentSpec((PY, "-c", script), tmp_path, stop_grace=1)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            run = await LocalAgentHost(nursery).start(spec)
            result = await run.wait()
    assert result.reason is EndReason.EXITED
    assert result.exit_code == 0
    assert live(run.identity.pid) == []


async def test_an_agent_that_exits_alone_costs_one_group_pass(tmp_path: pathlib.Path) -> None:
    # The look that finds its group empty is the last: no second /proc pass for survivors.
    spec = AgentSpec(("/bin/sh", "-c", "echo hi"), tmp_path)
    scanner = group_scanner()
    before = scanner.passes
    _lines, result = await run_host(spec)
    assert result.exit_code == 0 and result.survivors == ()  # type: ignore[attr-defined]
    assert scanner.passes == before + 1


def test_scan_groups_finds_the_members_of_a_group_and_their_states() -> None:
    child = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        found = scan_groups({child.pid, os.getpgrp()})
        [(pid, state)] = found[child.pid]
        # D too: a process still paging in its executable from a busy disk (seen in CI).
        assert pid == child.pid and state in ("R", "S", "D")
        assert (os.getpid(), "R") in found[os.getpgrp()]
        assert scan_groups(set()) == {}
    finally:
        child.kill()
        child.wait()


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        ({"idle_timeout": 0.5}, EndReason.IDLE_TIMEOUT),
        ({"hard_timeout": 0.5}, EndReason.HARD_TIMEOUT),
    ],
)
async def test_timeouts_stop_the_run(
    tmp_path: pathlib.Path, options: dict[str, float], reason: EndReason
) -> None:
    # Prints every 0.2 s: never idle for 0.5 s, but runs longer than 0.5 s.
    script = "import time\nwhile True:\n    print('tick', flush=True); time.sleep(0.2)"
    if reason is EndReason.IDLE_TIMEOUT:
        script = "import time; time.sleep(300)"
    spec = AgentSpec(
        (PY, "-c", script),
        tmp_path,
        stop_grace=1,
        idle_timeout=options.get("idle_timeout", math.inf),
        hard_timeout=options.get("hard_timeout", math.inf),
    )
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            run = await LocalAgentHost(nursery).start(spec)
            result = await run.wait()
    assert result.reason is reason
    assert live(run.identity.pid) == []


TICKER = "import time\nfor i in range({n}):\n    print('tick', i, flush=True); time.sleep({every})"


async def test_output_waiting_in_the_pipe_is_not_idleness(tmp_path: pathlib.Path) -> None:
    """A consumer that stops reading for longer than the idle timeout while the agent
    keeps printing: the reader waits, the output waits in the pipe. The idle deadline
    was checked against what had been read and killed a busy agent ("idle-timeout")."""
    spec = AgentSpec((PY, "-c", TICKER.format(n=60, every=0.05)), tmp_path, idle_timeout=1.0)
    lines: list[OutputLine] = []
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            run = await LocalAgentHost(nursery).start(spec)
            await trio.sleep(2.5)  # the reader is held back from ~0.9 s on
            async for line in run.lines():
                lines.append(line)
            result = await run.wait()
    assert result.reason is EndReason.EXITED
    assert len(lines) == 60


async def test_a_frozen_daemon_does_not_kill_an_agent_that_kept_printing(
    tmp_path: pathlib.Path,
) -> None:
    """The daemon frozen (SIGSTOP) longer than the idle timeout: once it runs again,
    the output that piled up in the pipe counts, whichever task trio runs first."""
    spec = AgentSpec((PY, "-c", TICKER.format(n=40, every=0.1)), tmp_path, idle_timeout=1.0)
    lines: list[OutputLine] = []

    async def freeze() -> None:
        await trio.sleep(0.5)
        time.sleep(2.0)  # noqa: ASYNC251 - the point: nothing in the daemon runs

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            run = await LocalAgentHost(nursery).start(spec)
            nursery.start_soon(freeze)
            async for line in run.lines():
                lines.append(line)
            result = await run.wait()
    assert result.reason is EndReason.EXITED
    assert len(lines) == 40


async def test_out_of_descriptors_after_the_spawn_leaves_no_process(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EMFILE at the pidfd taken after the spawn: `start` fails (a spawn error the
    session retries), and the child it could not supervise was left running."""
    spawned: list[int] = []

    def out_of_descriptors(pid: int, flags: int = 0) -> int:
        spawned.append(pid)
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(os, "pidfd_open", out_of_descriptors)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            with pytest.raises(OSError, match="Too many open files"):
                spec = AgentSpec((PY, "-c", "import time; time.sleep(300)"), tmp_path)
                await LocalAgentHost(nursery).start(spec)
    [pid] = spawned
    assert live(pid) == []
    assert not pathlib.Path(f"/proc/{pid}").exists()  # noqa: ASYNC240 - reaped, not a zombie


async def test_missing_executable_fails_at_start(tmp_path: pathlib.Path) -> None:
    async with trio.open_nursery() as nursery:
        with pytest.raises(FileNotFoundError):
            await LocalAgentHost(nursery).start(AgentSpec(("/nonexistent/agent",), tmp_path))


# -- held starts: the agent runs only once the caller has recorded it ----------------------


async def test_a_held_agent_runs_only_after_release_as_the_same_process(
    tmp_path: pathlib.Path,
) -> None:
    marker = tmp_path / "ran"
    code = (
        f"import os, sys; open({str(marker)!r}, 'w').write(str(os.getpid())); "
        "print(sys.stdin.read())"
    )
    spec = AgentSpec((PY, "-c", code), tmp_path, stdin=b"the prompt")
    lines: list[OutputLine] = []
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            run = await LocalAgentHost(nursery).start(spec, held=True)
            await trio.sleep(0.3)  # real time: a process that ran would have written by now
            assert not marker.exists()
            assert is_same_process(run.identity)
            run.release()
            async for line in run.lines():
                lines.append(line)
            result = await run.wait()
    assert result.exit_code == 0
    assert int(marker.read_text()) == run.identity.pid  # the recorded identity is the agent
    assert [line.data for line in lines] == [b"the prompt"]  # the prompt follows the release


async def test_a_held_agents_timeouts_count_from_the_release(tmp_path: pathlib.Path) -> None:
    spec = AgentSpec(("/bin/sh", "-c", "sleep 0.2; echo done"), tmp_path, hard_timeout=0.6)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            run = await LocalAgentHost(nursery).start(spec, held=True)
            await trio.sleep(0.8)  # longer than the hard timeout: held time does not count
            run.release()
            result = await run.wait()
    assert (result.reason, result.exit_code) == (EndReason.EXITED, 0)

    spec = AgentSpec(("/bin/sh", "-c", "sleep 5"), tmp_path, hard_timeout=0.4, stop_grace=1)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            run = await LocalAgentHost(nursery).start(spec, held=True)
            await trio.sleep(0.2)
            released = trio.current_time()
            run.release()
            result = await run.wait()
    assert result.reason is EndReason.HARD_TIMEOUT
    assert trio.current_time() - released >= 0.4


@pytest.mark.parametrize("with_held_dir", [True, False])
def test_a_held_agent_whose_daemon_died_never_runs(
    tmp_path: pathlib.Path, with_held_dir: bool
) -> None:
    """The launcher alone: end-of-file instead of the release line (the daemon is gone).
    It says so in `<held dir>/<its pid>.<its start ticks>`, for the next start; a released
    one does not."""
    marker = tmp_path / "ran"
    held_dir = tmp_path / "held"
    held_dir.mkdir()
    argv = [*HOLD_ARGV, str(held_dir) if with_held_dir else "", "touch", str(marker)]
    died = subprocess.Popen(argv, stdin=subprocess.PIPE)
    assert running(died.pid, argv)  # held: waiting for its release
    ticks = start_ticks(died.pid)
    assert died.stdin is not None
    died.stdin.close()  # the daemon is gone: end-of-file
    assert died.wait(timeout=10) == 125 and not marker.exists()
    names = os.listdir(held_dir)
    if with_held_dir:  # `<pid>.<start ticks>`: the launcher, not a later holder of its pid
        assert names == [f"{died.pid}.{ticks}"]
        (held_dir / names[0]).unlink()
    else:
        assert names == []
    released = subprocess.run(argv, input=b"\n", timeout=10, check=False)
    assert released.returncode == 0 and marker.exists()
    assert os.listdir(held_dir) == []


def test_still_held_tells_the_launcher_from_the_agent(tmp_path: pathlib.Path) -> None:
    launcher = subprocess.Popen(
        [*HOLD_ARGV, "", "sleep", "30"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL
    )
    try:
        assert running(launcher.pid, [*HOLD_ARGV, "", "sleep", "30"])
        assert still_held(launcher.pid)
        assert launcher.stdin is not None
        launcher.stdin.write(b"\n")
        launcher.stdin.flush()
        assert running(launcher.pid, ["sleep", "30"])
        assert not still_held(launcher.pid)  # exec'd: `sleep 30` now
        assert launcher.poll() is None
    finally:
        launcher.kill()
        launcher.wait()
    assert not still_held(launcher.pid)  # reaped: no such process


async def test_a_held_start_of_a_missing_executable_fails_at_start(
    tmp_path: pathlib.Path,
) -> None:
    async with trio.open_nursery() as nursery:
        with pytest.raises(FileNotFoundError):
            await LocalAgentHost(nursery).start(
                AgentSpec(("/nonexistent/agent",), tmp_path), held=True
            )
        with pytest.raises(FileNotFoundError):
            await LocalAgentHost(nursery).start(
                AgentSpec(("no-such-agent-for-lokid",), tmp_path), held=True
            )
        with pytest.raises(FileNotFoundError):
            await LocalAgentHost(nursery).start(AgentSpec(("./agent.sh",), tmp_path), held=True)
    # A relative name is the agent's folder's, as it would be for a direct spawn.
    script = tmp_path / "agent.sh"
    script.write_text("#!/bin/sh\necho from the project\n")
    script.chmod(0o755)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            run = await LocalAgentHost(nursery).start(
                AgentSpec(("./agent.sh",), tmp_path), held=True
            )
            run.release()
            lines = [line.data async for line in run.lines()]
            assert (await run.wait()).exit_code == 0
    assert lines == [b"from the project"]


async def test_a_held_agent_stopped_before_release_never_runs(tmp_path: pathlib.Path) -> None:
    marker = tmp_path / "ran"
    spec = AgentSpec(("touch", str(marker)), tmp_path)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            run = await LocalAgentHost(nursery).start(spec, held=True)
            result = await run.stop(1.0)  # e.g. its row could not be recorded
    assert result.reason is EndReason.STOPPED and not marker.exists()
    assert live(run.identity.pid) == []
