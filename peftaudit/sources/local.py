"""A local directory holding config.json, or a config.json file itself."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from peftaudit.errors import ConfigError
from peftaudit.sources.base import ResolvedModel, SourceOptions
from peftaudit.sources.build import build_resolved, read_config_file, validate_config

if TYPE_CHECKING:  # pragma: no cover
    import torch


class LocalSource:
    """Paths on disk: ``./my-model/`` or ``./my-model/config.json``. Weights are never read."""

    name = "local"
    priority = 100

    def resolve(self, spec: str, options: SourceOptions) -> ResolvedModel | None:
        path = os.path.expanduser(spec)
        # exists(), not isfile(): a FIFO or device named config.json is refused by
        # read_config_file with the reason, not reported as missing.
        if os.path.isdir(path):
            config_path = os.path.join(path, "config.json")
            if not os.path.exists(config_path):
                raise ConfigError(f"{spec}: directory has no config.json")
            local_dir = path
        elif os.path.exists(path):
            config_path, local_dir = path, os.path.dirname(os.path.abspath(path))
        elif _looks_like_path(spec):
            raise ConfigError(f"{spec}: no such file or directory")
        else:
            return None
        config = read_config_file(config_path, spec)
        validate_config(config, spec)
        return ResolvedModel(
            id=spec,
            source=self.name,
            config=config,
            origin=os.path.abspath(config_path),
            local_dir=os.path.abspath(local_dir),
        )

    def build(self, resolved: ResolvedModel, options: SourceOptions) -> torch.nn.Module:
        return build_resolved(resolved, options)


def _looks_like_path(spec: str) -> bool:
    """Paths the user clearly meant as paths (a hub id is ``org/name`` at most)."""
    return (
        spec.startswith((".", "/", "~"))
        or spec.endswith(".json")
        or spec.count("/") > 1
        or (os.sep != "/" and os.sep in spec)
    )
