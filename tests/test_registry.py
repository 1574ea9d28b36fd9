"""`lokid.registry`: discovery, tasks and their cache, health, learnings, on temp trees.

Permission errors: as root, `chmod 000` does not deny anything, so those
tests simulate the refusal by replacing the module's `scandir` (the same
`PermissionError` the kernel would raise); a real `chmod` test runs only
for other users. "A folder deleted mid-walk" is simulated the same way: the
replaced `scandir` deletes the folder just before it is listed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lokid import jsontypes, registry
from lokid.registry import FileCache, ProjectRef

IS_ROOT = os.geteuid() == 0


def project(path: Path, tasks: dict[str, Any] | None = None) -> Path:
    """A folder with `.loki/queue/<name>.json` for each of `tasks` (name -> JSON value)."""
    queue = path / ".loki" / "queue"
    queue.mkdir(parents=True)
    for name, value in (tasks or {}).items():
        (queue / f"{name}.json").write_text(json.dumps(value))
    return path


def task(id: str, status: str = "pending", **extra: Any) -> dict[str, Any]:
    return {"id": id, "title": f"task {id}", "status": status, **extra}


def found_paths(result: registry.Discovery) -> list[str]:
    return [f.path for f in result.projects]


def kinds(problems: Any) -> list[str]:
    return [p.kind if isinstance(p, registry.Problem) else p["kind"] for p in problems]


# -- discovery ------------------------------------------------------------------------


def test_registry_id_is_reg_and_12_hex_of_sha256_of_the_real_path() -> None:
    expected = "reg-" + hashlib.sha256(b"/home/u/alpha").hexdigest()[:12]
    assert registry.registry_id("/home/u/alpha") == expected


def test_discover_reports_projects_sorted_with_their_flags(tmp_path: Path) -> None:
    project(tmp_path / "b" / "beta", {"pending": [task("t1")]})
    alpha = project(tmp_path / "a" / "alpha")
    (alpha / "PRD.md").write_text("# PRD\n")
    (alpha / ".loki" / "state").mkdir()
    (tmp_path / "c" / "plain").mkdir(parents=True)  # no .loki: not a project
    result = registry.discover([str(tmp_path)], 3)
    real = os.path.realpath(tmp_path)
    assert found_paths(result) == [f"{real}/a/alpha", f"{real}/b/beta"]
    first = result.projects[0]
    assert first.id == registry.registry_id(first.path)
    assert (first.name, first.has_prd, first.has_state, first.has_queue) == (
        "alpha",
        True,
        True,
        True,
    )
    beta = result.projects[1]
    assert (beta.has_prd, beta.has_state) == (False, False)
    assert result.errors == () and not result.truncated
    [root] = result.roots
    assert (root.status, root.projects) == ("ok", 2)
    assert root.folders == result.folders == 7  # root, a, b, c, alpha, beta, plain


def test_discover_stops_at_a_project_and_skips_hidden_folders(tmp_path: Path) -> None:
    outer = project(tmp_path / "outer")
    project(outer / "inner")  # inside a project: not searched
    project(tmp_path / ".hidden" / "secret")  # under a hidden folder: skipped
    project(tmp_path / "ok" / ".dot")  # itself hidden: skipped
    result = registry.discover([str(tmp_path)], 5)
    assert [f.name for f in result.projects] == ["outer"]


def test_a_root_that_is_itself_a_project_is_reported(tmp_path: Path) -> None:
    root = project(tmp_path / "root")
    project(root / "child")
    result = registry.discover([str(root)], 3)
    assert found_paths(result) == [os.path.realpath(root)]


@pytest.mark.parametrize(
    ("depth", "expected"), [(1, ["d1"]), (2, ["d1", "d2"]), (3, ["d1", "d2", "d3"])]
)
def test_depth_counts_folders_below_the_root(
    tmp_path: Path, depth: int, expected: list[str]
) -> None:
    project(tmp_path / "d1")
    project(tmp_path / "x" / "d2")
    project(tmp_path / "x" / "y" / "d3")
    result = registry.discover([str(tmp_path)], depth)
    assert sorted(f.name for f in result.projects) == expected


def test_depth_outside_1_to_10_is_refused(tmp_path: Path) -> None:
    for depth in (0, 11):
        with pytest.raises(ValueError):
            registry.discover([str(tmp_path)], depth)


def test_symlinks_are_never_followed_and_a_loop_ends(tmp_path: Path) -> None:
    outside = project(tmp_path / "outside" / "elsewhere")
    root = tmp_path / "root"
    project(root / "real")
    (root / "link-to-outside").symlink_to(outside.parent)
    (root / "loop").symlink_to(root)  # root/loop/loop/loop/...
    (root / "a").symlink_to(root / "b")
    (root / "b").symlink_to(root / "a")  # a two-link loop
    result = registry.discover([str(root)], 10)
    assert [f.name for f in result.projects] == ["real"]
    assert result.errors == ()


def test_a_root_that_is_a_symlink_loop_is_an_error(tmp_path: Path) -> None:
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    project(tmp_path / "fine" / "p")
    result = registry.discover([str(loop), str(tmp_path / "fine")], 3)
    assert kinds(result.errors) == ["symlink_loop"]
    assert [r.status for r in result.roots] == ["error", "ok"]
    assert [f.name for f in result.projects] == ["p"]


def test_a_symlinked_root_is_resolved_and_a_duplicate_root_walked_once(tmp_path: Path) -> None:
    real = tmp_path / "real"
    project(real / "p")
    (tmp_path / "alias").symlink_to(real)
    result = registry.discover([str(tmp_path / "alias"), str(real)], 3)
    assert found_paths(result) == [f"{os.path.realpath(real)}/p"]
    assert [r.status for r in result.roots] == ["ok", "duplicate"]


def test_dot_loki_may_be_a_symlink_to_a_folder_and_a_broken_loop_is_reported(
    tmp_path: Path,
) -> None:
    store = tmp_path / "store"
    store.mkdir()
    (tmp_path / "root" / "linked").mkdir(parents=True)
    (tmp_path / "root" / "linked" / ".loki").symlink_to(store)
    looped = tmp_path / "root" / "looped"
    looped.mkdir()
    (looped / ".loki").symlink_to(looped / ".loki")
    result = registry.discover([str(tmp_path / "root")], 3)
    assert [f.name for f in result.projects] == ["linked"]
    assert kinds(result.errors) == ["symlink_loop"]
    assert result.errors[0].path.endswith("/looped/.loki")


def fake_scandir(
    action: Callable[[str], None],
) -> Callable[[str], Iterator[os.DirEntry[str]]]:
    real = os.scandir

    def scandir(path: str) -> Any:
        action(path)
        return real(path)

    return scandir


def test_permission_denied_is_reported_and_the_walk_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    locked = tmp_path / "locked"
    project(locked / "hidden-by-permissions")
    project(tmp_path / "open")
    if IS_ROOT:  # root reads through chmod 000: simulate the kernel's refusal

        def refuse(path: str) -> None:
            if path.endswith("/locked"):
                raise PermissionError(13, "Permission denied", path)

        monkeypatch.setattr(registry, "_scandir", fake_scandir(refuse))
    else:
        locked.chmod(0)
    try:
        result = registry.discover([str(tmp_path)], 3)
    finally:
        locked.chmod(0o755)
    assert [f.name for f in result.projects] == ["open"]
    assert kinds(result.errors) == ["permission_denied"]
    assert result.errors[0].path.endswith("/locked")


@pytest.mark.skipif(IS_ROOT, reason="root is not refused by chmod 000")
def test_permission_denied_for_real(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0)
    try:
        result = registry.discover([str(tmp_path)], 2)
    finally:
        locked.chmod(0o755)
    assert kinds(result.errors) == ["permission_denied"]


def test_a_root_that_cannot_be_listed_is_an_error_not_ok(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its `stat` succeeds but its listing is refused: `error` with the reason, as a root
    whose `stat` fails; the other roots are walked. (Simulated: `chmod 000` does not
    refuse root; the next test does it for real for other users.)"""
    denied = tmp_path / "denied"
    project(denied / "inside")
    project(tmp_path / "open" / "p")

    def refuse(path: str) -> None:
        if path.endswith("/denied"):
            raise PermissionError(errno.EACCES, "Permission denied", path)

    monkeypatch.setattr(registry, "_scandir", fake_scandir(refuse))
    result = registry.discover([str(denied), str(tmp_path / "open")], 2)
    assert [(r.status, r.folders, r.projects) for r in result.roots] == [
        ("error", 0, 0),
        ("ok", 2, 1),
    ]
    assert kinds(result.errors) == ["permission_denied"]
    assert [f.name for f in result.projects] == ["p"]


@pytest.mark.skipif(IS_ROOT, reason="root is not refused by chmod 000")
def test_a_root_that_cannot_be_listed_for_real(tmp_path: Path) -> None:
    denied = tmp_path / "denied"
    denied.mkdir()
    denied.chmod(0)
    try:
        result = registry.discover([str(denied)], 2)
    finally:
        denied.chmod(0o755)
    assert [r.status for r in result.roots] == ["error"]
    assert kinds(result.errors) == ["permission_denied"]


def test_a_root_that_is_a_file_or_a_fifo_is_not_a_folder(tmp_path: Path) -> None:
    """As root too: a file where a folder is expected fails the same way for everyone."""
    (tmp_path / "file").write_text("x")
    os.mkfifo(tmp_path / "fifo")
    result = registry.discover([str(tmp_path / "file"), str(tmp_path / "fifo")], 2)
    assert kinds(result.errors) == ["not_a_folder", "not_a_folder"]
    assert [r.status for r in result.roots] == ["not_a_folder", "not_a_folder"]


def test_a_folder_deleted_mid_walk_is_reported_as_vanished(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project(tmp_path / "doomed" / "p")
    project(tmp_path / "kept")

    def delete(path: str) -> None:
        if path.endswith("/doomed"):
            shutil.rmtree(path)  # gone between its parent's listing and its own

    monkeypatch.setattr(registry, "_scandir", fake_scandir(delete))
    result = registry.discover([str(tmp_path)], 3)
    assert [f.name for f in result.projects] == ["kept"]
    assert kinds(result.errors) == ["vanished"]


def test_missing_roots_are_errors_only_when_named(tmp_path: Path) -> None:
    gone = str(tmp_path / "nope")
    named = registry.discover([gone], 3)
    assert kinds(named.errors) == ["missing"]
    default = registry.discover([gone], 3, explicit=False)
    assert default.errors == ()
    assert default.roots[0].status == "missing"


def test_a_tilde_of_no_user_is_never_resolved_against_the_working_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project(tmp_path / "~nosuchuser-lokid" / "p")
    monkeypatch.chdir(tmp_path)
    result = registry.discover(["~nosuchuser-lokid"], 2)
    assert result.projects == ()
    assert [(r.status, r.path) for r in result.roots] == [("missing", "~nosuchuser-lokid")]
    assert [p.message for p in result.errors] == [
        "no user 'nosuchuser-lokid' to expand ~nosuchuser-lokid"
    ]
    assert registry.discover(["~nosuchuser-lokid"], 2, explicit=False).errors == ()
    resolved = registry.resolve_folder("~nosuchuser-lokid/p")
    assert resolved.path is None and resolved.problem is not None


def test_tilde_roots_are_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    project(tmp_path / "git" / "p")
    result = registry.discover(["~/git"], 2)
    assert found_paths(result) == [f"{os.path.realpath(tmp_path)}/git/p"]


def test_the_result_cap_and_the_folder_cap_truncate_and_say_so(tmp_path: Path) -> None:
    for i in range(5):
        project(tmp_path / f"p{i}")
    capped = registry.discover([str(tmp_path)], 2, max_results=2)
    assert len(capped.projects) == 2 and capped.truncated
    assert "2 projects" in (capped.truncated_reason or "")
    assert "limit" in kinds(capped.errors)
    folders = registry.discover([str(tmp_path)], 2, max_folders=1)
    assert folders.truncated and "folders" in (folders.truncated_reason or "")


def test_only_the_first_problems_are_listed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(registry.MAX_PROBLEMS + 7):
        (tmp_path / f"d{i:03d}").mkdir()

    def refuse(path: str) -> None:
        if os.path.basename(path).startswith("d"):
            raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(registry, "_scandir", fake_scandir(refuse))
    result = registry.discover([str(tmp_path)], 2)
    assert len(result.errors) == registry.MAX_PROBLEMS
    assert result.errors_omitted == 7


# -- tasks ------------------------------------------------------------------------------


def test_tasks_from_both_queue_forms_with_the_queue_deciding_the_status(
    tmp_path: Path,
) -> None:
    root = project(
        tmp_path / "p",
        {
            "pending": [task("a"), task("b", status="whatever")],
            "in-progress": {"tasks": [task("c", status="in_progress")], "version": 1},
            "completed": [task("d", status="completed")],
            "failed": [task("e", status="failed")],
            "dead-letter": [task("f")],
            "review": [task("g")],
            "custom": [task("h", status="done"), task("i", status="running"), task("j")],
            "current-task": task("c", status="in_progress"),
        },
    )
    found = registry.read_tasks(str(root))
    assert found.exists and found.problems == ()
    got = [(t["id"], t["status"], t["queue"]) for t in found.tasks()]
    assert got == [
        ("a", "pending", "pending"),
        ("b", "pending", "pending"),
        ("c", "active", "in-progress"),
        ("g", "active", "review"),
        ("d", "completed", "completed"),
        ("e", "failed", "failed"),
        ("f", "failed", "dead-letter"),
        ("h", "completed", "custom"),
        ("i", "active", "custom"),
        ("j", "pending", "custom"),
    ]
    assert found.counts == {"pending": 3, "active": 3, "completed": 2, "failed": 2, "total": 10}
    assert [t["id"] for t in found.tasks("failed")] == ["e", "f"]


def test_no_queue_folder_is_no_tasks_and_no_problem(tmp_path: Path) -> None:
    found = registry.read_tasks(str(tmp_path))
    assert (found.exists, found.files, found.problems) == (False, (), ())
    assert found.counts["total"] == 0


def test_malformed_files_and_entries_are_reported_never_raised(tmp_path: Path) -> None:
    root = project(tmp_path / "p", {"pending": [task("ok"), {"title": "no id"}, "text"]})
    queue = root / ".loki" / "queue"
    (queue / "failed.json").write_text("{not json")
    (queue / "completed.json").write_bytes(b"\x00\x01binary")
    (queue / "review.json").write_text("")
    (queue / "custom.json").write_text('{"tasks": 3}')
    os.mkfifo(queue / "in-progress.json")  # must not hang the reader
    (queue / "dead-letter.json").symlink_to(queue / "pending.json")
    found = registry.read_tasks(str(root))
    assert [t["id"] for t in found.tasks()] == ["ok"]
    by_file = {Path(p.path).name: p for p in found.problems}
    assert set(by_file) == {
        "pending.json",
        "failed.json",
        "completed.json",
        "review.json",
        "custom.json",
        "in-progress.json",
        "dead-letter.json",
    }
    assert "not valid JSON" in by_file["failed.json"].message
    assert "binary" in by_file["completed.json"].message
    assert "symbolic link" in by_file["dead-letter.json"].message
    assert "regular file" in by_file["in-progress.json"].message
    assert all(p.kind in ("malformed", "os_error") for p in found.problems)
    pending_problems = [p for p in found.problems if p.path.endswith("pending.json")]
    assert len(pending_problems) == 2  # the entry without id, the string entry


def test_a_queue_file_that_is_a_folder_is_reported_like_a_fifo(tmp_path: Path) -> None:
    """A folder named `pending.json` is no queue file: a problem, never silently skipped."""
    root = project(tmp_path / "p", {"completed": [task("c1", "completed")]})
    queue = root / ".loki" / "queue"
    (queue / "pending.json").mkdir()
    os.mkfifo(queue / "in-progress.json")
    (queue / ".hidden.json").mkdir()  # hidden: not a queue file at all
    cache = FileCache()
    for _ in range(2):  # cold, then from the cache
        found = registry.read_tasks(str(root), cache)
        assert [t["id"] for t in found.tasks()] == ["c1"]
        by_file = {Path(p.path).name: p.message for p in found.problems}
        assert by_file == {
            "pending.json": "is a folder",
            "in-progress.json": "is not a regular file",
        }
    checks = registry.health(str(root)).checks
    assert checks["queue"] == {"ok": True, "present": True, "files": 3}


def test_an_unreadable_queue_folder_is_a_problem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = project(tmp_path / "p", {"pending": [task("a")]})

    def refuse(path: str) -> None:
        if path.endswith("/queue"):
            raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(registry, "_scandir", fake_scandir(refuse))
    found = registry.read_tasks(str(root))
    assert kinds(found.problems) == ["permission_denied"]
    assert found.counts["total"] == 0


def write_queue(root: Path, tasks: list[dict[str, Any]], name: str = "pending") -> Path:
    path = root / ".loki" / "queue" / f"{name}.json"
    path.write_text(json.dumps(tasks))
    return path


def test_a_warm_read_is_served_from_the_cache(tmp_path: Path) -> None:
    root = project(tmp_path / "p", {"pending": [task("a")]})
    cache = FileCache()
    later = time.time_ns() + 10 * 10**9  # the files are old by then: not racy
    registry.read_tasks(str(root), cache, now_ns=later)
    misses = cache.statistics().misses
    for _ in range(3):
        found = registry.read_tasks(str(root), cache, now_ns=later)
        assert [t["id"] for t in found.tasks()] == ["a"]
    stats = cache.statistics()
    assert stats.misses == misses
    assert stats.hits == 6  # the folder listing and the file, three times


def test_a_same_size_rewrite_in_the_same_second_is_seen(tmp_path: Path) -> None:
    root = project(tmp_path / "p")
    path = write_queue(root, [task("aaaa")])
    cache = FileCache()
    assert [t["id"] for t in registry.read_tasks(str(root), cache).tasks()] == ["aaaa"]
    before = os.stat(path)
    with open(path, "r+b") as handle:  # in place: same inode, same size
        handle.write(json.dumps([task("bbbb")]).encode())
    after = os.stat(path)
    assert (after.st_ino, after.st_size) == (before.st_ino, before.st_size)
    assert int(after.st_mtime) - int(before.st_mtime) <= 1
    assert [t["id"] for t in registry.read_tasks(str(root), cache).tasks()] == ["bbbb"]


def test_an_unchanged_stamp_of_a_racy_file_is_checked_by_content(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A coarse-timestamp file system: the rewrite leaves every part of the stamp as it was.

    Simulated by giving the rewritten file its old mtime back and hiding ctime
    (which such a file system would not move either)."""
    real_of = registry.Stamp.of

    def coarse(st: os.stat_result) -> registry.Stamp:
        stamp = real_of(st)
        return registry.Stamp(stamp.device, stamp.inode, stamp.size, stamp.mtime_ns, 0)

    monkeypatch.setattr(registry.Stamp, "of", staticmethod(coarse))
    root = project(tmp_path / "p")
    path = write_queue(root, [task("aaaa")])
    cache = FileCache()
    assert [t["id"] for t in registry.read_tasks(str(root), cache).tasks()] == ["aaaa"]
    old = os.stat(path)
    with open(path, "r+b") as handle:
        handle.write(json.dumps([task("bbbb")]).encode())
    os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns))
    assert registry.Stamp.of(os.lstat(path)) == registry.Stamp.of(old)  # same stamp
    assert [t["id"] for t in registry.read_tasks(str(root), cache).tasks()] == ["bbbb"]


def test_a_replaced_file_is_seen(tmp_path: Path) -> None:
    root = project(tmp_path / "p")
    path = write_queue(root, [task("aaaa")])
    cache = FileCache()
    later = time.time_ns() + 10 * 10**9
    registry.read_tasks(str(root), cache, now_ns=later)
    fresh = path.with_name("new.tmp")
    fresh.write_text(json.dumps([task("bbbb")]))
    mtime = os.stat(path).st_mtime_ns
    os.utime(fresh, ns=(mtime, mtime))  # even with the old mtime: another inode
    os.replace(fresh, path)
    found = registry.read_tasks(str(root), cache, now_ns=later)
    assert [t["id"] for t in found.tasks()] == ["bbbb"]


def test_added_and_removed_queue_files_are_seen(tmp_path: Path) -> None:
    root = project(tmp_path / "p", {"pending": [task("a")]})
    cache = FileCache()
    registry.read_tasks(str(root), cache)
    write_queue(root, [task("b", status="failed")], "failed")
    assert [t["id"] for t in registry.read_tasks(str(root), cache).tasks()] == ["a", "b"]
    (root / ".loki" / "queue" / "pending.json").unlink()
    assert [t["id"] for t in registry.read_tasks(str(root), cache).tasks()] == ["b"]


def test_the_same_bytes_rewritten_are_not_parsed_again(tmp_path: Path) -> None:
    root = project(tmp_path / "p")
    path = write_queue(root, [task("a")])
    cache = FileCache()
    registry.read_tasks(str(root), cache)
    misses = cache.statistics().misses
    data = path.read_bytes()
    time.sleep(0.01)
    path.write_bytes(data)
    assert [t["id"] for t in registry.read_tasks(str(root), cache).tasks()] == ["a"]
    stats = cache.statistics()
    assert stats.revalidated >= 1
    assert stats.misses == misses + 1  # the folder listing only (its mtime is recent)


def test_the_cache_is_bounded_by_entries_and_weight(tmp_path: Path) -> None:
    cache = FileCache(max_entries=4, max_weight=30)
    roots = [project(tmp_path / f"p{i}", {"pending": [task(f"t{j}") for j in range(10)]})
             for i in range(4)]  # fmt: skip
    for root in roots:
        registry.read_tasks(str(root), cache)
    stats = cache.statistics()
    assert stats.entries <= 4 and stats.weight <= 30 and stats.evictions > 0


def test_aggregate_pages_filters_and_counts_across_projects(tmp_path: Path) -> None:
    a = project(tmp_path / "a", {"pending": [task("a1"), task("a2")], "failed": [task("a3")]})
    b = project(tmp_path / "b", {"pending": [task("b1")], "completed": [task("b2")]})
    (b / ".loki" / "queue" / "review.json").write_text("[")
    refs = [ProjectRef("reg-a", "A", str(a)), ProjectRef("reg-b", "B", str(b))]
    cache = FileCache()
    every = registry.aggregate_tasks(refs, cache=cache)
    assert [t["id"] for t in every["tasks"]] == ["a1", "a2", "a3", "b1", "b2"]
    assert every["total"] == 5 and every["projects"] == 2
    assert every["counts"] == {"pending": 3, "active": 0, "completed": 1, "failed": 1}
    first = every["tasks"][0]
    assert (first["project_id"], first["project_name"], first["project_path"]) == (
        "reg-a",
        "A",
        str(a),
    )
    assert kinds(every["errors"]) == ["malformed"]
    page = registry.aggregate_tasks(refs, limit=2, offset=2, cache=cache)
    assert [t["id"] for t in page["tasks"]] == ["a3", "b1"] and page["total"] == 5
    pending = registry.aggregate_tasks(refs, status="pending", limit=2, offset=1, cache=cache)
    assert [t["id"] for t in pending["tasks"]] == ["a2", "b1"] and pending["total"] == 3
    assert "project_id" not in registry.read_tasks(str(a), cache).files[0].tasks[0]  # shared


def test_a_project_folder_deleted_before_the_read_has_no_tasks(tmp_path: Path) -> None:
    a = project(tmp_path / "a", {"pending": [task("a1")]})
    cache = FileCache()
    refs = [ProjectRef("reg-a", "A", str(a))]
    assert registry.aggregate_tasks(refs, cache=cache)["total"] == 1
    shutil.rmtree(a)
    answer = registry.aggregate_tasks(refs, cache=cache)
    assert (answer["total"], answer["errors"]) == (0, [])


# -- probe, resolve -----------------------------------------------------------------------


def test_probe_reports_missing_plain_and_loki_folders(tmp_path: Path) -> None:
    assert registry.probe(str(tmp_path / "nope")).status == "missing"
    plain = registry.probe(str(tmp_path))
    assert (plain.status, plain.has_loki) == ("ok", False)
    root = project(tmp_path / "p", {"pending": [task("a"), task("b")]})
    found = registry.probe(str(root))
    assert (found.status, found.has_loki, found.tasks["pending"], found.tasks["total"]) == (
        "ok",
        True,
        2,
        2,
    )


@contextlib.contextmanager
def locked(monkeypatch: pytest.MonkeyPatch, folder: Path) -> Iterator[None]:
    """`folder` as if `chmod 000` for the daemon's user: it can be stat'ed, not listed, and
    nothing below it can be reached. Root is never refused, so as root the kernel's refusal
    is simulated through the module's `_stat` and `_scandir` (what the registry calls)."""
    if not IS_ROOT:
        folder.chmod(0)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    inside = str(folder) + "/"

    def refuse(path: Any, listing: bool) -> None:
        text = os.fspath(path)
        if text.startswith(inside) or (listing and text == str(folder)):
            raise PermissionError(errno.EACCES, "Permission denied", text)

    real_stat, real_scandir = registry._stat, registry._scandir

    def fake_stat(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        refuse(path, listing=False)
        return real_stat(path, *args, **kwargs)

    def fake_scandir(path: Any) -> Any:
        refuse(path, listing=True)
        return real_scandir(path)

    with monkeypatch.context() as patch:
        patch.setattr(registry, "_stat", fake_stat)
        patch.setattr(registry, "_scandir", fake_scandir)
        yield


@pytest.mark.parametrize("lock", ["parent", "folder", ".loki", ".loki/queue"])
def test_a_folder_the_daemon_may_not_read_is_unreadable_in_probe_and_health(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lock: str
) -> None:
    """Not `ok` with no `.loki` and zero tasks (the counts are not known), not `missing`
    (it may well be there): `unreadable`, with the reason; probe and health agree."""
    root = project(tmp_path / "parent" / "folder", {"pending": [task("a")]})
    target = {"parent": root.parent, "folder": root}.get(lock, root / lock)
    cache = FileCache()
    assert registry.probe(str(root), cache).status == "ok"  # warm: the cache must not answer
    with locked(monkeypatch, target):
        found = registry.probe(str(root), cache)
        report = registry.health(str(root))
    assert (found.status, found.tasks) == ("unreadable", registry.EMPTY_COUNTS)
    assert kinds(found.problems) == ["permission_denied"]
    assert report.status == "unreadable", report
    assert report.problems
    assert registry.probe(str(root), cache).status == "ok"
    assert registry.health(str(root)).status == "healthy"


def test_a_queue_that_is_a_file_is_not_unreadable(tmp_path: Path) -> None:
    """`ENOTDIR` says what is there: a broken project (`ok`, degraded), not a refusal."""
    root = tmp_path / "p"
    (root / ".loki").mkdir(parents=True)
    (root / ".loki" / "queue").write_text("x")
    found = registry.probe(str(root))
    assert (found.status, kinds(found.problems)) == ("ok", ["not_a_folder"])
    report = registry.health(str(root))
    assert report.status == "degraded" and report.checks["queue"]["kind"] == "not_a_folder"


def test_resolve_folder(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (tmp_path / "file").write_text("x")
    resolved = registry.resolve_folder(str(tmp_path / "link"))
    assert resolved.path == os.path.realpath(tmp_path / "real") and not resolved.has_loki
    assert registry.resolve_folder(str(tmp_path / "nope")).problem is not None
    missing = registry.resolve_folder(str(tmp_path / "nope")).problem
    assert missing is not None and missing.kind == "missing"
    not_dir = registry.resolve_folder(str(tmp_path / "file")).problem
    assert not_dir is not None and not_dir.kind == "not_a_folder"


# -- names that are not UTF-8 ------------------------------------------------------------


def bad_name(parent: Path, raw: bytes = b"bad\xffname") -> str:
    """A folder under `parent` whose name is the bytes `raw` (not UTF-8), as Python names it."""
    path = os.fsencode(parent) + b"/" + raw
    os.makedirs(path)
    return os.fsdecode(path)


def test_shown_escapes_lone_surrogates_and_keeps_valid_text() -> None:
    assert jsontypes.shown(os.fsdecode(b"/x/bad\xffname")) == "/x/bad\\xffname"
    assert jsontypes.shown("a\ud800b") == "a\\ud800b"
    assert jsontypes.shown("ünï cødé 🙂") == "ünï cødé 🙂"
    assert jsontypes.undecodable(os.fsdecode(b"\xfe")) and not jsontypes.undecodable("é")
    problem = registry.Problem(os.fsdecode(b"/p/\xfe"), "os_error", os.fsdecode(b"at \xfe"))
    assert problem.to_json() == {"path": "/p/\\xfe", "kind": "os_error", "message": "at \\xfe"}


def test_a_project_whose_path_is_not_utf8_is_reported_not_found(tmp_path: Path) -> None:
    project(tmp_path / "good")
    bad = bad_name(tmp_path)
    os.makedirs(os.fsencode(bad) + b"/.loki/queue")
    outer = bad_name(tmp_path, b"old\xfe")  # below a bad folder, the path is not UTF-8 either
    os.makedirs(os.fsencode(outer) + b"/sub/.loki")
    result = registry.discover([str(tmp_path)], 3)
    assert found_paths(result) == [str(tmp_path / "good")]
    assert kinds(result.errors) == ["not_utf8", "not_utf8"]
    assert sorted(p.path for p in result.errors) == [
        f"{tmp_path}/bad\\xffname",
        f"{tmp_path}/old\\xfe/sub",
    ]
    assert "not valid UTF-8" in result.errors[0].message
    answer = [p.to_json() for p in result.errors] + [r.to_json() for r in result.roots]
    json.dumps(answer, ensure_ascii=False).encode()  # what the HTTP answer does: no error


def test_a_root_whose_real_path_is_not_utf8_is_an_error(tmp_path: Path) -> None:
    bad = bad_name(tmp_path)
    os.makedirs(os.fsencode(bad) + b"/p/.loki")
    os.symlink(os.fsencode(bad), os.fsencode(tmp_path / "link"))
    result = registry.discover([str(tmp_path / "link")], 3)
    assert result.projects == ()
    assert [(r.status, r.path) for r in result.roots] == [("error", f"{tmp_path}/bad\\xffname")]
    assert kinds(result.errors) == ["not_utf8"]


def test_resolve_folder_refuses_a_real_path_that_is_not_utf8(tmp_path: Path) -> None:
    bad = bad_name(tmp_path)
    os.symlink(os.fsencode(bad), os.fsencode(tmp_path / "link"))
    resolved = registry.resolve_folder(str(tmp_path / "link"))
    assert resolved.path is None and resolved.problem is not None
    assert (resolved.problem.kind, resolved.problem.path) == (
        "not_utf8",
        f"{tmp_path}/bad\\xffname",
    )


def test_a_queue_file_whose_name_is_not_utf8_is_a_problem(tmp_path: Path) -> None:
    root = project(tmp_path / "p", {"pending": [task("a")]})
    queue = os.fsencode(root / ".loki" / "queue")
    with open(queue + b"/\xff.json", "w") as handle:
        json.dump([task("b")], handle)
    found = registry.read_tasks(str(root), FileCache())
    assert [t["id"] for t in found.tasks()] == ["a"]
    assert [(p.kind, p.path) for p in found.problems] == [
        ("not_utf8", f"{root}/.loki/queue/\\xff.json")
    ]
    assert registry.probe(str(root)).status == "ok"
    assert registry.health(str(root)).status == "healthy"


# -- health -----------------------------------------------------------------------------


def healthy_project(root: Path) -> Path:
    project(root, {"pending": [task("a")]})
    (root / ".loki" / "state").mkdir()
    (root / ".loki" / "state" / "orchestrator.json").write_text(
        json.dumps({"version": "1", "currentPhase": "BUILDING", "agents": {}, "metrics": {}})
    )
    (root / ".loki" / "autonomy-state.json").write_text(
        json.dumps({"status": "stopped", "iterationCount": 2})
    )
    return root


def test_health_of_a_good_project_is_healthy(tmp_path: Path) -> None:
    root = healthy_project(tmp_path / "p")
    report = registry.health(str(root))
    assert report.status == "healthy", report
    checks = report.checks
    assert checks["path"]["ok"] and checks["loki_dir"]["ok"]
    assert checks["state_files"]["files"] == {
        "state/orchestrator.json": "ok",
        "autonomy-state.json": "ok",
    }
    assert checks["session"]["active"] is False
    assert checks["activity"]["file"] in registry.LIVE_FILES
    assert checks["activity"]["age_seconds"] < 60
    assert checks["disk"]["free_bytes"] > 0
    json.dumps(report.to_json())  # plain data


def test_health_missing_no_loki_and_malformed_state(tmp_path: Path) -> None:
    assert registry.health(str(tmp_path / "nope")).status == "missing"
    plain = registry.health(str(tmp_path))
    assert plain.status == "degraded" and plain.checks["loki_dir"]["kind"] == "missing"
    root = healthy_project(tmp_path / "p")
    (root / ".loki" / "state" / "orchestrator.json").write_text("{oops")
    broken = registry.health(str(root))
    assert broken.status == "degraded"
    assert "not valid JSON" in broken.checks["state_files"]["files"]["state/orchestrator.json"]
    assert any("orchestrator" in p for p in broken.problems)


def test_health_sees_a_live_session_and_a_stale_pid_file(tmp_path: Path) -> None:
    root = healthy_project(tmp_path / "p")
    (root / ".loki" / "loki.pid").write_text(f"{os.getpid()}\n")
    live = registry.health(str(root)).checks["session"]
    assert (live["active"], live["pid"], live["source"]) == (True, os.getpid(), "loki.pid")
    (root / ".loki" / "loki.pid").write_text("999999999\n")  # beyond pid_max
    stale = registry.health(str(root))
    assert stale.checks["session"]["active"] is False
    assert stale.checks["session"]["stale"]["pid"] == 999999999
    assert stale.status == "healthy"  # informational


def test_a_pid_reused_after_the_file_was_written_is_not_the_session(tmp_path: Path) -> None:
    root = healthy_project(tmp_path / "p")
    pid_file = root / ".loki" / "loki.pid"
    pid_file.write_text(f"{os.getpid()}\n")
    os.utime(pid_file, (1_000_000, 1_000_000))  # written in 1970: before we started
    session = registry.health(str(root)).checks["session"]
    assert session["active"] is False
    assert "started after" in session["stale"]["detail"]


def test_low_disk_space_degrades(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = healthy_project(tmp_path / "p")
    real = os.statvfs(root)

    class Full:
        f_bavail = 1
        f_frsize = real.f_frsize
        f_blocks = real.f_blocks

    monkeypatch.setattr(os, "statvfs", lambda path: Full())
    report = registry.health(str(root))
    assert report.status == "degraded" and not report.checks["disk"]["ok"]


# -- learnings --------------------------------------------------------------------------


def write_learnings(home: Path, kind: str, lines: list[Any]) -> None:
    folder = home / "learnings"
    folder.mkdir(exist_ok=True)
    with open(folder / f"{kind}.jsonl", "w") as handle:
        for line in lines:
            handle.write((line if isinstance(line, str) else json.dumps(line)) + "\n")


def learning(ts: str, description: str, **extra: Any) -> dict[str, Any]:
    return {"timestamp": ts, "project": "alpha", "category": "general", "description": description,
            **extra}  # fmt: skip


def test_learnings_newest_first_with_filters_and_bad_lines_reported(tmp_path: Path) -> None:
    header = {"version": "1.0", "created": "2026-01-01T00:00:00Z"}
    write_learnings(
        tmp_path,
        "patterns",
        [header, learning("2026-01-02T00:00:00Z", "Use trio nurseries"), "{broken", "[1]"],
    )
    write_learnings(
        tmp_path, "mistakes", [header, learning("2026-01-03T00:00:00Z", "Forgot fsync")]
    )
    home = str(tmp_path)
    every = registry.read_learnings(home)
    assert [e["description"] for e in every["learnings"]] == ["Forgot fsync", "Use trio nurseries"]
    assert [e["type"] for e in every["learnings"]] == ["mistakes", "patterns"]
    assert every["total"] == 2
    assert every["counts"] == {"patterns": 1, "mistakes": 1, "successes": 0}
    assert kinds(every["errors"]) == ["malformed", "malformed"]
    assert "line 3" in every["errors"][0]["message"]
    only = registry.read_learnings(home, "patterns")
    assert [e["type"] for e in only["learnings"]] == ["patterns"]
    found = registry.read_learnings(home, q="FSYNC")
    assert [e["description"] for e in found["learnings"]] == ["Forgot fsync"]
    page = registry.read_learnings(home, limit=1, offset=1)
    assert [e["description"] for e in page["learnings"]] == ["Use trio nurseries"]


def test_learnings_of_the_wrong_shape_are_problems_with_their_line_and_not_answered(
    tmp_path: Path,
) -> None:
    """The documented shape: `description`, `category`, `project` strings, `timestamp`
    ISO 8601. A bogus timestamp must not sort first, a number must not be a description."""
    write_learnings(
        tmp_path,
        "patterns",
        [
            {"version": "1.0"},
            {"description": 5},
            {"description": ["x"], "category": {"a": 1}, "timestamp": "zzz"},
            {"description": "bad ts", "timestamp": 12345},
            {"description": "bad category", "category": 7},
            {"description": "bad project", "project": ["p"]},
            {"description": "unparseable", "timestamp": "zzz"},
            {"description": None},
            learning("2026-01-02T00:00:00Z", "good, UTC"),
            {"description": "no timestamp", "extra": {"kept": True}},
            learning("2026-01-02T03:00:00+05:00", "good, earlier in UTC"),
            learning("2026-01-01T12:00:00", "good, no zone: UTC"),
        ],
    )
    answer = registry.read_learnings(str(tmp_path))
    assert [e["description"] for e in answer["learnings"]] == [
        "good, UTC",
        "good, earlier in UTC",  # 2026-01-01T22:00Z
        "good, no zone: UTC",
        "no timestamp",
    ]
    assert answer["learnings"][0]["timestamp"] == "2026-01-02T00:00:00Z"  # as written
    assert answer["learnings"][3]["extra"] == {"kept": True}
    assert answer["total"] == 4 and answer["counts"]["patterns"] == 4
    messages = [e["message"] for e in answer["errors"]]
    assert messages == [
        "line 2: description must be a string, not a number",
        "line 3: description must be a string, not an array",
        "line 4: timestamp must be an ISO-8601 string, not a number",
        "line 5: category must be a string, not a number",
        "line 6: project must be a string, not an array",
        "line 7: timestamp is not ISO 8601: 'zzz'",
        "line 8: description must be a string, not null",
    ]
    assert set(kinds(answer["errors"])) == {"malformed"}


def test_a_learning_with_a_lone_surrogate_escape_is_read_as_u_fffd(tmp_path: Path) -> None:
    folder = tmp_path / "learnings"
    folder.mkdir()
    line = '{"timestamp": "2026-01-01T00:00:00Z", "description": "bad \\udcff here"}'
    (folder / "patterns.jsonl").write_text(line + "\n")
    found = registry.read_learnings(str(tmp_path))
    assert [e["description"] for e in found["learnings"]] == ["bad \ufffd here"]
    json.dumps(found, ensure_ascii=False).encode()  # what the HTTP answer does: no error


def test_learnings_without_files_are_empty_and_types_accept_singulars(tmp_path: Path) -> None:
    empty = registry.read_learnings(str(tmp_path))
    assert (empty["learnings"], empty["total"], empty["errors"]) == ([], 0, [])
    assert registry.learning_type("success") == "successes"
    assert registry.learning_type("Pattern") == "patterns"
    assert registry.learning_type("nope") is None


def test_learnings_are_cached_and_a_change_is_seen(tmp_path: Path) -> None:
    cache = FileCache()
    write_learnings(tmp_path, "successes", [learning("2026-01-01T00:00:00Z", "one")])
    assert registry.read_learnings(str(tmp_path), cache=cache)["total"] == 1
    write_learnings(
        tmp_path,
        "successes",
        [learning("2026-01-01T00:00:00Z", "one"), learning("2026-01-02T00:00:00Z", "two")],
    )
    assert registry.read_learnings(str(tmp_path), cache=cache)["total"] == 2
