"""lokid.providers: command lines, the stream-json parser, failure classes, backoff."""

from __future__ import annotations

import errno
import itertools
import json
import random
import statistics
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lokid import config
from lokid.errors import ValidationFailed
from lokid.events import check_publishable
from lokid.providers import (
    MAX_ARGV_PROMPT_BYTES,
    MAX_COMMAND_ARGS,
    MAX_MALFORMED_REPORTS,
    PROVIDERS,
    RATE_LIMIT_FLOOR,
    RATE_LIMIT_FLOOR_CAP,
    RESET_JITTER,
    RESET_MARGIN,
    AgentCommand,
    ApiError,
    AssistantText,
    Failure,
    FailureKind,
    LineSplitter,
    Malformed,
    PromptTooLarge,
    RateLimited,
    Result,
    StreamJsonParser,
    SubAgentCompleted,
    SubAgentSpawned,
    SystemInit,
    TailBuffer,
    TextOutputParser,
    ToolResult,
    ToolUse,
    Usage,
    argv_prompt,
    backoff,
    build_command,
    classify,
    executable,
    missing_cli_message,
    parse_reset,
    parser_for,
    retry_delay,
    spawn_failure,
    summarize_tool_input,
    timeout_failure,
    to_event,
    validate_options,
)

PROJECT = Path("/srv/project")
BERLIN = ZoneInfo("Europe/Berlin")
NOW = datetime(2026, 11, 28, 22, 0, tzinfo=BERLIN)


def cmd(
    provider: str, prompt: str = "Build the login page", model: str | None = None, **options: Any
) -> AgentCommand:
    return build_command(provider, prompt, model=model, project_dir=PROJECT, options=options)


# -- command lines ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("provider", "model", "argv"),
    [
        (
            "claude",
            "sonnet",
            [
                "claude",
                "--dangerously-skip-permissions",
                "--model",
                "sonnet",
                "-p",
                "PROMPT",
                "--output-format",
                "stream-json",
                "--verbose",
            ],
        ),
        (
            "claude",
            None,
            [
                "claude",
                "--dangerously-skip-permissions",
                "-p",
                "PROMPT",
                "--output-format",
                "stream-json",
                "--verbose",
            ],
        ),
        (
            "codex",
            "gpt-5.3-codex",
            [
                "codex",
                "exec",
                "--sandbox",
                "workspace-write",
                "--skip-git-repo-check",
                "--model",
                "gpt-5.3-codex",
                "PROMPT",
            ],
        ),
        (
            "codex",
            None,
            ["codex", "exec", "--sandbox", "workspace-write", "--skip-git-repo-check", "PROMPT"],
        ),
        (
            "gemini",
            "gemini-2.5-pro",
            ["gemini", "--yolo", "--model", "gemini-2.5-pro", "--prompt", "PROMPT"],
        ),
        (
            "aider",
            "openrouter/deepseek/deepseek-v3.2",
            [
                "aider",
                "--message",
                "PROMPT",
                "--yes-always",
                "--no-auto-commits",
                "--model",
                "openrouter/deepseek/deepseek-v3.2",
            ],
        ),
        ("cline", "claude-opus-4-6[1m]", ["cline", "-y", "-m", "claude-opus-4-6[1m]", "PROMPT"]),
        ("cline", None, ["cline", "-y", "PROMPT"]),
        (
            "opencode",
            "anthropic/claude-sonnet-4-5",
            ["opencode", "run", "--auto", "--model", "anthropic/claude-sonnet-4-5", "PROMPT"],
        ),
    ],
)
def test_argv_per_provider_matches_the_reference(
    provider: str, model: str | None, argv: list[str]
) -> None:
    command = cmd(provider, "PROMPT", model)
    assert list(command.argv) == argv
    assert command.stdin is None
    assert command.prompt_route == "argv"
    assert command.cwd == PROJECT
    assert command.model == model
    assert argv_prompt(command) == "PROMPT"
    assert command.output_format == ("stream-json" if provider == "claude" else "text")


def test_command_env_is_an_immutable_no_color_extra() -> None:
    command = cmd("claude")
    assert dict(command.env) == {"NO_COLOR": "1"}
    with pytest.raises(TypeError):
        command.env["X"] = "1"  # type: ignore[index,unused-ignore]


def test_model_argument_wins_over_options_model() -> None:
    command = build_command(
        "claude", "p", model="opus", project_dir=PROJECT, options={"model": "haiku"}
    )
    assert command.argv[2:4] == ("--model", "opus")
    command = build_command(
        "claude", "p", model=None, project_dir=PROJECT, options={"model": "haiku"}
    )
    assert command.argv[2:4] == ("--model", "haiku")
    assert command.model == "haiku"


@pytest.mark.parametrize("provider", ["claude", "codex", "gemini"])
@pytest.mark.parametrize(
    "prompt", ["x" * (MAX_ARGV_PROMPT_BYTES + 1), "- first bullet of the PRD", "--help"]
)
def test_prompt_that_cannot_be_an_argument_goes_to_stdin(provider: str, prompt: str) -> None:
    command = cmd(provider, prompt)
    assert command.stdin == prompt.encode()
    assert command.prompt_route == "stdin"
    assert prompt not in command.argv
    assert argv_prompt(command) is None
    if provider == "claude":
        assert command.argv[-4:] == ("-p", "--output-format", "stream-json", "--verbose")
    elif provider == "codex":
        assert command.argv[-1] == "-"
    else:
        assert "--prompt" not in command.argv


def test_argv_limit_counts_utf8_bytes_not_characters() -> None:
    prompt = "é" * (MAX_ARGV_PROMPT_BYTES // 2 + 1)  # fewer characters than the limit
    assert cmd("claude", prompt).prompt_route == "stdin"
    assert cmd("claude", "é" * (MAX_ARGV_PROMPT_BYTES // 2)).prompt_route == "argv"


def test_aider_dash_prompt_uses_the_equals_form_and_a_huge_one_a_message_file() -> None:
    command = cmd("aider", "- fix the bug")
    assert command.argv[1] == "--message=- fix the bug"
    assert argv_prompt(command) == "- fix the bug"
    big = "y" * (MAX_ARGV_PROMPT_BYTES + 1)
    command = cmd("aider", big)
    assert command.argv[1:3] == ("--message-file", "/dev/stdin")
    assert command.stdin == big.encode()


@pytest.mark.parametrize("provider", ["cline", "opencode"])
def test_positional_only_providers_end_options_before_a_dash_prompt(provider: str) -> None:
    command = cmd(provider, "-v is not a flag here")
    assert command.argv[-2:] == ("--", "-v is not a flag here")
    assert argv_prompt(command) == "-v is not a flag here"
    with pytest.raises(PromptTooLarge) as caught:
        cmd(provider, "z" * (MAX_ARGV_PROMPT_BYTES + 1))
    assert caught.value.details["limit"] == MAX_ARGV_PROMPT_BYTES


@pytest.mark.parametrize("provider", [p for p in PROVIDERS if p != "command"])
def test_nul_in_prompt_is_replaced_everywhere(provider: str) -> None:
    command = cmd(provider, "a\0b")
    assert all("\0" not in arg for arg in command.argv)
    assert argv_prompt(command) == "a\ufffdb"


def test_display_elides_the_prompt() -> None:
    command = cmd("claude", "secret plan " * 100)
    shown = command.display()
    assert "secret" not in shown
    assert "<prompt: 1200 chars>" in shown
    assert shown.startswith("claude --dangerously-skip-permissions -p")
    command = cmd("claude", "-dash")
    assert command.display().endswith("< <prompt: 5 bytes>")


def test_command_provider_uses_the_template_and_stdin() -> None:
    command = cmd(
        "command",
        "the prompt",
        command=["/opt/agent/run", "--model={model}", "--dir", "{projectDir}"],
        model="m1",
    )
    assert command.argv == ("/opt/agent/run", "--model=m1", "--dir", str(PROJECT))
    assert command.stdin == b"the prompt"
    assert command.prompt_route == "stdin"
    assert command.output_format == "text"
    assert argv_prompt(command) is None


def test_command_provider_relative_program_is_the_project_folders() -> None:
    options: dict[str, Any] = {"command": ["scripts/agent.sh", "-x"]}
    assert cmd("command", **options).argv[0] == str(PROJECT / "scripts/agent.sh")
    assert executable("command", options, project_dir=PROJECT) == str(PROJECT / "scripts/agent.sh")
    assert executable("command", options) == "scripts/agent.sh"
    assert executable("command", {"command": ["my-agent"]}, project_dir=PROJECT) == "my-agent"


@pytest.mark.parametrize(
    ("template", "fragment"),
    [
        ("my-agent --fast", "not one string"),
        ([], "non-empty list"),
        (None, "non-empty list"),
        ({"argv": ["x"]}, "non-empty list"),
        (["agent", ""], "options.command[1] must be a non-empty string"),
        (["agent", 3], "options.command[1] must be a non-empty string"),
        (["agent", "a\0b"], "NUL"),
        (["agent"] * (MAX_COMMAND_ARGS + 1), "at most 64"),
        (["agent", "x" * 5000], "longer than 4096"),
        (["agent"] + ["x" * 4000] * 9, "in total"),
        (["{model}"], "cannot hold a placeholder"),
    ],
)
def test_command_template_is_validated(template: object, fragment: str) -> None:
    with pytest.raises(ValidationFailed) as caught:
        validate_options("command", {"command": template, "model": "m"})
    assert fragment in caught.value.message
    assert caught.value.field == "options.command"


def test_command_option_rules() -> None:
    with pytest.raises(ValidationFailed, match=r"needs options\.command"):
        validate_options("command", {})
    with pytest.raises(ValidationFailed, match="uses \\{model\\}"):
        validate_options("command", {"command": ["a", "{model}"]})
    validate_options("command", {"command": ["a", "{model}"]}, model="given")
    with pytest.raises(ValidationFailed, match="only for provider 'command'"):
        validate_options("claude", {"command": ["x"]})


@pytest.mark.parametrize("model", ["-rf", "two words", "x" * 201, "", "a;b", 7])
def test_bad_model_names_are_refused(model: object) -> None:
    with pytest.raises(ValidationFailed) as caught:
        validate_options("claude", {"model": model})
    assert caught.value.field == "options.model"
    with pytest.raises(ValidationFailed) as caught:
        build_command("claude", "p", model=model, project_dir=PROJECT, options={})  # type: ignore[arg-type]
    assert caught.value.field == "model"


def test_unknown_provider_and_relative_project_dir() -> None:
    with pytest.raises(ValidationFailed) as caught:
        cmd("copilot")
    assert caught.value.field == "provider"
    with pytest.raises(ValidationFailed) as caught:
        build_command("claude", "p", model=None, project_dir=Path("rel"), options={})
    assert caught.value.field == "projectDir"


def test_provider_list_matches_the_config() -> None:
    assert set(PROVIDERS) == set(config.PROVIDERS)


@pytest.mark.parametrize("provider", [p for p in PROVIDERS if p != "command"])
def test_executable_and_missing_cli_message(provider: str) -> None:
    exe = executable(provider, {})
    assert exe == provider
    message = missing_cli_message(provider, exe)
    assert message.startswith(f"provider '{provider}' needs the `{provider}` CLI, which is not on")
    assert "install it with `" in message
    assert "PATH" in message


def test_missing_command_message_names_the_option() -> None:
    message = missing_cli_message("command", "/opt/nope")
    assert "`/opt/nope`" in message and "options.command[0]" in message


# -- lines and tails -------------------------------------------------------------------


@given(st.lists(st.binary(max_size=40), max_size=20), st.data())
@settings(max_examples=150, deadline=None)
def test_splitter_is_independent_of_chunk_boundaries(pieces: list[bytes], data: Any) -> None:
    stream = b"\n".join(pieces)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    splitter = LineSplitter(max_line_bytes=16)
    lines: list[bytes] = []
    start = 0
    for cut in [*cuts, len(stream)]:
        lines += splitter.feed(stream[start:cut])
        start = cut
    lines += splitter.flush()
    expected = [p if len(p) <= 16 else p[:17] for p in stream.split(b"\n")]
    if expected and expected[-1] == b"":
        expected.pop()  # a final newline ends the last line; it does not start another
    assert lines == expected
    assert splitter.oversized_lines == sum(1 for p in stream.split(b"\n") if len(p) > 16)


def test_splitter_bounds_memory_for_an_endless_line() -> None:
    splitter = LineSplitter(max_line_bytes=1000)
    for _ in range(1000):
        assert splitter.feed(b"x" * 4096) == []
    assert len(splitter._buf) == 1001
    (line, after) = splitter.feed(b"yy\nnext\n")
    assert len(line) == 1001 and after == b"next"
    assert splitter.oversized_lines == 1


def test_tail_buffer_keeps_the_end_from_a_line_start() -> None:
    tail = TailBuffer(max_bytes=20)
    tail.feed(b"first line\nsecond line\n")
    tail.feed(b"third line\n")
    assert tail.text() == "third line\n"
    assert tail.total_bytes == 34
    short = TailBuffer(max_bytes=100)
    short.feed(b"only \xff line")
    assert short.text() == "only \ufffd line"


# -- the Claude stream-json parser -----------------------------------------------------


def j(obj: object) -> bytes:
    return json.dumps(obj).encode()


INIT = j(
    {
        "type": "system",
        "subtype": "init",
        "cwd": "/srv/project",
        "session_id": "8f7c5e0a-1111-2222-3333-444455556666",
        "tools": ["Task", "Bash", "Read", "Write"],
        "mcp_servers": [],
        "model": "claude-sonnet-4-5-20250929",
        "permissionMode": "bypassPermissions",
        "apiKeySource": "none",
        "claude_code_version": "2.0.14",
    }
)


def assistant(
    content: list[dict[str, object]] | str, parent: str | None = None, **extra: Any
) -> bytes:
    message = {
        "type": "assistant",
        "message": {
            "id": "msg_01",
            "type": "message",
            "role": "assistant",
            "model": extra.pop("model", "claude-sonnet-4-5-20250929"),
            "content": content,
            "stop_reason": None,
            "usage": {"input_tokens": 3, "output_tokens": 9},
        },
        "parent_tool_use_id": parent,
        "session_id": "s",
        **extra,
    }
    return j(message)


def tool_use(tool_id: str, name: str, tool_input: dict[str, object]) -> dict[str, object]:
    return {"type": "tool_use", "id": tool_id, "name": name, "input": tool_input}


def tool_result(tool_id: str, is_error: bool | None = None) -> bytes:
    block: dict[str, object] = {"tool_use_id": tool_id, "type": "tool_result", "content": "ok"}
    if is_error is not None:
        block["is_error"] = is_error
    return j({"type": "user", "message": {"role": "user", "content": [block]}, "session_id": "s"})


def result(**overrides: object) -> bytes:
    message = {
        "type": "result",
        "subtype": "success",
        "is_error": False,
        "duration_ms": 12345,
        "duration_api_ms": 11000,
        "num_turns": 6,
        "result": "Implemented the login page.",
        "session_id": "s",
        "total_cost_usd": 0.2481,
        "usage": {
            "input_tokens": 41,
            "cache_creation_input_tokens": 6230,
            "cache_read_input_tokens": 98011,
            "output_tokens": 2213,
            "service_tier": "standard",
        },
        "permission_denials": [],
    }
    message.update(overrides)
    return j(message)


TASK_ID = "toolu_01A09q90qw90lq917835lq9"
TASK_ID_2 = "toolu_01B8Hxq6RkL1"


def feed_all(parser: StreamJsonParser, lines: list[bytes]) -> list[object]:
    out: list[object] = []
    for line in lines:
        out += parser.feed(line + b"\n")
    return out


def test_a_realistic_run_with_a_sub_agent() -> None:
    parser = StreamJsonParser(now=lambda: NOW)
    events = feed_all(
        parser,
        [
            INIT,
            assistant([{"type": "text", "text": "I'll start by exploring the code."}]),
            assistant(
                [
                    tool_use(
                        TASK_ID,
                        "Task",
                        {
                            "description": "Write tests",
                            "prompt": "Write the tests for login",
                            "subagent_type": "eng-qa",
                            "model": "haiku",
                        },
                    )
                ]
            ),
            assistant([tool_use("toolu_01Sub", "Bash", {"command": "pytest -q"})], parent=TASK_ID),
            tool_result("toolu_01Sub"),
            assistant([{"type": "text", "text": "Tests written."}], parent=TASK_ID),
            tool_result(TASK_ID),
            result(),
        ],
    )
    assert events == [
        SystemInit(
            "8f7c5e0a-1111-2222-3333-444455556666",
            "claude-sonnet-4-5-20250929",
            "/srv/project",
            ("Task", "Bash", "Read", "Write"),
            "2.0.14",
            "bypassPermissions",
        ),
        AssistantText("I'll start by exploring the code."),
        ToolUse(TASK_ID, "Task", "Write tests"),
        SubAgentSpawned(TASK_ID, "Write tests", "eng-qa", "haiku", False, None),
        ToolUse("toolu_01Sub", "Bash", "pytest -q", TASK_ID),
        ToolResult("toolu_01Sub", False),
        AssistantText("Tests written.", TASK_ID),
        SubAgentCompleted(TASK_ID, False),
        Result(
            "success",
            False,
            0.2481,
            12345,
            6,
            Usage(41, 2213, 98011, 6230),
            "Implemented the login page.",
            "s",
        ),
    ]
    outcome = parser.finish()
    assert outcome.result is not None and outcome.open_subagents == ()
    assert outcome.summary == "success result (success, $0.2481, 6 turns)"
    assert outcome.failure(0, "").ok
    assert parser.statistics().events == len(events)


def test_agent_tool_name_of_claude_code_2_1_63_spawns_too() -> None:
    parser = StreamJsonParser()
    events = feed_all(parser, [assistant([tool_use(TASK_ID, "Agent", {"description": "Plan"})])])
    assert SubAgentSpawned(TASK_ID, "Plan", "general-purpose") in events


def test_sub_agent_ids_are_the_full_tool_ids_not_a_shared_prefix() -> None:
    # The older runner used tool_id[:8], which is "toolu_01" for every Claude tool id.
    parser = StreamJsonParser()
    events = feed_all(
        parser,
        [
            assistant([tool_use(TASK_ID, "Task", {"description": "a"})]),
            assistant([tool_use(TASK_ID_2, "Task", {"description": "b"})]),
            tool_result(TASK_ID_2, is_error=True),
        ],
    )
    spawned = [e.tool_use_id for e in events if isinstance(e, SubAgentSpawned)]
    assert spawned == [TASK_ID, TASK_ID_2]
    assert SubAgentCompleted(TASK_ID_2, True) in events
    assert parser.finish().open_subagents == (TASK_ID,)


def test_result_closes_open_sub_agents_implicitly() -> None:
    parser = StreamJsonParser()
    events = feed_all(
        parser,
        [
            assistant(
                [tool_use(TASK_ID, "Task", {"description": "bg", "run_in_background": True})]
            ),
            tool_result(TASK_ID),  # the launch acknowledgement of a background agent
            result(is_error=True, subtype="error_during_execution"),
        ],
    )
    completions = [e for e in events if isinstance(e, SubAgentCompleted)]
    assert completions == [SubAgentCompleted(TASK_ID, True, implicit=True)]
    assert events[1] == SubAgentSpawned(TASK_ID, "bg", "general-purpose", background=True)


def test_legacy_cost_field_and_string_content() -> None:
    parser = StreamJsonParser()
    events = feed_all(
        parser,
        [
            assistant("plain string content"),
            j({"type": "result", "subtype": "success", "cost_usd": 0.5, "result": "ok"}),
        ],
    )
    assert events[0] == AssistantText("plain string content")
    assert isinstance(events[1], Result) and events[1].cost_usd == 0.5
    assert events[1].usage == Usage() and events[1].num_turns is None


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b'{"type":"assistant","message":{"content":[{"type":"text","text":"trunc', "not JSON"),
        (b"Error: something printed on stdout", "not JSON"),
        (b"\xff\xfe garbage \xc3\x28", "invalid UTF-8"),
        (b"[1, 2, 3]", "not a JSON object"),
        (b'"just a string"', "not a JSON object"),
        (b'{"no_type": true}', "no message type"),
        (b'{"type": 7}', "no message type"),
        (b"[" * 100_000 + b"]" * 100_000, "JSON nested too deeply"),
        (b'{"x": 1' + b"0" * 5000 + b"}", "not JSON"),  # int longer than Python converts
    ],
)
def test_malformed_lines_become_records_never_exceptions(line: bytes, reason: str) -> None:
    parser = StreamJsonParser()
    events = parser.feed(line)
    assert len(events) == 1 and isinstance(events[0], Malformed)
    assert events[0].reason == reason
    assert len(events[0].excerpt) <= 200 and events[0].line == 1
    assert parser.feed(result()) != []  # the parser keeps going
    assert parser.finish().malformed == 1


def test_wrong_field_types_read_as_absent() -> None:
    parser = StreamJsonParser()
    events = feed_all(
        parser,
        [
            j({"type": "assistant", "message": "not an object"}),
            j(
                {
                    "type": "assistant",
                    "message": {"content": [1, None, {"type": "text", "text": 5}]},
                }
            ),
            j({"type": "user", "message": {"content": "text, not blocks"}}),
            j({"type": "system", "subtype": "init", "tools": "Bash", "model": 3}),
            j(
                {
                    "type": "result",
                    "total_cost_usd": float("nan"),
                    "num_turns": -1,
                    "duration_ms": True,
                    "usage": [],
                    "is_error": "yes",
                }
            ),
            j({"type": "assistant", "message": {"content": [{"type": "tool_use", "input": []}]}}),
        ],
    )
    assert events[0] == SystemInit(None, None, None, (), None, None)
    res = events[1]
    assert isinstance(res, Result)
    assert (res.cost_usd, res.num_turns, res.duration_ms, res.is_error) == (None, None, None, False)
    assert events[2] == ToolUse("", "?", "")
    assert parser.finish().malformed == 0


def test_huge_line_is_dropped_and_reported_with_its_bound() -> None:
    parser = StreamJsonParser(max_line_bytes=1024)
    big = assistant([{"type": "text", "text": "x" * 5000}])
    events = parser.feed(big)
    assert events == [Malformed(events[0].excerpt, "line longer than 1024 bytes; dropped", 1)]  # type: ignore[union-attr]
    assert parser.feed(assistant([{"type": "text", "text": "small"}])) == [AssistantText("small")]


def test_malformed_reports_are_bounded_but_counted() -> None:
    parser = StreamJsonParser()
    reported = sum(len(parser.feed(b"garbage")) for _ in range(100))
    assert reported == MAX_MALFORMED_REPORTS
    assert parser.finish().malformed == 100


def test_unknown_and_unused_types_are_ignored_and_counted() -> None:
    parser = StreamJsonParser()
    lines = [
        j({"type": "stream_event", "event": {"type": "content_block_delta"}}),
        j({"type": "hook_event", "name": "PreToolUse"}),
        j({"type": "system", "subtype": "compact_boundary"}),
        j({"type": "rate_limit_event", "rate_limit_info": {"status": "allowed", "resetsAt": 1}}),
        j({"type": "a_type_from_the_future", "x": 1}),
        b"",
        b"   \r",
    ]
    assert feed_all(parser, lines) == []
    stats = parser.statistics()
    assert (stats.ignored, stats.malformed, stats.lines) == (5, 0, 7)


def test_exit_without_result_is_reported() -> None:
    parser = StreamJsonParser()
    feed_all(parser, [INIT, assistant([tool_use(TASK_ID, "Task", {"description": "x"})])])
    outcome = parser.finish()
    assert outcome.missing_result
    assert outcome.summary == "exited without a result"
    assert outcome.open_subagents == (TASK_ID,)
    verdict = outcome.failure(0, "")
    assert (verdict.kind, verdict.code, verdict.reason) == (
        FailureKind.TRANSIENT,
        "no_result",
        "exited without a result",
    )


def test_rejected_rate_limit_event_gives_the_reset_time() -> None:
    parser = StreamJsonParser()
    line = j(
        {
            "type": "rate_limit_event",
            "rate_limit_info": {
                "status": "rejected",
                "resetsAt": 1774447200,
                "rateLimitType": "five_hour",
                "overageStatus": "rejected",
            },
        }
    )
    assert parser.feed(line) == [
        RateLimited(
            datetime.fromtimestamp(1774447200, UTC),
            None,
            "five_hour",
            "five_hour limit reached",
            "rate_limit_event",
        )
    ]


def test_usage_limit_run_yields_one_rate_limit_record_and_a_rate_limit_verdict() -> None:
    parser = StreamJsonParser(now=lambda: NOW)
    notice = "Claude AI usage limit reached|1795000000"
    events = feed_all(
        parser,
        [
            INIT,
            j(
                {
                    "type": "rate_limit_event",
                    "rate_limit_info": {"status": "rejected", "rateLimitType": "seven_day"},
                }
            ),
            assistant([{"type": "text", "text": notice}], model="<synthetic>", error="rate_limit"),
            result(is_error=True, result=notice, total_cost_usd=0),
        ],
    )
    limits = [e for e in events if isinstance(e, RateLimited)]
    assert len(limits) == 1 and limits[0].source == "rate_limit_event"
    outcome = parser.finish()
    assert outcome.rate_limit is not None
    assert outcome.rate_limit.reset_at == datetime.fromtimestamp(1795000000, UTC)  # refined
    verdict = outcome.failure(1, "", now=NOW)
    assert verdict.kind is FailureKind.RATE_LIMIT
    assert verdict.reset_at == datetime.fromtimestamp(1795000000, UTC)


def test_usage_limit_result_is_no_success_even_if_it_says_so() -> None:
    parser = StreamJsonParser()
    events = parser.feed(result(result="Claude AI usage limit reached|1795000000"))
    assert isinstance(events[0], Result) and events[0].is_error
    assert isinstance(events[1], RateLimited)
    assert parser.finish().failure(0, "").kind is FailureKind.RATE_LIMIT


def test_prose_about_rate_limits_is_not_a_rate_limit() -> None:
    parser = StreamJsonParser()
    text = "I added a 429 Too Many Requests response when the rate limit is exceeded."
    events = feed_all(parser, [assistant([{"type": "text", "text": text}]), result(result=text)])
    assert not any(isinstance(e, RateLimited) for e in events)
    assert parser.finish().failure(0, "").ok


def test_api_error_message_makes_a_permanent_verdict() -> None:
    parser = StreamJsonParser()
    events = feed_all(
        parser,
        [
            assistant(
                [{"type": "text", "text": "Invalid API key · Please run /login"}],
                model="<synthetic>",
                error="authentication_failed",
            ),
            result(is_error=True, result="Invalid API key · Please run /login", total_cost_usd=0),
        ],
    )
    assert ApiError("authentication_failed", "Invalid API key · Please run /login") in events
    verdict = parser.finish().failure(1, "")
    assert (verdict.kind, verdict.code) == (FailureKind.PERMANENT, "auth")


def test_synthetic_error_without_error_field_is_an_api_error() -> None:
    parser = StreamJsonParser()
    text = (
        'API Error: 529 {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}'
    )
    events = parser.feed(assistant([{"type": "text", "text": text}], model="<synthetic>"))
    assert events[-1] == ApiError("synthetic", text)
    assert parser.finish().failure(1, "").code == "overloaded"


def test_tool_input_summaries() -> None:
    assert summarize_tool_input("Bash", {"command": "npm test\n  --ci"}) == "npm test --ci"
    assert summarize_tool_input("Write", {"file_path": "/a/b.py", "content": "x"}) == "/a/b.py"
    assert summarize_tool_input("TodoWrite", {"todos": [{}, {}]}) == "2 todos"
    assert summarize_tool_input("Custom", {"n": 1}) == '{"n":1}'
    assert len(summarize_tool_input("Bash", {"command": "y" * 1000})) == 200


KEYS = st.sampled_from(
    [
        "type",
        "subtype",
        "message",
        "content",
        "text",
        "name",
        "id",
        "input",
        "tool_use_id",
        "is_error",
        "result",
        "usage",
        "total_cost_usd",
        "rate_limit_info",
        "status",
        "resetsAt",
        "model",
        "error",
        "parent_tool_use_id",
        "tools",
        "run_in_background",
    ]
)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(["text", "tool_use", "tool_result", "Task", "Agent", "rejected", "init"])
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=4),
    max_leaves=12,
)
TYPES = st.sampled_from(["assistant", "user", "result", "system", "rate_limit_event", "x"])


@given(st.lists(st.binary(max_size=200), max_size=10))
@settings(max_examples=200, deadline=None)
def test_fuzz_bytes_never_raise(lines: list[bytes]) -> None:
    parser = StreamJsonParser()
    for line in lines:
        for event in parser.feed(line):
            assert to_event(event) is None or isinstance(to_event(event).type, str)  # type: ignore[union-attr]
    parser.finish().failure(0, "")


@given(st.lists(st.tuples(TYPES, JSON), max_size=6))
@settings(max_examples=150, deadline=None)
def test_fuzz_json_shapes_never_raise(messages: list[tuple[str, object]]) -> None:
    parser = StreamJsonParser()
    for kind, body in messages:
        obj = dict(body) if isinstance(body, dict) else {"message": body}
        obj["type"] = kind
        try:
            line = json.dumps(obj).encode()
        except ValueError:
            continue
        parser.feed(line)
    outcome = parser.finish()
    outcome.failure(1, "")
    assert outcome.malformed == 0  # valid objects with a type are read, never "malformed"


# -- the text parser -------------------------------------------------------------------


def test_text_parser_reports_lines_and_empty_output() -> None:
    parser = TextOutputParser()
    assert parser.feed(b"Applied edit to app.py\n") == [AssistantText("Applied edit to app.py")]
    assert parser.feed(b"\n") == []
    outcome = parser.finish()
    assert not outcome.missing_result and outcome.failure(0, "").ok
    assert outcome.summary == "2 lines of output"
    silent = TextOutputParser().finish()
    assert silent.summary == "no output"
    assert silent.failure(0, "").code == "empty_output"


def test_text_parser_classifies_its_own_tail() -> None:
    parser = TextOutputParser()
    for line in [
        b"Thinking...",
        b"litellm.AuthenticationError: AnthropicException - invalid x-api-key",
    ]:
        parser.feed(line)
    assert parser.finish().failure(1, "").code == "auth"


def test_parser_for() -> None:
    assert isinstance(parser_for("stream-json"), StreamJsonParser)
    assert isinstance(parser_for("text"), TextOutputParser)
    with pytest.raises(ValueError):
        parser_for("xml")  # type: ignore[arg-type]


# -- failure classification on real-world messages -------------------------------------

PERMANENT_SAMPLES = [
    ("auth", "Invalid API key · Please run /login"),
    (
        "auth",
        'API Error: 401 {"type":"error","error":{"type":"authentication_error",'
        '"message":"invalid x-api-key"},"request_id":"req_011CSHCYzBstm5tDEsXB7mev"}',
    ),
    ("auth", "OAuth token has expired. Please obtain a new token or refresh your existing token."),
    (
        "auth",
        "Error: Could not resolve authentication method. "
        "Expected either apiKey or authToken to be set.",
    ),
    ("auth", "ERROR: unexpected status 401 Unauthorized: Missing bearer or basic authentication"),
    ("auth", "When using Gemini API, you must specify the GEMINI_API_KEY environment variable."),
    ("auth", "[API Error: API key not valid. Please pass a valid API key.]"),
    ("auth", "openai.AuthenticationError: Error code: 401 - Incorrect API key provided: sk-abc***"),
    (
        "unknown_model",
        "There's an issue with the selected model (claude-fable-9). It may not exist or you may "
        "not have access to it. Run --model to pick a different model.",
    ),
    (
        "unknown_model",
        'API Error: 404 {"type":"error","error":{"type":"not_found_error",'
        '"message":"model: claude-nope"}}',
    ),
    ("unknown_model", "The model `gpt-9-turbo` does not exist or you do not have access to it."),
    (
        "unknown_model",
        "[API Error: models/gemini-9.0-pro is not found for API version v1beta, "
        "or is not supported]",
    ),
    ("unknown_model", "Error: Unknown model: sonet"),
    (
        "billing",
        'API Error: 400 {"type":"error","error":{"type":"invalid_request_error","message":'
        '"Your credit balance is too low to access the Anthropic API."}}',
    ),
    (
        "billing",
        "Error code: 429 - {'error': {'message': 'You exceeded your current quota, please check "
        "your plan and billing details.', 'type': 'insufficient_quota', "
        "'code': 'insufficient_quota'}}",
    ),
    ("billing", "Quota exceeded. Check your plan and billing details."),
    (
        "permission",
        'API Error: 403 {"type":"error","error":{"type":"permission_error","message":"Your API key '
        'does not have permission to use the specified resource."}}',
    ),
    ("permission", '{"error": {"code": 403, "status": "PERMISSION_DENIED"}}'),
]


@pytest.mark.parametrize(("code", "stderr"), PERMANENT_SAMPLES)
def test_permanent_failures(code: str, stderr: str) -> None:
    verdict = classify(1, "npm WARN something\n" + stderr + "\n", None, now=NOW)
    assert (verdict.kind, verdict.code) == (FailureKind.PERMANENT, code)
    assert not verdict.retryable
    assert retry_delay(verdict, 1, rng=random.Random(1), now=NOW) is None
    assert verdict.reason in stderr.replace("\n", " ") or verdict.reason.endswith("…")


def test_exec_failures_are_permanent() -> None:
    assert classify(127, "", None).code == "cli_missing"
    assert classify(126, "", None).code == "permission"


def at(tz: str, *args: int) -> datetime:
    return datetime(*args, tzinfo=ZoneInfo(tz)).astimezone(UTC)  # type: ignore[misc,arg-type]


RATE_SAMPLES = [
    ("Claude AI usage limit reached|1753113600", datetime.fromtimestamp(1753113600, UTC), None),
    ("Claude AI usage limit reached|1753113600000", datetime.fromtimestamp(1753113600, UTC), None),
    # 22:00 in Berlin: "1am" (no zone named) is tomorrow, in Berlin
    ("5-hour limit reached \u2219 resets 1am", at("Europe/Berlin", 2026, 11, 29, 1, 0), None),
    (
        "Claude usage limit reached. Your limit will reset at 12pm (America/New_York).",
        at("America/New_York", 2026, 11, 29, 12, 0),
        None,
    ),
    (
        "Claude usage limit reached. Your limit will reset at 11:30pm (America/Los_Angeles).",
        at("America/Los_Angeles", 2026, 11, 28, 23, 30),
        None,
    ),
    (
        "You've hit your limit \u00b7 resets Dec 5 at 9pm (America/New_York)",
        at("America/New_York", 2026, 12, 5, 21, 0),
        None,
    ),
    (  # a date long past this year is next year's
        "You've hit your limit - resets Feb 7, 11am (Asia/Seoul)/login to switch",
        at("Asia/Seoul", 2027, 2, 7, 11, 0),
        None,
    ),
    (
        "Claude usage limit reached. Your limit will reset at Dec 6, 10am.",
        at("Europe/Berlin", 2026, 12, 6, 10, 0),
        None,
    ),
    (
        "You\u2019ve hit your limit for Claude messages. Limits will reset at 9:30 AM.",
        at("Europe/Berlin", 2026, 11, 29, 9, 30),
        None,
    ),
    (
        "\u25a0 You've hit your usage limit. Upgrade to Pro (https://openai.com/chatgpt/pricing) "
        "or try again in 5 days 22 hours 11\nminutes.",
        None,
        5 * 86400 + 22 * 3600 + 11 * 60,
    ),
    (
        "You've hit your usage limit. Upgrade to Plus to continue using Codex "
        "(https://chatgpt.com/explore/plus), or try again at Dec 25th, 2026 8:19 PM.",
        at("Europe/Berlin", 2026, 12, 25, 20, 19),
        None,
    ),
    (
        "stream error: exceeded retry limit, last status: 429 Too Many Requests, request id: 9a1f",
        None,
        None,
    ),
    (
        '[API Error: got status: 429 Too Many Requests. {"error":{"code":429,"message":"Resource '
        'has been exhausted (e.g. check quota).","status":"RESOURCE_EXHAUSTED"}}]',
        None,
        None,
    ),
    (
        "You exceeded your current quota, please check your plan and billing details. "
        'status: RESOURCE_EXHAUSTED. Please retry in 38.02s. "retryDelay": "38s"',
        None,
        38.0,
    ),
    (
        'litellm.RateLimitError: AnthropicException - {"type":"error","error":'
        '{"type":"rate_limit_error","message":"This request would exceed the rate limit"}}\n'
        "Retrying in 0.2 seconds...",
        None,
        None,
    ),
    (
        "Rate limit reached for gpt-4o in organization org-x on tokens per min (TPM): "
        "Limit 30000, Used 29000, Requested 2000. Please try again in 1m12.5s.",
        None,
        72.5,
    ),
    ("HTTP 429 Too Many Requests\nRetry-After: 30", None, 30.0),
    (
        '{"error":{"type":"usage_limit_reached","message":"The usage limit has been reached",'
        '"plan_type":"free","resets_at":1775317531,"resets_in_seconds":602705}}',
        None,
        602705.0,
    ),
    (
        '{"error":{"type":"usage_limit_reached","resets_at":1775317531}}',
        datetime.fromtimestamp(1775317531, UTC),
        None,
    ),
    (
        "429: rate limit exceeded, resets at 2026-11-29T03:00:00Z",
        datetime(2026, 11, 29, 3, tzinfo=UTC),
        None,
    ),
    (
        "rate limit exceeded; resets at 2026-11-29 03:00",
        at("Europe/Berlin", 2026, 11, 29, 3, 0),
        None,
    ),
]


@pytest.mark.parametrize(("stderr", "reset_at", "retry_after"), RATE_SAMPLES)
def test_rate_limits_and_their_reset_times(
    stderr: str, reset_at: datetime | None, retry_after: float | None
) -> None:
    verdict = classify(1, stderr, None, now=NOW)
    assert (verdict.kind, verdict.code) == (FailureKind.RATE_LIMIT, "rate_limit")
    assert verdict.reset_at == reset_at
    assert (
        verdict.retry_after == pytest.approx(retry_after)
        if retry_after
        else verdict.retry_after is None
    )


def test_the_last_reset_hint_wins() -> None:
    reset, delay = parse_reset("retry after 10 seconds ... later: Retry-After: 99", NOW)
    assert (reset, delay) == (None, 99.0)
    reset, delay = parse_reset(
        "try again in 5 minutes; Claude AI usage limit reached|1753113600", NOW
    )
    assert (reset, delay) == (datetime.fromtimestamp(1753113600, UTC), None)
    assert parse_reset("resets 5", NOW) == (None, None)
    assert parse_reset("resets Feb 30 at 1pm", NOW) == (None, None)
    assert parse_reset("resets 4pm (Not/AZone)", NOW)[0] == at("Europe/Berlin", 2026, 11, 29, 16, 0)


TRANSIENT_SAMPLES = [
    (
        "overloaded",
        1,
        'API Error: 529 {"type":"error","error":{"type":"overloaded_error",'
        '"message":"Overloaded"}}',
    ),
    (
        "server_error",
        1,
        'API Error: 500 {"type":"error","error":{"type":"api_error",'
        '"message":"Internal server error"}}',
    ),
    ("server_error", 1, "ERROR: unexpected status 502 Bad Gateway"),
    ("network", 1, "Error: connect ECONNREFUSED 10.0.0.1:443\n    at TCPConnectWrap.afterConnect"),
    ("network", 1, "stream disconnected before completion: error sending request"),
    ("timeout", 1, "Request timed out."),
    ("timeout", 124, ""),
    ("signal", -9, ""),
    ("signal", 137, ""),
    ("exit", 2, "Traceback (most recent call last):\n  File \"x.py\", line 429\nKeyError: 'a'"),
    # an agent's own words about permissions and 401s are not a verdict on the run
    (
        "exit",
        1,
        "bash: ./deploy.sh: Permission denied\nThe API now returns 401 for anonymous users",
    ),
]


@pytest.mark.parametrize(("code", "exit_code", "stderr"), TRANSIENT_SAMPLES)
def test_transient_failures(code: str, exit_code: int, stderr: str) -> None:
    verdict = classify(exit_code, stderr, None, now=NOW)
    assert (verdict.kind, verdict.code, verdict.exit_code) == (
        FailureKind.TRANSIENT,
        code,
        exit_code,
    )
    assert verdict.retryable


def test_exit_reason_names_the_last_stderr_line() -> None:
    verdict = classify(3, "warming up\nfatal: could not lock config\n", None)
    assert verdict.reason == "exit code 3: fatal: could not lock config"
    assert classify(-15, "", None).reason == "interrupted (killed by signal 15)"


def res(**kw: object) -> Result:
    base: dict[str, object] = dict(
        subtype="success",
        is_error=False,
        cost_usd=0.1,
        duration_ms=1,
        num_turns=1,
        usage=Usage(),
        text="",
    )
    base.update(kw)
    return Result(**base)  # type: ignore[arg-type]


def test_success_beats_scary_text() -> None:
    assert classify(0, "Invalid API key\n429 Too Many Requests", res()).ok
    assert classify(0, "", None, output_bytes=10).ok
    assert classify(0, "", None).ok  # unknown output size: trust the exit code


def test_result_text_counts_only_when_the_result_is_an_error() -> None:
    prose = "I rotated the invalid API key handling."
    assert classify(1, "", res(text=prose)).code == "exit"
    assert classify(1, "", res(text=prose, is_error=True)).code == "auth"
    assert classify(0, "", res(is_error=True, subtype="error_max_turns")).code == "error_result"
    verdict = classify(0, "", res(is_error=True, subtype="error_max_budget_usd"))
    assert (verdict.kind, verdict.code) == (FailureKind.PERMANENT, "budget")


def test_structured_rate_limit_without_reset_takes_one_from_the_text() -> None:
    record = RateLimited(None, None, None, "rate limited", "assistant")
    verdict = classify(1, "Please try again in 20s.", None, rate_limit=record, now=NOW)
    assert verdict.kind is FailureKind.RATE_LIMIT and verdict.retry_after == 20.0


def test_timeout_failure() -> None:
    verdict = timeout_failure("idle", 120)
    assert (verdict.kind, verdict.code, verdict.reason) == (
        FailureKind.TRANSIENT,
        "timeout",
        "idle timeout: no output for 120 s",
    )


# -- backoff ---------------------------------------------------------------------------


@given(st.integers(1, 5000), st.integers(0, 2**32))
@settings(max_examples=300, deadline=None)
def test_backoff_is_bounded(attempt: int, seed: int) -> None:
    delay = backoff(attempt, rng=random.Random(seed))
    assert 0.0 <= delay <= min(300.0, 2.0 * 2 ** min(attempt - 1, 20))


def test_backoff_is_exponential_with_full_jitter() -> None:
    rng = random.Random(7)
    means = [
        statistics.fmean(backoff(n, base=1.0, cap=1e9, rng=rng) for _ in range(4000))
        for n in (1, 2, 3, 4)
    ]
    for lower, higher in itertools.pairwise(means):
        assert 1.7 < higher / lower < 2.3  # doubles
    samples = [backoff(6, rng=rng) for _ in range(2000)]
    assert min(samples) < 3 and max(samples) > 60  # full jitter: spread over [0, 64]
    assert backoff(3, rng=random.Random(1)) == backoff(3, rng=random.Random(1))


@pytest.mark.parametrize(
    ("kwargs", "attempt"),
    [({}, 0), ({"base": 0}, 1), ({"cap": -1}, 1), ({"base": float("inf")}, 1)],
)
def test_backoff_rejects_nonsense(kwargs: dict[str, float], attempt: int) -> None:
    with pytest.raises(ValueError):
        backoff(attempt, rng=random.Random(), **kwargs)


def test_retry_delay_per_kind() -> None:
    rng = random.Random(3)
    transient = Failure(FailureKind.TRANSIENT, "exit", "x", 1)
    assert 0 <= retry_delay(transient, 4, rng=rng, now=NOW) <= 16  # type: ignore[operator]
    soon = Failure(FailureKind.RATE_LIMIT, "rate_limit", "x", 1, reset_at=NOW + timedelta(hours=2))
    delay = retry_delay(soon, 1, rng=rng, now=NOW)
    assert delay is not None and 7200 + RESET_MARGIN <= delay <= 7200 + RESET_MARGIN + RESET_JITTER
    blind = Failure(FailureKind.RATE_LIMIT, "rate_limit", "x", 1)
    for attempt, floor in [
        (1, RATE_LIMIT_FLOOR),
        (3, 4 * RATE_LIMIT_FLOOR),
        (30, RATE_LIMIT_FLOOR_CAP),
    ]:
        delay = retry_delay(blind, attempt, rng=rng, now=NOW)
        assert delay is not None and floor <= delay <= floor + RESET_JITTER
    # a stale "resets at" in the past must not make a busy loop
    stale = Failure(FailureKind.RATE_LIMIT, "rate_limit", "x", 1, reset_at=NOW - timedelta(hours=5))
    assert stale.wait_hint(NOW) == RESET_MARGIN
    assert retry_delay(stale, 2, rng=rng, now=NOW) >= 2 * RATE_LIMIT_FLOOR  # type: ignore[operator]
    assert retry_delay(Failure(FailureKind.OK, "ok", "", 0), 1, rng=rng, now=NOW) is None


# -- events ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("record", "event_type"),
    [
        (SubAgentSpawned(TASK_ID, "d", "eng-qa"), "agent.spawned"),
        (SubAgentCompleted(TASK_ID, False), "agent.completed"),
        (SubAgentCompleted(TASK_ID, True, implicit=True), "agent.failed"),
        (AssistantText("hi"), "agent.output"),
        (ToolUse("t", "Bash", "ls"), "agent.output"),
        (res(), "log"),
        (RateLimited(datetime.fromtimestamp(0, UTC), None, None, "m", "text"), "warning"),
        (ApiError("synthetic", "x"), "warning"),
        (Malformed("x", "not JSON", 3), "warning"),
        (SystemInit("s", "m", None, (), None, None), "log"),
    ],
)
def test_records_map_to_publishable_events(record: object, event_type: str) -> None:
    spec = to_event(record)  # type: ignore[arg-type]
    assert spec is not None and spec.type == event_type
    check_publishable(spec.type, spec.data)


def test_event_payloads() -> None:
    spawned = to_event(SubAgentSpawned(TASK_ID, "Write tests", "eng-qa", "haiku"))
    assert spawned is not None and spawned.data["agentId"] == TASK_ID
    assert spawned.data["kind"] == "subagent" and spawned.data["agentType"] == "eng-qa"
    limited = to_event(
        RateLimited(datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), 5.0, None, "m", "text")
    )
    assert limited is not None and limited.data["resetAt"] == "2026-01-02T03:04:05Z"
    long = to_event(AssistantText("z" * 5000))
    assert long is not None and len(long.data["text"]) == 2000
    assert to_event(ToolResult("t", False)) is None


def test_an_error_result_is_never_logged_as_success() -> None:
    usage_limit = to_event(res(is_error=True, text="Claude AI usage limit reached|1753113600"))
    assert usage_limit is not None and usage_limit.data["message"] == "agent result: error"
    assert usage_limit.data["isError"] is True
    failed = to_event(res(is_error=True, subtype="error_during_execution"))
    assert failed is not None and failed.data["message"] == "agent result: error_during_execution"
    done = to_event(res())
    assert done is not None and done.data["message"] == "agent result: success"


def test_a_spawn_failure_is_judged_by_what_failed() -> None:
    """Every OSError of a spawn was a permanent `cli_missing`: out of descriptors failed
    the session for good, and so did a deleted project folder, both blaming the CLI."""
    emfile = spawn_failure(OSError(errno.EMFILE, "Too many open files"), "claude", "/p")
    assert (emfile.kind, emfile.code) == (FailureKind.TRANSIENT, "spawn_failed")
    assert emfile.reason == "cannot start claude: Too many open files"
    for number in (errno.ENFILE, errno.ENOMEM, errno.EAGAIN):
        assert spawn_failure(OSError(number, "x"), "claude", "/p").code == "spawn_failed"
    gone = spawn_failure(FileNotFoundError(errno.ENOENT, "No such file", "/p"), "claude", "/p")
    assert (gone.kind, gone.code) == (FailureKind.PERMANENT, "workdir_missing")
    assert gone.reason == "cannot start claude: its working folder /p is gone (No such file)"
    shut = spawn_failure(PermissionError(errno.EACCES, "Permission denied", "/p"), "claude", "/p")
    assert (shut.kind, shut.code) == (FailureKind.PERMANENT, "permission")
    assert "working folder /p" in shut.reason
    for number in (errno.ENOENT, errno.EACCES, errno.ENOEXEC):
        cli = spawn_failure(OSError(number, "no", "claude"), "claude", "/p")
        assert (cli.kind, cli.code) == (FailureKind.PERMANENT, "cli_missing")
