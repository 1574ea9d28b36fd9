"""What a provider run says, as frozen records (`AgentEvent`). Pure: no I/O.

The parsers in `_stream_json` turn output lines into these records; the
classifier in `_classify` reads `Result`, `RateLimited` and `ApiError`; the
runner turns them into lokid events (`_events.to_event`).
"""

from __future__ import annotations

from datetime import datetime
from typing import TypeAlias

import attrs


@attrs.frozen
class SystemInit:
    """Claude's first line (`{"type":"system","subtype":"init",...}`)."""

    session_id: str | None
    model: str | None
    cwd: str | None
    tools: tuple[str, ...]
    version: str | None
    permission_mode: str | None


@attrs.frozen
class AssistantText:
    """A text block of an assistant message, or one line of a text provider's output.

    `parent_tool_use_id` is set when a sub-agent (not the main agent) wrote it.
    """

    text: str
    parent_tool_use_id: str | None = None


@attrs.frozen
class ToolUse:
    """A `tool_use` block; `summary` is one short line (the command, the file, ...)."""

    id: str
    name: str
    summary: str
    parent_tool_use_id: str | None = None


@attrs.frozen
class ToolResult:
    """The `tool_result` of a tool that is not a sub-agent."""

    tool_use_id: str
    is_error: bool


@attrs.frozen
class SubAgentSpawned:
    """A `Task` (Claude Code < 2.1.63) or `Agent` (later) tool use: a sub-agent starts.

    `tool_use_id` is the sub-agent's identity: the full id, never a prefix
    (every Claude tool id starts with `toolu_01`).
    """

    tool_use_id: str
    description: str
    subagent_type: str
    model: str | None = None
    background: bool = False
    parent_tool_use_id: str | None = None


@attrs.frozen
class SubAgentCompleted:
    """The sub-agent's `tool_result` arrived (`implicit`: the run's result closed it)."""

    tool_use_id: str
    is_error: bool
    implicit: bool = False


@attrs.frozen
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_creation_tokens: int = 0


@attrs.frozen
class Result:
    """Claude's last line (`{"type":"result",...}`): cost, turns, success or error."""

    subtype: str
    is_error: bool
    cost_usd: float | None
    duration_ms: int | None
    num_turns: int | None
    usage: Usage
    text: str
    session_id: str | None = None


@attrs.frozen
class RateLimited:
    """The provider refused work because of a rate or usage limit.

    `reset_at` (aware, UTC) when the provider named a time, `retry_after`
    (seconds) when it named a delay; both may be None.
    """

    reset_at: datetime | None
    retry_after: float | None
    limit_type: str | None
    message: str
    source: str  # "rate_limit_event", "assistant", "result" or "text"


@attrs.frozen
class ApiError:
    """An assistant message that reports an API error instead of an answer.

    `error` is Claude's machine-readable kind (`authentication_failed`,
    `billing_error`, `invalid_request`, `server_error`, `unknown`) or
    `synthetic` for an error text in a `<synthetic>` message without one.
    """

    error: str
    text: str


@attrs.frozen
class Malformed:
    """A line that could not be understood; `excerpt` is its start, `line` its number."""

    excerpt: str
    reason: str
    line: int


AgentEvent: TypeAlias = (
    SystemInit
    | AssistantText
    | ToolUse
    | ToolResult
    | SubAgentSpawned
    | SubAgentCompleted
    | Result
    | RateLimited
    | ApiError
    | Malformed
)
