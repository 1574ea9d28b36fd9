"""Supervisors: Erlang/OTP's restart semantics on trio.

Rules of operation (everything that decides when a child runs lives here):

* Children start one at a time, in order, each with `nursery.start`: a child
  counts as started only when it calls `task_status.started()`. If one raises
  or returns before that, the children already started are stopped in reverse
  order and `Supervisor.run` raises `SupervisorStartError`.
* Every exit has a reason: ``"normal"`` (the child returned by itself),
  ``"shutdown"`` (the supervisor stopped it and it went in time), ``"killed"``
  (the supervisor cancelled it: brutal kill, or its shutdown time ran out) or
  ``"<ExcType>: <message>"`` (it raised; only the type name when the message is
  empty). An `Exception` (groups included) raised after `started()` is turned
  into a reason and never reaches the supervisor's nursery, so it cannot
  cancel siblings. `BaseException`s that are not `Exception`s
  (`KeyboardInterrupt`, foreign `Cancelled`) propagate as trio wants.
  Such a crash, and a restart whose start fails, is logged at ERROR on
  ``lokid.supervisor`` with its traceback (OTP's crash report): the reason
  alone does not say where the bug is.
* Restart types: PERMANENT children are always restarted, TRANSIENT ones only
  after an abnormal exit (anything but ``"normal"``), TEMPORARY ones never, and
  a temporary child's spec is removed when it exits for any reason. A child
  the supervisor stopped itself is never restarted by the exit logic.
* Strategies: ONE_FOR_ONE restarts the child alone. ONE_FOR_ALL stops every
  other child in reverse start order, then starts every child whose spec is
  kept, in order (as in OTP this includes children that were terminated with
  `terminate_child` or that exited normally as TRANSIENT). REST_FOR_ONE does
  the same for the child and the ones started after it. Temporary children
  stopped by such a restart are removed, not restarted. An exit that is not
  restarted (transient normal, any temporary) touches no sibling.
* Restart intensity: every restart attempt is stamped with
  `trio.current_time()`. More than `max_restarts` stamps within `period`
  seconds (inclusive, like OTP) and the supervisor stops all children in
  reverse order and `run` raises `RestartIntensityExceeded`: the failure
  escalates to the parent. A restart whose start fails is retried later as a
  fresh attempt, so a child that can never start escalates instead of looping.
* Back-off (a supervisor built with ``backoff=Backoff(...)``, for children the
  daemon can do without): it never escalates. When its restart intensity is
  exceeded, or its children fail to start (its own first start included), it
  stops every child in reverse order as an escalation would, calls
  `on_down()` and stays *down* for a delay; then it calls `on_up()` and starts
  every child from its spec again, in order, with an empty intensity window:
  a fresh incarnation, as if its parent had restarted it. The n-th time down
  in a row waits ``min(first * factor ** (n - 1), max)`` seconds; the count
  starts again from 1 when the children had been up `reset_after` seconds
  (since their last start) when they went down. Its `run` calls `started()`
  even when its children could not start (it is up, they are down), so its
  parent never sees it fail: it returns only when asked to stop (a stop
  request while down ends the wait at once). While down, `start_child` and
  `restart_child` raise `SupervisorNotRunning`. `on_down` and `on_up` must
  not block; an exception from either is logged and ignored. `on_up` is
  also called when the supervisor stops while down, so each `on_down` has
  its `on_up`.
* Structural changes (restarts, `start_child`, `terminate_child`,
  `restart_child`, start-up, shutdown) hold one `trio.Lock` and so never
  interleave. `delete_child` is synchronous and only touches children that are
  not running.
* Stopping a child: with `shutdown == BRUTAL_KILL`, or when the child does not
  trap shutdown, its cancel scope is cancelled at once. Otherwise its
  `shutdown_requested` event is set and the supervisor waits up to `shutdown`
  seconds (forever for INFINITY) for it to return, then cancels it.
* The supervisor stops all children, in reverse start order, on
  `request_stop()` or on its own `task_status.shutdown_requested` (when it is
  itself the child of a supervisor) and then returns. When `run` is cancelled
  from outside, trio cancels the children with it.
* `hurry()` (a second stop request: stop waiting for children to finish
  gracefully) stops all children as `request_stop` does, but the child being
  waited for and every later one are killed at once instead of getting their
  `shutdown` time. The kills still go one by one in reverse start order, each
  waited for, so a child's shielded clean-up still finds the children
  started before it (the store) running.
* Each `run` is a fresh incarnation, like an OTP supervisor restarted by its
  parent: it starts from the specs given to the constructor, so dynamic
  children of a previous incarnation are gone.

Theory of operation (how OTP maps onto trio):

=======================================  =====================================
OTP                                      here
=======================================  =====================================
process linked to the supervisor         task in the supervisor's nursery
``proc_lib:start_link`` / ``init_ack``   ``nursery.start`` / ``status.started``
``exit(Pid, kill)``                      cancel the child's own cancel scope
``exit(Pid, shutdown)`` to a process     set ``status.shutdown_requested``
that traps exits                         (``traps_shutdown=True``)
``exit(Pid, shutdown)`` to a process     cancel the scope; the reason is
that does not trap exits                 ``"shutdown"``
``'EXIT'`` message                       an exit notice on a bounded channel
supervisor mailbox order                 notices first, then start retries
=======================================  =====================================

Trio has no untrappable kill: a child that shields itself from cancellation
cannot be killed and stalls whoever stops it. A child's start is not bounded
by the supervisor either (OTP's supervisor also blocks in a child's init);
children that may hang while starting bound themselves with `trio.fail_after`.
The lock is held while a child starts, so a child must not call
`start_child`, `terminate_child` or `restart_child` of its own supervisor
before it has called `started()`: that would wait for itself.

A child that has exited but whose exit the monitor has not handled yet still
counts as running (OTP shows its pid until the ``'EXIT'`` is processed). When a
stop or a sibling's restart collects such an exit first, the child's own
notice becomes stale and is ignored (OTP's ``unlink_flush``); a child stopped
by a caller that was cancelled while waiting is killed and its exit is
recorded by the monitor, without a restart.

Bounds ("bounded everything"):

* at most `max_children` child specs; `start_child` raises `TooManyChildren`;
* the exit-notice channel holds at most `max_children` notices: a child record
  is queued at most once (a flag on the record), and a record removed while
  still queued keeps counting against `max_children` until the monitor has
  drained it, so `send_nowait` can never find the channel full;
* the restart-intensity window keeps at most `max_restarts + 1` time stamps;
* with a back-off policy, one time down lasts at most `Backoff.max` seconds;
* start retries are at most one per child;
* `statistics()` and `which_children()` are O(number of children).
"""

from __future__ import annotations

import collections
import enum
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import attrs
import trio

from lokid.errors import LokiError

__all__ = [
    "BRUTAL_KILL",
    "INFINITY",
    "Backoff",
    "BackoffStatistics",
    "ChildAlreadyExists",
    "ChildCounts",
    "ChildInfo",
    "ChildNotFound",
    "ChildRunning",
    "ChildSpec",
    "ChildStartError",
    "ChildStatistics",
    "ChildStatus",
    "Restart",
    "RestartIntensityExceeded",
    "Strategy",
    "Supervisor",
    "SupervisorError",
    "SupervisorNotRunning",
    "SupervisorStartError",
    "SupervisorStatistics",
    "TooManyChildren",
]

log = logging.getLogger("lokid.supervisor")

BRUTAL_KILL: float = 0.0
"""`ChildSpec.shutdown` value: cancel the child at once, never ask it to stop."""

INFINITY: float = math.inf
"""`ChildSpec.shutdown` value: wait as long as the child needs (use for supervisors)."""

NORMAL = "normal"
SHUTDOWN = "shutdown"
KILLED = "killed"


class Restart(enum.Enum):
    """When a child that exited by itself is started again."""

    PERMANENT = "permanent"
    TRANSIENT = "transient"
    TEMPORARY = "temporary"


class Strategy(enum.Enum):
    """Which children a restart takes along."""

    ONE_FOR_ONE = "one_for_one"
    ONE_FOR_ALL = "one_for_all"
    REST_FOR_ONE = "rest_for_one"


# -- errors ----------------------------------------------------------------


class SupervisorError(LokiError):
    """Base of the supervisor's failures."""


class _StartFailure(SupervisorError):
    """Shared shape of the two start failures (not raised itself)."""

    def __init__(
        self, message: str, *, child_id: str, reason: str, cause: Exception | None
    ) -> None:
        super().__init__(message, details={"child_id": child_id, "reason": reason})
        self.child_id = child_id
        self.reason = reason
        self.cause = cause
        self.__cause__ = cause


class SupervisorStartError(_StartFailure):
    """`Supervisor.run` could not start: child `child_id` failed to start.

    The children started before it have been stopped again. `cause` is what
    the child raised, or None when it returned without calling `started()`
    (then `reason` is ``"normal"``).
    """

    def __init__(
        self, supervisor: str, child_id: str, reason: str, cause: Exception | None
    ) -> None:
        super().__init__(
            f"supervisor {supervisor!r} failed to start: child {child_id!r} "
            f"failed to start ({_start_failure(reason, cause)})",
            child_id=child_id,
            reason=reason,
            cause=cause,
        )
        self.supervisor = supervisor


class ChildStartError(_StartFailure):
    """`start_child` or `restart_child` could not start the child; the supervisor runs on."""

    def __init__(self, child_id: str, reason: str, cause: Exception | None) -> None:
        super().__init__(
            f"child {child_id!r} failed to start ({_start_failure(reason, cause)})",
            child_id=child_id,
            reason=reason,
            cause=cause,
        )


class RestartIntensityExceeded(SupervisorError):
    """More than `max_restarts` restarts within `period` seconds.

    Raised by `Supervisor.run` after all children were stopped, so that a
    parent supervisor sees an abnormal exit of this one and applies its own
    restart policy (OTP's escalation). `child_id` and `reason` name the exit
    that was one too many.
    """

    def __init__(
        self, supervisor: str, max_restarts: int, period: float, child_id: str, reason: str
    ) -> None:
        super().__init__(
            f"supervisor {supervisor!r}: more than {max_restarts} restarts in {period:g} s "
            f"(last: child {child_id!r} exited with {reason})",
            details={"child_id": child_id, "reason": reason},
        )
        self.supervisor = supervisor
        self.max_restarts = max_restarts
        self.period = period
        self.child_id = child_id
        self.reason = reason


class ChildNotFound(SupervisorError):
    """No child with this id (a temporary child's id is gone once it exited)."""

    code = "NOT_FOUND"


class ChildAlreadyExists(SupervisorError):
    """A child with this id exists already, running or not."""

    code = "CONFLICT"


class ChildRunning(SupervisorError):
    """The operation needs a stopped child, and this one runs or is being restarted."""

    code = "CONFLICT"


class TooManyChildren(SupervisorError):
    """The supervisor holds `max_children` child specs already."""

    code = "UNAVAILABLE"


class SupervisorNotRunning(SupervisorError):
    """The supervisor is not running (not started yet, stopping or stopped)."""

    code = "UNAVAILABLE"


def _start_failure(reason: str, cause: Exception | None) -> str:
    return reason if cause is not None else "returned before calling started()"


def _describe(exc: BaseException) -> str:
    message = str(exc)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


# -- records ---------------------------------------------------------------


def _check_id(_instance: object, _attribute: object, value: str) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"a child id must be a non-empty string, not {value!r}")


def _check_shutdown(_instance: object, _attribute: object, value: float) -> None:
    if math.isnan(value) or value < 0:
        raise ValueError(f"shutdown must be >= 0 seconds, BRUTAL_KILL or INFINITY, not {value!r}")


@attrs.frozen
class ChildSpec:
    """How to run one child.

    `start` is called as ``await start(task_status=status)`` with a
    `ChildStatus`; it must call ``status.started(value)`` once it is ready to
    serve and may watch ``status.shutdown_requested`` when `traps_shutdown`
    is set. `shutdown` only matters for trapping children: the grace time
    between the request and the kill.
    """

    id: str = attrs.field(validator=_check_id)
    start: Callable[..., Awaitable[object]]
    restart: Restart = Restart.PERMANENT
    shutdown: float = attrs.field(default=5.0, validator=_check_shutdown)
    traps_shutdown: bool = False
    statistics: Callable[[], object] | None = None


def _check_seconds(_instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{attribute.name} must be a finite number of seconds > 0, not {value!r}")


@attrs.frozen
class Backoff:
    """How long a supervisor's children stay down instead of an escalation (module doc,
    "Back-off"): `first` seconds, times `factor` for each further time down in a row, at
    most `max`; counted from 1 again after `reset_after` seconds up."""

    first: float = attrs.field(default=30.0, validator=_check_seconds)
    max: float = attrs.field(default=600.0, validator=_check_seconds)
    factor: float = 2.0
    reset_after: float = attrs.field(default=600.0, validator=_check_seconds)

    def __attrs_post_init__(self) -> None:
        if self.max < self.first:
            raise ValueError(f"max ({self.max!r}) must be >= first ({self.first!r})")
        if not (math.isfinite(self.factor) and self.factor >= 1):
            raise ValueError(f"factor must be a finite number >= 1, not {self.factor!r}")

    def delay(self, times: int) -> float:
        """Seconds down for the `times`-th time down in a row (1: the first)."""
        delay = self.first
        for _ in range(times - 1):  # a loop, not a power: no overflow however long it runs
            if delay >= self.max or self.factor == 1:
                break
            delay *= self.factor
        return min(delay, self.max)


@attrs.frozen
class ChildInfo:
    """One row of `which_children`.

    `running` is the supervisor's view: True from the start until the child's
    exit has been handled. `restarts` counts the successful restarts made by
    the restart strategy in this `run` (not `restart_child`).
    """

    id: str
    running: bool
    restart: Restart
    restarts: int
    last_exit: str | None


@attrs.frozen
class ChildCounts:
    """`specs`: child specs held; `active`: children running."""

    specs: int
    active: int


@attrs.frozen
class ChildStatistics:
    id: str
    running: bool
    restart: str
    restarts: int
    last_exit: str | None
    running_seconds: float | None
    """Seconds since the current incarnation called `started()` (None: not running).
    Not a time stamp: the supervisor keeps trio's clock, which is not wall time."""
    detail: object | None
    """The result of `ChildSpec.statistics()`, if the spec has one."""


@attrs.frozen
class BackoffStatistics:
    """A back-off supervisor's downs (module doc, "Back-off"); times on trio's clock."""

    down: bool
    times_down: int
    """Over the object's lifetime."""
    times_in_a_row: int
    """The count the delay grows with; 0 once the children have been up `reset_after` s."""
    last_failure: str | None
    """Why it went down last: the escalation or start failure it did not raise."""
    delay_seconds: float | None
    """How long the current (else the last) time down lasts."""
    down_seconds: float | None
    """Seconds since it went down (None: up)."""
    retry_in_seconds: float | None
    """Seconds until it starts its children again (None: up)."""


@attrs.frozen
class SupervisorStatistics:
    """`restarts_total` counts restart attempts over the object's lifetime;
    `restarts_in_window` those within the last `period` seconds (what the
    intensity check sees); `last_exit` is the last child exit the supervisor
    handled, as ``"<child id>: <reason>"``; `backoff` is None for a supervisor
    that escalates."""

    name: str
    strategy: str
    running: bool
    children: tuple[ChildStatistics, ...]
    restarts_total: int
    restarts_in_window: int
    last_exit: str | None
    backoff: BackoffStatistics | None = None


class ChildStatus:
    """What a child receives as `task_status`: trio's task status plus a stop request.

    `shutdown_requested` is the trio spelling of the ``shutdown`` exit signal
    sent to a process that traps exits: the child should finish its work and
    return. Children that never look at it are cancelled instead. A
    `ChildStatus` built without arguments lets a child run outside any
    supervisor (tests, one-off tools).
    """

    def __init__(
        self,
        task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
        *,
        shutdown_requested: trio.Event | None = None,
    ) -> None:
        self.shutdown_requested = trio.Event() if shutdown_requested is None else shutdown_requested
        self._task_status = task_status
        self._started = False
        self._started_at: float | None = None

    def started(self, value: object = None) -> None:
        """Mark the child started; `nursery.start` (and `start_child`) return `value`."""
        if self._started:
            raise RuntimeError("called 'started' twice on the same child status")
        self._started = True
        self._started_at = trio.current_time()
        self._task_status.started(value)


# -- internal state --------------------------------------------------------


class _ReturnedBeforeStarted(Exception):
    """Raised by the child wrapper so `_start` can tell this apart from a child's own error."""


def _drain_stale_notices(receive: trio.MemoryReceiveChannel[_Child]) -> None:
    """Take the exit notices of an incarnation whose children are all stopped (each was
    handled by the stop already), so a fresh one starts with an empty channel."""
    while True:
        try:
            receive.receive_nowait().queued = False
        except trio.WouldBlock:
            return


def _running_seconds(incarnation: _Incarnation | None) -> float | None:
    """How long `incarnation` has been started (trio clock), None if not (yet) started."""
    if incarnation is None or incarnation.status is None:
        return None
    started = incarnation.status._started_at
    return None if started is None else trio.current_time() - started


@attrs.define(eq=False)
class _Incarnation:
    """One run of a child's `start` function."""

    shutdown_requested: trio.Event = attrs.Factory(trio.Event)
    scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    done: trio.Event = attrs.Factory(trio.Event)
    status: ChildStatus | None = None
    signal: str | None = None  # what the supervisor sent: SHUTDOWN or "kill"
    reason: str | None = None

    def kill(self) -> None:
        self.signal = "kill"
        self.scope.cancel()


@attrs.define(eq=False)
class _Child:
    spec: ChildSpec
    current: _Incarnation | None = None
    restarts: int = 0
    last_exit: str | None = None
    restarting: bool = False  # a restart failed to start it; a retry is pending
    queued: bool = False  # the record sits in the exit-notice channel
    removed: bool = False


# -- the supervisor --------------------------------------------------------


class Supervisor:
    """Starts children, restarts them by policy, stops them in order.

    One `Supervisor` object may `run` several times in a row (a parent
    supervisor restarts it by calling `run` again) but not twice at once.
    See the module docstring for the rules.
    """

    def __init__(
        self,
        name: str,
        children: Sequence[ChildSpec] = (),
        *,
        strategy: Strategy = Strategy.ONE_FOR_ONE,
        max_restarts: int = 3,
        period: float = 5.0,
        max_children: int = 10_000,
        forget_finished: bool = False,
        backoff: Backoff | None = None,
        on_down: Callable[[], None] | None = None,
        on_up: Callable[[], None] | None = None,
    ) -> None:
        """`forget_finished`: remove the spec of a child that exited and will not be
        restarted (a transient child's normal exit), as OTP's `simple_one_for_one`
        does, so that a supervisor of many short-lived dynamic children (one per
        session) does not keep a spec per finished child.

        `backoff`: never escalate, take the children down for a while instead;
        `on_down` and `on_up` are called when such a time down begins and ends
        (module doc, "Back-off")."""
        if not isinstance(strategy, Strategy):
            raise TypeError(f"strategy must be a Strategy, not {strategy!r}")
        if max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, not {max_restarts!r}")
        if not period > 0:
            raise ValueError(f"period must be > 0 seconds, not {period!r}")
        if max_children < 1:
            raise ValueError(f"max_children must be >= 1, not {max_children!r}")
        if backoff is None and (on_down is not None or on_up is not None):
            raise ValueError("on_down and on_up need a backoff policy")
        self.name = name
        self.strategy = strategy
        self.max_restarts = max_restarts
        self.period = period
        self.max_children = max_children
        self.forget_finished = forget_finished
        self.backoff = backoff
        self.on_down = on_down
        self.on_up = on_up
        if len(children) > max_children:
            raise TooManyChildren(
                f"supervisor {name!r}: {len(children)} child specs, max_children={max_children}"
            )
        ids = set()
        for spec in children:
            if spec.id in ids:
                raise ChildAlreadyExists(f"supervisor {name!r}: duplicate child id {spec.id!r}")
            ids.add(spec.id)
        self._specs = tuple(children)
        self._children: dict[str, _Child] = {spec.id: _Child(spec) for spec in self._specs}
        self._lock = trio.Lock()
        self._running = False
        self._accepting = False
        self._stop_requested = False
        self._hurried = False
        self._wait_scope: trio.CancelScope | None = None
        self._grace_scope: trio.CancelScope | None = None  # a trapping child's shutdown time
        self._nursery: trio.Nursery | None = None
        self._send: trio.MemorySendChannel[_Child] | None = None
        self._orphans = 0
        self._retries: dict[_Child, None] = {}
        self._window: collections.deque[float] = collections.deque(maxlen=max_restarts + 1)
        self._restarts_total = 0
        self._last_exit: str | None = None
        self._escalation: RestartIntensityExceeded | None = None
        # Back-off (module doc): trio-clock times of the children's last start and of
        # the current time down; counts over the object's lifetime.
        self._up_since: float | None = None
        self._down_since: float | None = None
        self._down_until: float | None = None
        self._times_down = 0
        self._in_a_row = 0
        self._last_failure: str | None = None
        self._last_delay: float | None = None

    def __repr__(self) -> str:
        return f"<Supervisor {self.name!r} {self.strategy.value} children={len(self._children)}>"

    # -- running -------------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[Supervisor] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Start the children, supervise them until asked to stop, stop them.

        Passes the supervisor itself to `task_status.started()` once every
        child has started. Returns normally after a requested stop; raises
        `SupervisorStartError` or `RestartIntensityExceeded` after having
        stopped every child (never with a back-off policy: then it is started
        even if its children are not, and goes down and up instead).
        """
        if self._running:
            raise RuntimeError(f"supervisor {self.name!r} is already running")
        self._reset()
        parent_stop: trio.Event | None = getattr(task_status, "shutdown_requested", None)
        send, receive = trio.open_memory_channel[_Child](self.max_children)
        self._send = send
        self._running = True
        failure: SupervisorError | None = None
        try:
            with send, receive:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    if parent_stop is not None:
                        nursery.start_soon(self._relay_stop, parent_stop)
                    failure = await self._run_children(receive, task_status)
                    # Every child is stopped; what is left is the stop relay.
                    nursery.cancel_scope.cancel()
        finally:
            self._running = False
            self._accepting = False
            self._nursery = None
            self._send = None
            self._wait_scope = None
            # After an outside cancellation the children died with the nursery.
            for child in self._children.values():
                if child.current is not None and child.current.done.is_set():
                    self._finalize(child, child.current)
        if failure is not None:
            raise failure

    def request_stop(self) -> None:
        """Ask `run` to stop all children (reverse start order) and return.

        Idempotent; does nothing when the supervisor is not running. A restart
        in progress finishes first.
        """
        if not self._running:
            return
        self._stop_requested = True
        self._accepting = False
        if self._wait_scope is not None:
            self._wait_scope.cancel()

    def hurry(self) -> None:
        """Stop like `request_stop`, but kill each child still running at once, in order.

        The child whose shutdown time is running is killed now; the children
        started before it are killed without being asked first, one by one in
        reverse start order. Idempotent; does nothing when not running.
        """
        if not self._running:
            return
        self._hurried = True
        if self._grace_scope is not None:
            self._grace_scope.cancel()
        self.request_stop()

    def as_child(self, id: str | None = None, *, restart: Restart = Restart.PERMANENT) -> ChildSpec:
        """A spec that runs this supervisor as the child of another one.

        It traps shutdown with an INFINITY grace time, so a parent's stop
        lets this supervisor stop its own children in order, however long
        that takes (OTP's advice for supervisor children).
        """
        return ChildSpec(
            id=self.name if id is None else id,
            start=self.run,
            restart=restart,
            shutdown=INFINITY,
            traps_shutdown=True,
            statistics=self.statistics,
        )

    def _reset(self) -> None:
        self._children = {spec.id: _Child(spec) for spec in self._specs}
        self._stop_requested = False
        self._hurried = False
        self._accepting = False
        self._orphans = 0
        self._retries.clear()
        self._window.clear()
        self._escalation = None

    def _stopping(self) -> bool:
        # A method, so that type checkers do not assume the flag cannot change
        # across an await.
        return self._stop_requested

    async def _relay_stop(self, event: trio.Event) -> None:
        await event.wait()
        self.request_stop()

    async def _run_children(
        self, receive: trio.MemoryReceiveChannel[_Child], task_status: trio.TaskStatus[Supervisor]
    ) -> SupervisorError | None:
        """Start the children and supervise them; with a back-off policy, again after
        each time down instead of returning the failure."""
        announced = False
        while True:
            failure: SupervisorError | None = await self._start_all()
            if failure is None:
                self._up_since = trio.current_time()
                self._accepting = not self._stop_requested
                if not announced:
                    task_status.started(self)
                    announced = True
                failure = await self._supervise(receive)
            if failure is None or self.backoff is None:
                return failure
            if not announced:  # the supervisor is up; its children are down
                task_status.started(self)
                announced = True
            await self._stay_down(self.backoff, failure, receive)
            if self._stopping():
                return None

    async def _stay_down(
        self, backoff: Backoff, failure: SupervisorError, receive: trio.MemoryReceiveChannel[_Child]
    ) -> None:
        """Keep the (stopped) children down for the back-off delay, then reset for a fresh
        start, unless a stop was requested meanwhile."""
        now = trio.current_time()
        self._in_a_row = self._times_in_a_row(now) + 1
        self._up_since = None
        self._times_down += 1
        self._last_failure = str(failure)
        self._last_delay = delay = backoff.delay(self._in_a_row)
        self._down_since, self._down_until = now, now + delay
        log.error(  # the failure names this supervisor
            "%s; its children stay down for %g s (down %d time(s) in a row)",
            failure,
            delay,
            self._in_a_row,
            exc_info=failure.cause if isinstance(failure, SupervisorStartError) else None,
        )
        self._call_hook("on_down", self.on_down)
        try:
            if not self._stopping():
                # request_stop() cancels this scope, as it does the monitor's wait.
                with trio.CancelScope(deadline=self._down_until) as self._wait_scope:
                    await trio.sleep_forever()
                self._wait_scope = None
        finally:
            self._down_since = self._down_until = None
            self._call_hook("on_up", self.on_up)
        if not self._stopping():
            _drain_stale_notices(receive)
            self._reset()  # a fresh incarnation: the specs, an empty intensity window

    def _times_in_a_row(self, now: float) -> int:
        """Times down in a row so far: 0 once the children have been up `reset_after` s."""
        up = self._up_since
        if self.backoff is not None and up is not None and now - up >= self.backoff.reset_after:
            return 0
        return self._in_a_row

    def _call_hook(self, name: str, hook: Callable[[], None] | None) -> None:
        if hook is None:
            return
        try:
            hook()
        except Exception:
            log.exception("supervisor %r: %s hook failed", self.name, name)

    async def _start_all(self) -> SupervisorStartError | None:
        async with self._lock:
            for child in list(self._children.values()):
                if child.removed:
                    continue
                try:
                    await self._start(child)
                except ChildStartError as exc:
                    await self._stop_all()
                    return SupervisorStartError(self.name, child.spec.id, exc.reason, exc.cause)
        return None

    async def _supervise(
        self, receive: trio.MemoryReceiveChannel[_Child]
    ) -> RestartIntensityExceeded | None:
        """The monitor loop: exit notices first, then pending start retries (OTP's order)."""
        while not self._stop_requested:
            child: _Child | None
            try:
                child = receive.receive_nowait()
            except trio.WouldBlock:
                child = None
            if child is None and self._retries:
                # Give other tasks (a stop request, an API call) a turn between
                # attempts, as OTP does by casting try_again_restart to itself.
                await trio.lowlevel.checkpoint()
                if self._stopping():
                    break
                async with self._lock:
                    if self._retries:
                        retry = next(iter(self._retries))
                        del self._retries[retry]
                        if retry.restarting and not retry.removed and retry.current is None:
                            await self._restart(retry)
            elif child is None:
                with trio.CancelScope() as self._wait_scope:
                    child = await receive.receive()
                self._wait_scope = None
            if child is not None:
                async with self._lock:
                    await self._on_exit_notice(child)
            if self._escalation is not None:
                return self._escalation
        async with self._lock:
            await self._stop_all()
        return None

    # -- one child -----------------------------------------------------------

    async def _start(self, child: _Child) -> object:
        """Start one incarnation of `child` (lock held); raises `ChildStartError`."""
        if self._nursery is None or self._send is None:
            raise SupervisorNotRunning(f"supervisor {self.name!r} is not running")
        incarnation = _Incarnation()
        child.current = incarnation
        try:
            return await self._nursery.start(self._child_main, child, incarnation, self._send)
        except _ReturnedBeforeStarted:
            child.current = None
            self._record_exit(child, NORMAL)
            raise ChildStartError(child.spec.id, NORMAL, None) from None
        except Exception as exc:
            child.current = None
            reason = _describe(exc)
            self._record_exit(child, reason)
            raise ChildStartError(child.spec.id, reason, exc) from exc
        except BaseException:
            child.current = None
            raise

    async def _child_main(
        self,
        child: _Child,
        incarnation: _Incarnation,
        notices: trio.MemorySendChannel[_Child],
        *,
        task_status: trio.TaskStatus[object],
    ) -> None:
        """The task that runs one incarnation and turns its end into an exit reason."""
        status = ChildStatus(task_status, shutdown_requested=incarnation.shutdown_requested)
        incarnation.status = status
        reason = KILLED
        try:
            with incarnation.scope:
                try:
                    await child.spec.start(task_status=status)
                except Exception as exc:
                    if not status._started:
                        raise
                    reason = _describe(exc)
                    # OTP's crash report: the reason alone does not say where the bug is.
                    log.error(
                        "supervisor %r: child %r crashed: %s",
                        self.name,
                        child.spec.id,
                        reason,
                        exc_info=exc,
                    )
                else:
                    if not status._started:
                        raise _ReturnedBeforeStarted
                    reason = NORMAL
            if incarnation.scope.cancelled_caught and not status._started:
                raise _ReturnedBeforeStarted
            if incarnation.signal == "kill":
                reason = KILLED
            elif incarnation.signal == SHUTDOWN and (
                reason == NORMAL or incarnation.scope.cancelled_caught
            ):
                reason = SHUTDOWN
        finally:
            incarnation.reason = reason
            incarnation.done.set()
            if status._started and not child.queued:
                child.queued = True
                notices.send_nowait(child)  # cannot block: see "Bounds" above

    async def _stop(self, child: _Child) -> None:
        """Stop `child` by its shutdown protocol and record its exit (lock held)."""
        self._retries.pop(child, None)
        child.restarting = False
        incarnation = child.current
        if incarnation is None:
            return
        if not incarnation.done.is_set():
            spec = child.spec
            try:
                if spec.shutdown == BRUTAL_KILL or self._hurried:
                    incarnation.kill()
                elif not spec.traps_shutdown:
                    incarnation.signal = SHUTDOWN
                    incarnation.scope.cancel()
                else:
                    incarnation.signal = SHUTDOWN
                    incarnation.shutdown_requested.set()
                    with trio.move_on_after(spec.shutdown) as self._grace_scope:
                        await incarnation.done.wait()
                    self._grace_scope = None
                    if not incarnation.done.is_set():
                        incarnation.kill()
                await incarnation.done.wait()
            except BaseException:
                # Whoever stopped it was cancelled: do not leave a child behind
                # that nobody will ever kill; the monitor records its exit.
                incarnation.kill()
                raise
        self._finalize(child, incarnation)

    def _finalize(self, child: _Child, incarnation: _Incarnation) -> None:
        child.current = None
        self._record_exit(child, incarnation.reason or KILLED)

    def _record_exit(self, child: _Child, reason: str) -> None:
        child.last_exit = reason
        self._last_exit = f"{child.spec.id}: {reason}"

    def _remove(self, child: _Child) -> None:
        if child.removed:
            return
        del self._children[child.spec.id]
        child.removed = True
        self._retries.pop(child, None)
        if child.queued:
            self._orphans += 1

    async def _stop_all(self) -> None:
        self._accepting = False
        for child in reversed(list(self._children.values())):
            await self._stop(child)
            if child.spec.restart is Restart.TEMPORARY:
                self._remove(child)

    # -- exits and restarts --------------------------------------------------

    async def _on_exit_notice(self, child: _Child) -> None:
        """Handle the exit of `child`'s current incarnation, if not handled already (lock held)."""
        child.queued = False
        if child.removed:
            self._orphans -= 1
            return
        incarnation = child.current
        if incarnation is None or not incarnation.done.is_set():
            return  # stale: a stop or restart handled that exit already
        self._finalize(child, incarnation)
        restart = child.spec.restart
        stopped_by_us = incarnation.signal is not None
        if restart is Restart.TEMPORARY:
            self._remove(child)
        elif not stopped_by_us and (restart is Restart.PERMANENT or child.last_exit != NORMAL):
            await self._restart(child)
        elif self.forget_finished:
            self._remove(child)

    def _add_restart(self) -> bool:
        """Stamp one restart attempt; False when that is one too many (OTP's add_restart)."""
        now = trio.current_time()
        self._restarts_total += 1
        self._window.append(now)
        while self._window and self._window[0] < now - self.period:
            self._window.popleft()
        return len(self._window) <= self.max_restarts

    async def _restart(self, child: _Child) -> None:
        """Restart after `child` exited, by strategy (lock held; `child` is not running)."""
        self._retries.pop(child, None)
        child.restarting = False
        if not self._add_restart():
            self._escalation = RestartIntensityExceeded(
                self.name, self.max_restarts, self.period, child.spec.id, child.last_exit or "?"
            )
            await self._stop_all()
            return
        order = list(self._children.values())
        to_stop: list[_Child]
        to_start: list[_Child]
        if self.strategy is Strategy.ONE_FOR_ONE:
            to_stop, to_start = [], [child]
        elif self.strategy is Strategy.ONE_FOR_ALL:
            to_stop, to_start = [c for c in order if c is not child], order
        else:
            index = order.index(child)
            to_stop, to_start = order[index + 1 :], order[index:]
        for sibling in reversed(to_stop):
            await self._stop(sibling)
            if sibling.spec.restart is Restart.TEMPORARY:
                self._remove(sibling)
        for target in to_start:
            if target.removed or target.current is not None:
                continue
            try:
                await self._start(target)
            except ChildStartError as exc:
                log.error(
                    "supervisor %r: restarting child %r failed: %s",
                    self.name,
                    target.spec.id,
                    exc.reason,
                    exc_info=exc.cause,
                )
                target.restarting = True
                self._retries[target] = None
                return
            target.restarts += 1

    # -- dynamic children ----------------------------------------------------

    def _get(self, child_id: str) -> _Child:
        try:
            return self._children[child_id]
        except KeyError:
            raise ChildNotFound(f"supervisor {self.name!r} has no child {child_id!r}") from None

    def _check_accepting(self) -> None:
        if not self._accepting:
            raise SupervisorNotRunning(f"supervisor {self.name!r} is not running")

    async def start_child(self, spec: ChildSpec) -> object:
        """Add `spec` as the last child and start it; returns what it passed to `started()`.

        If it fails to start, the spec is not kept and `ChildStartError` is
        raised. Raises `ChildAlreadyExists`, `TooManyChildren` or
        `SupervisorNotRunning` without starting anything.
        """
        self._check_accepting()
        async with self._lock:
            self._check_accepting()
            if spec.id in self._children:
                raise ChildAlreadyExists(
                    f"supervisor {self.name!r} already has a child {spec.id!r}"
                )
            if len(self._children) + self._orphans >= self.max_children:
                raise TooManyChildren(
                    f"supervisor {self.name!r} holds max_children={self.max_children} children"
                )
            child = _Child(spec)
            self._children[spec.id] = child
            try:
                return await self._start(child)
            except BaseException:
                self._remove(child)
                raise

    async def terminate_child(self, child_id: str) -> None:
        """Stop the child by its shutdown protocol; keep its spec (a temporary one's is removed).

        Stopping a child that is not running does nothing (and cancels a
        pending start retry).
        """
        async with self._lock:
            child = self._get(child_id)
            await self._stop(child)
            if child.spec.restart is Restart.TEMPORARY:
                self._remove(child)

    async def restart_child(self, child_id: str) -> object:
        """Start a terminated child again; returns what it passed to `started()`.

        Does not count towards the restart intensity. Raises `ChildNotFound`,
        `ChildRunning`, `ChildStartError` (the child stays terminated) or
        `SupervisorNotRunning`.
        """
        self._check_accepting()
        async with self._lock:
            self._check_accepting()
            child = self._get(child_id)
            if child.current is not None or child.restarting:
                raise ChildRunning(f"child {child_id!r} of {self.name!r} is running")
            return await self._start(child)

    def delete_child(self, child_id: str) -> None:
        """Remove the spec of a child that is not running (`ChildRunning` otherwise)."""
        child = self._get(child_id)
        if child.current is not None or child.restarting:
            raise ChildRunning(f"child {child_id!r} of {self.name!r} is running")
        self._remove(child)

    # -- introspection -------------------------------------------------------

    def which_children(self) -> list[ChildInfo]:
        """The children in start order."""
        return [
            ChildInfo(
                id=child.spec.id,
                running=child.current is not None,
                restart=child.spec.restart,
                restarts=child.restarts,
                last_exit=child.last_exit,
            )
            for child in self._children.values()
        ]

    def count_children(self) -> ChildCounts:
        active = sum(1 for child in self._children.values() if child.current is not None)
        return ChildCounts(specs=len(self._children), active=active)

    def statistics(self) -> SupervisorStatistics:
        children = tuple(
            ChildStatistics(
                id=child.spec.id,
                running=child.current is not None,
                restart=child.spec.restart.value,
                restarts=child.restarts,
                last_exit=child.last_exit,
                running_seconds=_running_seconds(child.current),
                detail=child.spec.statistics() if child.spec.statistics is not None else None,
            )
            for child in self._children.values()
        )
        return SupervisorStatistics(
            name=self.name,
            strategy=self.strategy.value,
            running=self._running,
            children=children,
            restarts_total=self._restarts_total,
            restarts_in_window=self._restarts_in_window(),
            last_exit=self._last_exit,
            backoff=self._backoff_statistics(),
        )

    def _backoff_statistics(self) -> BackoffStatistics | None:
        if self.backoff is None:
            return None
        try:
            now: float | None = trio.current_time()
        except RuntimeError:  # outside trio.run: no clock to compare with
            now = None
        since, until = self._down_since, self._down_until
        return BackoffStatistics(
            down=since is not None,
            times_down=self._times_down,
            times_in_a_row=self._in_a_row if now is None else self._times_in_a_row(now),
            last_failure=self._last_failure,
            delay_seconds=self._last_delay,
            down_seconds=None if since is None or now is None else now - since,
            retry_in_seconds=None if until is None or now is None else max(until - now, 0.0),
        )

    def _restarts_in_window(self) -> int:
        try:
            now = trio.current_time()
        except RuntimeError:  # outside trio.run: no clock to compare with
            return len(self._window)
        return sum(1 for stamp in self._window if stamp >= now - self.period)
