"""PRD text -> tasks. Deterministic, no LLM, no I/O: text in, records out.

The rules (docs/prd-parsing.md has the long form and a worked example):

* **Input.** `validate_prd_bytes` turns the file's bytes into text or raises
  one `ValidationFailed(field="prd")` saying why not: empty, whitespace only,
  larger than `MAX_PRD_BYTES`, NUL bytes (binary), not UTF-8. `parse_prd`
  accepts any `str`. A UTF-8 BOM, `\\r\\n` and `\\r` line endings and YAML/TOML
  front matter are dropped first. Fenced code (```` ``` ````/`~~~`) and HTML
  comments are never structure: a `# line` inside a fence is not a heading.
* **Sections.** ATX (`## Name`) and setext (`Name` / `====`) headings build a
  tree. The title is front matter's `title`, else the document's only H1;
  that H1 is never a feature section itself, whatever its words ("Product
  Requirements ..."), unless it has no sub-heading (a document that is one
  list). With several H1s, or a front-matter title, H1s are sections. A
  heading's name is normalised (markup, leading numbering like `2.1` or
  `IV.`, punctuation and case dropped) and matched on whole words, never on
  substrings (so "therapist" does not contain "api"). Kinds, first match
  wins: *excluded* (out of scope, non-goals, won't have, future, later,
  deferred, ...: nothing below it is ever a task), *criteria* (acceptance
  criteria, success criteria, definition of done), *non-functional*
  (non-functional requirements, NFRs: cross-cutting, not tasks), *item*
  (`Feature 3: ...`, `FR-1 ...`, `US-004 ...`: one task), *meta* (every word
  is explanatory: overview, background, goals, risks, tech stack, notes,
  ...), *feature* (a word such as features, requirements, user stories,
  scope, MVP, API, endpoints, screens, components, data model, milestones,
  phases, tasks, backlog, must/should/could have), else *neutral*.
* **Tasks.** Outside feature sections nothing is a task, except item
  headings; neutral sections are searched for nested feature sections, meta
  sections are not. Inside a feature section:
  - each *top-level* list item (`-`, `*`, `+` or `1.`/`1)`; "top-level"
    means not nested under another item, whatever its indentation) is a
    task: its first line is the title (a hard-wrapped title continues on
    lines that start in lower case; a `**Bold lead**` alone is the title and
    the rest of the line the description), its nested items are its
    acceptance criteria and its other text its description;
  - each sub-heading is a task whose paragraphs are its description and
    whose list items are its acceptance criteria, unless it contains
    further task-like sub-headings, in which case it is a group and the
    same rules apply inside it (criteria and meta sub-headings never make a
    heading a group: they are details of it).
  When a task has an explicit acceptance label (`Acceptance criteria:` as a
  paragraph, a list item or a sub-heading), only what is under the label is
  acceptance; its other list items go to the description.
* **Checkboxes.** `- [ ] x` is an item titled `x`. A checked top-level item
  (`- [x] x`) is already done: it is skipped with a warning. Checked nested
  items stay criteria.
* **Priority** is an int, lower runs first: 0 critical, 1 high, 2 medium,
  3 low (`PRIORITY_LABELS`). An explicit marker on the task wins (`[P0]`,
  `(high)`, `P1: ...`, a `Priority: low` line under it), then its section's
  (`Must have` 1, `Should have` 2, `Could/Nice to have` 3, `P0..P3` or
  `high/medium/low priority` in the heading), then position, as the older
  implementation did: all high when there are at most 3 tasks, else the
  first third high, the second medium, the rest low.
* **Bounds.** Titles are cleaned of inline markup and cut to
  `MAX_TITLE_CHARS` with an ellipsis (the full text then opens the
  description); descriptions to `MAX_DESCRIPTION_CHARS`; at most
  `MAX_ACCEPTANCE_ITEMS` criteria of `MAX_CRITERION_CHARS` each; at most
  `MAX_PRD_TASKS` tasks (the first ones, in document order). Every cut is
  reported as a `PrdWarning` in `parse_prd_detailed(...).warnings` and the
  task cap also sets `truncated`; `parse_prd` returns only the tasks.
* **Fallback.** A PRD with no recognisable feature (or only checked ones)
  yields exactly one task, `FALLBACK_TITLE`, whose description is the PRD's
  first prose paragraph (metadata lines such as `Status: draft` skipped),
  else its title. So `parse_prd` never returns an empty list.
* **Output.** Tasks are in document order with ids `prd-001`, `prd-002`, ...
  assigned last, so ids are unique and dense; the same text always gives
  the same tasks. Duplicate titles are kept (two sections may both say
  "Tests"); this module does not guess which one the author meant.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Iterator, Sequence

import attrs

from lokid.errors import ValidationFailed

MAX_PRD_BYTES = 5 * 1024 * 1024
MAX_PRD_TASKS = 500
MAX_TITLE_CHARS = 200
MAX_DESCRIPTION_CHARS = 4000
MAX_ACCEPTANCE_ITEMS = 20
MAX_CRITERION_CHARS = 500
FALLBACK_TITLE = "Implement the PRD"

PRIORITY_CRITICAL = 0
PRIORITY_HIGH = 1
PRIORITY_MEDIUM = 2
PRIORITY_LOW = 3
PRIORITY_LABELS: tuple[str, ...] = ("critical", "high", "medium", "low")

ELLIPSIS = "\u2026"

# Deeper list nesting than this is flattened onto the deepest level (keeps
# recursion bounded for hostile input).
_MAX_LIST_DEPTH = 16


@attrs.frozen
class PrdTask:
    """One task parsed from a PRD.

    `priority`: 0 critical, 1 high, 2 medium, 3 low (lower runs first).
    `section`: the heading the task came from (for a task that *is* a
    heading, the heading above it; "" at the top of the document).
    `line`: 1-based line of the task's bullet or heading in the text.
    """

    id: str
    title: str
    description: str
    priority: int
    acceptance: tuple[str, ...]
    section: str
    line: int


@attrs.frozen
class PrdWarning:
    """Something the parser cut, skipped or could not read as the author may have meant.

    `code` is one of `tasks_truncated`, `title_truncated`,
    `description_truncated`, `acceptance_truncated`, `checked_item_skipped`,
    `unclosed_fence`, `unclosed_comment`, `no_features`.
    """

    code: str
    message: str
    line: int | None = None


@attrs.frozen
class PrdParseResult:
    tasks: tuple[PrdTask, ...]
    warnings: tuple[PrdWarning, ...]
    title: str | None
    """The document's title: its only H1, else its first H1, else front matter `title`."""
    acceptance: tuple[str, ...]
    """Document-level criteria (a top-level "Acceptance criteria" section), not copied to tasks."""
    truncated: bool
    """More than `MAX_PRD_TASKS` tasks were found; only the first ones are in `tasks`."""
    fallback: bool
    """No feature was recognised: `tasks` is the single `FALLBACK_TITLE` task."""


# -- input validation --------------------------------------------------------


def validate_prd_bytes(data: bytes) -> str:
    """The PRD file's text, or `ValidationFailed(field="prd")` naming what is wrong.

    Checked in this order: size, empty, NUL bytes, UTF-8, whitespace only. A
    UTF-8 BOM is dropped; line endings are left as they are (the parser
    normalises them).
    """
    size = len(data)
    if size > MAX_PRD_BYTES:
        raise ValidationFailed(
            f"PRD is too large: {size} bytes; the limit is 5 MiB ({MAX_PRD_BYTES} bytes)",
            field="prd",
            details={"size": size, "limit": MAX_PRD_BYTES},
        )
    if size == 0:
        raise ValidationFailed("PRD is empty", field="prd")
    nul = data.find(b"\x00")
    if nul >= 0:
        raise ValidationFailed(
            f"PRD looks binary: it contains a NUL byte at offset {nul}",
            field="prd",
            details={"offset": nul},
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = data[exc.start : exc.start + 1].hex()
        raise ValidationFailed(
            f"PRD is not UTF-8 text: invalid byte 0x{bad} at offset {exc.start}",
            field="prd",
            details={"offset": exc.start},
        ) from None
    text = text.removeprefix("\ufeff")
    if not text.strip():
        raise ValidationFailed("PRD contains only whitespace", field="prd")
    return text


# -- public entry points -------------------------------------------------------


def parse_prd(text: str) -> list[PrdTask]:
    """The PRD's tasks (never empty). See the module docstring for the rules."""
    return list(parse_prd_detailed(text).tasks)


def parse_prd_detailed(text: str) -> PrdParseResult:
    """`parse_prd` plus the warnings, the title and document-level criteria."""
    return _Parser(text).run()


# -- lines ---------------------------------------------------------------------

_BLANK, _TEXT, _BULLET, _HEADING, _RULE = range(5)


class _Line:
    """One significant source line (blank runs collapse to one `_BLANK`)."""

    __slots__ = ("check", "indent", "kind", "level", "no", "text")

    def __init__(
        self, kind: int, no: int, indent: int = 0, text: str = "", check: str | None = None
    ) -> None:
        self.kind = kind
        self.no = no
        self.indent = indent
        self.text = text
        self.level = 0
        self.check = check


_FENCE_RE = re.compile(r"^(`{3,}|~{3,})(.*)$")
_ATX_RE = re.compile(r"^(#{1,6})(?:[ \t]+(.*))?$")
_BULLET_RE = re.compile(r"^([-*+]|\d{1,9}[.)])(?:[ \t]+(.*))?$")
_CHECK_RE = re.compile(r"^\[([ xX])\](?:[ \t]+(.*))?$")
_FRONT_KEY_RE = re.compile(r"^[A-Za-z_][\w.-]*\s*[:=]")
_FRONT_TITLE_RE = re.compile(r"^title\s*[:=]\s*(.+?)\s*$", re.IGNORECASE)
# First characters after which a line may be more than plain text.
_SPECIAL_START = frozenset("`~<#=-*_+>0123456789")


def _indent_of(line: str) -> int:
    lead = len(line) - len(line.lstrip())
    if "\t" not in line[:lead]:
        return lead
    width = 0
    for ch in line:
        if ch == " ":
            width += 1
        elif ch == "\t":
            width += 4 - width % 4
        else:
            break
    return width


def _strip_closing_hashes(title: str) -> str:
    """`Name ##` -> `Name` (an ATX heading's optional closing sequence)."""
    bare = title.rstrip("#")
    if bare == title:
        return title
    if not bare or bare[-1] in " \t":
        return bare.strip()
    return title


def _front_matter_end(raw: Sequence[str]) -> int:
    """Index of the first line after the front matter, 0 if there is none."""
    if not raw:
        return 0
    opener = raw[0].rstrip()
    if opener not in ("---", "+++"):
        return 0
    closers = ("---", "...") if opener == "---" else ("+++",)
    for j in range(1, len(raw)):
        if raw[j].rstrip() in closers:
            block = [line for line in raw[1:j] if line.strip()]
            # A real front matter starts with `key: value`; two thematic
            # breaks around ordinary Markdown are not front matter.
            if block and _FRONT_KEY_RE.match(block[0]):
                return j + 1
            return 0
    return 0


# -- inline markup ---------------------------------------------------------------

_ESCAPE_RE = re.compile(r"\\([!-/:-@\[-`{-~])")
_UNESCAPE_RE = re.compile("[\U000f0000-\U000f007f]")
_IMAGE_RE = re.compile(r"!\[([^\]]*)\]\([^)]*\)")
_LINK_RE = re.compile(r"\[([^\]]+)\]\([^)]*\)")
_REFLINK_RE = re.compile(r"\[([^\]]+)\]\[[^\]]*\]")
_CODE_RE = re.compile(r"`+([^`]+)`+")
# Each pattern's body excludes its own delimiter, so a scan stops at the next
# delimiter: linear time on any input (no `.+?` backtracking to the end).
_STRONG_STAR_RE = re.compile(r"\*\*(?=[^\s*])([^*]+?)(?<=[^\s*])\*\*")
_STRONG_UNDER_RE = re.compile(r"(?<!\w)__(?=[^\s_])([^_]+?)(?<=[^\s_])__(?!\w)")
_EM_STAR_RE = re.compile(r"(?<![\w*])\*(?=[^\s*])([^*]+?)(?<=[^\s*])\*(?![\w*])")
_EM_UNDER_RE = re.compile(r"(?<!\w)_(?=[^\s_])([^_]+?)(?<=[^\s_])_(?!\w)")
_STRIKE_RE = re.compile(r"~~(?=[^\s~])([^~]+?)(?<=[^\s~])~~")
_BR_RE = re.compile(r"<br\s*/?>", re.IGNORECASE)
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_SPACE_RE = re.compile(r"\s+")
# Escaped punctuation hides in plane-15 private-use characters while markup is
# stripped.
_PUA = 0xF0000

# Cleaned text feeds titles, criteria and heading names, all bounded far below
# this; longer input is cut first so the work per call stays small.
_CLEAN_WINDOW = 2000


def _clean_inline(text: str) -> str:
    """Markdown inline markup -> plain text on one line (links keep their text)."""
    text = text[:_CLEAN_WINDOW]
    escaped = "\\" in text
    if escaped:
        text = _ESCAPE_RE.sub(lambda m: chr(_PUA + ord(m.group(1))), text)
    if "[" in text:
        text = _IMAGE_RE.sub(r"\1", text)
        text = _LINK_RE.sub(r"\1", text)
        text = _REFLINK_RE.sub(r"\1", text)
    if "`" in text:
        text = _CODE_RE.sub(r"\1", text)
    if "*" in text or "_" in text:
        for _ in range(2):  # twice: `**a *b* c**` needs the inner pass first
            text = _STRONG_STAR_RE.sub(r"\1", text)
            text = _STRONG_UNDER_RE.sub(r"\1", text)
            text = _EM_STAR_RE.sub(r"\1", text)
            text = _EM_UNDER_RE.sub(r"\1", text)
    if "~" in text:
        text = _STRIKE_RE.sub(r"\1", text)
    if "<" in text:
        text = _BR_RE.sub(" ", text)
    if escaped:
        text = _UNESCAPE_RE.sub(lambda m: chr(ord(m.group(0)) - _PUA), text)
    return _one_line(text)


def _one_line(text: str) -> str:
    """Whitespace (newlines included) and control characters collapsed; markup kept."""
    return _SPACE_RE.sub(" ", _CONTROL_RE.sub(" ", text)).strip()


def _cut(text: str, limit: int) -> str:
    """`text` if it fits, else at most `limit` characters ending with an ellipsis.

    Cuts at a word boundary when one is in the last quarter of the window.
    """
    if len(text) <= limit:
        return text
    head = text[: limit - 1]
    space = head.rfind(" ")
    if space >= (limit * 3) // 4:
        head = head[:space]
    return head.rstrip() + ELLIPSIS


# -- heading names -----------------------------------------------------------------


class _Kind(enum.Enum):
    EXCLUDED = "excluded"
    CRITERIA = "criteria"
    NFR = "non-functional"
    ITEM = "item"
    META = "meta"
    FEATURE = "feature"
    NEUTRAL = "neutral"


_NUMBERING_RE = re.compile(
    r"^(?:(?:section|part|chapter)\s+)?(?:\d+(?:\.\d+)*\.?|[ivxlcdm]+[.)]|[a-z][.)])\s+",
    re.IGNORECASE,
)
_NONWORD_RE = re.compile(r"[\W_]+")


def _phrases(text: str) -> re.Pattern[str]:
    """A matcher of whole phrases from a comma-separated list, for `_norm` output."""
    phrases = [" ".join(phrase.split()) for phrase in text.split(",") if phrase.strip()]
    alternatives = "|".join(re.escape(p) for p in sorted(phrases, key=len, reverse=True))
    return re.compile(rf"(?:^| )(?:{alternatives})(?: |$)")


def _words(text: str) -> frozenset[str]:
    return frozenset(word.strip() for word in text.split(",") if word.strip())


# Headings below these are never tasks ("Out of scope features" included).
_EXCLUDED = _phrases(
    """out of scope, not in scope, outside scope, outside of scope, outside the scope,
    non goal, non goals, nongoal, nongoals, won t have, wont have, will not have,
    will not do, will not build, not doing, not planned, future, later, deferred,
    post mvp, parking lot, icebox, descoped, de scoped, rejected"""
)
_CRITERIA = _phrases(
    """acceptance criteria, acceptance criterion, acceptance test, acceptance tests,
    success criteria, definition of done, done criteria, exit criteria, done when"""
)
_NFR = _phrases("non functional, nonfunctional, nfr, nfrs, quality attributes")
_FEATURE = _phrases(
    """feature, features, functionality, functionalities, functional, capability,
    capabilities, requirement, requirements, reqs, user story, user stories, stories,
    epic, epics, use case, use cases, deliverable, deliverables, scope, mvp, api, apis,
    endpoint, endpoints, routes, screens, pages, ui, components, services, modules,
    data model, data models, database, schema, workflow, workflows, flows, pipeline,
    pipelines, integration, integrations, milestone, milestones, phase, phases, sprint,
    tasks, task list, todo, todos, to do, backlog, work items, action items, checklist,
    implementation plan, build plan, cli, commands, subcommands, must have, must haves,
    should have, should haves, could have, could haves, nice to have, nice to haves"""
)
# A heading is "meta" when every word but the fillers is one of these.
_META_WORDS = _words(
    """overview, introduction, intro, summary, abstract, background, context,
    motivation, rationale, purpose, problem, problems, statement, vision, mission,
    goal, goals, objective, objectives, success, metric, metrics, kpi, kpis, persona,
    personas, users, audience, stakeholders, assumption, assumptions, constraint,
    constraints, dependencies, risk, risks, mitigation, mitigations, question,
    questions, faq, faqs, glossary, terminology, definitions, references, resources,
    links, appendix, appendices, changelog, changes, revision, history, timeline,
    schedule, roadmap, budget, team, contacts, approval, approvals, signoff, sign,
    off, tech, technology, technologies, stack, environment, variables, deployment,
    hosting, note, notes, comments, license, credits, acknowledgements,
    acknowledgments, author, authors, status, metadata, contents, toc, table,
    description, details, considerations, tradeoffs, alternatives, decisions,
    conclusion"""
)
_FILLER_WORDS = _words(
    """and, or, the, a, an, of, for, our, key, main, general, project, product, other,
    additional, open, high, level, executive, brief, short, target, this, document, prd"""
)
_ITEM_NORM_RE = re.compile(
    r"^(?:feature|requirement|req|user story|story|epic|use case|fr|nfr|us|uc) ?\d+[a-z]?(?: |$)"
)
_ITEM_COLON_RE = re.compile(
    r"^(?:feature|requirement|user story|story|epic|use case)\s*[:\u2013\u2014-]\s*\S",
    re.IGNORECASE,
)
_MOSCOW = (
    (_phrases("must have, must haves"), PRIORITY_HIGH),
    (_phrases("should have, should haves"), PRIORITY_MEDIUM),
    (_phrases("could have, could haves, nice to have, nice to haves"), PRIORITY_LOW),
)
_PRIORITY_WORDS = {
    "p0": PRIORITY_CRITICAL,
    "p1": PRIORITY_HIGH,
    "p2": PRIORITY_MEDIUM,
    "p3": PRIORITY_LOW,
    "critical": PRIORITY_CRITICAL,
    "blocker": PRIORITY_CRITICAL,
    "high": PRIORITY_HIGH,
    "medium": PRIORITY_MEDIUM,
    "med": PRIORITY_MEDIUM,
    "normal": PRIORITY_MEDIUM,
    "low": PRIORITY_LOW,
}
_SECTION_PRIO_RE = re.compile(r"(?:^| )(p[0-3]|(?:critical|high|medium|low) priority)(?: |$)")
_PRIO_ALT = r"p[0-3]|critical|blocker|high|medium|med|normal|low"
_TITLE_PRIO_LEAD_RE = re.compile(
    rf"^[\[(]({_PRIO_ALT})(?:\s+priority)?[\])]\s*[:\u2013\u2014-]?\s*"
    rf"|^(p[0-3])\s*[:\u2013\u2014-]\s+",
    re.IGNORECASE,
)
_TITLE_PRIO_TAIL_RE = re.compile(
    rf"\s*(?:[\[(]({_PRIO_ALT})(?:\s+priority)?[\])]|[\u2013\u2014-]\s+(p[0-3]))\s*\.?$",
    re.IGNORECASE,
)
_PRIORITY_LINE_RE = re.compile(rf"^priority\s*[:=\u2013\u2014-]\s*({_PRIO_ALT})\b", re.IGNORECASE)
_AC_LABEL_RE = re.compile(
    r"^(?:acceptance criteria|acceptance criterion|acceptance tests?|success criteria|"
    r"definition of done|done when|ac|acs)\s*(?::\s*(.*))?$",
    re.IGNORECASE,
)


def _norm(title: str) -> str:
    name = _NUMBERING_RE.sub("", title.strip())
    return _NONWORD_RE.sub(" ", name.lower()).strip()


def _classify(title: str) -> _Kind:
    name = _norm(title)
    if not name:
        return _Kind.NEUTRAL
    if _EXCLUDED.search(name):
        return _Kind.EXCLUDED
    if _CRITERIA.search(name) or name in ("ac", "acs"):
        return _Kind.CRITERIA
    if _NFR.search(name):
        return _Kind.NFR
    if _ITEM_NORM_RE.match(name) or _ITEM_COLON_RE.match(title.strip()):
        return _Kind.ITEM
    words = [w for w in name.split() if w not in _FILLER_WORDS]
    if words and all(w in _META_WORDS for w in words):
        return _Kind.META
    if _FEATURE.search(name):
        return _Kind.FEATURE
    return _Kind.NEUTRAL


def _section_priority(title: str) -> int | None:
    name = _norm(title)
    for phrases, priority in _MOSCOW:
        if phrases.search(name):
            return priority
    m = _SECTION_PRIO_RE.search(name)
    if m:
        return _PRIORITY_WORDS[m.group(1).split()[0]]
    return None


def _strip_title_priority(title: str) -> tuple[str, int | None]:
    """`title` without a leading/trailing priority marker, and the marker's priority."""
    found: int | None = None
    m = _TITLE_PRIO_LEAD_RE.match(title)
    if m:
        found = _PRIORITY_WORDS[(m.group(1) or m.group(2)).lower()]
        title = title[m.end() :]
    m = _TITLE_PRIO_TAIL_RE.search(title)
    if m and m.start() > 0:
        if found is None:
            found = _PRIORITY_WORDS[(m.group(1) or m.group(2)).lower()]
        title = title[: m.start()]
    return title.strip(), found


def _priority_line(text: str) -> int | None:
    m = _PRIORITY_LINE_RE.match(text)
    return _PRIORITY_WORDS[m.group(1).lower()] if m else None


def _ac_label(text: str) -> tuple[bool, str]:
    """(is an acceptance label, inline criterion after the label's colon or "")."""
    m = _AC_LABEL_RE.match(text)
    if not m:
        return False, ""
    return True, (m.group(1) or "").strip()


# -- structure ---------------------------------------------------------------------

# Text kept per paragraph and per list item, and nested items kept per item:
# everything past these is cut from the output anyway, so it is not kept.
_PARA_BUDGET = 2 * MAX_DESCRIPTION_CHARS
_ITEM_CHILDREN = 64


class _Para:
    __slots__ = ("chars", "line", "lines")

    def __init__(self, text: str, line: int) -> None:
        self.lines = [text]
        self.line = line
        self.chars = len(text)

    def add(self, text: str) -> None:
        if self.chars < _PARA_BUDGET:
            self.lines.append(text)
            self.chars += len(text)


class _Item:
    __slots__ = ("chars", "check", "children", "indent", "line", "paras")

    def __init__(self, indent: int, line: int, check: str | None, text: str) -> None:
        self.indent = indent
        self.line = line
        self.check = check
        self.paras: list[list[str]] = [[text]]
        self.children: list[_Item] = []
        self.chars = len(text)

    @property
    def text(self) -> str:
        return " ".join(self.paras[0])

    def add(self, text: str, *, new_para: bool) -> None:
        if self.chars >= _PARA_BUDGET:
            return
        self.chars += len(text)
        if new_para:
            self.paras.append([text])
        else:
            self.paras[-1].append(text)


class _Section:
    __slots__ = ("body", "children", "kind", "level", "line", "parent", "title")

    def __init__(self, level: int, title: str, line: int, parent: _Section | None) -> None:
        self.level = level
        self.title = title
        self.line = line
        self.parent = parent
        self.body: list[_Line] = []
        self.children: list[_Section] = []
        self.kind = _classify(title) if level else _Kind.NEUTRAL

    def blocks(self) -> Iterator[_Para | _Item]:
        return _blocks(self.body)


def _blocks(lines: Sequence[_Line]) -> Iterator[_Para | _Item]:
    """A section body as paragraphs and top-level list items (nested items inside).

    A generator, so a caller that has enough stops early. A block is yielded
    once the next top-level block starts (or the body ends), so it is complete.
    """
    stack: list[_Item] = []
    para: _Para | None = None
    pending: _Para | _Item | None = None
    after_blank = False
    for ln in lines:
        kind = ln.kind
        if kind == _BLANK:
            para = None
            after_blank = True
            continue
        if kind == _RULE:
            stack.clear()
            para = None
            after_blank = False
            continue
        if kind == _BULLET:
            para = None
            after_blank = False
            while stack and ln.indent <= stack[-1].indent:
                stack.pop()
            if len(stack) >= _MAX_LIST_DEPTH:
                stack.pop()
            item = _Item(ln.indent, ln.no, ln.check, ln.text)
            if stack:
                if len(stack[-1].children) < _ITEM_CHILDREN:
                    stack[-1].children.append(item)
            else:
                if pending is not None:
                    yield pending
                pending = item
            stack.append(item)
            continue
        # text
        if stack:
            owner = None
            for candidate in reversed(stack):
                if candidate.indent < ln.indent:
                    owner = candidate
                    break
            if owner is not None:
                while stack[-1] is not owner:
                    stack.pop()
                owner.add(ln.text, new_para=after_blank)
                after_blank = False
                continue
            if not after_blank:  # lazy continuation
                stack[-1].add(ln.text, new_para=False)
                continue
            stack.clear()
        if para is None:
            if pending is not None:
                yield pending
            pending = para = _Para(ln.text, ln.no)
        else:
            para.add(ln.text)
        after_blank = False
    if pending is not None:
        yield pending


def _para_text(lines: Sequence[str]) -> str:
    if lines and lines[0].startswith("|"):  # a table keeps its rows
        return "\n".join(line.strip() for line in lines)
    return _one_line(" ".join(lines))


_META_LINE_RE = re.compile(r"^[*_]{0,2}([A-Za-z][\w ./-]{0,30}?)[*_]{0,2}\s*:[*_]{0,2}\s+(.*)$")


def _is_metadata_para(lines: Sequence[str]) -> bool:
    """`Status: draft` / `**Owner:** Ana` lines (short keys, short values): metadata, not prose."""
    for line in lines:
        m = _META_LINE_RE.match(line)
        if not m or len(m.group(1).split()) > 3 or len(m.group(2)) > 60:
            return False
    return True


class _Draft:
    __slots__ = (
        "acceptance",
        "description",
        "group_priority",
        "line",
        "priority",
        "section",
        "title",
    )

    def __init__(
        self,
        title: str,
        description: list[str],
        acceptance: list[str],
        priority: int | None,
        group_priority: int | None,
        section: str,
        line: int,
    ) -> None:
        self.title = title
        self.description = description
        self.acceptance = acceptance
        self.priority = priority
        self.group_priority = group_priority
        self.section = section
        self.line = line


def _walk_sections(section: _Section) -> Iterator[_Section]:
    for child in section.children:
        yield child
        yield from _walk_sections(child)


def _is_group(section: _Section) -> bool:
    """A neutral heading with task-like sub-headings groups tasks instead of being one."""
    return any(
        child.kind in (_Kind.NEUTRAL, _Kind.FEATURE, _Kind.ITEM) for child in section.children
    )


def _positional_priority(index: int, total: int) -> int:
    if total <= 3:
        return PRIORITY_HIGH
    if index * 3 < total:
        return PRIORITY_HIGH
    if index * 3 < 2 * total:
        return PRIORITY_MEDIUM
    return PRIORITY_LOW


_WRAP_TAIL = (",", "(", "-", "&", "/", "+")


def _title_lines(lines: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split an item's first paragraph into its title lines and description lines.

    A hard-wrapped title goes on: the next line starts in lower case or with a
    digit, or the line before ends with `,` `(` `-` `&` `/` `+`. Any other line
    (`- Signup` / `Users create an account.`) starts the description.
    """
    count = 1
    while count < len(lines):
        before, after = lines[count - 1], lines[count]
        if after[:1].islower() or after[:1].isdigit() or before.endswith(_WRAP_TAIL):
            count += 1
        else:
            break
    return list(lines[:count]), list(lines[count:])


_LEAD_RE = re.compile(r"^(\*\*|__)(?=\S)(.+?)(?<=\S)\1\s*(.*)$", re.DOTALL)
_LEAD_SEP_RE = re.compile(r"^[:.\u2013\u2014-]+\s*")


def _split_lead(text: str) -> tuple[str, str]:
    """A list item's (title, rest): `**Login** - users sign in` -> ("Login", "users sign in")."""
    m = _LEAD_RE.match(text.strip()[:_CLEAN_WINDOW])
    if m and m.group(3):
        title = _clean_inline(m.group(2)).rstrip(":.").strip()
        rest = _LEAD_SEP_RE.sub("", m.group(3))
        if title:
            return title, _one_line(rest)
    return _clean_inline(text), ""


def _flatten(items: Iterable[_Item], out: list[str]) -> None:
    """Nested items -> criteria. A `Label:` item with children becomes `Label: a; b`."""
    for item in items:
        if len(out) > MAX_ACCEPTANCE_ITEMS:  # one past the cap: enough to report the cut
            return
        text = _clean_inline(item.text)
        if item.children and text.endswith(":"):
            inner: list[str] = []
            _flatten(item.children, inner)
            out.append(f"{text} {'; '.join(inner)}" if inner else text.rstrip(":"))
            continue
        if text:
            out.append(text)
        _flatten(item.children, out)


def _render(item: _Item, out: list[str], depth: int) -> None:
    """An item as description lines (`- text`, nested ones indented)."""
    if len(out) > MAX_DESCRIPTION_CHARS // 8:  # the description is cut later anyway
        return
    box = "" if item.check is None else f"[{item.check}] "
    out.append(f"{'  ' * depth}- {box}{_one_line(item.text)}")
    for para in item.paras[1:]:
        out.append(f"{'  ' * (depth + 1)}{_para_text(para)}")
    for child in item.children:
        _render(child, out, depth + 1)


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.warnings: list[PrdWarning] = []
        self.drafts: list[_Draft] = []
        self.doc_acceptance: list[str] = []
        self.front_title: str | None = None

    def warn(self, code: str, message: str, line: int | None = None) -> None:
        self.warnings.append(PrdWarning(code=code, message=message, line=line))

    @property
    def full(self) -> bool:
        """One task past the cap is enough to know the PRD was truncated."""
        return len(self.drafts) > MAX_PRD_TASKS

    # -- scanning

    def scan(self) -> list[_Line]:
        text = self.text.removeprefix("\ufeff")
        if "\r" in text:
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        raw = text.split("\n")
        start = _front_matter_end(raw)
        for line in raw[1 : max(start - 1, 1)]:
            m = _FRONT_TITLE_RE.match(line)
            if m:
                self.front_title = _clean_inline(m.group(1).strip("\"'")) or None
                break
        out: list[_Line] = []
        append = out.append
        fence: tuple[str, int, int] | None = None
        comment_line = 0
        last_blank = True  # no blank line before the first one
        for i in range(start, len(raw)):
            line = raw[i]
            stripped = line.strip()
            if fence is not None:
                if stripped[:1] == fence[0]:
                    m = _FENCE_RE.match(stripped)
                    if m and len(m.group(1)) >= fence[1] and not m.group(2).strip():
                        fence = None
                continue
            if comment_line:
                if "-->" in line:
                    comment_line = 0
                continue
            if not stripped:
                if not last_blank:
                    append(_Line(_BLANK, i + 1))
                    last_blank = True
                continue
            first = stripped[0]
            if first not in _SPECIAL_START:
                append(_Line(_TEXT, i + 1, _indent_of(line), stripped))
                last_blank = False
                continue
            kind = self.special(line, stripped, i + 1, out)
            if kind == -1:  # opens a fence
                m = _FENCE_RE.match(stripped)
                assert m is not None
                fence = (m.group(1)[0], len(m.group(1)), i + 1)
                if not last_blank:
                    append(_Line(_BLANK, i + 1))
                    last_blank = True
            elif kind == -2:  # opens a comment
                comment_line = i + 1
            elif kind != -3:  # -3: consumed (a comment line, a setext underline)
                last_blank = False
        if fence is not None:
            self.warn(
                "unclosed_fence",
                f"code fence opened on line {fence[2]} is never closed; "
                "the rest of the PRD is treated as code",
                fence[2],
            )
        if comment_line:
            self.warn(
                "unclosed_comment",
                f"HTML comment opened on line {comment_line} is never closed; "
                "the rest of the PRD is ignored",
                comment_line,
            )
        return out

    def special(self, line: str, stripped: str, no: int, out: list[_Line]) -> int:
        """Classify a line that starts with a Markdown-significant character.

        Appends the line to `out` and returns its kind, or returns -1 (a fence
        opens), -2 (a comment opens) or -3 (consumed, nothing appended).
        """
        first = stripped[0]
        if first in "`~":
            m = _FENCE_RE.match(stripped)
            if m and not (first == "`" and "`" in m.group(2)):
                return -1
        elif first == "<" and stripped.startswith("<!--"):
            return -3 if "-->" in stripped[4:] else -2
        indent = _indent_of(line)
        if indent <= 3:
            if first == "#":
                m = _ATX_RE.match(stripped)
                if m:
                    title = _strip_closing_hashes((m.group(2) or "").strip())
                    heading = _Line(_HEADING, no, 0, title)
                    heading.level = len(m.group(1))
                    out.append(heading)
                    return _HEADING
            if (
                first in "=-"
                and len(stripped) >= 3
                and not stripped.strip(first)
                and self._setext_target(out)
            ):
                out[-1].kind = _HEADING
                out[-1].level = 1 if first == "=" else 2
                return -3
            if first in "-*_" and not stripped.strip(first + " \t") and stripped.count(first) >= 3:
                out.append(_Line(_RULE, no))
                return _RULE
        m = _BULLET_RE.match(stripped)
        if m:
            content = (m.group(2) or "").strip()
            check: str | None = None
            if content[:1] == "[":
                cm = _CHECK_RE.match(content)
                if cm:
                    check = cm.group(1).lower()
                    content = (cm.group(2) or "").strip()
            out.append(_Line(_BULLET, no, indent, content, check))
            return _BULLET
        if first == ">":
            stripped = stripped.lstrip("> \t") or stripped
        out.append(_Line(_TEXT, no, indent, stripped))
        return _TEXT

    @staticmethod
    def _setext_target(out: Sequence[_Line]) -> bool:
        """The previous line is a one-line paragraph (the only setext form honoured)."""
        if not out or out[-1].kind != _TEXT or out[-1].indent > 3:
            return False
        return len(out) == 1 or out[-2].kind in (_BLANK, _HEADING, _RULE)

    def tree(self, lines: Sequence[_Line]) -> _Section:
        root = _Section(level=0, title="", line=0, parent=None)
        current = root
        for ln in lines:
            if ln.kind == _HEADING:
                while current.level >= ln.level:
                    assert current.parent is not None
                    current = current.parent
                title = _clean_inline(ln.text).rstrip(":").strip()
                section = _Section(ln.level, title, ln.no, current)
                current.children.append(section)
                current = section
            else:
                current.body.append(ln)
        return root

    # -- walking

    def run(self) -> PrdParseResult:
        root = self.tree(self.scan())
        h1s = [s for s in root.children if s.level == 1]
        # Front matter's `title` is the title (site generators render it as
        # the H1, so the document's own H1s are sections); else a lone H1 is.
        title_section = h1s[0] if len(h1s) == 1 and self.front_title is None else None
        doc_title = self.front_title or (h1s[0].title if h1s else None)
        self.walk(root, title_section)
        return self.finish(root, doc_title)

    def walk(self, section: _Section, title_section: _Section | None) -> None:
        """Outside any feature section: look for feature sections and item headings."""
        for child in section.children:
            if self.full:
                return
            kind = child.kind
            # The title is never a feature section, except in a document that
            # is one list under it ("# Todo app requirements" + items).
            if child is title_section and (
                child.children or kind not in (_Kind.FEATURE, _Kind.ITEM)
            ):
                self.walk(child, title_section)
            elif kind is _Kind.ITEM:
                self.leaf(child, section.title, None, explicit_item=True)
            elif kind is _Kind.FEATURE:
                self.group(child, _section_priority(child.title))
            elif kind is _Kind.CRITERIA:
                self.doc_acceptance.extend(self.criteria_of(child))
            elif kind is _Kind.NEUTRAL:
                self.walk(child, title_section)
            # EXCLUDED, META, NFR: nothing below them is a task

    def group(self, section: _Section, priority: int | None) -> None:
        """A feature section: top-level items and sub-headings are tasks."""
        for block in section.blocks():
            if self.full:
                return
            if isinstance(block, _Item):
                self.item_task(block, section.title, priority)
        for child in section.children:
            if self.full:
                return
            kind = child.kind
            own = _section_priority(child.title)
            inherited = own if own is not None else priority
            if kind is _Kind.ITEM:
                self.leaf(child, section.title, inherited, explicit_item=True)
            elif kind is _Kind.FEATURE:
                self.group(child, inherited)
            elif kind is _Kind.CRITERIA:
                self.doc_acceptance.extend(self.criteria_of(child))
            elif kind is _Kind.NEUTRAL:
                if _is_group(child):
                    self.group(child, inherited)
                else:
                    self.leaf(child, section.title, inherited)
            # EXCLUDED, META, NFR: not tasks

    def criteria_of(self, section: _Section) -> list[str]:
        out: list[str] = []
        for block in section.blocks():
            if len(out) > MAX_ACCEPTANCE_ITEMS:
                break
            if isinstance(block, _Item):
                _flatten([block], out)
        for child in section.children:
            out.extend(self.criteria_of(child))
        return out

    def item_task(self, item: _Item, section_title: str, group_priority: int | None) -> None:
        if item.check == "x":
            self.warn(
                "checked_item_skipped",
                f"line {item.line}: checked item skipped (already done): "
                f"{_cut(_clean_inline(item.text), 80)}",
                item.line,
            )
            return
        head, tail = _title_lines(item.paras[0])
        title, description = _split_lead(" ".join(head))
        if not title:
            return
        parts = [description] if description else []
        if tail:
            parts.append(_para_text(tail))
        parts += [_para_text(p) for p in item.paras[1:]]
        acceptance: list[str] = []
        priority: int | None = None
        labels = [_ac_label(_clean_inline(child.text)) for child in item.children]
        has_label = any(is_label for is_label, _ in labels)
        for child, (is_label, inline) in zip(item.children, labels, strict=True):
            child_priority = _priority_line(_clean_inline(child.text))
            if child_priority is not None:
                priority = child_priority
            elif is_label:
                if inline:
                    acceptance.append(inline)
                _flatten(child.children, acceptance)
            elif has_label:
                _render(child, parts, 0)
            else:
                _flatten([child], acceptance)
        self.add(title, parts, acceptance, priority, group_priority, section_title, item.line)

    def leaf(
        self,
        section: _Section,
        parent_title: str,
        group_priority: int | None,
        *,
        explicit_item: bool = False,
    ) -> None:
        """A heading that is one task: its text is the description, its items the criteria."""
        description: list[str] = []
        acceptance: list[str] = []
        loose: list[_Item] = []
        priority: int | None = None
        in_ac = has_label = False
        for block in section.blocks():
            if (
                len(acceptance) > MAX_ACCEPTANCE_ITEMS
                and len(loose) > MAX_ACCEPTANCE_ITEMS
                and sum(map(len, description)) > MAX_DESCRIPTION_CHARS
            ):
                break  # everything further would be cut
            if isinstance(block, _Para):
                lines = block.lines
                text = _clean_inline(" ".join(lines))
                line_priority = _priority_line(text)
                if line_priority is not None:
                    priority = line_priority
                    continue
                # An acceptance label may end a paragraph ("... text.\nAcceptance criteria:").
                is_label, inline = _ac_label(_clean_inline(lines[-1]))
                if is_label:
                    in_ac = has_label = True
                    if inline:
                        acceptance.append(inline)
                    lines = lines[:-1]
                if lines:
                    description.append(_para_text(lines))
                continue
            text = _clean_inline(block.text)
            line_priority = _priority_line(text)
            if line_priority is not None:
                priority = line_priority
                continue
            is_label, inline = _ac_label(text)
            if is_label:
                has_label = True
                if inline:
                    acceptance.append(inline)
                _flatten(block.children, acceptance)
            elif in_ac:
                _flatten([block], acceptance)
            elif len(loose) <= MAX_ACCEPTANCE_ITEMS:
                loose.append(block)
        has_label = has_label or any(c.kind is _Kind.CRITERIA for c in section.children)
        for item in loose:
            if has_label:
                _render(item, description, 0)
            else:
                _flatten([item], acceptance)
        for child in section.children:
            if child.kind is _Kind.CRITERIA:
                acceptance.extend(self.criteria_of(child))
            elif child.kind is not _Kind.EXCLUDED:
                self.describe_section(child, description)
        self.add(
            section.title,
            description,
            acceptance,
            priority,
            group_priority,
            parent_title,
            section.line,
        )

    def describe_section(self, section: _Section, out: list[str]) -> None:
        if sum(map(len, out)) > MAX_DESCRIPTION_CHARS:
            return
        if section.title:
            out.append(f"{section.title}:")
        for block in section.blocks():
            if len(out) > MAX_DESCRIPTION_CHARS // 8:
                return
            if isinstance(block, _Para):
                out.append(_para_text(block.lines))
            else:
                _render(block, out, 0)
        for child in section.children:
            if child.kind is not _Kind.EXCLUDED:
                self.describe_section(child, out)

    def add(
        self,
        title: str,
        description: list[str],
        acceptance: list[str],
        priority: int | None,
        group_priority: int | None,
        section: str,
        line: int,
    ) -> None:
        title, marker = _strip_title_priority(title)
        title = title.rstrip(":").strip()
        if not title:
            return
        self.drafts.append(
            _Draft(
                title=title,
                description=[d for d in description if d],
                acceptance=[a for a in acceptance if a],
                priority=priority if priority is not None else marker,
                group_priority=group_priority,
                section=section,
                line=line,
            )
        )

    # -- output

    def first_paragraph(self, root: _Section) -> str | None:
        """The first prose paragraph of the document (metadata lines skipped)."""
        for section in [root, *_walk_sections(root)]:
            for block in section.blocks():
                if isinstance(block, _Para) and not _is_metadata_para(block.lines):
                    text = _para_text(block.lines)
                    if text:
                        return text
        return None

    def finish(self, root: _Section, doc_title: str | None) -> PrdParseResult:
        drafts = self.drafts
        truncated = len(drafts) > MAX_PRD_TASKS
        if truncated:
            self.warn(
                "tasks_truncated",
                f"the PRD yields more than {MAX_PRD_TASKS} tasks; only the first "
                f"{MAX_PRD_TASKS} were kept (the first one left out is on line "
                f"{drafts[MAX_PRD_TASKS].line})",
                drafts[MAX_PRD_TASKS].line,
            )
            drafts = drafts[:MAX_PRD_TASKS]
        doc_acceptance = self.bound_acceptance(self.doc_acceptance, "the document", None)
        fallback = not drafts
        if fallback:
            self.warn(
                "no_features",
                "no feature or requirement section with tasks was found; "
                f"the PRD becomes one task, {FALLBACK_TITLE!r}",
            )
            description = self.first_paragraph(root) or doc_title or ""
            drafts = [
                _Draft(
                    title=FALLBACK_TITLE,
                    description=[description] if description else [],
                    acceptance=list(doc_acceptance),
                    priority=PRIORITY_HIGH,
                    group_priority=None,
                    section=doc_title or "",
                    line=1,
                )
            ]
        total = len(drafts)
        tasks = []
        for index, draft in enumerate(drafts):
            priority = draft.priority
            if priority is None:
                priority = draft.group_priority
            if priority is None:
                priority = _positional_priority(index, total)
            tasks.append(self.build(index, draft, priority))
        return PrdParseResult(
            tasks=tuple(tasks),
            warnings=tuple(self.warnings),
            title=_cut(doc_title, MAX_TITLE_CHARS) if doc_title else None,
            acceptance=tuple(doc_acceptance),
            truncated=truncated,
            fallback=fallback,
        )

    def bound_acceptance(self, items: Sequence[str], owner: str, line: int | None) -> list[str]:
        out = []
        long_ones = 0
        for item in items[:MAX_ACCEPTANCE_ITEMS]:
            if len(item) > MAX_CRITERION_CHARS:
                long_ones += 1
            out.append(_cut(item, MAX_CRITERION_CHARS))
        if len(items) > MAX_ACCEPTANCE_ITEMS:
            self.warn(
                "acceptance_truncated",
                f"{owner} has more than {MAX_ACCEPTANCE_ITEMS} acceptance criteria; "
                f"only the first {MAX_ACCEPTANCE_ITEMS} were kept",
                line,
            )
        if long_ones:
            self.warn(
                "acceptance_truncated",
                f"{owner}: {long_ones} acceptance criteria cut to {MAX_CRITERION_CHARS} characters",
                line,
            )
        return out

    def build(self, index: int, draft: _Draft, priority: int) -> PrdTask:
        task_id = f"prd-{index + 1:03d}"
        description = list(draft.description)
        title = _cut(draft.title, MAX_TITLE_CHARS)
        if title != draft.title:
            self.warn(
                "title_truncated",
                f"{task_id} (line {draft.line}): title cut to {MAX_TITLE_CHARS} characters; "
                "the full text opens the description",
                draft.line,
            )
            description.insert(0, draft.title)
        text = "\n".join(description)
        if len(text) > MAX_DESCRIPTION_CHARS:
            self.warn(
                "description_truncated",
                f"{task_id} (line {draft.line}): description cut to "
                f"{MAX_DESCRIPTION_CHARS} characters",
                draft.line,
            )
            text = _cut(text, MAX_DESCRIPTION_CHARS)
        owner = f"{task_id} (line {draft.line})"
        return PrdTask(
            id=task_id,
            title=title,
            description=text,
            priority=priority,
            acceptance=tuple(self.bound_acceptance(draft.acceptance, owner, draft.line)),
            section=_cut(draft.section, MAX_TITLE_CHARS),
            line=draft.line,
        )
