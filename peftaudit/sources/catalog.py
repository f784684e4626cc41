"""The bundled catalog: config files for popular models, answered offline.

Each entry is ``peftaudit/catalog/models/<org>__<name>.json`` with the model's
published config, where it came from, and its published parameter count.
Ids resolve case-insensitively, with or without the org prefix where that is
unambiguous, and through a few well-known aliases (``gpt2``).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any

from peftaudit.errors import SourceNotFound
from peftaudit.sources.base import ResolvedModel, SourceOptions
from peftaudit.sources.build import build_from_config, validate_config

if TYPE_CHECKING:  # pragma: no cover
    import torch


@dataclass(frozen=True)
class CatalogEntry:
    """One bundled model: its config and the published facts it was written from."""

    id: str
    family: str
    description: str
    config: dict[str, Any]
    config_source: str
    published_params: dict[str, Any]
    aliases: tuple[str, ...] = ()
    notes: str = ""
    file: str = ""


@functools.cache
def entries() -> tuple[CatalogEntry, ...]:
    """Every bundled catalog entry, sorted by id."""
    found: list[CatalogEntry] = []
    folder = resources.files("peftaudit.catalog").joinpath("models")
    for item in folder.iterdir():
        if not item.name.endswith(".json"):
            continue
        data = json.loads(item.read_text(encoding="utf-8"))
        found.append(
            CatalogEntry(
                id=data["id"],
                family=data.get("family", ""),
                description=data.get("description", ""),
                config=data["config"],
                config_source=data.get("config_source", ""),
                published_params=data.get("published_params", {}),
                aliases=tuple(data.get("aliases", ())),
                notes=data.get("notes", ""),
                file=item.name,
            )
        )
    return tuple(sorted(found, key=lambda e: e.id.lower()))


@functools.cache
def _index() -> dict[str, tuple[CatalogEntry, ...]]:
    index: dict[str, list[CatalogEntry]] = {}
    for entry in entries():
        keys = {entry.id.lower(), entry.id.split("/")[-1].lower(), *(a.lower() for a in entry.aliases)}
        for key in keys:
            index.setdefault(key, []).append(entry)
    return {k: tuple(v) for k, v in index.items()}


def lookup(spec: str) -> CatalogEntry | None:
    """The entry ``spec`` names, or ``None``; ambiguous short names raise."""
    key = spec.strip().lower()
    matches = _index().get(key, ())
    if not matches and "/" in key:
        # "someorg/Llama-3.1-8B" for a model we hold under another org: not the same model.
        return None
    if len(matches) > 1:
        names = ", ".join(sorted(e.id for e in matches))
        raise SourceNotFound(f"'{spec}' is ambiguous in the bundled catalog: {names}")
    return matches[0] if matches else None


class CatalogSource:
    """Bundled configs: instant and offline. ``--online`` skips it in favour of the hub."""

    name = "catalog"
    priority = 200

    def resolve(self, spec: str, options: SourceOptions) -> ResolvedModel | None:
        if options.online or options.revision:
            return None
        entry = lookup(spec)
        if entry is None:
            return None
        return to_resolved(entry)

    def build(self, resolved: ResolvedModel, options: SourceOptions) -> torch.nn.Module:
        return build_from_config(resolved.config, model_id=resolved.id)


def to_resolved(entry: CatalogEntry, *, note: str | None = None) -> ResolvedModel:
    """The catalog entry as a resolved model."""
    validate_config(entry.config, entry.id)
    notes = (note,) if note else ()
    return ResolvedModel(
        id=entry.id,
        source="catalog",
        config=dict(entry.config),
        origin=f"bundled catalog ({entry.config_source})",
        published_params=dict(entry.published_params),
        notes=notes,
    )
