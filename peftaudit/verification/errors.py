"""Errors the verifier raises: bad input (a CLI exit 2) and failed verification (exit 1)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from peftaudit.errors import PeftauditError

if TYPE_CHECKING:  # pragma: no cover
    from peftaudit.verification.verdict import Verdict


class CheckpointError(PeftauditError):
    """A checkpoint that is missing, malformed, truncated, unsafe or ambiguous."""


class SnapshotError(PeftauditError):
    """A snapshot file that is not one, or one this version cannot read."""


class VerificationFailed(AssertionError):
    """Raised by :meth:`Verdict.raise_for_failures` when a verdict holds failures.

    An ``AssertionError`` so that test runners report it as a failed assertion;
    the verdict is kept on ``.verdict`` for inspection.
    """

    def __init__(self, verdict: Verdict) -> None:
        self.verdict = verdict
        super().__init__(verdict.explain())
