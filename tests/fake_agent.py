#!/usr/bin/env python3
"""A fake coding-agent CLI that speaks Claude Code's stream-json protocol. Stdlib only.

Invoked like `claude`:

    fake_agent.py --dangerously-skip-permissions [--model M] -p PROMPT \
        --output-format stream-json --verbose

It accepts Claude Code's options that lokid may pass (an unknown option is an
error, exit 1, as with the real CLI), refuses `--output-format stream-json`
in print mode without `--verbose` (as the real CLI does), and reads the
prompt from its argument or, without one, from stdin. With `--output-format
text` (the default, as with `claude`) it prints each assistant text and the
final result as plain lines instead of JSON.

Mode: a `[mode:NAME]` marker in the prompt, else `$FAKE_AGENT_MODE`, else `ok`.

    ok           init, text, sub-agents (Task tool use, sub-agent text, tool_result),
                 a result with total_cost_usd; exit 0
    slow         like ok, but first FAKE_AGENT_SECONDS (3) seconds of progress, one
                 text line per FAKE_AGENT_TICK (1.0) seconds
    fail         an error result (error_during_execution), a line on stderr; exit 1
    hang         no output at all, never exits (SIGTERM ends it)
    ignore-term  ignores SIGTERM and forks a grandchild (same process group) that
                 ignores it too and sleeps; prints init; never exits
    rate-limited a rejected rate_limit_event, the `<synthetic>` usage-limit message
                 and an is_error result "Claude AI usage limit reached|<epoch>",
                 reset FAKE_AGENT_RESET_SECONDS (3600) from now; exit 1
    malformed    five invalid lines between valid ones, then a good result; exit 0
    no-result    init and text, no result; exit 0
    flood        FAKE_AGENT_LINES (1000) assistant lines as fast as it can, a result
    complete     writes .loki/signals/COMPLETION_REQUESTED, then ok
    add-task     appends a task to .loki/queue/pending.json, then ok
                 (both: in the .loki folder the prompt names by absolute path, as
                 lokid's prompt does for an agent in a worktree; else, or with the
                 marker `[loki:cwd]` - a CLI that may only write in its working
                 folder - in its cwd; `[loki:both]`: the same task or signal in both)

Other markers: `[seconds:N]`, `[lines:N]`, `[subagents:N]`, `[task:TITLE]`, `[id:ID]`
(add-task's id, else the next free `agent-NNN` of that queue), `[then:hang]` (after
what the mode wrote, hang: a run a daemon crash cuts off) (they
win over the variables). Variables: FAKE_AGENT_SUBAGENTS (1), FAKE_AGENT_COST
(0.0123), FAKE_AGENT_SUBAGENT_TOOL (Task; `Agent` as in Claude Code >= 2.1.63),
FAKE_AGENT_TASK_TITLE, FAKE_AGENT_LOG (append one JSON line per invocation:
argv, cwd, pid, pgid, mode, prompt), FAKE_AGENT_PID_FILE (ignore-term writes
"<pid> <grandchild pid>"), FAKE_AGENT_LIFETIME (3600: hang and ignore-term
exit after that many seconds, so a leaked test process does not live forever).

`fake_agent.py --install DIR [NAME ...]` writes executable wrappers (default:
`claude`) into DIR that run this file with this Python; put DIR first on PATH.
"""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import signal
import string
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

MODES = (
    "ok",
    "slow",
    "fail",
    "hang",
    "ignore-term",
    "rate-limited",
    "malformed",
    "no-result",
    "flood",
    "complete",
    "add-task",
)
DEFAULT_MODEL = "claude-sonnet-4-5-20250929"
VERSION = "2.1.0 (Claude Code, fake)"
FLAGS = frozenset(
    {
        "--dangerously-skip-permissions",
        "--verbose",
        "--include-partial-messages",
        "--fork-session",
        "-p",
        "--print",
    }
)
OPTIONS = frozenset(
    {
        "--model",
        "--output-format",
        "--input-format",
        "--append-system-prompt",
        "--setting-sources",
        "--resume",
        "--session-id",
        "--effort",
        "--max-budget-usd",
        "--fallback-model",
        "--settings",
        "--permission-mode",
        "--disallowedTools",
        "--allowedTools",
        "--max-turns",
    }
)
MALFORMED_LINES = (
    b'{"type":"assistant","message":{"content":[{"type":"text","text":"trunc',
    b"this is not json at all",
    b"\xff\xfe\x00 not utf-8 \xc3\x28",
    b"[1, 2, 3]",
    b'{"no_type": true}',
)


# -- output ------------------------------------------------------------------------


def write_line(data: bytes) -> None:
    try:
        sys.stdout.buffer.write(data + b"\n")
        sys.stdout.buffer.flush()
    except BrokenPipeError:
        os._exit(1)  # the reader went away, as a real CLI dies on EPIPE


def fail(message: str, code: int = 1) -> NoReturn:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()
    raise SystemExit(code)


def tool_id() -> str:
    return "toolu_01" + "".join(random.choices(string.ascii_letters + string.digits, k=22))


class Agent:
    def __init__(self, args: Args) -> None:
        self.args = args
        self.session_id = str(uuid.uuid4())
        self.model = args.model or DEFAULT_MODEL
        self.turns = 0
        self.started = time.monotonic()

    def emit(self, message: dict[str, Any]) -> None:
        if self.args.output_format == "stream-json":
            message.setdefault("session_id", self.session_id)
            message.setdefault("uuid", str(uuid.uuid4()))
            write_line(json.dumps(message, separators=(",", ":")).encode())
        elif self.args.output_format == "text":
            for text in _texts(message):
                write_line(text.encode())

    def init(self) -> None:
        bypass = self.args.skip_permissions
        self.emit(
            {
                "type": "system",
                "subtype": "init",
                "cwd": os.getcwd(),
                "session_id": self.session_id,
                "tools": ["Task", "Bash", "Edit", "Glob", "Grep", "Read", "Write", "TodoWrite"],
                "mcp_servers": [],
                "model": self.model,
                "permissionMode": "bypassPermissions" if bypass else "default",
                "slash_commands": [],
                "apiKeySource": "none",
                "claude_code_version": VERSION.split()[0],
                "output_style": "default",
            }
        )

    def assistant(
        self,
        content: list[dict[str, Any]],
        *,
        parent: str | None = None,
        model: str | None = None,
        error: str | None = None,
    ) -> None:
        self.turns += 1
        message: dict[str, Any] = {
            "type": "assistant",
            "message": {
                "id": "msg_" + uuid.uuid4().hex[:24],
                "type": "message",
                "role": "assistant",
                "model": model or self.model,
                "content": content,
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {"input_tokens": 12, "output_tokens": 34},
            },
            "parent_tool_use_id": parent,
        }
        if error:
            message["error"] = error
        self.emit(message)

    def text(self, text: str, *, parent: str | None = None) -> None:
        self.assistant([{"type": "text", "text": text}], parent=parent)

    def tool(self, name: str, tool_input: dict[str, Any], output: str) -> str:
        tid = tool_id()
        self.assistant([{"type": "tool_use", "id": tid, "name": name, "input": tool_input}])
        self.tool_result(tid, output)
        return tid

    def tool_result(self, tid: str, output: str, *, is_error: bool = False) -> None:
        block: dict[str, object] = {
            "tool_use_id": tid,
            "type": "tool_result",
            "content": [{"type": "text", "text": output}],
        }
        if is_error:
            block["is_error"] = True
        self.emit(
            {
                "type": "user",
                "message": {"role": "user", "content": [block]},
                "parent_tool_use_id": None,
            }
        )

    def subagent(self, n: int) -> None:
        tid = tool_id()
        name = os.environ.get("FAKE_AGENT_SUBAGENT_TOOL", "Task")
        tool_input = {
            "description": f"Sub-task {n}",
            "prompt": f"Do part {n} of the work.",
            "subagent_type": "general-purpose",
        }
        self.assistant([{"type": "tool_use", "id": tid, "name": name, "input": tool_input}])
        self.text(f"Sub-agent {n} working.", parent=tid)
        self.tool_result(tid, f"Sub-task {n} done.")

    def result(self, text: str, *, is_error: bool = False, subtype: str = "success") -> None:
        elapsed = int((time.monotonic() - self.started) * 1000)
        cost = 0.0 if is_error else float(os.environ.get("FAKE_AGENT_COST", "0.0123"))
        message = {
            "type": "result",
            "subtype": subtype,
            "is_error": is_error,
            "duration_ms": elapsed,
            "duration_api_ms": elapsed,
            "num_turns": max(self.turns, 1),
            "result": text,
            "session_id": self.session_id,
            "total_cost_usd": cost,
            "usage": {
                "input_tokens": 120,
                "cache_creation_input_tokens": 2000,
                "cache_read_input_tokens": 15000,
                "output_tokens": 340,
                "server_tool_use": {"web_search_requests": 0},
                "service_tier": "standard",
            },
            "modelUsage": {},
            "permission_denials": [],
        }
        if self.args.output_format == "json":
            write_line(json.dumps(message, separators=(",", ":")).encode())
        else:
            self.emit(message)

    def work(self, prompt: str, subagents: int) -> None:
        first = prompt.strip().splitlines()[0][:80] if prompt.strip() else "(empty prompt)"
        self.text(f"I'll work on: {first}")
        for n in range(1, subagents + 1):
            self.subagent(n)
        self.tool("Bash", {"command": "ls", "description": "List files"}, "README.md")
        self.text("Done.")


def _texts(message: dict[str, Any]) -> Iterator[str]:
    if message.get("type") == "assistant":
        for block in message["message"]["content"]:
            if block.get("type") == "text":
                yield block["text"]
    elif message.get("type") == "result":
        yield str(message.get("result", ""))


# -- arguments ----------------------------------------------------------------------


class Args:
    def __init__(self) -> None:
        self.model: str | None = None
        self.output_format = "text"
        self.print_mode = False
        self.verbose = False
        self.skip_permissions = False
        self.prompt: str | None = None


def parse_args(argv: Sequence[str]) -> Args:
    args = Args()
    positional: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            positional.extend(argv[i + 1 :])
            break
        name, eq, value = arg.partition("=")
        if arg in ("--version", "-v"):
            write_line(VERSION.encode())
            raise SystemExit(0)
        if arg in FLAGS:
            args.print_mode |= arg in ("-p", "--print")
            args.verbose |= arg == "--verbose"
            args.skip_permissions |= arg == "--dangerously-skip-permissions"
        elif name in OPTIONS:
            if not eq:
                i += 1
                if i >= len(argv):
                    fail(f"error: option '{name} <value>' argument missing")
                value = argv[i]
            if name == "--model":
                args.model = value
            elif name == "--output-format":
                if value not in ("text", "json", "stream-json"):
                    fail(f"error: option '--output-format' argument '{value}' is invalid")
                args.output_format = value
        elif arg.startswith("-") and arg != "-":
            fail(f"error: unknown option '{arg}'")
        else:
            positional.append(arg)
        i += 1
    if len(positional) > 1:
        fail(f"error: too many arguments. Expected 1 argument but got {len(positional)}.")
    if args.print_mode and args.output_format == "stream-json" and not args.verbose:
        fail("Error: When using --print, --output-format=stream-json requires --verbose")
    args.prompt = positional[0] if positional else None
    return args


def marker(prompt: str, name: str) -> str | None:
    m = re.search(rf"\[{name}:([^\]]+)\]", prompt)
    return m[1].strip() if m else None


def setting(prompt: str, name: str, env: str, default: str) -> str:
    return marker(prompt, name) or os.environ.get(env) or default


# -- side effects of some modes --------------------------------------------------------


def write_json_atomically(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temp.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(temp, path)


def loki_dir(prompt: str) -> Path:
    """The `.loki` folder the prompt tells the agent to use: an absolute path given
    for `queue/` or `signals/`, else (or confined by `[loki:cwd]`) the one in the cwd."""
    if marker(prompt, "loki") == "cwd":
        return Path.cwd() / ".loki"
    named = re.search(r"(/\S*/\.loki)/(?:queue|signals)/", prompt)
    return Path(named.group(1)) if named else Path.cwd() / ".loki"


def loki_dirs(prompt: str) -> list[Path]:
    """Where `complete` and `add-task` write: `loki_dir`, or with `[loki:both]` the
    folder the prompt names and then the one in the cwd."""
    if marker(prompt, "loki") != "both":
        return [loki_dir(prompt)]
    return [loki_dir(prompt.replace("[loki:both]", "")), Path.cwd() / ".loki"]


def add_task(
    loki: Path, title: str, same_as: dict[str, Any] | None = None, task_id: str | None = None
) -> dict[str, Any]:
    """Append a new task (`task_id`, else the next free `agent-NNN`), or `same_as`, to
    the queue of `loki`; the entry."""
    path = loki / "queue" / "pending.json"
    document: Any = json.loads(path.read_text()) if path.exists() else []
    tasks: list[Any] = document if isinstance(document, list) else document.setdefault("tasks", [])
    ids = {t.get("id") for t in tasks if isinstance(t, dict)}
    n = len(tasks) + 1
    while f"agent-{n:03d}" in ids:
        n += 1
    task = same_as or {
        "id": task_id or f"agent-{n:03d}",
        "title": title,
        "description": f"{title}\n(added by the fake agent)",
        "priority": "medium",
        "status": "pending",
        "source": "agent",
    }
    tasks.append(task)
    write_json_atomically(path, document)
    return task


def sleep_forever(lifetime: float) -> NoReturn:
    deadline = time.monotonic() + lifetime
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(left, 60.0))
    raise SystemExit(0)


# -- modes -------------------------------------------------------------------------------


def run(args: Args, prompt: str, mode: str) -> int:
    agent = Agent(args)
    subagents = int(setting(prompt, "subagents", "FAKE_AGENT_SUBAGENTS", "1"))
    lifetime = float(os.environ.get("FAKE_AGENT_LIFETIME", "3600"))
    if mode == "hang":
        sleep_forever(lifetime)
    if mode == "ignore-term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        sys.stdout.flush()
        child = os.fork()
        if child == 0:  # the grandchild: same process group, SIGTERM ignored too
            try:
                sleep_forever(lifetime)
            finally:
                os._exit(0)
        pid_file = os.environ.get("FAKE_AGENT_PID_FILE")
        if pid_file:
            temp = f"{pid_file}.tmp"
            Path(temp).write_text(f"{os.getpid()} {child}\n")
            os.replace(temp, pid_file)
        agent.init()
        sleep_forever(lifetime)

    agent.init()
    if mode == "slow":
        seconds = float(setting(prompt, "seconds", "FAKE_AGENT_SECONDS", "3"))
        tick = float(os.environ.get("FAKE_AGENT_TICK", "1.0"))
        deadline = time.monotonic() + seconds
        k = 0
        while (left := deadline - time.monotonic()) > 0:
            k += 1
            agent.text(f"Still working ({k}).")
            time.sleep(min(tick, left))
    elif mode == "fail":
        agent.text("Something went wrong while running the build.")
        agent.result("simulated failure", is_error=True, subtype="error_during_execution")
        fail("Error: simulated failure (fake agent)")
    elif mode == "rate-limited":
        reset = int(time.time()) + int(os.environ.get("FAKE_AGENT_RESET_SECONDS", "3600"))
        notice = f"Claude AI usage limit reached|{reset}"
        agent.emit(
            {
                "type": "rate_limit_event",
                "rate_limit_info": {
                    "status": "rejected",
                    "resetsAt": reset,
                    "rateLimitType": "five_hour",
                    "isUsingOverage": False,
                },
            }
        )
        agent.assistant([{"type": "text", "text": notice}], model="<synthetic>", error="rate_limit")
        agent.result(notice, is_error=True)
        return 1
    elif mode == "malformed":
        for line in MALFORMED_LINES:
            write_line(line)
    elif mode == "no-result":
        agent.text("Starting, but I will not finish.")
        return 0
    elif mode == "flood":
        lines = int(setting(prompt, "lines", "FAKE_AGENT_LINES", "1000"))
        for n in range(1, lines + 1):
            agent.text(f"flood line {n} of {lines}")
        agent.result(f"flooded {lines} lines")
        return 0
    elif mode == "complete":
        for loki in loki_dirs(prompt):
            signals = loki / "signals"
            signals.mkdir(parents=True, exist_ok=True)
            target = signals / "COMPLETION_REQUESTED"
            target.write_text("All tasks are done (fake agent).\n")
            agent.tool("Write", {"file_path": str(target), "content": "..."}, "File written")
    elif mode == "add-task":
        title = setting(prompt, "task", "FAKE_AGENT_TASK_TITLE", "Follow-up found by the agent")
        first, *others = loki_dirs(prompt)
        task = add_task(first, title, task_id=marker(prompt, "id"))
        for loki in others:  # the very same entry (same id) in the other queue too
            add_task(loki, title, task)
        for loki in (first, *others):
            path = str(loki / "queue" / "pending.json")
            agent.tool("Edit", {"file_path": path, "new_string": task["title"]}, "File updated")
    if marker(prompt, "then") == "hang":
        sleep_forever(lifetime)

    agent.work(prompt, subagents)
    agent.result(f"Done: {prompt.strip()[:200]}")
    return 0


def log_invocation(argv: Sequence[str], prompt: str, mode: str) -> None:
    path = os.environ.get("FAKE_AGENT_LOG")
    if not path:
        return
    record = {
        "argv": list(argv),
        "cwd": os.getcwd(),
        "pid": os.getpid(),
        "pgid": os.getpgrp(),
        "mode": mode,
        "prompt": prompt,
    }
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(record) + "\n").encode())
    finally:
        os.close(fd)


def install(directory: Path, names: Sequence[str] = ("claude",)) -> list[Path]:
    """Write executable wrappers named `names` into `directory` that run this fake agent."""
    directory.mkdir(parents=True, exist_ok=True)
    script = Path(__file__).resolve()
    made = []
    for name in names:
        wrapper = directory / name
        wrapper.write_text(
            f'#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(str(script))} "$@"\n'
        )
        wrapper.chmod(0o755)
        made.append(wrapper)
    return made


def main(argv: Sequence[str]) -> int:
    if argv and argv[0] == "--install":
        if len(argv) < 2:
            fail("usage: fake_agent.py --install DIR [NAME ...]", 2)
        for path in install(Path(argv[1]), argv[2:] or ("claude",)):
            print(path)
        return 0
    args = parse_args(argv)
    if args.prompt is not None:
        prompt = args.prompt
    elif sys.stdin is None or sys.stdin.isatty():
        fail(
            "Error: Input must be provided either through stdin or as a prompt argument "
            "when using --print"
        )
    else:
        prompt = sys.stdin.buffer.read().decode("utf-8", "replace")
    mode = marker(prompt, "mode") or os.environ.get("FAKE_AGENT_MODE") or "ok"
    if mode not in MODES:
        fail(f"fake_agent: unknown mode {mode!r} (one of {', '.join(MODES)})", 2)
    log_invocation(argv, prompt, mode)
    return run(args, prompt, mode)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
