"""Coding-agent providers: command lines, output parsing, failure classification.

Pure modules — nothing here spawns a process, reads a pipe or sleeps; the
session runner does that and asks these functions what to do:

    command = build_command("claude", prompt, model=None, project_dir=path, options={})
    parser = parser_for(command.output_format)        # StreamJsonParser or TextOutputParser
    splitter = LineSplitter()
    for chunk in stdout_chunks:                       # the runner's trio loop
        for line in splitter.feed(chunk):
            for record in parser.feed(line):
                spec = to_event(record)              # -> agent.spawned, agent.output, ...
    outcome = parser.finish()
    verdict = outcome.failure(exit_code, stderr_tail.text())
    delay = retry_delay(verdict, attempt, rng=rng, now=now)   # None: do not retry

See `docs/providers.md`.
"""

from lokid.providers._classify import (
    RATE_LIMIT_FLOOR,
    RATE_LIMIT_FLOOR_CAP,
    RESET_JITTER,
    RESET_MARGIN,
    Failure,
    FailureKind,
    backoff,
    classify,
    is_rate_limit_text,
    parse_reset,
    retry_delay,
    spawn_failure,
    timeout_failure,
)
from lokid.providers._commands import (
    MAX_ARGV_PROMPT_BYTES,
    MAX_COMMAND_ARG_CHARS,
    MAX_COMMAND_ARGS,
    MAX_COMMAND_TOTAL_CHARS,
    MAX_MODEL_CHARS,
    PROVIDER_INFO,
    PROVIDERS,
    AgentCommand,
    PromptTooLarge,
    ProviderInfo,
    argv_prompt,
    build_command,
    executable,
    missing_cli_message,
    provider_info,
    validate_command,
    validate_model,
    validate_options,
)
from lokid.providers._events import EventSpec, to_event
from lokid.providers._records import (
    AgentEvent,
    ApiError,
    AssistantText,
    Malformed,
    RateLimited,
    Result,
    SubAgentCompleted,
    SubAgentSpawned,
    SystemInit,
    ToolResult,
    ToolUse,
    Usage,
)
from lokid.providers._stream_json import (
    MAX_LINE_BYTES,
    MAX_MALFORMED_REPORTS,
    MAX_OPEN_SUBAGENTS,
    SUBAGENT_TOOLS,
    TAIL_BYTES,
    LineSplitter,
    Outcome,
    OutputFormat,
    OutputParser,
    ParserStatistics,
    StreamJsonParser,
    TailBuffer,
    TextOutputParser,
    parser_for,
    summarize_tool_input,
)

__all__ = [
    "MAX_ARGV_PROMPT_BYTES",
    "MAX_COMMAND_ARGS",
    "MAX_COMMAND_ARG_CHARS",
    "MAX_COMMAND_TOTAL_CHARS",
    "MAX_LINE_BYTES",
    "MAX_MALFORMED_REPORTS",
    "MAX_MODEL_CHARS",
    "MAX_OPEN_SUBAGENTS",
    "PROVIDERS",
    "PROVIDER_INFO",
    "RATE_LIMIT_FLOOR",
    "RATE_LIMIT_FLOOR_CAP",
    "RESET_JITTER",
    "RESET_MARGIN",
    "SUBAGENT_TOOLS",
    "TAIL_BYTES",
    "AgentCommand",
    "AgentEvent",
    "ApiError",
    "AssistantText",
    "EventSpec",
    "Failure",
    "FailureKind",
    "LineSplitter",
    "Malformed",
    "Outcome",
    "OutputFormat",
    "OutputParser",
    "ParserStatistics",
    "PromptTooLarge",
    "ProviderInfo",
    "RateLimited",
    "Result",
    "StreamJsonParser",
    "SubAgentCompleted",
    "SubAgentSpawned",
    "SystemInit",
    "TailBuffer",
    "TextOutputParser",
    "ToolResult",
    "ToolUse",
    "Usage",
    "argv_prompt",
    "backoff",
    "build_command",
    "classify",
    "executable",
    "is_rate_limit_text",
    "missing_cli_message",
    "parse_reset",
    "parser_for",
    "provider_info",
    "retry_delay",
    "spawn_failure",
    "summarize_tool_input",
    "timeout_failure",
    "to_event",
    "validate_command",
    "validate_model",
    "validate_options",
]
