"""The daemon: builds the supervisor tree, serves the listeners, stops cleanly.

`serve(config, task_status=...)` is the one way to run lokid: `loki serve`,
the systemd unit and the in-process tests all come through it.

The tree (start order; stop is the reverse):

    lokid (rest_for_one)            a store restart restarts what follows it
    ├── store                       SQLite owner, group commit
    ├── audit_writer                hash-chained audit log (durable group commit)
    ├── event_bus                   event ids, persistence, SSE fan-out
    ├── agent_pool                  agent process cap, records, reconciliation
    ├── sessions                    session manager; its session_supervisor runs
    │                               one transient SessionActor per live session
    ├── optional (one_for_one,      what lokid can do without: never escalates; past
    │   │         back-off)         its restart intensity it is down for a while
    │   └── registry                project registry: discovery, health, periodic sync
    └── listeners (one_for_one)
        ├── api                     HTTP API, 127.0.0.1:8420
        ├── dashboard               Dashboard API, 57374 or the next free port
        └── control                 Unix socket, HTTP API + /dashboard

Life of a daemon: take the data directory lock, bind the sockets (or take
them from systemd; a control socket we bind has a lock of its own,
`lokid.sockets.SocketPathLock`), start the tree, record the run in the
store, tell systemd `READY=1`, serve until a stop signal (SIGTERM, SIGINT,
SIGHUP, SIGQUIT: `STOP_SIGNALS`) or `request_shutdown()`, then `STOPPING=1`,
tell the sessions to wind down (no new agent run from then on; their agents
are stopped at once, in parallel with what follows), stop the tree in
reverse order within `shutdown_grace` seconds, remove the socket file,
release the locks. A stop signal during the start (noted by `loki serve`
from its first step, `lokid.startsignals`) ends it at the next step, with
what was done so far undone the same way.
A restart intensity escalation at the root ends the daemon with
`DaemonFailed`. The `optional` supervisor never escalates (`OPTIONAL_BACKOFF`,
docs/architecture.md): a registry that keeps crashing is down for a while,
its routes answer 503, and nothing else is touched.

The stop is bounded (docs/operations.md). When `shutdown_grace` runs out,
or at a second stop signal, the stop is hurried: every agent gets SIGKILL
at once (`AgentPool.hurry`), and the tree kills what is still running in
reverse order (`Supervisor.hurry`), so the store is still there for the
sessions' and agents' last rows. If the tree still runs `HURRY_SECONDS`
later, the rest is cancelled.
"""

from __future__ import annotations

import enum
import gc
import logging
import math
import os
import shutil
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio

from lokid import __version__
from lokid.actor import Actor, exception_leaves
from lokid.actors.agent_pool import AgentPool
from lokid.actors.audit_writer import AuditWriter
from lokid.actors.event_bus import EventBus
from lokid.actors.listener import HttpListener
from lokid.actors.registry_scanner import RegistryScanner
from lokid.actors.session import RunnerSettings
from lokid.actors.session_manager import SessionManager
from lokid.actors.store import StoreActor
from lokid.config import PROVIDERS, Config
from lokid.cors import CorsPolicy
from lokid.crashpoints import crash_point
from lokid.errors import LokiError, StartupError, Unavailable
from lokid.events import Level
from lokid.http.api import create_api_surface
from lokid.http.board import install_board
from lokid.http.control import control_app
from lokid.http.dashboard import create_dashboard_surface
from lokid.http.enterprise import install_enterprise
from lokid.http.events import install_events
from lokid.http.gate import Gate
from lokid.http.metrics import observe_requests
from lokid.http.registry import install_registry
from lokid.http.surface import Surface
from lokid.http.ws import DashboardHub, install_ws
from lokid.metrics import DaemonMetrics
from lokid.pidfile import DaemonLock, prepare_data_dir
from lokid.ratelimit import RateLimiter
from lokid.sockets import SocketPathLock, bind_tcp, bind_unix, is_loopback_socket, socket_url
from lokid.startsignals import STOP_SIGNALS, EarlySignals, signals_to_handle
from lokid.supervisor import (
    Backoff,
    ChildSpec,
    RestartIntensityExceeded,
    Strategy,
    Supervisor,
    SupervisorStartError,
)
from lokid.systemd import (
    Notifier,
    clear_activation_environment,
    inherited_sockets,
    watchdog_interval,
)
from lokid.timefmt import iso, utc_now

log = logging.getLogger("lokid")

PROVIDER_CACHE_SECONDS = 30.0
STORE_SHUTDOWN_SECONDS = 10.0
HURRY_SECONDS = 2.0  # a hurried stop's bound before the rest of the tree is cancelled
GC_THRESHOLDS = (50_000, 20, 10)  # CPython's defaults are (700, 10, 10)
OPTIONAL_BACKOFF = Backoff(first=30.0, factor=2.0, max=600.0, reset_after=600.0)
"""How long the `optional` supervisor's children stay down once they exceeded its
restart intensity: 30 s, doubling with each time in a row, at most 10 min; the
doubling starts over after 10 min up (docs/architecture.md)."""


def tune_collector() -> None:
    """The cyclic GC as the daemon runs it, from the end of its start-up on.

    Everything built so far lives as long as the daemon: keep it out of the
    collector's scans, and collect the young generation less often. Under SSE
    fan-out the collector took ~28 % of the loop with the defaults (full passes
    freeing nothing); see docs/performance.md. Benchmarks of in-process parts
    call it too, so they measure what the daemon does.
    """
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


class DaemonFailed(LokiError):
    """The daemon stopped because its supervisor tree gave up (restart intensity)."""


class Phase(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"


@attrs.frozen
class Listeners:
    api: socket.socket
    dashboard: socket.socket
    control: socket.socket
    from_systemd: frozenset[str]

    def urls(self) -> dict[str, str]:
        return {
            "api": socket_url(self.api),
            "dashboard": socket_url(self.dashboard),
            "socket": self.control.getsockname(),
        }

    def close(self) -> None:
        for sock in (self.api, self.dashboard, self.control):
            sock.close()


class Daemon:
    def __init__(self, config: Config, *, notifier: Notifier | None = None) -> None:
        self.config = config
        self._early: EarlySignals | None = None
        self.phase = Phase.STARTING
        self.started_at = utc_now()
        self._t0 = time.monotonic()
        self.notifier = notifier or Notifier()
        self.store = StoreActor(config.database)
        self.audit = AuditWriter(self.store)
        self.gate = Gate(
            auth_enabled=config.auth_enabled,
            store=self.store,
            audit=self.audit,
            limiter=RateLimiter(config.rate_limit) if config.rate_limit else None,
            cors=CorsPolicy.from_origins(config.cors_origins),
            # Auth off: only loopback names in Host (against DNS rebinding), unless the
            # operator opened the listeners on purpose.
            loopback_hosts=not config.auth_enabled and not config.allow_insecure_remote,
        )
        self.bus = EventBus(
            self.store,
            retention_count=config.event_retention_count,
            retention_seconds=config.event_retention_days * 86400,
        )
        self.pool = AgentPool(
            self.store,
            max_agents=config.max_agents,
            grace=config.agent_grace,
            held_dir=config.held_dir,
        )
        self.sessions = SessionManager(
            self.store,
            self.bus,
            self.pool,
            settings=RunnerSettings(
                grace=config.agent_grace,
                idle_timeout=config.agent_idle_timeout,
                hard_timeout=config.agent_hard_timeout,
                retry_base=config.retry_base,
                retry_cap=config.retry_cap,
            ),
            default_provider=config.default_provider,
            max_sessions=config.max_sessions,
            resume_on_start=config.resume_on_start,
        )
        self.metrics = DaemonMetrics(self)  # read at scrape time; see lokid/metrics.py
        self.store.commit_observer = self.metrics.store_commits.observe
        self.api = create_api_surface(self, self.store, self.sessions, self.metrics)
        self.dashboard = create_dashboard_surface(self, self.store, self.sessions)
        install_enterprise(
            self.dashboard,
            self.store,
            self.audit,
            self.gate,
            rate_limit=config.rate_limit is not None,
        )
        self.hub = DashboardHub()
        self.bus.add_listener(self.hub.offer_event)
        install_ws(self.dashboard, self.hub)
        install_board(self.dashboard, self.store, self.hub.publish)
        self.registry = RegistryScanner(
            self.store,
            loki_home=config.loki_home,
            default_roots=config.registry_roots,
            interval=config.registry_interval,
            notify=self.hub.publish,
        )
        install_registry(self.dashboard, self.registry, self.gate)
        for surface in (self.api, self.dashboard):
            install_events(surface, self.bus, heartbeat=config.sse_heartbeat)
            surface.gate = self.gate
        observe_requests(self.api, "api", self.metrics)
        observe_requests(self.dashboard, "dashboard", self.metrics)
        self.root = Supervisor("lokid")  # replaced by the real tree in `_build_tree`
        self.optional = Supervisor("optional")  # likewise
        self._http_listeners: list[HttpListener] = []
        self.listeners: Listeners | None = None
        self._socket_lock: SocketPathLock | None = None  # held while we own the socket file
        self.failure: BaseException | None = None
        self.run_id: int | None = None
        self._stop = trio.Event()
        self._hurry = trio.Event()
        self._root_done = trio.Event()
        self._providers: dict[str, bool] = {}
        self._providers_at = -PROVIDER_CACHE_SECONDS

    # -- control ------------------------------------------------------------------

    def request_shutdown(self) -> None:
        """Begin a graceful shutdown (what SIGTERM does); a second call hurries it."""
        if self._stop.is_set():
            self._hurry.set()
        self._stop.set()

    async def run(
        self,
        *,
        handle_signals: bool = False,
        early: EarlySignals | None = None,
        task_status: Any = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Start, serve until asked to stop, stop (module docstring).

        `early` (with `handle_signals`): the signals `loki serve` noted before the
        watcher is up (`lokid.startsignals`). A stop signal among them ends the
        start at the next step: what was done so far is undone as by a stop (the
        pid file, the socket, the store when it was opened) and `run` returns.
        """
        self._early = early if handle_signals else None
        if self._stopped_early("before the data dir was opened"):
            return
        prepare_data_dir(self.config.data_path)  # 0700, before anything is written in it
        lock = DaemonLock(self.config.lock_file, self.config.pid_file)
        lock.acquire()
        try:
            crash_point("daemon.locked")
            if self._stopped_early("after the pid file was written"):
                return
            self.listeners = self._open_listeners()
            crash_point("daemon.listening")
            try:
                if self._stopped_early("after the listeners were bound"):
                    return
                await self._serve(handle_signals, task_status)
            finally:
                self.listeners.close()
                if self._socket_lock is not None:  # bound by us, not passed by systemd
                    self._socket_lock.remove_socket()  # only if it is still ours
        finally:
            self._release_socket_lock()  # only now: the socket file is gone
            lock.release()
        if self.failure is not None:
            raise DaemonFailed(f"the supervisor tree gave up: {self.failure}")

    def _stopped_early(self, when: str) -> bool:
        """Whether a stop signal came during the start, before the watcher was up."""
        signum = None if self._early is None else self._early.stop_requested()
        if signum is None:
            return False
        log.info("received %s during the start (%s): stopping", signum.name, when)
        return True

    async def _serve(self, handle_signals: bool, task_status: Any) -> None:
        assert self.listeners is not None
        self._build_tree(self.listeners)
        async with trio.open_nursery() as nursery:
            if handle_signals:
                await nursery.start(self._watch_signals)
            self.notifier.status("starting")
            crash_point("daemon.tree_starting")
            if self._stop.is_set():  # a stop signal already: no tree to start and stop
                log.info("stopping before the supervisor tree started")
                nursery.cancel_scope.cancel()
                return
            try:
                await nursery.start(self._run_root)
            except SupervisorStartError as exc:
                raise StartupError(_startup_message(exc)) from None
            crash_point("daemon.started")
            self.run_id = await self.store.record_start(os.getpid(), __version__)
            await self._warn_of_an_unclean_previous_run()
            await self.bus.publish(
                "log",
                None,
                Level.INFO,
                {"message": f"lokid {__version__} started", "pid": os.getpid()},
            )
            interval = watchdog_interval()
            if interval is not None:
                nursery.start_soon(self._watchdog, interval)
            tune_collector()
            if not self._stop.is_set():  # a stop signal during the tree's start: not ready
                self.phase = Phase.RUNNING
                urls = self.listeners.urls()
                summary = (
                    f"api {urls['api']}, dashboard {urls['dashboard']}, socket {urls['socket']}"
                )
                log.info("lokid %s ready: %s", __version__, summary)
                self.notifier.ready(f"serving {summary}")
            task_status.started(self)

            await self._stop.wait()
            self.phase = Phase.STOPPING
            log.info("shutting down")
            # First, before any await: the listeners stop first and may drain for most
            # of `shutdown_grace`; no session may start an agent run meanwhile.
            self.sessions.wind_down()
            drained = trio.current_time() + self._listener_grace()
            for listener in self._http_listeners:  # drained together, not one after another
                listener.drain_by(drained)
            self.notifier.stopping("stopping: closing listeners, flushing the store")
            with trio.move_on_after(self.config.shutdown_grace) as grace:
                await self._until_hurried(self._stop_tree)
            if not self._root_done.is_set():
                if grace.cancelled_caught:
                    log.warning(
                        "shutdown took longer than %gs: killing agents, stopping the rest at once",
                        self.config.shutdown_grace,
                    )
                else:
                    log.warning("second stop request: killing agents, stopping the rest at once")
                await self._stop_tree_now()
            nursery.cancel_scope.cancel()

    async def _warn_of_an_unclean_previous_run(self) -> None:
        """One WARNING line when the run before this one never recorded its stop: the
        operator learns of a SIGKILL, a crash or a power loss from the log, not only from
        its traces (agents killed at start, sessions `interrupted`)."""
        previous = await self.store.previous_run(self.run_id)
        if previous is None or previous.clean:
            return
        log.warning(
            "the previous lokid run (pid %d, version %s, started %s) did not stop cleanly "
            "(killed, crashed, or the machine went down); its agents and sessions were "
            "reconciled at this start",
            previous.pid,
            previous.version,
            previous.started_at,
        )

    async def _stop_tree(self) -> None:
        """The graceful stop: record it, end the streams, stop the tree in reverse order."""
        if self._root_done.is_set():
            return
        if self.run_id is not None:
            try:
                await self.bus.publish("log", None, Level.INFO, {"message": "lokid stopping"})
                await self.store.record_stop(self.run_id)
            except LokiError as exc:
                log.warning("could not record the clean stop: %s", exc)
        self._end_streams()
        self.root.request_stop()
        await self._root_done.wait()

    async def _stop_tree_now(self) -> None:
        """The hurried stop: SIGKILL to every agent, then kill the tree in reverse order."""
        self._end_streams()
        self.pool.hurry()
        self.root.hurry()
        with trio.move_on_after(HURRY_SECONDS):
            await self._root_done.wait()
        if not self._root_done.is_set():
            log.error(
                "the supervisor tree still runs %gs after being hurried; cancelling it",
                HURRY_SECONDS,
            )

    def _end_streams(self) -> None:
        # Open event streams would otherwise keep the listeners draining until their
        # timeout; a client that reconnects at once gets 503 instead of a new stream.
        self.bus.refuse_streams("lokid is stopping")
        self.hub.close_all()

    async def _until_hurried(self, stop: Callable[[], Awaitable[None]]) -> None:
        """Run `stop`, cut short by a second stop request."""
        async with trio.open_nursery() as nursery:

            async def hurry() -> None:
                await self._hurry.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(hurry)
            await stop()
            nursery.cancel_scope.cancel()

    async def _run_root(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await self.root.run(task_status=task_status)
        except RestartIntensityExceeded as exc:
            log.error("supervisor escalation: %s", exc)
            self.failure = exc
        finally:
            self._root_done.set()
            self._stop.set()

    async def _watch_signals(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Turn the stop signals into `request_shutdown()`, and keep the others we handle
        from killing the daemon (their default action would leave the agents orphaned)."""
        handled = signals_to_handle() if self._early is None else self._early.signals
        with trio.open_signal_receiver(*handled) as signals:
            # From here on the receiver has them. What came before (noted by `loki
            # serve`'s own handler, back in place when the receiver goes) is taken
            # now: nothing falls between the two.
            for noted in [] if self._early is None else self._early.take():
                self._on_signal(noted)
            task_status.started()
            async for signum in signals:
                self._on_signal(signum)

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if signum not in STOP_SIGNALS:
            log.warning("received %s: ignored (lokid gives it no meaning)", name)
        elif self._stop.is_set():
            log.info("received %s again: hurrying the stop", name)
            self.request_shutdown()
        else:
            log.info("received %s: stopping gracefully", name)
            self.request_shutdown()

    async def _watchdog(self, interval: float) -> None:
        # Runs on the trio loop on purpose: a frozen loop stops the pings and systemd restarts us.
        while True:
            self.notifier.watchdog()
            await trio.sleep(interval)

    # -- building -----------------------------------------------------------------

    def _open_listeners(self) -> Listeners:
        config = self.config
        passed = inherited_sockets()
        clear_activation_environment()
        opened: list[socket.socket] = []
        try:
            api = passed.get("api") or _track(
                opened, bind_tcp(config.api_host, config.api_port, what="HTTP API")
            )
            dashboard = passed.get("dashboard") or _track(
                opened,
                bind_tcp(
                    config.dashboard_host, config.dashboard_port, what="dashboard", fallback=True
                ),
            )
            self._refuse_insecure_remote(api, dashboard)
            # Last: a refusal above leaves no socket file behind.
            control = passed.get("control") or _track(opened, self._bind_control())
            listeners = Listeners(api, dashboard, control, frozenset(passed))
        except BaseException:
            for sock in [*opened, *passed.values()]:
                sock.close()
            raise
        if (
            "dashboard" not in passed
            and config.dashboard_port
            and dashboard.getsockname()[1] != config.dashboard_port
        ):
            log.warning(
                "dashboard port %d is taken; using %d",
                config.dashboard_port,
                dashboard.getsockname()[1],
            )
        return listeners

    def _bind_control(self) -> socket.socket:
        """Bind the control socket ourselves, keeping its path's lock until we exit.

        Not for a socket systemd passed: systemd owns that path (and listens on it
        from before we start), and its folder may be read-only to us.
        """
        sock, self._socket_lock = bind_unix(self.config.socket)
        return sock

    def _release_socket_lock(self) -> None:
        if self._socket_lock is not None:
            self._socket_lock.release()
            self._socket_lock = None

    def _refuse_insecure_remote(self, api: socket.socket, dashboard: socket.socket) -> None:
        if self.config.auth_enabled or self.config.allow_insecure_remote:
            return
        for name, sock in (("HTTP API", api), ("dashboard", dashboard)):
            if not is_loopback_socket(sock):
                raise StartupError(
                    f"refusing to serve the {name} on {socket_url(sock)} without authentication: "
                    "anyone who can reach it could run agents on this machine. Enable auth "
                    "(LOKI_ENTERPRISE_AUTH=true), bind to 127.0.0.1, or pass "
                    "--allow-insecure-remote if you really mean it"
                )

    def _listener_grace(self) -> float:
        """Seconds the listeners drain open requests; the rest of the stop gets 1 s."""
        return max(self.config.shutdown_grace - 1.0, 0.5)

    def _build_tree(self, listeners: Listeners) -> None:
        grace = self._listener_grace()
        listener_specs = []
        self._http_listeners = []
        for name, app, sock, check in (
            ("api", self.api, listeners.api, False),
            ("dashboard", self.dashboard, listeners.dashboard, False),
            ("control", control_app(self.api, self.dashboard), listeners.control, True),
        ):
            inline = app if isinstance(app, Surface) else None
            listener = HttpListener(
                name,
                app,
                [sock],
                check_peer=check,
                inline=inline,
                on_refused=self.gate.refuse_stranger,
                graceful_timeout=grace,
            )
            self._http_listeners.append(listener)
            listener_specs.append(
                ChildSpec(
                    name,
                    listener.run,
                    shutdown=grace + 1.0,
                    traps_shutdown=True,
                    statistics=listener.statistics,
                )
            )
        servers = Supervisor(
            "listeners", listener_specs, strategy=Strategy.ONE_FOR_ONE, max_restarts=5, period=30.0
        )
        actors = [
            _actor_spec("store", self.store, STORE_SHUTDOWN_SECONDS),
            _actor_spec("audit_writer", self.audit, STORE_SHUTDOWN_SECONDS),
            _actor_spec("event_bus", self.bus, STORE_SHUTDOWN_SECONDS),
            _actor_spec("agent_pool", self.pool, self.pool.grace + 15.0),
            _actor_spec("sessions", self.sessions, self.pool.grace + 30.0),
        ]
        # Never escalates, so its failures restart neither the listeners after it
        # nor the root; after the store (it reads the store), so a store restart
        # restarts it too.
        self.optional = Supervisor(
            "optional",
            [_actor_spec("registry", self.registry, STORE_SHUTDOWN_SECONDS)],
            strategy=Strategy.ONE_FOR_ONE,
            max_restarts=5,
            period=30.0,
            backoff=OPTIONAL_BACKOFF,
            on_down=self._registry_down,
            on_up=self.registry.accept_messages,
        )
        self.root = Supervisor(
            "lokid",
            [*actors, self.optional.as_child(), servers.as_child()],
            strategy=Strategy.REST_FOR_ONE,
            max_restarts=5,
            period=30.0,
        )

    def _registry_down(self) -> None:
        """The `optional` supervisor took the registry down: its callers get 503 at once."""
        self.registry.refuse_messages(self._registry_unavailable)

    def _registry_unavailable(self) -> Unavailable:
        """The 503 of a registry route while the registry is down: why, and for how long."""
        stats = self.optional.statistics()
        last = next((c.last_exit for c in stats.children if c.id == "registry"), None)
        retry = stats.backoff.retry_in_seconds if stats.backoff is not None else None
        seconds = None if retry is None else math.ceil(retry)
        when = "shortly" if seconds is None else f"in {seconds} s"
        return Unavailable(
            f"the project registry is down after repeated failures (last: {last or 'unknown'}); "
            f"lokid starts it again {when}, the rest of lokid is not affected",
            details={"component": "registry", "last_exit": last, "retry_in_seconds": seconds},
        )

    # -- what the probes and /api/status read --------------------------------------

    def uptime_seconds(self) -> float:
        return time.monotonic() - self._t0

    def stop_bound_seconds(self) -> float:
        """How long a stop may take from its first signal to the exit (a hurried stop's
        bound); `loki api stop` waits this long, whatever its own shell's settings."""
        return self.config.shutdown_grace + HURRY_SECONDS

    def core_problems(self) -> dict[str, str]:
        """What `/health` reports down: the actors lokid cannot work without. Not the
        registry: it only serves an optional feature, and `/api/status` shows it down."""
        problems: dict[str, str] = {}
        if not self.store.running:
            problems["store"] = "not running"
        elif not self.store.writable:
            problems["store"] = f"not writable: {self.store.unwritable_reason}"
        elif (lost := self.store.file_problem) is not None:
            problems["store"] = lost
        if not self.audit.running:
            problems["audit_writer"] = "not running"
        if not self.bus.running:
            problems["event_bus"] = "not running"
        if not self.pool.running:
            problems["agent_pool"] = "not running"
        if not self.sessions.running:
            problems["sessions"] = "not running"
        return problems

    def readiness_problems(self) -> dict[str, str]:
        problems = self.core_problems()
        if self.phase is not Phase.RUNNING:
            problems["daemon"] = self.phase.value
        return problems

    def providers(self) -> dict[str, bool]:
        now = time.monotonic()
        if now - self._providers_at > PROVIDER_CACHE_SECONDS:
            self._providers = {
                name: name == "command" or shutil.which(name) is not None for name in PROVIDERS
            }
            self._providers_at = now
        return self._providers

    async def status(self) -> dict[str, Any]:
        current = self.sessions.current()
        try:
            counts = await self.sessions.counts()
        except LokiError:
            counts = {}
        return {
            "status": "running" if current is not None else "idle",
            "version": __version__,
            "provider": current.provider if current else self.config.default_provider,
            "session": current.summary() if current else None,
            "agents": {"active": self.pool.active, "total": self.pool.capacity},
            "sessions": counts,
            "phase": self.phase.value,
            "pid": os.getpid(),
            "startedAt": iso(self.started_at),
            "uptimeSeconds": round(self.uptime_seconds(), 3),
            "stopBoundSeconds": self.stop_bound_seconds(),
            "providers": self.providers(),
            "listeners": self.listeners.urls() if self.listeners else {},
            "supervisor": self.root.statistics(),
            "gate": self.gate.statistics(),
            "websocket": self.hub.statistics(),
        }


def _actor_spec(name: str, actor: Actor[Any], shutdown: float) -> ChildSpec:
    """Actors trap shutdown: they finish what is in their mailbox, then return."""
    return ChildSpec(
        name, actor.run, shutdown=shutdown, traps_shutdown=True, statistics=actor.statistics
    )


def _track(opened: list[socket.socket], sock: socket.socket) -> socket.socket:
    opened.append(sock)
    return sock


def _startup_message(exc: SupervisorStartError) -> str:
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, StartupError):
            return cause.message
        cause = cause.__cause__
    return str(exc)


async def serve(
    config: Config,
    *,
    handle_signals: bool = False,
    early: EarlySignals | None = None,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a daemon until it is asked to stop; `task_status.started(daemon)` once ready.

    Raises `StartupError` (with the operator's message) when it cannot start
    and `DaemonFailed` when the tree gave up; trio's exception groups around
    a single such error are unwrapped so callers can catch them plainly.
    `early`: see `Daemon.run`.
    """
    try:
        await Daemon(config).run(
            handle_signals=handle_signals, early=early, task_status=task_status
        )
    except BaseExceptionGroup as group:
        leaves = list(exception_leaves(group))
        if len(leaves) == 1 and isinstance(leaves[0], LokiError):
            raise leaves[0] from None
        raise
