"""Command-line plumbing for readiness checks, shared by ``peftaudit recommend`` and ``peftaudit report``.

``report`` adds :func:`add_check_arguments` (``--checks``, ``--skip-check``,
``--fail-on``); both commands turn ``--fail-on`` into an exit code with
:func:`gate`. Models are loaded with :func:`peftaudit.sources.load`. Nothing
heavy is imported at module level.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from peftaudit.exit_codes import ExitCode
from peftaudit.recommend.findings import FAIL_ON_LEVELS, Finding, reaches

__all__ = ["add_check_arguments", "gate"]


def gate(findings: Sequence[Finding], fail_on: str) -> tuple[int, str | None]:
    """Exit code for ``--fail-on`` and a one-line reason when it trips (for stderr)."""
    hit = reaches(findings, fail_on)
    if not hit:
        return ExitCode.OK, None
    ids = ", ".join(sorted({f.id for f in hit}))
    return ExitCode.FINDINGS, f"{len(hit)} finding(s) at or above {fail_on}: {ids}"


def add_check_arguments(parser: argparse.ArgumentParser, *, fail_on: bool = True) -> None:
    """``--checks``, ``--skip-check`` (and ``--fail-on`` unless the command has it already)."""
    group = parser.add_argument_group("readiness checks")
    group.add_argument("--checks", action="store_true", help="also run the readiness checks and show their findings")
    group.add_argument(
        "--skip-check",
        action="append",
        default=[],
        metavar="ID",
        help="drop findings with this id or id prefix (repeatable), e.g. vocab.unaligned or tokens",
    )
    if fail_on:
        group.add_argument(
            "--fail-on",
            choices=FAIL_ON_LEVELS,
            default="never",
            help="exit 1 when a finding reaches this severity (for CI; default: never)",
        )
