"""The ``Verdict``: what changed that should not have, and what did not change that should."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from peftaudit.severity import Severity
from peftaudit.verification.causes import Cause
from peftaudit.verification.compare import ChangeSize
from peftaudit.verification.errors import VerificationFailed

#: The verdict's word for each severity, in its summary and JSON: an error fails the
#: verdict, so it is a *failure*; info is a *note*. (Kept so ``verify --format json`` stays stable.)
VERDICT_WORDS: dict[Severity, str] = {Severity.ERROR: "failure", Severity.WARNING: "warning", Severity.INFO: "note"}


class Problem(Enum):
    """What kind of finding it is."""

    UNEXPECTED_CHANGE = "unexpected-change"
    UNCHANGED = "unchanged"
    ADDED = "added"
    REMOVED = "removed"
    RESHAPED = "reshaped"
    RETYPED = "retyped"
    NONFINITE = "nonfinite"
    TIED_DRIFT = "tied-drift"
    RANK_EXCEEDED = "rank-exceeded"
    MERGE_MISMATCH = "merge-mismatch"
    UNMATCHED_PATTERN = "unmatched-pattern"
    UNEXPECTED_TRAINABLE = "unexpected-trainable"


def severity_for(cause: Cause | None, tolerate: frozenset[Cause] = frozenset()) -> Severity:
    """A finding's severity from its cause: a few causes are benign, and users may tolerate others."""
    if cause is Cause.ONE_STEP:
        return Severity.INFO  # expected after a single optimizer step
    if cause is Cause.DTYPE_EQUAL_VALUES or (cause is not None and cause in tolerate):
        return Severity.WARNING
    return Severity.ERROR


@dataclass(frozen=True)
class MergeScale:
    """The LoRA scale a merged target should carry, and the one its delta shows.

    ``expected`` is peft's scale from the adapter's config and ``rule`` says
    how it was derived (``lora_alpha 16 / r 8``); ``found`` is the
    least-squares multiple of ``B @ A`` that best matches the sampled delta,
    or None when no multiple of ``B @ A`` explains it.
    """

    expected: float
    found: float | None
    rule: str

    def to_dict(self) -> dict[str, Any]:
        return {"expected": self.expected, "found": self.found, "rule": self.rule}


@dataclass(frozen=True)
class Finding:
    """One thing the verifier found about one tensor (or pattern).

    ``severity`` is the project's :class:`~peftaudit.Severity`: an ``ERROR``
    fails the verdict (a *failure* in its output), a ``WARNING`` or ``INFO``
    (a *note*) is reported only.
    """

    problem: Problem
    name: str
    severity: Severity
    message: str
    cause: Cause | None = None
    size: ChangeSize | None = None
    related: tuple[str, ...] = ()
    #: merge-mismatch findings: the scale expected and the scale found.
    scale: MergeScale | None = None

    def line(self) -> str:
        """The finding in one line, with its cause when one is named."""
        text = f"{self.problem.value}: {self.name}: {self.message}"
        if self.size is not None:
            text += f" ({format_size(self.size)})"
        if self.cause is not None:
            text += f"; likely {self.cause.value}: {self.cause.explanation}"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "problem": self.problem.value,
            "name": self.name,
            "severity": VERDICT_WORDS[self.severity],
            "message": self.message,
            "cause": None if self.cause is None else self.cause.value,
            "cause_explanation": None if self.cause is None else self.cause.explanation,
            "size": None if self.size is None else self.size.to_dict(),
            "related": list(self.related),
            "scale": None if self.scale is None else self.scale.to_dict(),
        }


def format_size(size: ChangeSize) -> str:
    """``max |Δ| 0.0012, rel 0.034, 25.0% of elements changed`` (says so when sampled)."""
    rel = "n/a" if size.max_rel is None else f"{size.max_rel:.2g}"
    if size.exact:
        share = f"{size.fraction:.1%} of elements changed"
    else:
        share = f"{round(size.fraction * size.compared)} of {size.compared} sampled elements changed"
    return f"max |Δ| {size.max_abs:.3g}, rel {rel}, {share}"


@dataclass(frozen=True)
class Verdict:
    """The result of comparing two snapshots against expectations.

    Truthy when it passes (no failures), so ``assert verdict`` reads naturally;
    :meth:`raise_for_failures` raises :class:`VerificationFailed` instead.
    """

    findings: tuple[Finding, ...]
    before: str
    after: str
    #: Tensors present on both sides, and how many of them changed.
    compared: int
    changed: int
    #: Tensors expected to change, and how many did.
    intended: int
    intended_changed: int
    expectations: tuple[str, ...] = field(default=())

    @property
    def failures(self) -> tuple[Finding, ...]:
        """The findings that fail the verdict (severity ``ERROR``)."""
        return tuple(f for f in self.findings if f.severity is Severity.ERROR)

    @property
    def warnings(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.severity is Severity.WARNING)

    @property
    def notes(self) -> tuple[Finding, ...]:
        """Findings for the record only (severity ``INFO``)."""
        return tuple(f for f in self.findings if f.severity is Severity.INFO)

    @property
    def ok(self) -> bool:
        """No failures (warnings and notes allowed)."""
        return not self.failures

    def __bool__(self) -> bool:
        return self.ok

    def by_problem(self, problem: Problem) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.problem is problem)

    def causes(self) -> set[Cause]:
        """Every cause named by any finding."""
        return {f.cause for f in self.findings if f.cause is not None}

    def summary(self) -> str:
        """One line: pass/fail and the counts behind it."""
        state = "PASS" if self.ok else "FAIL"
        parts = [
            f"{self.compared} tensors compared",
            f"{self.changed} changed",
            f"{self.intended_changed}/{self.intended} intended changed",
        ]
        for level in (Severity.ERROR, Severity.WARNING, Severity.INFO):
            n = sum(1 for f in self.findings if f.severity is level)
            if n:
                parts.append(f"{n} {VERDICT_WORDS[level]}{'s' if n != 1 else ''}")
        return f"{state}: " + ", ".join(parts)

    def explain(self, limit: int = 10) -> str:
        """The summary and up to ``limit`` failure lines (then warnings), for an exception message."""
        ranked = [*self.failures, *self.warnings]
        lines = [self.summary(), *(f"  {f.line()}" for f in ranked[:limit])]
        if len(ranked) > limit:
            lines.append(f"  ... and {len(ranked) - limit} more")
        return "\n".join(lines)

    def raise_for_failures(self) -> None:
        """Raise :class:`VerificationFailed` (an AssertionError) if any finding is a failure."""
        if not self.ok:
            raise VerificationFailed(self)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "summary": self.summary(),
            "before": self.before,
            "after": self.after,
            "expectations": list(self.expectations),
            "counts": {
                "compared": self.compared,
                "changed": self.changed,
                "intended": self.intended,
                "intended_changed": self.intended_changed,
                "failures": len(self.failures),
                "warnings": len(self.warnings),
                "notes": len(self.notes),
            },
            "findings": [f.to_dict() for f in self.findings],
        }
