"""The ``Snapshot``: fingerprints of every tensor of a model or checkpoint, and its JSON form."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftaudit._version import __version__
from peftaudit.errors import PeftauditError
from peftaudit.render.json import dumps
from peftaudit.verification.errors import SnapshotError
from peftaudit.verification.expectations import Expectations
from peftaudit.verification.fingerprint import HASH_NAME, SamplePolicy, TensorFingerprint
from peftaudit.verification.values import ValueSource

if TYPE_CHECKING:  # pragma: no cover
    from peftaudit.verification.verdict import Verdict

FORMAT = "peftaudit-snapshot"
VERSION = 1


@dataclass(frozen=True)
class Snapshot:
    """Per-tensor fingerprints of a model or checkpoint at one moment.

    Small: a digest and a bounded sample per tensor, never a copy of the
    weights. Serialise it with :meth:`save` to compare later, in another
    process or on another machine. ``tied`` lists names that shared one
    parameter; ``expectations`` records what a PeftModel intended to train.
    """

    tensors: tuple[TensorFingerprint, ...]
    source: str
    kind: str
    policy: SamplePolicy = field(default_factory=SamplePolicy)
    tied: tuple[tuple[str, ...], ...] = ()
    expectations: Expectations | None = None
    adapter_config: Mapping[str, Any] | None = None
    #: Where the tensors' values can still be read (a checkpoint on disk); never serialised.
    values: ValueSource | None = field(default=None, compare=False, repr=False)

    @cached_property
    def by_name(self) -> dict[str, TensorFingerprint]:
        return {t.name: t for t in self.tensors}

    def __getitem__(self, name: str) -> TensorFingerprint:
        return self.by_name[name]

    def __contains__(self, name: object) -> bool:
        return name in self.by_name

    def __iter__(self) -> Iterator[TensorFingerprint]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data fingerprinted (each shared tensor counted once per name)."""
        return sum(t.nbytes for t in self.tensors)

    def only_intended_changed(self, after: Any, **options: Any) -> Verdict:
        """Shorthand for ``verify(self, after, **options)``; the verdict is truthy when it passes."""
        from peftaudit.verification.api import verify

        return verify(self, after, **options)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "hash": HASH_NAME,
            "peftaudit": __version__,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "source": self.source,
            "kind": self.kind,
            "policy": {"whole_below": self.policy.whole_below, "points": self.policy.points},
            "tied": [list(group) for group in self.tied],
            "expectations": None if self.expectations is None else self.expectations.to_dict(),
            "adapter_config": None if self.adapter_config is None else dict(self.adapter_config),
            "tensors": [t.to_dict() for t in self.tensors],
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "snapshot") -> Snapshot:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise SnapshotError(f'{where}: not a peftaudit snapshot (no "format": "{FORMAT}")')
        if data.get("version") != VERSION or data.get("hash") != HASH_NAME:
            raise SnapshotError(
                f"{where}: snapshot version {data.get('version')} / {data.get('hash')} is not "
                f"version {VERSION} / {HASH_NAME}; take it again with this peftaudit"
            )
        try:
            policy = data.get("policy") or {}
            expectations = data.get("expectations")
            return cls(
                tensors=tuple(TensorFingerprint.from_dict(t) for t in data["tensors"]),
                source=str(data.get("source", "")),
                kind=str(data.get("kind", "")),
                policy=SamplePolicy(int(policy.get("whole_below", 0)), int(policy.get("points", 0))),
                tied=tuple(tuple(str(n) for n in group) for group in data.get("tied", ())),
                expectations=None if expectations is None else Expectations.from_dict(expectations),
                adapter_config=data.get("adapter_config"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SnapshotError(f"{where}: malformed snapshot: {exc!r}") from None

    def save(self, path: str | os.PathLike[str], *, force: bool = False) -> Path:
        """Write the JSON form atomically: readers see the old file or the whole new one.

        An existing file at ``path`` is replaced only if it is a snapshot
        (see :func:`check_snapshot_target`), unless ``force``.
        """
        target = Path(path)
        check_snapshot_target(target, source=self.source, force=force)
        text = dumps(self.to_dict(), compact=True)
        write_atomically(target, text)
        return target

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Snapshot:
        """Read a snapshot written by :meth:`save` (or ``peftaudit snapshot -o``)."""
        where = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise SnapshotError(f"{where}: cannot read: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise SnapshotError(f"{where}: not a peftaudit snapshot (not UTF-8 text)") from None
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise SnapshotError(f"{where}: not a peftaudit snapshot (invalid JSON: {exc})") from None
        return cls.from_dict(data, where)


def is_snapshot_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` looks like a snapshot file (a ``.json`` that is not a checkpoint index)."""
    target = Path(path)
    return target.is_file() and target.suffix == ".json" and not target.name.endswith(".index.json")


#: A file larger than this is not read to find out whether it is a snapshot (snapshots are small).
MAX_SNAPSHOT_PROBE = 256 << 20


def check_snapshot_target(
    path: str | os.PathLike[str], *, source: str | os.PathLike[str] | None = None, force: bool = False
) -> None:
    """Refuse to write a snapshot over an existing file that is not one, unless ``force``.

    A regular file (symlinks followed) may be replaced only if it is a
    peftaudit snapshot: ``snapshot CKPT -o CKPT/model.safetensors`` must not
    destroy the checkpoint it fingerprints, nor any other file named by
    mistake. New paths, devices and pipes are not refused. ``source`` (the
    checkpoint being fingerprinted) only sharpens the message.
    """
    target = Path(path)
    try:
        mode = target.stat().st_mode
    except OSError:
        return  # a new path, or one the write itself will report
    if force or not stat.S_ISREG(mode) or _is_snapshot(target):
        return
    what = "is not a peftaudit snapshot"
    if source is not None and _inside(target, Path(source)):
        what = f"is a file of the checkpoint being fingerprinted ({source}), not a peftaudit snapshot"
    raise SnapshotError(f"{target}: {what}; refusing to overwrite it (pass --force to replace it anyway)")


def _inside(target: Path, source: Path) -> bool:
    try:
        real, root = target.resolve(), source.resolve()
    except OSError:
        return False
    return real == root or (root.is_dir() and real.is_relative_to(root))


def _is_snapshot(path: Path) -> bool:
    from peftaudit.verification.checkpoint import open_regular

    try:
        with open_regular(path) as handle:
            if os.fstat(handle.fileno()).st_size > MAX_SNAPSHOT_PROBE or not handle.read(64).lstrip().startswith(b"{"):
                return False
            handle.seek(0)
            data = json.loads(handle.read().decode("utf-8"))
    except (OSError, PeftauditError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT


def write_atomically(target: Path, text: str) -> None:
    """Write ``text`` to ``target`` atomically (see :func:`peftaudit.files.write_atomic`)."""
    from peftaudit.files import write_atomic

    try:
        write_atomic(target, text)
    except SnapshotError:
        raise
    except PeftauditError as exc:
        raise SnapshotError(str(exc)) from None
