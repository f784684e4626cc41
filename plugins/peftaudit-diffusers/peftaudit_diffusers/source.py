"""A model source for diffusers models, built from their configs on the meta device.

Specs: ``diffusers:NAME/COMPONENT`` for a bundled config (``diffusers:sdxl/unet``),
``diffusers:PATH`` for a local folder holding a diffusers ``config.json``, or
just ``PATH`` when that folder's config names a supported ``_class_name``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftaudit.plugin_api import ConfigError, ResolvedModel, SourceNotFound, SourceOptions, read_config_file
from peftaudit_diffusers import bundled
from peftaudit_diffusers.kinds import MODEL_TYPES

if TYPE_CHECKING:  # pragma: no cover
    import torch

PREFIX = "diffusers:"


class DiffusersSource:
    """Diffusers UNets and diffusion transformers from bundled or local configs."""

    name = "diffusers"
    # Before peftaudit's local-path source (100): a diffusers folder has no model_type,
    # so that source could not build it.
    priority = 90

    def resolve(self, spec: str, options: SourceOptions) -> ResolvedModel | None:
        if spec.lower().startswith(PREFIX):
            rest = spec[len(PREFIX) :].strip()
            if not rest:
                raise SourceNotFound(f"'{spec}': name a model, e.g. diffusers:sdxl/unet")
            if _looks_like_path(rest):
                return self._local(spec, Path(rest).expanduser(), required=True)
            return self._bundled(spec, rest)
        if os.path.isdir(spec):
            return self._local(spec, Path(spec), required=False)
        return None

    def _bundled(self, spec: str, name: str) -> ResolvedModel:
        data = bundled.entry(name)
        if data is None:
            known = ", ".join(bundled.names())
            raise SourceNotFound(f"'{spec}': no bundled diffusers config '{name}'; known: {known}")
        config = dict(data["config"])
        _check_class(spec, config)
        return ResolvedModel(
            id=f"{data['id']}/{data['component']}",
            source=self.name,
            config=config,
            origin=f"peftaudit-diffusers bundled config (from {data['config_source']})",
            published_params=data.get("published_params"),
        )

    def _local(self, spec: str, folder: Path, *, required: bool) -> ResolvedModel | None:
        path = folder / "config.json"
        if not path.is_file():
            if required:
                raise ConfigError(f"'{spec}': no config.json in {folder}")
            return None
        config = read_config_file(str(path), spec)
        if not required and config.get("_class_name") not in MODEL_TYPES:
            return None  # not a diffusers model we build: let the other sources try
        _check_class(spec, config)
        return ResolvedModel(id=spec, source=self.name, config=config, origin=str(path), local_dir=str(folder))

    def build(self, resolved: ResolvedModel, options: SourceOptions) -> torch.nn.Module:
        import diffusers
        import torch
        from diffusers.configuration_utils import FrozenDict
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()  # stdout stays parseable; config warnings are noise here
        class_name = str(resolved.config["_class_name"])
        model_class: Any = getattr(diffusers, class_name)
        try:
            with torch.device("meta"):
                model = model_class.from_config(resolved.config)
        except (TypeError, ValueError, KeyError, AttributeError, RuntimeError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ConfigError(f"{resolved.id}: diffusers cannot build this {class_name} config: {first}") from exc

        class _AuditedConfig(FrozenDict):
            """diffusers' config plus the ``to_dict``/``model_type`` peftaudit's inventory reads."""

            def to_dict(self) -> dict[str, Any]:
                return dict(self)

        model._internal_dict = _AuditedConfig({**model.config, "model_type": MODEL_TYPES[class_name]})
        return model


def _looks_like_path(rest: str) -> bool:
    return rest.startswith(("/", ".", "~")) or (os.sep in rest and os.path.isdir(os.path.expanduser(rest)))


def _check_class(spec: str, config: dict[str, Any]) -> None:
    class_name = config.get("_class_name")
    if class_name not in MODEL_TYPES:
        known = ", ".join(MODEL_TYPES)
        raise ConfigError(f"'{spec}': config _class_name {class_name!r} is not one of {known}")
