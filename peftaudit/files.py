"""Writing files so that a reader never sees half of one: nothing is half-written, nothing is lost.

What ``-o FILE`` means depends on what ``FILE`` is, as it does for a shell's ``>``:

* a regular file, or a new name: replaced atomically (a temporary file in the
  same folder, synced, then renamed over it), so a reader sees the old file
  or the whole new one, never half of either;
* a symlink: followed, and the file it points at is replaced (or created); the
  link stays a link;
* a character device (``/dev/null``, a terminal) or a FIFO: written through;
  renaming over them would turn ``/dev/null`` into a regular file;
* one of our own open descriptors (``/dev/stdout``, ``/dev/fd/N``,
  ``/proc/self/fd/N``): written to that descriptor, so ``-o /dev/stdout >> log``
  appends to the log as the shell set it up, instead of replacing it;
* anything else (a directory, a block device, a socket): refused in one line.
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from peftaudit.errors import PeftauditError

#: Linux's limit on symlinks followed in one lookup (``MAXSYMLINKS``).
_MAX_LINKS = 40
#: A descriptor link once its folder is resolved (``/proc/self`` resolves to ``/proc/PID``).
_FD_LINK = re.compile(r"/proc/(\d+)/fd/(\d+)")


def write_atomic(target: str | os.PathLike[str], data: str | bytes) -> None:
    """Write ``data`` to ``target``: atomically for regular files, through devices and FIFOs.

    Symlinks are followed (the file they point at is replaced, the link kept);
    a regular file keeps its permission bits. The old file (if any) stays whole
    until the new one is complete and synced; a failure leaves no temporary
    behind and raises a one-line :class:`~peftaudit.errors.PeftauditError`.
    See the module docstring for every kind of target.
    """
    path = Path(target)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd = _own_descriptor(path)
    if fd is not None:
        _write_all(path, fd, payload)
        return
    try:
        info: os.stat_result | None = os.stat(path)
    except FileNotFoundError:
        info = None  # a new file, or a symlink to one not made yet
    except OSError as exc:
        raise PeftauditError(f"{path}: cannot write: {exc.strerror or exc}") from None
    if info is not None and not stat.S_ISREG(info.st_mode):
        if stat.S_ISCHR(info.st_mode) or stat.S_ISFIFO(info.st_mode):
            _write_through(path, payload)
            return
        raise PeftauditError(f"{path}: cannot write to {_kind(info.st_mode)}: not a file, FIFO or character device")
    _replace(_final(path), payload, None if info is None else stat.S_IMODE(info.st_mode))


def _replace(path: Path, payload: bytes, mode: int | None) -> None:
    """Write a temporary file beside ``path``, sync it, rename it over ``path``."""
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise PeftauditError(f"{path}: directory {folder} does not exist")
    try:
        fd, temp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise PeftauditError(f"{path}: cannot write: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp makes 0600: keep the replaced file's permissions, or give those a plain open() would.
        os.chmod(temp, mode if mode is not None else 0o666 & ~_umask())
        os.replace(temp, path)
    except OSError as exc:
        Path(temp).unlink(missing_ok=True)
        raise PeftauditError(f"{path}: cannot write: {exc.strerror or exc}") from None
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _write_through(path: Path, payload: bytes) -> None:
    """Open an existing device or FIFO for writing (a FIFO waits for its reader, as with ``>``)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise PeftauditError(f"{path}: cannot write: {exc.strerror or exc}") from None
    try:
        _write_all(path, fd, payload)
    finally:
        os.close(fd)


def _write_all(path: Path, fd: int, payload: bytes) -> None:
    view = memoryview(payload)
    try:
        while view:
            view = view[os.write(fd, view) :]
    except BrokenPipeError:
        raise  # the reader went away: the CLI treats this like `| head`
    except OSError as exc:
        raise PeftauditError(f"{path}: cannot write: {exc.strerror or exc}") from None


def _links(path: Path) -> Iterator[Path]:
    """``path``, then each path its symlinks lead to, their folders resolved; the last is no symlink.

    Folders are resolved at each step (``/dev/fd`` -> ``/proc/PID/fd``) but the
    last name is not: a descriptor's link is where the descriptor shows.
    """
    current = Path(os.path.abspath(path))
    for _ in range(_MAX_LINKS):
        current = current.parent.resolve() / current.name
        yield current
        if not current.is_symlink():
            return
        current = Path(os.path.abspath(current.parent / os.readlink(current)))
    raise PeftauditError(f"{path}: cannot write: too many levels of symbolic links")


def _final(path: Path) -> Path:
    """``path`` with every symlink followed; a dangling link gives the path it would create."""
    if not path.is_symlink():
        return path  # as given, so errors name what the user typed
    *_, last = _links(path)
    return last


def _own_descriptor(path: Path) -> int | None:
    """The descriptor ``path`` names if it is one of this process's (``/dev/stdout``, ``/dev/fd/1``)."""
    try:
        for link in _links(path):
            match = _FD_LINK.fullmatch(str(link))
            if match:
                pid, fd = match.groups()
                return int(fd) if int(pid) == os.getpid() else None
    except (OSError, PeftauditError):
        return None  # not ours to decide here: the write itself reports a broken path
    return None


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a special file"


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current
