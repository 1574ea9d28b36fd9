"""lokid.loki_mirror.MirrorState: a file is written only when its content changes."""

from __future__ import annotations

import os
from pathlib import Path

from lokid import lokidir as ld
from lokid.loki_mirror import MirrorState


def test_a_first_write_of_the_bytes_already_on_disk_leaves_the_file_alone(
    tmp_path: Path,
) -> None:
    path = tmp_path / "queue.json"
    path.write_bytes(b"[]\n")
    inode = path.stat().st_ino
    MirrorState().write(path, b"[]\n")
    assert path.stat().st_ino == inode  # not replaced (a replace makes a new file)


def test_other_bytes_replace_the_file_and_the_same_bytes_again_do_not(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(b"{}\n")
    state = MirrorState()
    state.write(path, b'{"a": 1}\n')
    assert path.read_bytes() == b'{"a": 1}\n'
    inode = path.stat().st_ino
    state.write(path, b'{"a": 1}\n')
    assert path.stat().st_ino == inode
    state.write(path, b'{"a": 2}\n')
    assert path.read_bytes() == b'{"a": 2}\n'


def test_a_missing_file_is_created(tmp_path: Path) -> None:
    path = tmp_path / "current-task.json"
    MirrorState().write(path, b"{}\n")
    assert path.read_bytes() == b"{}\n"


def test_a_link_to_the_same_bytes_is_replaced_by_a_plain_file(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.json"
    target.write_bytes(b"[]\n")
    path = tmp_path / "queue.json"
    path.symlink_to(target)
    MirrorState().write(path, b"[]\n")
    assert not path.is_symlink()
    assert path.read_bytes() == b"[]\n"


def test_a_fifo_in_the_way_neither_hangs_nor_stays(tmp_path: Path) -> None:
    path = tmp_path / "queue.json"
    os.mkfifo(path)
    MirrorState().write(path, b"[]\n")  # would block forever if the FIFO were opened to read
    assert path.is_file() and path.read_bytes() == b"[]\n"


def test_a_session_starting_in_a_fresh_loki_dir_keeps_its_empty_queues(tmp_path: Path) -> None:
    paths = ld.init_loki_dir(tmp_path)
    names = ("in-progress", "completed", "failed")
    inodes = {name: paths.queue(name).stat().st_ino for name in names}
    state = MirrorState()
    for name in names:
        state.write(paths.queue(name), ld.encode_queue([]))
    assert {name: paths.queue(name).stat().st_ino for name in names} == inodes
