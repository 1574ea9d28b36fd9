"""PRD -> tasks (lokid.prd): sample PRDs with their exact task lists, bounds, validation."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lokid.errors import ValidationFailed
from lokid.prd import (
    FALLBACK_TITLE,
    MAX_ACCEPTANCE_ITEMS,
    MAX_PRD_BYTES,
    MAX_PRD_TASKS,
    MAX_TITLE_CHARS,
    PrdTask,
    parse_prd,
    parse_prd_detailed,
    validate_prd_bytes,
)

PRDS = Path(__file__).parent / "prds"


def load(name: str) -> str:
    return validate_prd_bytes((PRDS / name).read_bytes())


def summary(tasks: list[PrdTask]) -> list[tuple[str, str, int]]:
    return [(t.id, t.title, t.priority) for t in tasks]


# -- the sample PRDs, task by task ---------------------------------------------


def test_saas_app_with_features_and_requirements_sections() -> None:
    result = parse_prd_detailed(load("saas_invoicing.md"))
    tasks = list(result.tasks)
    assert summary(tasks) == [
        ("prd-001", "Client management", 1),
        ("prd-002", "Invoice editor", 1),
        (
            "prd-003",
            "Recurring invoices (monthly, quarterly, yearly) that are generated and sent "
            "automatically",
            1,
        ),
        ("prd-004", "Payments", 2),
        ("prd-005", "Automatic payment reminders 3, 7 and 14 days after the due date", 2),
        ("prd-006", "Dashboard with outstanding, overdue and paid totals per currency", 2),
        ("prd-007", "Users sign up with email and password or with Google", 3),
        ("prd-008", "A workspace can invite teammates with the roles Owner, Admin and Member", 3),
        ("prd-009", "Every invoice action is written to an audit log", 3),
    ]
    # A bold lead is the title; the rest of the line is the description and
    # nested items are the acceptance criteria.
    assert tasks[0].description == "store clients with billing address, tax id and default currency"
    assert tasks[0].acceptance == (
        "Clients can be archived, never hard-deleted while invoices reference them",
        "Import clients from a CSV file",
    )
    assert tasks[0].section == "3. Features"
    assert tasks[6].section == "4.1 Functional requirements"
    # Overview/goals/tech stack/timeline bullets, non-functional requirements
    # and out-of-scope items are not tasks.
    titles = {t.title for t in tasks}
    assert not titles & {"Mobile apps", "Expense tracking features", "p95 page load under 300 ms"}
    assert result.title == "Invoicely — Product Requirements Document"
    assert result.warnings == ()
    assert not result.fallback


def test_numbered_requirements_with_acceptance_criteria_and_priorities() -> None:
    result = parse_prd_detailed(load("numbered_requirements.md"))
    tasks = list(result.tasks)
    assert summary(tasks) == [
        ("prd-001", "FR-1: Search available slots", 1),  # **Priority:** High
        ("prd-002", "FR-2: Book a slot", 0),  # **Priority:** P0
        ("prd-003", "FR-3: Cancel or reschedule", 2),  # (P2) in the heading, removed
        ("prd-004", "FR-4: Staff calendar management", 3),  # by position: last third
    ]
    assert tasks[0].acceptance == (
        "Results are sorted by start time, earliest first",
        "Slots in the past are never shown",
        "A search over 31 days returns in under 1 second",
    )
    assert tasks[0].description == (
        "Patients search free slots by clinic, practitioner, service and date range."
    )
    assert tasks[1].description == (
        "A patient books a free slot and receives a confirmation email with an ICS attachment."
    )
    assert tasks[2].acceptance == (
        "Cancelling frees the slot immediately",
        "Rescheduling is atomic: the old slot is freed only if the new one is booked",
    )
    # An "Acceptance Criteria" sub-heading feeds the task; a "Notes" one its description.
    assert tasks[3].acceptance == (
        "Closing a slot that has a booking asks for confirmation",
        "Holiday blocks repeat yearly when marked recurring",
    )
    assert tasks[3].description == (
        "Staff open and close slots, and block time for holidays.\n"
        "Notes:\n"
        "Calendar sync with Google Calendar was requested by two clinics."
    )
    assert {t.section for t in tasks} == {"3. Functional Requirements"}
    # The document-level "Acceptance Criteria" section is reported, not copied into tasks.
    assert result.acceptance == (
        "All FR acceptance criteria pass in the staging environment",
        "A penetration test finds no high-severity issue",
    )


def test_nested_bullets_and_checkboxes() -> None:
    result = parse_prd_detailed(load("nested_checkboxes.md"))
    tasks = list(result.tasks)
    assert summary(tasks) == [
        ("prd-001", "Account creation with magic-link email login", 1),  # Must have
        ("prd-002", "Create, edit and archive habits", 1),
        ("prd-003", "Mark a habit done for today with one tap", 1),
        ("prd-004", "Streak counter per habit", 2),  # Should have
        ("prd-005", "Weekly summary email every Monday morning", 3),  # [low] wins
        ("prd-006", "Dark mode", 3),  # Nice to have
        ("prd-007", "Export all data as CSV", 3),
    ]
    # A checked nested item is still a criterion; its box is not part of the text.
    assert tasks[0].acceptance == (
        "Link expires after 15 minutes",
        "Email template approved by design",
    )
    # A `Label:` item with children becomes one criterion.
    assert tasks[1].acceptance == (
        "Each habit has: a name; a colour; a schedule (daily or chosen weekdays)",
        "Archived habits keep their history",
    )
    assert tasks[2].description == "Undo is possible until midnight local time."
    assert tasks[0].section == "Must have"
    # The checked top-level item is done: skipped, with a warning naming it.
    [warning] = result.warnings
    assert warning.code == "checked_item_skipped"
    assert warning.line == 12
    assert "Landing page" in warning.message
    # "## Later" is excluded with everything in it.
    assert not any("Apple Health" in t.title for t in tasks)


def test_code_fences_are_never_structure() -> None:
    result = parse_prd_detailed(load("code_fences.md"))
    assert summary(list(result.tasks)) == [
        ("prd-001", "logtail follow FILE... streams new lines as they are written", 1),
        ("prd-002", "logtail grep PATTERN FILE searches past lines with a regex", 1),
        ("prd-003", "logtail stats FILE prints counts by level and by logger", 1),
    ]
    # `## Requirements`, `# Features` and list items inside fences (backtick,
    # tilde, inside a list item) made no section and no task; the neutral
    # "Output formats" sub-headings are not tasks either.
    assert all(t.section == "Commands" for t in result.tasks)
    assert all(t.acceptance == () for t in result.tasks)
    assert result.warnings == ()


def test_no_features_section_gives_one_task() -> None:
    result = parse_prd_detailed(load("no_features.md"))
    [task] = result.tasks
    assert task == PrdTask(
        id="prd-001",
        title=FALLBACK_TITLE,
        # The first prose paragraph; the Owner/Status metadata lines are skipped.
        description=(
            "We want a small embeddable widget that shows the current weather and a "
            "three-day forecast for the visitor's city, for use on partner blogs."
        ),
        priority=1,
        acceptance=(),
        section="Weather Widget",
        line=1,
    )
    assert result.fallback
    assert [w.code for w in result.warnings] == ["no_features"]


EXPECTED_WIKI = [
    ("prd-001", "As an employee, I can search all pages by keyword", 1),
    ("prd-002", "As an employee, I can filter results by space and by author", 1),
    ("prd-003", "As an admin, I can reindex a space from the settings page", 2),
    ("prd-004", "Search API endpoint GET /api/search?q=", 2),
    ("prd-005", "Search results page with highlighting", 3),
]


def test_front_matter_windows_line_endings_and_setext_headings() -> None:
    data = (PRDS / "front_matter_crlf.md").read_bytes()
    # Whatever git did to the sample's line endings, parse it with CRLF, CR and LF.
    lf = data.replace(b"\r\n", b"\n")
    variants = [data, lf.replace(b"\n", b"\r\n"), lf.replace(b"\n", b"\r"), lf]
    results = [parse_prd_detailed(validate_prd_bytes(v)) for v in variants]
    for result in results:
        assert summary(list(result.tasks)) == EXPECTED_WIKI
        assert result.tasks == results[0].tasks
    result = results[0]
    assert result.title == "Team Wiki Search"  # from the front matter
    assert result.tasks[1].acceptance == ("Filters combine with AND",)
    assert result.tasks[3].section == "Deliverables"
    # `# Not a heading: this is YAML` inside the front matter made nothing.
    assert result.tasks[0].line == 13


def test_several_h1s_item_headings_and_future_work() -> None:
    result = parse_prd_detailed(load("multi_h1_stories.md"))
    tasks = list(result.tasks)
    assert summary(tasks) == [
        ("prd-001", "US-001: Configure the stand-up time", 1),
        ("prd-002", "US-002: Answer the prompt in a thread", 1),  # [P1]
        ("prd-003", "US-003: Weekly digest", 2),
        ("prd-004", "Epic 2: Analytics", 3),  # an item heading outside any feature section
    ]
    assert tasks[0].description == (
        "As a team lead, I want to set the time and the channel of the daily prompt."
    )
    assert tasks[0].acceptance == (
        "The time zone is the team lead's, changeable later",
        "Weekends are skipped by default",
    )
    assert tasks[0].section == "User Stories"
    assert tasks[3].section == ""
    assert tasks[3].acceptance == ("Chart of answers per member", "CSV export")


@pytest.mark.parametrize("name", sorted(p.name for p in PRDS.glob("*.md")))
def test_every_sample_is_deterministic_with_dense_unique_ids(name: str) -> None:
    text = load(name)
    first = parse_prd_detailed(text)
    again = parse_prd_detailed("".join(list(text)))  # an equal but distinct string
    assert first == again
    assert repr(first) == repr(again)  # byte for byte
    ids = [t.id for t in first.tasks]
    assert ids == [f"prd-{i:03d}" for i in range(1, len(ids) + 1)]
    assert parse_prd(text) == list(first.tasks)


# -- rules that fix the older parser's bugs ------------------------------------


def test_short_features_and_headings_are_kept() -> None:
    # The older parser dropped items of 10 characters or less and headings of 5 or less.
    tasks = parse_prd("# App\n\n## Features\n\n- Login\n- Search\n\n### Auth\n\nSign in.\n")
    assert [t.title for t in tasks] == ["Login", "Search", "Auth"]


def test_section_names_match_whole_words_not_substrings() -> None:
    # "therapist" contains "api"; "rapid" too. Neither is an API section.
    tasks = parse_prd(
        "# Clinic\n\n## Therapist portal\n\n- Calendar view for the week\n\n"
        "## Rapid prototyping notes\n\n- Try a spike\n\n## API\n\n- GET /patients\n"
    )
    assert [t.title for t in tasks] == ["GET /patients"]


def test_out_of_scope_wins_over_feature_words() -> None:
    tasks = parse_prd(
        "# X\n\n## Features\n\n- Export to PDF\n\n## Out of scope features\n\n- Export to Word\n\n"
        "## Non-goals\n\n### Requirements we will not meet\n\n- Offline mode\n"
    )
    assert [t.title for t in tasks] == ["Export to PDF"]


def test_a_lone_h1_is_the_title_even_when_it_says_requirements() -> None:
    text = (
        "# Product Requirements\n\n- A context bullet\n\n"
        "## Overview\n\nText.\n\n## Scope\n\n- Do X\n"
    )
    assert [t.title for t in parse_prd(text)] == ["Do X"]
    # ...unless the whole document is one list under it.
    one_list = parse_prd("# Todo app requirements\n\n- Add todos\n- Delete todos\n")
    assert [t.title for t in one_list] == ["Add todos", "Delete todos"]


def test_every_heading_level_counts() -> None:
    # The older parser split only on #, ## and ###.
    text = (
        "# T\n\n## Features\n\n### Accounts\n\n#### Sign up\n\n- email\n\n#### Sign in\n\n- sso\n"
    )
    tasks = parse_prd(text)
    assert [(t.title, t.acceptance, t.section) for t in tasks] == [
        ("Sign up", ("email",), "Accounts"),
        ("Sign in", ("sso",), "Accounts"),
    ]


def test_top_level_means_not_nested_whatever_the_indentation() -> None:
    tasks = parse_prd("# T\n\n## Features\n\n  - Indented feature\n    - its detail\n  - Another\n")
    assert [(t.title, t.acceptance) for t in tasks] == [
        ("Indented feature", ("its detail",)),
        ("Another", ()),
    ]


def test_hard_wrapped_titles_and_continuation_descriptions() -> None:
    tasks = parse_prd(
        "# T\n\n## Features\n\n"
        "- Users can reset their password with a link\n  sent to their email address\n"
        "- Signup\n  Users create an account.\n"
    )
    assert [(t.title, t.description) for t in tasks] == [
        ("Users can reset their password with a link sent to their email address", ""),
        ("Signup", "Users create an account."),
    ]


def test_explicit_acceptance_label_turns_other_items_into_description() -> None:
    tasks = parse_prd(
        "# T\n\n## Requirements\n\n1. Export\n   - Uses the streaming API\n"
        "   - Acceptance criteria:\n     - A 1 GB export finishes\n"
        "   - AC: the file is valid CSV\n   - Priority: low\n"
    )
    [task] = tasks
    assert task.description == "- Uses the streaming API"
    assert task.acceptance == ("A 1 GB export finishes", "the file is valid CSV")
    assert task.priority == 3


def test_inline_markup_is_cleaned_from_titles() -> None:
    tasks = parse_prd(
        "# T\n\n## Features\n\n- Support [OAuth](https://oauth.net) via `authlib`, *fast*\n"
        "- Keep snake_case_names and 2 * 3 = 6\n- Escaped \\*stars\\*\n"
    )
    assert [t.title for t in tasks] == [
        "Support OAuth via authlib, fast",
        "Keep snake_case_names and 2 * 3 = 6",
        "Escaped *stars*",
    ]


def test_all_items_checked_falls_back_to_one_task() -> None:
    result = parse_prd_detailed("# Done\n\nAll of it.\n\n## Features\n\n- [x] A\n- [x] B\n")
    assert [t.title for t in result.tasks] == [FALLBACK_TITLE]
    assert [w.code for w in result.warnings] == [
        "checked_item_skipped",
        "checked_item_skipped",
        "no_features",
    ]


@pytest.mark.parametrize(
    ("text", "description"),
    [
        (
            "Build a CLI that converts CSV files to JSON.\n",
            "Build a CLI that converts CSV files to JSON.",
        ),
        ("# Only a title\n", "Only a title"),
        ("- just\n- a list\n", ""),
    ],
)
def test_fallback_description(text: str, description: str) -> None:
    [task] = parse_prd(text)
    assert (task.title, task.description, task.priority) == (FALLBACK_TITLE, description, 1)


def test_positional_priorities_split_in_thirds() -> None:
    items = "".join(f"- Feature number {i}\n" for i in range(1, 8))
    tasks = parse_prd(f"# T\n\n## Features\n\n{items}")
    assert [t.priority for t in tasks] == [1, 1, 1, 2, 2, 3, 3]
    three = parse_prd("# T\n\n## Features\n\n- A\n- B\n- C\n")
    assert [t.priority for t in three] == [1, 1, 1]


@pytest.mark.parametrize(
    ("item", "title", "priority"),
    [
        ("[P0] Fix login", "Fix login", 0),
        ("P3: Polish icons", "Polish icons", 3),
        ("Add search (high priority)", "Add search", 1),
        ("Reset password - P2", "Reset password", 2),
        ("P2P file sync", "P2P file sync", 1),
    ],
)
def test_priority_markers(item: str, title: str, priority: int) -> None:
    [task] = parse_prd(f"# T\n\n## Features\n\n- {item}\n")
    assert (task.title, task.priority) == (title, priority)


def test_unclosed_fence_is_reported() -> None:
    result = parse_prd_detailed("# T\n\n## Features\n\n- A\n\n```\n# code\n- B\n")
    assert [t.title for t in result.tasks] == ["A"]
    [warning] = result.warnings
    assert (warning.code, warning.line) == ("unclosed_fence", 7)


def test_html_comments_are_ignored() -> None:
    tasks = parse_prd("# T\n\n## Features\n\n<!--\n- Hidden\n## Requirements\n-->\n- Shown\n")
    assert [t.title for t in tasks] == ["Shown"]


# -- bounds ----------------------------------------------------------------------


def test_at_most_max_tasks_first_ones_kept_and_reported() -> None:
    items = "".join(f"- Item number {i}\n" for i in range(1, 701))
    result = parse_prd_detailed(f"# T\n\n## Features\n\n{items}")
    assert len(result.tasks) == MAX_PRD_TASKS == 500
    assert result.tasks[-1].id == "prd-500"
    assert result.tasks[-1].title == "Item number 500"
    assert result.truncated
    [warning] = result.warnings
    assert warning.code == "tasks_truncated"
    assert warning.line == 5 + 500  # the first item left out
    assert "only the first 500" in warning.message


def test_long_titles_are_cut_with_an_ellipsis_and_kept_in_full_in_the_description() -> None:
    long = " ".join(["word"] * 80)  # 399 characters
    result = parse_prd_detailed(f"# T\n\n## Features\n\n- {long}\n")
    [task] = result.tasks
    assert len(task.title) <= MAX_TITLE_CHARS
    assert task.title.endswith("…")
    assert long.startswith(task.title[:-1])
    assert task.description == long
    assert [w.code for w in result.warnings] == ["title_truncated"]


def test_acceptance_criteria_are_bounded() -> None:
    nested = "".join(f"  - criterion {i}\n" for i in range(30))
    result = parse_prd_detailed(f"# T\n\n## Features\n\n- Feature\n{nested}")
    [task] = result.tasks
    assert len(task.acceptance) == MAX_ACCEPTANCE_ITEMS
    assert task.acceptance[-1] == "criterion 19"
    assert [w.code for w in result.warnings] == ["acceptance_truncated"]


def test_hostile_inputs_stay_fast_and_bounded() -> None:
    started = time.monotonic()
    # ~1 MiB of list items, 2 MiB of unclosed emphasis, 3000-level nesting, a
    # heading padded with a million spaces: no error, linear time.
    parse_prd("# T\n\n## Features\n\n" + "- a feature\n" * 90_000)
    parse_prd("# T\n\n## Features\n\n- " + "** a " * 400_000 + "\n")
    nested = parse_prd("## Features\n\n" + "".join(" " * i + "- x\n" for i in range(3000)))
    parse_prd("# " + " " * 1_000_000 + "a\n")
    assert time.monotonic() - started < 20
    assert len(nested[0].acceptance) == MAX_ACCEPTANCE_ITEMS


_MARKDOWNISH = st.lists(
    st.sampled_from(
        [*"#-*+[]x `~>:_\n\r\t1.)aB=|!\\", "Features", "Out of scope", "\n## ", "\n- ", "```"]
    ),
    max_size=120,
).map("".join)


@settings(max_examples=200, deadline=None)
@given(_MARKDOWNISH)
def test_any_text_gives_bounded_dense_tasks(text: str) -> None:
    result = parse_prd_detailed(text)
    assert 1 <= len(result.tasks) <= MAX_PRD_TASKS
    assert [t.id for t in result.tasks] == [f"prd-{i:03d}" for i in range(1, len(result.tasks) + 1)]
    for task in result.tasks:
        assert task.title and len(task.title) <= MAX_TITLE_CHARS
        assert task.priority in (0, 1, 2, 3)
        assert len(task.acceptance) <= MAX_ACCEPTANCE_ITEMS
    assert parse_prd_detailed(text) == result


# -- validate_prd_bytes ------------------------------------------------------------


def invalid(data: bytes) -> ValidationFailed:
    with pytest.raises(ValidationFailed) as info:
        validate_prd_bytes(data)
    assert info.value.field == "prd"
    assert info.value.details["field"] == "prd"
    assert info.value.code == "VALIDATION_ERROR"
    return info.value


def test_empty_prd() -> None:
    assert invalid(b"").message == "PRD is empty"


def test_whitespace_only_prd() -> None:
    assert invalid(b" \n\t\r\n  ").message == "PRD contains only whitespace"
    assert invalid(b"\xef\xbb\xbf\n").message == "PRD contains only whitespace"  # BOM + newline


def test_binary_prd_names_the_nul_byte() -> None:
    error = invalid(b"# PRD\n\x00\x01\x02")
    assert "binary" in error.message and "NUL" in error.message
    assert error.details["offset"] == 6


def test_non_utf8_prd_names_the_byte() -> None:
    error = invalid("# Café\n".encode("latin-1"))
    assert error.message == "PRD is not UTF-8 text: invalid byte 0xe9 at offset 5"


def test_prd_size_limit() -> None:
    at_limit = b"# T\n" + b"x" * (MAX_PRD_BYTES - 4)
    assert len(validate_prd_bytes(at_limit)) == MAX_PRD_BYTES
    error = invalid(at_limit + b"x")
    assert "5 MiB" in error.message and str(MAX_PRD_BYTES) in error.message
    assert error.details["limit"] == 5 * 1024 * 1024
    assert error.details["size"] == MAX_PRD_BYTES + 1


def test_valid_prd_drops_the_bom_and_keeps_line_endings() -> None:
    assert validate_prd_bytes(b"\xef\xbb\xbf# T\r\n") == "# T\r\n"


def test_the_worked_example_in_the_docs() -> None:
    doc = (Path(__file__).parent.parent / "docs" / "prd-parsing.md").read_text()
    example = doc.split("````markdown\n", 1)[1].split("\n````", 1)[0]
    result = parse_prd_detailed(example)
    assert [(t.id, t.title, t.priority, t.description, t.acceptance) for t in result.tasks] == [
        (
            "prd-001",
            "Import from URL",
            1,
            "paste a link, get title, ingredients and steps",
            (
                "Works for sites with schema.org Recipe markup",
                "Falls back to the page text otherwise",
            ),
        ),
        (
            "prd-002",
            "Shopping list",
            1,
            "Ingredients from the week's plan, merged by aisle.",
            (),
        ),
        (
            "prd-003",
            "Meal planner",
            1,
            "A week view; drag recipes onto days.\n- Plans are per household",
            ("Moving a recipe updates the shopping list",),
        ),
    ]
    assert [(w.code, w.line) for w in result.warnings] == [("checked_item_skipped", 16)]
