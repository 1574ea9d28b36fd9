"""bubblewrap argv (pure) and, where bwrap works, real sandboxes: files, /tmp, group stop."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from lokid import sandbox
from lokid.agent_host import AgentSpec, EndReason, LocalAgentHost
from lokid.process import group_members
from lokid.sandbox import bwrap_argv, sandbox_problem

# Inside the sandbox /tmp is a private tmpfs: an interpreter living under /tmp (a
# checkout's venv in CI) would vanish there. The sandboxed side uses the system's.
PY = next(
    (p for p in ("/usr/bin/python3", "/usr/local/bin/python3") if os.path.exists(p)),
    sys.executable,
)


@pytest.fixture
def bwrap_ok() -> None:
    problem = sandbox_problem()
    if problem is not None:
        pytest.skip(problem)


@pytest.fixture
def unbound_dir() -> Iterator[Path]:
    """A writable host folder outside /tmp (inside, /tmp is a private tmpfs) and not bound."""
    base = next((d for d in ("/var/tmp", str(Path.home())) if os.access(d, os.W_OK)), None)
    if base is None:
        pytest.skip("no writable folder outside /tmp")
    path = Path(tempfile.mkdtemp(prefix="lokid-sandbox-test-", dir=base))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def live(pgid: int) -> list[int]:
    return [pid for pid, state in group_members(pgid) if state != "Z"]


# -- argv -----------------------------------------------------------------------------


def test_argv_shape(tmp_path: Path) -> None:
    project = (tmp_path / "project").resolve()
    project.mkdir()
    (tmp_path / "link").symlink_to(project)
    cache = tmp_path / "cache"
    argv = bwrap_argv(
        ["claude", "-p", "do it"],
        writable=[project, tmp_path / "link", cache, project],
        cwd=tmp_path / "link",
    )
    assert argv == (
        "bwrap",
        *("--ro-bind", "/", "/"),
        *("--dev", "/dev"),
        *("--proc", "/proc"),
        *("--tmpfs", "/tmp"),
        *("--bind", str(project), str(project)),  # resolved, once
        *("--bind", str(cache.resolve()), str(cache.resolve())),
        *("--chdir", str(project)),
        "--",
        *("claude", "-p", "do it"),
    )
    # none of the flags that would change networking, the process group or the stop
    for flag in ("--unshare-net", "--unshare-all", "--new-session", "--unshare-pid"):
        assert flag not in argv
    assert "--die-with-parent" not in argv


def test_argv_options(tmp_path: Path) -> None:
    argv = bwrap_argv(["true"], writable=[], cwd=tmp_path, bwrap="/opt/bwrap", die_with_parent=True)
    assert argv[0] == "/opt/bwrap"
    assert argv[-5:] == ("--die-with-parent", "--chdir", str(tmp_path.resolve()), "--", "true")
    assert "--bind" not in argv
    # the command's own arguments come after `--`, untouched, even when they look like flags
    argv = bwrap_argv(["echo", "--bind", "/", "/"], writable=[], cwd=tmp_path)
    assert argv[argv.index("--") :] == ("--", "echo", "--bind", "/", "/")


# -- sandbox_problem --------------------------------------------------------------------


def test_problem_when_bwrap_is_missing() -> None:
    problem = sandbox_problem("no-such-bwrap-for-lokid")
    assert problem is not None
    assert problem.startswith("bubblewrap (`no-such-bwrap-for-lokid`) is not on the daemon's PATH")


def test_problem_when_bwrap_cannot_sandbox_is_probed_once(tmp_path: Path) -> None:
    fake = tmp_path / "bwrap"
    calls = tmp_path / "calls"
    fake.write_text(
        "#!/bin/sh\n"
        f"echo run >> {calls}\n"
        "echo 'bwrap: No permissions to create new namespace' >&2\n"
        "exit 1\n"
    )
    fake.chmod(0o755)
    expected = f"{fake} cannot create a sandbox here: bwrap: No permissions to create new namespace"
    assert sandbox_problem(str(fake)) == expected
    assert sandbox_problem(str(fake)) == expected
    assert calls.read_text() == "run\n"  # cached
    sandbox._probed.pop(str(fake))


# -- real sandboxes ---------------------------------------------------------------------

PROBE = textwrap.dedent(
    """
    import errno, json, os, sys
    work, outside, host_tmp_file, marker = sys.argv[1:5]
    result = {"cwd": os.getcwd()}
    with open(os.path.join(work, "ok.txt"), "w") as f:
        f.write("written inside")
    for name, path in (("outside", os.path.join(outside, "no.txt")), ("usr", "/usr/lokid-no.txt")):
        try:
            open(path, "w").close()
            result[name] = "written"
        except OSError as exc:
            result[name] = errno.errorcode[exc.errno]
    result["host_tmp_file_visible"] = os.path.exists(host_tmp_file)
    with open(os.path.join("/tmp", marker), "w") as f:
        f.write("private")
    result["tmp"] = sorted(os.listdir("/tmp"))
    print(json.dumps(result))
    """
)


@pytest.mark.usefixtures("bwrap_ok")
def test_only_the_writable_folders_are_writable_and_tmp_is_private(
    tmp_path: Path, unbound_dir: Path
) -> None:
    work = tmp_path / "work"  # under /tmp: bound on top of the private /tmp
    work.mkdir()
    host_file = tmp_path / "host-only.txt"
    host_file.write_text("x")
    marker = f"lokid-sandbox-marker-{os.getpid()}"
    argv = bwrap_argv(
        [PY, "-c", PROBE, str(work), str(unbound_dir), str(host_file), marker],
        writable=[work],
        cwd=work,
    )
    done = subprocess.run(argv, capture_output=True, check=True, timeout=30)
    result = json.loads(done.stdout)

    assert (work / "ok.txt").read_text() == "written inside"
    assert result["cwd"] == str(work.resolve())
    assert result["outside"] in {"EROFS", "EACCES"}
    assert result["usr"] in {"EROFS", "EACCES"}
    assert list(unbound_dir.iterdir()) == []
    assert result["host_tmp_file_visible"] is False
    # inside, /tmp holds only our marker and the way down to the bound folder
    assert sorted(result["tmp"]) == sorted([marker, work.resolve().parts[2]])
    assert not (Path("/tmp") / marker).exists()


GROUP = textwrap.dedent(
    """
    import os, time
    child = os.fork()
    if child == 0:
        time.sleep(300)
        os._exit(0)
    print(os.getpid(), child, flush=True)
    time.sleep(300)
    """
)


@pytest.mark.usefixtures("bwrap_ok")
def test_killing_the_process_group_kills_everything_in_the_sandbox(tmp_path: Path) -> None:
    argv = bwrap_argv([PY, "-c", GROUP], writable=[tmp_path], cwd=tmp_path)
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, start_new_session=True)
    try:
        assert process.stdout is not None
        agent, grandchild = map(int, process.stdout.readline().split())
        assert {process.pid, agent, grandchild} <= set(live(process.pid))  # one group
        os.killpg(process.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while live(process.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert live(process.pid) == []
        for pid in (agent, grandchild):
            state = Path(f"/proc/{pid}/stat")
            assert not state.exists() or state.read_text().rsplit(")", 1)[1].split()[0] == "Z"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


GRACEFUL = textwrap.dedent(
    """
    import os, signal, sys, time
    if os.fork() == 0:
        time.sleep(300)  # a helper that dies of SIGTERM
        os._exit(0)
    def term(*_):
        time.sleep(0.2)  # some cleanup
        with open("graceful", "w") as f:
            f.write(str(os.getpid()))
        sys.exit(0)
    signal.signal(signal.SIGTERM, term)
    print("ready", flush=True)
    time.sleep(300)
    """
)


@pytest.mark.usefixtures("bwrap_ok")
@pytest.mark.parametrize("die_with_parent", [False, True])
async def test_a_stop_gives_the_sandboxed_agent_its_grace(
    tmp_path: Path, die_with_parent: bool
) -> None:
    argv = bwrap_argv(
        [PY, "-c", GRACEFUL], writable=[tmp_path], cwd=tmp_path, die_with_parent=die_with_parent
    )
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            run = await LocalAgentHost(nursery).start(AgentSpec(argv, tmp_path))
            async for line in run.lines():
                if line.data == b"ready":
                    break
            result = await run.stop(grace=5)
    assert result.reason is EndReason.STOPPED
    assert result.survivors == () and not result.escalated
    assert live(run.identity.pid) == []
    # Without --die-with-parent the agent finishes its SIGTERM handler; with it, the
    # bwrap monitor dies of the SIGTERM and takes the agent down with SIGKILL at once.
    assert (tmp_path / "graceful").exists() is not die_with_parent
