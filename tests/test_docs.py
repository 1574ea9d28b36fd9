"""The hand-written documents say what the code does.

* docs/configuration.md: a row for every setting with its flag, variable and
  default; every environment variable the code reads is named.
* docs/architecture.md: the supervisor tree is the real one, and the mailbox
  table states every actor's bound and policy.
* docs/troubleshooting.md: every message it quotes is still in the code.
* README.md links every document; relative links and their anchors resolve.

(The generated documents have their own tests: tests/test_apidoc.py,
tests/test_session_state.py.)
"""

from __future__ import annotations

import ast
import inspect
import re
import socket
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from lokid import cli
from lokid.actor import Actor, WhenFull
from lokid.actors.agent_pool import AgentPool
from lokid.actors.audit_writer import AuditWriter
from lokid.actors.event_bus import EventBus
from lokid.actors.registry_scanner import RegistryScanner
from lokid.actors.session import SessionActor
from lokid.actors.session_manager import SessionManager
from lokid.actors.store import StoreActor
from lokid.config import SETTINGS, Config
from lokid.daemon import Daemon, Listeners
from lokid.http.ws import CLIENT_QUEUE
from lokid.supervisor import Supervisor
from lokid.systemd import Notifier

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
LOKID = ROOT / "lokid"


def read(name: str) -> str:
    return (ROOT / name).read_text(encoding="utf-8")


def section(text: str, heading: str) -> str:
    """The body of the `## heading` section (up to the next `## `)."""
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else len(text)]


def table_rows(text: str) -> Iterator[list[str]]:
    """The cells of each table row in `text`, header and separator rows left out."""
    for line in text.splitlines():
        if not line.startswith("|") or set(line) <= set("|-: "):
            continue
        cells = re.split(r"(?<!\\)\|", line.strip())[1:-1]
        yield [cell.strip() for cell in cells]


# -- docs/configuration.md ----------------------------------------------------------


def _flags_by_setting() -> dict[str, set[str]]:
    """Every option of every `loki` command that sets a config field (dest cfg_<field>)."""
    found: dict[str, set[str]] = {}

    def walk(parser: Any) -> None:
        for action in parser._actions:
            if action.dest.startswith("cfg_"):
                found.setdefault(action.dest[4:], set()).update(action.option_strings)
            if isinstance(getattr(action, "choices", None), dict):
                for sub in action.choices.values():
                    walk(sub)

    walk(cli.build_parser())
    return found


def _default_text(name: str) -> str | None:
    """How the settings table writes the default of `name`; None: written in words."""
    value = attrs.fields_dict(Config)[name].default
    if value is None or value == ():
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return ",".join(value)
    return str(value)


def test_every_setting_has_its_row_with_flag_variable_and_default() -> None:
    rows = {
        row[0].strip("`"): row
        for row in table_rows(section(read("docs/configuration.md"), "Settings"))
    }
    assert set(rows) - {"key"} == set(SETTINGS), "the table's keys are not config.SETTINGS"
    flags = _flags_by_setting()
    for name, setting in SETTINGS.items():
        _, flag, env, default, meaning = rows[name]
        assert env == f"`{setting.env}`", name
        documented = set(re.findall(r"`(?:loki \w+ \w+ )?(--[a-z-]+)`", flag))
        assert documented == flags.get(name, set()), (name, flag)
        if not flags.get(name):
            assert flag == "—", name
        expected = _default_text(name)
        if expected is not None:
            assert default == f"`{expected}`", (name, default)
        assert meaning, name


def test_every_environment_variable_the_code_reads_is_documented() -> None:
    text = read("docs/configuration.md")
    names: set[str] = set()
    for path in LOKID.rglob("*.py"):
        source = path.read_text(encoding="utf-8")
        names.update(re.findall(r"\bLOKI_[A-Z][A-Z_]*[A-Z]\b", source))
        names.update(re.findall(r"""(?:environ|env)(?:\.get\(|\[)\s*["']([A-Z_]+)["']""", source))
    assert "LOKI_HOME" in names and "NOTIFY_SOCKET" in names
    missing = sorted(name for name in names if f"`{name}`" not in text)
    assert not missing, f"docs/configuration.md does not name {missing}"


# -- docs/architecture.md -----------------------------------------------------------


def _real_tree(tmp_path: Path) -> list[tuple[str, str]]:
    """(name, "strategy, N restarts / P s" for a supervisor, else "") of the daemon's
    tree as `Daemon._build_tree` makes it, depth first."""
    daemon = Daemon(Config(loki_home=tmp_path), notifier=Notifier({}))
    sockets = [socket.socket(), socket.socket(), socket.socket(socket.AF_UNIX)]
    try:
        api, dashboard, control = sockets
        daemon._build_tree(Listeners(api, dashboard, control, frozenset()))
    finally:
        for sock in sockets:
            sock.close()

    def describe(supervisor: Supervisor) -> str:
        return (
            f"{supervisor.strategy.value}, "
            f"{supervisor.max_restarts} restarts / {supervisor.period:g} s"
        )

    found: list[tuple[str, str]] = []

    def walk(supervisor: Supervisor) -> None:
        found.append((supervisor.name, describe(supervisor)))
        for info in supervisor.which_children():
            start = supervisor._children[info.id].spec.start
            nested = getattr(start, "__self__", None)
            if isinstance(nested, Supervisor):
                walk(nested)
                continue
            found.append((info.id, ""))
            if isinstance(nested, SessionManager):
                found.append((nested.supervisor.name, describe(nested.supervisor)))
                found.append(("session-…", ""))

    walk(daemon.root)
    return found


def test_the_supervisor_tree_is_the_real_one(tmp_path: Path) -> None:
    block = section(read("docs/architecture.md"), "The supervisor tree").split("```")[1]
    lines = [line for line in block.splitlines() if re.search(r"\w", line)]
    drawn = [(re.sub(r"^[\s│├└─]*", "", line).split()[0], line) for line in lines]
    drawn = [(name, line) for name, line in drawn if not name.startswith("at")]
    real = _real_tree(tmp_path)
    assert [name for name, _ in drawn] == [name for name, _ in real]
    for (name, line), (_, description) in zip(drawn, real, strict=True):
        if description:
            strategy, intensity = description.split(", ")
            assert strategy in line and intensity in line, (name, description)


MAILBOX_ROWS: dict[str, type[Actor[Any]]] = {
    "store": StoreActor,
    "audit_writer": AuditWriter,
    "event_bus": EventBus,
    "agent_pool": AgentPool,
    "sessions (manager)": SessionManager,
    "session-… (SessionActor)": SessionActor,
    "registry": RegistryScanner,
}
POLICY_WORDS = {WhenFull.BLOCK: "**block**", WhenFull.REJECT: "**refuse**"}


def test_the_mailbox_table_states_every_actors_bound_and_policy() -> None:
    table = section(read("docs/architecture.md"), "Actors and their mailboxes")
    rows = {row[0].replace("`", ""): row for row in table_rows(table)}
    for name, kind in MAILBOX_ROWS.items():
        _, bound, when_full, _ = rows[name]
        assert re.match(rf"{kind.mailbox_size}\b", bound), (name, bound)
        assert POLICY_WORDS[kind.when_full] in bound + when_full, (name, when_full)
    queue = inspect.signature(EventBus).parameters["subscriber_queue"].default
    assert rows["SSE stream (per subscriber)"][1] == f"{queue} frames"
    assert rows["/ws client (per connection)"][1] == f"{CLIENT_QUEUE} messages"


# -- docs/troubleshooting.md ---------------------------------------------------------


def _code_strings() -> list[str]:
    """Every string literal of the package; an f-string's fields become NUL."""
    found: list[str] = []
    for path in LOKID.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                found.append(node.value)
            elif isinstance(node, ast.JoinedStr):
                found.append(
                    "".join(
                        str(part.value) if isinstance(part, ast.Constant) else "\0"
                        for part in node.values
                    )
                )
    return found


def _quoted_messages(text: str) -> Iterator[str]:
    """What the page quotes as lokid's messages: `Message:` spans, and the first code
    span of each cell of a table column headed "message"."""
    for match in re.finditer(r"Message:\s+(`+)\s?(.+?)\s?\1(?!`)", text, re.DOTALL):
        yield " ".join(match.group(2).split())
    header: list[str] | None = None
    for line in text.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if header is None:
            header = cells
            continue
        if "message" not in header or set(line) <= set("|-: "):
            continue
        cell = cells[header.index("message")]
        span = re.match(r"(`+)\s?(.+?)\s?\1(?!`)", cell)
        if span is not None:
            yield span.group(2).replace("\\|", "|")


def _in_code(message: str, strings: list[str]) -> bool:
    fragments = [f.strip() for f in message.split("…") if f.strip(" .")]
    for candidate in strings:
        position = 0
        for fragment in fragments:
            position = candidate.find(fragment, position)
            if position < 0:
                break
            position += len(fragment)
        else:
            return True
    return False


def test_every_message_troubleshooting_quotes_is_in_the_code() -> None:
    messages = list(_quoted_messages(read("docs/troubleshooting.md")))
    assert len(messages) > 40
    strings = _code_strings()
    missing = [m for m in messages if not _in_code(m, strings)]
    assert not missing, f"docs/troubleshooting.md quotes messages the code no longer has: {missing}"


# -- links ---------------------------------------------------------------------------


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"`|\*\*|\[|\]\([^)]*\)", "", heading).strip().lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return kept.replace(" ", "-")


def _anchors(text: str) -> set[str]:
    found = set(re.findall(r'<a id="([^"]+)"></a>', text))
    seen: dict[str, int] = {}
    in_code = False
    for line in text.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code or not line.startswith("#"):
            continue
        slug = _slug(line.lstrip("#"))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


DOCUMENTS = sorted([ROOT / "README.md", *DOCS.glob("*.md")])


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.name)
def test_relative_links_and_their_anchors_resolve(document: Path) -> None:
    text = re.sub(r"```.*?```", "", document.read_text(encoding="utf-8"), flags=re.DOTALL)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        file_part, _, anchor = target.partition("#")
        linked = (document.parent / file_part).resolve() if file_part else document
        if not linked.exists() or (
            anchor
            and linked.suffix == ".md"
            and anchor not in _anchors(linked.read_text(encoding="utf-8"))
        ):
            broken.append(target)
    assert not broken, f"{document.name}: broken links {broken}"


def test_readme_links_every_document() -> None:
    documentation = section(read("README.md"), "Documentation")
    linked = set(re.findall(r"\]\(docs/([^)#]+\.md)\)", documentation))
    missing = sorted({path.name for path in DOCS.glob("*.md")} - linked)
    assert not missing, (
        f"README.md's Documentation section does not link {missing}: add a line each"
    )
