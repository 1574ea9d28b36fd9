"""Worktrees for parallel agents, against real git repositories in tmp_path."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from lokid import worktree as wt
from lokid.worktree import GitError, MergeOutcome, MergeResult

IDENTITY = ("-c", "user.name=test", "-c", "user.email=test@localhost")


async def git(cwd: Path, *args: str, check: bool = True) -> str:
    done = await trio.run_process(
        ["git", *IDENTITY, *args],
        cwd=cwd,
        capture_stdout=True,
        capture_stderr=True,
        check=check,
        env={"LC_ALL": "C", "PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(cwd)},
    )
    return done.stdout.decode()


def write_files(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


async def make_repo(path: Path, files: dict[str, str] | None = None) -> Path:
    write_files(path, files or {"a.txt": "one\ntwo\nthree\n", "b.txt": "b\n"})
    await git(path, "init", "-q", "-b", "main")
    await git(path, "add", "-A")
    await git(path, "commit", "-q", "-m", "initial")
    return path


@pytest.fixture
async def repo(tmp_path: Path) -> Path:
    return await make_repo(tmp_path / "project")


async def head(cwd: Path) -> str:
    return (await git(cwd, "rev-parse", "HEAD")).strip()


async def branches(cwd: Path) -> list[str]:
    return (await git(cwd, "branch", "--list", "--format=%(refname:short)", "loki/*")).split()


async def porcelain(cwd: Path) -> str:
    return await git(cwd, "status", "--porcelain")


async def test_layout_write_merge(repo: Path) -> None:
    base = await head(repo)
    tree = await wt.create_worktree(repo, session_id="s1", task_id="task-1")
    assert tree == wt.Worktree(repo / ".loki/worktrees/task-1", "loki/s1/task-1", base)
    assert (tree.path / "a.txt").read_text() == "one\ntwo\nthree\n"
    assert (await git(tree.path, "branch", "--show-current")).strip() == "loki/s1/task-1"

    (tree.path / "new.txt").write_text("from the agent\n")  # left uncommitted
    result = await wt.merge_worktree(repo, tree, message="loki: task-1 add new.txt")

    assert result.merged and result.outcome is MergeOutcome.MERGED
    assert result == MergeResult(True, await head(repo), (), "merged 1 file")
    assert (repo / "new.txt").read_text() == "from the agent\n"
    assert (await git(repo, "log", "-1", "--format=%s%n%P")).split("\n")[0] == (
        "loki: task-1 add new.txt"
    )
    await git(repo, "merge-base", "--is-ancestor", tree.branch, "HEAD")  # merged
    assert len((await git(repo, "log", "-1", "--format=%P")).split()) == 2  # --no-ff
    assert (await git(repo, "log", "-1", "--format=%an <%ae>")).strip() == (
        "lokid <lokid@localhost>"
    )
    assert await porcelain(repo) == ""  # .loki/ is excluded, nothing else changed


async def test_worktree_and_main_tree_see_only_themselves(repo: Path) -> None:
    tree = await wt.create_worktree(repo, session_id="s1", task_id="t1")
    (tree.path / "agent.txt").write_text("x\n")
    (repo / "user.txt").write_text("y\n")
    assert await porcelain(tree.path) == "?? agent.txt\n"
    assert await porcelain(repo) == "?? user.txt\n"  # no .loki/, no worktree
    exclude = (repo / ".git/info/exclude").read_text()
    assert exclude.count("/.loki/") == 1
    await wt.create_worktree(repo, session_id="s1", task_id="t2")
    assert (repo / ".git/info/exclude").read_text() == exclude  # added once


async def test_loki_folder_in_a_worktree_is_never_committed(repo: Path) -> None:
    tree = await wt.create_worktree(repo, session_id="s1", task_id="t1")
    (tree.path / ".loki/queue").mkdir(parents=True)
    (tree.path / ".loki/queue/pending.json").write_text("[]\n")
    (tree.path / "work.txt").write_text("w\n")
    await git(tree.path, "add", "-A")  # what an agent might do itself
    await git(tree.path, "commit", "-q", "-m", "agent commit")
    (tree.path / "more.txt").write_text("m\n")
    result = await wt.merge_worktree(repo, tree, message="merge t1")
    assert result.message == "merged 2 files"
    files = (await git(repo, "ls-tree", "-r", "--name-only", "HEAD")).split()
    assert sorted(files) == ["a.txt", "b.txt", "more.txt", "work.txt"]


async def test_tracked_loki_files_are_not_merged_either(tmp_path: Path) -> None:
    repo = await make_repo(tmp_path / "p", {"a.txt": "a\n", ".loki/prd.md": "# PRD\n"})
    tree = await wt.create_worktree(repo, session_id="s1", task_id="t1")
    (tree.path / ".loki/prd.md").write_text("# changed by the agent\n")
    (tree.path / "a.txt").write_text("A\n")
    result = await wt.merge_worktree(repo, tree, message="m")
    assert result.message == "merged 1 file"
    assert (repo / ".loki/prd.md").read_text() == "# PRD\n"


async def test_the_worktree_head_is_merged_even_off_its_branch(repo: Path) -> None:
    tree = await wt.create_worktree(repo, session_id="s1", task_id="t1")
    await git(tree.path, "checkout", "-q", "--detach")
    (tree.path / "b.txt").write_text("detached work\n")
    await git(tree.path, "commit", "-qam", "detached")
    assert (await wt.merge_worktree(repo, tree, message="m")).merged
    assert (repo / "b.txt").read_text() == "detached work\n"


async def test_two_worktrees_on_different_files_both_merge_concurrently(repo: Path) -> None:
    first = await wt.create_worktree(repo, session_id="s1", task_id="t1")
    second = await wt.create_worktree(repo, session_id="s1", task_id="t2")
    (first.path / "a.txt").write_text("ONE\ntwo\nthree\n")
    (second.path / "b.txt").write_text("B\n")
    results: list[MergeResult] = []

    async def merge(tree: wt.Worktree) -> None:
        results.append(await wt.merge_worktree(repo, tree, message=f"merge {tree.branch}"))

    async with trio.open_nursery() as nursery:  # the project lock serialises them
        nursery.start_soon(merge, first)
        nursery.start_soon(merge, second)
    assert [r.merged for r in results] == [True, True]
    assert (repo / "a.txt").read_text() == "ONE\ntwo\nthree\n"
    assert (repo / "b.txt").read_text() == "B\n"
    assert await porcelain(repo) == ""


async def test_same_line_second_merge_is_a_conflict_and_the_project_stays_clean(
    repo: Path,
) -> None:
    first = await wt.create_worktree(repo, session_id="s1", task_id="t1")
    second = await wt.create_worktree(repo, session_id="s1", task_id="t2")
    (first.path / "a.txt").write_text("one\nTWO by first\nthree\n")
    (second.path / "a.txt").write_text("one\nTWO by second\nthree\n")
    (second.path / "c.txt").write_text("fine\n")
    assert (await wt.merge_worktree(repo, first, message="first")).merged
    after_first = await head(repo)

    result = await wt.merge_worktree(repo, second, message="second")

    assert result == MergeResult(False, None, ("a.txt",), "conflict in a.txt")
    assert result.outcome is MergeOutcome.CONFLICT
    assert await head(repo) == after_first
    assert await porcelain(repo) == ""
    assert not (repo / ".git/MERGE_HEAD").exists()
    assert (repo / "a.txt").read_text() == "one\nTWO by first\nthree\n"
    # the worktree keeps its (now committed) work for whoever retries
    assert await porcelain(second.path) == ""
    assert (second.path / "a.txt").read_text() == "one\nTWO by second\nthree\n"


async def test_nothing_to_merge(repo: Path) -> None:
    tree = await wt.create_worktree(repo, session_id="s1", task_id="t1")
    before = await head(repo)
    result = await wt.merge_worktree(repo, tree, message="m")
    assert result == MergeResult(False, None, (), "nothing to merge")
    assert result.outcome is MergeOutcome.NOTHING
    # changes that cancel out are nothing too
    (tree.path / "b.txt").write_text("changed\n")
    await git(tree.path, "commit", "-qam", "change")
    (tree.path / "b.txt").write_text("b\n")
    assert (await wt.merge_worktree(repo, tree, message="m")).outcome is MergeOutcome.NOTHING
    assert await head(repo) == before


async def test_dirty_main_tree_blocks_the_merge_without_losing_anything(repo: Path) -> None:
    tree = await wt.create_worktree(repo, session_id="s1", task_id="t1")
    (tree.path / "a.txt").write_text("agent\n")
    (tree.path / "new.txt").write_text("agent\n")
    (repo / "a.txt").write_text("user, uncommitted\n")
    before = await head(repo)

    result = await wt.merge_worktree(repo, tree, message="m")

    assert not result.merged and result.outcome is MergeOutcome.BLOCKED
    assert result.blocked == ("a.txt",) and result.conflicts == ()
    assert "uncommitted changes" in result.message and "a.txt" in result.message
    assert (repo / "a.txt").read_text() == "user, uncommitted\n"
    assert await head(repo) == before

    await git(repo, "checkout", "--", "a.txt")
    (repo / "new.txt").write_text("user, untracked\n")
    result = await wt.merge_worktree(repo, tree, message="m")
    assert result.outcome is MergeOutcome.BLOCKED and result.blocked == ("new.txt",)
    assert (repo / "new.txt").read_text() == "user, untracked\n"

    (repo / "new.txt").unlink()
    assert (await wt.merge_worktree(repo, tree, message="m")).merged


async def test_a_merge_of_the_user_in_progress_is_left_alone(repo: Path) -> None:
    await git(repo, "checkout", "-q", "-b", "side")
    (repo / "a.txt").write_text("side\n")
    await git(repo, "commit", "-qam", "side")
    await git(repo, "checkout", "-q", "main")
    (repo / "a.txt").write_text("main\n")
    await git(repo, "commit", "-qam", "main")
    await git(repo, "merge", "side", check=False)  # the user's conflicted merge
    assert (repo / ".git/MERGE_HEAD").exists()
    tree = await wt.create_worktree(repo, session_id="s1", task_id="t1")
    (tree.path / "b.txt").write_text("agent\n")

    result = await wt.merge_worktree(repo, tree, message="m")

    assert result.outcome is MergeOutcome.BLOCKED
    assert result.message == "not merged: the project has a merge in progress"
    assert result.blocked_by_project
    assert (repo / ".git/MERGE_HEAD").exists()  # not aborted by us


async def test_an_unfinished_rebase_in_the_worktree_blocks_the_merge(repo: Path) -> None:
    tree = await wt.create_worktree(repo, session_id="s1", task_id="t1")
    (tree.path / "b.txt").write_text("agent\n")
    state = tree.path / (await git(tree.path, "rev-parse", "--git-path", "rebase-merge")).strip()
    state.mkdir()  # what an interrupted `git rebase` leaves
    result = await wt.merge_worktree(repo, tree, message="m")
    assert result.outcome is MergeOutcome.BLOCKED
    assert result.message == "not merged: the agent's worktree has a rebase in progress"
    assert await porcelain(tree.path) == " M b.txt\n"  # nothing committed on top of it


async def test_a_locked_index_blocks_the_merge_and_leaves_no_merge_behind(repo: Path) -> None:
    tree = await wt.create_worktree(repo, session_id="s1", task_id="t1")
    (tree.path / "new.txt").write_text("agent\n")
    (repo / ".git/index.lock").touch()  # a git command runs, or a killed one left it
    before = await head(repo)

    result = await wt.merge_worktree(repo, tree, message="m")

    assert result.outcome is MergeOutcome.BLOCKED and result.blocked_by_project
    assert result.message.startswith("not merged: the project has a locked index (`index.lock`")
    assert not (repo / ".git/MERGE_HEAD").exists()
    assert await head(repo) == before
    (repo / ".git/index.lock").unlink()
    assert await porcelain(repo) == ""  # not in the middle of a merge
    assert (await wt.merge_worktree(repo, tree, message="m")).merged


async def test_a_lock_taken_after_the_check_still_leaves_no_merge_behind(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree = await wt.create_worktree(repo, session_id="s1", task_id="t1")
    (tree.path / "new.txt").write_text("agent\n")
    commit_leftovers = wt._commit_leftovers

    async def then_lock(worktree: wt.Worktree, message: str) -> str:
        head = await commit_leftovers(worktree, message)
        (repo / ".git/index.lock").touch()  # another git command starts right now
        return head

    monkeypatch.setattr(wt, "_commit_leftovers", then_lock)
    result = await wt.merge_worktree(repo, tree, message="m")

    assert result.outcome is MergeOutcome.BLOCKED and result.blocked_by_project
    assert "index.lock" in result.message
    assert not (repo / ".git/MERGE_HEAD").exists() and not (repo / ".git/MERGE_MSG").exists()
    (repo / ".git/index.lock").unlink()
    assert await porcelain(repo) == ""
    status = await git(repo, "status")
    assert "merging" not in status and "new.txt" not in status


async def test_a_locked_index_in_the_worktree_is_the_agents_block(repo: Path) -> None:
    tree = await wt.create_worktree(repo, session_id="s1", task_id="t1")
    (tree.path / "b.txt").write_text("agent\n")
    lock = tree.path / (await git(tree.path, "rev-parse", "--git-path", "index.lock")).strip()
    lock.touch()
    result = await wt.merge_worktree(repo, tree, message="m")
    assert result.outcome is MergeOutcome.BLOCKED and not result.blocked_by_project
    assert result.message.startswith("not merged: the agent's worktree has a locked index")


async def test_remove_twice_and_when_half_gone(repo: Path) -> None:
    tree = await wt.create_worktree(repo, session_id="s1", task_id="t1")
    (tree.path / "dirty.txt").write_text("x\n")
    await wt.remove_worktree(repo, tree)
    assert not tree.path.exists()
    assert str(tree.path) not in await git(repo, "worktree", "list")
    assert await branches(repo) == []
    await wt.remove_worktree(repo, tree)  # already gone: fine

    other = await wt.create_worktree(repo, session_id="s1", task_id="t2")
    await trio.run_process(["rm", "-rf", str(other.path)])  # folder gone, still registered
    await wt.remove_worktree(repo, other)
    assert await branches(repo) == []
    assert await porcelain(repo) == ""


async def test_create_replaces_a_leftover_at_the_same_path(repo: Path) -> None:
    old = await wt.create_worktree(repo, session_id="old", task_id="t1")
    (old.path / "stale.txt").write_text("x\n")
    new = await wt.create_worktree(repo, session_id="new", task_id="t1")
    assert new.path == old.path and new.branch == "loki/new/t1"
    assert not (new.path / "stale.txt").exists()
    (new.path.parent / "t2").mkdir()  # a stray folder (crash during `git worktree add`)
    (new.path.parent / "t2" / "junk").write_text("x")
    tree = await wt.create_worktree(repo, session_id="new", task_id="t2")
    assert sorted(p.name for p in tree.path.iterdir()) == [".git", "a.txt", "b.txt"]


async def test_a_failed_add_leaves_no_branch_behind(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """git makes the `-B` branch before it writes the folder: an add that failed (a full
    disk; here a file in the way) left `loki/<session>/<task>` behind."""
    real = wt._git

    async def add_into_an_obstacle(cwd: Path, *args: str, **kwargs: Any) -> Any:
        if args[:2] == ("worktree", "add"):
            await trio.Path(args[-2]).write_text("in the way\n")
        return await real(cwd, *args, **kwargs)

    monkeypatch.setattr(wt, "_git", add_into_an_obstacle)
    with pytest.raises(GitError, match="already exists"):
        await wt.create_worktree(repo, session_id="s1", task_id="prd-002")
    assert await branches(repo) == []
    assert not wt.worktree_path(repo, "prd-002").exists()
    assert await porcelain(repo) == ""


async def test_prune_removes_what_a_session_left(repo: Path) -> None:
    kept = await wt.create_worktree(repo, session_id="s2", task_id="t1")
    await wt.create_worktree(repo, session_id="s1", task_id="t2")
    gone = await wt.create_worktree(repo, session_id="s1", task_id="t3")
    await trio.run_process(["rm", "-rf", str(gone.path)])
    await git(repo, "branch", "loki/s1/lonely")

    assert await wt.prune_worktrees(repo, "s1") == 3

    assert await branches(repo) == [kept.branch]
    listed = await git(repo, "worktree", "list", "--porcelain")
    assert listed.count("worktree ") == 2 and str(kept.path) in listed
    assert await wt.prune_worktrees(repo, "s1") == 0
    assert await wt.prune_worktrees(repo.parent / "not-a-repo", "s1") == 0


async def test_not_a_git_repo(tmp_path: Path) -> None:
    assert not await wt.is_git_repo(tmp_path)
    problem = await wt.worktree_problem(tmp_path)
    assert problem is not None and problem.startswith("not a git work tree (fatal: not a git repo")
    assert not await wt.is_git_repo(tmp_path / "missing")
    with pytest.raises(GitError, match="not a git work tree"):
        await wt.create_worktree(tmp_path, session_id="s", task_id="t")


async def test_a_folder_inside_a_repo_is_not_its_top_level(repo: Path) -> None:
    (repo / "sub").mkdir()
    assert await wt.is_git_repo(repo)
    assert not await wt.is_git_repo(repo / "sub")
    problem = await wt.worktree_problem(repo / "sub")
    assert problem == f"the project folder is inside the git work tree {repo}, not its top level"


async def test_a_repo_without_commits(tmp_path: Path) -> None:
    await git(tmp_path, "init", "-q", "-b", "main")
    assert await wt.is_git_repo(tmp_path)
    problem = await wt.worktree_problem(tmp_path)
    assert problem is not None and "no commit yet" in problem
    with pytest.raises(GitError, match="no commit yet"):
        await wt.create_worktree(tmp_path, session_id="s", task_id="t")


async def test_without_git(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(repo / "no-bin"))
    assert not await wt.is_git_repo(repo)
    assert await wt.worktree_problem(repo) == "git is not installed (not on PATH)"


async def test_a_failing_git_command_names_itself_and_git_stderr(repo: Path) -> None:
    tree = wt.Worktree(repo / ".loki/worktrees/t", "loki/s/t", "0" * 40)
    with pytest.raises(GitError, match=r"worktree .* is gone"):
        await wt.merge_worktree(repo, tree, message="m")
    with pytest.raises(GitError) as caught:
        await wt._git(repo, "rev-parse", "--verify", "no-such-rev")
    assert caught.value.message.startswith("`git rev-parse --verify no-such-rev` failed (exit 128)")
    assert "fatal: Needed a single revision" in caught.value.message
    assert caught.value.returncode == 128


async def test_a_git_command_that_hangs_is_killed_at_its_timeout(repo: Path) -> None:
    with trio.fail_after(10), pytest.raises(GitError, match=r"did not finish within 0\.2 s"):
        await wt._git(repo, "-c", "alias.hang=!sleep 5", "hang", timeout=0.2)


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("prd-001", "prd-001"),
        ("agent_2.fix", "agent_2.fix"),
        ("a:b", "a-b-"),
        ("a..b", "a.b-"),
        ("x.lock", "x-lock-"),
        ("-flag", "flag-"),
        ("@", ""),
        ("ümlaut task/with space", "mlaut-task-with-space-"),
    ],
)
async def test_ref_components_are_valid_branch_names(raw: str, clean: str) -> None:
    name = wt.ref_component(raw)
    assert name.startswith(clean)
    if clean == raw:
        assert name == raw
    else:
        assert re.fullmatch(re.escape(clean) + r"[0-9a-f]{8}", name)
    await git(Path.cwd(), "check-ref-format", "--branch", f"loki/{name}/{name}")


@given(st.text(min_size=1, max_size=80))
def test_ref_component_is_safe_and_keeps_ids_apart(raw: str) -> None:
    name = wt.ref_component(raw)
    assert re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]*", name)
    assert ".." not in name and not name.endswith((".", ".lock"))
    assert wt.ref_component(raw + "x") != name


def test_git_check_ref_format_agrees_with_a_sample() -> None:
    samples = ["a:b", "a..b", "x.lock", "~^?*[", "\\", "a b", ".hidden", "end.", "@{x}"]
    for raw in samples:
        name = wt.ref_component(raw)
        subprocess.run(["git", "check-ref-format", "--branch", f"loki/s/{name}"], check=True)
