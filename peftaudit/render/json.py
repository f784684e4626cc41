"""``--format json``: the report's ``to_dict()``, nothing added or dropped."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from peftaudit.render import RenderOptions

if TYPE_CHECKING:  # pragma: no cover
    from peftaudit.report import Report


class JsonRenderer:
    name = "json"
    description = "machine-readable JSON (schema in docs/report-json.md)"

    def render(self, report: Report, options: RenderOptions) -> str:
        return json.dumps(report.to_dict(), indent=2) + "\n"
