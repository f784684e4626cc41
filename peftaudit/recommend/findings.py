"""Readiness findings: what will break or waste memory, each with a stable id and a concrete fix."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from peftaudit.errors import PeftauditError

#: Severities, least severe first.
SEVERITIES: tuple[str, ...] = ("info", "warning", "error")

#: ``--fail-on`` levels: a severity, or ``never``.
FAIL_ON_LEVELS: tuple[str, ...] = (*SEVERITIES, "never")


@dataclass(frozen=True)
class Finding:
    """One thing a user should know before training.

    ``id`` never changes once released (CI configs and suppressions name it);
    ``modules`` lists the affected module paths with layer indices collapsed
    (``model.layers.*.mlp.experts``); ``fix`` says what to change, concretely.
    """

    id: str
    severity: str
    title: str
    fix: str
    modules: tuple[str, ...] = ()
    detail: str = ""

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"finding {self.id}: severity must be one of {SEVERITIES}, got {self.severity!r}")

    def to_dict(self) -> dict[str, Any]:
        """Stable keys, for ``--format json``."""
        return {
            "id": self.id,
            "severity": self.severity,
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


def severity_rank(severity: str) -> int:
    """0 for info, 1 for warning, 2 for error."""
    return SEVERITIES.index(severity)


def sort_findings(findings: Iterable[Finding]) -> tuple[Finding, ...]:
    """Most severe first, then by id: a stable order for output and tests."""
    return tuple(sorted(findings, key=lambda f: (-severity_rank(f.severity), f.id, f.title)))


def reaches(findings: Iterable[Finding], level: str) -> list[Finding]:
    """The findings at or above ``level`` (``never`` reaches none)."""
    if level not in FAIL_ON_LEVELS:
        raise PeftauditError(f"unknown level '{level}'; choose one of: {', '.join(FAIL_ON_LEVELS)}")
    if level == "never":
        return []
    floor = severity_rank(level)
    return [f for f in findings if severity_rank(f.severity) >= floor]


def counts(findings: Iterable[Finding]) -> dict[str, int]:
    """How many findings of each severity, every severity present."""
    out = dict.fromkeys(SEVERITIES, 0)
    for f in findings:
        out[f.severity] += 1
    return out
