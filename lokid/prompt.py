"""The prompt of one agent run (DESIGN.md §6). Pure: text in, text out.

What goes in, in this order, each part only when there is something to say:
where the PRD is and what it is called, the task (id, title, description,
acceptance criteria), the human input queued since the last run, the
previous failure of this task, and the house rules (`.loki/` conventions
an agent may use: add tasks to `queue/pending.json`, request completion).

An agent of a parallel session runs in a git worktree inside the project
(`<project>/.loki/worktrees/<task>`), where a relative `.loki/` is the
worktree's own, deleted with it: there the rules name the project's `.loki/`
folder by its absolute path (`loki_dir`). A CLI confined to its working
folder cannot write there; the tasks and completion request it leaves in
the worktree's `.loki/` are taken when its run ends, so the rules say so.

The PRD itself is not pasted: the agent runs in the project folder and
reads it (a PRD may be 5 MiB; a prompt argument is limited). Every part is
bounded so the prompt stays below `providers.MAX_ARGV_PROMPT_BYTES`
(the command builder moves a larger one to stdin anyway).

Human input is never cut: the runner passes only the queued inputs that fit
in `MAX_INPUT_BYTES_PER_PROMPT` together (`inputs_that_fit`), each in full,
and the others wait for the next prompt (docs/sessions.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs

MAX_DESCRIPTION_CHARS = 8000
MAX_INPUT_BYTES_PER_PROMPT = 64 * 1024  # the API's bound for one message: it always fits
MAX_ERROR_CHARS = 2000

RULES = """\
How to work:
- Work in the current folder ({where}). Make the change, run the relevant tests.
- Stay on this task; do not rewrite unrelated code.{loki_note}
- If you find more work that must be done, append a task to {loki}/queue/pending.json
  ({{"id": "...", "title": "...", "description": "...", "priority": "medium"}}).
- If the whole project is finished, write {loki}/signals/COMPLETION_REQUESTED."""


def rules(loki_dir: str | None = None) -> str:
    """The house rules; `loki_dir`: the project's `.loki/` when the agent runs elsewhere."""
    if loki_dir is None:
        return RULES.format(where="the project", loki=".loki", loki_note="")
    note = (
        f"\n- The project's .loki folder is {loki_dir}: use it for every .loki file (queue,"
        " signals, STOP, PAUSE). Only if you cannot write there, append tasks and request"
        " completion in .loki in the current folder: those two are read when you finish."
    )
    return RULES.format(
        where="a git worktree of the project on its own branch; your work is merged when"
        " you finish",
        loki=loki_dir,
        loki_note=note,
    )


@attrs.frozen
class PromptTask:
    id: str
    title: str
    description: str
    acceptance: tuple[str, ...] = ()
    attempt: int = 1


def inputs_that_fit(messages: Sequence[str]) -> int:
    """How many of the queued `messages` (oldest first) go into one prompt, in full.

    As many as fit in `MAX_INPUT_BYTES_PER_PROMPT` of UTF-8 together, and at
    least the first: one message is at most that (the API's and
    `HUMAN_INPUT.md`'s bound), so every input is delivered whole, in order.
    """
    total = 0
    for count, message in enumerate(messages):
        total += len(message.strip().encode("utf-8", "surrogatepass"))
        if total > MAX_INPUT_BYTES_PER_PROMPT and count > 0:
            return count
    return len(messages)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def build_prompt(
    task: PromptTask,
    *,
    prd_path: str,
    prd_title: str | None = None,
    human_input: Sequence[str] = (),
    previous_error: str | None = None,
    iteration: int = 1,
    loki_dir: str | None = None,
) -> str:
    """The whole prompt for one run of `task`; `loki_dir` as in `rules`.

    `human_input` goes in whole: the caller bounds it (`inputs_that_fit`).
    """
    about = f" ({prd_title})" if prd_title else ""
    parts = [
        f"You are implementing the product described in the PRD at {prd_path}{about}.",
        f"Iteration {iteration}. Your task is {task.id}: {task.title}",
    ]
    description = task.description.strip()
    if description and description != task.title:
        parts.append("Details:\n" + _clip(description, MAX_DESCRIPTION_CHARS))
    if task.acceptance:
        parts.append("Acceptance criteria:\n" + "\n".join(f"- {item}" for item in task.acceptance))
    if human_input:
        joined = "\n\n".join(message.strip() for message in human_input)
        parts.append(
            "Instructions from the human operator (they override the plan where they differ):\n"
            + joined
        )
    if previous_error and task.attempt > 1:
        parts.append(
            f"This is attempt {task.attempt}. The previous attempt failed: "
            + _clip(previous_error.strip(), MAX_ERROR_CHARS)
        )
    parts.append(rules(loki_dir))
    return "\n\n".join(parts) + "\n"
