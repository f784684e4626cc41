"""The bad-input corpus: one row per input that once broke the CLI's contract.

The contract (README, "Exit codes"): bad input is one line on stderr starting
``peftaudit: error:`` and exit code 2, never a traceback and never exit 3 (3 is
for our own bugs); JSON on stdout always parses; nothing the user did not name
as output is overwritten. Each row runs ``python -m peftaudit`` in a fresh
process, exactly as a user would, so exit codes and stderr are the real ones.

A row is a :class:`Case`: the arguments (``{tmp}`` stands for the row's own
temporary folder), an optional ``setup`` that builds the bad input there, the
exit code, a regular expression the stderr must match, and an optional
``check`` for what else must hold afterwards (a file untouched, a field in the
JSON). The tests in ``tests/bad_inputs/`` hold the rows, grouped by area, and
each row names the item of the issue that found it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PYTHON = sys.executable

Setup = Callable[[Path], None]
Check = Callable[[Path, "subprocess.CompletedProcess[str]"], None]


@dataclass(frozen=True)
class Case:
    """One bad input and what the CLI must do with it."""

    id: str
    argv: Sequence[str]
    exit_code: int = 2
    #: A regular expression searched for in stderr (for exit 2: in the one error line).
    stderr: str | None = None
    setup: Setup | None = None
    check: Check | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    #: Text fed to standard input (``None``: no standard input).
    stdin: str | None = None
    timeout: float = 120.0


def run_case(case: Case, tmp: Path) -> subprocess.CompletedProcess[str]:
    """Set the case up in ``tmp``, run it, and assert the contract; returns the finished process."""
    if case.setup is not None:
        case.setup(tmp)
    argv = [arg.replace("{tmp}", str(tmp)) for arg in case.argv]
    env = {**os.environ, "PEFTAUDIT_CACHE_DIR": str(tmp / ".report-cache")}
    env.update({k: v.replace("{tmp}", str(tmp)) for k, v in case.env.items()})
    env.pop("PEFTAUDIT_DEBUG", None)
    result = subprocess.run(
        [PYTHON, "-m", "peftaudit", *argv],
        capture_output=True,
        text=True,
        env=env,
        input=case.stdin,
        stdin=None if case.stdin is not None else subprocess.DEVNULL,
        timeout=case.timeout,
        cwd=tmp,
    )
    where = f"{case.id}: exit {result.returncode}\nstdout: {result.stdout[-2000:]}\nstderr: {result.stderr[-2000:]}"
    assert "Traceback" not in result.stderr, where
    assert result.returncode == case.exit_code, where
    if case.exit_code == 2:
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, f"not one line on stderr: {where}"
        assert lines[0].startswith("peftaudit: error: "), where
    if case.stderr is not None:
        assert re.search(case.stderr, result.stderr), f"stderr does not match {case.stderr!r}: {where}"
    if ("--json" in argv or _format(argv) == "json") and result.stdout.strip():
        strict_json(result.stdout)  # NaN and Infinity are not JSON
    if case.check is not None:
        case.check(tmp, result)
    return result


def _format(argv: Sequence[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--format" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--format="):
            return arg.split("=", 1)[1]
    return None


def strict_json(text: str) -> Any:
    """Parse JSON the way strict parsers do: ``NaN``/``Infinity`` are errors."""

    def refuse(token: str) -> Any:
        raise ValueError(f"not JSON: {token}")

    return json.loads(text, parse_constant=refuse)


def write_config(folder: Path, config: Mapping[str, Any], name: str = "config.json") -> Path:
    """A model folder with ``config.json`` (and nothing else)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(json.dumps(config), encoding="utf-8")
    return path
