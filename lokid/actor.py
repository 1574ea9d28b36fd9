"""The actor building block: a task that owns state and is reached only by messages.

Rules of operation:

* The mailbox is a bounded trio memory channel created with the actor object,
  not with its task. The object lives as long as the daemon, so callers hold
  one reference forever; when the supervisor restarts the task, messages sent
  in between wait in the mailbox instead of failing.
* `tell` is fire-and-forget; `ask` sends the message together with a one-slot
  reply channel and waits at most `timeout` seconds for enqueue *and* reply.
* A full mailbox is handled by the actor class's `when_full` policy:
  `WhenFull.BLOCK` makes the sender wait (back-pressure; `ask` still gives up
  at its timeout) and `WhenFull.REJECT` raises `MailboxFull` at once. Every
  actor states its `mailbox_size` and policy in its docstring.
* A handler that raises a `LokiError` while answering an `ask` sends it back
  to the caller and goes on. Any other exception crashes the actor ("let it
  crash"): the caller of the message in flight gets `ActorUnavailable` and
  the supervisor decides what happens next.
* On a graceful stop request the actor finishes the messages already in its
  mailbox (a bounded amount of work), then returns.
* `refuse_messages(why)` is for an actor its supervisor keeps down for a
  while (`lokid.supervisor`, "Back-off"): from then on `tell` and `ask` raise
  `why()` at once instead of waiting for a task that is not coming back
  soon, and every message already queued (those of senders waiting for room
  included) is taken out: a `Call` is answered with `why()`, a told message
  is dropped. `accept_messages()` takes messages again. Neither touches a
  running task: the supervisor's hooks call them between incarnations.
  Statistics: `refusing`, and `refused` counts every message refused so.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Callable, Iterator, Sized
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import attrs
import trio

from lokid.errors import ActorUnavailable, AskTimeout, LokiError, MailboxFull

M = TypeVar("M")

DEFAULT_ASK_TIMEOUT = 10.0


class WhenFull(enum.Enum):
    """What `tell`/`ask` do when the mailbox holds `mailbox_size` messages."""

    BLOCK = "block"
    REJECT = "reject"


class ShutdownAware(Protocol):
    """What an actor needs from a supervisor's task status (see `lokid.supervisor`)."""

    shutdown_requested: trio.Event

    def started(self, value: Any = None) -> None: ...


@attrs.frozen
class Call:
    """A message that expects an answer on `reply` (one slot, closed after use)."""

    message: Any
    reply: trio.MemorySendChannel[Reply]


@attrs.frozen
class Reply:
    value: Any = None
    error: BaseException | None = None


@attrs.frozen
class ActorStatistics:
    name: str
    running: bool
    mailbox_size: int
    mailbox_used: int
    senders_waiting: int
    handled: int
    failed: int
    crashes: int
    last_error: str | None
    refusing: bool
    refused: int


class Actor(Generic[M]):
    """Base class. Subclasses set `mailbox_size`/`when_full` and implement `handle`.

    `run` is the supervisor child entry point. Override `setup`/`teardown`
    for resources that live as long as one incarnation of the task, and
    `serve` when the actor wants to take messages in batches.
    """

    mailbox_size: ClassVar[int] = 256
    when_full: ClassVar[WhenFull] = WhenFull.BLOCK

    def __init__(self, name: str | None = None) -> None:
        self.name = name or type(self).__name__
        self._send, self._receive = trio.open_memory_channel[Any](self.mailbox_size)
        # The mailbox's buffer (trio's, private), for `mailbox_empty`; None if trio no
        # longer keeps it where this looks.
        buffer = getattr(getattr(self._send, "_state", None), "data", None)
        self._mailbox_buffer: Sized | None = buffer if isinstance(buffer, Sized) else None
        self._running = False
        self._end_scopes: set[trio.CancelScope] = set()  # cancelled when `run` ends
        self._stop_requested = False
        self._receive_scope: trio.CancelScope | None = None
        self._handled = 0
        self._failed = 0
        self._crashes = 0
        self._last_error: str | None = None
        self._why_refused: Callable[[], LokiError] | None = None  # see `refuse_messages`
        self._refused_messages = 0

    # -- callers --------------------------------------------------------------

    async def tell(self, message: M) -> None:
        await self._enqueue(message)

    def tell_nowait(self, message: M) -> None:
        self._enqueue_nowait(message)

    async def _enqueue(self, item: object) -> None:
        if self.when_full is WhenFull.REJECT:
            self._enqueue_nowait(item)
        else:
            self._check_refusal()
            await self._send.send(item)

    def _enqueue_nowait(self, item: object) -> None:
        self._check_refusal()
        try:
            self._send.send_nowait(item)
        except trio.WouldBlock:
            raise MailboxFull(f"{self.name} mailbox is full ({self.mailbox_size})") from None

    async def ask(self, message: M, *, timeout: float = DEFAULT_ASK_TIMEOUT) -> Any:
        reply_send, reply_receive = trio.open_memory_channel[Reply](1)
        call = Call(message, reply_send)
        with reply_receive, trio.move_on_after(timeout) as scope:
            await self._enqueue(call)
            try:
                reply = await reply_receive.receive()
            except trio.EndOfChannel:
                raise ActorUnavailable(f"{self.name} stopped before it replied") from None
        if scope.cancelled_caught:
            raise AskTimeout(f"{self.name} did not answer within {timeout:g} s")
        if reply.error is not None:
            raise reply.error
        return reply.value

    def _check_refusal(self) -> None:
        if self._why_refused is not None:
            self._refused_messages += 1
            raise self._why_refused()

    # -- down for a while -------------------------------------------------------

    def refuse_messages(self, why: Callable[[], LokiError]) -> None:
        """Answer `why()` to every message, queued or to come, until `accept_messages()`.

        `why` is called once per refused message, so its text can say how long
        the actor stays down.
        """
        self._why_refused = why
        while True:
            # Each receive also moves a sender waiting for room into the buffer.
            try:
                item = self._receive.receive_nowait()
            except trio.WouldBlock:
                return
            self._refused_messages += 1
            if not isinstance(item, Call):
                continue
            with (
                item.reply,
                contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
            ):
                item.reply.send_nowait(Reply(error=why()))

    def accept_messages(self) -> None:
        """Take messages again after `refuse_messages`."""
        self._why_refused = None

    # -- the task -------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        stop_event: trio.Event | None = getattr(task_status, "shutdown_requested", None)
        self._stop_requested = False
        await self.setup()
        self._running = True
        try:
            with collapse_single_exception():
                async with trio.open_nursery() as nursery:
                    if stop_event is not None:
                        nursery.start_soon(self._watch_stop, stop_event)
                    task_status.started(self)
                    try:
                        await self.serve()
                    except Exception as exc:
                        self._crashes += 1
                        self._last_error = f"{type(exc).__name__}: {exc}"
                        raise
                    nursery.cancel_scope.cancel()
        finally:
            self._running = False
            for scope in list(self._end_scopes):
                scope.cancel()
            with trio.CancelScope(shield=True):
                await self.teardown()

    @contextlib.contextmanager
    def cancelled_when_ended(self, scope: trio.CancelScope) -> Iterator[None]:
        """Inside, `scope` is cancelled once this actor's task ends (at once if it is not
        running): a caller waiting for its answer stops waiting, without a task polling
        `running`."""
        if not self._running:
            scope.cancel()
        self._end_scopes.add(scope)
        try:
            yield
        finally:
            self._end_scopes.discard(scope)

    async def _watch_stop(self, stop_event: trio.Event) -> None:
        await stop_event.wait()
        self._stop_requested = True
        if self._receive_scope is not None:
            self._receive_scope.cancel()
        self.on_stop_requested()

    async def next_message(self) -> Any | None:
        """The next message, or None once a stop was requested and the mailbox is empty."""
        if self._stop_requested:
            try:
                return self._receive.receive_nowait()
            except trio.WouldBlock:
                return None
        with trio.CancelScope() as self._receive_scope:
            return await self._receive.receive()
        self._receive_scope = None
        return await self.next_message()

    def next_message_nowait(self) -> Any | None:
        try:
            return self._receive.receive_nowait()
        except trio.WouldBlock:
            return None

    async def serve(self) -> None:
        """Default loop: one message at a time until a stop is requested."""
        while (message := await self.next_message()) is not None:
            await self.dispatch(message)

    async def dispatch(self, message: Any) -> None:
        """Handle one mailbox item, answering it if it is a `Call`."""
        if not isinstance(message, Call):
            await self._handle_counted(message)
            return
        with message.reply:
            try:
                value = await self._handle_counted(message.message)
            except LokiError as exc:
                answer = Reply(error=exc)
            else:
                answer = Reply(value=value)
            # The caller may have given up (ask timeout) and closed its end: not our failure.
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                message.reply.send_nowait(answer)

    async def _handle_counted(self, message: Any) -> Any:
        try:
            value = await self.handle(message)
        except LokiError as exc:
            self._failed += 1
            self._last_error = f"{type(exc).__name__}: {exc}"
            raise
        self._handled += 1
        return value

    # -- subclass hooks -------------------------------------------------------

    async def setup(self) -> None:
        """Acquire what one incarnation needs; raising here fails the start."""

    async def teardown(self) -> None:
        """Release what `setup` acquired (runs shielded, also after a crash)."""

    def on_stop_requested(self) -> None:
        """The supervisor asked for a graceful stop (for actors whose `serve` does more
        than take messages: start winding that work down here)."""

    async def handle(self, message: Any) -> Any:
        raise TypeError(f"{self.name} has no handler for {type(message).__name__}")

    # -- introspection --------------------------------------------------------

    def mailbox_empty(self) -> bool:
        """No message waits in the mailbox. (`statistics()` tells it too, but trio builds
        a record of seven fields for it: ~1.9 us here, on the path of every lone store
        write and audit append; docs/performance.md, "Audit appends".)"""
        buffer = self._mailbox_buffer
        if buffer is None:
            return self._send.statistics().current_buffer_used == 0
        return not buffer

    @property
    def running(self) -> bool:
        """An incarnation of the task is serving (cheap; for health probes)."""
        return self._running

    def statistics(self) -> ActorStatistics:
        channel = self._send.statistics()
        return ActorStatistics(
            name=self.name,
            running=self._running,
            mailbox_size=self.mailbox_size,
            mailbox_used=channel.current_buffer_used,
            senders_waiting=channel.tasks_waiting_send,
            handled=self._handled,
            failed=self._failed,
            crashes=self._crashes,
            last_error=self._last_error,
            refusing=self._why_refused is not None,
            refused=self._refused_messages,
        )


@contextlib.contextmanager
def collapse_single_exception() -> Iterator[None]:
    """Re-raise a lone exception out of trio's ExceptionGroup wrapper.

    An actor's own nursery only holds helper tasks that never fail, so a
    group from it carries exactly the actor's crash; callers and supervisors
    should see `RuntimeError: boom`, not `ExceptionGroup (1 sub-exception)`.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        leaves = list(exception_leaves(group))
        if len(leaves) == 1:
            raise leaves[0] from None
        raise


def exception_leaves(group: BaseExceptionGroup[BaseException]) -> Iterator[BaseException]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from exception_leaves(exc)
        else:
            yield exc
