"""Writing files so that a reader never sees half of one: nothing is half-written, nothing is lost."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from peftaudit.errors import PeftauditError


def write_atomic(target: str | os.PathLike[str], data: str | bytes) -> None:
    """Write ``data`` to ``target`` through a temporary file in the same folder, then rename it.

    The old file (if any) stays whole until the new one is complete and synced;
    a failure leaves no temporary behind and raises a one-line error.
    """
    path = Path(target)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise PeftauditError(f"{path}: directory {folder} does not exist")
    try:
        fd, temp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise PeftauditError(f"{path}: cannot write: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data.encode("utf-8") if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp, 0o666 & ~_umask())  # mkstemp makes 0600; give the permissions a plain open() would
        os.replace(temp, path)
    except OSError as exc:
        Path(temp).unlink(missing_ok=True)
        raise PeftauditError(f"{path}: cannot write: {exc.strerror or exc}") from None
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current
