"""The diff: two snapshots and a set of expectations in, a :class:`Verdict` out."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from peftaudit.severity import Severity
from peftaudit.verification.causes import Cause
from peftaudit.verification.compare import Comparison, compare, nonfinite_count
from peftaudit.verification.expectations import Expectations, Role
from peftaudit.verification.fingerprint import TensorFingerprint
from peftaudit.verification.snapshots import Snapshot
from peftaudit.verification.verdict import Finding, Problem, Verdict, severity_for

_PEFT_WRAPPING = re.compile(r"^base_model\.model\.|\.base_layer(?=\.)|\.original_module(?=\.)")
_LORA_PARTNER = {
    "lora_A": "lora_B",
    "lora_B": "lora_A",
    "lora_embedding_A": "lora_embedding_B",
    "lora_embedding_B": "lora_embedding_A",
}


@dataclass(frozen=True)
class Evidence:
    """What was seen during training, to tell apart why an intended parameter did not move.

    ``gradient_seen``: names that received a non-zero gradient at least once.
    ``in_optimizer``: names the optimizer's parameter groups hold. None means
    not observed.
    """

    gradient_seen: frozenset[str] | None = None
    in_optimizer: frozenset[str] | None = None


def plain_name(name: str) -> str:
    """A PeftModel parameter name as the wrapped model would name it.

    ``base_model.model.x.q_proj.base_layer.weight`` -> ``x.q_proj.weight``;
    adapter weights keep their adapter parts (they have no plain counterpart).
    """
    return _PEFT_WRAPPING.sub("", name)


def lora_partner(name: str) -> str | None:
    """``...lora_A.default.weight`` <-> ``...lora_B.default.weight`` (None if not LoRA)."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part in _LORA_PARTNER:
            return ".".join([*parts[:i], _LORA_PARTNER[part], *parts[i + 1 :]])
    return None


def _is_lora(name: str, letter: str) -> bool:
    parts = name.split(".")
    return f"lora_{letter}" in parts or f"lora_embedding_{letter}" in parts


def _pairs(before: Snapshot, after: Snapshot) -> list[tuple[str | None, str | None]]:
    """Matching names, then names on one side only.

    Names missing on the other side are matched through :func:`plain_name`, so a
    snapshot of a plain model compares with the PeftModel that wraps it.
    """
    to_before = {t.name: t.name for t in after if t.name in before}
    loose_before = {plain_name(t.name): t.name for t in before if t.name not in to_before}
    for t in after:
        if t.name not in to_before:
            match = loose_before.pop(plain_name(t.name), None)
            if match is not None:
                to_before[t.name] = match
    from_before = {b: a for a, b in to_before.items()}
    out: list[tuple[str | None, str | None]] = [(t.name, from_before.get(t.name)) for t in before]
    out += [(None, t.name) for t in after if t.name not in to_before]
    return out


class _Diff:
    def __init__(
        self,
        before: Snapshot,
        after: Snapshot,
        expectations: Expectations,
        evidence: Evidence | None,
        tolerate: frozenset[Cause],
    ) -> None:
        self.before, self.after = before, after
        self.exp = expectations
        self.evidence = evidence or Evidence()
        self.tolerate = tolerate
        self.findings: list[Finding] = []

    def add(
        self,
        problem: Problem,
        name: str,
        message: str,
        *,
        cause: Cause | None = None,
        comparison: Comparison | None = None,
        severity: Severity | None = None,
        related: tuple[str, ...] = (),
    ) -> None:
        severity = severity or severity_for(cause, self.tolerate)
        size = comparison.size if comparison is not None else None
        self.findings.append(Finding(problem, name, severity, message, cause, size, related))

    def compare(self, b: TensorFingerprint, a: TensorFingerprint) -> Comparison:
        return compare(
            b,
            a,
            before_values=self.before.values,
            after_values=self.after.values,
            before_policy=self.before.policy,
            after_policy=self.after.policy,
        )

    def run(self) -> Verdict:
        compared = changed = intended = intended_changed = 0
        pairs = _pairs(self.before, self.after)
        for b_name, a_name in pairs:
            name = a_name or b_name
            assert name is not None
            role = self.exp.role(name)
            if a_name is None:
                self.add(Problem.REMOVED, name, "present before, missing after")
                continue
            a = self.after[a_name]
            if b_name is None:
                self.new_tensor(a, role)
                continue
            b = self.before[b_name]
            compared += 1
            if role is Role.MUST:
                intended += 1
            if b.same_bytes(a):
                if role is Role.MUST:
                    self.unchanged(a)
                elif role is Role.FROZEN and a.trainable:
                    self.add(
                        Problem.UNEXPECTED_TRAINABLE,
                        name,
                        "requires_grad=True but not expected to change (it did not change this time)",
                        severity=Severity.WARNING,
                    )
                continue
            changed += 1
            if role is Role.MUST:
                intended_changed += 1
            self.changed(b, a, role)
        self.check_ties()
        self.check_patterns([a for _, a in pairs if a is not None])
        return Verdict(
            findings=tuple(self.findings),
            before=self.before.source,
            after=self.after.source,
            compared=compared,
            changed=changed,
            intended=intended,
            intended_changed=intended_changed,
            expectations=self.exp.origin,
        )

    def changed(self, b: TensorFingerprint, a: TensorFingerprint, role: Role) -> None:
        name = a.name
        if b.shape != a.shape:
            self.add(Problem.RESHAPED, name, f"shape {list(b.shape)} -> {list(a.shape)}")
            return
        if b.layout != a.layout:
            self.add(Problem.RESHAPED, name, f"sharded differently: {b.layout or 'whole'} -> {a.layout or 'whole'}")
            return
        if b.dtype == a.dtype and role is not Role.FROZEN:
            # Intended to change: only a NaN or infinity appearing matters, and that needs no full diff.
            self.check_nonfinite(b, a, Comparison())
            return
        cmp = self.compare(b, a)
        if b.dtype != a.dtype:
            if cmp.values_equal and cmp.size is not None:
                where = "" if cmp.size.exact else f" on {cmp.size.compared} sampled elements"
                self.add(
                    Problem.RETYPED,
                    name,
                    f"dtype {b.dtype} -> {a.dtype}, values equal{where}",
                    cause=Cause.DTYPE_EQUAL_VALUES,
                )
            else:
                self.add(Problem.RETYPED, name, f"dtype {b.dtype} -> {a.dtype}, values changed", comparison=cmp)
            return
        self.check_nonfinite(b, a, cmp)
        message = "changed but expected frozen"
        if cmp.roundtrip:
            message += f"; every change is a cast round-trip through {cmp.roundtrip}"
        elif a.trainable is not None:
            message += f" (requires_grad={a.trainable})"
        self.add(Problem.UNEXPECTED_CHANGE, name, message, cause=self.changed_cause(a, cmp), comparison=cmp)

    def changed_cause(self, a: TensorFingerprint, cmp: Comparison) -> Cause | None:
        name = a.name
        if cmp.rounding_level:
            return Cause.MERGE_ROUNDING if self.exp.is_target_weight(name) else Cause.ROUNDING
        if cmp.roundtrip:
            return Cause.ROUNDING
        if self.exp.rewrites_base and self.exp.is_target_weight(name):
            return Cause.ADAPTER_INIT
        if name.endswith(".bias") and a.trainable is not False:
            return Cause.TRAINED_BIAS
        if a.trainable is False:
            return Cause.MODIFIED_IN_PLACE
        # requires_grad=True, or a checkpoint that cannot say: it looks trained.
        return Cause.LEFT_TRAINABLE

    def check_nonfinite(self, b: TensorFingerprint, a: TensorFingerprint, cmp: Comparison) -> None:
        after = cmp.nonfinite_after if cmp.nonfinite_after is not None else nonfinite_count(a, self.after.values)
        if not after:
            return
        before = cmp.nonfinite_before if cmp.nonfinite_before is not None else nonfinite_count(b, self.before.values)
        if before is None or after > before:
            was = "unknown" if before is None else str(before)
            self.add(Problem.NONFINITE, a.name, f"{after} NaN/Inf elements after (before: {was})")

    def new_tensor(self, a: TensorFingerprint, role: Role) -> None:
        if role is Role.FROZEN:
            self.add(Problem.ADDED, a.name, f"{a.dtype} {list(a.shape)} present after, missing before")
            return
        # A tensor added on purpose (an adapter created after the snapshot): audit what can be seen.
        if role is Role.MUST and (a.numel == 0 or (_is_lora(a.name, "B") and a.is_zero)):
            self.unchanged(a)
        count = nonfinite_count(a, self.after.values)
        if count:
            self.add(Problem.NONFINITE, a.name, f"{count} NaN/Inf elements (added tensor)")

    def unchanged(self, a: TensorFingerprint) -> None:
        cause = self.unchanged_cause(a)
        detail = "expected to change but is bit-for-bit unchanged"
        if a.numel == 0:
            detail = "expected to change but is empty"
        elif _is_lora(a.name, "B") and a.is_zero:
            detail = "expected to change but is still all zeros"
        self.add(Problem.UNCHANGED, a.name, detail, cause=cause)

    def unchanged_cause(self, a: TensorFingerprint) -> Cause | None:
        name = a.name
        if a.numel == 0:
            return Cause.EMPTY_TENSOR
        if a.trainable is False:
            return Cause.NOT_TRAINABLE
        ev = self.evidence
        if ev.in_optimizer is not None and name not in ev.in_optimizer:
            return Cause.NOT_IN_OPTIMIZER
        if ev.gradient_seen is not None and name in ev.gradient_seen:
            return Cause.NO_UPDATE
        if _is_lora(name, "A") and self.partner_moved_from_zero(name):
            return Cause.ONE_STEP
        if ev.gradient_seen is not None:
            return Cause.NO_GRADIENT
        if _is_lora(name, "B") and a.is_zero:
            return Cause.LORA_B_ZERO
        return None

    def partner_moved_from_zero(self, name: str) -> bool:
        partner = lora_partner(name)
        if partner is None or partner not in self.after:
            return False
        was_zero = partner not in self.before or self.before[partner].is_zero
        return was_zero and not self.after[partner].is_zero

    def check_ties(self) -> None:
        for group in self.before.tied:
            present = [self.after[n] for n in group if n in self.after]
            if len({fp.digest for fp in present}) <= 1:
                continue
            reference = present[0]
            drifted = tuple(fp.name for fp in present if fp.digest != reference.digest)
            copy = any(".modules_to_save." in n for n in group)
            self.add(
                Problem.TIED_DRIFT,
                reference.name,
                f"tied before; now differs from {', '.join(drifted)}",
                cause=Cause.TIED_ONE_SIDE if copy else None,
                related=drifted,
            )

    def check_patterns(self, names: Iterable[str]) -> None:
        listed = list(names)
        for pattern in self.exp.must_patterns:
            if not any(pattern.matches(n) for n in listed):
                self.add(Problem.UNMATCHED_PATTERN, pattern.text, "expected to change, but matches no tensor")


def diff(
    before: Snapshot,
    after: Snapshot,
    expectations: Expectations,
    *,
    evidence: Evidence | None = None,
    tolerate: Iterable[Cause] = (),
) -> Verdict:
    """Compare two snapshots against expectations."""
    return _Diff(before, after, expectations, evidence, frozenset(tolerate)).run()
