"""GroupScanner: one /proc pass answers every caller waiting for it."""

from __future__ import annotations

import os
import signal
import subprocess

import trio

from lokid.process import GroupScanner


def sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen(["sleep", "30"], start_new_session=True)


async def test_concurrent_callers_share_passes_and_get_their_own_groups() -> None:
    processes = [sleeper() for _ in range(20)]
    try:
        scanner = GroupScanner()
        answers: dict[int, list[tuple[int, str]]] = {}

        async def ask(pgid: int) -> None:
            answers[pgid] = await scanner.members(pgid)

        async with trio.open_nursery() as nursery:
            for process in processes:
                nursery.start_soon(ask, process.pid)
        assert scanner.passes < len(processes)
        for process in processes:
            assert [pid for pid, _ in answers[process.pid]] == [process.pid]
            # (states are not compared with a second read: a sleeper may be running in one)
            assert [state for _, state in answers[process.pid]] != ["Z"]
    finally:
        for process in processes:
            process.kill()
            process.wait()


async def test_a_caller_never_gets_an_answer_older_than_its_question() -> None:
    process = sleeper()
    scanner = GroupScanner()
    try:
        assert [pid for pid, _ in await scanner.members(process.pid)] == [process.pid]
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        assert await scanner.members(process.pid) == []  # a new pass, not the last answer
        assert scanner.passes == 2
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
