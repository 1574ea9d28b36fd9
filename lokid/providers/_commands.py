"""Provider command lines: what lokid executes for one agent run. Pure: nothing is spawned.

Rules:

* Every provider runs as an argv vector — never through a shell — in the
  project folder, with stdin either the prompt or /dev/null (`stdin is None`
  means: connect /dev/null, never the daemon's own stdin).
* The argv follows `reference/runtime.md` §2.1:
    claude    claude --dangerously-skip-permissions [--model M] -p PROMPT
                     --output-format stream-json --verbose
    codex     codex exec --sandbox workspace-write --skip-git-repo-check [--model M] PROMPT
    gemini    gemini --yolo [--model M] --prompt PROMPT
    aider     aider --message PROMPT --yes-always --no-auto-commits [--model M]
    cline     cline -y [-m M] PROMPT
    opencode  opencode run --auto [--model M] PROMPT
    command   options.command, placeholders {model} and {projectDir} replaced;
              the prompt on stdin
* A prompt that cannot travel safely as one argument goes another way:
  longer than `MAX_ARGV_PROMPT_BYTES` (Linux refuses a single argument over
  128 KiB with E2BIG), or starting with `-` (it would be read as an option).
  claude, codex (`-`) and gemini then read it from stdin; aider reads
  `--message-file /dev/stdin`; cline and opencode get `--` before a
  dash-led prompt, and a too-long prompt raises `PromptTooLarge`. NUL
  characters (impossible in argv) become U+FFFD for every provider.
* Values from the API are validated here, with the field they came from:
  the provider name, `options.model` (one token, no leading dash, bounded)
  and `options.command` (a non-empty list of at most `MAX_COMMAND_ARGS`
  non-empty strings without NUL, each at most `MAX_COMMAND_ARG_CHARS`,
  together at most `MAX_COMMAND_TOTAL_CHARS`; a string is refused because
  it would need a shell to split).
"""

from __future__ import annotations

import re
import shlex
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeAlias

import attrs

from lokid.errors import LokiError, ValidationFailed
from lokid.providers._stream_json import OutputFormat

MAX_ARGV_PROMPT_BYTES = 100_000
MAX_MODEL_CHARS = 200
MAX_COMMAND_ARGS = 64
MAX_COMMAND_ARG_CHARS = 4096
MAX_COMMAND_TOTAL_CHARS = 32 * 1024
PLACEHOLDERS = ("{model}", "{projectDir}")
# Extra environment for every provider: no ANSI colours in captured output.
BASE_ENV: Mapping[str, str] = types.MappingProxyType({"NO_COLOR": "1"})

_RESUME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")  # claude session ids are UUIDs
_MODEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@\[\]+-]*")

PromptRoute: TypeAlias = Literal["argv", "stdin"]


class PromptTooLarge(LokiError):
    """The provider takes the prompt only as one argument, and it is too long for one."""

    code = "VALIDATION_ERROR"


@attrs.frozen
class ProviderInfo:
    name: str
    display_name: str
    cli: str | None  # None: `command`, whose program comes from options.command
    install_hint: str
    output_format: OutputFormat
    has_subagents: bool  # reports sub-agents in its output (Claude's Task/Agent tool)


PROVIDER_INFO: Mapping[str, ProviderInfo] = types.MappingProxyType(
    {
        p.name: p
        for p in (
            ProviderInfo(
                "claude",
                "Claude Code",
                "claude",
                "npm install -g @anthropic-ai/claude-code",
                "stream-json",
                True,
            ),
            ProviderInfo(
                "codex", "OpenAI Codex CLI", "codex", "npm install -g @openai/codex", "text", False
            ),
            ProviderInfo(
                "gemini", "Gemini CLI", "gemini", "npm install -g @google/gemini-cli", "text", False
            ),
            ProviderInfo(
                "aider", "Aider", "aider", "python -m pip install aider-chat", "text", False
            ),
            ProviderInfo("cline", "Cline CLI", "cline", "npm install -g cline", "text", False),
            ProviderInfo(
                "opencode", "OpenCode", "opencode", "npm install -g opencode-ai", "text", False
            ),
            ProviderInfo("command", "Custom command", None, "", "text", False),
        )
    }
)
PROVIDERS: tuple[str, ...] = tuple(PROVIDER_INFO)


@attrs.frozen
class AgentCommand:
    """One agent process to start: argv (no shell), stdin, extra env, cwd, output format."""

    provider: str
    argv: tuple[str, ...]
    stdin: bytes | None
    env: Mapping[str, str]
    cwd: Path
    output_format: OutputFormat
    model: str | None
    prompt_route: PromptRoute

    def display(self) -> str:
        """The command line for logs and events, with a prompt argument elided."""
        shown = [
            f"<prompt: {len(arg)} chars>" if i == self._prompt_index() else arg
            for i, arg in enumerate(self.argv)
        ]
        text = shlex.join(shown)
        return text + (f" < <prompt: {len(self.stdin)} bytes>" if self.stdin is not None else "")

    def _prompt_index(self) -> int | None:
        if self.prompt_route != "argv" or self.provider == "command":
            return None
        if self.provider == "claude":
            return self.argv.index("-p") + 1
        if self.provider == "gemini":
            return self.argv.index("--prompt") + 1
        if self.provider == "aider":
            for i, arg in enumerate(self.argv):
                if arg == "--message":
                    return i + 1
                if arg.startswith("--message="):
                    return i
            return None
        return len(self.argv) - 1


def provider_info(provider: str) -> ProviderInfo:
    info = PROVIDER_INFO.get(provider)
    if info is None:
        raise ValidationFailed(
            f"unknown provider {provider!r}; expected one of {', '.join(PROVIDERS)}",
            field="provider",
            details={"known": list(PROVIDERS)},
        )
    return info


def validate_model(model: Any, *, field: str = "options.model") -> str | None:
    """`None`, or a model name that is safe as one argument (no leading dash, no spaces)."""
    if model is None:
        return None
    if not isinstance(model, str) or not model:
        raise ValidationFailed(f"{field} must be a non-empty string", field=field)
    if len(model) > MAX_MODEL_CHARS or not _MODEL_RE.fullmatch(model):
        raise ValidationFailed(
            f"{field} must be one model name of at most {MAX_MODEL_CHARS} characters "
            "(letters, digits and . _ : / @ [ ] + -, not starting with -)",
            field=field,
        )
    return model


def validate_command(template: Any) -> tuple[str, ...]:
    """`options.command`: the argv template of provider `command`."""
    field = "options.command"
    if isinstance(template, str):
        raise ValidationFailed(
            f"{field} must be a list of strings (an argv), not one string: lokid never "
            'runs a shell; write ["sh", "-c", "..."] if you need one',
            field=field,
        )
    if not isinstance(template, list | tuple) or not template:
        raise ValidationFailed(f"{field} must be a non-empty list of strings", field=field)
    if len(template) > MAX_COMMAND_ARGS:
        raise ValidationFailed(
            f"{field} has {len(template)} items; at most {MAX_COMMAND_ARGS}", field=field
        )
    for i, arg in enumerate(template):
        if not isinstance(arg, str) or not arg:
            raise ValidationFailed(f"{field}[{i}] must be a non-empty string", field=field)
        if "\0" in arg:
            raise ValidationFailed(f"{field}[{i}] contains a NUL character", field=field)
        if len(arg) > MAX_COMMAND_ARG_CHARS:
            raise ValidationFailed(
                f"{field}[{i}] is longer than {MAX_COMMAND_ARG_CHARS} characters", field=field
            )
    if sum(len(a) for a in template) > MAX_COMMAND_TOTAL_CHARS:
        raise ValidationFailed(
            f"{field} is longer than {MAX_COMMAND_TOTAL_CHARS} characters in total", field=field
        )
    if any(p in template[0] for p in PLACEHOLDERS):
        raise ValidationFailed(f"{field}[0] (the program) cannot hold a placeholder", field=field)
    return tuple(template)


def validate_options(
    provider: str, options: Mapping[str, Any], *, model: str | None = None
) -> None:
    """The provider-related checks of `POST /api/sessions` (raises `ValidationFailed`).

    `model`, when given, is the model the run will use instead of `options["model"]`.
    """
    info = provider_info(provider)
    model = validate_model(options.get("model")) if model is None else model
    if options.get("budgetUsd") is not None and info.output_format != "stream-json":
        raise ValidationFailed(
            f"options.budgetUsd needs a provider that reports its cost (claude); "
            f"{provider!r} reports none, so the budget could never stop the session",
            field="options.budgetUsd",
        )
    if provider == "command":
        if "command" not in options:
            raise ValidationFailed(
                "provider 'command' needs options.command (the argv to run)",
                field="options.command",
            )
        template = validate_command(options["command"])
        if model is None and any("{model}" in arg for arg in template):
            raise ValidationFailed(
                "options.command uses {model} but no options.model is set",
                field="options.command",
            )
    elif "command" in options:
        raise ValidationFailed(
            f"options.command is only for provider 'command', not {provider!r}",
            field="options.command",
        )


def executable(
    provider: str, options: Mapping[str, Any], *, project_dir: Path | None = None
) -> str:
    """The program to look up on PATH (or a path to it) before a session starts.

    For `command`, a relative path with a slash (`scripts/agent.sh`) is the
    project folder's, as it is when the process starts there.
    """
    info = provider_info(provider)
    if info.cli is not None:
        return info.cli
    program = validate_command(options.get("command"))[0]
    if "/" in program and not program.startswith("/") and project_dir is not None:
        return str(project_dir / program)
    return program


def missing_cli_message(provider: str, executable: str) -> str:
    """The 422 message when `executable` is not found."""
    info = provider_info(provider)
    if info.cli is None:
        return (
            f"provider {provider!r} runs `{executable}`, which is not an executable file on "
            "the daemon's PATH (options.command[0] must name a program on PATH or a path "
            "to an executable file)"
        )
    return (
        f"provider {provider!r} needs the `{executable}` CLI, which is not on the daemon's "
        f"PATH (install it with `{info.install_hint}`, or add the folder holding it to the "
        "PATH lokid runs with)"
    )


def _fits_argv(prompt: str) -> bool:
    return not prompt.startswith("-") and len(prompt.encode("utf-8")) <= MAX_ARGV_PROMPT_BYTES


def build_command(
    provider: str,
    prompt: str,
    *,
    model: str | None,
    project_dir: Path,
    options: Mapping[str, Any],
    resume: str | None = None,
) -> AgentCommand:
    """The process to start for one agent run of `provider` on `prompt`.

    `model` wins over `options["model"]`; without either the CLI's own
    default model is used (no `--model`). `project_dir` must be absolute.
    `resume`: the provider's own session id of a run that was cut off
    (daemon restart); claude continues it with `--resume <id>`, the other
    providers have no such flag and start afresh.
    """
    info = provider_info(provider)
    if model is not None:
        validate_model(model, field="model")
    validate_options(provider, options, model=model)
    model = model if model is not None else options.get("model")
    if not project_dir.is_absolute():
        raise ValidationFailed(
            f"the project folder must be an absolute path, got {str(project_dir)!r}",
            field="projectDir",
        )
    prompt = prompt.replace("\0", "\ufffd")
    data = prompt.encode("utf-8")
    fits = _fits_argv(prompt)
    stdin: bytes | None = None
    argv: list[str]

    def model_args(flag: str = "--model") -> list[str]:
        return [flag, model] if model else []

    if provider == "claude":
        resume_args = ["--resume", resume] if resume and _RESUME_RE.fullmatch(resume) else []
        argv = ["claude", "--dangerously-skip-permissions", *resume_args, *model_args(), "-p"]
        argv += [prompt] if fits else []
        argv += ["--output-format", "stream-json", "--verbose"]
        stdin = None if fits else data
    elif provider == "codex":
        argv = ["codex", "exec", "--sandbox", "workspace-write", "--skip-git-repo-check"]
        argv += [*model_args(), prompt if fits else "-"]
        stdin = None if fits else data
    elif provider == "gemini":
        argv = ["gemini", "--yolo", *model_args()]
        argv += ["--prompt", prompt] if fits else []
        stdin = None if fits else data
    elif provider == "aider":
        if fits:
            message = ["--message", prompt]
        elif len(data) <= MAX_ARGV_PROMPT_BYTES:  # dash-led: one `--message=...` argument
            message = [f"--message={prompt}"]
        else:
            message, stdin = ["--message-file", "/dev/stdin"], data
        argv = ["aider", *message, "--yes-always", "--no-auto-commits", *model_args()]
    elif provider in ("cline", "opencode"):
        if len(data) > MAX_ARGV_PROMPT_BYTES:
            raise PromptTooLarge(
                f"provider {provider!r} takes the prompt as one argument, and this one is "
                f"{len(data)} bytes (at most {MAX_ARGV_PROMPT_BYTES})",
                details={"bytes": len(data), "limit": MAX_ARGV_PROMPT_BYTES},
            )
        head = ["cline", "-y", *model_args("-m")]
        if provider == "opencode":
            head = ["opencode", "run", "--auto", *model_args()]
        argv = [*head, *(["--"] if prompt.startswith("-") else []), prompt]
    else:  # command
        template = validate_command(options["command"])
        argv = [
            arg.replace("{model}", model or "").replace("{projectDir}", str(project_dir))
            for arg in template
        ]
        argv[0] = executable(provider, options, project_dir=project_dir)
        stdin = data
    return AgentCommand(
        provider=provider,
        argv=tuple(argv),
        stdin=stdin,
        env=BASE_ENV,
        cwd=project_dir,
        output_format=info.output_format,
        model=model,
        prompt_route="stdin" if stdin is not None else "argv",
    )


def argv_prompt(command: AgentCommand) -> str | None:
    """The prompt as passed in argv (None when it travels on stdin). For tests and logs."""
    index = command._prompt_index()
    if index is None:
        return None
    arg = command.argv[index]
    return arg.removeprefix("--message=") if arg.startswith("--message=") else arg
