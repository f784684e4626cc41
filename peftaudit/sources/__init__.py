"""Turning what the user typed (hub id, path, catalog name, module) into a model skeleton.

Resolution asks each registered :class:`~peftaudit.sources.base.ModelSource`
in priority order; the first that recognises the spec wins. Resolving reads
only JSON (no torch); building the meta-device skeleton is a separate step, so
a cached report can be answered without importing torch.
"""

from peftaudit.sources.base import ModelSource, ResolvedModel, SourceOptions, resolve

__all__ = ["ModelSource", "ResolvedModel", "SourceOptions", "resolve"]
