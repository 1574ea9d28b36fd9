"""The audit log's records, hash chain and queries (DESIGN.md §7). Pure: no I/O, no trio.

Rules:

* An entry is `{"id", "timestamp", "actor", "action", "resource", "method",
  "path", "status", "ip", "details", "prev_hash", "hash"}`. `id` is assigned
  by the audit writer: 1, 2, 3, ... with no gap, in commit order.
* **What is hashed.** `hash = sha256_hex(prev_hash + canonical_json(entry
  without "hash"))`, UTF-8. The canonical JSON covers the eleven
  `HASHED_FIELDS` - `id` and `prev_hash` included, so renumbering or moving
  an entry changes its hash just like editing it - with sorted keys (also
  inside `details`), no whitespace (`","` and `":"`), non-ASCII kept as is
  (`ensure_ascii=False`), no NaN or infinity. `None` is JSON `null`, `status`
  an integer. The first entry's `prev_hash` is `GENESIS` (64 zeros).
* **An entry is normalised before it is hashed** (`normalise`), so that what
  is hashed is exactly what is stored and read back: text fields are cut to
  a stated length (`…` marks the cut) and cleaned of unpaired surrogates,
  `details` goes through one JSON round trip (keys become strings, tuples
  lists, unknown objects `str()`); details that cannot be JSON at all (NaN,
  a cycle) or whose JSON exceeds `MAX_DETAILS_BYTES` are replaced by a small
  object saying so. Recording a request never fails because of its details.
* **The chain head is anchored outside the entries** (`Anchor`: last id,
  last hash, entry count, one row updated in the same transaction as every
  append). Deleting the newest entries, or all of them, leaves the anchor
  pointing past the table: `truncated`.
* **`verify`** walks the entries in id order and reports the first problem,
  checked in this order for each entry: its id is the next one (else `gap`:
  the missing id), its hash matches its fields (else `edited`, or
  `reordered` when the entry is intact but was written under another id),
  its `prev_hash` is the previous entry's hash (else `broken link`); after
  the last entry, the anchor: missing while entries exist (`anchor missing`),
  ahead of the table (`truncated`: the first missing id), or disagreeing
  with it otherwise (`anchor mismatch`). Only the first problem is reported:
  later entries are not trusted after it. No anchor and no entry is a valid,
  empty log.
* What the chain cannot show: someone who can write the database file can
  rewrite every entry *and* the anchor consistently. Record the head that
  `verify` prints (`head_id`, `head_hash`) somewhere else to detect that.
* **Actions** are `<resource>.<verb>` (`session.create`, `token.revoke`),
  found from the method and the route template (`ROUTE_ACTIONS`); a request
  to a route not in the table is `<method lower> <path>`. An `action`
  filter is exact, or a family `session.*` (everything before the first dot
  is `session`); `*` alone is not a filter.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NoReturn

import attrs

from lokid.errors import InvalidQuery
from lokid.timefmt import iso

__all__ = [
    "DEFAULT_LIMIT",
    "GENESIS",
    "HASHED_FIELDS",
    "MAX_DETAILS_BYTES",
    "MAX_ID",
    "MAX_LIMIT",
    "MAX_OFFSET",
    "ROUTE_ACTIONS",
    "Anchor",
    "AuditEntry",
    "AuditQuery",
    "ChainReport",
    "ChainVerifier",
    "Head",
    "Problem",
    "Route",
    "action_for",
    "action_matches",
    "action_sql",
    "anchor_defect",
    "canonical_json",
    "chained_hash",
    "classify",
    "details_json",
    "entry_hash",
    "json_value",
    "normalise",
    "parse_action_filter",
    "parse_timestamp",
    "resume_head",
    "shown",
    "verify",
]

GENESIS = "0" * 64
"""The `prev_hash` of entry 1."""

HASHED_FIELDS: tuple[str, ...] = (
    "id",
    "timestamp",
    "actor",
    "action",
    "resource",
    "method",
    "path",
    "status",
    "ip",
    "details",
    "prev_hash",
)
"""Every field of an entry but `hash`; all of them are hashed."""

# Bounds of the text fields (characters) and of the details' JSON (UTF-8 bytes).
MAX_ACTOR = 200
MAX_ACTION = 200
MAX_RESOURCE = 500
MAX_METHOD = 16
MAX_PATH = 2048
MAX_IP = 100
MAX_DETAILS_BYTES = 16 * 1024

# Queries.
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
MAX_OFFSET = 2**62
MAX_FILTER_CHARS = 200

MAX_ID = 2**62
"""The highest entry id the writer goes on after. Far beyond any real log, and far
enough below SQLite's largest integer (2^63 - 1) that an edited anchor or entry id
can never leave the writer without a next id (`anchor_defect`, `resume_head`)."""

MAX_REORDER_SEARCH = 10_000_000
"""Ids tried to find where a displaced entry was written (about 1 µs each)."""


# -- records -----------------------------------------------------------------------


@attrs.frozen
class AuditEntry:
    """One committed audit entry, as stored and as served (snake_case JSON)."""

    id: int
    timestamp: str
    actor: str
    action: str
    resource: str | None
    method: str | None
    path: str | None
    status: int | None
    ip: str | None
    details: Any  # a JSON object; whatever is stored when read back from an edited row
    prev_hash: str
    hash: str

    def fields(self) -> dict[str, Any]:
        """The hashed fields (everything but `hash`)."""
        return {name: getattr(self, name) for name in HASHED_FIELDS}

    def to_json(self) -> dict[str, Any]:
        """As served; the values of an edited row that JSON cannot carry as they are (a
        BLOB, an infinite real) are shown as text (`json_value`)."""
        answer = {**self.fields(), "hash": self.hash}
        for name, value in answer.items():
            if not (value is None or type(value) is str or type(value) is int):
                answer[name] = json_value(value)
        return answer


@attrs.frozen
class Anchor:
    """The chain head kept apart from the entries (table `audit_anchor`)."""

    last_id: int
    last_hash: str
    entries: int

    def to_json(self) -> dict[str, Any]:
        return {
            "last_id": json_value(self.last_id),
            "last_hash": json_value(self.last_hash),
            "entries": json_value(self.entries),
        }


@attrs.frozen
class Head:
    """Where the writer goes on: the next entry is `last_id + 1` with `prev_hash = last_hash`.

    `problem` says why this head is not simply the anchor's (None when the
    anchor and the newest entry agree).
    """

    last_id: int
    last_hash: str
    problem: str | None = None


def resume_head(
    anchor: Anchor | None, newest: tuple[int, Any] | None, *, beyond: int | None = None
) -> Head:
    """Where to continue the chain, from the anchor and the newest entry's (id, hash).

    The writer never repairs: when the two disagree it continues from the
    anchor's hash (from `GENESIS` if the anchor is missing), with an id past
    both, so the break found now is still found by every later `verify`
    (as a `gap` or a `broken link`) instead of being papered over.

    The values are as read from an edited file: any type. An anchor whose
    `last_id` is not an id in 0..`MAX_ID` or whose `last_hash` is not a
    64-digit hash (`anchor_defect`) is a problem like any other, whose hash
    is not continued from: the chain goes on from `GENESIS` (after the
    anchor's id if that is one), as when the anchor is missing. `newest` is
    the newest entry with an id up to `MAX_ID`; `beyond`, the highest id
    past that, if any: an entry the chain cannot continue after.
    """
    head = _resume(anchor, newest)
    if beyond is None:
        return head
    problem = f"entry {beyond} lies past the last id the chain can go on after ({MAX_ID})"
    return attrs.evolve(head, problem=problem + (f"; {head.problem}" if head.problem else ""))


def _resume(anchor: Anchor | None, newest: tuple[int, Any] | None) -> Head:
    table = max(0, newest[0]) if newest is not None else None
    if anchor is None:
        if table is None:
            return Head(0, GENESIS)
        return Head(
            table,
            GENESIS,
            f"anchor missing while the table holds entries up to {table}: continuing at "
            f"{table + 1} from the genesis hash",
        )
    defect = anchor_defect(anchor)
    if defect is not None:
        last_id = max(table or 0, anchor.last_id if _is_id(anchor.last_id) else 0)
        return Head(
            last_id,
            GENESIS,
            f"the anchor was edited: {defect}; continuing at {last_id + 1} from the genesis hash",
        )
    head = Head(max(anchor.last_id, table or 0), anchor.last_hash)
    if newest is None or table is None:
        if anchor.last_id == 0:
            return head
        problem = f"truncated: the anchor's head is entry {anchor.last_id} but the table is empty"
    elif table < anchor.last_id:
        problem = (
            f"truncated: the anchor's head is entry {anchor.last_id} but the newest entry "
            f"is {table}"
        )
    elif table > anchor.last_id:
        problem = f"entries {anchor.last_id + 1}-{table} lie beyond the anchor's head"
    elif newest[1] != anchor.last_hash:
        problem = f"entry {table}'s hash differs from the anchor's"
    elif anchor.entries != anchor.last_id:
        problem = f"the anchor counts {shown(anchor.entries)} entries for head {anchor.last_id}"
    else:
        return head
    return attrs.evolve(head, problem=problem)


_HASH = re.compile(r"[0-9a-f]{64}")


def _is_id(value: object) -> bool:
    """An entry id the writer can go on after (0: an empty log)."""
    return type(value) is int and 0 <= value <= MAX_ID


def anchor_defect(anchor: Anchor) -> str | None:
    """Why the anchor, as read, cannot be continued from (None: it can).

    Its `last_id` must be an integer in 0..`MAX_ID` and its `last_hash` a
    hash as the writer writes it (64 lowercase hex digits, or `GENESIS`).
    Anything else - text where a number belongs, a BLOB, text that is not
    UTF-8, a real number, an id whose successor SQLite cannot store - was
    put there by hand. Its `entries` count is not checked here: a wrong count
    is the mismatch `resume_head` reports.
    """
    if not _is_id(anchor.last_id):
        return f"its last_id {shown(anchor.last_id)} is not an entry id (0-{MAX_ID})"
    if type(anchor.last_hash) is not str or not _HASH.fullmatch(anchor.last_hash):
        return f"its last_hash {shown(anchor.last_hash)} is not a SHA-256 hex digest"
    return None


def shown(value: object, limit: int = 80) -> str:
    """A stored value of any type for a message: its repr, cut at `limit` characters
    (a BLOB as `X'...'`, as SQLite writes one)."""
    text = f"X'{value[:limit].hex().upper()}'" if isinstance(value, bytes) else repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def json_value(value: Any) -> Any:
    """A stored column value as JSON can carry it: as is when it can (text, an integer,
    a finite real, null), else as text - a BLOB as `X'<hex>'`, an infinite real as
    `"inf"` - so that an edited row is shown, not a 500 (`AuditEntry.to_json`)."""
    kind = type(value)
    if value is None or kind is str or kind is int or kind is dict or kind is list:
        return value
    if kind is float:
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, bytes):
        return f"X'{value.hex().upper()}'"
    return str(value)


# -- canonical form and hash ----------------------------------------------------------


_DETAILS_ENCODER = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
)
_encode_text = json.encoder.encode_basestring  # what ensure_ascii=False uses, in C


def _not_json(value: object) -> NoReturn:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


# `_DETAILS_ENCODER.encode` without its per-call set-up: CPython's C encoder built once,
# with no circular-reference check (stored details come from `normalise`: plain or a
# JSON round trip, never cyclic). Half the time of `encode` for a small object.
_c_make_encoder: Callable[..., Callable[[Any, int], Iterable[str]]] | None = getattr(
    json.encoder, "c_make_encoder", None
)
_details_chunks = (
    None
    if _c_make_encoder is None
    else _c_make_encoder(None, _not_json, _encode_text, None, ":", ",", True, False, False)
)


def canonical_json(fields: Mapping[str, Any]) -> str:
    """The canonical JSON of an entry's `HASHED_FIELDS` (other keys, e.g. `hash`, ignored).

    Equal to `json.dumps({k: fields[k] for k in HASHED_FIELDS}, sort_keys=True,
    separators=(",", ":"), ensure_ascii=False, allow_nan=False)` - the
    definition, which the tests check this against - but built by hand for
    the usual field types (a third of the time). Raises `KeyError` if a
    hashed field is missing, `ValueError`/`TypeError` for values that are
    not JSON (entries from `normalise` never are).
    """
    return _canonical(fields, _encode_details(fields["details"]))


def _canonical(fields: Mapping[str, Any], details_json: str) -> str:
    """`canonical_json` with the details' canonical JSON already made."""
    text = _canonical_text(
        fields, fields["id"], fields["timestamp"], fields["prev_hash"], details_json
    )
    return _canonical_slow(fields) if text is None else text


def _canonical_text(
    fields: Mapping[str, Any], ident: Any, timestamp: Any, prev_hash: Any, details_json: str
) -> str | None:
    """The canonical JSON of `fields` with these id, timestamp and prev_hash, built by
    hand; None when a value is not of the usual type (the definition must decide)."""
    status = fields["status"]
    if type(ident) is not int or not (status is None or type(status) is int):
        return None
    try:
        return (
            f'{{"action":{_encode_text(fields["action"])},'
            f'"actor":{_encode_text(fields["actor"])},'
            f'"details":{details_json},"id":{ident},'
            f'"ip":{_text_or_null(fields["ip"])},'
            f'"method":{_text_or_null(fields["method"])},'
            f'"path":{_text_or_null(fields["path"])},'
            f'"prev_hash":{_encode_text(prev_hash)},'
            f'"resource":{_text_or_null(fields["resource"])},'
            f'"status":{"null" if status is None else status},'
            f'"timestamp":{_encode_text(timestamp)}}}'
        )
    except TypeError:  # a text field that is not text (an edited row): the definition
        return None


def chained_hash(
    prev_hash: str, fields: Mapping[str, Any], ident: int, timestamp: str, details_json: str
) -> str:
    """`entry_hash` of `fields` (from `normalise`) stored with this id and timestamp after
    `prev_hash`, without building the full record (the writer's hot path)."""
    text = _canonical_text(fields, ident, timestamp, prev_hash, details_json)
    if text is None:
        full = {**fields, "id": ident, "timestamp": timestamp, "prev_hash": prev_hash}
        return entry_hash(prev_hash, full, details_json=details_json)
    return hashlib.sha256((prev_hash + text).encode("utf-8", "surrogatepass")).hexdigest()


def _text_or_null(value: str | None) -> str:
    return "null" if value is None else _encode_text(value)


def _canonical_slow(fields: Mapping[str, Any]) -> str:
    return json.dumps(
        {name: fields[name] for name in HASHED_FIELDS},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
    )


def entry_hash(
    prev_hash: str, fields: Mapping[str, Any], *, details_json: str | None = None
) -> str:
    """`sha256_hex(prev_hash + canonical_json(fields))`; `fields` include `prev_hash` too.

    `details_json`: the details' canonical JSON if the caller has it already.
    """
    if details_json is None:
        details_json = _encode_details(fields["details"])
    text = prev_hash + _canonical(fields, details_json)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _encode_details(details: Any) -> str:
    """The canonical JSON of a `details` value (sorted keys, compact): how it is stored.

    `details` must not be cyclic (a `normalise`d value never is)."""
    if _details_chunks is None or type(details) is not dict:
        return _DETAILS_ENCODER.encode(details)
    return "".join(_details_chunks(details, 0))


details_json = _encode_details  # the public name (`entry_hash` has a parameter of that name)


def normalise(
    *,
    actor: str,
    action: str,
    resource: str | None = None,
    method: str | None = None,
    path: str | None = None,
    status: int | None = None,
    ip: str | None = None,
    details: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The stored form of an entry's caller-given fields (see the module rules).

    Raises `TypeError` for a `status` that is not an integer or None (a bug
    in the caller: statuses come from the HTTP layer).
    """
    if (
        status is not None
        and type(status) is not int
        and (isinstance(status, bool) or not isinstance(status, int))
    ):
        raise TypeError(f"status must be an int or None, got {status!r}")
    # The usual field (short ASCII text) is kept as given without a call to `_text`:
    # 1.32 -> 1.09 µs per call here, on the path of every mutating request.
    return {
        "actor": actor
        if type(actor) is str and len(actor) <= MAX_ACTOR and actor.isascii()
        else _text(actor, MAX_ACTOR),
        "action": action
        if type(action) is str and len(action) <= MAX_ACTION and action.isascii()
        else _text(action, MAX_ACTION),
        "resource": resource
        if resource is None
        or (type(resource) is str and len(resource) <= MAX_RESOURCE and resource.isascii())
        else _text(resource, MAX_RESOURCE),
        "method": None if method is None else _text(method, MAX_METHOD).upper(),
        "path": path
        if path is None or (type(path) is str and len(path) <= MAX_PATH and path.isascii())
        else _text(path, MAX_PATH),
        "status": status,
        "ip": ip
        if ip is None or (type(ip) is str and len(ip) <= MAX_IP and ip.isascii())
        else _text(ip, MAX_IP),
        "details": _details(details) if details else {},
    }


def _text(value: object, limit: int) -> str:
    if type(value) is str and value.isascii() and len(value) <= limit:
        return value  # the usual case: stored as given
    text = value if isinstance(value, str) else str(value)
    if not text.isascii():
        text = text.encode("utf-8", "replace").decode("utf-8")  # unpaired surrogates -> "?"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _details(details: Mapping[str, Any] | None) -> dict[str, Any]:
    if not details:
        return {}
    if _plain(details):
        return dict(details)  # the round trip below would not change it
    try:
        text = json.dumps(dict(details), ensure_ascii=False, allow_nan=False, default=str)
    except (TypeError, ValueError, RecursionError) as exc:
        return {"_unrecordable": f"{type(exc).__name__}: {exc}"[:200]}
    raw = text.encode("utf-8", "replace")
    if len(raw) > MAX_DETAILS_BYTES:
        return {
            "_truncated": True,
            "_bytes": len(raw),
            "_sha256": hashlib.sha256(raw).hexdigest(),
        }
    value: dict[str, Any] = json.loads(raw.decode("utf-8"))
    return value


def _plain(details: Mapping[str, Any]) -> bool:
    """Small, flat, ASCII text keys and values, ints of 64 bits, bools, None: the
    common case, whose JSON is certainly under `MAX_DETAILS_BYTES`."""
    if len(details) > 32:
        return False
    for key, value in details.items():
        if type(key) is not str or len(key) > 64 or not key.isascii():
            return False
        kind = type(value)
        if kind is str:
            if len(value) > 256 or not value.isascii():
                return False
        elif kind is int:
            if not -(2**63) <= value < 2**63:
                return False
        elif kind is not bool and value is not None:
            return False
    return True


# -- verification -------------------------------------------------------------------


class Problem(enum.Enum):
    """Why a chain is not valid; the value is the word `loki audit verify` prints."""

    EDITED = "edited"
    BROKEN_LINK = "broken link"
    GAP = "gap"
    REORDERED = "reordered"
    TRUNCATED = "truncated"
    ANCHOR_MISSING = "anchor missing"
    ANCHOR_MISMATCH = "anchor mismatch"


@attrs.frozen
class ChainReport:
    """The verdict on a chain.

    `entries_checked` counts the entries verified up to the verdict (all of
    them when valid, up to and including the first bad one otherwise).
    `first_bad_id` is the id of the first bad or missing entry (None when
    valid, and for `anchor missing`, which names no entry). `head_id` and
    `head_hash` are the last entry checked and found good (0 and `GENESIS`
    for an empty log): for a valid chain, its head - worth recording
    elsewhere.
    """

    valid: bool
    entries_checked: int
    first_bad_id: int | None
    problem: Problem | None
    message: str
    head_id: int
    head_hash: str
    anchor: Anchor | None

    def to_json(self) -> dict[str, Any]:
        return {
            "valid": self.valid,
            "entries_checked": self.entries_checked,
            "first_bad_id": self.first_bad_id,
            "reason": None if self.problem is None else self.problem.value,
            "message": self.message,
            "head_id": self.head_id,
            "head_hash": self.head_hash,
            "anchor": None if self.anchor is None else self.anchor.to_json(),
        }


@attrs.frozen
class _Found:
    problem: Problem
    entry_id: int | None
    message: str


class ChainVerifier:
    """Streaming `verify`: `feed` pages of entries in id order, then `finish()`.

    `anchor` is the chain head stored apart (read in the same snapshot as the
    entries): given first, so that the verifier keeps the hashes of the entry
    it names as it passes (entries after it are not anchored: the report's
    head is that entry, whose hash only the entry after it still knows).

    Memory is constant whatever the length of the chain. After the first
    problem the verifier needs no more entries (`wants_more` turns False),
    except when an entry looks displaced: then it reads on (without hashing)
    to learn the highest id, the range in which `finish` searches the id the
    entry was written under.
    """

    def __init__(self, anchor: Anchor | None = None) -> None:
        self._anchor = anchor
        # The anchor's id, if it is one (an edited anchor may hold text, a BLOB, a real).
        self._anchor_id: int | None = None
        if anchor is not None and type(anchor.last_id) is int and anchor.last_id >= 0:
            self._anchor_id = anchor.last_id
        self._next_id = 1
        self._prev_hash = GENESIS
        self._last_prev_hash = GENESIS  # the last good entry's prev_hash
        self._anchored: tuple[str, str] | None = None  # (prev_hash, hash) at anchor.last_id
        self._checked = 0
        self._found: _Found | None = None
        self._displaced: AuditEntry | None = None  # hash and link both wrong: moved?
        self._max_id = 0

    @property
    def wants_more(self) -> bool:
        return self._found is None or self._displaced is not None

    def feed(self, entries: Iterable[AuditEntry]) -> None:
        for entry in entries:
            if self._found is None:
                self._check(entry)
            elif self._displaced is None:
                return
            self._max_id = max(self._max_id, entry.id)

    def _check(self, entry: AuditEntry) -> None:
        expected = self._next_id
        if entry.id != expected:
            if entry.id > expected:
                missing = (
                    f"entry {expected} is missing"
                    if entry.id == expected + 1
                    else f"entries {expected}-{entry.id - 1} are missing"
                )
                self._found = _Found(Problem.GAP, expected, f"{missing} (next is {entry.id})")
            else:
                self._checked += 1
                self._found = _Found(
                    Problem.REORDERED, entry.id, f"entry {entry.id} comes after {expected - 1}"
                )
            return
        self._checked += 1
        try:
            good = entry_hash(entry.prev_hash, entry.fields()) == entry.hash
        except (TypeError, ValueError):  # a stored value JSON cannot represent
            good = False
        linked = entry.prev_hash == self._prev_hash
        if not good:
            self._found = _Found(
                Problem.EDITED, entry.id, f"entry {entry.id}'s hash does not match its fields"
            )
            if not linked:
                self._displaced = entry
            return
        if not linked:
            self._found = _Found(
                Problem.BROKEN_LINK,
                entry.id,
                f"entry {entry.id}'s prev_hash is not entry {entry.id - 1}'s hash "
                f"(entry {entry.id - 1} was changed and re-hashed, or {entry.id} was)",
            )
            return
        self._next_id = expected + 1
        self._last_prev_hash = entry.prev_hash
        self._prev_hash = entry.hash
        if entry.id == self._anchor_id:
            self._anchored = (entry.prev_hash, entry.hash)

    def finish(self) -> ChainReport:
        """The verdict. `head_id`/`head_hash` are the last entry found good: before a bad
        entry, and never past the anchor's head (entries after it are not anchored)."""
        anchor = self._anchor
        found = self._found
        if found is not None and self._displaced is not None:
            limit = max(self._max_id, self._anchor_id or 0)
            written_as = _written_as(self._displaced, limit)
            if written_as is not None:
                at = self._displaced.id
                found = _Found(
                    Problem.REORDERED, at, f"entry {at} holds the entry written as {written_as}"
                )
        head_id, head_hash = self._next_id - 1, self._prev_hash
        if found is None:
            found = self._check_anchor(anchor)
            if found is not None and found.entry_id is not None and found.entry_id <= head_id:
                head_id, head_hash = self._good_before(found.entry_id)
        if found is None:
            message = "empty audit log" if head_id == 0 else f"{head_id} entries, chain valid"
            return ChainReport(True, self._checked, None, None, message, head_id, head_hash, anchor)
        return ChainReport(
            False,
            self._checked,
            found.entry_id,
            found.problem,
            found.message,
            head_id,
            head_hash,
            anchor,
        )

    def _good_before(self, bad_id: int) -> tuple[int, str]:
        """The id and hash of the entry before `bad_id`, which the anchor disagrees with:
        the last entry (its prev_hash), or the one after the anchor's head (that entry's
        kept hash; its prev_hash when the head itself disagrees)."""
        last = self._next_id - 1
        if bad_id == last:
            return last - 1, self._last_prev_hash
        if bad_id == 1:  # the anchor is of an empty log
            return 0, GENESIS
        assert self._anchored is not None and self._anchor is not None
        prev_hash, hash = self._anchored
        if bad_id == self._anchor.last_id:
            return bad_id - 1, prev_hash
        return bad_id - 1, hash

    def _anchored_hash(self) -> str:
        assert self._anchored is not None  # passed on the way to `last`
        return self._anchored[1]

    def _check_anchor(self, anchor: Anchor | None) -> _Found | None:
        last = self._next_id - 1
        if anchor is None:
            if last == 0:
                return None
            return _Found(
                Problem.ANCHOR_MISSING,
                None,
                f"the table holds {last} entries but the chain head (audit_anchor) is missing",
            )
        if self._anchor_id is None:
            return _Found(
                Problem.ANCHOR_MISMATCH,
                None,
                f"the anchor's last_id {shown(anchor.last_id)} is not an entry id: it was edited",
            )
        if anchor.last_id > last:
            return _Found(
                Problem.TRUNCATED,
                last + 1,
                f"the anchor's head is entry {anchor.last_id} but the last entry is "
                + (f"{last}" if last else "none: the table is empty"),
            )
        if anchor.last_id < last:
            kept = GENESIS if anchor.last_id == 0 else self._anchored_hash()
            if kept != anchor.last_hash:
                return _Found(
                    Problem.ANCHOR_MISMATCH,
                    anchor.last_id,
                    f"entry {anchor.last_id}'s hash is not the anchor's, and entries "
                    f"{anchor.last_id + 1}-{last} follow the anchor's head: the chain was "
                    "rewritten or the anchor edited",
                )
            return _Found(
                Problem.ANCHOR_MISMATCH,
                anchor.last_id + 1,
                f"entries after the anchor's head {anchor.last_id}: written outside the "
                "audit writer, or the anchor was rolled back",
            )
        if anchor.last_hash != self._prev_hash:
            return _Found(
                Problem.ANCHOR_MISMATCH,
                last or None,
                f"entry {last}'s hash is not the anchor's: the chain was rewritten "
                "or the anchor edited",
            )
        if anchor.entries != last:
            return _Found(
                Problem.ANCHOR_MISMATCH,
                None,
                f"the anchor counts {shown(anchor.entries)} entries for head {last}: it was edited",
            )
        return None


def _written_as(entry: AuditEntry, limit: int) -> int | None:
    """The id under which `entry`'s stored hash is valid (other fields unchanged), if any.

    The canonical JSON differs between two ids only where the id is
    written, so each candidate costs one SHA-256 of a copied prefix state.
    """
    try:
        zero = canonical_json({**entry.fields(), "id": 0})
        one = canonical_json({**entry.fields(), "id": 1})
    except (TypeError, ValueError):
        return None
    at = next(i for i, (a, b) in enumerate(zip(zero, one, strict=True)) if a != b)
    prefix = hashlib.sha256((entry.prev_hash + zero[:at]).encode("utf-8", "surrogatepass"))
    suffix = zero[at + 1 :].encode("utf-8", "surrogatepass")
    for candidate in range(1, min(limit, MAX_REORDER_SEARCH) + 1):
        if candidate == entry.id:
            continue
        digest = prefix.copy()
        digest.update(str(candidate).encode())
        digest.update(suffix)
        if digest.hexdigest() == entry.hash:
            return candidate
    return None


def verify(entries: Iterable[AuditEntry], anchor: Anchor | None) -> ChainReport:
    """Check a whole chain given in id order against its anchor (see the module rules)."""
    verifier = ChainVerifier(anchor)
    verifier.feed(entries)
    return verifier.finish()


# -- actions -----------------------------------------------------------------------


@attrs.frozen
class Route:
    """What an HTTP request is, for the audit log: its action and the id it names."""

    action: str
    resource: str | None


ROUTE_ACTIONS: tuple[tuple[str, str, str], ...] = (
    # (method, path template, action); `{id}` matches one path segment
    ("POST", "/api/sessions", "session.create"),
    ("DELETE", "/api/sessions/{id}", "session.delete"),
    ("POST", "/api/sessions/{id}/stop", "session.stop"),
    ("POST", "/api/sessions/{id}/pause", "session.pause"),
    ("POST", "/api/sessions/{id}/resume", "session.resume"),
    ("POST", "/api/sessions/{id}/input", "session.input"),
    ("POST", "/api/projects", "project.create"),
    ("PUT", "/api/projects/{id}", "project.update"),
    ("PATCH", "/api/projects/{id}", "project.update"),
    ("DELETE", "/api/projects/{id}", "project.delete"),
    ("POST", "/api/tasks", "task.create"),
    ("PUT", "/api/tasks/{id}", "task.update"),
    ("PATCH", "/api/tasks/{id}", "task.update"),
    ("DELETE", "/api/tasks/{id}", "task.delete"),
    ("POST", "/api/tasks/{id}/move", "task.move"),
    ("POST", "/api/registry/projects", "registry.add"),
    ("DELETE", "/api/registry/projects/{id}", "registry.remove"),
    ("POST", "/api/registry/sync", "registry.sync"),
    ("POST", "/api/enterprise/tokens", "token.create"),
    ("DELETE", "/api/enterprise/tokens/{id}", "token.revoke"),
)

_ROUTES: dict[tuple[str, int], list[tuple[tuple[str, ...], str]]] = {}
for _method, _template, _action in ROUTE_ACTIONS:
    _parts = tuple(_template.strip("/").split("/"))
    _ROUTES.setdefault((_method, len(_parts)), []).append((_parts, _action))


def classify(method: str, path: str) -> Route:
    """The action of a request and the id its path names (the `{id}` segment), if any.

    `path` is the request path; a query string is ignored. Unknown routes
    get the fallback action `<method lower> <path>` (path cut at `MAX_PATH`).
    """
    method = method.upper()
    path = path.split("?", 1)[0]
    parts = tuple(path.strip("/").split("/"))
    for template, action in _ROUTES.get((method, len(parts)), ()):
        resource = None
        for want, got in zip(template, parts, strict=True):
            if want == "{id}":
                if not got:
                    break
                resource = got
            elif want != got:
                break
        else:
            return Route(action, resource)
    return Route(_text(f"{method.lower()} {path}", MAX_ACTION), None)


def action_for(method: str, path: str) -> str:
    """`classify(method, path).action`: e.g. `POST /api/sessions/s-1/stop` is `session.stop`."""
    return classify(method, path).action


_FAMILY = re.compile(r"[A-Za-z0-9_-]+")


def parse_action_filter(value: str | None) -> str | None:
    """An `action` query value, checked: exact (`session.stop`) or a family (`session.*`)."""
    if value is None:
        return None
    text = value.strip()
    if not text or len(text) > MAX_FILTER_CHARS:
        raise InvalidQuery(
            f"action must be 1-{MAX_FILTER_CHARS} characters, e.g. session.create or session.*",
            field="action",
        )
    if text.endswith(".*"):
        if not _FAMILY.fullmatch(text[:-2]):
            raise InvalidQuery(
                f"action family must be a name followed by .*, e.g. session.*; got {text[:50]!r}",
                field="action",
            )
    elif "*" in text:
        raise InvalidQuery(
            f"action takes * only as a family suffix (session.*); got {text[:50]!r}",
            field="action",
        )
    return text


def action_matches(pattern: str, action: str) -> bool:
    """Whether `action` passes the filter `pattern` (exact, or `family.*`)."""
    if pattern.endswith(".*"):
        return action.startswith(pattern[:-1])
    return action == pattern


def action_sql(pattern: str) -> tuple[str, list[str]]:
    """An SQL condition on column `action` for the filter (a range for a family: uses the index)."""
    if pattern.endswith(".*"):
        family = pattern[:-1]  # "session."
        return "action >= ? AND action < ?", [family, family[:-1] + "/"]  # "/" follows "."
    return "action = ?", [pattern]


# -- queries -----------------------------------------------------------------------

_TIMESTAMP = re.compile(  # [0-9], not \d: no other script's digits
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}"
    r"(?:T[0-9]{2}:[0-9]{2}(?::[0-9]{2}(?:\.[0-9]{1,9})?)?(?:Z|[+-][0-9]{2}:[0-9]{2}))?"
)


TIME_RANGE = "0001-01-01 to 9999-12-31 UTC"
"""The times a stored timestamp can hold (`datetime`'s)."""


def parse_timestamp(value: str, *, field: str, end: bool = False) -> str | None:
    """A `start`/`end` bound as a stored timestamp (`...T..:..:..mmmZ`); 400 if not strict ISO.

    Accepted: a date `YYYY-MM-DD` (UTC), or `YYYY-MM-DDTHH:MM[:SS[.fraction]]`
    with `Z` or `±HH:MM`. A time without zone is refused (which zone?). A
    bare date means the start of that day for `start` and the start of the
    next day for `end` (bounds are `start <= timestamp < end`, so
    `start=end=<day>` is that whole day). Fractions finer than a millisecond
    are rounded up, which keeps both comparisons exact on stored values.

    A bound past the edge of `TIME_RANGE` (`end=9999-12-31`, whose next day
    does not exist; an offset across year 1 or 9999) includes every stored
    time when it is an end past the last or a start before the first: None,
    no bound. The other way round it would match nothing: a 400 saying the range.
    """
    text = value.strip()
    if not _TIMESTAMP.fullmatch(text):
        hint = ""
        if " " in text:
            hint = " (a + in a query string reads as a space: write %2B)"
        raise InvalidQuery(
            f"{field} must be an ISO-8601 date or time with a zone, e.g. 2026-11-28 or "
            f"2026-11-28T12:00:00Z; got {value[:50]!r}{hint}",
            field=field,
        )
    date_only = len(text) == 10
    digits = re.search(r"\.([0-9]+)", text)
    micros = 0
    if digits:  # fromisoformat takes at most 6 digits: handle the fraction here
        fraction = digits.group(1)
        if len(fraction) <= 6:
            micros = int(fraction.ljust(6, "0"))
        else:
            micros = -(-int(fraction) // 10 ** (len(fraction) - 6))  # rounded up
        text = text[: digits.start()] + text[digits.end() :]
    try:
        given = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:  # not on the calendar: February 30
        raise InvalidQuery(f"{field} is not a valid time: {exc}", field=field) from None
    try:
        return iso(_to_stored(given, date_only=date_only, end=end, micros=micros))
    except OverflowError:  # past the first or last moment a datetime holds
        if (given.year == 1) != end:  # a start before the first, an end after the last
            return None
        raise InvalidQuery(
            f"{field} is not a valid time: it lies outside {TIME_RANGE}, where it would "
            "match no entry",
            field=field,
        ) from None


def _to_stored(given: dt.datetime, *, date_only: bool, end: bool, micros: int) -> dt.datetime:
    """`given` in UTC, rounded up to the millisecond; `OverflowError` past the range."""
    moment = given
    if date_only:
        moment = moment.replace(tzinfo=dt.UTC)
        if end:
            moment += dt.timedelta(days=1)
    moment += dt.timedelta(microseconds=micros)
    moment = moment.astimezone(dt.UTC)
    if moment.microsecond % 1000:
        moment += dt.timedelta(microseconds=1000 - moment.microsecond % 1000)
    return moment


@attrs.frozen
class AuditQuery:
    """Checked parameters of `GET /api/enterprise/audit` (`AuditQuery.parse`)."""

    start: str | None = None
    end: str | None = None
    action: str | None = None
    limit: int = DEFAULT_LIMIT
    offset: int = 0

    @classmethod
    def parse(
        cls,
        *,
        start: str | None = None,
        end: str | None = None,
        action: str | None = None,
        limit: int | str | None = None,
        offset: int | str | None = None,
    ) -> AuditQuery:
        """Raises `InvalidQuery` naming the parameter (HTTP 400)."""
        start_at = None if start is None else parse_timestamp(start, field="start")
        end_at = None if end is None else parse_timestamp(end, field="end", end=True)
        if start_at is not None and end_at is not None and end_at <= start_at:
            raise InvalidQuery(
                f"end ({end}) must be after start ({start}); a date as end includes that day",
                field="end",
            )
        return cls(
            start_at,
            end_at,
            parse_action_filter(action),
            _int(limit, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT),
            _int(offset, "offset", 0, 0, MAX_OFFSET),
        )

    def where(self) -> tuple[str, list[Any]]:
        """The SQL condition on `audit_log` and its parameters."""
        clauses: list[str] = []
        params: list[Any] = []
        if self.start is not None:
            clauses.append("timestamp >= ?")
            params.append(self.start)
        if self.end is not None:
            clauses.append("timestamp < ?")
            params.append(self.end)
        if self.action is not None:
            sql, values = action_sql(self.action)
            clauses.append(sql)
            params.extend(values)
        return (" AND ".join(clauses) or "1"), params


_INTEGER = re.compile(r"-?[0-9]+")  # ASCII digits: "²" is a digit to str.isdigit()


def _int(value: int | str | None, name: str, default: int, low: int, high: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool):
        raise InvalidQuery(f"{name} must be an integer, got {value!r}", field=name)
    if isinstance(value, int):
        number = value
    else:
        text = value.strip()
        if not _INTEGER.fullmatch(text):
            raise InvalidQuery(f"{name} must be an integer, got {value[:50]!r}", field=name)
        if len(text) > 20:  # an integer, beyond any bound: do not echo its digits
            raise InvalidQuery(f"{name} must be between {low} and {high}", field=name)
        number = int(text)
    if not low <= number <= high:
        raise InvalidQuery(f"{name} must be between {low} and {high}, got {number}", field=name)
    return number
