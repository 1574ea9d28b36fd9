"""`AgentEvent` → the lokid event the runner publishes (type, level, data). Pure.

The runner adds what it knows and the records do not: the session id (the
envelope's `sessionId`) and `taskId`, `iteration`, `provider` in `data`.
Sub-agents are agents: `agent.spawned` / `agent.completed` / `agent.failed`
with `agentId` = the full tool-use id and `kind: "subagent"` (the agent
process itself is reported by the runner with `kind: "process"`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from lokid.events import Level
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
)

OUTPUT_CHARS = 2000


@attrs.frozen
class EventSpec:
    type: str
    level: Level
    data: Mapping[str, Any]


def _clip(text: str, limit: int = OUTPUT_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def to_event(record: AgentEvent) -> EventSpec | None:
    """The event for one record; None for records that are not worth one (`ToolResult`)."""
    match record:
        case SubAgentSpawned():
            return EventSpec(
                "agent.spawned",
                Level.INFO,
                {
                    "agentId": record.tool_use_id,
                    "kind": "subagent",
                    "agentType": record.subagent_type,
                    "description": record.description,
                    "model": record.model,
                    "background": record.background,
                    "parentAgentId": record.parent_tool_use_id,
                },
            )
        case SubAgentCompleted():
            return EventSpec(
                "agent.failed" if record.is_error else "agent.completed",
                Level.WARNING if record.is_error else Level.INFO,
                {"agentId": record.tool_use_id, "kind": "subagent", "implicit": record.implicit},
            )
        case AssistantText():
            return EventSpec(
                "agent.output",
                Level.DEBUG,
                {"text": _clip(record.text), "agentId": record.parent_tool_use_id},
            )
        case ToolUse():
            return EventSpec(
                "agent.output",
                Level.DEBUG,
                {
                    "tool": record.name,
                    "input": record.summary,
                    "toolUseId": record.id,
                    "agentId": record.parent_tool_use_id,
                },
            )
        case Result():
            return EventSpec(
                "log",
                Level.WARNING if record.is_error else Level.INFO,
                {
                    # Claude reports a usage limit as subtype "success" with is_error.
                    "message": "agent result: error"
                    if record.is_error and record.subtype == "success"
                    else f"agent result: {record.subtype}",
                    "isError": record.is_error,
                    "costUsd": record.cost_usd,
                    "durationMs": record.duration_ms,
                    "turns": record.num_turns,
                    "inputTokens": record.usage.input_tokens,
                    "outputTokens": record.usage.output_tokens,
                    "cacheReadTokens": record.usage.cache_read_tokens,
                    "cacheCreationTokens": record.usage.cache_creation_tokens,
                },
            )
        case RateLimited():
            return EventSpec(
                "warning",
                Level.WARNING,
                {
                    "reason": "rate_limited",
                    "message": record.message,
                    "resetAt": (
                        record.reset_at.isoformat(timespec="seconds").replace("+00:00", "Z")
                        if record.reset_at is not None
                        else None
                    ),
                    "retryAfterSeconds": record.retry_after,
                    "limitType": record.limit_type,
                },
            )
        case ApiError():
            return EventSpec(
                "warning",
                Level.WARNING,
                {"reason": "api_error", "error": record.error, "message": _clip(record.text, 500)},
            )
        case Malformed():
            return EventSpec(
                "warning",
                Level.WARNING,
                {
                    "reason": "malformed_output",
                    "detail": record.reason,
                    "excerpt": record.excerpt,
                    "line": record.line,
                },
            )
        case SystemInit():
            return EventSpec(
                "log",
                Level.DEBUG,
                {
                    "message": "agent started",
                    "model": record.model,
                    "providerSessionId": record.session_id,
                    "version": record.version,
                },
            )
        case ToolResult():
            return None
