"""Provider output, line by line, into `AgentEvent` records. Sans-I/O.

Rules:

* The caller reads the agent's stdout in chunks, cuts it into lines with a
  `LineSplitter`, and feeds each line to the parser for the command's
  `output_format`: `StreamJsonParser` (Claude Code's `--output-format
  stream-json`) or `TextOutputParser` (every other provider). `feed`
  returns the records the line produced; at exit, `finish()` returns the
  `Outcome`, and `Outcome.failure(exit_code, stderr_tail)` the verdict.
* Nothing the agent prints raises. Garbage, truncated JSON, invalid UTF-8,
  JSON that is not an object, absurd nesting, NaN costs, wrong field types:
  each becomes a `Malformed` record (the first `MAX_MALFORMED_REPORTS` of a
  run; later ones are only counted) or is read as "absent".
* Bounds: a line longer than `max_line_bytes` (default `MAX_LINE_BYTES`,
  1 MiB) is dropped and reported as `Malformed` — the splitter keeps at most
  that much of one line in memory. At most `MAX_OPEN_SUBAGENTS` sub-agents
  are tracked; the tails kept for classification are `TAIL_BYTES` each.
* Claude stream-json, what is read: `system`/`init` → `SystemInit`;
  `assistant` text blocks → `AssistantText`, `tool_use` blocks → `ToolUse`,
  and for the sub-agent tools (`Task`, renamed `Agent` in Claude Code
  2.1.63) also `SubAgentSpawned`; `user` `tool_result` blocks →
  `SubAgentCompleted` for an open sub-agent, else `ToolResult`; `result` →
  `Result` (after closing still-open sub-agents, `implicit=True`);
  `rate_limit_event` with `status: "rejected"` → `RateLimited`. An
  assistant message with an `error` field, or from the `<synthetic>` model
  (Claude Code's own error notices), → `RateLimited` or `ApiError`. Only the
  first `RateLimited` of a run is returned (later ones refine the outcome).
  Every other type (`stream_event`, `hook_event`, other `system` subtypes,
  types added later) is counted and ignored.
* A background sub-agent (`run_in_background`) acknowledges its launch with
  a `tool_result` at once; it stays open until the run's result.
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Literal, Protocol, TypeAlias

import attrs

from lokid.providers._classify import (
    Failure,
    classify,
    is_rate_limit_text,
    rate_limited_from_text,
)
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

OutputFormat: TypeAlias = Literal["stream-json", "text"]

MAX_LINE_BYTES = 1024 * 1024
MAX_MALFORMED_REPORTS = 20
MAX_OPEN_SUBAGENTS = 1024
TAIL_BYTES = 16 * 1024
EXCERPT_CHARS = 200
SUMMARY_CHARS = 200
SUBAGENT_TOOLS = frozenset({"Task", "Agent"})
SYNTHETIC_MODEL = "<synthetic>"
# Claude Code's usage-limit notice is "Claude AI usage limit reached|<epoch seconds>".
USAGE_LIMIT_MARK = "limit reached|"

Clock: TypeAlias = Callable[[], datetime]


def _local_now() -> datetime:
    return datetime.now(UTC).astimezone()


# -- lines and tails ------------------------------------------------------------------


class LineSplitter:
    """Chunks in, complete lines out (without the newline), each at most max+1 bytes.

    A line longer than `max_line_bytes` comes out as its first
    `max_line_bytes + 1` bytes (so a parser sees that it is too long); the
    rest of it is skipped without being stored.
    """

    def __init__(self, max_line_bytes: int = MAX_LINE_BYTES) -> None:
        if max_line_bytes < 1:
            raise ValueError("max_line_bytes must be >= 1")
        self._max = max_line_bytes
        self._buf = bytearray()
        self._over = False
        self.oversized_lines = 0

    def _add(self, data: bytes) -> None:
        if self._over:
            return
        room = self._max + 1 - len(self._buf)
        self._buf += data[:room]
        if len(data) > room or len(self._buf) > self._max:
            self._over = True

    def _take(self) -> bytes:
        line = bytes(self._buf)
        if self._over:
            self.oversized_lines += 1
        self._buf.clear()
        self._over = False
        return line

    def feed(self, chunk: bytes) -> list[bytes]:
        parts = chunk.split(b"\n")
        if len(parts) == 1:
            self._add(chunk)
            return []
        self._add(parts[0])
        lines = [self._take()]
        for part in parts[1:-1]:
            if len(part) > self._max:
                self.oversized_lines += 1
                part = part[: self._max + 1]
            lines.append(part)
        self._add(parts[-1])
        return lines

    def flush(self) -> list[bytes]:
        """The last line when the stream ended without a newline."""
        if not self._buf and not self._over:
            return []
        return [self._take()]


class TailBuffer:
    """The last `max_bytes` of a byte stream (e.g. stderr), for error messages."""

    def __init__(self, max_bytes: int = TAIL_BYTES) -> None:
        self._max = max_bytes
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self.total_bytes = 0

    def feed(self, chunk: bytes) -> None:
        if not chunk:
            return
        self.total_bytes += len(chunk)
        self._chunks.append(chunk[-self._max :])
        self._size += len(self._chunks[-1])
        while self._size - len(self._chunks[0]) >= self._max:
            self._size -= len(self._chunks.popleft())

    def text(self) -> str:
        data = b"".join(self._chunks)[-self._max :]
        if self.total_bytes > len(data):  # cut: start at a line boundary when there is one
            newline = data.find(b"\n")
            if 0 <= newline < len(data) - 1:
                data = data[newline + 1 :]
        return data.decode("utf-8", "replace")


# -- outcome ----------------------------------------------------------------------------


@attrs.frozen
class Outcome:
    """What a finished run produced, as far as its stdout tells."""

    output_format: OutputFormat
    result: Result | None
    rate_limit: RateLimited | None
    api_error: ApiError | None
    lines: int
    output_bytes: int
    malformed: int
    open_subagents: tuple[str, ...]
    tail: str

    @property
    def missing_result(self) -> bool:
        return self.output_format == "stream-json" and self.result is None

    @property
    def summary(self) -> str:
        if self.missing_result:
            return "exited without a result"
        if self.result is not None:
            r = self.result
            cost = f"${r.cost_usd:.4f}" if r.cost_usd is not None else "cost unknown"
            turns = f", {r.num_turns} turns" if r.num_turns is not None else ""
            return f"{'error' if r.is_error else 'success'} result ({r.subtype}, {cost}{turns})"
        if self.output_bytes == 0:
            return "no output"
        return f"{self.lines} lines of output"

    def failure(
        self, exit_code: int, stderr_tail: str = "", *, now: datetime | None = None
    ) -> Failure:
        return classify(
            exit_code,
            stderr_tail,
            self.result,
            expects_result=self.output_format == "stream-json",
            output_tail=self.tail,
            output_bytes=self.output_bytes,
            rate_limit=self.rate_limit,
            api_error=self.api_error,
            now=now,
        )


@attrs.frozen
class ParserStatistics:
    lines: int
    bytes: int
    events: int
    malformed: int
    ignored: int
    open_subagents: int


class OutputParser(Protocol):
    output_format: OutputFormat

    def feed(self, line: bytes) -> list[AgentEvent]: ...

    def finish(self) -> Outcome: ...

    def statistics(self) -> ParserStatistics: ...


# -- helpers -------------------------------------------------------------------------------


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _dict(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _count(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not math.isfinite(value) or value < 0:
        return None
    return int(value)


def _cost(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    cost = float(value)
    return cost if math.isfinite(cost) and cost >= 0 else None


def _epoch(value: Any) -> datetime | None:
    seconds = _count(value)
    if seconds is None:
        return None
    if seconds >= 10**12:  # milliseconds
        seconds //= 1000
    try:
        return datetime.fromtimestamp(seconds, UTC)
    except (OverflowError, OSError, ValueError):
        return None


def _one_line(text: str, limit: int) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _excerpt(line: bytes) -> str:
    return _one_line(line[: EXCERPT_CHARS * 4].decode("utf-8", "replace"), EXCERPT_CHARS)


_SUMMARY_KEYS = (
    "command",
    "file_path",
    "notebook_path",
    "path",
    "pattern",
    "url",
    "query",
    "description",
    "prompt",
)


def summarize_tool_input(name: str, tool_input: Mapping[str, Any]) -> str:
    """One short line saying what a tool call does (`Bash` → its command, ...)."""
    if name == "TodoWrite":
        return f"{len(_list(tool_input.get('todos')))} todos"
    if not tool_input:
        return ""
    for key in _SUMMARY_KEYS:
        value = _str(tool_input.get(key))
        if value:
            return _one_line(value, SUMMARY_CHARS)
    try:
        text = json.dumps(tool_input, ensure_ascii=False, separators=(",", ":"), default=str)
    except (TypeError, ValueError, RecursionError):
        text = ""
    return _one_line(text, SUMMARY_CHARS)


def _usage(value: Any) -> Usage:
    u = _dict(value)
    return Usage(
        input_tokens=_count(u.get("input_tokens")) or 0,
        output_tokens=_count(u.get("output_tokens")) or 0,
        cache_read_tokens=_count(u.get("cache_read_input_tokens")) or 0,
        cache_creation_tokens=_count(u.get("cache_creation_input_tokens")) or 0,
    )


# -- the parsers -------------------------------------------------------------------------------


class _Base:
    output_format: OutputFormat

    def __init__(self, *, max_line_bytes: int = MAX_LINE_BYTES, now: Clock | None = None) -> None:
        self._max = max_line_bytes
        self._now = now or _local_now
        self._lines = 0
        self._bytes = 0
        self._events = 0
        self._malformed = 0
        self._ignored = 0
        self._tail = TailBuffer()
        self._rate_limit: RateLimited | None = None
        self._api_error: ApiError | None = None
        self._open: dict[str, SubAgentSpawned] = {}

    def _report(self, out: list[AgentEvent], line: bytes, reason: str) -> None:
        self._malformed += 1
        if self._malformed <= MAX_MALFORMED_REPORTS:
            out.append(Malformed(_excerpt(line), reason, self._lines))

    def _rate_limited(self, out: list[AgentEvent], record: RateLimited) -> None:
        first = self._rate_limit is None
        if first or (
            self._rate_limit is not None
            and self._rate_limit.reset_at is None
            and (record.reset_at is not None or record.retry_after is not None)
        ):
            self._rate_limit = record
        if first:
            out.append(record)

    def _outcome(self, result: Result | None) -> Outcome:
        return Outcome(
            output_format=self.output_format,
            result=result,
            rate_limit=self._rate_limit,
            api_error=self._api_error,
            lines=self._lines,
            output_bytes=self._bytes,
            malformed=self._malformed,
            open_subagents=tuple(self._open),
            tail=self._tail.text(),
        )

    def statistics(self) -> ParserStatistics:
        return ParserStatistics(
            lines=self._lines,
            bytes=self._bytes,
            events=self._events,
            malformed=self._malformed,
            ignored=self._ignored,
            open_subagents=len(self._open),
        )


class StreamJsonParser(_Base):
    """Claude Code's `--output-format stream-json --verbose` output, one line at a time.

    `now` returns the current aware time; it anchors reset times such as
    "resets 4pm" (default: the local time).
    """

    output_format: OutputFormat = "stream-json"

    def __init__(self, *, max_line_bytes: int = MAX_LINE_BYTES, now: Clock | None = None) -> None:
        super().__init__(max_line_bytes=max_line_bytes, now=now)
        self._result: Result | None = None
        self.results = 0

    def feed(self, line: bytes) -> list[AgentEvent]:
        self._lines += 1
        self._bytes += len(line)
        out: list[AgentEvent] = []
        line = line.rstrip(b"\r\n")
        if len(line) > self._max:
            self._report(out, line, f"line longer than {self._max} bytes; dropped")
            self._events += len(out)
            return out
        stripped = line.strip()
        if not stripped:
            return out
        try:
            # UTF-8 only (RFC 8259): json.loads(bytes) would also guess UTF-16 and -32.
            message = json.loads(stripped.decode("utf-8"))
        except (ValueError, RecursionError) as exc:
            self._tail.feed(stripped + b"\n")
            reason = "invalid UTF-8" if isinstance(exc, UnicodeDecodeError) else "not JSON"
            if isinstance(exc, RecursionError):
                reason = "JSON nested too deeply"
            self._report(out, stripped, reason)
        else:
            try:
                self._dispatch(message, stripped, out)
            except (TypeError, ValueError, AttributeError, KeyError, RecursionError) as exc:
                self._report(out, stripped, f"unexpected structure ({type(exc).__name__})")
        self._events += len(out)
        return out

    def _dispatch(self, message: Any, line: bytes, out: list[AgentEvent]) -> None:
        if not isinstance(message, dict):
            self._report(out, line, "not a JSON object")
            return
        kind = message.get("type")
        if not isinstance(kind, str):
            self._report(out, line, "no message type")
            return
        if kind == "assistant":
            self._assistant(message, out)
        elif kind == "user":
            self._user(message, out)
        elif kind == "result":
            self._result_line(message, out)
        elif kind == "system" and message.get("subtype") == "init":
            out.append(
                SystemInit(
                    session_id=_str(message.get("session_id")),
                    model=_str(message.get("model")),
                    cwd=_str(message.get("cwd")),
                    tools=tuple(t for t in _list(message.get("tools")) if isinstance(t, str)),
                    version=_str(message.get("claude_code_version")),
                    permission_mode=_str(message.get("permissionMode")),
                )
            )
        elif kind == "rate_limit_event":
            info = _dict(message.get("rate_limit_info"))
            if info.get("status") == "rejected":
                limit_type = _str(info.get("rateLimitType"))
                text = f"{limit_type or 'usage'} limit reached"
                record = RateLimited(
                    _epoch(info.get("resetsAt")), None, limit_type, text, "rate_limit_event"
                )
                self._rate_limited(out, record)
            else:
                self._ignored += 1
        else:
            self._ignored += 1

    def _assistant(self, message: Mapping[str, Any], out: list[AgentEvent]) -> None:
        body = _dict(message.get("message"))
        parent = _str(message.get("parent_tool_use_id"))
        content = body.get("content")
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        texts: list[str] = []
        for block in _list(blocks):
            block = _dict(block)
            kind = block.get("type")
            if kind == "text":
                text = _str(block.get("text"))
                if text and text.strip():
                    texts.append(text)
                    out.append(AssistantText(text, parent))
            elif kind == "tool_use":
                self._tool_use(block, parent, out)
        error = _str(message.get("error")) or _str(body.get("error"))
        synthetic = body.get("model") == SYNTHETIC_MODEL
        if not error and not synthetic:
            if texts and USAGE_LIMIT_MARK in texts[-1]:
                self._text_rate_limit(texts[-1], "assistant", out)
            return
        joined = "\n".join(texts)
        if error == "rate_limit" or (not error and is_rate_limit_text(joined)):
            self._text_rate_limit(joined or "rate limited", "assistant", out)
        else:
            record = ApiError(error or "synthetic", joined)
            self._api_error = record
            out.append(record)

    def _text_rate_limit(self, text: str, source: str, out: list[AgentEvent]) -> None:
        record = rate_limited_from_text(text, self._now(), source=source)
        if record is None:
            record = RateLimited(None, None, None, _one_line(text, 300), source)
        self._rate_limited(out, record)

    def _tool_use(
        self, block: Mapping[str, Any], parent: str | None, out: list[AgentEvent]
    ) -> None:
        tool_id = _str(block.get("id")) or ""
        name = _str(block.get("name")) or "?"
        tool_input = _dict(block.get("input"))
        out.append(ToolUse(tool_id, name, summarize_tool_input(name, tool_input), parent))
        if name not in SUBAGENT_TOOLS or not tool_id or tool_id in self._open:
            return
        if len(self._open) >= MAX_OPEN_SUBAGENTS:
            self._ignored += 1
            return
        spawned = SubAgentSpawned(
            tool_use_id=tool_id,
            description=_one_line(_str(tool_input.get("description")) or "", SUMMARY_CHARS),
            subagent_type=_str(tool_input.get("subagent_type")) or "general-purpose",
            model=_str(tool_input.get("model")),
            background=tool_input.get("run_in_background") is True,
            parent_tool_use_id=parent,
        )
        self._open[tool_id] = spawned
        out.append(spawned)

    def _user(self, message: Mapping[str, Any], out: list[AgentEvent]) -> None:
        content = _dict(message.get("message")).get("content")
        for block in _list(content):
            block = _dict(block)
            if block.get("type") != "tool_result":
                continue
            tool_id = _str(block.get("tool_use_id")) or ""
            is_error = block.get("is_error") is True
            spawned = self._open.get(tool_id)
            if spawned is None:
                out.append(ToolResult(tool_id, is_error))
            elif not (spawned.background and not is_error):
                del self._open[tool_id]
                out.append(SubAgentCompleted(tool_id, is_error))

    def _result_line(self, message: Mapping[str, Any], out: list[AgentEvent]) -> None:
        subtype = _str(message.get("subtype")) or "unknown"
        text = _str(message.get("result"))
        if text is None:
            text = "\n".join(e for e in _list(message.get("errors")) if isinstance(e, str))
        # A result whose text is the usage-limit notice is no success, whatever it says.
        is_error = (
            message.get("is_error") is True
            or subtype.startswith("error")
            or (USAGE_LIMIT_MARK in text and is_rate_limit_text(text))
        )
        cost = message.get("total_cost_usd", message.get("cost_usd"))
        result = Result(
            subtype=subtype,
            is_error=is_error,
            cost_usd=_cost(cost),
            duration_ms=_count(message.get("duration_ms")),
            num_turns=_count(message.get("num_turns")),
            usage=_usage(message.get("usage")),
            text=text,
            session_id=_str(message.get("session_id")),
        )
        for tool_id in list(self._open):
            del self._open[tool_id]
            out.append(SubAgentCompleted(tool_id, is_error, implicit=True))
        self._result = result
        self.results += 1
        out.append(result)
        if is_error and is_rate_limit_text(text):
            self._text_rate_limit(text, "result", out)

    def finish(self) -> Outcome:
        """The outcome so far; call once the process exited and every line was fed."""
        return self._outcome(self._result)


class TextOutputParser(_Base):
    """Any other provider: every non-blank line is agent output (`AssistantText`)."""

    output_format: OutputFormat = "text"

    def feed(self, line: bytes) -> list[AgentEvent]:
        self._lines += 1
        self._bytes += len(line)
        out: list[AgentEvent] = []
        line = line.rstrip(b"\r\n")
        if len(line) > self._max:
            self._report(out, line, f"line longer than {self._max} bytes; truncated")
            line = line[: self._max]
        self._tail.feed(line + b"\n")
        text = line.decode("utf-8", "replace")
        if text.strip():
            out.append(AssistantText(text))
        self._events += len(out)
        return out

    def finish(self) -> Outcome:
        return self._outcome(None)


def parser_for(output_format: OutputFormat, *, now: Clock | None = None) -> OutputParser:
    """The parser for an `AgentCommand.output_format`."""
    if output_format == "stream-json":
        return StreamJsonParser(now=now)
    if output_format == "text":
        return TextOutputParser(now=now)
    raise ValueError(f"unknown output format {output_format!r}")
