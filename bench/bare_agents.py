"""The floor for `python -m bench sessions`: the same fake agents without a daemon.

    python -m bench.bare_agents spawn COUNT CONCURRENCY STDIN_FILE -- ARGV...
    python -m bench.bare_agents pipe -- ARGV...

`spawn` runs ARGV COUNT times, CONCURRENCY at once, each with STDIN_FILE's
bytes on stdin and stdout/stderr read to the end (`trio.run_process`: spawn,
feed, read, reap - what a session does with its agent, minus everything
else). `pipe` runs ARGV once and reads its stdout through the pipe as fast as
Python can, split into lines, once as bytes and once more with `json.loads`
on every line (a fresh process each time). Both print one JSON line.

`bench/sessions.py` starts this pinned to the daemon's CPU, so these children
run where lokid's agents run (they inherit the affinity).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import trio


async def spawn(argv: list[str], count: int, concurrency: int, stdin: bytes) -> dict[str, Any]:
    latencies: list[float] = []
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < count:
            next_index += 1
            start = time.perf_counter()
            await trio.run_process(
                argv, stdin=stdin, capture_stdout=True, capture_stderr=True, check=True
            )
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)
    return {"seconds": time.perf_counter() - start, "latencies": latencies}


def pipe(argv: list[str], parse: bool) -> dict[str, Any]:
    """Lines read (and parsed) per second, from the first byte to end of file."""
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    assert process.stdout is not None
    fd = process.stdout.fileno()
    lines = 0
    tail = b""
    first = 0.0
    while chunk := os.read(fd, 65536):
        if not first:
            first = time.perf_counter()
        complete = tail + chunk
        end = complete.rfind(b"\n")
        if end < 0:
            tail = complete
            continue
        tail = complete[end + 1 :]
        for line in complete[:end].split(b"\n"):
            if parse:
                json.loads(line)
            lines += 1
    seconds = time.perf_counter() - first
    process.stdout.close()
    process.wait()
    return {"lines": lines, "seconds": seconds, "parse": parse}


def main(argv: list[str]) -> int:
    if "--" not in argv:
        raise SystemExit(__doc__)
    split = argv.index("--")
    options, command = argv[:split], argv[split + 1 :]
    if options[:1] == ["spawn"] and len(options) == 4:
        count, concurrency = int(options[1]), int(options[2])
        stdin = Path(options[3]).read_bytes()
        result = trio.run(spawn, command, count, concurrency, stdin)
    elif options == ["pipe"]:
        result = {"read": pipe(command, parse=False), "parse": pipe(command, parse=True)}
    else:
        raise SystemExit(__doc__)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
