"""The event bus on a real SQLite store: ids, durability, fan-out, replay, retention."""

from __future__ import annotations

import contextlib
import pathlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
import trio.testing

from lokid.actors.event_bus import EventBus, Subscriber, SubscriberClosed
from lokid.actors.store import StoreActor, StoreUnavailable
from lokid.errors import AskTimeout, Unavailable
from lokid.events import EncodedEvent, EventFilter, Level, make_filter


@contextlib.asynccontextmanager
async def running_bus(path: pathlib.Path, **options: Any) -> AsyncIterator[EventBus]:
    store = StoreActor(path / "lokid.db")
    bus = EventBus(store, **options)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            await nursery.start(bus.run)
            yield bus
            nursery.cancel_scope.cancel()


async def drain(subscriber: Subscriber, count: int) -> list[int]:
    """Ids of the next `count` frames delivered to the subscriber."""
    ids: list[int] = []
    while len(ids) < count:
        for frame in await subscriber.next_frames():
            ids.append(int(frame.split(b"\n", 1)[0].removeprefix(b"id: ")))
    return ids


async def test_ids_are_consecutive_and_survive_a_restart(tmp_path: pathlib.Path) -> None:
    async with running_bus(tmp_path) as bus:
        first = [(await bus.publish("log", None, Level.INFO, {"n": n})).id for n in range(3)]
    assert first == [1, 2, 3]
    async with running_bus(tmp_path) as bus:
        assert bus.last_id == 3
        assert (await bus.publish("log")).id == 4
        stored = await bus.history(EventFilter())
    assert [e.id for e in stored] == [1, 2, 3, 4]
    assert stored[0].data == {"n": 0}


async def test_ids_keep_increasing_after_retention_emptied_the_table(
    tmp_path: pathlib.Path,
) -> None:
    async with running_bus(tmp_path, retention_count=1) as bus:
        for _ in range(5):
            await bus.publish("log")
        await bus.prune()
        assert [e.id for e in await bus.history(EventFilter())] == [5]
        await bus.store.write(lambda db: db.execute("DELETE FROM events"))
    async with running_bus(tmp_path) as bus:
        assert (await bus.publish("log")).id == 6


async def test_concurrent_publishers_get_distinct_increasing_ids(tmp_path: pathlib.Path) -> None:
    ids: list[int] = []
    async with running_bus(tmp_path) as bus:

        async def publisher() -> None:
            for _ in range(20):
                ids.append((await bus.publish("log")).id)

        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(publisher)
        stats = bus.statistics()
    assert sorted(ids) == list(range(1, 201))
    assert stats.published == 200
    assert stats.batches < 200  # publishes were grouped


async def test_subscriber_receives_only_matching_events_in_order(tmp_path: pathlib.Path) -> None:
    async with running_bus(tmp_path) as bus:
        everything = bus.subscribe(EventFilter())
        tasks = bus.subscribe(make_filter(types="task.*", session_id="s1"))
        await bus.publish("task.started", "s1")
        await bus.publish("task.started", "s2")
        await bus.publish("log")
        await bus.publish("task.completed", "s1")
        assert await drain(everything, 4) == [1, 2, 3, 4]
        assert await drain(tasks, 2) == [1, 4]
        assert tasks.queued == 0


async def test_a_subscriber_that_never_reads_is_cut_off_and_slows_nobody(
    tmp_path: pathlib.Path,
) -> None:
    async with running_bus(tmp_path, subscriber_queue=10) as bus:
        stuck = bus.subscribe(EventFilter())
        reader = bus.subscribe(EventFilter())
        received: list[int] = []
        for _ in range(30):
            await bus.publish("log")
            received += await drain(reader, 1)
        assert received == list(range(1, 31))
        assert stuck.closed_reason == "slow"
        with pytest.raises(SubscriberClosed, match="slow"):
            await stuck.next_frames()
        stats = bus.statistics()
        assert stats.subscribers == 1
        assert stats.subscribers_cut_slow == 1


async def test_subscriber_limit_is_a_clear_503(tmp_path: pathlib.Path) -> None:
    async with running_bus(tmp_path, max_subscribers=2) as bus:
        bus.subscribe(EventFilter())
        second = bus.subscribe(EventFilter())
        with pytest.raises(Unavailable, match="too many event streams"):
            bus.subscribe(EventFilter())
        bus.unsubscribe(second)
        bus.subscribe(EventFilter())


async def collect_replay(
    bus: EventBus, flt: EventFilter, subscriber: Subscriber, **plan: Any
) -> list[int]:
    replay = bus.plan_replay(subscriber, **plan)
    ids: list[int] = []
    async for page in bus.replay(flt, replay):
        ids += [item.event.id for item in page]
    return ids


@pytest.mark.parametrize("tail_size", [4096, 3])  # replay from the tail, and from the store
async def test_replay_then_live_has_no_gap_and_no_duplicate(
    tmp_path: pathlib.Path, tail_size: int
) -> None:
    async with running_bus(tmp_path, tail_size=tail_size) as bus:
        for _ in range(10):
            await bus.publish("log")
        seen: list[int] = []

        async def keep_publishing() -> None:
            for _ in range(20):
                await bus.publish("log")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(keep_publishing)
            await trio.lowlevel.checkpoint()  # publishing is under way when the client connects
            subscriber = bus.subscribe(EventFilter())
            seen += await collect_replay(
                bus, EventFilter(), subscriber, last_event_id=4, history=None
            )
        seen += await drain(subscriber, 30 - subscriber.live_from)
    assert seen == list(range(5, 31))


async def test_history_n_replays_the_last_n_matching(tmp_path: pathlib.Path) -> None:
    async with running_bus(tmp_path) as bus:
        for n in range(10):
            await bus.publish("task.started" if n % 2 else "log")
        flt = make_filter(types="task.started")
        subscriber = bus.subscribe(flt)
        ids = await collect_replay(bus, flt, subscriber, last_event_id=None, history=3)
    assert ids == [6, 8, 10]


async def test_stream_reset_when_the_id_is_past_retention(tmp_path: pathlib.Path) -> None:
    async with running_bus(tmp_path, retention_count=5) as bus:
        for _ in range(12):
            await bus.publish("log")
        assert await bus.prune() == 7
        subscriber = bus.subscribe(EventFilter())
        plan = bus.plan_replay(subscriber, last_event_id=3, history=None)
        assert plan.reset is not None
        assert plan.reset["reason"] == "expired"
        assert plan.reset["firstAvailableId"] == 8
        assert await collect_replay(
            bus, EventFilter(), subscriber, last_event_id=3, history=None
        ) == [
            8,
            9,
            10,
            11,
            12,
        ]
        # Up to date, or just before the oldest kept id: no reset.
        assert bus.plan_replay(subscriber, last_event_id=7, history=None).reset is None
        assert bus.plan_replay(subscriber, last_event_id=12, history=None).reset is None
        ahead = bus.plan_replay(subscriber, last_event_id=99, history=None)
        assert ahead.reset is not None and ahead.reset["reason"] == "unknown"


async def test_retention_by_age(tmp_path: pathlib.Path) -> None:
    async with running_bus(tmp_path) as bus:
        for _ in range(3):
            await bus.publish("log")
        await bus.store.write(
            lambda db: db.execute(
                "UPDATE events SET timestamp = '2000-01-01T00:00:00.000Z' WHERE id < 3"
            )
        )
        assert await bus.prune() == 2
        assert [e.id for e in await bus.history(EventFilter())] == [3]


async def delete_session_events(bus: EventBus, session_id: str) -> None:
    """What `DELETE /api/sessions/{id}` does to the events (`delete_session`, then the tail)."""
    await bus.store.write(
        lambda db: db.execute("DELETE FROM events WHERE session_id = ?", [session_id]),
        on_commit=lambda _: bus.forget_session(session_id),
    )


async def test_retention_keeps_the_newest_n_stored_events_after_a_session_was_deleted(
    tmp_path: pathlib.Path,
) -> None:
    """The ids of a deleted session's events do not count against `retention_count`:
    the other sessions keep their history (it was wiped: the bound was an id range)."""
    async with running_bus(tmp_path, retention_count=10) as bus:
        kept = [(await bus.publish("log", "C")).id for _ in range(6)]
        for _ in range(20):
            await bus.publish("log", "A")
        await delete_session_events(bus, "A")
        assert await bus.prune() == 0
        assert [e.id for e in await bus.history(EventFilter())] == kept
        newer = [(await bus.publish("log", "C")).id for _ in range(7)]
        assert await bus.prune() == 3  # 13 stored, the newest 10 are kept
        assert [e.id for e in await bus.history(EventFilter(), limit=50)] == [*kept, *newer][3:]
        counts = await bus.counts()
        assert (counts["total"], counts["firstId"], counts["latestId"]) == (10, kept[3], newer[-1])
        assert bus.statistics().retention_deleted == 3


async def test_stream_reset_names_only_what_retention_removed(tmp_path: pathlib.Path) -> None:
    """Events gone with their session are skipped silently, as documented; a reset is due
    only when retention removed an event after the client's id."""
    async with running_bus(tmp_path, retention_count=8) as bus:
        old = [(await bus.publish("log", "C")).id for _ in range(4)]  # 1-4
        deleted = [(await bus.publish("log", "A")).id for _ in range(6)]  # 5-10
        later = [(await bus.publish("log", "C")).id for _ in range(6)]  # 11-16
        await delete_session_events(bus, "A")
        assert await bus.prune() == 2  # 10 stored: 1 and 2 go
        subscriber = bus.subscribe(EventFilter())
        within_deleted = bus.plan_replay(subscriber, last_event_id=deleted[1], history=None)
        assert within_deleted.reset is None
        assert (
            await collect_replay(
                bus, EventFilter(), subscriber, last_event_id=deleted[1], history=None
            )
            == later
        )
        behind = bus.plan_replay(subscriber, last_event_id=0, history=None)
        assert behind.reset is not None
        assert (behind.reset["reason"], behind.reset["firstAvailableId"]) == ("expired", old[2])
        assert await collect_replay(
            bus, EventFilter(), subscriber, last_event_id=0, history=None
        ) == [*old[2:], *later]


async def test_retention_by_age_out_of_id_order_leaves_no_trace_in_the_tail(
    tmp_path: pathlib.Path,
) -> None:
    """An old timestamp above newer ones (the clock was set back) goes from the store and
    from the tail alike: a replay served from the tail must not resurrect it."""
    async with running_bus(tmp_path) as bus:
        for _ in range(5):
            await bus.publish("log")
        await bus.store.write(
            lambda db: db.execute(
                "UPDATE events SET timestamp = '2000-01-01T00:00:00.000Z' WHERE id = 3"
            )
        )
        assert await bus.prune() == 1
        subscriber = bus.subscribe(EventFilter())
        ids = await collect_replay(bus, EventFilter(), subscriber, last_event_id=1, history=None)
    assert ids == [2, 4, 5]


async def test_history_pages_forward_with_after_and_limit(tmp_path: pathlib.Path) -> None:
    async with running_bus(tmp_path) as bus:
        for _ in range(10):
            await bus.publish("log")
        latest = await bus.history(EventFilter(), limit=3)
        forward = await bus.history(EventFilter(), after=2, limit=3)
        window = await bus.history(EventFilter(), after=2, before=5)
    assert [e.id for e in latest] == [8, 9, 10]
    assert [e.id for e in forward] == [3, 4, 5]
    assert [e.id for e in window] == [3, 4]


async def test_a_burst_with_many_subscribers_loses_nothing(tmp_path: pathlib.Path) -> None:
    async with running_bus(tmp_path, subscriber_queue=5000) as bus:
        subscribers = [bus.subscribe(EventFilter()) for _ in range(200)]
        async with trio.open_nursery() as nursery:
            for _ in range(10):

                async def burst() -> None:
                    for _ in range(300):
                        await bus.publish("agent.output", "s", Level.DEBUG, {"line": "x"})

                nursery.start_soon(burst)
        assert bus.last_id == 3000
        for subscriber in subscribers[::50]:
            assert await drain(subscriber, 3000) == list(range(1, 3001))
        assert (await bus.counts())["total"] == 3000


async def test_counts_by_type_and_level(tmp_path: pathlib.Path) -> None:
    async with running_bus(tmp_path) as bus:
        await bus.publish("error", None, Level.ERROR, {})
        await bus.publish("log", None, Level.INFO, {})
        await bus.publish("log", None, Level.INFO, {})
        bus.subscribe(EventFilter())
        counts = await bus.counts()
    assert counts["total"] == 3
    assert counts["byType"] == {"error": 1, "log": 2}
    assert counts["byLevel"] == {"error": 1, "info": 2}
    assert (counts["firstId"], counts["latestId"], counts["subscribers"]) == (1, 3, 1)
    assert counts["eventsPerMinute"] == pytest.approx(0.6)


def test_encoded_frames_are_shared_between_subscribers() -> None:
    from lokid.events import Event

    encoded = EncodedEvent.of(Event(1, "log", "t", None, Level.INFO, {}))
    assert encoded.sse(False) is encoded.sse(False)


async def test_emit_is_stored_and_delivered_in_order_with_publishes(tmp_path: pathlib.Path) -> None:
    async with running_bus(tmp_path) as bus:
        subscriber = bus.subscribe(EventFilter())
        for n in range(50):
            await bus.emit("agent.output", "s", Level.DEBUG, {"n": n})
        last = await bus.publish("log")  # answered after everything emitted before it
        assert last.id == 51
        assert await drain(subscriber, 51) == list(range(1, 52))
        stored = await bus.history(make_filter(types="agent.output"), limit=1000)
    assert [e.data["n"] for e in stored] == list(range(50))


async def test_a_lone_surrogate_in_event_data_is_replaced_not_fatal(tmp_path: pathlib.Path) -> None:
    """Agent output may hold one (a stream-json "\\ud800"): SQLite and the UTF-8 frames
    cannot carry it, and it crashed the bus. It is published as U+FFFD."""
    async with running_bus(tmp_path) as bus:
        subscriber = bus.subscribe(EventFilter())
        published = await bus.publish("log", None, Level.INFO, {"message": "a\ud800b"})
        await bus.emit("agent.output", "s", Level.DEBUG, {"text": "x\udcffy", "\udc80": 1})
        await bus.emit_many([("agent.output", "s", Level.DEBUG, {"lines": ["\udfff"]})])
        assert published.data == {"message": "a\ufffdb"}
        frames: list[bytes] = []
        while len(frames) < 3:
            frames.extend(await subscriber.next_frames())
        assert "a\ufffdb" in frames[0].decode() and "x\ufffdy" in frames[1].decode()
        stored = await bus.history(EventFilter())
        assert [e.data for e in stored] == [
            {"message": "a\ufffdb"},
            {"text": "x\ufffdy", "\ufffd": 1},
            {"lines": ["\ufffd"]},
        ]
        assert (bus.running, bus.statistics().crashes) == (True, 0)


def mark_seven(db: Any) -> int:
    """A `publish_with` write that succeeds: a row 7 in `marks`."""
    db.execute("CREATE TABLE IF NOT EXISTS marks (n INTEGER)")
    db.execute("INSERT INTO marks (n) VALUES (7)")
    return 7


def refuse_eight(db: Any) -> int:
    """A `publish_with` write that raises after writing a row 8 (to be undone)."""
    db.execute("INSERT INTO marks (n) VALUES (8)")
    raise Unavailable("no, not this one")


async def test_publish_with_commits_the_change_and_the_event_together(
    tmp_path: pathlib.Path,
) -> None:
    async with running_bus(tmp_path) as bus:
        subscriber = bus.subscribe(EventFilter())

        async def refused() -> None:
            with pytest.raises(Unavailable, match="not this one"):
                await bus.publish_with(refuse_eight, "log", None, Level.INFO, {"which": "refused"})

        event, result = await bus.publish_with(mark_seven, "log", None, Level.INFO, {"which": "ok"})
        assert (event.id, result) == (1, 7)
        async with trio.open_nursery() as nursery:  # one batch: a refused write, an emit
            nursery.start_soon(refused)
            nursery.start_soon(bus.emit, "log", None, Level.INFO, {"which": "emitted"})
        await bus.publish("log", None, Level.INFO, {"which": "last"})
        stored = await bus.history(EventFilter())
        marks = await bus.store.read(lambda db: [r["n"] for r in db.query("SELECT n FROM marks")])
        assert [e.data["which"] for e in stored] == ["ok", "emitted", "last"]
        assert [e.id for e in stored] == [1, 2, 3]  # no id lost to the refused one
        assert marks == [7]
        assert await drain(subscriber, 3) == [1, 2, 3]


async def test_publish_with_before_stores_those_events_in_the_same_transaction(
    tmp_path: pathlib.Path,
) -> None:
    """A run's end: `agent.completed` and `task.completed` with the task's change, one
    ask and one store write; a write that raises undoes its own event only."""
    async with running_bus(tmp_path) as bus:
        subscriber = bus.subscribe(EventFilter())

        batches = bus.statistics().batches
        before = [
            ("log", "s", Level.INFO, {"which": "a"}),
            ("log", "s", Level.INFO, {"which": "b"}),
        ]
        event, result = await bus.publish_with(
            mark_seven, "log", "s", Level.INFO, {"which": "c"}, before=before
        )
        assert (event.id, event.data, result) == (3, {"which": "c"}, 7)
        assert bus.statistics().batches == batches + 1  # one transaction
        with pytest.raises(Unavailable, match="not this one"):
            await bus.publish_with(
                refuse_eight, "log", "s", Level.INFO, {"which": "e"}, before=[before[0]]
            )
        stored = await bus.history(EventFilter())
        marks = await bus.store.read(lambda db: [r["n"] for r in db.query("SELECT n FROM marks")])
        assert [(e.id, e.data["which"]) for e in stored] == [(1, "a"), (2, "b"), (3, "c"), (4, "a")]
        assert marks == [7]
        assert await drain(subscriber, 4) == [1, 2, 3, 4]


async def test_publish_with_along_stores_those_events_only_with_the_write(
    tmp_path: pathlib.Path,
) -> None:
    """Several events announcing one change (an `input.applied` per input of a started
    agent's prompt): a write that raises undoes them with its own event, and `before`
    events stay; the ids stay consecutive."""
    async with running_bus(tmp_path) as bus:
        subscriber = bus.subscribe(EventFilter())
        along = [("log", "s", Level.INFO, {"which": "x"}), ("log", "s", Level.INFO, {"which": "y"})]
        event, result = await bus.publish_with(
            mark_seven, "log", "s", Level.INFO, {"which": "z"}, along=along
        )
        assert (event.id, result) == (3, 7)
        with pytest.raises(Unavailable, match="not this one"):
            await bus.publish_with(
                refuse_eight,
                "log",
                "s",
                Level.INFO,
                {"which": "z"},
                before=[("log", "s", Level.INFO, {"which": "a"})],
                along=along,
            )
        stored = await bus.history(EventFilter())
        assert [(e.id, e.data["which"]) for e in stored] == [(1, "x"), (2, "y"), (3, "z"), (4, "a")]
        assert await drain(subscriber, 4) == [1, 2, 3, 4]


# -- back-pressure in events (a flood of agent output) --------------------------------------


def lines(count: int, start: int = 0) -> list[tuple[str, str | None, Level, dict[str, Any]]]:
    return [("agent.output", "s", Level.DEBUG, {"n": n}) for n in range(start, start + count)]


async def test_emitters_wait_while_max_backlog_events_are_unstored(
    tmp_path: pathlib.Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A bus that stores nothing (not started): emits fill its backlog up to the bound in
    events, then wait - bounded: `AskTimeout` after `backlog_wait` - and a cancelled wait
    leaves the backlog as it was."""
    bus = EventBus(StoreActor(tmp_path / "lokid.db"), max_backlog=1000, backlog_wait=5.0)
    await bus.emit_many(lines(600))  # two messages (512 + 88 events)
    await bus.emit_many(lines(400, 600))  # exactly at the bound
    stats = bus.statistics()
    assert (stats.backlog, stats.mailbox_used) == (1000, 3)
    with trio.move_on_after(1.0) as waited:
        await bus.emit("log")
    assert waited.cancelled_caught
    assert bus.statistics().backlog == 1000
    started = trio.current_time()
    with pytest.raises(AskTimeout, match="1000 emitted events still unstored"):
        await bus.emit_many(lines(1))
    assert trio.current_time() - started == pytest.approx(5.0)
    stats = bus.statistics()
    assert (stats.backlog, stats.mailbox_used, stats.backlog_waits) == (1000, 3, 2)


async def test_a_flood_of_emits_is_stored_within_the_bounds(tmp_path: pathlib.Path) -> None:
    """Emitters far faster than the store: every event is stored, in order, while the
    backlog never exceeds its bound and no batch holds more than `max_batch_events`."""
    async with running_bus(tmp_path, max_backlog=300, max_batch_events=100) as bus:
        subscriber = bus.subscribe(EventFilter())
        peak = 0

        async def watch() -> None:
            nonlocal peak
            while True:  # sampled, not busy-waited: a spinning task starves the store thread
                peak = max(peak, bus.statistics().backlog)
                await trio.sleep(0.0005)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            for start in range(0, 3000, 50):
                await bus.emit_many(lines(50, start))
            await bus.publish("log")  # answered after every emit before it
            nursery.cancel_scope.cancel()
        stats = bus.statistics()
        assert peak <= 300
        assert stats.backlog == 0 and stats.backlog_waits > 0
        assert stats.published == 3001
        assert stats.batches >= 3000 // 100  # messages of 50: a batch stops at 100 events
        stored = await bus.history(make_filter(types="agent.output"), after=0, limit=1000)
        assert [e.data["n"] for e in stored] == list(range(1000))
        assert await drain(subscriber, 3001) == list(range(1, 3002))


async def test_one_batch_stops_gathering_at_max_batch_events(tmp_path: pathlib.Path) -> None:
    store = StoreActor(tmp_path / "lokid.db")
    bus = EventBus(store, max_batch_events=300)
    for start in range(0, 2000, 100):  # queued before the bus runs: one backlog of 20 messages
        await bus.emit_many(lines(100, start))
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            await nursery.start(bus.run)
            last = await bus.publish("log")
            nursery.cancel_scope.cancel()
    assert last.id == 2001
    stats = bus.statistics()
    assert stats.batches == 2000 // 300 + 1  # 300 events a batch (and the publish)
    assert stats.backlog == 0


async def test_a_refused_batch_leaves_the_backlog_too(tmp_path: pathlib.Path) -> None:
    """Emitted events the store refuses are logged and dropped: they do not stay counted."""
    async with running_bus(tmp_path, max_backlog=10) as bus:

        def refuse(db: Any) -> None:
            raise StoreUnavailable("disk full (test)")

        real_write = bus.store.write

        async def refusing(fn: Any, **kwargs: Any) -> Any:
            return await real_write(refuse, **kwargs)

        bus.store.write = refusing  # type: ignore[method-assign]
        for start in range(0, 100, 10):
            await bus.emit_many(lines(10, start))
        with pytest.raises(StoreUnavailable):
            await bus.publish("log")
        assert bus.statistics().backlog == 0


async def test_emitted_events_are_paced_and_a_waiting_publish_ends_the_pacing(
    tmp_path: pathlib.Path,
) -> None:
    """A batch of emitted events only waits `emit_interval` after the previous batch began,
    gathering what arrives (one commit for many agent lines); a lone emit after a quiet
    spell is stored at once, and a publish someone waits for ends the wait at once (here
    the interval is a minute: waiting it out would hit `fail_after`)."""
    async with running_bus(tmp_path, emit_interval=60.0) as bus:
        subscriber = bus.subscribe(EventFilter())
        with trio.fail_after(10):
            await bus.emit("agent.output", "s", Level.DEBUG, {"n": 0})
            assert await drain(subscriber, 1) == [1]  # not held back: nothing came before
            for n in range(1, 30):
                await bus.emit("agent.output", "s", Level.DEBUG, {"n": n})
            last = await bus.publish("log")
        stats = bus.statistics()
        assert last.id == 31
        assert (stats.batches, stats.paced_batches) == (2, 1)  # the 29 and the publish: one
        assert await drain(subscriber, 30) == list(range(2, 32))
        stored = await bus.history(make_filter(types="agent.output"), limit=100)
    assert [e.data["n"] for e in stored] == list(range(30))


async def test_no_pacing_with_an_emit_interval_of_zero(tmp_path: pathlib.Path) -> None:
    async with running_bus(tmp_path, emit_interval=0.0) as bus:
        for n in range(5):
            await bus.emit("agent.output", "s", Level.DEBUG, {"n": n})
        await bus.publish("log")
        assert bus.statistics().paced_batches == 0


async def test_output_after_a_publish_is_not_held_back(tmp_path: pathlib.Path) -> None:
    """Pacing is for streams of output only: the first emitted batch after a batch with a
    publish in it is stored at once (a burst of session starts mixes both), the next
    one of a stream is held back."""
    async with running_bus(tmp_path, emit_interval=60.0) as bus:
        subscriber = bus.subscribe(EventFilter())
        with trio.fail_after(10):
            await bus.publish("log")
            await bus.emit("agent.output", "s", Level.DEBUG, {"n": 0})
            assert await drain(subscriber, 2) == [1, 2]  # not held back
            await bus.emit("agent.output", "s", Level.DEBUG, {"n": 1})
            await trio.testing.wait_all_tasks_blocked()  # the bus took it and waits
            assert bus.statistics().paced_batches == 1  # a stream of output: held back
            await bus.publish("log")  # ends the wait
            assert await drain(subscriber, 2) == [3, 4]


async def test_a_bus_cancelled_while_it_holds_output_back_leaves_no_backlog(
    tmp_path: pathlib.Path,
) -> None:
    """The events a held-back batch gathered leave the backlog when the bus's task ends
    (else emitters of a restarted bus would wait for room that never comes)."""
    async with running_bus(tmp_path, emit_interval=60.0) as bus:
        subscriber = bus.subscribe(EventFilter())
        with trio.fail_after(10):
            await bus.emit("agent.output", "s", Level.DEBUG, {"n": 0})
            assert await drain(subscriber, 1) == [1]
            await bus.emit("agent.output", "s", Level.DEBUG, {"n": 1})
            await trio.testing.wait_all_tasks_blocked()
            assert bus.statistics().paced_batches == 1
    assert bus.statistics().backlog == 0
