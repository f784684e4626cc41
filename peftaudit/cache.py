"""A cache of finished reports, so a second report of the same model skips torch.

Keyed by the exact config, the source, the versions of peftaudit and of the
libraries its figures depend on (transformers, torch, and peft and bitsandbytes,
which the default report's memory estimates model; read from package metadata,
not by importing them) and the build options. One entry serves the default
report and ``--params-only``: it holds the default report's memory table and
recommendation once one was asked for (:func:`peftaudit.report.report_for`).
Entries are JSON written atomically; an entry that cannot be read back as a
report (truncated, ``null``, the wrong shape) is a miss, rebuilt and overwritten.
``PEFTAUDIT_CACHE_DIR`` moves the cache; ``PEFTAUDIT_NO_CACHE=1`` turns it off.
"""

from __future__ import annotations

import json
import os
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from peftaudit._version import __version__
from peftaudit.render.json import dumps

if TYPE_CHECKING:  # pragma: no cover
    from peftaudit.report import Report
    from peftaudit.sources.base import ResolvedModel, SourceOptions


#: Bumped whenever what a report holds changes between releases (2: the towers of vision-language
#: models), so a report cached by an earlier build is rebuilt rather than shown without them.
REPORT_FORMAT = 2


def cache_dir() -> Path:
    """Where reports are cached (``PEFTAUDIT_CACHE_DIR``)."""
    return _folder("PEFTAUDIT_CACHE_DIR", "reports")


def profiles_dir() -> Path:
    """Where derived step profiles are stored (``PEFTAUDIT_PROFILE_DIR``, :mod:`peftaudit.memory.derived.store`)."""
    return _folder("PEFTAUDIT_PROFILE_DIR", "profiles")


def _folder(variable: str, name: str) -> Path:
    explicit = os.environ.get(variable)
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "peftaudit" / name


def enabled() -> bool:
    return os.environ.get("PEFTAUDIT_NO_CACHE", "").strip().lower() in ("", "0", "false", "no")


def key_for(resolved: ResolvedModel, options: SourceOptions) -> str | None:
    """The cache key for this model and options, or ``None`` when caching is off."""
    if not enabled():
        return None
    return resolved.fingerprint(
        f"peftaudit={__version__}",
        f"report_format={REPORT_FORMAT}",
        f"transformers={installed_version('transformers')}",
        f"torch={installed_version('torch')}",
        # The memory table at a glance models the installed peft and bitsandbytes (memory.stack.installed).
        f"peft={installed_version('peft')}",
        f"bitsandbytes={installed_version('bitsandbytes')}",
        f"trust_remote_code={options.trust_remote_code}",
        f"id={resolved.id}",
        f"origin={resolved.origin}",
        f"notes={'|'.join(resolved.notes)}",
    )


def load(key: str) -> Report | None:
    """The cached report for ``key``, or ``None`` if absent or unreadable."""
    from peftaudit.report import SCHEMA_VERSION, Report

    path = cache_dir() / f"{key}.json"
    if not path.is_file():  # absent, or a FIFO or device that reading could block on
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION:
            return None
        return Report.from_dict(data)
    except Exception:  # any entry we cannot read back is a miss, rebuilt and overwritten
        # A truncated file, ``null``, ``[]``, a field of the wrong type: the cache only saves
        # time, so nothing in it may turn a good report into an error.
        return None


def store(key: str, report: Report) -> None:
    """Write the report atomically; a cache that cannot be written is skipped silently."""
    from peftaudit.errors import PeftauditError
    from peftaudit.files import write_atomic

    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(folder / f"{key}.json", dumps(report.to_dict(), compact=True))
    except (OSError, PeftauditError):
        pass  # a cache that cannot be written is skipped: the report itself is unaffected


def installed_version(dist: str) -> str:
    """The installed version of a distribution, read from its metadata (no import), or ``absent``."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "absent"
