"""``--format json``: the report as the JSON documented in docs/report-json.md."""

from __future__ import annotations

from typing import TYPE_CHECKING

from peftaudit.render.json import dumps
from peftaudit.report.render import RenderOptions

if TYPE_CHECKING:  # pragma: no cover
    from peftaudit.report.model import Report


class JsonRenderer:
    name = "json"
    description = "machine-readable JSON (schema in docs/report-json.md)"

    def render(self, report: Report, options: RenderOptions) -> str:
        return dumps(report.to_dict()) + "\n"
