"""The examples under docs/ run, so they cannot rot."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).parents[1] / "docs"


@pytest.mark.slow
def test_minilm_lora_example_passes_its_peftaudit_gates() -> None:
    folder = DOCS / "examples" / "minilm-lora"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--peftaudit-report", str(folder)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=folder,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:]
    out = result.stdout
    assert "3 passed" in out
    assert "74,498 trainable" in out  # LoRA r=8 on query/value of 6 layers + the classifier head
    assert "on 1x T4: fits" in out
    assert "verify  PASS:" in out
