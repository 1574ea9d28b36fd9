"""The cross-project registry's file-system side: discover, health, tasks, learnings.

Every function here is synchronous and meant for a worker thread (the
registry scanner runs them with `trio.to_thread.run_sync`), never for the
trio loop. Rules of operation:

* **Plain data out, nothing raised for the file system.** A folder that
  vanished, a permission error, a symlink loop, a malformed or oversized
  file: each becomes a `Problem` in the answer's `errors` (or an entry's
  status), never an exception. Only programming errors raise.
* **Bounded.** Every answer has a stated cap (results, folders walked,
  seconds, tasks per file, files per project, problems reported, bytes
  read); hitting one is said in the answer (`truncated`, `omitted`), never
  silent and never unbounded.
* **Discovery** (`discover`) walks each root with `os.scandir`, depth-first:
  the root is depth 0, each folder below adds 1, and the children of a
  folder at the maximum depth are not listed. It never follows a symbolic
  link to descend (`is_dir(follow_symlinks=False)`), so a link loop inside
  a tree cannot trap it, and the depth bound ends any other cycle (a bind
  mount). It skips hidden folders (names starting with `.`). A folder that
  holds a `.loki/` folder is a project: it is reported and the walk does
  not descend into it (the older registry's rule: a project's own
  subfolders, `node_modules` and the like, are not searched, which is also
  what keeps the walk fast). A root is resolved once (`realpath`); paths
  below it are built from the real root and real folder names, so every
  reported path is a real path without a `realpath` per folder.
* **Tasks** (`read_tasks`, `aggregate_tasks`) come from
  `<project>/.loki/queue/*.json` (`current-task.json` excepted: it repeats
  an in-progress entry), a bare array or `{"tasks": [...]}`
  (`lokid.lokidir.decode_queue`). A task's `status` is lokid's word for the
  queue it sits in (`pending`; `in-progress` and `review` -> `active`;
  `completed`; `failed` and `dead-letter` -> `failed`); in any other queue
  file the entry's own status word decides. `queue` names the file.
* **The cache** (`FileCache`) keeps each parsed file under its path with
  the stamp it was read with: device, inode, size, `mtime_ns` and
  `ctime_ns`. A warm read costs one `lstat` per file (and one per queue
  folder, whose listing is cached the same way). A file whose timestamps
  are within `RACY_SECONDS` of the moment it was read is *racy*: a second
  write within the file system's timestamp granularity could leave the
  stamp unchanged (git's "racy clean" problem), so a racy entry is never
  trusted on its stamp alone: it is re-read, and its bytes' digest decides
  whether the parsed value can be reused. Once a read happens more than
  `RACY_SECONDS` after the file's timestamps, any later change moves them.
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import json
import os
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

import attrs

from lokid import textrules
from lokid.jsontypes import (
    json_type_name,
    loads_bounded,
    may_hold_lone_surrogates,
    shown,
    undecodable,
    without_lone_surrogates,
)
from lokid.lokidir import (
    MAX_LOKI_FILE_BYTES,
    LokiDirFormatError,
    QueueTask,
    decode_autonomy_state,
    decode_orchestrator,
    decode_queue,
    read_file,
)
from lokid.process import is_zombie, start_ticks
from lokid.timefmt import iso

T = TypeVar("T")

# -- bounds and defaults ---------------------------------------------------------------

DEFAULT_ROOTS: tuple[str, ...] = ("~/git", "~/projects", "~/code", "~/dev", "~/workspace", "~/src")
"""Where discovery looks when no roots are given (DESIGN.md §7; the daemon passes config's)."""
DEFAULT_DEPTH = 3
MIN_DEPTH = 1
MAX_DEPTH = 10
MAX_ROOTS = 32
"""Roots in one discovery."""
MAX_DISCOVER_RESULTS = 10_000
"""Projects one discovery reports; the walk stops there (`truncated`)."""
MAX_DISCOVER_FOLDERS = 2_000_000
"""Folders one discovery lists; the walk stops there (`truncated`)."""
DISCOVER_SECONDS = 60.0
"""Wall-clock budget of one discovery; the walk stops there (`truncated`)."""
MAX_PROBLEMS = 100
"""Problems listed in one answer; the rest are counted in `errors_omitted`."""
MAX_PATH_CHARS = 4096
MAX_QUEUE_FILES = 32
"""`queue/*.json` files read per project (in queue order, then by name)."""
MAX_TASKS_PER_FILE = 10_000
"""Tasks kept from one queue file; the rest are reported and dropped."""
RACY_SECONDS = 2.0
"""A file whose mtime/ctime is this close to the read is re-checked by content (module doc).
Two seconds covers file systems with one- or two-second timestamps (ext3, FAT)."""
CACHE_FILES = 4096
"""Files the task cache holds (least recently used first out)."""
CACHE_WEIGHT = 200_000
"""Tasks (or learnings) the cache holds in all; entries are evicted, oldest use first."""
MAX_LEARNINGS = 1000
MAX_LEARNINGS_BYTES = 16 * 1024 * 1024
"""Bytes read from the end of one learnings file (the newest entries)."""
MAX_LEARNING_LINE = 64 * 1024
LEARNING_TYPES: tuple[str, ...] = ("patterns", "mistakes", "successes")
LOW_DISK_BYTES = 1024**3
"""Free space below this *and* below `LOW_DISK_FRACTION` of the disk makes a project
`degraded` (a big disk at 1.5 % free still has room; a small one with 900 MiB is fine)."""
LOW_DISK_FRACTION = 0.02

TASK_STATUSES: tuple[str, ...] = ("pending", "active", "completed", "failed")
QUEUE_ORDER: tuple[str, ...] = (
    "pending",
    "in-progress",
    "review",
    "completed",
    "failed",
    "dead-letter",
)
QUEUE_STATUS: Mapping[str, str] = {
    "pending": "pending",
    "in-progress": "active",
    "review": "active",
    "completed": "completed",
    "failed": "failed",
    "dead-letter": "failed",
}
"""Queue file stem -> the status of every task in it."""
STATUS_WORDS: Mapping[str, str] = {
    "pending": "pending",
    "queued": "pending",
    "todo": "pending",
    "backlog": "pending",
    "new": "pending",
    "active": "active",
    "in_progress": "active",
    "in-progress": "active",
    "inprogress": "active",
    "running": "active",
    "claimed": "active",
    "review": "active",
    "completed": "completed",
    "complete": "completed",
    "done": "completed",
    "success": "completed",
    "succeeded": "completed",
    "failed": "failed",
    "failure": "failed",
    "error": "failed",
    "dead-letter": "failed",
    "dead_letter": "failed",
    "cancelled": "failed",
    "canceled": "failed",
}
"""A task's own status word (lower case) -> lokid's; unknown words count as `pending`."""
PRD_FILES: tuple[str, ...] = ("PRD.md", "prd.md", "docs/PRD.md", "docs/prd.md", ".loki/prd.md")
LIVE_FILES: tuple[str, ...] = (
    "events.jsonl",
    "autonomy-state.json",
    "dashboard-state.json",
    "session.json",
    "loki.pid",
    "state/orchestrator.json",
    "queue/pending.json",
    "queue/in-progress.json",
    "queue/completed.json",
    "queue/failed.json",
    "queue/current-task.json",
)
"""Files under `.loki/` whose newest mtime is a project's last activity."""

YIELD_EVERY = 32
"""Folders listed (projects read, lines parsed: see the callers) between two `yield_cpu()`."""

_scandir = os.scandir  # tests replace it to simulate a folder vanishing or refusing
_stat = os.stat  # tests replace it to simulate a refusal (root is never refused by chmod)

GONE_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR})
"""Errors that say a path is not there. Any other error (`EACCES`, `EPERM`, `ELOOP`, `EIO`)
says it may be there but cannot be read: the folder is *unreadable*, not missing."""


def yield_cpu() -> None:
    """Release the GIL and the CPU for a moment, so the trio thread runs at once if it waits.

    These functions are Python code in a worker thread. When the daemon has one
    CPU (pinned, or a small container), the trio thread that wakes up for a
    request needs both the CPU and the GIL, and without this waits up to the
    interpreter's switch interval (5 ms) for them while a long walk runs.
    `os.sched_yield()` releases the GIL around the syscall and lets a runnable
    thread take the CPU: measured on the peerbench tree pinned to one CPU, the
    loop's wake-up lag during a discovery went from p99 3.9 ms to 0.45 ms for
    about 3 % of the walk's time (`time.sleep(0)` costs ~35 %).
    """
    os.sched_yield()


def forbidden_character(text: str) -> str | None:
    """The first character of `text` an entry's name may not hold, else None.

    The rule of token names (`lokid.textrules`: one rule for the names lokid shows):
    control and format characters (bidirectional controls, zero-width characters),
    line and paragraph separators, which would let a name rewrite a terminal (`loki
    registry ls`), split a log line or reorder what is shown around it.
    """
    return textrules.forbidden_character(text)


def folder_label(name: str) -> str:
    """A folder's name as a project's name: each character `forbidden_character` refuses
    replaced by U+FFFD (a folder may be called anything; its path keeps the real name)."""
    if forbidden_character(name) is None:
        return name
    return "".join("\ufffd" if forbidden_character(char) else char for char in name)


def not_utf8(path: str, what: str) -> Problem:
    """The problem of a path that is not valid UTF-8 (`undecodable`): reported, never used."""
    return Problem(
        path,
        "not_utf8",
        f"{what} is not valid UTF-8: lokid cannot name it in JSON or store it (rename it)",
    )


def registry_id(realpath: str) -> str:
    """`reg-` + the first 12 hex digits of sha256 of the real path (DESIGN.md §4 and §7)."""
    return "reg-" + hashlib.sha256(realpath.encode("utf-8", "surrogateescape")).hexdigest()[:12]


# -- problems ---------------------------------------------------------------------------


@attrs.frozen
class Problem:
    """One thing that went wrong with one path; `kind` is a stable word for programs.

    Kinds: `permission_denied`, `vanished` (it existed a moment ago),
    `missing`, `not_a_folder`, `symlink_loop`, `malformed` (a file's
    content), `too_large`, `limit` (a bound was hit), `not_utf8` (a name that
    is not UTF-8: `undecodable`), `os_error`. `path` and `message` are kept
    `shown`, so any problem can go into a JSON answer as it is.
    """

    path: str = attrs.field(converter=shown)
    kind: str
    message: str = attrs.field(converter=shown)

    def to_json(self) -> dict[str, str]:
        return {"path": self.path, "kind": self.kind, "message": self.message}


_KIND_BY_ERRNO = {
    errno.EACCES: "permission_denied",
    errno.EPERM: "permission_denied",
    errno.ENOENT: "vanished",
    errno.ENOTDIR: "not_a_folder",
    errno.ELOOP: "symlink_loop",
}


def problem_from(path: str, exc: OSError, *, missing: str = "vanished") -> Problem:
    kind = _KIND_BY_ERRNO.get(exc.errno or 0, "os_error")
    if kind == "vanished":
        kind = missing
    return Problem(path, kind, exc.strerror or type(exc).__name__)


class Problems:
    """A bounded list of problems: the first `limit` are kept, the rest counted."""

    def __init__(self, limit: int = MAX_PROBLEMS) -> None:
        self.limit = limit
        self.items: list[Problem] = []
        self.omitted = 0

    def add(self, problem: Problem) -> None:
        if len(self.items) < self.limit:
            self.items.append(problem)
        else:
            self.omitted += 1

    def extend(self, problems: Iterable[Problem]) -> None:
        for problem in problems:
            self.add(problem)

    def to_json(self) -> list[dict[str, str]]:
        return [p.to_json() for p in self.items]


# -- discovery --------------------------------------------------------------------------


@attrs.frozen
class Found:
    """A folder holding `.loki/`: a Loki project."""

    id: str
    path: str
    name: str
    has_state: bool
    has_queue: bool
    has_prd: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "path": self.path,
            "name": self.name,
            "has_state": self.has_state,
            "has_queue": self.has_queue,
            "has_prd": self.has_prd,
        }


@attrs.frozen
class RootReport:
    """What became of one root: `ok` (walked), `missing`, `not_a_folder`, `duplicate`,
    `skipped` (a bound stopped the discovery first) or `error` (it could not be examined,
    or its own listing failed: its problem is in the discovery's `errors`)."""

    given: str = attrs.field(converter=shown)
    path: str = attrs.field(converter=shown)
    status: str
    folders: int = 0
    projects: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "given": self.given,
            "path": self.path,
            "status": self.status,
            "folders": self.folders,
            "projects": self.projects,
        }


@attrs.frozen
class Discovery:
    projects: tuple[Found, ...]
    roots: tuple[RootReport, ...]
    errors: tuple[Problem, ...]
    errors_omitted: int
    folders: int
    depth: int
    truncated: bool
    truncated_reason: str | None
    seconds: float


class _Walk:
    """The shared state of one discovery: results, counters and the bounds."""

    def __init__(self, max_results: int, max_folders: int, deadline: float) -> None:
        self.found: list[Found] = []
        self.seen: set[str] = set()
        self.problems = Problems()
        self.folders = 0
        self.max_results = max_results
        self.max_folders = max_folders
        self.deadline = deadline
        self.stop_reason: str | None = None


def expand_root(root: str) -> str:
    """`~` expanded; the path made absolute and normalised (not resolved).

    A `~user` naming no user (or `~` without a home) is left as given: never resolved
    against the daemon's working folder (`unexpanded` says so; callers report it)."""
    expanded = os.path.expanduser(root)
    if unexpanded(expanded):
        return expanded
    return os.path.normpath(os.path.abspath(expanded))


def unexpanded(path: str) -> str | None:
    """The `~` or `~user` prefix `os.path.expanduser` could not expand in `path`, else None."""
    if not path.startswith("~"):
        return None
    return path.split("/", 1)[0]


def _no_user(shown: str) -> Problem:
    prefix = unexpanded(shown) or "~"
    who = f"no user {prefix[1:]!r}" if len(prefix) > 1 else "no home folder"
    return Problem(shown, "missing", f"{who} to expand {prefix}")


def discover(
    roots: Sequence[str],
    depth: int = DEFAULT_DEPTH,
    *,
    explicit: bool = True,
    max_results: int = MAX_DISCOVER_RESULTS,
    max_folders: int = MAX_DISCOVER_FOLDERS,
    seconds: float = DISCOVER_SECONDS,
) -> Discovery:
    """Loki projects under `roots` (module rules), at most `depth` (1-10) folders down.

    `explicit`: the caller named the roots, so one that is missing is an
    error; the default roots (`explicit=False`) are only reported as
    `missing` in `roots`. Roots are walked in the order given; a root that
    resolves to one already walked is `duplicate`. Projects are sorted by
    path within each root.
    """
    if not MIN_DEPTH <= depth <= MAX_DEPTH:
        raise ValueError(f"depth must be {MIN_DEPTH}-{MAX_DEPTH}, got {depth}")
    started = time.monotonic()
    walk = _Walk(max_results, max_folders, started + seconds)
    reports: list[RootReport] = []
    walked: set[str] = set()
    for given in roots:
        shown = expand_root(given)
        if unexpanded(shown):
            reports.append(RootReport(given, shown, "missing"))
            if explicit:
                walk.problems.add(_no_user(shown))
            continue
        try:
            real = os.path.realpath(shown, strict=True)
            info = os.stat(real)
        except OSError as exc:
            problem = problem_from(shown, exc, missing="missing")
            status = problem.kind if problem.kind in ("missing", "not_a_folder") else "error"
            reports.append(RootReport(given, shown, status))
            if explicit or status == "error":
                walk.problems.add(problem)
            continue
        if not stat.S_ISDIR(info.st_mode):
            reports.append(RootReport(given, real, "not_a_folder"))
            if explicit:
                walk.problems.add(Problem(real, "not_a_folder", "not a folder"))
            continue
        if real in walked:
            reports.append(RootReport(given, real, "duplicate"))
            continue
        if undecodable(real):  # nothing below it could be registered
            reports.append(RootReport(given, real, "error"))
            walk.problems.add(not_utf8(real, "the root's real path"))
            continue
        walked.add(real)
        if walk.stop_reason is not None:
            reports.append(RootReport(given, real, "skipped"))
            continue
        before_folders, before_found = walk.folders, len(walk.found)
        listed = _walk_root(real, depth, walk)
        walk.found[before_found:] = sorted(walk.found[before_found:], key=lambda f: f.path)
        reports.append(
            RootReport(
                given,
                real,
                "ok" if listed else "error",
                walk.folders - before_folders,
                len(walk.found) - before_found,
            )
        )
    if walk.stop_reason is not None:
        walk.problems.add(Problem("", "limit", walk.stop_reason))
    return Discovery(
        projects=tuple(walk.found),
        roots=tuple(reports),
        errors=tuple(walk.problems.items),
        errors_omitted=walk.problems.omitted,
        folders=walk.folders,
        depth=depth,
        truncated=walk.stop_reason is not None,
        truncated_reason=walk.stop_reason,
        seconds=time.monotonic() - started,
    )


def _walk_root(root: str, depth: int, walk: _Walk) -> bool:
    """Depth-first over one real root; the hot loop of discovery (keep it lean). Whether
    the root itself could be listed (a root that cannot be is no `ok` root).

    Per folder: one `scandir`, and per entry only what `readdir` already
    told (`d_type`): no `stat`, no `realpath`. Children are collected and
    pushed only after the listing, because a `.loki` entry may come last.
    """
    scandir = _scandir
    stack: list[tuple[str, int]] = [(root, 0)]
    check_every = 1024
    while stack:
        path, level = stack.pop()
        deeper = level < depth
        children: list[str] = []
        project = False
        try:
            with scandir(path) as entries:
                for entry in entries:
                    name = entry.name
                    if name[0] == ".":
                        if name == ".loki" and _is_loki_folder(entry, walk):
                            project = True
                        continue
                    if deeper and entry.is_dir(follow_symlinks=False):
                        children.append(entry.path)
        except OSError as exc:
            walk.problems.add(problem_from(path, exc))
            if not level:
                return False
            continue
        walk.folders += 1
        if not walk.folders % YIELD_EVERY:
            yield_cpu()
        if project:
            if undecodable(path):
                walk.problems.add(not_utf8(path, "the project folder's path"))
            elif path not in walk.seen:
                walk.seen.add(path)
                walk.found.append(_found(path))
                if len(walk.found) >= walk.max_results:
                    walk.stop_reason = (
                        f"stopped at {walk.max_results} projects (the most one discovery reports)"
                    )
                    return True
            continue
        if children:
            level += 1
            stack.extend((child, level) for child in reversed(children))
        if walk.folders % check_every == 0:
            if walk.folders >= walk.max_folders:
                walk.stop_reason = f"stopped after listing {walk.max_folders} folders"
                return True
            if time.monotonic() > walk.deadline:
                walk.stop_reason = "stopped at the time limit of one discovery"
                return True
    if walk.folders >= walk.max_folders:
        walk.stop_reason = f"stopped after listing {walk.max_folders} folders"
    return True


def _is_loki_folder(entry: os.DirEntry[str], walk: _Walk) -> bool:
    """`.loki` is a folder, or a symbolic link to one (followed for this check only)."""
    try:
        if entry.is_dir(follow_symlinks=False):
            return True
        return entry.is_symlink() and entry.is_dir(follow_symlinks=True)
    except OSError as exc:
        walk.problems.add(problem_from(entry.path, exc))
        return False


def _exists(path: str) -> bool:
    try:
        os.stat(path)
    except (OSError, ValueError):
        return False
    return True


def _found(path: str) -> Found:
    loki = path + "/.loki"
    return Found(
        id=registry_id(path),
        path=path,
        name=folder_label(os.path.basename(path) or path),
        has_state=_exists(loki + "/state") or _exists(loki + "/autonomy-state.json"),
        has_queue=_exists(loki + "/queue"),
        has_prd=any(_exists(path + "/" + name) for name in PRD_FILES),
    )


# -- the cache --------------------------------------------------------------------------


@attrs.frozen
class Stamp:
    """What identifies one version of a file (or folder) without reading it."""

    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> Stamp:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def racy(self, read_ns: int) -> bool:
        """Changed so close to `read_ns` that a later change might keep the same stamp."""
        return max(self.mtime_ns, self.ctime_ns) >= read_ns - int(RACY_SECONDS * 1e9)


@attrs.define
class _Cached(Generic[T]):
    stamp: Stamp
    racy: bool
    digest: bytes | None  # of the bytes read (files); None for folder listings
    value: T
    weight: int


@attrs.frozen
class CacheStatistics:
    entries: int
    weight: int
    max_entries: int
    max_weight: int
    hits: int
    misses: int
    revalidated: int
    evictions: int


class FileCache:
    """Parsed files (and folder listings) by path and stamp; bounded; thread-safe.

    Bound: at most `max_entries` entries and `max_weight` in all (a file's
    weight is its task or line count). Policy when full: evict the least
    recently used entries. One lock guards the dictionary; parsing happens
    outside it, so worker threads only serialise on dictionary updates.
    """

    def __init__(self, max_entries: int = CACHE_FILES, max_weight: int = CACHE_WEIGHT) -> None:
        self.max_entries = max_entries
        self.max_weight = max_weight
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, _Cached[Any]] = OrderedDict()
        self._weight = 0
        self.hits = 0
        self.misses = 0
        self.revalidated = 0
        self.evictions = 0

    def lookup(self, key: str, stamp: Stamp) -> _Cached[Any] | None:
        """The entry stored under `key` with exactly this stamp (racy or not), else None."""
        with self._lock:
            found = self._entries.get(key)
            if found is None or found.stamp != stamp:
                return None
            self._entries.move_to_end(key)
            return found

    def store(self, key: str, entry: _Cached[Any]) -> None:
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._weight -= old.weight
            if entry.weight > self.max_weight:
                return
            self._entries[key] = entry
            self._weight += entry.weight
            while len(self._entries) > self.max_entries or self._weight > self.max_weight:
                _, evicted = self._entries.popitem(last=False)
                self._weight -= evicted.weight
                self.evictions += 1

    def revalidate(self, key: str, digest: bytes, stamp: Stamp, racy: bool) -> Any | None:
        """The value stored under `key` if it was parsed from bytes with this `digest`
        (the file was re-read and found unchanged, or rewritten with the same bytes);
        its stamp is brought up to date. None otherwise."""
        with self._lock:
            found = self._entries.get(key)
            if found is None or found.digest != digest:
                return None
            found.stamp = stamp
            found.racy = racy
            self._entries.move_to_end(key)
            self.revalidated += 1
            return found.value

    def forget(self, prefix: str) -> None:
        """Drop every entry under `prefix` (an unregistered project)."""
        with self._lock:
            for key in [k for k in self._entries if k.startswith(prefix)]:
                self._weight -= self._entries.pop(key).weight

    def count(self, *, hit: bool = False, miss: bool = False, revalidated: bool = False) -> None:
        with self._lock:
            self.hits += hit
            self.misses += miss
            self.revalidated += revalidated

    def statistics(self) -> CacheStatistics:
        with self._lock:
            return CacheStatistics(
                entries=len(self._entries),
                weight=self._weight,
                max_entries=self.max_entries,
                max_weight=self.max_weight,
                hits=self.hits,
                misses=self.misses,
                revalidated=self.revalidated,
                evictions=self.evictions,
            )


def _cached_file(
    path: str,
    cache: FileCache | None,
    now_ns: int,
    parse: Callable[[bytes, str], tuple[T, int]],
    *,
    limit: int = MAX_LOKI_FILE_BYTES,
) -> T | None:
    """`parse(bytes, path) -> (value, weight)` of the file at `path`, from the cache when its
    stamp says so (module rules); None when the file does not exist. Raises
    `LokiDirFormatError` when it cannot be read (the caller reports it).

    `now_ns` must be taken before any of the reads it covers (then a change made
    after it always looks racy)."""
    seen: Stamp | None = None
    if cache is not None:
        try:
            seen = Stamp.of(os.lstat(path))
        except FileNotFoundError:
            return None
        except OSError:
            seen = None  # read_file says why
        if seen is not None:
            hit = cache.lookup(path, seen)
            if hit is not None and not hit.racy:
                cache.count(hit=True)
                value: T = hit.value
                return value
    content = read_file(Path(path), limit=limit, follow_symlinks=False)
    if content is None:
        return None
    if cache is None:
        return parse(content.data, path)[0]
    read = content.stamp
    if seen is not None and (seen.device, seen.inode, seen.size, seen.mtime_ns) == (
        read.device,
        read.inode,
        read.size,
        read.mtime_ns,
    ):
        stamp = seen
    else:  # changed between the lstat and the open: a ctime of "now" keeps it racy
        stamp = Stamp(read.device, read.inode, read.size, read.mtime_ns, now_ns)
    digest = hashlib.blake2b(content.data, digest_size=16).digest()
    racy = stamp.racy(now_ns)
    same: T | None = cache.revalidate(path, digest, stamp, racy)
    if same is not None:
        return same
    parsed, weight = parse(content.data, path)
    cache.count(miss=True)
    cache.store(path, _Cached(stamp, racy, digest, parsed, weight))
    return parsed


def _cached_listing(path: str, cache: FileCache | None, now_ns: int) -> tuple[str, ...] | None:
    """The names of the `*.json` entries of folder `path` (sorted; hidden ones left out),
    cached by the folder's stamp; None when the folder does not exist. Raises `OSError`
    otherwise.

    Every such entry is listed, whatever it is: a folder, a FIFO or a link named
    `pending.json` is then refused by `read_file` and reported, not silently skipped."""
    key = path + "/"
    stamp: Stamp | None = None
    if cache is not None:
        try:
            stamp = Stamp.of(_stat(path))
        except FileNotFoundError:
            return None
        hit = cache.lookup(key, stamp)
        if hit is not None and not hit.racy:
            cache.count(hit=True)
            names: tuple[str, ...] = hit.value
            return names
    try:
        with _scandir(path) as entries:
            found = sorted(
                entry.name
                for entry in entries
                if entry.name.endswith(".json") and not entry.name.startswith(".")
            )
    except FileNotFoundError:
        return None
    listing = tuple(found)
    if cache is not None and stamp is not None:
        cache.count(miss=True)
        cache.store(key, _Cached(stamp, stamp.racy(now_ns), None, listing, 1))
    return listing


# -- tasks ------------------------------------------------------------------------------


@attrs.frozen
class FileTasks:
    """One queue file, parsed: its tasks (JSON-ready, shared: never mutate) and counts."""

    queue: str
    tasks: tuple[dict[str, Any], ...]
    counts: Mapping[str, int]
    problems: tuple[Problem, ...]


@attrs.frozen
class ProjectTasks:
    """Every queue file of one project. `exists`: the `.loki/queue` folder was there;
    `unreadable`: it could not be listed (permission denied, an I/O error): the counts
    are not known, not zero."""

    path: str
    exists: bool
    files: tuple[FileTasks, ...]
    problems: tuple[Problem, ...]
    unreadable: bool = False

    @property
    def counts(self) -> dict[str, int]:
        """Tasks by status, and `total`."""
        out = dict.fromkeys(TASK_STATUSES, 0)
        for file in self.files:
            for status, n in file.counts.items():
                out[status] += n
        out["total"] = sum(out[s] for s in TASK_STATUSES)
        return out

    def tasks(self, status: str | None = None) -> Iterator[dict[str, Any]]:
        for file in self.files:
            if status is None:
                yield from file.tasks
            elif file.counts.get(status):
                yield from (t for t in file.tasks if t["status"] == status)


def task_status(queue: str, word: str | None) -> str:
    """lokid's status of a task found in `queue` whose own status word is `word`."""
    fixed = QUEUE_STATUS.get(queue)
    if fixed is not None:
        return fixed
    return STATUS_WORDS.get((word or "pending").strip().lower(), "pending")


def _when(value: Any) -> str | None:
    return None if value is None else iso(value)


def _task_json(task: QueueTask, queue: str) -> dict[str, Any]:
    return {
        "id": task.id,
        "title": task.title,
        "description": task.description,
        "status": task_status(queue, task.status),
        "queue": queue,
        "priority": task.priority,
        "source": task.source,
        "type": task.type,
        "created_at": _when(task.created_at),
        "started_at": _when(task.started_at),
        "completed_at": _when(task.completed_at),
        "error": task.error,
    }


def _parse_queue(queue: str) -> Callable[[bytes, str], tuple[FileTasks, int]]:
    def parse(data: bytes, path: str) -> tuple[FileTasks, int]:
        problems: list[Problem] = []
        try:
            decoded = decode_queue(data)
        except LokiDirFormatError as exc:
            problems.append(Problem(path, _format_kind(exc.reason), exc.reason))
            return FileTasks(queue, (), {}, tuple(problems)), 1
        entries = decoded.tasks
        if len(entries) > MAX_TASKS_PER_FILE:
            problems.append(
                Problem(
                    path,
                    "limit",
                    f"{len(entries)} tasks; only the first {MAX_TASKS_PER_FILE} are read",
                )
            )
            entries = entries[:MAX_TASKS_PER_FILE]
        for warning in decoded.warnings[:MAX_PROBLEMS]:
            problems.append(Problem(path, "malformed", warning))
        tasks = tuple(_task_json(task, queue) for task in entries)
        counts: dict[str, int] = {}
        for task in tasks:
            counts[task["status"]] = counts.get(task["status"], 0) + 1
        return FileTasks(queue, tasks, counts, tuple(problems)), max(1, len(tasks))

    return parse


def _format_kind(reason: str) -> str:
    if "limit is" in reason or "more than" in reason:
        return "too_large"
    if reason.startswith("cannot open") or reason.startswith("cannot read"):
        return "permission_denied" if "ermission" in reason else "os_error"
    return "malformed"


def _queue_rank(name: str) -> tuple[int, str]:
    stem = name[: -len(".json")]
    try:
        return QUEUE_ORDER.index(stem), stem
    except ValueError:
        return len(QUEUE_ORDER), stem


def read_tasks(
    project: str, cache: FileCache | None = None, *, now_ns: int | None = None
) -> ProjectTasks:
    """The tasks of `<project>/.loki/queue/*.json` (module rules); never raises for the disk.

    A missing queue folder is no tasks (`exists=False`), not a problem; an
    unreadable or malformed file is a problem and contributes no task; a
    bad entry is a problem and is skipped.
    """
    now = time.time_ns() if now_ns is None else now_ns
    folder = project.rstrip("/") + "/.loki/queue"
    try:
        names = _cached_listing(folder, cache, now)
    except OSError as exc:
        refused = exc.errno not in GONE_ERRNOS
        return ProjectTasks(project, True, (), (problem_from(folder, exc),), unreadable=refused)
    if names is None:
        return ProjectTasks(project, False, (), ())
    problems: list[Problem] = []
    wanted = sorted((n for n in names if n != "current-task.json"), key=_queue_rank)
    if len(wanted) > MAX_QUEUE_FILES:
        problems.append(
            Problem(
                folder,
                "limit",
                f"{len(wanted)} queue files; only the first {MAX_QUEUE_FILES} are read",
            )
        )
        wanted = wanted[:MAX_QUEUE_FILES]
    files: list[FileTasks] = []
    for name in wanted:
        path = folder + "/" + name
        if undecodable(name):  # its queue name could not be answered
            problems.append(not_utf8(path, "the queue file's name"))
            continue
        queue = name[: -len(".json")]
        try:
            parsed = _cached_file(path, cache, now, _parse_queue(queue))
        except LokiDirFormatError as exc:
            problems.append(Problem(path, _format_kind(exc.reason), exc.reason))
            continue
        if parsed is None:  # removed since the listing: nothing to count
            continue
        files.append(parsed)
        problems.extend(parsed.problems)
    return ProjectTasks(project, True, tuple(files), tuple(problems))


@attrs.frozen
class ProjectRef:
    """What the aggregation needs to know about one registered project."""

    id: str
    name: str
    path: str


def aggregate_tasks(
    projects: Sequence[ProjectRef],
    *,
    status: str | None = None,
    limit: int = 100,
    offset: int = 0,
    cache: FileCache | None = None,
) -> dict[str, Any]:
    """Tasks of every project in `projects`, in that order, then queue order, then file order.

    `{"tasks": [...page...], "total": matching, "limit", "offset", "counts": by status,
    "projects": n, "errors": [...], "errors_omitted": n}`. Only the page is copied
    (with `project_id`, `project_name`, `project_path` added), so a warm call costs
    the stats plus the page.
    """
    now = time.time_ns()
    problems = Problems()
    page: list[dict[str, Any]] = []
    total = 0
    counts = dict.fromkeys(TASK_STATUSES, 0)
    end = offset + limit
    for number, ref in enumerate(projects, start=1):
        if not number % 8:
            yield_cpu()
        found = read_tasks(ref.path, cache, now_ns=now)
        problems.extend(found.problems)
        extra = {"project_id": ref.id, "project_name": ref.name, "project_path": ref.path}
        for file in found.files:
            for key, n in file.counts.items():
                counts[key] += n
            matching = file.counts.get(status, 0) if status is not None else len(file.tasks)
            if not matching:
                continue
            if total + matching <= offset or total >= end:
                total += matching
                continue
            for task in file.tasks:
                if status is not None and task["status"] != status:
                    continue
                if offset <= total < end:
                    page.append({**task, **extra})
                total += 1
    return {
        "tasks": page,
        "total": total,
        "limit": limit,
        "offset": offset,
        "counts": counts,
        "projects": len(projects),
        "errors": problems.to_json(),
        "errors_omitted": problems.omitted,
    }


# -- probing a registered project (sync) ----------------------------------------------------


@attrs.frozen
class Probe:
    """What a sync learns about one registered folder.

    `status`: `ok`; `missing` (the folder is gone or is not a folder); `unreadable`
    (the folder, its `.loki/` or `.loki/queue/` may be there but cannot be read, e.g.
    permission denied). For `missing` and `unreadable`, `has_loki` and `tasks` are not
    known: the caller keeps what it stored.
    """

    status: str  # ok | missing | unreadable
    has_loki: bool
    tasks: Mapping[str, int]
    problems: tuple[Problem, ...]


EMPTY_COUNTS: Mapping[str, int] = {**dict.fromkeys(TASK_STATUSES, 0), "total": 0}


@attrs.frozen
class _Examined:
    """What two `stat`s tell about a registered folder: shared by `probe` and `health`, so
    an entry's status and its health agree."""

    status: str  # ok | missing | unreadable
    has_loki: bool
    problem: Problem | None  # why it is not `ok`


def _examine(path: str) -> _Examined:
    """`missing` when the folder is gone or is not a folder; `unreadable` when it, or its
    `.loki`, cannot be examined (`GONE_ERRNOS`); else `ok`, and whether `.loki/` is there."""
    try:
        info = _stat(path)
    except OSError as exc:
        if exc.errno in GONE_ERRNOS:
            return _Examined("missing", False, Problem(path, "missing", exc.strerror or "gone"))
        return _Examined("unreadable", False, problem_from(path, exc))
    if not stat.S_ISDIR(info.st_mode):
        return _Examined("missing", False, Problem(path, "not_a_folder", "no folder"))
    loki = path.rstrip("/") + "/.loki"
    try:
        return _Examined("ok", stat.S_ISDIR(_stat(loki).st_mode), None)
    except OSError as exc:
        if exc.errno in GONE_ERRNOS:
            return _Examined("ok", False, None)
        return _Examined("unreadable", False, problem_from(loki, exc))


def probe(path: str, cache: FileCache | None = None, *, now_ns: int | None = None) -> Probe:
    """Is the folder there, does it hold `.loki/`, how many tasks by status (`Probe`)."""
    seen = _examine(path)
    problems: tuple[Problem, ...] = ()
    if seen.problem is not None and seen.problem.kind != "missing":  # the status says it
        problems = (seen.problem,)
    if seen.status != "ok" or not seen.has_loki:
        return Probe(seen.status, seen.has_loki, EMPTY_COUNTS, problems)
    found = read_tasks(path, cache, now_ns=now_ns)
    if found.unreadable:
        return Probe("unreadable", True, EMPTY_COUNTS, found.problems)
    return Probe("ok", True, found.counts, found.problems)


def probe_many(paths: Sequence[str], cache: FileCache | None = None) -> list[Probe]:
    now = time.time_ns()
    out = []
    for number, path in enumerate(paths, start=1):
        if not number % 8:
            yield_cpu()
        out.append(probe(path, cache, now_ns=now))
    return out


# -- health -----------------------------------------------------------------------------


@attrs.frozen
class Health:
    """`GET /api/registry/projects/{id}/health`: an overall status and each check."""

    status: str  # healthy | degraded | missing | unreadable
    checks: Mapping[str, Mapping[str, Any]]
    problems: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "checks": {k: dict(v) for k, v in self.checks.items()},
            "problems": list(self.problems),
        }


def _boot_time() -> float | None:
    try:
        with open("/proc/stat") as handle:
            for line in handle:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except OSError:
        return None
    return None


def _pid_alive(pid: int, written: float | None) -> tuple[bool, str]:
    """Is `pid` a live process that could have written a pid file at time `written`?

    A bare pid may have been reused: a process that started after the file
    was last written is not the one that wrote it.
    """
    if pid <= 0:
        return False, "not a process id"
    ticks = start_ticks(pid)
    if ticks is None:
        return False, "no such process"
    if is_zombie(pid):
        return False, "the process has exited (zombie)"
    boot = _boot_time()
    if boot is not None and written is not None:
        started = boot + ticks / os.sysconf("SC_CLK_TCK")
        if started > written + 2.0:
            return False, "the pid now belongs to a process started after the file was written"
    return True, "running"


def health(path: str, *, now: float | None = None) -> Health:
    """The checks of DESIGN.md §7 for one registered folder; never raises for the disk.

    * `path` - the folder exists (else the overall status is `missing`) and can be
      examined (else `unreadable`);
    * `loki_dir` - `.loki/` is there and can be listed;
    * `queue` - `.loki/queue/` can be listed when it is there (absent is fine);
    * `state_files` - `state/orchestrator.json` and `autonomy-state.json`
      parse when present (absent is fine: nothing ran yet);
    * `session` - an active session: the pid in `.loki/loki.pid` (or in a
      running `autonomy-state.json`) is a live process that is not a reused
      pid (informational; a stale pid file is reported, not degrading);
    * `activity` - the newest mtime among the `.loki/` files a run writes;
    * `disk` - free space on the folder's file system (below 1 GiB and
      below 2 % of it: degraded).

    `unreadable` when the folder, `.loki` or `.loki/queue/` cannot be read (the rule
    of `probe`, so an entry's status and its health agree); else `healthy` when every
    check but `session` and `activity` passes, else `degraded`.
    """
    moment = time.time() if now is None else now
    checks: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    seen = _examine(path)
    loki = path.rstrip("/") + "/.loki"
    if seen.problem is not None and seen.problem.path != loki:
        why = seen.problem.message
        checks["path"] = {"ok": False, "path": path, "kind": seen.problem.kind, "detail": why}
        return Health(seen.status, checks, (f"{path}: {why}",))
    checks["path"] = {"ok": True, "path": path}
    checks["loki_dir"] = _loki_dir_check(loki, seen.problem)
    if not checks["loki_dir"]["ok"]:
        problems.append(f".loki: {checks['loki_dir']['detail']}")
    refused = seen.status == "unreadable"
    if seen.has_loki:
        checks["queue"], queue_refused = _queue_check(loki)
        refused = refused or queue_refused
        if not checks["queue"]["ok"]:
            problems.append(f".loki/queue: {checks['queue']['detail']}")
    else:
        checks["queue"] = {"ok": True, "present": False}
    has_loki = bool(checks["loki_dir"]["ok"])
    checks["state_files"] = _state_check(loki) if has_loki else {"ok": False, "files": {}}
    if has_loki and not checks["state_files"]["ok"]:
        problems.extend(
            f"{name}: {detail}"
            for name, detail in checks["state_files"]["files"].items()
            if detail not in ("ok", "absent")
        )
    checks["session"] = _session_check(loki) if has_loki else {"ok": True, "active": False}
    checks["activity"] = _activity_check(loki, moment) if has_loki else {"ok": True}
    checks["disk"] = _disk_check(path)
    if not checks["disk"]["ok"]:
        problems.append(str(checks["disk"].get("detail", "low disk space")))
    if refused:
        return Health("unreadable", checks, tuple(problems))
    required = ("path", "loki_dir", "queue", "state_files", "disk")
    status = "healthy" if all(checks[name]["ok"] for name in required) else "degraded"
    return Health(status, checks, tuple(problems))


def _loki_dir_check(loki: str, refused: Problem | None) -> dict[str, Any]:
    """`.loki/` is there and can be listed; `refused`: `_examine` could not even stat it."""
    if refused is not None:
        return {"ok": False, "kind": refused.kind, "detail": refused.message}
    try:
        with _scandir(loki) as entries:
            listed = sum(1 for _ in entries)
    except OSError as exc:
        problem = problem_from(loki, exc, missing="missing")
        return {"ok": False, "kind": problem.kind, "detail": problem.message}
    return {"ok": True, "entries": listed}


def _queue_check(loki: str) -> tuple[dict[str, Any], bool]:
    """`.loki/queue/` listed as `read_tasks` lists it, and whether it was refused (then the
    task counts cannot be known: the project is `unreadable`, as a sync says)."""
    folder = loki + "/queue"
    try:
        names = _cached_listing(folder, None, 0)
    except OSError as exc:
        problem = problem_from(folder, exc)
        check = {"ok": False, "kind": problem.kind, "detail": problem.message}
        return check, exc.errno not in GONE_ERRNOS
    if names is None:
        return {"ok": True, "present": False}, False
    return {"ok": True, "present": True, "files": len(names)}, False


def _state_check(loki: str) -> dict[str, Any]:
    files: dict[str, str] = {}
    ok = True
    for name, decode in (
        ("state/orchestrator.json", decode_orchestrator),
        ("autonomy-state.json", decode_autonomy_state),
    ):
        path = loki + "/" + name
        try:
            content = read_file(Path(path))
            if content is None:
                files[name] = "absent"
                continue
            decode(content.data)
            files[name] = "ok"
        except LokiDirFormatError as exc:
            files[name] = exc.reason
            ok = False
    return {"ok": ok, "files": files}


def _session_check(loki: str) -> dict[str, Any]:
    """The pid of the run in this `.loki/`, from `loki.pid`, else a running autonomy state."""
    candidates: list[tuple[str, int, float | None]] = []
    pid_file = loki + "/loki.pid"
    try:
        small = read_file(Path(pid_file), limit=4096)
        if small is not None:
            text = small.data.decode("ascii", "replace").strip()
            if text.isdigit():
                candidates.append(("loki.pid", int(text), small.stamp.mtime_ns / 1e9))
    except LokiDirFormatError:
        pass
    state_path = loki + "/autonomy-state.json"
    try:
        content = read_file(Path(state_path))
        if content is not None:
            state = decode_autonomy_state(content.data)
            if state.pid is not None and state.status == "running":
                candidates.append(("autonomy-state.json", state.pid, content.stamp.mtime_ns / 1e9))
    except (LokiDirFormatError, OSError):
        pass
    if not candidates:
        return {"ok": True, "active": False, "pid": None}
    stale: dict[str, Any] | None = None
    for source, pid, written in candidates:
        alive, detail = _pid_alive(pid, written)
        if alive:
            return {"ok": True, "active": True, "pid": pid, "source": source}
        stale = stale or {"pid": pid, "source": source, "detail": detail}
    assert stale is not None
    return {"ok": True, "active": False, "stale": stale}


def _activity_check(loki: str, now: float) -> dict[str, Any]:
    newest: float | None = None
    newest_file: str | None = None
    for name in LIVE_FILES:
        try:
            mtime = os.stat(loki + "/" + name).st_mtime
        except OSError:
            continue
        if newest is None or mtime > newest:
            newest, newest_file = mtime, name
    if newest is None:
        return {"ok": True, "last_activity": None, "age_seconds": None, "file": None}
    return {
        "ok": True,
        "last_activity": iso_from_epoch(newest),
        "age_seconds": round(max(0.0, now - newest), 3),
        "file": newest_file,
    }


def iso_from_epoch(seconds: float) -> str:
    return iso(dt.datetime.fromtimestamp(seconds, dt.UTC))


def _disk_check(path: str) -> dict[str, Any]:
    try:
        fs = os.statvfs(path)
    except OSError as exc:
        return {"ok": False, "detail": f"statvfs: {exc.strerror}"}
    free = fs.f_bavail * fs.f_frsize
    total = fs.f_blocks * fs.f_frsize
    fraction = free / total if total else 1.0
    ok = free >= LOW_DISK_BYTES or fraction >= LOW_DISK_FRACTION
    out: dict[str, Any] = {
        "ok": ok,
        "free_bytes": free,
        "total_bytes": total,
        "free_fraction": round(fraction, 4),
    }
    if not ok:
        out["detail"] = f"low disk space: {free} bytes free ({fraction:.1%})"
    return out


# -- learnings --------------------------------------------------------------------------


def learning_type(word: str) -> str | None:
    """`patterns`/`mistakes`/`successes` (the singular is accepted too); None if unknown."""
    word = word.strip().lower()
    if word in LEARNING_TYPES:
        return word
    plural = word + "es" if word == "success" else word + "s"
    return plural if plural in LEARNING_TYPES else None


@attrs.frozen
class LearningsFile:
    """One learnings file, parsed: its usable entries (as written, plus `type`), the
    moment of each (None: no `timestamp`), and the problems of the other lines."""

    entries: tuple[dict[str, Any], ...]
    times: tuple[dt.datetime | None, ...]
    problems: tuple[Problem, ...]


_NO_TIME = dt.datetime.min.replace(tzinfo=dt.UTC)
"""The sort key's moment of a learning without `timestamp` (those sort after the others)."""

LEARNING_TEXT_FIELDS = ("category", "project")
"""Optional fields of a learning that must be strings when present (`q` searches them)."""


class _BadLearning(Exception):
    """Why a line holding a `description` is no usable learning."""


def _learning_time(entry: Mapping[str, Any]) -> dt.datetime | None:
    """The learning's `timestamp` as an aware moment (a time without a zone is UTC), None
    when it has none; `_BadLearning` when it is not a string or not ISO 8601. The
    entries are sorted by it: a string compared as text would put "zzz" first."""
    value = entry.get("timestamp")
    if value is None:
        return None
    if not isinstance(value, str):
        raise _BadLearning(f"timestamp must be an ISO-8601 string, not {json_type_name(value)}")
    try:
        moment = dt.datetime.fromisoformat(value)
    except ValueError:
        raise _BadLearning(f"timestamp is not ISO 8601: {value[:40]!r}") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=dt.UTC)


def _check_learning(entry: Mapping[str, Any]) -> dt.datetime | None:
    """Check the documented shape (reference/runtime.md §3.7: `description`, `category`,
    `project` strings, `timestamp` ISO 8601; other keys are kept as written); the
    learning's moment. `_BadLearning` says what is wrong."""
    description = entry["description"]
    if not isinstance(description, str):
        raise _BadLearning(f"description must be a string, not {json_type_name(description)}")
    for key in LEARNING_TEXT_FIELDS:
        value = entry.get(key)
        if value is not None and not isinstance(value, str):
            raise _BadLearning(f"{key} must be a string, not {json_type_name(value)}")
    return _learning_time(entry)


def _parse_learnings(kind: str) -> Callable[[bytes, str], tuple[LearningsFile, int]]:
    def parse(data: bytes, path: str) -> tuple[LearningsFile, int]:
        problems: list[Problem] = []
        entries: list[dict[str, Any]] = []
        times: list[dt.datetime | None] = []
        start = 0
        if len(data) > MAX_LEARNINGS_BYTES:
            cut = len(data) - MAX_LEARNINGS_BYTES
            start = data.find(b"\n", cut) + 1 or len(data)
            problems.append(
                Problem(path, "limit", f"{len(data)} bytes; only the last lines were read")
            )
        for number, line in enumerate(data[start:].split(b"\n"), start=1):
            if not number % 256:
                yield_cpu()
            if not line.strip():
                continue
            if len(line) > MAX_LEARNING_LINE:
                problems.append(Problem(path, "too_large", f"line {number}: {len(line)} bytes"))
                continue
            try:
                text = line.decode("utf-8")
                value = loads_bounded(text)
            except (UnicodeDecodeError, ValueError) as exc:  # UnusableJson: too deep, ...
                reason = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
                problems.append(Problem(path, "malformed", f"line {number}: {reason}"))
                continue
            if not isinstance(value, dict):
                problems.append(Problem(path, "malformed", f"line {number}: not a JSON object"))
                continue
            if "description" not in value:  # the header line, or not a learning
                continue
            if may_hold_lone_surrogates(text):  # "\ud800": no answer can carry it
                value = without_lone_surrogates(value)
            try:
                times.append(_check_learning(value))
            except _BadLearning as exc:
                problems.append(Problem(path, "malformed", f"line {number}: {exc}"))
                continue
            entries.append({"type": kind, **value})
        learnings = LearningsFile(tuple(entries), tuple(times), tuple(problems))
        return learnings, max(1, len(entries))

    return parse


def read_learnings(
    loki_home: str,
    type: str | None = None,
    q: str | None = None,
    limit: int = 100,
    *,
    offset: int = 0,
    cache: FileCache | None = None,
) -> dict[str, Any]:
    """Learnings from `<loki_home>/learnings/{patterns,mistakes,successes}.jsonl`.

    Each line a JSON object; only objects with a `description` count (the
    first line is a header). Bad lines are reported, not fatal: a line that is
    no JSON object, or an entry whose `description`, `category` or `project`
    is not a string or whose `timestamp` is not an ISO-8601 string, is a
    problem with its line number and is not answered. `type` keeps one file;
    `q` keeps entries whose description, category or project contains it
    (case-insensitive). Newest first (by the moment of `timestamp`, a time
    without a zone taken as UTC; entries without one last; then by position
    in the file, later first). Bounds: `limit` 1-1000 entries answered;
    the last 16 MiB of a file are read; lines over 64 KiB are skipped.

    `{"learnings": [...], "total", "limit", "offset", "counts": by type,
    "errors": [...], "errors_omitted"}`.
    """
    folder = os.path.join(loki_home, "learnings")
    kinds = [type] if type is not None else list(LEARNING_TYPES)
    now = time.time_ns()
    problems = Problems()
    rows: list[tuple[tuple[bool, dt.datetime], int, dict[str, Any]]] = []
    counts = dict.fromkeys(kinds, 0)
    needle = q.strip().lower() if q else None
    for kind in kinds:
        path = os.path.join(folder, kind + ".jsonl")
        try:
            parsed = _cached_file(
                path,
                cache,
                now,
                _parse_learnings(kind),
                limit=MAX_LEARNINGS_BYTES * 4,
            )
        except LokiDirFormatError as exc:
            problems.add(Problem(path, _format_kind(exc.reason), exc.reason))
            continue
        if parsed is None:
            continue
        problems.extend(parsed.problems)
        for position, (entry, moment) in enumerate(zip(parsed.entries, parsed.times, strict=True)):
            if needle is not None and not _matches(entry, needle):
                continue
            counts[kind] += 1
            when = (True, moment) if moment is not None else (False, _NO_TIME)
            rows.append((when, position, entry))
    rows.sort(key=lambda row: (row[0], row[1]), reverse=True)
    return {
        "learnings": [entry for _, _, entry in rows[offset : offset + limit]],
        "total": len(rows),
        "limit": limit,
        "offset": offset,
        "counts": counts,
        "errors": problems.to_json(),
        "errors_omitted": problems.omitted,
    }


def _matches(entry: Mapping[str, Any], needle: str) -> bool:
    for key in ("description", "category", "project"):
        value = entry.get(key)
        if isinstance(value, str) and needle in value.lower():
            return True
    return False


# -- registering ------------------------------------------------------------------------


@attrs.frozen
class Candidate:
    """A folder about to be registered: its real path, or why it cannot be."""

    given: str
    path: str | None
    has_loki: bool
    problem: Problem | None


def resolve_folder(given: str) -> Candidate:
    """The real path of an existing folder (`~` expanded), or the problem with it."""
    shown = expand_root(given)
    if unexpanded(shown):
        return Candidate(given, None, False, _no_user(shown))
    try:
        real = os.path.realpath(shown, strict=True)
        info = os.stat(real)
    except OSError as exc:
        return Candidate(given, None, False, problem_from(shown, exc, missing="missing"))
    except ValueError as exc:  # NUL byte
        return Candidate(given, None, False, Problem(shown, "malformed", str(exc)))
    if not stat.S_ISDIR(info.st_mode):
        return Candidate(given, None, False, Problem(real, "not_a_folder", "not a folder"))
    if undecodable(real):  # e.g. a symbolic link to a folder whose name is not UTF-8
        return Candidate(given, None, False, not_utf8(real, "the folder's real path"))
    return Candidate(given, real, os.path.isdir(real.rstrip("/") + "/.loki"), None)
