"""The GPU catalog: bundled facts with their sources, plus plugins' GPUs and the user's own file.

Vendor memory (the GB on the box) and usable memory (what the driver reports
as total, which is what training can use) are kept apart, and so are dense
and sparse throughput: only dense figures are stored. No price is bundled as
fact; prices come from the user's GPU file or ``--price``.

The user's file is TOML, at ``$PEFTAUDIT_GPUS_FILE`` or
``~/.config/peftaudit/gpus.toml``::

    [gpu."H100 SXM"]
    price_per_hour = 2.49          # your price, in your currency

    [gpu."My Cluster Card"]        # a GPU we do not ship
    memory_gb = 48
    usable_gib = 46.5
    bandwidth_gbs = 900
    tflops = { bf16 = 300, fp8 = 600 }

Every figure, from the bundled file, the user's file or a plugin, passes the
same checks (:func:`check_gpu`): numbers are numbers (not strings, not
booleans) and finite (TOML allows ``nan`` and ``inf``), memory is positive,
and bandwidth, throughput and price are not negative. ``--price -1`` is
refused, and so is ``price_per_hour = -1`` in the file.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from peftaudit import plugins
from peftaudit.errors import PeftauditError
from peftaudit.units import GIB, is_finite_number

DTYPES = ("bf16", "fp16", "fp8", "fp32")


@dataclass(frozen=True)
class GPU:
    """One accelerator model with the figures sizing needs, each with its source."""

    name: str
    vendor: str
    memory_gb: float
    """The vendor's memory figure as printed (marketing GB)."""
    usable_bytes: int
    """Total memory as the driver reports it: the ceiling for one process."""
    usable_source: str
    bandwidth_gbs: float
    tflops: Mapping[str, float | None]
    """Dense tensor throughput per dtype (``bf16``, ``fp16``, ``fp8``, ``fp32``); ``None`` if unsupported/unknown."""
    tflops_source: str
    aliases: tuple[str, ...] = ()
    memory_type: str = ""
    interconnect: str = ""
    usable_estimated: bool = False
    price_per_hour: float | None = None
    price_source: str | None = None
    origin: str = "bundled"
    """``bundled``, a user file's path, or a plugin's name."""
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def usable_gib(self) -> float:
        return self.usable_bytes / GIB

    def to_dict(self) -> dict[str, Any]:
        """Every figure with its source; what ``peftaudit gpus --json`` prints and a GPU file may override."""
        return {
            "name": self.name,
            "vendor": self.vendor,
            "memory_gb": self.memory_gb,
            "memory_type": self.memory_type,
            "usable_gib": self.usable_gib,
            "usable_bytes": self.usable_bytes,
            "usable_source": self.usable_source,
            "usable_estimated": self.usable_estimated,
            "bandwidth_gbs": self.bandwidth_gbs,
            "tflops": dict(self.tflops),
            "tflops_source": self.tflops_source,
            "interconnect": self.interconnect,
            "aliases": list(self.aliases),
            "price_per_hour": self.price_per_hour,
            "price_source": self.price_source,
            "origin": self.origin,
        }

    def dense_tflops(self, dtype: str) -> float | None:
        """Dense throughput for ``dtype`` (``bf16``, ``fp16``, ``fp8``, ``fp32``), if known."""
        value = self.tflops.get(dtype)
        return float(value) if value else None


def _key(name: str) -> str:
    return re.sub(r"[\s_\-]+", "", name).lower()


def _from_mapping(data: Mapping[str, Any], *, origin: str, name: str | None = None, where: str | None = None) -> GPU:
    """A GPU from a row of gpus.json or a table of the user's file; ``where`` names it in errors."""
    name = str(name or data["name"])
    where = where or f"GPU '{name}' in {origin}"
    try:
        usable = data.get("usable_gib")
        memory_gb = _number(data["memory_gb"], "memory_gb", where)
        if usable is not None:
            usable_bytes = round(_number(usable, "usable_gib", where) * GIB)
        else:
            usable_bytes = int(memory_gb * 0.99 * GIB)
        tflops = {
            str(k): (_number(v, f"tflops.{k}", where) if v is not None else None)
            for k, v in dict(data.get("tflops", {})).items()
        }
        price = data.get("price_per_hour")
        gpu = GPU(
            name=name,
            vendor=str(data.get("vendor", "")),
            memory_gb=memory_gb,
            usable_bytes=usable_bytes,
            usable_source=str(data.get("usable_source", origin)),
            usable_estimated=bool(data.get("usable_estimated", usable is None)),
            bandwidth_gbs=_number(data.get("bandwidth_gbs", 0.0), "bandwidth_gbs", where),
            tflops=tflops,
            tflops_source=str(data.get("tflops_source", origin)),
            aliases=tuple(str(a) for a in data.get("aliases", ())),
            memory_type=str(data.get("memory_type", "")),
            interconnect=str(data.get("interconnect", "")),
            price_per_hour=_number(price, "price_per_hour", where) if price is not None else None,
            price_source=origin if price is not None else None,
            origin=origin,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise PeftauditError(f"{where}: {exc.__class__.__name__}: {exc}") from exc
    check_gpu(gpu, where)
    return gpu


def _number(value: Any, key: str, where: str) -> float:
    """A figure from a file: an int or a float, finite (a string or a boolean is a mistake, not a number)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PeftauditError(f"{where}: {key} must be a number, got {value!r}")
    if not is_finite_number(value):
        raise PeftauditError(f"{where}: {key} must be a finite number, got {value!r}")
    return float(value)


def check_gpu(gpu: GPU, where: str | None = None) -> None:
    """Refuse a GPU whose figures would make sizing or cost wrong (NaN, infinity, negative, no memory).

    One rule for bundled GPUs, the user's file and plugins' GPUs; ``where``
    names the entry in the one-line error (default: the GPU and its origin).
    """
    where = where or f"GPU '{gpu.name}' from {gpu.origin}"

    def finite(key: str, value: Any, *, positive: bool = False) -> None:
        if not is_finite_number(value) or value < 0 or (positive and value == 0):
            wanted = "a positive finite number" if positive else "a finite number, 0 or more"
            raise PeftauditError(f"{where}: {key} must be {wanted}, got {value!r}")

    finite("memory_gb", gpu.memory_gb, positive=True)
    if not isinstance(gpu.usable_bytes, int) or isinstance(gpu.usable_bytes, bool) or gpu.usable_bytes <= 0:
        raise PeftauditError(f"{where}: usable memory must be positive, got {gpu.usable_bytes!r} bytes")
    finite("bandwidth_gbs", gpu.bandwidth_gbs)
    for dtype, value in gpu.tflops.items():
        if value is not None:
            finite(f"tflops.{dtype}", value)
    if gpu.price_per_hour is not None:
        finite("price_per_hour", gpu.price_per_hour)


def bundled_gpus() -> tuple[GPU, ...]:
    """The GPUs shipped with peftaudit (no prices), read from ``gpus.json``.

    They reach the catalog through ``peftaudit_register_gpus``, registered by
    :mod:`peftaudit.builtin.gpus` like any plugin's GPUs.
    """
    text = resources.files("peftaudit.gpus").joinpath("gpus.json").read_text(encoding="utf-8")
    return tuple(_from_mapping(row, origin="bundled") for row in json.loads(text)["gpus"])


def user_file() -> Path:
    """Where the user's GPU file is read from."""
    explicit = os.environ.get("PEFTAUDIT_GPUS_FILE")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "peftaudit" / "gpus.toml"


def apply_user_file(catalog: Mapping[str, GPU], path: Path) -> dict[str, GPU]:
    """Overlay the user's TOML file: prices and overrides for known GPUs, whole entries for new ones."""
    result = dict(catalog)
    if not path.is_file():
        return result
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise PeftauditError(f"GPU file {path}: {exc}") from exc
    table = data.get("gpu", {})
    if not isinstance(table, dict):
        raise PeftauditError(f"GPU file {path}: [gpu] must be a table of GPUs")
    for name, values in table.items():
        if not isinstance(values, dict):
            raise PeftauditError(f"GPU file {path}: gpu.{name} must be a table")
        known = _lookup(result, name)
        where = f"GPU file {path}: GPU '{name}'"
        if known is None:
            gpu = _from_mapping(values, origin=str(path), name=name, where=where)
        else:
            merged = {**known.to_dict(), **values}
            origin = str(path) if set(values) - {"price_per_hour"} else known.origin
            gpu = _from_mapping(merged, origin=origin, name=known.name, where=where)
            if "price_per_hour" in values:
                gpu = replace(gpu, price_source=str(path))
        result[_key(gpu.name)] = gpu
    return result


def _lookup(catalog: Mapping[str, GPU], name: str) -> GPU | None:
    key = _key(name)
    if key in catalog:
        return catalog[key]
    for gpu in catalog.values():
        if key in {_key(a) for a in gpu.aliases}:
            return gpu
    return None


@plugins.collection  # rebuilt when plugins are registered or removed
def _catalog() -> dict[str, GPU]:
    catalog: dict[str, GPU] = {}
    # Bundled GPUs come through the same hook as plugins' (peftaudit.builtin.gpus), first.
    for gpu in plugins.gpus():
        check_gpu(gpu, f"GPU '{gpu.name}' registered by a plugin (origin {gpu.origin!r})")
        catalog[_key(gpu.name)] = gpu
    return apply_user_file(catalog, user_file())


def gpus() -> tuple[GPU, ...]:
    """Every known GPU: bundled, then plugins', then the user's file (later ones override)."""
    return tuple(_catalog().values())


def find_gpu(name: str) -> GPU:
    """The GPU ``name`` names (case, spaces and dashes ignored; aliases such as ``H100``)."""
    gpu = _lookup(_catalog(), name)
    if gpu is None:
        known = ", ".join(sorted(g.name for g in gpus()))
        raise PeftauditError(f"unknown GPU '{name}'; known: {known} (add your own in {user_file()})")
    return gpu


def reset() -> None:
    """Forget the loaded catalog (after changing the user file; plugin changes refresh it themselves)."""
    _catalog.cache_clear()
