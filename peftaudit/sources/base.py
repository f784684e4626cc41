"""The model-source protocol and resolution across registered sources."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from peftaudit.errors import SourceNotFound

if TYPE_CHECKING:  # pragma: no cover
    import torch


@dataclass(frozen=True)
class SourceOptions:
    """How the user asked for the model."""

    online: bool = False
    """Prefer the hub's current config over the bundled catalog."""
    revision: str | None = None
    """Hub revision (branch, tag or commit); ``None`` is the default branch."""
    trust_remote_code: bool = False
    """Allow executing the model repository's own Python code (never by default)."""
    token: str | None = None
    """Hub token; ``None`` lets huggingface_hub find the user's saved token."""


@dataclass(frozen=True)
class ResolvedModel:
    """A model the user named, resolved to its config but not yet built."""

    id: str
    """The id to show: the hub id, the catalog id, or the path as given."""
    source: str
    """Name of the source that resolved it (``catalog``, ``hub``, ``local``, or a plugin's)."""
    config: dict[str, Any]
    """The model's ``config.json`` content."""
    origin: str
    """Where the config came from: a file path, a hub URL, or the catalog entry."""
    revision: str | None = None
    published_params: dict[str, Any] | None = None
    """Published parameter counts with their source (catalog entries)."""
    local_dir: str | None = None
    """Directory holding the config, for remote-code models built from disk."""
    notes: tuple[str, ...] = field(default=())
    """Things the user should know about where the config came from (shown on stderr)."""

    def fingerprint(self, *extra: str) -> str:
        """A stable key for this exact config, for caching reports across runs."""
        payload = json.dumps(
            {"source": self.source, "config": self.config, "extra": list(extra)},
            sort_keys=True,
            separators=(",", ":"),
            default=str,
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:32]


@runtime_checkable
class ModelSource(Protocol):
    """Something that can turn a user's model argument into a skeleton."""

    name: str
    priority: int

    def resolve(self, spec: str, options: SourceOptions) -> ResolvedModel | None:
        """Return the resolved model, or ``None`` if ``spec`` is not this source's kind.

        Raise :class:`~peftaudit.errors.PeftauditError` when the spec is this
        source's kind but unusable (a directory without config.json, say).
        """
        ...

    def build(self, resolved: ResolvedModel, options: SourceOptions) -> torch.nn.Module:
        """Build the model on the meta device: no weights read or allocated."""
        ...


def resolve(spec: str, options: SourceOptions | None = None) -> tuple[ResolvedModel, ModelSource]:
    """Resolve ``spec`` with the first registered source that recognises it."""
    from peftaudit.plugins import sources

    options = options or SourceOptions()
    if not spec or not spec.strip():
        raise SourceNotFound("no model given")
    for source in sources():
        resolved = source.resolve(spec, options)
        if resolved is not None:
            return resolved, source
    raise SourceNotFound(
        f"'{spec}' is not a local path, not in the bundled catalog, and the hub has no "
        "config.json for it (or is unreachable and its cache is empty); "
        "see `peftaudit catalog` for the models that work offline"
    )
