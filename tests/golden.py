"""Golden-file comparison: ``./dev test --update-golden`` (or ``PEFTAUDIT_UPDATE_GOLDEN=1``) rewrites the files."""

from __future__ import annotations

import os
from pathlib import Path

GOLDEN_DIR = Path(__file__).parent / "golden"


def assert_matches_golden(text: str, name: str) -> None:
    path = GOLDEN_DIR / name
    if os.environ.get("PEFTAUDIT_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    expected = path.read_text(encoding="utf-8")
    assert text == expected, f"{name} differs from the golden file (--update-golden to accept)"
