"""The contract between tests/fake_agent.py and lokid.providers.

Each test builds the command line with `build_command`, runs the fake agent
as a real process under that argv (found on PATH as `claude`, like the real
CLI), and reads its stdout through `LineSplitter` and the provider's parser:
lokid's argv must be accepted, and what the fake prints must parse to the
records and verdicts each mode stands for.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import attrs
import pytest

from lokid.process import is_zombie
from lokid.providers import (
    AgentEvent,
    AssistantText,
    FailureKind,
    LineSplitter,
    Malformed,
    Outcome,
    RateLimited,
    Result,
    SubAgentCompleted,
    SubAgentSpawned,
    SystemInit,
    ToolUse,
    build_command,
    executable,
    parser_for,
    retry_delay,
)

from .fake_agent import MODES, install

FAKE = Path(__file__).with_name("fake_agent.py")


@attrs.frozen
class Run:
    returncode: int
    events: list[AgentEvent]
    outcome: Outcome
    stderr: str
    chunk_times: list[float]

    def of(self, kind: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]

    def texts(self) -> list[str]:
        return [e.text for e in self.of(AssistantText)]


@pytest.fixture
def bin_dir(tmp_path: Path) -> Path:
    install(tmp_path / "bin")
    return tmp_path / "bin"


@pytest.fixture
def project(tmp_path: Path) -> Path:
    path = tmp_path / "project"
    path.mkdir()
    return path


def agent_env(bin_dir: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAKE_AGENT_")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra or {})
    return env


def run_agent(
    bin_dir: Path,
    project: Path,
    prompt: str,
    *,
    env: Mapping[str, str] | None = None,
    provider: str = "claude",
    options: Mapping[str, Any] | None = None,
    timeout: float = 30.0,
) -> Run:
    command = build_command(
        provider, prompt, model=None, project_dir=project, options=options or {}
    )
    proc = subprocess.Popen(
        command.argv,
        cwd=command.cwd,
        env={**agent_env(bin_dir, env), **command.env},
        stdin=subprocess.PIPE if command.stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    if command.stdin is not None:
        assert proc.stdin is not None
        proc.stdin.write(command.stdin)
        proc.stdin.close()
    splitter = LineSplitter()
    parser = parser_for(command.output_format, now=lambda: datetime.now(UTC))
    events: list[AgentEvent] = []
    chunk_times: list[float] = []
    deadline = time.monotonic() + timeout
    rng = random.Random(5)
    while chunk := proc.stdout.read1(rng.choice([7, 100, 4096, 65536])):  # type: ignore[attr-defined]
        chunk_times.append(time.monotonic())
        for line in splitter.feed(chunk):
            events += parser.feed(line)
        assert time.monotonic() < deadline, "the fake agent ran too long"
    for line in splitter.flush():
        events += parser.feed(line)
    returncode = proc.wait(timeout=timeout)
    stderr = proc.stderr.read().decode()
    return Run(returncode, events, parser.finish(), stderr, chunk_times)


def test_ok_run_speaks_stream_json(bin_dir: Path, project: Path) -> None:
    run = run_agent(bin_dir, project, "Build the login page")
    assert run.returncode == 0, run.stderr
    init = run.events[0]
    assert isinstance(init, SystemInit)
    assert init.cwd == str(project) and init.permission_mode == "bypassPermissions"
    [spawned] = run.of(SubAgentSpawned)
    assert spawned.tool_use_id.startswith("toolu_01") and len(spawned.tool_use_id) > 8
    assert run.of(SubAgentCompleted) == [SubAgentCompleted(spawned.tool_use_id, False)]
    assert AssistantText("Sub-agent 1 working.", spawned.tool_use_id) in run.events
    assert [t.summary for t in run.of(ToolUse) if t.name == "Bash"] == ["ls"]
    [result] = run.of(Result)
    assert run.events[-1] == result
    assert (result.is_error, result.cost_usd, result.subtype) == (False, 0.0123, "success")
    assert result.text == "Done: Build the login page"
    assert result.usage.cache_read_tokens == 15000
    assert run.outcome.failure(run.returncode, run.stderr).ok


def test_sub_agents_marker_and_agent_tool_name(bin_dir: Path, project: Path) -> None:
    env = {"FAKE_AGENT_SUBAGENT_TOOL": "Agent"}
    run = run_agent(bin_dir, project, "Split the work [subagents:3]", env=env)
    spawned = run.of(SubAgentSpawned)
    assert len({s.tool_use_id for s in spawned}) == 3
    assert {c.tool_use_id for c in run.of(SubAgentCompleted)} == {s.tool_use_id for s in spawned}
    assert run.outcome.open_subagents == ()


def test_slow_mode_streams_line_by_line(bin_dir: Path, project: Path) -> None:
    env = {"FAKE_AGENT_MODE": "slow", "FAKE_AGENT_SECONDS": "0.6", "FAKE_AGENT_TICK": "0.1"}
    started = time.monotonic()
    run = run_agent(bin_dir, project, "take your time", env=env)
    assert time.monotonic() - started >= 0.6
    assert len([t for t in run.texts() if t.startswith("Still working")]) >= 3
    # flushed per line: output arrived over the whole run, not in one piece at exit
    assert run.chunk_times[-1] - run.chunk_times[0] >= 0.4
    assert run.outcome.failure(run.returncode).ok


def test_fail_mode(bin_dir: Path, project: Path) -> None:
    run = run_agent(bin_dir, project, "fix it", env={"FAKE_AGENT_MODE": "fail"})
    assert run.returncode == 1
    assert "Error: simulated failure" in run.stderr
    [result] = run.of(Result)
    assert result.is_error and result.subtype == "error_during_execution"
    verdict = run.outcome.failure(run.returncode, run.stderr)
    assert (verdict.kind, verdict.code) == (FailureKind.TRANSIENT, "error_result")


def test_rate_limited_mode(bin_dir: Path, project: Path) -> None:
    env = {"FAKE_AGENT_MODE": "rate-limited", "FAKE_AGENT_RESET_SECONDS": "3600"}
    run = run_agent(bin_dir, project, "anything", env=env)
    assert run.returncode == 1
    [limited] = run.of(RateLimited)
    expected = datetime.now(UTC) + timedelta(seconds=3600)
    assert limited.reset_at is not None and abs(limited.reset_at - expected) < timedelta(seconds=10)
    now = datetime.now(UTC)
    verdict = run.outcome.failure(run.returncode, run.stderr, now=now)
    assert verdict.kind is FailureKind.RATE_LIMIT and verdict.reset_at == limited.reset_at
    delay = retry_delay(verdict, 1, rng=random.Random(0), now=now)
    assert delay is not None and 3590 < delay < 3600 + 60 + 31


def test_malformed_mode(bin_dir: Path, project: Path) -> None:
    run = run_agent(bin_dir, project, "go", env={"FAKE_AGENT_MODE": "malformed"})
    assert run.returncode == 0
    reasons = [m.reason for m in run.of(Malformed)]
    assert reasons == [
        "not JSON",
        "not JSON",
        "invalid UTF-8",
        "not a JSON object",
        "no message type",
    ]
    assert run.outcome.malformed == 5
    assert run.of(Result) and run.outcome.failure(run.returncode).ok


def test_no_result_mode(bin_dir: Path, project: Path) -> None:
    run = run_agent(bin_dir, project, "go [mode:no-result]")
    assert run.returncode == 0 and not run.of(Result)
    assert run.outcome.summary == "exited without a result"
    assert run.outcome.failure(run.returncode).code == "no_result"


def test_flood_mode(bin_dir: Path, project: Path) -> None:
    run = run_agent(
        bin_dir, project, "go", env={"FAKE_AGENT_MODE": "flood", "FAKE_AGENT_LINES": "3000"}
    )
    floods = [t for t in run.texts() if t.startswith("flood line ")]
    assert len(floods) == 3000 and floods[-1] == "flood line 3000 of 3000"
    assert run.of(Result)[0].text == "flooded 3000 lines"
    assert run.outcome.malformed == 0


def test_complete_mode_writes_the_signal(bin_dir: Path, project: Path) -> None:
    run = run_agent(bin_dir, project, "finish [mode:complete]")
    signal_file = project / ".loki" / "signals" / "COMPLETION_REQUESTED"
    assert signal_file.read_text().startswith("All tasks are done")
    assert ToolUse in {type(e) for e in run.events}
    assert str(signal_file) in [t.summary for t in run.of(ToolUse)]
    assert run.outcome.failure(run.returncode).ok


def test_add_task_mode_appends_and_keeps_the_file_shape(bin_dir: Path, project: Path) -> None:
    run_agent(bin_dir, project, "[mode:add-task] [task:Add dark mode]")
    run_agent(bin_dir, project, "[mode:add-task]")
    pending = project / ".loki" / "queue" / "pending.json"
    tasks = json.loads(pending.read_text())
    assert [(t["id"], t["title"], t["source"]) for t in tasks] == [
        ("agent-001", "Add dark mode", "agent"),
        ("agent-002", "Follow-up found by the agent", "agent"),
    ]
    pending.write_text(json.dumps({"tasks": [{"id": "agent-002"}], "version": 2}))
    run_agent(bin_dir, project, "[mode:add-task]")
    document = json.loads(pending.read_text())
    assert document["version"] == 2
    assert [t["id"] for t in document["tasks"]] == ["agent-002", "agent-003"]


def test_large_and_dash_prompts_travel_on_stdin(
    bin_dir: Path, project: Path, tmp_path: Path
) -> None:
    log = tmp_path / "invocations.jsonl"
    big = "Implement everything in the PRD.\n" + "x" * 200_000
    for prompt in (big, "- first bullet", "Plain prompt"):
        run = run_agent(bin_dir, project, prompt, env={"FAKE_AGENT_LOG": str(log)})
        assert run.outcome.failure(run.returncode, run.stderr).ok, run.stderr
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["prompt"] for r in records] == [big, "- first bullet", "Plain prompt"]
    assert [len(r["argv"]) for r in records] == [5, 5, 6]  # the prompt is an argument only last
    assert all(r["cwd"] == str(project) for r in records)


def test_mode_marker_wins_over_the_environment(bin_dir: Path, project: Path) -> None:
    run = run_agent(bin_dir, project, "[mode:ok]", env={"FAKE_AGENT_MODE": "fail"})
    assert run.returncode == 0
    bad = run_agent(bin_dir, project, "[mode:explode]")
    assert bad.returncode == 2 and "unknown mode 'explode'" in bad.stderr


def test_fake_agent_checks_flags_like_claude(bin_dir: Path, project: Path) -> None:
    env = agent_env(bin_dir)
    no_verbose = subprocess.run(
        ["claude", "-p", "hi", "--output-format", "stream-json"], env=env, capture_output=True
    )
    assert no_verbose.returncode == 1
    assert b"requires --verbose" in no_verbose.stderr
    unknown = subprocess.run(["claude", "-p", "hi", "--frobnicate"], env=env, capture_output=True)
    assert unknown.returncode == 1 and b"unknown option '--frobnicate'" in unknown.stderr
    text = subprocess.run(["claude", "-p", "hi [subagents:0]"], env=env, capture_output=True)
    assert text.stdout.decode().splitlines() == [
        "I'll work on: hi [subagents:0]",
        "Done.",
        "Done: hi [subagents:0]",
    ]


def test_command_provider_runs_the_fake_with_the_prompt_on_stdin(
    bin_dir: Path, project: Path
) -> None:
    options = {"command": [sys.executable, str(FAKE), "--output-format", "text"]}
    run = run_agent(bin_dir, project, "Write docs", provider="command", options=options)
    assert run.texts()[0] == "I'll work on: Write docs"
    assert run.outcome.failure(run.returncode, run.stderr).ok
    failed = run_agent(
        bin_dir, project, "Write docs [mode:fail]", provider="command", options=options
    )
    verdict = failed.outcome.failure(failed.returncode, failed.stderr)
    assert (verdict.kind, verdict.code) == (FailureKind.TRANSIENT, "exit")
    assert "simulated failure" in verdict.reason


def test_hang_mode_prints_nothing_and_stops_on_sigterm(bin_dir: Path, project: Path) -> None:
    command = build_command("claude", "wait", model=None, project_dir=project, options={})
    proc = subprocess.Popen(
        command.argv,
        cwd=project,
        env=agent_env(bin_dir, {"FAKE_AGENT_MODE": "hang"}),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
    )
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=0.5)
        proc.terminate()
        assert proc.wait(timeout=5) == -signal.SIGTERM
        assert proc.stdout is not None and proc.stdout.read() == b""
    finally:
        proc.kill()
        proc.wait()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not is_zombie(pid)


@pytest.fixture
def killed_groups() -> Iterator[list[int]]:
    groups: list[int] = []
    yield groups
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)


def test_ignore_term_mode_needs_a_group_sigkill(
    bin_dir: Path, project: Path, tmp_path: Path, killed_groups: list[int]
) -> None:
    pid_file = tmp_path / "pids"
    command = build_command("claude", "stubborn", model=None, project_dir=project, options={})
    proc = subprocess.Popen(
        command.argv,
        cwd=project,
        env=agent_env(
            bin_dir, {"FAKE_AGENT_MODE": "ignore-term", "FAKE_AGENT_PID_FILE": str(pid_file)}
        ),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    killed_groups.append(proc.pid)
    assert proc.stdout is not None
    first = first_event(proc.stdout.readline())
    assert isinstance(first, SystemInit)
    parent, grandchild = map(int, pid_file.read_text().split())
    assert parent == proc.pid and grandchild != parent
    assert os.getpgid(grandchild) == proc.pid  # same process group

    os.killpg(proc.pid, signal.SIGTERM)
    time.sleep(0.3)
    assert alive(parent) and alive(grandchild), "SIGTERM should have been ignored"

    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=5) == -signal.SIGKILL
    deadline = time.monotonic() + 5
    while alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not alive(grandchild)


def first_event(line: bytes) -> AgentEvent:
    events = parser_for("stream-json").feed(line)
    assert len(events) == 1
    return events[0]


def test_install_puts_wrappers_on_path(tmp_path: Path) -> None:
    target = tmp_path / "other-bin"
    out = subprocess.run(
        [sys.executable, str(FAKE), "--install", str(target), "claude", "codex"],
        capture_output=True,
        check=True,
    )
    assert out.stdout.decode().split() == [str(target / "claude"), str(target / "codex")]
    for name in ("claude", "codex"):
        assert os.access(target / name, os.X_OK)
    found = subprocess.run(
        [executable("claude", {}), "--version"],
        env=agent_env(target),
        capture_output=True,
        check=True,
    )
    assert b"Claude Code, fake" in found.stdout
    assert set(MODES) >= {"ok", "hang", "ignore-term", "flood"}
