"""Git worktrees for parallel agents: one worktree and branch per running task.

With `options.parallel` on and a project that is a git repository, the
session runner gives each concurrently running agent its own worktree on
its own branch, and merges the branch back into the project's checked-out
branch when the agent succeeds. This module does the git side; the runner
decides what a result means (a conflict puts the task back).

Rules (docs/parallel-and-sandbox.md has the short version):

* **Usable project.** The project folder must be the *top level* of a git
  work tree (`git rev-parse --show-toplevel`, compared after resolving
  symbolic links). A folder inside a bigger repository is not usable: its
  `.loki/` would not sit at the top of the worktrees and the agent would
  have to run in a sub-folder of its worktree. A repository without a
  commit (unborn `HEAD`) is a git repository but has nothing to branch
  from: `is_git_repo` says True, `worktree_problem` names the reason and
  `create_worktree` raises `GitError`.
* **Layout.** `<project>/.loki/worktrees/<task>` on branch
  `loki/<session>/<task>`, started from the project's `HEAD` commit
  (`Worktree.base`). Both names go through `ref_component`: an id that is
  already a safe ref component is used as is, any other is cleaned and gets
  a short hash of the original, so two ids never share a worktree.
* **`.loki/` is never project content.** Worktrees sit inside the main work
  tree, so `create_worktree` adds `/.loki/` to the repository's
  `info/exclude` (shared by all its worktrees; local, never committed):
  `git status` in the main tree does not list the worktrees, and an agent's
  own `git add -A` in its worktree does not pick up a `.loki/` it wrote
  there. Our own commit in the worktree also unstages `.loki` after
  `git add --all`, which covers a project that tracks files under `.loki/`.
* **Merge.** `merge_worktree` commits what the agent left uncommitted in
  its worktree (`git add -A`, commit), then merges the commit the
  worktree's `HEAD` points at (so an agent that switched branches in its
  worktree is still merged) into the project's `HEAD` with
  `git merge --no-ff --no-edit`. Outcomes (`MergeResult.outcome`):
  MERGED; NOTHING (no change since the merge base); CONFLICT (`git merge
  --abort` has already run, the paths are listed); BLOCKED (the project's
  own state refuses the merge - uncommitted changes or untracked files the
  merge would overwrite, a merge, rebase, cherry-pick or revert in
  progress, which we never abort, or an `index.lock` (another git command
  runs, or a killed one left it), which would let `git merge` record a
  merge that it can neither finish nor abort - or the agent left such an
  operation or lock in its worktree; `MergeResult.blocked_by_project` says
  which side). Only an unexpected git failure raises `GitError`. The merge
  itself is shielded from cancellation (its git commands keep their
  timeouts), and a merge that times out is aborted, so the project is never
  left half-merged by us. If the index lock appears between our check and
  the merge, git records the merge (`MERGE_HEAD`) without touching the
  index or the files, and `git merge --abort` fails on the same lock: then
  we remove the merge's state files ourselves (what the abort would have
  done) and answer BLOCKED.
* **One writer per project.** Every function that changes the repository
  holds a per-project `trio.Lock` (keyed by the resolved project path, in a
  weak dictionary, so it lives only while someone uses it) for its whole
  run: merges into one project happen one at a time, and branch deletion
  never races a merge for `packed-refs.lock`. The lock is per daemon
  process; that is enough because a project has at most one active session.
* **Our git commands** run with `GIT_TERMINAL_PROMPT=0`, `LC_ALL=C`, without
  the repository-locating `GIT_*` variables of our own environment,
  identity `lokid <lokid@localhost>` (so they work without a global git
  config), no hooks (`core.hooksPath=/dev/null`: lokid's commits are
  mechanical, and a slow or interactive hook would stall the session), no
  commit signing, stdin from `/dev/null`, and `GIT_TIMEOUT_SECONDS` each.
  Output is bounded: stdout is kept up to `MAX_STDOUT_BYTES` (for parsing),
  stderr's last `OUTPUT_TAIL_BYTES` (for messages).
* **Removal forgets the work.** `remove_worktree` deletes the worktree and
  its branch, also when they are half gone; call it after a merge or when
  the work is abandoned. `prune_worktrees` does that for every worktree and
  branch a session left behind (after a crash); `session_worktrees` lists
  those worktrees first, so that what is in them can be read.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import os
import re
import shutil
import subprocess
import weakref
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import attrs
import trio

from lokid.errors import LokiError

GIT_TIMEOUT_SECONDS = 60.0
"""Longest any one git command may run before `GitError`."""
OUTPUT_TAIL_BYTES = 16 * 1024
"""The end of stderr kept for messages."""
MAX_STDOUT_BYTES = 1024 * 1024
"""The start of stdout kept for parsing; the rest is read and dropped."""
MAX_LISTED_PATHS = 100
"""Paths kept in `MergeResult.conflicts` / `blocked`; the message counts them all."""
MAX_NAME_CHARS = 64
"""Longest cleaned id in a branch or folder name (before the hash suffix)."""
BRANCH_PREFIX = "loki"
WORKTREES_DIR = Path(".loki") / "worktrees"
EXCLUDE_LINE = "/.loki/"
INDEX_LOCKED = (
    "a locked index (`index.lock`: a git command is running, or one that was killed "
    "left the file; delete it if no git command runs)"
)

_IDENTITY = ("-c", "user.name=lokid", "-c", "user.email=lokid@localhost")
_GIT_CONFIG = (
    *_IDENTITY,
    "-c",
    "core.hooksPath=/dev/null",
    "-c",
    "commit.gpgSign=false",
    "-c",
    "core.quotePath=false",
)
# What `git rev-parse --local-env-vars` lists: variables that would point our
# commands at another repository, index or object store than the project's.
_LOCAL_GIT_VARS = frozenset(
    {
        "GIT_ALTERNATE_OBJECT_DIRECTORIES",
        "GIT_CONFIG",
        "GIT_CONFIG_PARAMETERS",
        "GIT_CONFIG_COUNT",
        "GIT_OBJECT_DIRECTORY",
        "GIT_DIR",
        "GIT_WORK_TREE",
        "GIT_IMPLICIT_WORK_TREE",
        "GIT_GRAFT_FILE",
        "GIT_INDEX_FILE",
        "GIT_NO_REPLACE_OBJECTS",
        "GIT_REPLACE_REF_BASE",
        "GIT_PREFIX",
        "GIT_INTERNAL_SUPER_PREFIX",
        "GIT_SHALLOW_FILE",
        "GIT_COMMON_DIR",
    }
)
_IN_PROGRESS = (
    ("MERGE_HEAD", "a merge in progress"),
    ("rebase-merge", "a rebase in progress"),
    ("rebase-apply", "a rebase or `git am` in progress"),
    ("CHERRY_PICK_HEAD", "a cherry-pick in progress"),
    ("REVERT_HEAD", "a revert in progress"),
    ("index.lock", INDEX_LOCKED),
)
# What `git merge` leaves for a merge in progress; `git merge --abort` removes them.
_MERGE_STATE_FILES = ("MERGE_HEAD", "MERGE_MODE", "MERGE_MSG", "MERGE_RR", "AUTO_MERGE")
_REF_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_SHORTSTAT_FILES = re.compile(r"(\d+) files? changed")
_WOULD_BE_OVERWRITTEN = re.compile(
    r"^error: (Your local changes to the following files|"
    r"The following untracked working tree files) would be overwritten by merge:$"
)


class GitError(LokiError):
    """A git operation could not be done: a git command failed, timed out or is missing,
    or the project cannot hold worktrees (not the top level of a work tree, no commit yet).

    The message says which command and ends with the tail of git's stderr; `command`,
    `returncode` and `output` (the last `OUTPUT_TAIL_BYTES` of stderr) are kept too.
    """

    def __init__(
        self,
        message: str,
        *,
        command: Sequence[str] = (),
        returncode: int | None = None,
        output: str = "",
    ) -> None:
        self.command = tuple(command)
        self.returncode = returncode
        self.output = output
        super().__init__(
            message,
            details={"command": " ".join(self.command), "returncode": returncode, "output": output},
        )


@attrs.frozen
class Worktree:
    path: Path  # <project_dir>/.loki/worktrees/<task>
    branch: str  # loki/<session>/<task>
    base: str  # the commit the worktree started from


class MergeOutcome(enum.Enum):
    MERGED = "merged"
    NOTHING = "nothing"  # no change since the merge base
    CONFLICT = "conflict"  # the merge was aborted; `conflicts` lists the paths
    BLOCKED = "blocked"  # the project's state refused the merge; nothing was changed


def _default_outcome(result: MergeResult) -> MergeOutcome:
    if result.merged:
        return MergeOutcome.MERGED
    return MergeOutcome.CONFLICT if result.conflicts else MergeOutcome.NOTHING


@attrs.frozen
class MergeResult:
    merged: bool
    commit: str | None  # the merge commit in the project, when merged
    conflicts: tuple[str, ...]  # paths in conflict, when not merged because of a conflict
    message: str  # one line for people: "merged 3 files", "conflict in a.py, b.py", ...
    blocked: tuple[str, ...] = ()  # project paths whose uncommitted state refused the merge
    outcome: MergeOutcome = attrs.field(default=attrs.Factory(_default_outcome, takes_self=True))
    blocked_by_project: bool = False
    """BLOCKED by the project's own state (the person must act), not by the agent's worktree."""


NOTHING_TO_MERGE = "nothing to merge"


def ref_component(text: str) -> str:
    """`text` as one component of a git ref name (and a folder name): [A-Za-z0-9._-].

    Safe ids come back unchanged; any other is cleaned and suffixed with 8 hex
    digits of its SHA-256, so different ids stay different.
    """
    clean = _REF_UNSAFE.sub("-", text)
    clean = re.sub(r"\.{2,}", ".", clean)[:MAX_NAME_CHARS]
    clean = clean.lstrip(".-").rstrip(".")
    if clean.endswith(".lock"):
        clean = clean.removesuffix(".lock") + "-lock"
    if clean != text or not clean:
        digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        clean = f"{clean}-{digest}" if clean else digest
    return clean


def branch_name(session_id: str, task_id: str) -> str:
    return f"{BRANCH_PREFIX}/{ref_component(session_id)}/{ref_component(task_id)}"


def worktree_path(project_dir: Path, task_id: str) -> Path:
    return project_dir.resolve() / WORKTREES_DIR / ref_component(task_id)


# -- the public operations ------------------------------------------------------------


async def is_git_repo(project_dir: Path) -> bool:
    """True when `project_dir` is the top level of a git work tree (even one with no commit).

    Never raises: git missing, a timeout or a refusal (such as git's "dubious
    ownership") all mean False; `worktree_problem` says why.
    """
    return await _top_level_problem(project_dir) is None


async def worktree_problem(project_dir: Path) -> str | None:
    """None when the project can hold worktrees for parallel agents, else why not, in one line."""
    problem = await _top_level_problem(project_dir)
    if problem is not None:
        return problem
    try:
        await _head_commit(await _resolve(project_dir))
    except GitError as exc:
        return exc.message
    return None


async def create_worktree(project_dir: Path, *, session_id: str, task_id: str) -> Worktree:
    """A new worktree for `task_id` on branch `loki/<session>/<task>` at the project's HEAD.

    A leftover at the same path (a worktree or a stray folder) is removed
    first; an existing branch of that name is reset to HEAD. When the add
    fails (a full disk), git has made the branch already: it is deleted with
    what was written of the folder, and the `GitError` is raised.
    """
    project = await _resolve(project_dir)
    problem = await _top_level_problem(project)
    if problem is not None:
        raise GitError(f"cannot create a worktree: {problem}")
    path = worktree_path(project, task_id)
    branch = branch_name(session_id, task_id)
    async with _project_lock(project):
        base = await _head_commit(project)
        await _ensure_excluded(project)
        await _remove(project, path, None)
        await trio.to_thread.run_sync(partial(path.parent.mkdir, parents=True, exist_ok=True))
        try:
            await _git(project, "worktree", "add", "--quiet", "-B", branch, str(path), base)
        except GitError:
            with contextlib.suppress(GitError):  # best effort: the add's error is the news
                await _remove(project, path, branch)
            raise
    return Worktree(path=path, branch=branch, base=base)


async def merge_worktree(project_dir: Path, worktree: Worktree, *, message: str) -> MergeResult:
    """Commit what is uncommitted in `worktree`, then merge it into the project's HEAD.

    `message` is the merge commit's message (and, with a suffix, the message
    of the commit of uncommitted work). See the module rules for the outcomes.
    """
    project = await _resolve(project_dir)
    async with _project_lock(project):
        await _ensure_excluded(project)
        if not await trio.to_thread.run_sync(worktree.path.is_dir):
            raise GitError(f"the worktree {worktree.path} is gone")
        for where, cwd in (("the agent's worktree", worktree.path), ("the project", project)):
            busy = await _operation_in_progress(cwd)
            if busy is not None:
                return _blocked(f"not merged: {where} has {busy}", by_project=cwd == project)
        head = await _commit_leftovers(worktree, message)
        base = (await _git(project, "merge-base", "HEAD", head)).text().strip()
        stat = (await _git(project, "diff", "--shortstat", base, head)).text()
        changed = _SHORTSTAT_FILES.search(stat)
        if changed is None:
            return MergeResult(False, None, (), NOTHING_TO_MERGE)
        files = int(changed.group(1))
        # Shielded (each git command keeps its own timeout): a merge cancelled half-way
        # would leave a merge in progress that we, seeing it later, would never abort.
        with trio.CancelScope(shield=True):
            merge = await _merge(project, head, message)
            if merge.returncode == 0:
                commit = await _rev_parse(project, "HEAD")
                noun = "file" if files == 1 else "files"
                return MergeResult(True, commit, (), f"merged {files} {noun}")
            if await _git_path_exists(project, "MERGE_HEAD"):
                if _index_unwritable(merge):
                    await _forget_unwritten_merge(project)
                    return _blocked(f"not merged: the project has {INDEX_LOCKED}", by_project=True)
                return await _abort_conflicted_merge(project)
        blocked = _overwritten_paths(merge.stderr_text())
        if blocked:
            return _blocked(
                "not merged: the project has uncommitted changes or untracked files in "
                + _some(blocked),
                by_project=True,
                paths=blocked,
            )
        if _index_unwritable(merge):
            return _blocked(f"not merged: the project has {INDEX_LOCKED}", by_project=True)
        raise merge.error()


async def remove_worktree(project_dir: Path, worktree: Worktree) -> None:
    """Delete the worktree and its branch; parts that are already gone are fine."""
    project = await _resolve(project_dir)
    async with _project_lock(project):
        await _remove(project, worktree.path, worktree.branch)


async def session_worktrees(project_dir: Path, session_id: str) -> list[Path]:
    """The folders of the worktrees `session_id` has (after a crash), by path.

    Read before `prune_worktrees` removes them: their `.loki/` may hold what a
    cut-off agent left. A project that is no longer a git repository has none.
    """
    project = await _resolve(project_dir)
    if await _top_level_problem(project) is not None:
        return []
    prefix = _session_refs(session_id)
    async with _project_lock(project):
        registered = await _registered_worktrees(project)
    return sorted(path for path, ref in registered.items() if ref and ref.startswith(prefix))


async def prune_worktrees(project_dir: Path, session_id: str) -> int:
    """Remove every worktree and branch of `session_id` (after a crash); how many were removed.

    A worktree with its branch counts once, a branch without a worktree once.
    A project that is no longer a git repository has nothing to prune (0).
    """
    project = await _resolve(project_dir)
    if await _top_level_problem(project) is not None:
        return 0
    prefix = _session_refs(session_id)
    removed = 0
    async with _project_lock(project):
        await _git(project, "worktree", "prune")
        done: set[str] = set()
        for path, ref in (await _registered_worktrees(project)).items():
            if ref is not None and ref.startswith(prefix):
                await _remove(project, path, ref.removeprefix("refs/heads/"))
                done.add(ref)
                removed += 1
        refs = await _git(project, "for-each-ref", "--format=%(refname)", prefix)
        for ref in refs.text().splitlines():
            if ref and ref not in done:
                await _delete_branch(project, ref.removeprefix("refs/heads/"))
                removed += 1
    return removed


# -- steps ----------------------------------------------------------------------------


def _session_refs(session_id: str) -> str:
    """The prefix of the refs of the branches of `session_id`'s worktrees."""
    return f"refs/heads/{BRANCH_PREFIX}/{ref_component(session_id)}/"


_LOCKS: weakref.WeakValueDictionary[Path, trio.Lock] = weakref.WeakValueDictionary()


def _project_lock(project: Path) -> trio.Lock:
    lock = _LOCKS.get(project)
    if lock is None:
        lock = _LOCKS[project] = trio.Lock()
    return lock


async def _top_level_problem(project_dir: Path) -> str | None:
    if not await trio.to_thread.run_sync(project_dir.is_dir):
        return f"{project_dir} is not a folder"
    try:
        found = await _git(
            project_dir, "rev-parse", "--is-inside-work-tree", "--show-toplevel", check=False
        )
    except GitError as exc:
        return exc.message
    lines = found.text().splitlines()
    if found.returncode != 0 or len(lines) != 2 or lines[0] != "true":
        why = _last_line(found.stderr_text())
        return "not a git work tree" + (f" ({why})" if why else "")
    top = await _resolve(Path(lines[1]))
    if top != await _resolve(project_dir):
        return f"the project folder is inside the git work tree {top}, not its top level"
    return None


async def _head_commit(project: Path) -> str:
    found = await _git(project, "rev-parse", "--quiet", "--verify", "HEAD^{commit}", check=False)
    if found.returncode != 0:
        raise GitError(
            "the git repository has no commit yet: parallel agents need one to branch from",
            command=found.command,
            returncode=found.returncode,
        )
    return found.text().strip()


async def _rev_parse(cwd: Path, rev: str) -> str:
    return (await _git(cwd, "rev-parse", "--verify", f"{rev}^{{commit}}")).text().strip()


async def _ensure_excluded(project: Path) -> None:
    common = (await _git(project, "rev-parse", "--git-common-dir")).text().strip()
    exclude = project / common / "info" / "exclude"
    await trio.to_thread.run_sync(_add_exclude_line, exclude)


def _add_exclude_line(exclude: Path) -> None:
    try:
        text = exclude.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        text = ""
    except OSError as exc:
        raise GitError(f"cannot read {exclude}: {exc.strerror or exc}") from exc
    if any(line.strip() in {"/.loki/", "/.loki", ".loki/", ".loki"} for line in text.splitlines()):
        return
    addition = ("" if not text or text.endswith("\n") else "\n") + (
        f"# lokid: its state and the parallel agents' worktrees\n{EXCLUDE_LINE}\n"
    )
    try:
        exclude.parent.mkdir(parents=True, exist_ok=True)
        with exclude.open("a", encoding="utf-8") as handle:
            handle.write(addition)
    except OSError as exc:
        raise GitError(f"cannot write {exclude}: {exc.strerror or exc}") from exc


async def _commit_leftovers(worktree: Worktree, message: str) -> str:
    """Commit the worktree's uncommitted changes (not `.loki`); the worktree's HEAD commit."""
    path = worktree.path
    # Untracked `.loki/` is skipped by info/exclude; changes to tracked files under it
    # (a project that commits some) are unstaged again.
    await _git(path, "add", "--all")
    await _git(path, "reset", "--quiet", "--", ".loki")
    staged = await _git(path, "diff", "--cached", "--quiet", check=False)
    if staged.returncode == 1:
        await _git(path, "commit", "--quiet", "-m", f"{message} (work left uncommitted)")
    elif staged.returncode != 0:
        raise staged.error()
    return await _rev_parse(path, "HEAD")


async def _operation_in_progress(project: Path) -> str | None:
    """What the project is in the middle of, if anything: a git operation (its state
    files) or a git command holding its index (`index.lock`), as "a merge in progress"."""
    args = [arg for name, _ in _IN_PROGRESS for arg in ("--git-path", name)]
    found = (await _git(project, "rev-parse", *args)).text().splitlines()
    exists = await trio.to_thread.run_sync(lambda: [(project / path).exists() for path in found])
    for (_, what), there in zip(_IN_PROGRESS, exists, strict=True):
        if there:
            return what
    return None


async def _git_path_exists(cwd: Path, name: str) -> bool:
    found = (await _git(cwd, "rev-parse", "--git-path", name)).text().strip()
    return await trio.to_thread.run_sync((cwd / found).exists)


async def _merge(project: Path, head: str, message: str) -> _Output:
    """`git merge` of `head` into the project; a merge it leaves behind on a timeout is aborted."""
    argv = ("merge", "--no-ff", "--no-edit", "--no-autostash", "-m", message, head)
    try:
        return await _git(project, *argv, check=False)
    except GitError:
        # No merge was in progress before ours (checked under the lock): this one is ours.
        with contextlib.suppress(GitError):
            if await _git_path_exists(project, "MERGE_HEAD"):
                await _git(project, "merge", "--abort")
        raise


def _blocked(message: str, *, by_project: bool, paths: Sequence[str] = ()) -> MergeResult:
    return MergeResult(
        False,
        None,
        (),
        message,
        blocked=tuple(paths[:MAX_LISTED_PATHS]),
        outcome=MergeOutcome.BLOCKED,
        blocked_by_project=by_project,
    )


def _index_unwritable(merge: _Output) -> bool:
    """`git merge` failed because it could not lock or write the project's index."""
    text = merge.stderr_text()
    return "index.lock" in text or "Unable to write index" in text


async def _forget_unwritten_merge(project: Path) -> None:
    """Undo a merge that git recorded but could not write: it changed neither the index
    nor the files (both need the index lock it did not get), so removing its state
    files is all `git merge --abort` would do - which fails on the same lock."""
    args = [arg for name in _MERGE_STATE_FILES for arg in ("--git-path", name)]
    found = (await _git(project, "rev-parse", *args)).text().splitlines()

    def remove() -> None:
        for path in found:
            with contextlib.suppress(FileNotFoundError):
                (project / path).unlink()

    await trio.to_thread.run_sync(remove)


async def _abort_conflicted_merge(project: Path) -> MergeResult:
    unmerged = await _git(project, "diff", "--name-only", "--diff-filter=U", "-z")
    paths = _nul_separated(unmerged)
    await _git(project, "merge", "--abort")
    return MergeResult(
        False,
        None,
        tuple(paths[:MAX_LISTED_PATHS]),
        f"conflict in {_some(paths)}" if paths else "conflict (git listed no paths)",
        outcome=MergeOutcome.CONFLICT,
    )


def _overwritten_paths(stderr: str) -> list[str]:
    """The paths git lists after "... would be overwritten by merge:" (indented lines)."""
    paths: list[str] = []
    listing = False
    for line in stderr.splitlines():
        if _WOULD_BE_OVERWRITTEN.match(line):
            listing = True
        elif listing and line[:1] in {"\t", " "} and line.strip():
            paths.append(line.strip())
        else:
            listing = False
    return paths


async def _registered_worktrees(project: Path) -> dict[Path, str | None]:
    """Worktree path (resolved) -> its branch ref (None when detached), from `git worktree list`."""
    listing = await _git(project, "worktree", "list", "--porcelain")
    found: dict[str, str | None] = {}
    current: str | None = None
    for line in listing.text().splitlines():
        if line.startswith("worktree "):
            current = line.removeprefix("worktree ")
            found[current] = None
        elif line.startswith("branch ") and current is not None:
            found[current] = line.removeprefix("branch ")
    return await trio.to_thread.run_sync(
        lambda: {Path(path).resolve(): ref for path, ref in found.items()}
    )


async def _remove(project: Path, path: Path, branch: str | None) -> None:
    """Unregister and delete the worktree at `path`, then delete `branch`; gone is fine."""
    path = await _resolve(path)
    if path in await _registered_worktrees(project):
        # Twice forced: also when it is dirty or locked. Failure (submodules) falls through.
        await _git(project, "worktree", "remove", "--force", "--force", str(path), check=False)
    await trio.to_thread.run_sync(_delete_folder, project, path)
    await _git(project, "worktree", "prune")
    if branch is not None:
        await _delete_branch(project, branch)


def _delete_folder(project: Path, path: Path) -> None:
    if not os.path.lexists(path):
        return
    home = project / WORKTREES_DIR
    if path.parent != home:
        raise GitError(f"refusing to delete {path}: not a folder of {home}")
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise GitError(f"cannot delete the worktree folder {path}: {exc.strerror or exc}") from exc


async def _delete_branch(project: Path, branch: str) -> None:
    deleted = await _git(project, "branch", "--quiet", "-D", "--", branch, check=False)
    if deleted.returncode != 0:
        exists = await _git(
            project, "show-ref", "--verify", "--quiet", f"refs/heads/{branch}", check=False
        )
        if exists.returncode == 0:
            raise deleted.error()


async def _resolve(path: Path) -> Path:
    return await trio.to_thread.run_sync(path.resolve)


def _some(paths: Sequence[str], shown: int = 5) -> str:
    text = ", ".join(paths[:shown])
    return text + (f" and {len(paths) - shown} more" if len(paths) > shown else "")


def _nul_separated(output: _Output) -> list[str]:
    parts = output.stdout.split(b"\0")
    if output.stdout_truncated:
        parts = parts[:-1]  # the last one may be cut
    return [os.fsdecode(part) for part in parts if part]


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


# -- running git ----------------------------------------------------------------------


@attrs.frozen
class _Output:
    command: tuple[str, ...]
    cwd: Path
    returncode: int
    stdout: bytes
    stdout_truncated: bool
    stderr: bytes  # the last OUTPUT_TAIL_BYTES

    def text(self) -> str:
        return self.stdout.decode("utf-8", "replace")

    def stderr_text(self) -> str:
        return self.stderr.decode("utf-8", "replace")

    def error(self) -> GitError:
        tail = self.stderr_text().strip() or self.text()[-OUTPUT_TAIL_BYTES:].strip()
        lines = [line for line in tail.splitlines() if line.strip()][-3:]
        shown = " ".join(self.command)
        return GitError(
            f"`{shown}` failed (exit {self.returncode}) in {self.cwd}: " + " / ".join(lines),
            command=self.command,
            returncode=self.returncode,
            output=tail,
        )


class _Collector:
    def __init__(self, limit: int, *, keep_tail: bool) -> None:
        self.data = bytearray()
        self.truncated = False
        self._limit = limit
        self._keep_tail = keep_tail

    async def read_all(self, stream: trio.abc.ReceiveStream | None) -> None:
        if stream is None:
            return
        async with stream:
            while chunk := await stream.receive_some(65536):
                if self._keep_tail:
                    self.data += chunk
                    if len(self.data) > self._limit:
                        del self.data[: len(self.data) - self._limit]
                        self.truncated = True
                elif len(self.data) < self._limit:
                    self.data += chunk[: self._limit - len(self.data)]
                    self.truncated = self.truncated or len(self.data) >= self._limit
                else:
                    self.truncated = True


def _git_env() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in _LOCAL_GIT_VARS}
    env.update(GIT_TERMINAL_PROMPT="0", LC_ALL="C")
    return env


async def _git(
    cwd: Path, *args: str, check: bool = True, timeout: float = GIT_TIMEOUT_SECONDS
) -> _Output:
    """Run `git <args>` in `cwd`; raise `GitError` on a non-zero exit when `check`."""
    argv = ("git", *_GIT_CONFIG, *args)
    shown = ("git", *args)
    stdout = _Collector(MAX_STDOUT_BYTES, keep_tail=False)
    stderr = _Collector(OUTPUT_TAIL_BYTES, keep_tail=True)
    spawn_error: OSError | None = None
    process: trio.Process | None = None
    try:
        with trio.fail_after(timeout):
            async with trio.open_nursery() as nursery:
                try:
                    process = await nursery.start(
                        partial(
                            trio.run_process,
                            argv,
                            cwd=cwd,
                            env=_git_env(),
                            stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE,
                            check=False,
                        )
                    )
                except OSError as exc:
                    spawn_error = exc
                else:
                    assert process is not None
                    nursery.start_soon(stdout.read_all, process.stdout)
                    nursery.start_soon(stderr.read_all, process.stderr)
    except trio.TooSlowError:
        raise GitError(
            f"`{' '.join(shown)}` did not finish within {timeout:g} s in {cwd}", command=shown
        ) from None
    if spawn_error is not None:
        reason = (
            "git is not installed (not on PATH)"
            if isinstance(spawn_error, FileNotFoundError) and spawn_error.filename == "git"
            else f"cannot run git in {cwd}: {spawn_error.strerror or spawn_error}"
        )
        raise GitError(reason, command=shown) from spawn_error
    assert process is not None and process.returncode is not None
    output = _Output(
        shown, cwd, process.returncode, bytes(stdout.data), stdout.truncated, bytes(stderr.data)
    )
    if check and output.returncode != 0:
        raise output.error()
    return output
