"""`options.sandbox`: run the agent under bubblewrap (`bwrap`).

DESIGN: the project folder writable, the rest of the file system read-only,
a private `/tmp`. This module only builds the command line (`bwrap_argv`, pure
apart from resolving paths) and says whether bubblewrap works here
(`sandbox_problem`); `lokid.agent_host` runs the result like any agent.
`exec_failure` recognises a run where bubblewrap could not start the agent's
command at all (a CLI the sandbox cannot see, such as one under the hidden
`/tmp`), which is permanent, not a failed run worth a retry.

Rules - the flags and why:

* `--ro-bind / /`: the whole host file system, read-only (recursively, every
  mount below `/` too), so the agent's tools, the provider CLI and its
  configuration are all there.
* `--dev /dev`, `--proc /proc`: a fresh minimal `/dev` (null, zero, random,
  tty, pts, shm) and a `/proc` for the sandbox's mount namespace; the
  read-only host ones would break programs that write to `/dev/null`.
* `--tmpfs /tmp`: a private, empty, writable `/tmp`, gone with the sandbox.
* `--bind P P` for each writable path, resolved, deduplicated, in the order
  given, and *after* `--tmpfs /tmp`: bubblewrap applies its options in
  order, so a writable folder under `/tmp` (a test's `tmp_path`) is bound on
  top of the private `/tmp` instead of being hidden by it.
* `--chdir cwd`, then `--` and the agent's argv.
* The network is *not* unshared: agents talk to their model's API.
* No `--new-session`: lokid starts every agent in its own session and
  process group and stops it by signalling the group (`agent_host`); a
  `setsid` inside would take the agent out of that group, so a stop would
  miss it. (The flag guards against TIOCSTI injection into a controlling
  terminal; agents started by lokid have none.)
* No `--unshare-pid`: the sandbox is about files. Without a pid namespace
  the agent's processes keep their host pids, so the group scans and
  (pid, start time) identities of `lokid.process` see exactly what they see
  without a sandbox, and bubblewrap adds no init process of its own.
* No `--die-with-parent` by default: with it, the SIGTERM of a stop kills
  the `bwrap` monitor at once, and its death SIGKILLs the agent before the
  agent could use its grace period. Without it, SIGTERM reaches every
  process of the group, `bwrap` exits and the agent shuts down in its own
  time; after a daemon crash the restarted daemon kills the leftover group
  (`AgentPool` reconciliation), as for an agent without a sandbox. Pass
  `die_with_parent=True` to trade the grace period for dying with lokid.

Anything the agent must write outside the project (a provider's state
folder such as `~/.claude`, a package cache) has to be in `writable`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path

PROBE_TIMEOUT_SECONDS = 10.0
MAX_REASON_CHARS = 300

# bwrap's own line when its execvp of the command fails (then it exits 1).
_EXEC_FAILED = re.compile(r"bwrap: execvp (?P<command>.+): (?P<why>[^:]+)")
_EXEC_ERRORS = {"No such file or directory": "cli_missing", "Permission denied": "permission"}

_probe_lock = threading.Lock()
_probed: dict[str, str | None] = {}


def bwrap_argv(
    argv: Sequence[str],
    *,
    writable: Sequence[Path],
    cwd: Path,
    bwrap: str = "bwrap",
    die_with_parent: bool = False,
) -> tuple[str, ...]:
    """The command line that runs `argv` in `cwd` inside the sandbox."""
    args = [bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]
    seen: set[str] = set()
    for path in writable:
        resolved = os.fspath(Path(path).resolve())
        if resolved not in seen:
            seen.add(resolved)
            args += ["--bind", resolved, resolved]
    if die_with_parent:
        args.append("--die-with-parent")
    args += ["--chdir", os.fspath(Path(cwd).resolve()), "--", *argv]
    return tuple(args)


def exec_failure(exit_code: int, stderr: str) -> tuple[str, str] | None:
    """(code, reason) when bubblewrap could not start the command: exit 1 and stderr
    nothing but its `bwrap: execvp CMD: ERROR` line (the command never ran, so it
    printed nothing). `cli_missing` for a command the sandbox cannot find (a CLI
    under the private `/tmp`, or not on PATH), `permission` for one it cannot run."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    if exit_code != 1 or len(lines) != 1:
        return None
    found = _EXEC_FAILED.fullmatch(lines[0])
    if found is None or found["why"] not in _EXEC_ERRORS:
        return None
    reason = f"the sandbox cannot run {found['command']}: {found['why']}"
    if found["why"] == "No such file or directory":
        reason += " (inside the sandbox /tmp is private: a CLI installed under /tmp is not seen)"
    return _EXEC_ERRORS[found["why"]], reason


def sandbox_problem(bwrap: str | None = None) -> str | None:
    """None when `bwrap` is on PATH and runs `true` in a sandbox; else why not, in one line.

    The probe runs once per resolved `bwrap` path and its answer is cached for
    the life of the process (a blocking call of a few milliseconds, the first
    time).
    """
    name = bwrap or "bwrap"
    found = shutil.which(name)
    if found is None:
        return (
            f"bubblewrap (`{name}`) is not on the daemon's PATH "
            "(install the bubblewrap package, or run without sandbox)"
        )
    with _probe_lock:
        if found not in _probed:
            _probed[found] = _probe(found)
        return _probed[found]


def _probe(bwrap: str) -> str | None:
    argv = bwrap_argv(["true"], writable=[], cwd=Path("/"), bwrap=bwrap)
    try:
        done = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=PROBE_TIMEOUT_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return f"{bwrap} did not finish a test sandbox within {PROBE_TIMEOUT_SECONDS:g} s"
    except OSError as exc:
        return f"cannot run {bwrap}: {exc.strerror or exc}"
    if done.returncode == 0:
        return None
    lines = [line.strip() for line in done.stderr.decode("utf-8", "replace").splitlines()]
    why = next((line for line in reversed(lines) if line), f"exit status {done.returncode}")
    return f"{bwrap} cannot create a sandbox here: {why}"[:MAX_REASON_CHARS]
