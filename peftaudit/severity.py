"""How serious a finding is: one scale for readiness checks and the verifier."""

from __future__ import annotations

from enum import StrEnum


class Severity(StrEnum):
    """A finding's level, least severe first.

    Readiness findings (``peftaudit recommend``, ``--checks``) and the
    verifier's findings share this scale. An ``ERROR`` blocks: a readiness
    error will break training or waste its run, and a verifier error fails
    the verdict (which is why the verifier's output calls it a *failure*).
    A ``WARNING`` is worth reading; ``INFO`` is for the record. The members
    are strings (``Severity.ERROR == "error"``), so plugins may pass the word.
    """

    INFO = "info"
    WARNING = "warning"
    ERROR = "error"

    @property
    def rank(self) -> int:
        """0 for info, 1 for warning, 2 for error: compare levels with this."""
        return _ORDER.index(self)


_ORDER: tuple[Severity, ...] = tuple(Severity)
