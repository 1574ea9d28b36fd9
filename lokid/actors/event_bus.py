"""EventBus: ids, persistence, a bounded in-memory tail, and fan-out to subscribers.

Theory of operation:

* **Publish = durable, then delivered.** Publishers `ask` the bus. The bus
  takes every publish waiting in its mailbox (up to `max_batch`), assigns
  consecutive ids, writes the batch through the store in one write (one
  group-committed transaction), and only after the commit appends it to
  the tail and offers it to subscribers. So an event a client received is
  always in history, and a crash loses only events nobody saw and whose
  publisher was not answered.
* **Ids survive restarts**: the table is AUTOINCREMENT and the bus starts
  from `sqlite_sequence`, the highest id ever stored, even after retention
  deleted every row.
* **Subscribers never slow anything down.** Each has a bounded queue of
  pre-encoded frames (shared bytes, encoded once per event). Offering is a
  plain append; a subscriber whose queue is full is closed with reason
  `slow` (the client reconnects with Last-Event-ID and replays from the
  store). Fan-out checkpoints every `FANOUT_CHECKPOINT` subscribers so
  thousands of streams never hold the event loop for long.
* **No gap, no duplicate across replay -> live.** `subscribe` (synchronous,
  so atomic on the trio loop) records `live_from`, the last id already
  handed to fan-out; the queue receives exactly the ids above it, and the
  stream replays from the store up to and including it.
* **Stopping daemon**: `refuse_streams` ends every stream (comment
  `: closed: shutdown`) and refuses every later `subscribe` with
  `Unavailable` (503): a client that reconnects at once (`loki events -f`,
  a browser) must not get a new stream that holds the stopping listeners
  open until their drain times out. For the rest of this bus object's life
  (one daemon run); a restart of the bus's task does not lift it.
* **Retention** by count and age runs every `retention_interval` seconds in
  bounded deletes (`RETENTION_CHUNK` rows per transaction). The count rule
  keeps the newest `retention_count` *stored* events: each transaction counts
  the rows, so ids already gone (a deleted session's events, an earlier
  prune) do not count against it; a prune with nothing due reads indexes
  only. The tail loses the same ids in the same commit. `stream.reset`
  (`expired`) is due only when retention removed an event after the
  client's id: events that went with their session are skipped silently.
* **Back-pressure in events, not messages.** `emit`/`emit_many` do not wait
  for the commit, so they are bounded by the number of emitted events not
  yet stored (`max_backlog`, `MAX_BACKLOG_EVENTS`): an emitter waits while
  that many are in the mailbox or in the batch being stored (at most
  `backlog_wait` seconds, `BACKLOG_WAIT`, then `AskTimeout`). One mailbox
  message may carry up to `MAX_EMIT_MANY` events, so a bound in messages
  alone let a flood of short agent lines queue millions. One batch stops
  gathering once it holds `max_batch_events` (`MAX_BATCH_EVENTS`) events,
  so storing, encoding and fanning out one batch holds the trio loop only
  briefly.
* **Streams of output are paced, nothing else.** While the bus stores
  emitted events only (nobody waits for their commit), a batch of them is
  not stored sooner than `emit_interval` (`EMIT_INTERVAL`, 10 ms) after the
  previous one began; until then it gathers what arrives. A message someone
  waits for (a publish, a call), a full batch or a stop ends the wait at
  once; a lone event after a quiet spell, or after a batch with a publish
  in it, is stored at once (a busy mix of publishes and output, as in a
  burst of session starts, is not held back). So 500 agents printing a
  line a second each cost at most 100 commits (and fsyncs) a second
  instead of 500, and a line reaches the streams at most 10 ms later.

Mailbox: 4096 messages, BLOCK: a publisher burst back-pressures the
publishers (internal actors) instead of growing memory or dropping events;
emitted events are bounded as above.
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, ClassVar, TypeVar

import attrs
import sqlite_utils
import trio

from lokid.actor import Actor, ActorStatistics, Call, Reply, WhenFull
from lokid.actors.store import StoreActor
from lokid.errors import AskTimeout, LokiError, Unavailable
from lokid.events import (
    EncodedEvent,
    Event,
    EventFilter,
    Level,
    compact_json,
    event_from_row,
    publishable,
)
from lokid.timefmt import iso, utc_now, utc_now_iso

T = TypeVar("T")

log = logging.getLogger("lokid.events")

FANOUT_CHECKPOINT = 256  # subscribers offered between two checkpoints
RETENTION_CHUNK = 5000  # rows deleted per retention transaction
DELETE_IDS_PER_STATEMENT = 500  # below SQLite's oldest limit of 999 parameters
REPLAY_PAGE = 500  # events read from the store per replay page


@attrs.frozen
class Publish:
    type: str
    session_id: str | None
    level: Level
    data: Mapping[str, Any]
    write: Callable[[sqlite_utils.Database], Any] | None = attrs.field(default=None, eq=False)
    """`publish_with`: a store write committed in the same transaction as the event."""
    text: str | None = attrs.field(default=None, eq=False)
    """`compact_json(data)`, computed by `publishable`: stored and sent without encoding again."""
    bound: bool = attrs.field(default=False, eq=False)
    """`publish_with(along=...)`: stored only if the write of the item after it succeeds."""

    @classmethod
    def checked(
        cls,
        type: str,
        session_id: str | None,
        level: Level,
        data: Mapping[str, Any],
        write: Callable[[sqlite_utils.Database], Any] | None = None,
        *,
        bound: bool = False,
    ) -> Publish:
        """`publishable` data (a bug raises `ValueError`), encoded once."""
        payload, text = publishable(type, data)
        return cls(type, session_id, level, payload, write, text, bound)


@attrs.frozen
class PublishMany:
    """Several `emit`s as one mailbox message (a batch of agent output)."""

    items: tuple[Publish, ...]


MAX_EMIT_MANY = 512
"""Events in one `emit_many` message; a longer list is sent as several."""

MAX_BACKLOG_EVENTS = 8192
"""Emitted events not yet stored, at most: beyond it `emit`/`emit_many` wait (back-pressure)."""

MAX_BATCH_EVENTS = 2048
"""A batch stops gathering messages once it holds this many events: storing, encoding and
fanning out one batch stays short, and one batch (at most this + `MAX_EMIT_MANY` - 1 events)
never fills a subscriber's queue (4096 frames) on its own."""

EMIT_INTERVAL = 0.010
"""Seconds between the starts of two batches of output alone (module docstring, "Streams
of output are paced"): at most 100 such commits a second."""

BACKLOG_WAIT = 30.0
"""Seconds an emitter waits for room in the backlog before it gives up (`AskTimeout`)."""


class SubscriberClosed(LokiError):
    """The stream must end: the bus closed this subscriber (slow, or shutting down)."""


class Subscriber:
    """One live stream: a filter and a bounded queue of SSE frames."""

    def __init__(
        self, bus: EventBus, event_filter: EventFilter, named: bool, capacity: int
    ) -> None:
        self.bus = bus
        self.filter = event_filter
        self.named = named
        self.capacity = capacity
        self.live_from = 0
        self.closed_reason: str | None = None
        self.delivered = 0
        self._frames: collections.deque[bytes] = collections.deque()
        self._last_id = 0
        self._wakeup = trio.Event()

    def offer(self, encoded: EncodedEvent) -> None:
        if self.closed_reason is not None or not self.filter.matches(encoded.event):
            return
        if len(self._frames) >= self.capacity:
            self.close("slow")
            return
        self._frames.append(encoded.sse(self.named))
        self._last_id = encoded.event.id
        self._wakeup.set()

    async def next_frames(self) -> list[bytes]:
        """Everything queued (at least one frame); raises SubscriberClosed when closed."""
        while not self._frames:
            if self.closed_reason is not None:
                raise SubscriberClosed(f"stream closed: {self.closed_reason}")
            self._wakeup = trio.Event()
            await self._wakeup.wait()
        if self.closed_reason is not None:
            raise SubscriberClosed(f"stream closed: {self.closed_reason}")
        frames = list(self._frames)
        self._frames.clear()
        self.delivered += len(frames)
        return frames

    def close(self, reason: str) -> None:
        if self.closed_reason is None:
            self.closed_reason = reason
            self._frames.clear()
            self._wakeup.set()
            self.bus.unsubscribe(self)

    @property
    def queued(self) -> int:
        return len(self._frames)


@attrs.frozen
class EventBusStatistics(ActorStatistics):
    last_id: int
    subscribers: int
    subscribers_peak: int
    subscribers_cut_slow: int
    published: int
    batches: int
    tail_size: int
    retention_deleted: int
    backlog: int
    """Emitted events not yet stored (at most `max_backlog` plus one message per emitter)."""
    backlog_waits: int
    """Times an emitter waited for room in the backlog (back-pressure)."""
    paced_batches: int
    """Batches of emitted events held back to gather more (`emit_interval`)."""


@attrs.frozen
class ReplayPlan:
    """What a stream sends before going live."""

    reset: dict[str, Any] | None  # payload of a stream.reset frame, if one is due
    after_id: int  # replay ids > after_id ...
    upto_id: int  # ... and <= upto_id
    last: int | None  # only the last N of those (history=N), else all


class EventBus(Actor[Any]):
    mailbox_size: ClassVar[int] = 4096
    when_full: ClassVar[WhenFull] = WhenFull.BLOCK

    def __init__(
        self,
        store: StoreActor,
        *,
        tail_size: int = 4096,
        subscriber_queue: int = 4096,
        max_subscribers: int = 10_000,
        max_batch: int = 512,
        max_batch_events: int = MAX_BATCH_EVENTS,
        max_backlog: int = MAX_BACKLOG_EVENTS,
        backlog_wait: float = BACKLOG_WAIT,
        emit_interval: float = EMIT_INTERVAL,
        retention_count: int = 100_000,
        retention_seconds: float = 7 * 86400,
        retention_interval: float = 60.0,
    ) -> None:
        super().__init__("event_bus")
        self.store = store
        self.tail_size = tail_size
        self.subscriber_queue = subscriber_queue
        self.max_subscribers = max_subscribers
        self.max_batch = max_batch
        self.max_batch_events = max_batch_events
        self.max_backlog = max_backlog
        self.backlog_wait = backlog_wait
        self.emit_interval = emit_interval
        self.retention_count = retention_count
        self.retention_seconds = retention_seconds
        self.retention_interval = retention_interval
        self._tail: collections.deque[EncodedEvent] = collections.deque(maxlen=tail_size)
        self._subscribers: set[Subscriber] = set()
        self._refusal: str | None = None  # set by refuse_streams: why subscribe is refused
        self._listeners: list[Callable[[EncodedEvent], None]] = []
        self._last_id = 0  # highest id assigned and committed
        self._expired_upto = 0  # highest id retention removed (approximated at start)
        self._peak = 0
        self._cut_slow = 0
        self._published = 0
        self._batches = 0
        self._retention_deleted = 0
        self._backlog = 0  # emitted events in the mailbox or in the batch being stored
        self._room = trio.Event()  # set (and replaced) whenever the backlog shrinks
        self._backlog_waits = 0
        self._batch_started = -float("inf")  # trio time the last batch began storing
        self._output_only = False  # the last batch held emitted events only
        self._paced_batches = 0

    # -- publishing ---------------------------------------------------------------

    async def publish(
        self,
        type: str,
        session_id: str | None = None,
        level: Level = Level.INFO,
        data: Mapping[str, Any] | None = None,
        *,
        timeout: float = 30.0,
    ) -> Event:
        """Store and deliver one event; returns it with its id once it is durable."""
        message = Publish.checked(type, session_id, level, data or {})
        event: Event = await self.ask(message, timeout=timeout)
        return event

    async def publish_with(
        self,
        write: Callable[[sqlite_utils.Database], T],
        type: str,
        session_id: str | None = None,
        level: Level = Level.INFO,
        data: Mapping[str, Any] | None = None,
        *,
        before: Sequence[tuple[str, str | None, Level, Mapping[str, Any]]] = (),
        along: Sequence[tuple[str, str | None, Level, Mapping[str, Any]]] = (),
        timeout: float = 30.0,
    ) -> tuple[Event, T]:
        """Run `write(db)` and store the event in one transaction; deliver it after.

        A change and the event that announces it commit together (one fsync,
        and no window in which one is stored without the other). If `write`
        raises, nothing of it and no event is stored and the caller gets the
        exception; the other events of the batch are not affected.

        `before` ((type, session id, level, data) each) are stored in that same
        transaction just ahead of the event (not undone by a `write` that
        raises: they happened), and delivered with it: one ask and one commit
        for a run's end, instead of one per event.

        `along` are stored after `before` and just ahead of the event, and only
        with the write: a `write` that raises undoes them too (several events
        that announce the one change, e.g. an `input.applied` per input).
        """
        main = Publish.checked(type, session_id, level, data or {}, write)
        message: Publish | PublishMany = main
        if before or along:
            items = [Publish.checked(t, s, lv, d) for t, s, lv, d in before]
            items += [Publish.checked(t, s, lv, d, bound=True) for t, s, lv, d in along]
            message = PublishMany((*items, main))
        answer: tuple[Event, T] = await self.ask(message, timeout=timeout)
        return answer

    async def emit(
        self,
        type: str,
        session_id: str | None = None,
        level: Level = Level.INFO,
        data: Mapping[str, Any] | None = None,
    ) -> None:
        """Publish without waiting for the commit (high-rate sources, e.g. agent output).

        Waits only while `max_backlog` emitted events are not stored yet, or the
        mailbox is full (back-pressure). The event is stored and delivered in
        order with every other publish; if the store refuses the batch it is
        logged, since nobody is waiting to be told.
        """
        await self._emit_message(Publish.checked(type, session_id, level, data or {}), 1)

    async def emit_many(
        self, events: Sequence[tuple[str, str | None, Level, Mapping[str, Any]]]
    ) -> None:
        """`emit` each of `events` ((type, session id, level, data)), in order, with one
        mailbox message per `MAX_EMIT_MANY`: a batch of agent output costs the bus one
        hop instead of one per line. Each message waits for room in the backlog."""
        items = [Publish.checked(*event) for event in events]
        for start in range(0, len(items), MAX_EMIT_MANY):
            chunk = tuple(items[start : start + MAX_EMIT_MANY])
            await self._emit_message(PublishMany(chunk), len(chunk))

    async def _emit_message(self, message: Publish | PublishMany, count: int) -> None:
        """Send `count` emitted events once they fit under `max_backlog` (one message
        always fits into an empty backlog); `AskTimeout` after `backlog_wait` s."""
        if self._backlog and self._backlog + count > self.max_backlog:
            self._backlog_waits += 1
            with trio.move_on_after(self.backlog_wait):
                while self._backlog and self._backlog + count > self.max_backlog:
                    await self._room.wait()
            if self._backlog and self._backlog + count > self.max_backlog:
                raise AskTimeout(
                    f"{self.name}: {self._backlog} emitted events still unstored after "
                    f"{self.backlog_wait:g} s"
                )
        self._backlog += count  # no checkpoint since the check: the bound holds
        try:
            await self.tell(message)
        except BaseException:  # not sent (trio: a cancelled send sent nothing)
            self._unbacklog(count)
            raise

    def _unbacklog(self, count: int) -> None:
        if not count:
            return
        self._backlog -= count
        self._room.set()
        self._room = trio.Event()

    # -- subscribing --------------------------------------------------------------

    def subscribe(self, event_filter: EventFilter, *, named: bool = False) -> Subscriber:
        if self._refusal is not None:
            raise Unavailable(self._refusal)
        if len(self._subscribers) >= self.max_subscribers:
            raise Unavailable(f"too many event streams open ({self.max_subscribers}); try later")
        subscriber = Subscriber(self, event_filter, named, self.subscriber_queue)
        subscriber.live_from = self._last_id
        self._subscribers.add(subscriber)
        self._peak = max(self._peak, len(self._subscribers))
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        if subscriber in self._subscribers:
            self._subscribers.discard(subscriber)
            if subscriber.closed_reason == "slow":
                self._cut_slow += 1
            if subscriber.closed_reason is None:
                subscriber.closed_reason = "unsubscribed"

    @property
    def last_id(self) -> int:
        return self._last_id

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    def plan_replay(
        self, subscriber: Subscriber, *, last_event_id: int | None, history: int | None
    ) -> ReplayPlan:
        """Decide the replay of a new stream (see the module rules)."""
        upto = subscriber.live_from
        if last_event_id is None:
            return ReplayPlan(None, 0, upto, history if history else 0)
        if last_event_id > upto:
            reset = {
                "reason": "unknown",
                "lastEventId": last_event_id,
                "latestId": upto,
                "message": "this daemon has no event with that id; continuing with new events",
            }
            return ReplayPlan(reset, upto, upto, None)
        expired = self._expired_upto
        if last_event_id < min(upto, expired):
            # Ids above `expired` were not removed by retention (some may have gone with
            # their session, which a replay skips silently); None: none is left to replay.
            reset = {
                "reason": "expired",
                "lastEventId": last_event_id,
                "firstAvailableId": expired + 1 if expired < upto else None,
                "message": "events after that id were removed by retention; replaying what is left",
            }
            return ReplayPlan(reset, last_event_id, upto, None)
        return ReplayPlan(None, last_event_id, upto, None)

    async def replay(
        self, event_filter: EventFilter, plan: ReplayPlan
    ) -> AsyncIterator[list[EncodedEvent]]:
        """Pages of stored events matching the filter in (after_id, upto_id], oldest first."""
        if plan.last == 0 or plan.after_id >= plan.upto_id:
            return
        if plan.last is not None:
            # The last N matching events at or before the live boundary.
            events = await self.history(event_filter, before=plan.upto_id + 1, limit=plan.last)
            yield [EncodedEvent.of(e) for e in events if e.id > plan.after_id]
            return
        tail = self._tail
        if tail and tail[0].event.id <= plan.after_id + 1:
            page = [
                e
                for e in list(tail)
                if plan.after_id < e.event.id <= plan.upto_id and event_filter.matches(e.event)
            ]
            if page:
                yield page
            return
        after = plan.after_id
        while after < plan.upto_id:
            events = await self._read_page(event_filter, after, plan.upto_id, REPLAY_PAGE)
            if not events:
                return
            yield [EncodedEvent.of(e) for e in events]
            after = events[-1].id

    async def _read_page(
        self, event_filter: EventFilter, after: int, upto: int, limit: int
    ) -> list[Event]:
        where, params = event_filter.sql()

        def read(db: sqlite_utils.Database) -> list[Event]:
            rows = db.execute(
                f"SELECT * FROM events WHERE id > ? AND id <= ? AND {where} ORDER BY id LIMIT ?",
                [after, upto, *params, limit],
            ).fetchall()
            return [_row_event(row) for row in rows]

        return await self.store.read(read)

    async def history(
        self,
        event_filter: EventFilter,
        *,
        after: int | None = None,
        before: int | None = None,
        limit: int = 100,
    ) -> list[Event]:
        """Matching stored events, oldest first.

        With `after`: the first `limit` events after it (paging forward);
        without: the last `limit` (the most recent).
        """
        where, params = event_filter.sql()
        clauses = [where]
        values: list[Any] = []
        if after is not None:
            clauses.append("id > ?")
            values.append(after)
        if before is not None:
            clauses.append("id < ?")
            values.append(before)
        order = "ASC" if after is not None else "DESC"
        sql = f"SELECT * FROM events WHERE {' AND '.join(clauses)} ORDER BY id {order} LIMIT ?"

        def read(db: sqlite_utils.Database) -> list[Event]:
            rows = db.execute(sql, [*params, *values, limit]).fetchall()
            events = [_row_event(row) for row in rows]
            return events if order == "ASC" else events[::-1]

        return await self.store.read(read)

    async def counts(self) -> dict[str, Any]:
        since = iso(utc_now() - dt.timedelta(minutes=5))

        def read(db: sqlite_utils.Database) -> dict[str, Any]:
            by_type: dict[str, int] = {}
            by_level: dict[str, int] = {}
            for type_, level, count in db.execute(
                "SELECT type, level, COUNT(*) FROM events GROUP BY type, level"
            ).fetchall():
                by_type[type_] = by_type.get(type_, 0) + count
                label = Level(level).label
                by_level[label] = by_level.get(label, 0) + count
            first, last, total = db.execute(
                "SELECT MIN(id), MAX(id), COUNT(*) FROM events"
            ).fetchone()
            recent = db.execute(
                "SELECT COUNT(*) FROM events WHERE timestamp >= ?", [since]
            ).fetchone()[0]
            return {
                "total": total,
                "byType": by_type,
                "byLevel": by_level,
                "firstId": first,
                "latestId": last,
                "eventsPerMinute": round(recent / 5, 2),
            }

        answer = await self.store.read(read)
        answer["subscribers"] = len(self._subscribers)
        return answer

    # -- the actor ----------------------------------------------------------------

    async def setup(self) -> None:
        def load(db: sqlite_utils.Database) -> tuple[int, int | None, list[Event]]:
            seq = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
            first = db.execute("SELECT MIN(id) FROM events").fetchone()[0]
            rows = db.execute(
                "SELECT * FROM events ORDER BY id DESC LIMIT ?", [self.tail_size]
            ).fetchall()
            return (seq[0] if seq else 0), first, [_row_event(r) for r in reversed(rows)]

        last, first, tail = await self.store.read(load)
        self._last_id = max(self._last_id, last)
        # What retention removed is not stored: below the oldest row, or all of them.
        self._expired_upto = max(self._expired_upto, last if first is None else first - 1)
        self._tail.clear()
        self._tail.extend(EncodedEvent.of(e) for e in tail)

    def close_all(self, reason: str) -> int:
        """End every stream (e.g. the daemon is stopping: streams must not hold up the drain)."""
        subscribers = list(self._subscribers)
        for subscriber in subscribers:
            subscriber.close(reason)
        return len(subscribers)

    def refuse_streams(self, message: str) -> int:
        """End every stream ("shutdown") and refuse new ones with `Unavailable(message)`
        from now on (the daemon is stopping: see the module rules); how many were ended."""
        self._refusal = message
        return self.close_all("shutdown")

    async def teardown(self) -> None:
        self.close_all("shutdown")

    async def serve(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._retention_loop)
            while (message := await self.next_message()) is not None:
                batch = [message]
                events = _event_count(message)
                while (
                    len(batch) < self.max_batch
                    and events < self.max_batch_events
                    and (more := self.next_message_nowait()) is not None
                ):
                    batch.append(more)
                    events += _event_count(more)
                try:
                    only_emitted = _only_emitted(batch)
                    paced_until = self._batch_started + self.emit_interval
                    if self._output_only and only_emitted and paced_until > trio.current_time():
                        self._paced_batches += 1
                        await self._gather(batch, events, paced_until)
                        only_emitted = _only_emitted(batch)
                    self._batch_started = trio.current_time()
                    self._output_only = only_emitted
                    await self._publish_batch(batch)
                finally:  # stored, refused or crashed: no longer in the backlog
                    self._unbacklog(sum(_emitted_count(m) for m in batch))
            nursery.cancel_scope.cancel()

    async def _gather(self, batch: list[Any], events: int, until: float) -> None:
        """Add what arrives to `batch` until `until`, a message someone waits for, a full
        batch, or a stop request (module docstring, "paced")."""
        with trio.move_on_at(until):
            while len(batch) < self.max_batch and events < self.max_batch_events:
                message = await self.next_message()
                if message is None:  # stopping: store what was gathered now
                    return
                batch.append(message)
                events += _event_count(message)
                if _emitted_count(message) != _event_count(message):
                    return  # its sender waits: no pacing for this batch

    async def _publish_batch(self, batch: list[Any]) -> None:
        # (reply channel or None for `emit`, what to publish), in mailbox order.
        pending: list[tuple[Call | None, Publish]] = []
        asked = 0  # events without a call of their own that a caller waits for
        for message in batch:
            if isinstance(message, Publish):
                pending.append((None, message))
            elif isinstance(message, PublishMany):
                pending.extend((None, item) for item in message.items)
            elif isinstance(message, Call) and isinstance(message.message, Publish):
                pending.append((message, message.message))
            elif isinstance(message, Call) and isinstance(message.message, PublishMany):
                # `publish_with(before=...)`: the call is answered with its last event.
                *ahead, last = message.message.items
                pending.extend((None, item) for item in ahead)
                pending.append((message, last))
                asked += len(ahead)
            else:
                await self.dispatch(message)
        if not pending:
            return
        now = utc_now_iso()
        first_id = self._last_id + 1
        outcomes: list[Any] = [None] * len(pending)  # a write's result, or what it raised
        stored: list[Event] = []
        where: list[int] = []  # index in `pending` of each stored event

        def insert(db: sqlite_utils.Database) -> None:
            stored.clear()
            where.clear()
            for index, (_, p) in enumerate(pending):
                if p.write is not None:
                    db.execute("SAVEPOINT lokid_publish_write")
                    try:
                        outcomes[index] = p.write(db)
                    except Exception as exc:
                        db.execute("ROLLBACK TO lokid_publish_write")
                        db.execute("RELEASE lokid_publish_write")
                        outcomes[index] = _Failed(exc)
                        # Its `along` events, just stored ahead of it, go with it (the
                        # last ids handed out: the ids stay consecutive).
                        ahead = index - 1
                        while where and where[-1] == ahead and pending[ahead][1].bound:
                            stored.pop()
                            where.pop()
                            ahead -= 1
                        continue
                    db.execute("RELEASE lokid_publish_write")
                text = p.text if p.text is not None else compact_json(p.data)
                stored.append(
                    Event(first_id + len(stored), p.type, now, p.session_id, p.level, p.data, text)
                )
                where.append(index)
            db.conn.executemany(
                "INSERT INTO events (id, type, session_id, level, timestamp, data)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (e.id, e.type, e.session_id, int(e.level), e.timestamp, e.data_json)
                    for e in stored
                ],
            )

        try:
            await self.store.write(insert)
        except LokiError as exc:
            # Nothing was stored: the ids are not used, callers hear why, emits are logged.
            failed = sum(1 for call, _ in pending if call is None) - asked
            if failed:
                log.error("%d emitted events were not stored: %s", failed, exc)
            for call, _ in pending:
                if call is not None:
                    _answer(call, Reply(error=exc))
            return
        for index, (call, _) in enumerate(pending):
            outcome = outcomes[index]
            if call is not None and isinstance(outcome, _Failed):
                _answer(call, Reply(error=outcome.error))
        if not stored:
            return
        events = stored
        self._last_id = events[-1].id
        self._batches += 1
        self._published += len(events)
        encoded = [EncodedEvent.of(e) for e in events]
        self._tail.extend(encoded)
        for index, event in zip(where, events, strict=True):
            call, p = pending[index]
            if call is not None:
                value = event if p.write is None else (event, outcomes[index])
                _answer(call, Reply(value=value))
        await self._fan_out(encoded)

    def add_listener(self, listener: Callable[[EncodedEvent], None]) -> None:
        """Call `listener(encoded)` for every event once it is stored (e.g. the `/ws` hub).

        It runs inside the bus's fan-out, so it must not block; an exception
        it raises is logged and the other listeners and subscribers go on.
        """
        self._listeners.append(listener)

    async def _fan_out(self, encoded: list[EncodedEvent]) -> None:
        for listener in self._listeners:
            for item in encoded:
                try:
                    listener(item)
                except Exception:
                    log.exception("event listener %r failed", listener)
        subscribers = list(self._subscribers)
        for index, subscriber in enumerate(subscribers, start=1):
            for item in encoded:
                if item.event.id > subscriber.live_from:
                    subscriber.offer(item)
            if index % FANOUT_CHECKPOINT == 0:
                await trio.lowlevel.checkpoint()

    async def _retention_loop(self) -> None:
        while True:
            try:
                await self.prune()
            except LokiError as exc:
                log.warning("event retention failed: %s", exc)
            await trio.sleep(self.retention_interval)

    async def prune(self) -> int:
        """Delete events beyond the count and age bounds; returns how many went."""
        cutoff = iso(utc_now() - dt.timedelta(seconds=self.retention_seconds))
        keep = self.retention_count
        deleted_total = 0
        while True:
            deleted = await self.store.write(
                lambda db: _prune_chunk(db, keep, cutoff, RETENTION_CHUNK),
                on_commit=self._forget_pruned,
            )
            deleted_total += len(deleted)
            if len(deleted) < RETENTION_CHUNK:
                return deleted_total

    def _forget_pruned(self, ids: list[int]) -> None:
        """Right after a retention commit: the tail is a cache of the store, so it must not
        resurrect what retention removed, and a replay from before it is told so."""
        if not ids:
            return
        self._retention_deleted += len(ids)
        self._expired_upto = max(self._expired_upto, max(ids))
        if self._tail and self._tail[0].event.id <= self._expired_upto:
            gone = set(ids)
            kept = [item for item in self._tail if item.event.id not in gone]
            self._tail.clear()
            self._tail.extend(kept)

    def forget_session(self, session_id: str) -> None:
        """Drop a deleted session's events from the tail.

        Call once `DELETE /api/sessions/{id}` removed them from the store: the
        tail is a cache of the store, and a replay served from it must not
        resurrect them. The rest keeps its order, and the tail still holds
        every stored event from its first one on, so `replay` may keep serving
        from it (a range starting below its new first id is read from the store).
        """
        kept = [item for item in self._tail if item.event.session_id != session_id]
        if len(kept) < len(self._tail):
            self._tail.clear()
            self._tail.extend(kept)

    def statistics(self) -> EventBusStatistics:
        base = super().statistics()
        return EventBusStatistics(
            **attrs.asdict(base, recurse=False),
            last_id=self._last_id,
            subscribers=len(self._subscribers),
            subscribers_peak=self._peak,
            subscribers_cut_slow=self._cut_slow,
            published=self._published,
            batches=self._batches,
            tail_size=len(self._tail),
            retention_deleted=self._retention_deleted,
            backlog=self._backlog,
            backlog_waits=self._backlog_waits,
            paced_batches=self._paced_batches,
        )


def _prune_chunk(db: sqlite_utils.Database, keep: int, cutoff: str, limit: int) -> list[int]:
    """Delete at most `limit` events: the oldest beyond the newest `keep` stored ones, then
    those stamped before `cutoff`; the ids deleted.

    The rows are counted in this transaction (the writer's), so a session deleted since
    the last prune frees its room and no concurrent delete makes this one remove too
    many. COUNT walks the smallest index and the selects start from the oldest id or
    use the timestamp index, so a prune with nothing due reads no table row. Ids are
    selected, then deleted by id lists (`DELETE ... RETURNING` needs SQLite 3.35; one
    statement per id costs twice the time).
    """
    (stored,) = db.execute("SELECT COUNT(*) FROM events").fetchone()
    excess = min(max(stored - keep, 0), limit)
    oldest = _delete_selected(db, "SELECT id FROM events ORDER BY id LIMIT ?", [excess])
    aged = _delete_selected(
        db,
        "SELECT id FROM events WHERE timestamp < ? ORDER BY timestamp LIMIT ?",
        [cutoff, limit - len(oldest)],
    )
    return oldest + aged


def _delete_selected(db: sqlite_utils.Database, select: str, params: list[Any]) -> list[int]:
    """Delete the events whose ids `select` returns; those ids."""
    ids = [row[0] for row in db.execute(select, params).fetchall()]
    for start in range(0, len(ids), DELETE_IDS_PER_STATEMENT):
        part = ids[start : start + DELETE_IDS_PER_STATEMENT]
        db.execute(f"DELETE FROM events WHERE id IN ({', '.join('?' * len(part))})", part)
    return ids


def _event_count(message: Any) -> int:
    """Events a mailbox message carries (for the batch's `max_batch_events`)."""
    if isinstance(message, Call):
        message = message.message
    return len(message.items) if isinstance(message, PublishMany) else 1


def _only_emitted(batch: list[Any]) -> bool:
    """Nobody waits for the commit of `batch` (every message is an `emit`)."""
    return all(isinstance(message, Publish | PublishMany) for message in batch)


def _emitted_count(message: Any) -> int:
    """Events of a message counted in the backlog: those of `emit`/`emit_many`."""
    if isinstance(message, PublishMany):
        return len(message.items)
    return 1 if isinstance(message, Publish) else 0


@attrs.frozen
class _Failed:
    error: Exception


def _answer(call: Call, reply: Reply) -> None:
    with call.reply, contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        call.reply.send_nowait(reply)


def _row_event(row: Any) -> Event:
    return event_from_row(
        {
            "id": row[0],
            "type": row[1],
            "session_id": row[2],
            "level": row[3],
            "timestamp": row[4],
            "data": row[5],
        }
    )
