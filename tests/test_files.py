"""``write_atomic``: what ``-o FILE`` does with each kind of FILE (real files, links, FIFOs, devices)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from peftaudit.errors import PeftauditError
from peftaudit.files import write_atomic


def test_a_regular_file_is_replaced_whole_and_keeps_its_permissions(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    target.write_text("old")
    target.chmod(0o640)
    before = os.stat(target)
    write_atomic(target, "new")
    after = os.stat(target)
    assert target.read_text() == "new"
    assert after.st_ino != before.st_ino  # renamed over, not rewritten in place: readers never see half
    assert stat.S_IMODE(after.st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_a_new_file_gets_the_permissions_open_would_give(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        write_atomic(tmp_path / "new.json", b"data")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "new.json").st_mode) == 0o640


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    """A real failure: a file-size limit (``ulimit -f``) makes the write fail with EFBIG halfway."""
    target = tmp_path / "out.json"
    target.write_text("old")
    script = (
        "import resource, sys\n"
        "from peftaudit.errors import PeftauditError\n"
        "from peftaudit.files import write_atomic\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))\n"
        "try:\n"
        f"    write_atomic({str(target)!r}, 'x' * 100_000)\n"
        "except PeftauditError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == f"{target}: cannot write: File too large", result.stderr
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_a_chain_of_symlinks_is_followed_to_the_file(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "real.json").write_text("old")
    (tmp_path / "data" / "current.json").symlink_to("real.json")
    (tmp_path / "out.json").symlink_to("data/current.json")
    write_atomic(tmp_path / "out.json", "new")
    assert os.readlink(tmp_path / "out.json") == "data/current.json"
    assert os.readlink(tmp_path / "data" / "current.json") == "real.json"
    assert (tmp_path / "data" / "real.json").read_text() == "new"
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["current.json", "real.json"]


def test_a_symlink_loop_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    with pytest.raises(PeftauditError, match="symbolic links"):
        write_atomic(tmp_path / "a", "x")
    assert (tmp_path / "a").is_symlink() and (tmp_path / "b").is_symlink()


def test_a_fifo_is_written_through(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    write_atomic(fifo, "through the pipe\n" * 10_000)  # more than a pipe buffer holds
    reader.join(timeout=10)
    assert got == [b"through the pipe\n" * 10_000]
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_dev_null_is_written_through_not_replaced(tmp_path: Path) -> None:
    node = tmp_path / "null"
    try:
        os.mknod(node, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("creating a character device needs root (CAP_MKNOD)")
    try:
        os.close(os.open(node, os.O_WRONLY))
    except PermissionError:
        pytest.skip("the temporary folder is mounted nodev: its device nodes cannot be opened")
    write_atomic(node, "gone")
    assert stat.S_ISCHR(os.lstat(node).st_mode)
    assert node.read_bytes() == b""  # it is /dev/null: nothing was kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["null"]


def test_our_own_descriptor_is_written_to(tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    try:
        write_atomic(f"/dev/fd/{write_end}", "to the descriptor")
        os.close(write_end)
        assert os.read(read_end, 100) == b"to the descriptor"
    finally:
        os.close(read_end)


@pytest.mark.parametrize("kind", ["directory", "block device"])
def test_other_kinds_are_refused_in_one_line(tmp_path: Path, kind: str) -> None:
    target = tmp_path / "target"
    if kind == "directory":
        target.mkdir()
    else:
        try:
            os.mknod(target, 0o600 | stat.S_IFBLK, os.makedev(7, 0))  # a loop device: never opened
        except PermissionError:
            pytest.skip("creating a block device needs root (CAP_MKNOD)")
    with pytest.raises(PeftauditError, match=f"cannot write to a {kind}"):
        write_atomic(target, "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]


def test_a_missing_folder_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(PeftauditError, match="does not exist"):
        write_atomic(tmp_path / "no" / "such.json", "x")
