"""A model source for a team's own config files, registered through peftaudit's public hook.

``PEFTAUDIT_TEAM_CATALOG`` lists folders (``os.pathsep``-separated) holding
``NAME.json`` files; ``peftaudit report team:NAME`` builds that config on the
meta device. Files are plain ``config.json`` content or peftaudit catalog
entries (``{"id": ..., "config": {...}, "published_params": {...}}``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from peftaudit.plugin_api import (
    ConfigError,
    ModelSource,
    ResolvedModel,
    SourceNotFound,
    SourceOptions,
    build_from_config,
    hookimpl,
    read_config_file,
    validate_sizes,
)

PREFIX = "team:"
ENV = "PEFTAUDIT_TEAM_CATALOG"


def folders() -> list[Path]:
    """The folders named by ``PEFTAUDIT_TEAM_CATALOG``, in order."""
    raw = os.environ.get(ENV, "")
    return [Path(p).expanduser() for p in raw.split(os.pathsep) if p.strip()]


class TeamCatalogSource:
    """``team:NAME`` -> ``NAME.json`` in the first folder that has it."""

    name = "team-catalog"
    # Before the bundled catalog (200), so a team can pin its own copy of a public config.
    priority = 150

    def resolve(self, spec: str, options: SourceOptions) -> ResolvedModel | None:
        if not spec.lower().startswith(PREFIX):
            return None
        name = spec[len(PREFIX) :].strip()
        if not name or "/" in name or "\\" in name or name.startswith("."):
            raise SourceNotFound(f"'{spec}': a team catalog name is a file name without folders")
        if not folders():
            raise SourceNotFound(f"'{spec}': set {ENV} to the folder(s) holding your team's configs")
        for folder in folders():
            for candidate in folder.glob("*.json"):
                if candidate.stem.lower() == name.lower():
                    return self._load(spec, candidate)
        searched = os.pathsep.join(str(f) for f in folders())
        raise SourceNotFound(f"'{spec}': no {name}.json in {searched}")

    def _load(self, spec: str, path: Path) -> ResolvedModel:
        data: dict[str, Any] = read_config_file(str(path), spec)
        if "config" in data and isinstance(data["config"], dict):
            config = data["config"]
            published = data.get("published_params")
            model_id = str(data.get("id", spec))
        elif "model_type" in data:
            config, published, model_id = data, None, spec
        else:
            raise ConfigError(f"{spec}: {path} is neither a config.json nor a catalog entry")
        validate_sizes(config, model_id)
        return ResolvedModel(
            id=model_id,
            source=self.name,
            config=config,
            origin=str(path),
            published_params=published if isinstance(published, dict) else None,
        )

    def build(self, resolved: ResolvedModel, options: SourceOptions) -> Any:
        # Remote code is never run from a team catalog: there is no repository to trust.
        return build_from_config(resolved.config, model_id=resolved.id)


@hookimpl
def peftaudit_register_sources(register: Callable[[ModelSource], None]) -> None:
    register(TeamCatalogSource())
