"""Checkpoints on disk: finding the weight files, validating them, reading them by offset.

safetensors files are parsed by :mod:`safetensors_format` and memory-mapped;
hashing walks each tensor's byte range in chunks and tells the kernel to drop
the pages it has read, so resident memory stays flat however large the
checkpoint. Pickle files (``.bin``, ``.pt``) are refused unless the caller
allows them, and then loaded with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import re
import stat as stat_module
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np

from peftaudit.verification.dtypes import lookup
from peftaudit.verification.errors import CheckpointError
from peftaudit.verification.fingerprint import CHUNK_BYTES, Buffer
from peftaudit.verification.safetensors_format import HeaderEntry, header_length, parse_header, refuse_constant

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
#: Index and config files are small; a huge one is refused rather than read.
MAX_JSON_BYTES = 64 << 20
_PAGE = mmap.PAGESIZE


@dataclass(frozen=True)
class TensorSpec:
    """Name, element type and shape of one stored tensor."""

    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class _Stamp:
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class CheckpointLayout:
    """What a path holds: its weight files, their tensors, and any adapter config."""

    description: str
    root: Path
    format: Literal["safetensors", "pickle"]
    files: tuple[Path, ...]
    specs: tuple[TensorSpec, ...]
    adapter_config: dict[str, Any] | None
    is_adapter: bool
    #: safetensors only: where each tensor's bytes are.
    entries: Mapping[str, tuple[Path, HeaderEntry]] = field(default_factory=dict)
    stamps: Mapping[Path, _Stamp] = field(default_factory=dict)


def locate(path: str | os.PathLike[str], *, allow_pickle: bool = False) -> CheckpointLayout:
    """Find and validate the weight files at ``path`` (a directory or one file)."""
    target = Path(path)
    if not target.exists():
        raise CheckpointError(f"{target}: no such file or directory")
    root = target if target.is_dir() else target.parent
    if target.is_dir():
        kind, files, index = _choose_files(target, allow_pickle)
    elif target.name.endswith(".index.json"):
        kind = "pickle" if ".bin" in target.name or ".pt" in target.name else "safetensors"
        files, index = _read_index(target), target
    elif target.suffix == ".safetensors":
        kind, files, index = "safetensors", [target], None
    elif target.suffix in _PICKLE_SUFFIXES:
        kind, files, index = "pickle", [target], None
    else:
        raise CheckpointError(f"{target}: not a checkpoint (expected .safetensors, an index, or a directory)")
    for file in files:
        _require_regular(file)
    if kind == "pickle" and not allow_pickle:
        raise CheckpointError(
            f"{target}: holds pickle weights ({files[0].name}); pickle can run code on load, so it is "
            "refused unless you pass --allow-pickle (then loaded with torch.load(weights_only=True))"
        )
    adapter_config = _read_adapter_config(root)
    names = [f.name for f in files]
    is_adapter = any(n.startswith("adapter_model") for n in names)
    if kind == "pickle":
        return CheckpointLayout(str(target), root, "pickle", tuple(files), (), adapter_config, is_adapter)
    entries: dict[str, tuple[Path, HeaderEntry]] = {}
    stamps: dict[Path, _Stamp] = {}
    for file in files:
        header_entries, stamp = read_safetensors_header(file)
        stamps[file] = stamp
        for entry in header_entries:
            if entry.name in entries:
                raise CheckpointError(f"{file}: tensor {entry.name!r} also stored in {entries[entry.name][0].name}")
            entries[entry.name] = (file, entry)
    if index is not None:
        _check_index_matches(index, entries)
    specs = tuple(TensorSpec(e.name, e.dtype, e.shape) for _, e in entries.values())
    return CheckpointLayout(
        str(target), root, "safetensors", tuple(files), specs, adapter_config, is_adapter, entries, stamps
    )


def open_regular(path: Path) -> BinaryIO:
    """Open ``path`` for reading if it is a regular file (symlinks followed); refuse anything else.

    A named pipe would block ``open()`` until a writer appears, and a device
    would be read without end, so the file is opened non-blocking and its
    type checked on the open descriptor (no window between check and open).
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat_module.S_ISREG(mode):
            raise CheckpointError(f"{path}: not a regular file ({_file_kind(mode)}); refusing to read it")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _file_kind(mode: int) -> str:
    kinds = (
        (stat_module.S_ISFIFO, "a named pipe"),
        (stat_module.S_ISCHR, "a character device"),
        (stat_module.S_ISBLK, "a block device"),
        (stat_module.S_ISSOCK, "a socket"),
        (stat_module.S_ISDIR, "a directory"),
    )
    return next((name for test, name in kinds if test(mode)), "not a plain file")


def _require_regular(path: Path) -> None:
    """Refuse a weight file that is not a regular file before anything opens it (torch.load would block on a FIFO)."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if not stat_module.S_ISREG(mode):
        raise CheckpointError(f"{path}: not a regular file ({_file_kind(mode)}); refusing to read it")


def read_safetensors_header(file: Path) -> tuple[tuple[HeaderEntry, ...], _Stamp]:
    """Parse and validate one safetensors file's header."""
    try:
        with open_regular(file) as handle:
            stat = os.fstat(handle.fileno())
            n = header_length(handle.read(8), stat.st_size, str(file))
            header = parse_header(handle.read(n), stat.st_size, str(file))
    except OSError as exc:
        raise CheckpointError(f"{file}: cannot read: {exc.strerror or exc}") from None
    return header.entries, _Stamp(stat.st_size, stat.st_mtime_ns)


def _choose_files(
    directory: Path, allow_pickle: bool
) -> tuple[Literal["safetensors", "pickle"], list[Path], Path | None]:
    # The order transformers and peft look in; a full model wins over an adapter.
    for single, index_name in (
        ("model.safetensors", "model.safetensors.index.json"),
        ("adapter_model.safetensors", None),
    ):
        if (directory / single).is_file():
            return "safetensors", [directory / single], None
        if index_name and (directory / index_name).is_file():
            return "safetensors", _read_index(directory / index_name), directory / index_name
    indexes = sorted(directory.glob("*.safetensors.index.json"))
    if len(indexes) == 1:
        return "safetensors", _read_index(indexes[0]), indexes[0]
    singles = sorted(directory.glob("*.safetensors"))
    if len(singles) == 1 and not indexes:
        return "safetensors", singles, None
    if len(singles) > 1 or len(indexes) > 1:
        listed = ", ".join(p.name for p in (indexes or singles)[:4])
        raise CheckpointError(f"{directory}: several weight files and no single index to say which: {listed}")
    for single, index_name in (("pytorch_model.bin", "pytorch_model.bin.index.json"), ("adapter_model.bin", None)):
        if (directory / single).is_file():
            return "pickle", [directory / single], None
        if index_name and (directory / index_name).is_file():
            return "pickle", _read_index(directory / index_name), directory / index_name
    pickles = sorted(p for p in directory.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if len(pickles) == 1:
        return "pickle", pickles, None
    raise CheckpointError(f"{directory}: no weights found (no *.safetensors, no index, no pytorch_model.bin)")


def _load_json(path: Path, what: str) -> Any:
    try:
        with open_regular(path) as handle:
            size = os.fstat(handle.fileno()).st_size
            if size > MAX_JSON_BYTES:
                raise CheckpointError(f"{path}: {what} of {size} bytes exceeds the {MAX_JSON_BYTES}-byte limit")
            # NaN and Infinity are Python's extension, not JSON: refused here so they never reach a snapshot.
            return json.loads(handle.read(MAX_JSON_BYTES + 1).decode("utf-8"), parse_constant=refuse_constant)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read {what}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path}: {what} is not valid JSON: {exc}") from None


def _read_index(index: Path) -> list[Path]:
    """Shard files an index names, each confined to the index's own directory (or its hub cache repo)."""
    data = _load_json(index, "index")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: index has no weight_map")
    root, where = confinement(index)
    shards: dict[str, Path] = {}
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise CheckpointError(f"{index}: weight_map entry for {tensor!r} is not a file name")
        if shard not in shards:
            shards[shard] = _confined(index, root, where, shard)
    return list(shards.values())


#: Repository folders of a Hugging Face hub cache: ``models--org--name`` (and datasets, spaces).
_HUB_REPO_FOLDER = re.compile(r"^(models|datasets|spaces)--.+")


def confinement(index: Path) -> tuple[Path, str]:
    """The folder an index's shards must resolve into, and its name for messages.

    Normally the index's own directory. In a Hugging Face hub cache
    (``<cache>/models--org--name/snapshots/<revision>/``) every file is a
    symlink into ``../../blobs/``, so there the repository's folder
    ``models--org--name`` is the boundary: a shard may resolve into its blobs,
    never into another repository or anywhere else.
    """
    root = index.parent.resolve()
    for folder in (root, *root.parents):
        if folder.name == "snapshots" and _HUB_REPO_FOLDER.match(folder.parent.name) and folder != root:
            return folder.parent, f"the hub cache folder {folder.parent}"
    return root, "the checkpoint directory"


def _confined(index: Path, root: Path, where: str, shard: str) -> Path:
    candidate = Path(shard)
    if candidate.is_absolute() or candidate.drive or ".." in candidate.parts:
        raise CheckpointError(f"{index}: shard {shard!r} points outside the checkpoint directory")
    resolved = (index.parent / candidate).resolve()
    if not resolved.is_relative_to(root):
        raise CheckpointError(f"{index}: shard {shard!r} resolves outside {where} (to {resolved})")
    if not resolved.exists():  # a file that is not regular is refused when it is opened
        raise CheckpointError(f"{index}: shard {shard!r} is missing")
    return index.parent / candidate


def _check_index_matches(index: Path, entries: Mapping[str, tuple[Path, HeaderEntry]]) -> None:
    weight_map: dict[str, str] = _load_json(index, "index")["weight_map"]
    for tensor, shard in weight_map.items():
        held = entries.get(tensor)
        if held is None:
            raise CheckpointError(f"{index}: names {tensor!r} in {shard}, which does not hold it")
        if held[0].resolve() != (index.parent / shard).resolve():
            raise CheckpointError(f"{index}: names {tensor!r} in {shard}, but it is in {held[0].name}")
    extra = sorted(set(entries) - set(weight_map))
    if extra:
        raise CheckpointError(f"{index}: shard tensors missing from the weight_map: {', '.join(extra[:3])}")


def _read_adapter_config(root: Path) -> dict[str, Any] | None:
    path = root / "adapter_config.json"
    if not path.exists() and not path.is_symlink():
        return None
    data = _load_json(path, "adapter config")
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: adapter config is not a JSON object")
    return data


class SafetensorsValues:
    """Memory-mapped, read-only access to the tensors of validated safetensors files."""

    def __init__(self, layout: CheckpointLayout) -> None:
        self._layout = layout
        self._maps: dict[Path, mmap.mmap] = {}
        self._lock = threading.Lock()

    def _map(self, path: Path) -> mmap.mmap:
        with self._lock:
            mapped = self._maps.get(path)
            if mapped is None:
                with open_regular(path) as handle:
                    stat = os.fstat(handle.fileno())
                    expected = self._layout.stamps[path]
                    if (stat.st_size, stat.st_mtime_ns) != (expected.size, expected.mtime_ns):
                        raise CheckpointError(f"{path}: changed on disk since its header was read")
                    mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
                self._maps[path] = mapped
            return mapped

    def _where(self, name: str) -> tuple[mmap.mmap, HeaderEntry, int]:
        path, entry = self._layout.entries[name]
        dtype = lookup(entry.dtype)
        itemsize = dtype.itemsize if dtype else None
        if itemsize is None:
            raise CheckpointError(f"{name}: {entry.dtype} elements are not byte-addressable")
        return self._map(path), entry, itemsize

    def read(self, name: str, start: int, stop: int) -> Buffer:
        mapped, entry, itemsize = self._where(name)
        return memoryview(mapped)[entry.start + start * itemsize : entry.start + stop * itemsize]

    def gather(self, name: str, positions: np.ndarray) -> bytes:
        mapped, entry, itemsize = self._where(name)
        if positions.size == 0:
            return b""
        rows = np.frombuffer(mapped, dtype=np.uint8, count=entry.stop - entry.start, offset=entry.start)
        picked = rows.reshape(-1, itemsize)[positions].tobytes()
        del rows
        return picked

    def release(self, name: str, start: int, stop: int) -> None:
        """Drop the pages of elements ``[start, stop)`` from this process's resident memory."""
        mapped, entry, itemsize = self._where(name)
        _drop_pages(mapped, entry.start + start * itemsize, entry.start + stop * itemsize)

    def chunks(self, name: str) -> Iterator[Buffer]:
        path, entry = self._layout.entries[name]
        mapped = self._map(path)
        view = memoryview(mapped)
        try:
            for offset in range(entry.start, entry.stop, CHUNK_BYTES):
                end = min(offset + CHUNK_BYTES, entry.stop)
                yield view[offset:end]
                _drop_pages(mapped, offset, end)
        finally:
            view.release()

    def close(self) -> None:
        with self._lock:
            for mapped in self._maps.values():
                # A caller may still hold a view; then the map closes when it is collected.
                with contextlib.suppress(BufferError):
                    mapped.close()
            self._maps.clear()


def _drop_pages(mapped: mmap.mmap, start: int, end: int) -> None:
    """Release read pages from this process (they stay in the page cache for others)."""
    aligned = start - start % _PAGE
    with contextlib.suppress(AttributeError, OSError, ValueError):  # madvise is Linux/BSD only
        mapped.madvise(mmap.MADV_DONTNEED, aligned, end - aligned)
