"""The report: what ``peftaudit report`` prints, ``--format json`` writes and ``audit()`` returns.

* :mod:`~peftaudit.report.model`: the data (:class:`Report` and its parts) and its JSON;
* :mod:`~peftaudit.report.layers`: the per-layer table and the module tree;
* :mod:`~peftaudit.report.build`: building one (:func:`audit`, the cache);
* :mod:`~peftaudit.report.glance`: the default report's training memory at a glance and recommendation;
* :mod:`~peftaudit.report.render`: the ``--format`` renderers (table, JSON, Markdown, HTML).
"""

from __future__ import annotations

from peftaudit.report.build import audit, build_report, matches_published, report_for, report_for_module
from peftaudit.report.layers import layer_rows, module_tree
from peftaudit.report.model import (
    SCHEMA_VERSION,
    LayerRow,
    ModelInfo,
    MoeSummary,
    ParamTotals,
    PublishedCheck,
    Report,
    TiedInfo,
    TreeNode,
)
from peftaudit.report.render import Renderer, RenderOptions

__all__ = [
    "SCHEMA_VERSION",
    "LayerRow",
    "ModelInfo",
    "MoeSummary",
    "ParamTotals",
    "PublishedCheck",
    "RenderOptions",
    "Renderer",
    "Report",
    "TiedInfo",
    "TreeNode",
    "audit",
    "build_report",
    "layer_rows",
    "matches_published",
    "module_tree",
    "report_for",
    "report_for_module",
]
