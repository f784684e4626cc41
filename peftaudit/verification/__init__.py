"""The verifier: prove that only the intended parameters changed, live or from checkpoints.

The two functions users call are also exported from the top-level package:

>>> from peftaudit import snapshot, verify                 # doctest: +SKIP
>>> before = snapshot(model)                               # doctest: +SKIP
>>> trainer.train()                                        # doctest: +SKIP
>>> verify(before, model).raise_for_failures()             # doctest: +SKIP

This package (a noun: it holds fingerprints, snapshots, diffs and checkpoint
readers) is ``peftaudit.verification``; ``peftaudit.verify`` is the function.

Importing this package does not import torch: reading and comparing
safetensors checkpoints needs only numpy and xxhash. torch is imported when a
live model is fingerprinted, and transformers only for ``PeftAuditCallback``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from peftaudit._lazy import lazy_attributes
from peftaudit.severity import Severity
from peftaudit.verification.api import snapshot, verify
from peftaudit.verification.causes import Cause
from peftaudit.verification.compare import ChangeSize
from peftaudit.verification.diff import Evidence
from peftaudit.verification.errors import CheckpointError, SnapshotError, VerificationFailed
from peftaudit.verification.expectations import Expectations, Pattern, Role
from peftaudit.verification.fingerprint import SamplePolicy, TensorFingerprint
from peftaudit.verification.snapshots import Snapshot
from peftaudit.verification.verdict import Finding, Problem, Verdict

if TYPE_CHECKING:  # pragma: no cover
    from peftaudit.verification.callback import PeftAuditCallback

__all__ = [
    "Cause",
    "ChangeSize",
    "CheckpointError",
    "Evidence",
    "Expectations",
    "Finding",
    "Pattern",
    "PeftAuditCallback",
    "Problem",
    "Role",
    "SamplePolicy",
    "Severity",
    "Snapshot",
    "SnapshotError",
    "TensorFingerprint",
    "Verdict",
    "VerificationFailed",
    "snapshot",
    "verify",
]


# The callback imports transformers; load it only when asked for.
__getattr__ = lazy_attributes(__name__, {"PeftAuditCallback": "peftaudit.verification.callback"})
