"""The verifier: prove that only the intended parameters changed, live or from checkpoints.

>>> from peftaudit.verify import snapshot, verify          # doctest: +SKIP
>>> before = snapshot(model)                               # doctest: +SKIP
>>> trainer.train()                                        # doctest: +SKIP
>>> verify(before, model).raise_for_failures()             # doctest: +SKIP

Importing this package does not import torch: reading and comparing
safetensors checkpoints needs only numpy and xxhash. torch is imported when a
live model is fingerprinted, and transformers only for ``PeftAuditCallback``.
"""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING, Any

from peftaudit.verify.api import snapshot, verify
from peftaudit.verify.causes import Cause
from peftaudit.verify.compare import ChangeSize
from peftaudit.verify.diff import Evidence
from peftaudit.verify.errors import CheckpointError, SnapshotError, VerificationFailed
from peftaudit.verify.expectations import Expectations, Pattern, Role
from peftaudit.verify.fingerprint import SamplePolicy, TensorFingerprint
from peftaudit.verify.snapshots import Snapshot
from peftaudit.verify.verdict import Finding, Problem, Severity, Verdict

if TYPE_CHECKING:  # pragma: no cover
    from peftaudit.verify.callback import PeftAuditCallback

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


def __getattr__(name: str) -> Any:
    # The callback imports transformers; load it only when asked for.
    if name == "PeftAuditCallback":
        from peftaudit.verify.callback import PeftAuditCallback

        return PeftAuditCallback
    raise AttributeError(f"module 'peftaudit.verify' has no attribute {name!r}")


class _CallableModule(types.ModuleType):
    """This package, callable as :func:`verify`.

    ``peftaudit.verify`` is both this subpackage and the public function. The
    import system binds the subpackage to ``peftaudit.verify`` as soon as it
    is imported, so ``from peftaudit import verify`` can yield the module;
    making the module callable keeps ``verify(before, model)`` working either way.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Verdict:
        return verify(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
