"""The actor building block: bounded mailbox, tell/ask, crash semantics, graceful drain."""

from __future__ import annotations

from typing import Any

import attrs
import pytest
import trio
import trio.testing

from lokid.actor import Actor, WhenFull
from lokid.errors import ActorUnavailable, AskTimeout, MailboxFull, NotFound, Unavailable

from .child_status import StubChildStatus


@attrs.frozen
class Add:
    amount: int


@attrs.frozen
class Get:
    pass


@attrs.frozen
class Missing:
    pass


@attrs.frozen
class Crash:
    pass


@attrs.frozen
class Slow:
    seconds: float


class Counter(Actor[Any]):
    """Test actor. Mailbox: 4 messages, BLOCK."""

    mailbox_size = 4

    def __init__(self) -> None:
        super().__init__("counter")
        self.total = 0
        self.setups = 0
        self.teardowns = 0

    async def setup(self) -> None:
        self.setups += 1

    async def teardown(self) -> None:
        self.teardowns += 1

    async def handle(self, message: Any) -> Any:
        match message:
            case Add(amount):
                self.total += amount
                return self.total
            case Get():
                return self.total
            case Missing():
                raise NotFound("no such thing")
            case Crash():
                raise RuntimeError("boom")
            case Slow(seconds):
                await trio.sleep(seconds)
                return "slow done"
        return await super().handle(message)


class Rejecting(Counter):
    """Mailbox: 2 messages, REJECT."""

    mailbox_size = 2
    when_full = WhenFull.REJECT


async def test_tell_and_ask() -> None:
    counter = Counter()
    async with trio.open_nursery() as nursery:
        await nursery.start(counter.run)
        await counter.tell(Add(2))
        assert await counter.ask(Add(3)) == 5
        assert await counter.ask(Get()) == 5
        nursery.cancel_scope.cancel()
    stats = counter.statistics()
    assert stats.handled == 3
    assert stats.running is False
    assert (counter.setups, counter.teardowns) == (1, 1)


async def test_loki_error_goes_back_to_the_caller_and_the_actor_survives() -> None:
    counter = Counter()
    async with trio.open_nursery() as nursery:
        await nursery.start(counter.run)
        with pytest.raises(NotFound, match="no such thing"):
            await counter.ask(Missing())
        assert await counter.ask(Add(1)) == 1
        nursery.cancel_scope.cancel()
    assert counter.statistics().failed == 1


async def test_crash_tells_the_caller_and_ends_the_task() -> None:
    counter = Counter()
    caught: list[BaseException] = []

    async def run_and_catch() -> None:
        try:
            await counter.run()
        except RuntimeError as exc:
            caught.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_and_catch)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(ActorUnavailable, match="counter stopped before it replied"):
            await counter.ask(Crash())
    assert [str(e) for e in caught] == ["boom"]
    stats = counter.statistics()
    assert stats.crashes == 1
    assert stats.last_error == "RuntimeError: boom"
    assert counter.teardowns == 1


async def test_mailbox_survives_a_restart() -> None:
    counter = Counter()
    counter.tell_nowait(Crash())
    with pytest.raises(RuntimeError, match="boom"):
        await counter.run()
    # Sent while no task runs: waits in the mailbox for the next incarnation.
    counter.tell_nowait(Add(7))
    async with trio.open_nursery() as nursery:
        await nursery.start(counter.run)
        assert await counter.ask(Get()) == 7
        nursery.cancel_scope.cancel()
    assert counter.setups == 2


async def test_ask_times_out_on_virtual_clock(autojump_clock: trio.testing.MockClock) -> None:
    counter = Counter()
    async with trio.open_nursery() as nursery:
        await nursery.start(counter.run)
        start = trio.current_time()
        with pytest.raises(AskTimeout, match="counter did not answer within 2 s"):
            await counter.ask(Slow(10), timeout=2)
        assert trio.current_time() - start == pytest.approx(2)
        nursery.cancel_scope.cancel()


async def test_full_mailbox_blocks_the_sender(autojump_clock: trio.testing.MockClock) -> None:
    counter = Counter()  # no task: nothing drains the mailbox
    for _ in range(4):
        counter.tell_nowait(Add(1))
    assert counter.statistics().mailbox_used == 4
    with trio.move_on_after(5) as scope:
        await counter.tell(Add(1))
    assert scope.cancelled_caught  # blocked until the deadline
    with pytest.raises(MailboxFull):
        counter.tell_nowait(Add(1))
    with pytest.raises(AskTimeout):
        await counter.ask(Get(), timeout=1)


async def test_full_mailbox_rejects_when_policy_says_so() -> None:
    actor = Rejecting()
    await actor.tell(Add(1))
    await actor.tell(Add(1))
    with pytest.raises(MailboxFull, match=r"counter mailbox is full \(2\)"):
        await actor.tell(Add(1))
    with pytest.raises(MailboxFull):
        await actor.ask(Get())


async def test_graceful_stop_drains_the_mailbox_then_returns() -> None:
    counter = Counter()
    status = StubChildStatus()
    for _ in range(4):
        counter.tell_nowait(Add(1))
    status.shutdown_requested.set()  # asked to stop before it even started
    with trio.fail_after(1):
        await counter.run(task_status=status)
    assert counter.total == 4
    assert counter.statistics().mailbox_used == 0
    assert status.value is counter


async def test_graceful_stop_while_idle_returns_promptly() -> None:
    counter = Counter()
    status = StubChildStatus()

    async def run() -> None:
        await counter.run(task_status=status)

    with trio.fail_after(1):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            await trio.testing.wait_all_tasks_blocked()
            assert counter.statistics().running
            status.shutdown_requested.set()
    assert not counter.statistics().running


async def test_unknown_message_crashes_with_type_error() -> None:
    counter = Counter()
    counter.tell_nowait("hello")
    with pytest.raises(TypeError, match="counter has no handler for str"):
        await counter.run()


async def test_reply_to_a_caller_that_gave_up_does_not_crash_the_actor(
    autojump_clock: trio.testing.MockClock,
) -> None:
    counter = Counter()
    async with trio.open_nursery() as nursery:
        await nursery.start(counter.run)
        with pytest.raises(AskTimeout):
            await counter.ask(Slow(5), timeout=1)
        await trio.sleep(10)  # the handler finishes and replies into a closed channel
        assert await counter.ask(Add(1)) == 1
        nursery.cancel_scope.cancel()
    assert counter.statistics().crashes == 0


async def test_a_scope_is_cancelled_when_the_actor_ends() -> None:
    counter = Counter()
    with trio.CancelScope() as early, counter.cancelled_when_ended(early):
        await trio.sleep_forever()  # not running yet: cancelled at once
    assert early.cancelled_caught
    async with trio.open_nursery() as nursery:
        actor_scope = trio.CancelScope()

        async def run_counter(*, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            with actor_scope:
                await counter.run(task_status=task_status)

        await nursery.start(run_counter)
        with trio.CancelScope() as waiting, counter.cancelled_when_ended(waiting):
            assert await counter.ask(Add(1)) == 1  # running: not cancelled
            actor_scope.cancel()
            await trio.sleep_forever()
        assert waiting.cancelled_caught
    assert not counter._end_scopes  # forgotten on the way out


async def test_a_refusing_actor_answers_queued_and_new_messages_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """What the supervisor's back-off relies on: nobody waits for an actor kept down."""
    counter = Counter()  # no task: an actor between incarnations
    refusals = 0

    def why() -> Unavailable:
        nonlocal refusals
        refusals += 1
        return Unavailable(f"counter is down (refusal {refusals})")

    answers: list[str] = []

    async def ask_get() -> None:
        try:
            await counter.ask(Get(), timeout=1000)
        except Unavailable as exc:
            answers.append(f"{trio.current_time():g}: {exc}")

    counter.tell_nowait(Add(1))
    async with trio.open_nursery() as nursery:
        for _ in range(5):  # 3 fill the mailbox (with the tell), 2 wait for room
            nursery.start_soon(ask_get)
        await trio.testing.wait_all_tasks_blocked()
        assert counter.statistics().senders_waiting == 2
        counter.refuse_messages(why)
    assert len(answers) == 5 and all(a.startswith("0: counter is down") for a in answers)
    stats = counter.statistics()
    assert (stats.mailbox_used, stats.senders_waiting, stats.refusing, stats.refused) == (
        0,
        0,
        True,
        6,  # 5 asks answered, 1 tell dropped
    )
    with pytest.raises(Unavailable, match=r"refusal 6\)"):
        await counter.ask(Get())
    with pytest.raises(Unavailable, match=r"refusal 7\)"):
        counter.tell_nowait(Add(1))
    assert counter.statistics().refused == 8

    counter.accept_messages()
    counter.tell_nowait(Add(2))  # waits for the next incarnation again
    async with trio.open_nursery() as nursery:
        await nursery.start(counter.run)
        assert await counter.ask(Get()) == 2  # the tell dropped while refusing never ran
        nursery.cancel_scope.cancel()
    assert counter.statistics().refusing is False


async def test_mailbox_empty_follows_the_mailbox() -> None:
    counter = Counter()
    fallback = Counter()
    fallback._mailbox_buffer = None  # trio's buffer not found: asks `statistics()`
    for actor in (counter, fallback):
        assert actor.mailbox_empty()
        await actor.tell(Add(1))
        assert not actor.mailbox_empty()
        assert actor.statistics().mailbox_used == 1
        assert actor.next_message_nowait() == Add(1)
        assert actor.mailbox_empty()
