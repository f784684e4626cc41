"""Turning what the user typed (hub id, path, catalog name, module) into a model skeleton.

Resolution asks each registered :class:`~peftaudit.sources.base.ModelSource`
in priority order; the first that recognises the spec wins. Resolving reads
only JSON (no torch); building the meta-device skeleton is a separate step, so
a cached report can be answered without importing torch. :func:`load` does
both and walks the skeleton: the one path every command takes to a model.
"""

from peftaudit.sources.base import ModelSource, ResolvedModel, SourceOptions, resolve
from peftaudit.sources.load import LoadedModel, load, load_config, load_resolved

__all__ = [
    "LoadedModel",
    "ModelSource",
    "ResolvedModel",
    "SourceOptions",
    "load",
    "load_config",
    "load_resolved",
    "resolve",
]
