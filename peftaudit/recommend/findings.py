"""Readiness findings: what will break or waste memory, each with a stable id and a concrete fix."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from peftaudit.errors import PeftauditError
from peftaudit.severity import Severity

#: ``--fail-on`` levels: a severity, or ``never``.
FAIL_ON_LEVELS: tuple[str, ...] = (*(s.value for s in Severity), "never")


@dataclass(frozen=True, init=False)
class Finding:
    """One thing a user should know before training.

    ``id`` never changes once released (CI configs and suppressions name it);
    ``severity`` is a :class:`~peftaudit.Severity` or its word (``"warning"``);
    ``modules`` lists the affected module paths with layer indices collapsed
    (``model.layers.*.mlp.experts``); ``fix`` says what to change, concretely.
    """

    id: str
    severity: Severity
    title: str
    fix: str
    modules: tuple[str, ...] = ()
    detail: str = ""

    def __init__(
        self,
        id: str,
        severity: Severity | str,
        title: str,
        fix: str,
        modules: tuple[str, ...] = (),
        detail: str = "",
    ) -> None:
        # Plugins pass the word; store the member, so `severity.rank` and `is Severity.ERROR` work.
        try:
            level = Severity(severity)
        except ValueError:
            words = tuple(s.value for s in Severity)
            raise ValueError(f"finding {id}: severity must be one of {words}, got {severity!r}") from None
        for name, value in (
            ("id", id),
            ("severity", level),
            ("title", title),
            ("fix", fix),
            ("modules", modules),
            ("detail", detail),
        ):
            object.__setattr__(self, name, value)

    def to_dict(self) -> dict[str, Any]:
        """Stable keys, for ``--format json``."""
        return {
            "id": self.id,
            "severity": self.severity.value,
            "title": self.title,
            "modules": list(self.modules),
            "fix": self.fix,
            "detail": self.detail,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Finding:
        return cls(
            id=str(data["id"]),
            severity=str(data["severity"]),
            title=str(data["title"]),
            fix=str(data["fix"]),
            modules=tuple(data.get("modules", ())),
            detail=str(data.get("detail", "")),
        )


def sort_findings(findings: Iterable[Finding]) -> tuple[Finding, ...]:
    """Most severe first, then by id: a stable order for output and tests."""
    return tuple(sorted(findings, key=lambda f: (-f.severity.rank, f.id, f.title)))


def reaches(findings: Iterable[Finding], level: str) -> list[Finding]:
    """The findings at or above ``level`` (``never`` reaches none)."""
    if level not in FAIL_ON_LEVELS:
        raise PeftauditError(f"unknown level '{level}'; choose one of: {', '.join(FAIL_ON_LEVELS)}")
    if level == "never":
        return []
    floor = Severity(level).rank
    return [f for f in findings if f.severity.rank >= floor]


def counts(findings: Iterable[Finding]) -> dict[str, int]:
    """How many findings of each severity, every severity present."""
    out = {s.value: 0 for s in Severity}
    for f in findings:
        out[f.severity.value] += 1
    return out
