"""The audit writer: the one task that appends to the hash-chained audit log (DESIGN.md §7).

Theory of operation:

* **Acknowledged = durable.** `append(...)` returns the `AuditEntry` only
  after the store committed it (`synchronous=FULL`: the WAL is fsync'd), so
  a request answered after its `append` returned is in the log even after a
  crash or power loss. An `append` that raised `AuditUnavailable` or
  `ActorUnavailable` recorded nothing, except when the message says the
  outcome is unknown (a store write that timed out may commit later).
* **Group commit**, like the event bus: the writer takes every append
  waiting in its mailbox (at most `max_batch`), gives them consecutive ids,
  chains their hashes in mailbox order, and writes the entries *and* the new
  anchor in one `store.write` (one transaction, one fsync). Appends that
  arrive during that commit form the next batch; a lone append is written
  at once (no window).
* **The head** (last id, last hash) lives in memory. `setup` loads it from
  the anchor and checks it against the newest row (`lokid.audit.resume_head`);
  a disagreement is logged at ERROR, shown in `statistics()` (`head_ok`,
  `head_problem`) and in the summary's `chain_valid`, and recorded as an
  `audit.head_mismatch` entry - never a crash. The chain then continues
  from the anchor so the break stays visible to `verify` (from `GENESIS`
  when the anchor's id or hash was edited to something that is none - a
  BLOB, text that is not UTF-8 -: `lokid.audit.anchor_defect`). A reload while
  running is checked against the writer's own head too: a log rewound
  behind its back (entries it committed deleted or replaced, the anchor
  moved back to match) is the same kind of problem, and the chain goes on
  after the writer's own last entry, so no id is used twice and the next
  entry's `prev_hash` shows the break.
* **The head is checked in every write.** The write function moves the
  anchor with one conditional `UPDATE` inside the transaction, which changes
  it only if it is what the writer last wrote or loaded, and refuses to
  append if no row changed (someone changed the table behind its back, or
  an earlier write timed out and committed later). The writer then
  reloads the head and retries the batch once; if the anchor moved again,
  the batch fails.
* **Failure is loud**: when the store refuses or cannot commit a batch,
  every caller gets `AuditUnavailable` (503) - a request that must be
  audited must not succeed unaudited - and the writer reloads the head
  before its next batch.
* **A lighter `ask`.** An append is a `_Pending` message whose caller's
  task is rescheduled once it is answered, not an `Actor.ask` (a reply
  channel and a cancel scope per call: measured at 36 µs here, more than the
  whole per-append budget of 20 µs at the throughput goal of 50,000/s). The
  wait is still bounded: the writer answers every append it took within
  `batch_timeout` (the whole batch runs under that deadline, shielded from
  outside cancellation). A lone append committed from its caller's task
  while the head is loaded and the store's writer thread is idle has no
  scope (~10 µs each): its one await is a job on that idle thread which is
  never withdrawn (`StoreActor.write_alone(to_end=True)`), so its caller's
  cancellation is seen after the commit and the bookkeeping, and the bound
  is the job's own time, which a deadline could not cut short either (a
  started job runs to its end). When an incarnation ends (crash or stop),
  `teardown` fails what it took and everything still in the mailbox with
  `ActorUnavailable`. Only while the writer is not running (starting,
  restarting) does `append` wait under its own `timeout`, for the next
  incarnation. A caller cancelled while it waits stops waiting (one that
  commits its own lone append waits for that commit); its entry is still
  written.

Mailbox: `mailbox_size = 4096`, `when_full = WhenFull.BLOCK`: a burst of
requests waits for room (back-pressure, at most `append`'s `timeout`, then
`AskTimeout`) instead of growing memory or dropping entries. On a graceful
stop every append already in the mailbox is written (the daemon's "flush
the audit log").

The read functions at the end (`list_audit`, `audit_summary`,
`verify_store`) are plain functions of a `sqlite_utils.Database`, to run
with `StoreActor.read` (one snapshot) or on a connection of their own
(`loki audit verify` on a stopped daemon's file).
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import logging
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import attrs
import sqlite_utils
import trio

from lokid.actor import Actor, ActorStatistics, Call, WhenFull
from lokid.actors.store import StoreActor
from lokid.audit import (
    GENESIS,
    MAX_ID,
    Anchor,
    AuditEntry,
    AuditQuery,
    ChainReport,
    ChainVerifier,
    Head,
    chained_hash,
    details_json,
    json_value,
    normalise,
    resume_head,
    shown,
)
from lokid.errors import ActorUnavailable, AskTimeout, LokiError, Unavailable
from lokid.timefmt import utc_now_iso

__all__ = [
    "MISMATCH_ACTION",
    "AuditUnavailable",
    "AuditWriter",
    "AuditWriterStatistics",
    "audit_summary",
    "chain",
    "entry_from_row",
    "list_audit",
    "read_anchor",
    "verify_store",
]

log = logging.getLogger("lokid.audit")

_encode_text = json.encoder.encode_basestring  # a JSON string (ensure_ascii=False), in C
_sha256 = hashlib.sha256

MISMATCH_ACTION = "audit.head_mismatch"
"""The action of the entry the writer records when it finds the head inconsistent."""

VERIFY_PAGE = 2000  # entries read per page while verifying
BREAKDOWN_LIMIT = 100  # keys per summary breakdown (most frequent first)

_COLUMNS = (
    "id, timestamp, actor, action, resource, method, path, status, ip, details, prev_hash, hash"
)
_VALUES = "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
# A batch is inserted with multi-row INSERTs of these sizes (largest first), so each
# statement is one SQLite step (one GIL release) for many rows, and only four
# statements are ever prepared. 64 rows x 12 = 768 variables, far below SQLite's limit.
_INSERTS = {
    rows: f"INSERT INTO audit_log ({_COLUMNS}) VALUES " + ", ".join([_VALUES] * rows)
    for rows in (64, 16, 4, 1)
}


def _linked_values(rows: int) -> str:
    """The VALUES of an INSERT of `rows` consecutive `chain` rows that binds the batch's
    timestamp once (?1) and each prev_hash but the first as the previous row's hash:
    10 values bound per row instead of 12 (`_insert_chained`)."""
    values = []
    for row in range(rows):
        first = 3 + 10 * row  # ?first = id, ... ?(first + 8) = details, ?(first + 9) = hash
        prev_hash = "?2" if row == 0 else f"?{first - 1}"
        fields = ", ".join(f"?{first + n}" for n in range(1, 9))
        values.append(f"(?{first}, ?1, {fields}, {prev_hash}, ?{first + 9})")
    return ", ".join(values)


_LINKED_INSERTS = {
    rows: f"INSERT INTO audit_log ({_COLUMNS}) VALUES {_linked_values(rows)}" for rows in _INSERTS
}
_READ_ANCHOR = "SELECT last_id, last_hash, entries FROM audit_anchor WHERE one = 1"
# The anchor is checked and moved in one statement: it changes only if it is still the
# one the writer expects (one row changed), else the batch is refused (_HeadMoved).
_MOVE_ANCHOR = (
    "UPDATE audit_anchor SET last_id = ?, last_hash = ?, entries = ?"
    " WHERE one = 1 AND last_id = ? AND last_hash = ? AND entries = ?"
)
# The newest entry the chain can go on after, and any id past those (an edited row).
_NEWEST = "SELECT id, hash FROM audit_log WHERE id <= ? ORDER BY id DESC LIMIT 1"
_BEYOND = "SELECT max(id) FROM audit_log WHERE id > ?"
_FIRST_ANCHOR = "INSERT INTO audit_anchor (one, last_id, last_hash, entries) VALUES (1, ?, ?, ?)"
_WRITE_ANCHOR = f"{_FIRST_ANCHOR} ON CONFLICT (one) DO UPDATE SET last_id = excluded.last_id," + (
    " last_hash = excluded.last_hash, entries = excluded.entries"
)


class AuditUnavailable(Unavailable):
    """The entry was not recorded (store down, or the chain head kept moving): HTTP 503."""


class _Pending:
    """One append in the mailbox: normalised fields, then the stored row or the error.

    The `AuditEntry` record is built only for a caller that asks for it
    (`append`); the gate (`record`) does not, which saves building one per
    entry under load.

    Its caller waits in `wait` and is woken by `succeed` or `fail` with one
    `trio.lowlevel.reschedule` of its task: no `trio.Event` (and its parking
    lot) per append, and two fewer frames to resume per wake-up (a batch of
    256 wakes 256 tasks; see docs/performance.md, "Audit appends").
    """

    __slots__ = ("details_json", "done", "error", "fields", "row", "task")

    def __init__(self, fields: dict[str, Any]) -> None:
        self.fields = fields
        self.details_json = details_json(fields["details"])
        self.done = False  # answered: `row` or `error` is set
        self.row: tuple[Any, ...] | None = None
        self.error: LokiError | None = None
        self.task: trio.lowlevel.Task | None = None  # the caller, while it waits in `wait`

    def succeed(self, row: tuple[Any, ...]) -> None:
        self.row = row
        self.done = True
        if (task := self.task) is not None:
            self.task = None
            trio.lowlevel.reschedule(task)

    def fail(self, error: LokiError) -> None:
        if not self.done:
            self.error = error
            self.done = True
            if (task := self.task) is not None:
                self.task = None
                trio.lowlevel.reschedule(task)

    async def wait(self) -> None:
        """Until answered (a checkpoint if it is already); cancellable like
        `trio.Event.wait`: a caller that gives up leaves the entry to be written."""
        if self.done:
            await trio.lowlevel.checkpoint()
            return
        self.task = trio.lowlevel.current_task()
        await trio.lowlevel.wait_task_rescheduled(self.abort)

    def abort(self, _: Any) -> trio.lowlevel.Abort:
        """`wait_task_rescheduled`'s abort function: the waiting caller was cancelled."""
        self.task = None  # cancelled: not to be rescheduled
        return trio.lowlevel.Abort.SUCCEEDED

    def check(self) -> None:
        if self.error is not None:
            raise self.error
        assert self.row is not None

    def entry(self) -> AuditEntry:
        self.check()
        assert self.row is not None
        return entry_from_fields(self.fields, self.row)


@attrs.frozen
class AuditWriterStatistics(ActorStatistics):
    """`ActorStatistics` plus the chain's state.

    `handled`/`failed` count appends answered with an entry / an error.
    `head_ok` is False from the moment a head disagreement was found until
    the writer restarts; `head_problem` says what it was. `head_loads`
    counts loads of the head: one at start, one more after each time the
    anchor moved or a batch failed. `commit_ms_last` is the last batch's
    `store.write` time (queueing in the store included).
    """

    last_id: int
    head_ok: bool
    head_problem: str | None
    appended: int
    batches: int
    last_batch_size: int
    max_batch_seen: int
    head_loads: int
    commit_ms_last: float | None


class _HeadMoved(Exception):
    """Internal: the anchor in the table is not the one the writer expects."""


class AuditWriter(Actor[Any]):
    """Appends audit entries in group-committed, hash-chained batches (see the module).

    Mailbox: `mailbox_size = 4096`, `when_full = WhenFull.BLOCK`.
    """

    mailbox_size: ClassVar[int] = 4096
    when_full: ClassVar[WhenFull] = WhenFull.BLOCK

    def __init__(
        self,
        store: StoreActor,
        *,
        max_batch: int = 1024,
        write_timeout: float = 10.0,
        batch_timeout: float = 30.0,
        name: str = "audit_writer",
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if not 0 < write_timeout <= batch_timeout:
            raise ValueError("need 0 < write_timeout <= batch_timeout")
        super().__init__(name)
        self.store = store
        self.max_batch = max_batch
        self.write_timeout = write_timeout
        self.batch_timeout = batch_timeout
        self._head = Head(0, GENESIS)
        self._anchor: Anchor | None = None  # the anchor row as the writer last wrote or read it
        self._stale = True  # reload the head before the next batch
        self._head_problem: str | None = None
        self._in_flight: list[_Pending] = []
        self._commit_lock = trio.Lock()  # one batch at a time: the writer's, or a caller's
        self._appended = 0
        self._batches = 0
        self._last_batch_size = 0
        self._max_batch_seen = 0
        self._head_loads = 0
        self._commit_ms_last: float | None = None

    # -- callers ----------------------------------------------------------------

    async def append(
        self,
        *,
        actor: str,
        action: str,
        resource: str | None = None,
        method: str | None = None,
        path: str | None = None,
        status: int | None = None,
        ip: str | None = None,
        details: Mapping[str, Any] | None = None,
        timeout: float = 10.0,
    ) -> AuditEntry:
        """Record one entry (`normalise`'s keywords); returns it once committed to disk.

        Raises `AuditUnavailable` or `ActorUnavailable` if it was not
        recorded, `AskTimeout` if the mailbox stayed full (or the writer
        stayed down) for `timeout` seconds. See the module for the bounds.
        """
        fields = normalise(
            actor=actor, action=action, resource=resource, method=method, path=path,
            status=status, ip=ip, details=details,
        )  # fmt: skip
        pending = _Pending(fields)
        if self._queued_nowait(pending):  # its task is in `pending.task`: wait to be woken
            await trio.lowlevel.wait_task_rescheduled(pending.abort)
        else:
            await self._recorded(pending, timeout)
        return pending.entry()

    async def record(
        self,
        *,
        actor: str,
        action: str,
        resource: str | None = None,
        method: str | None = None,
        path: str | None = None,
        status: int | None = None,
        ip: str | None = None,
        details: Mapping[str, Any] | None = None,
        timeout: float = 10.0,
    ) -> None:
        """`append` for a caller that needs no answer but "on disk" (the gate).

        (`append` and `record` name `normalise`'s keywords one by one: a
        `**fields` dict built and unpacked again cost ~0.6 µs per append here.)
        """
        fields = normalise(
            actor=actor, action=action, resource=resource, method=method, path=path,
            status=status, ip=ip, details=details,
        )  # fmt: skip
        pending = _Pending(fields)
        if self._queued_nowait(pending):  # its task is in `pending.task`: wait to be woken
            await trio.lowlevel.wait_task_rescheduled(pending.abort)
        else:
            await self._recorded(pending, timeout)
        pending.check()

    def _queued_nowait(self, pending: _Pending) -> bool:
        """Under load (the last batch had company) while the writer runs: `pending` is put
        in the mailbox if there is room, with the current task to wake, for the caller to
        wait right there (`_recorded`'s own path to the same wait without two coroutines
        around it: two frames fewer to suspend and resume per append)."""
        if self._last_batch_size <= 1 or not self._running:
            return False
        try:
            self._send.send_nowait(pending)
        except trio.WouldBlock:
            return False
        pending.task = trio.lowlevel.current_task()  # nothing answers it before the await
        return True

    async def _recorded(self, pending: _Pending, timeout: float) -> None:
        """The append, committed or failed (the caller asks it which)."""
        if (
            self._running
            and self._last_batch_size <= 1
            and not self._commit_lock.locked()
            and self.mailbox_empty()
        ):
            # Appends come one at a time, nothing is queued and nothing commits: commit
            # it from this task (two task wake-ups fewer than through the writer's
            # task). Under load (the last batch had company) appends go through the
            # mailbox instead, where they share a commit.
            self._commit_lock.acquire_nowait()
            try:
                if not self._stale and self.store.writer_idle:
                    await self._append_alone(pending)
                else:
                    await self._append_batch([pending], track=False)
            except Exception as exc:  # a bug: in the writer's task it would crash the actor
                log.exception("audit append failed")
                self._stale = True
                raise AuditUnavailable(f"the audit entry was not recorded: {exc!r}") from exc
            finally:
                self._commit_lock.release()
            return
        queued = False
        if self._running:
            try:
                self._send.send_nowait(pending)
            except trio.WouldBlock:
                with trio.move_on_after(timeout):
                    await self._send.send(pending)
                    queued = True
                if not queued:
                    raise AskTimeout(f"{self.name} mailbox stayed full for {timeout:g} s") from None
            else:
                queued = True
            if self.running or pending.done:  # (re-read after the awaits)
                # Taken by this incarnation, or failed by its teardown: bounded (module rules).
                await pending.wait()
                return
        # Not running: the next incarnation takes it, if it comes within `timeout`.
        with trio.move_on_after(timeout):
            if not queued:
                await self._send.send(pending)
            await pending.wait()
        if not pending.done:
            raise AskTimeout(f"{self.name} did not record the entry within {timeout:g} s")

    @property
    def last_id(self) -> int:
        """The id of the newest committed entry (0: none)."""
        return self._head.last_id

    @property
    def head_ok(self) -> bool:
        return self._head_problem is None

    async def list_entries(self, query: AuditQuery) -> dict[str, Any]:
        """`GET /api/enterprise/audit` (see `list_audit`)."""
        return await self.store.read(lambda db: _list(db, query))

    async def summary(self) -> dict[str, Any]:
        """`GET /api/enterprise/audit/summary`: `audit_summary`, with `chain_valid` also
        False while the head check found a problem."""
        answer = await self.store.read(audit_summary)
        if self._head_problem is not None:
            answer["chain_valid"] = False
            answer["head_problem"] = self._head_problem
        return answer

    async def verify(self) -> ChainReport:
        return await self.store.read(verify_store)

    # -- the task -----------------------------------------------------------------

    async def setup(self) -> None:
        problem = await self._load_head()
        if problem is not None:
            try:
                await self._commit([_mismatch_item(problem)])
            except LokiError as exc:  # the head stays "not ok"; the next batch retries
                log.error("could not record the audit head mismatch: %s", exc)

    async def teardown(self) -> None:
        error = ActorUnavailable(f"{self.name} stopped before it recorded the entry")
        for pending in self._in_flight:
            pending.fail(error)
        self._in_flight = []
        while (message := self.next_message_nowait()) is not None:
            if isinstance(message, _Pending):
                message.fail(error)
                self._failed += 1
            elif isinstance(message, Call):
                message.reply.close()  # its caller gets ActorUnavailable

    async def serve(self) -> None:
        receive_nowait = self._receive.receive_nowait  # (`next_message_nowait`, one call less)
        # The mailbox's buffer and its blocked senders (trio's, private, as `mailbox_empty`).
        state = getattr(self._send, "_state", None)
        buffer = getattr(state, "data", None)
        senders = getattr(state, "send_tasks", None)
        if not isinstance(buffer, collections.deque) or not isinstance(senders, dict):
            buffer = senders = None
        while (message := await self.next_message()) is not None:
            batch = [message]
            if buffer is not None and not senders and len(buffer) < self.max_batch:
                # All of it at once (nobody waits for room, so taking it wakes nobody):
                # ~0.25 µs per entry less than a `receive_nowait` each.
                batch += buffer
                buffer.clear()
            try:
                while len(batch) < self.max_batch:
                    batch.append(receive_nowait())
            except trio.WouldBlock:
                pass
            async with self._commit_lock:
                await self._append_batch(batch)

    async def _append_alone(self, pending: _Pending) -> None:
        """Commit one append from its caller's task, the head loaded and the store's writer
        thread idle: one `write_alone(to_end=True)`, no cancel scope.

        The scope of `_append_batch` (~10 µs here) guards its awaits against the
        caller's cancellation and bounds them by `batch_timeout`. Here the only
        await is a job on the idle writer thread, which is never withdrawn
        (`to_end`): the caller's cancellation is seen after the bookkeeping, at
        its next checkpoint, and the entry is written. A deadline could not
        end that wait either (a started job runs to its end), so the bound is
        the same: the job's own time. A moved anchor goes on in `_append_batch`
        (reload, one more attempt), under its scope.
        """
        write = _batch_write(
            self._anchor, self._head, ((pending.fields, pending.details_json),), utc_now_iso()
        )
        started = time.perf_counter()
        try:
            rows = await self.store.write_alone(write, timeout=self.write_timeout, to_end=True)
        except _HeadMoved as moved:
            log.error("audit chain head moved behind the writer's back: %s; reloading", moved)
            self._stale = True
            await self._append_batch([pending], track=False, retry=True)
            return
        except LokiError as exc:
            # Committed or not (a timeout): the next batch reloads the head first.
            self._stale = True
            log.error("audit batch of 1 not recorded: %s", exc)
            self._fail([pending], AuditUnavailable(f"the audit entry was not recorded: {exc}"))
            return
        self._committed(rows, started)
        pending.succeed(rows[0])
        self._handled += 1

    async def _append_batch(
        self, batch: list[Any], *, track: bool = True, retry: bool = False
    ) -> None:
        """Commit the appends of `batch` (other messages are dispatched).

        `track`: the appends came from the mailbox, so `teardown` must fail them
        if this incarnation ends mid-batch; an append committed by its own
        caller's task (`track=False`) is answered by this call in every case.
        `retry`: the batch's first attempt found the anchor moved (`_append_alone`):
        this is its one more.
        """
        pending: list[_Pending] = []
        for message in batch:
            if isinstance(message, _Pending):
                pending.append(message)
            else:
                await self.dispatch(message)
        if not pending:
            return
        if track:
            self._in_flight = pending
        error: LokiError | None = None
        # Taken from the mailbox, or by its caller: always answered, within `batch_timeout`
        # (one scope, not a shield and a deadline: each costs ~50,000 instructions here).
        deadline = trio.CancelScope(shield=True, deadline=trio.current_time() + self.batch_timeout)
        with deadline:
            try:
                items: list[tuple[Mapping[str, Any], str]] = []
                if self._stale:
                    problem = await self._load_head()
                    if problem is not None:
                        items.append(_mismatch_item(problem))
                items += [(p.fields, p.details_json) for p in pending]
                rows = await self._commit(items, attempts=(2,) if retry else (1, 2))
            except LokiError as exc:
                error = (
                    exc
                    if isinstance(exc, AuditUnavailable)
                    else AuditUnavailable(f"the audit entry was not recorded: {exc}")
                )
        if deadline.cancelled_caught:
            self._stale = True
            error = AuditUnavailable(
                f"the audit batch did not finish within {self.batch_timeout:g} s (outcome unknown)"
            )
        if track:
            self._in_flight = []
        if error is not None:
            self._fail(pending, error)
            return
        # `_commit` may have put an `audit.head_mismatch` entry in front.
        for p, row in zip(pending, rows[len(rows) - len(pending) :], strict=True):
            p.succeed(row)
        self._handled += len(pending)

    def _fail(self, pending: Sequence[_Pending], error: LokiError) -> None:
        """Answer `pending` with `error` (nothing of them was recorded, or that is unknown)."""
        self._failed += len(pending)
        self._last_error = f"{type(error).__name__}: {error}"
        for p in pending:
            p.fail(error)

    async def _commit(
        self,
        items: Sequence[tuple[Mapping[str, Any], str]],
        attempts: tuple[int, ...] = (1, 2),
    ) -> list[tuple[Any, ...]]:
        """Chain `items` (fields, details JSON) after the head and write them with the
        anchor; retry once if the anchor moved (`attempts`: (2,) when this is already
        the retry). Raises a `LokiError` when nothing was written (or, after a timeout,
        when that is unknown)."""
        for attempt in attempts:
            items = list(items)
            write = _batch_write(self._anchor, self._head, items, utc_now_iso())
            started = time.perf_counter()
            try:
                rows = await self.store.write_alone(write, timeout=self.write_timeout)
            except _HeadMoved as moved:
                log.error("audit chain head moved behind the writer's back: %s; reloading", moved)
                self._stale = True
                if attempt == 2:
                    raise AuditUnavailable(
                        f"the audit entry was not recorded: the chain head kept moving ({moved})"
                    ) from None
                problem = await self._load_head()
                if problem is not None:
                    items = [_mismatch_item(problem), *items]
                continue
            except LokiError as exc:
                # Committed or not (a timeout): the next batch reloads the head first.
                self._stale = True
                log.error("audit batch of %d not recorded: %s", len(items), exc)
                raise
            self._committed(rows, started)
            return rows
        raise AssertionError("unreachable")  # pragma: no cover

    def _committed(self, rows: list[tuple[Any, ...]], started: float) -> None:
        """The head and the counters after a batch's `rows` were committed."""
        self._commit_ms_last = (time.perf_counter() - started) * 1000
        last_id, last_hash = rows[-1][0], rows[-1][-1]
        self._head = Head(last_id, last_hash, None)
        self._anchor = Anchor(last_id, last_hash, last_id)
        size = len(rows)
        self._appended += size
        self._batches += 1
        self._last_batch_size = size
        if size > self._max_batch_seen:
            self._max_batch_seen = size

    async def _load_head(self) -> str | None:
        """Read the anchor and the newest entry; set the head. Returns a new problem, if any."""

        def load(db: sqlite_utils.Database) -> tuple[Anchor | None, Any, int | None]:
            # The hash as stored (any type, text that is not UTF-8 decoded apart):
            # only compared with the anchor's.
            rows = _fetch(db, _NEWEST, [MAX_ID], errors="surrogateescape")
            beyond = db.execute(_BEYOND, [MAX_ID]).fetchone()[0]
            return read_anchor(db), (tuple(rows[0]) if rows else None), beyond

        anchor, newest, beyond = await self.store.read(load)
        head = resume_head(anchor, newest, beyond=beyond)
        known = self._head if self._head_loads else None  # what this writer wrote or read last
        if known is not None and _rewound(known, head):
            head = _continue_after(known, head)
        self._head_loads += 1
        self._head = attrs.evolve(head, problem=None)
        self._anchor = anchor
        self._stale = False
        if head.problem is None:
            return None
        log.error(
            "AUDIT CHAIN HEAD MISMATCH: %s. Run `loki audit verify`; the writer continues "
            "without repairing, so the break stays visible.",
            head.problem,
        )
        self._head_problem = head.problem
        return head.problem

    # -- introspection ---------------------------------------------------------------

    def statistics(self) -> AuditWriterStatistics:
        base = super().statistics()
        return AuditWriterStatistics(
            **attrs.asdict(base, recurse=False),
            last_id=self._head.last_id,
            head_ok=self._head_problem is None,
            head_problem=self._head_problem,
            appended=self._appended,
            batches=self._batches,
            last_batch_size=self._last_batch_size,
            max_batch_seen=self._max_batch_seen,
            head_loads=self._head_loads,
            commit_ms_last=self._commit_ms_last,
        )


def chain(
    head: Head, items: Sequence[tuple[Mapping[str, Any], str]], timestamp: str
) -> list[tuple[Any, ...]]:
    """The `audit_log` rows for `items` (fields, details JSON) after `head`, hashed in
    order. Pure and deterministic (the store may run a write twice).

    The canonical JSON of each entry (`lokid.audit.canonical_json`) is built here in
    one f-string: the timestamp is quoted once per batch and each `prev_hash` but the
    first is a digest of this loop (hex: quoted as is). Anything unusual - a text field
    that is not text, a status that is not an int, a head or timestamp that JSON must
    escape - goes through `chained_hash`, the general path.
    """
    last_id, prev_hash = head.last_id, head.last_hash
    quoted_time = _encode_text(timestamp) if type(timestamp) is str else None
    if quoted_time is not None and quoted_time[1:-1] != timestamp:
        quoted_time = None  # escaped: the general path decides
    rows = []
    plain_prev = False  # prev_hash is a digest of this loop
    for fields, details_text in items:
        last_id += 1
        text = None
        status = fields["status"]
        if plain_prev and quoted_time is not None and (status is None or type(status) is int):
            resource, method, path, ip = (
                fields["resource"], fields["method"], fields["path"], fields["ip"],
            )  # fmt: skip
            try:
                text = (
                    f'{prev_hash}{{"action":{_encode_text(fields["action"])},'
                    f'"actor":{_encode_text(fields["actor"])},'
                    f'"details":{details_text},"id":{last_id},'
                    f'"ip":{"null" if ip is None else _encode_text(ip)},'
                    f'"method":{"null" if method is None else _encode_text(method)},'
                    f'"path":{"null" if path is None else _encode_text(path)},'
                    f'"prev_hash":"{prev_hash}",'
                    f'"resource":{"null" if resource is None else _encode_text(resource)},'
                    f'"status":{"null" if status is None else status},'
                    f'"timestamp":{quoted_time}}}'
                )
            except TypeError:  # a text field that is not text
                text = None
        if text is None:
            digest = chained_hash(prev_hash, fields, last_id, timestamp, details_text)
        else:
            digest = _sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
        rows.append(
            (
                last_id,
                timestamp,
                fields["actor"],
                fields["action"],
                fields["resource"],
                fields["method"],
                fields["path"],
                fields["status"],
                fields["ip"],
                details_text,
                prev_hash,
                digest,
            )
        )
        prev_hash = digest
        plain_prev = True
    return rows


def entry_from_fields(fields: Mapping[str, Any], row: Sequence[Any]) -> AuditEntry:
    """The record of an entry the writer stored as `row` (a `chain` row) from `fields`."""
    return AuditEntry(
        id=row[0],
        timestamp=row[1],
        prev_hash=row[10],
        hash=row[11],
        **fields,
    )


def _batch_write(
    expected: Anchor | None,
    head: Head,
    items: Sequence[tuple[Mapping[str, Any], str]],
    timestamp: str,
) -> Callable[[sqlite_utils.Database], list[tuple[Any, ...]]]:
    """The store write of one batch: check the anchor, chain and insert the entries, move
    the anchor. The hashing runs here, on the store's thread, not on the trio loop."""

    def write(db: sqlite_utils.Database) -> list[tuple[Any, ...]]:
        rows = chain(head, items, timestamp)
        last_id, last_hash = rows[-1][0], rows[-1][-1]
        if not _move_anchor(db, expected, Anchor(last_id, last_hash, last_id)):
            raise _HeadMoved(
                f"the anchor is {shown(read_anchor(db), 300)}, expected {shown(expected, 300)}"
            )
        _insert_chained(db.conn, rows)
        return rows

    return write


def _move_anchor(db: sqlite_utils.Database, expected: Anchor | None, new: Anchor) -> bool:
    """Replace the anchor `expected` with `new`; False (nothing changed) if the table's
    anchor is not `expected` (None: no anchor row)."""
    conn = db.conn
    if expected is None:
        try:
            conn.execute(_FIRST_ANCHOR, (new.last_id, new.last_hash, new.entries))
        except sqlite3.IntegrityError:  # there is an anchor row
            return False
        return True
    if not _plain(expected):
        # Loaded from an edited row (text that is not UTF-8, another type): compared as
        # read, as `load` read it, since such a value cannot be bound as it was read.
        if read_anchor(db) != expected:
            return False
        db.execute(_WRITE_ANCHOR, (new.last_id, new.last_hash, new.entries))
        return True
    moved = conn.execute(
        _MOVE_ANCHOR,
        (
            new.last_id, new.last_hash, new.entries,
            expected.last_id, expected.last_hash, expected.entries,
        ),
    )  # fmt: skip
    return moved.rowcount == 1


def _plain(anchor: Anchor) -> bool:
    """The anchor's values compare in SQL exactly as in Python (ints, and UTF-8 text)."""
    return (
        type(anchor.last_id) is int
        and type(anchor.entries) is int
        and type(anchor.last_hash) is str
        and anchor.last_hash.isascii()
    )


def _insert_chained(conn: sqlite3.Connection, rows: Sequence[tuple[Any, ...]]) -> None:
    """`insert_rows` for the rows of one `chain` call, which share their timestamp and
    link each prev_hash to the hash before: each bound once (`_LINKED_INSERTS`)."""
    start, total = 0, len(rows)
    for size, sql in _LINKED_INSERTS.items():
        while total - start >= size:
            params = [rows[start][1], rows[start][10]]
            for row in rows[start : start + size]:
                params += (row[0], *row[2:10], row[11])
            conn.execute(sql, params)
            start += size


def insert_rows(conn: sqlite3.Connection, rows: Sequence[tuple[Any, ...]]) -> None:
    """INSERT `rows` (`chain` rows) into `audit_log`, in as few statements as `_INSERTS` allow."""
    start, total = 0, len(rows)
    for size, sql in _INSERTS.items():
        while total - start >= size:
            conn.execute(sql, [*chain_values(rows[start : start + size])])
            start += size


chain_values = itertools.chain.from_iterable  # the rows' values in one list, in C


def _rewound(known: Head, found: Head) -> bool:
    """Whether the log's head `found` lies behind (or beside) the head this writer
    itself wrote or read, `known`: entries it committed were deleted or replaced.
    A head ahead of `known` is a batch that timed out and committed later."""
    return found.last_id < known.last_id or (
        found.last_id == known.last_id and found.last_hash != known.last_hash
    )


def _continue_after(known: Head, found: Head) -> Head:
    """The head to continue from after a rewind: the writer's own, so no id is used
    twice and the next entry's link shows the break to every later `verify`."""
    seen = f"entry {found.last_id}" if found.last_id else "empty"
    problem = (
        f"rewound behind the writer's back: it had written up to entry {known.last_id}, "
        f"the log's head is now {seen}"
        + (f" ({found.problem})" if found.problem else "")
        + f"; continuing at {known.last_id + 1}"
    )
    return attrs.evolve(known, problem=problem)


def _mismatch_item(problem: str) -> tuple[Mapping[str, Any], str]:
    fields = _mismatch_fields(problem)
    return fields, details_json(fields["details"])


def _mismatch_fields(problem: str) -> dict[str, Any]:
    return normalise(actor="lokid", action=MISMATCH_ACTION, details={"problem": problem})


# -- read functions (for StoreActor.read, or any connection) -------------------------------


def read_anchor(db: sqlite_utils.Database) -> Anchor | None:
    row = _fetch(db, _READ_ANCHOR, (), errors="surrogateescape")
    return None if not row else Anchor(row[0][0], row[0][1], row[0][2])


def _fetch(db: sqlite_utils.Database, sql: str, params: Sequence[Any], *, errors: str) -> list[Any]:
    """`execute(...).fetchall()`, decoding text that is not UTF-8 (an edited file) with
    `errors` instead of failing the whole read. Only a failing query pays for it."""
    try:
        return db.execute(sql, params).fetchall()
    except sqlite3.OperationalError as exc:
        if "decode" not in str(exc):
            raise
    with _text_errors(db.conn, errors):
        return db.execute(sql, params).fetchall()


@contextmanager
def _text_errors(conn: sqlite3.Connection, errors: str) -> Iterator[None]:
    previous = conn.text_factory
    conn.text_factory = lambda raw: raw.decode("utf-8", errors)
    try:
        yield
    finally:
        conn.text_factory = previous


def entry_from_row(row: Sequence[Any]) -> AuditEntry:
    """An entry from an `audit_log` row (columns in table order).

    Never raises on edited rows: `details` that are not JSON stay the stored
    text, which no longer hashes to the entry's hash. So do `details` that are
    JSON but not the canonical text the writer stores (`details_json`): the
    hash covers the parsed value, so an edit that parses to the same value (a
    duplicate key, which SQLite's `json_extract` reads otherwise; reordered
    keys, an escape, spaces) would pass `verify` unseen.
    """
    text = row[9]
    try:
        details = json.loads(text)
        if details_json(details) != text:
            details = text
    except (TypeError, ValueError):
        details = text
    return AuditEntry(
        row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7], row[8], details,
        row[10], row[11],
    )  # fmt: skip


def list_audit(
    db: sqlite_utils.Database,
    start: str | None = None,
    end: str | None = None,
    action: str | None = None,
    limit: int | str | None = None,
    offset: int | str | None = None,
) -> dict[str, Any]:
    """Entries newest first: `{"entries": [...], "total", "limit", "offset"}`.

    `start <= timestamp < end`, `action` exact or `family.*`, `limit` 1-1000
    (default 100); bad values raise `InvalidQuery` naming the parameter
    (see `lokid.audit.AuditQuery.parse`; call that first to fail before the
    read).
    """
    query = AuditQuery.parse(start=start, end=end, action=action, limit=limit, offset=offset)
    return _list(db, query)


def _list(db: sqlite_utils.Database, query: AuditQuery) -> dict[str, Any]:
    where, params = query.where()
    rows = _fetch(
        db,
        f"SELECT {_COLUMNS} FROM audit_log WHERE {where} ORDER BY id DESC LIMIT ? OFFSET ?",
        [*params, query.limit, query.offset],
        errors="replace",
    )
    total = db.execute(f"SELECT COUNT(*) FROM audit_log WHERE {where}", params).fetchone()[0]
    return {
        "entries": [entry_from_row(row).to_json() for row in rows],
        "total": total,
        "limit": query.limit,
        "offset": query.offset,
    }


def audit_summary(
    db: sqlite_utils.Database, *, breakdown_limit: int = BREAKDOWN_LIMIT
) -> dict[str, Any]:
    """Totals by action, actor and status, first/last timestamps, and the chain's verdict.

    Each breakdown lists at most `breakdown_limit` keys, most frequent
    first; `omitted` counts the keys left out. `status` keys are strings
    (`"none"` for entries without one). `chain_valid` comes from a full
    `verify_store` in pages (constant memory, time linear in the log).
    """
    # Values of edited rows: text that is not UTF-8 decoded with U+FFFD, any type shown.
    [(total, first, last)] = _fetch(
        db, "SELECT COUNT(*), MIN(timestamp), MAX(timestamp) FROM audit_log", [], errors="replace"
    )
    answer: dict[str, Any] = {
        "total": total,
        "first_timestamp": json_value(first),
        "last_timestamp": json_value(last),
    }
    omitted: dict[str, int] = {}
    for column in ("action", "actor", "status"):
        rows = _fetch(
            db,
            f"SELECT {column}, COUNT(*) AS n FROM audit_log GROUP BY {column}"
            f" ORDER BY n DESC, {column} LIMIT ?",
            [breakdown_limit],
            errors="replace",
        )
        answer[f"by_{column}"] = {("none" if k is None else str(json_value(k))): n for k, n in rows}
        keys = db.execute(f"SELECT COUNT(DISTINCT {column}) FROM audit_log").fetchone()[0]
        if column == "status":
            keys += db.execute(
                "SELECT COUNT(*) > 0 FROM audit_log WHERE status IS NULL"
            ).fetchone()[0]
        omitted[column] = max(0, keys - len(rows))
    report = verify_store(db)
    answer["omitted"] = omitted
    answer["chain_valid"] = report.valid
    answer["chain"] = report.to_json()
    return answer


def verify_store(db: sqlite_utils.Database, *, page: int = VERIFY_PAGE) -> ChainReport:
    """`lokid.audit.verify` of the stored chain, read `page` entries at a time.

    Run it in one read transaction (`StoreActor.read` does) so the entries
    and the anchor are one snapshot.
    """
    verifier = ChainVerifier(read_anchor(db))
    after = 0
    while verifier.wants_more:
        rows = _fetch(
            db,
            f"SELECT {_COLUMNS} FROM audit_log WHERE id > ? ORDER BY id LIMIT ?",
            [after, page],
            errors="surrogateescape",  # kept apart from any valid text: hashes differ
        )
        if not rows:
            break
        verifier.feed(entry_from_row(row) for row in rows)
        after = rows[-1][0]
    return verifier.finish()
