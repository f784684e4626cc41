"""peftaudit: audit, size and verify parameter-efficient fine-tuning.

The public API is imported lazily so that ``import peftaudit`` (and the CLI's
``--help``) does not import torch or transformers.

>>> import peftaudit
>>> peftaudit.__version__
'0.1.0'
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

from peftaudit._lazy import lazy_attributes
from peftaudit._version import __version__

#: Decorator marking a plugin's hook implementations, e.g. ``@peftaudit.hookimpl``.
hookimpl = pluggy.HookimplMarker("peftaudit")

# public name -> module that defines it
_LAZY: dict[str, str] = {
    "audit": "peftaudit.report",
    "Report": "peftaudit.report",
    "Inventory": "peftaudit.inventory",
    "take_inventory": "peftaudit.inventory",
    "snapshot": "peftaudit.verification.api",
    "verify": "peftaudit.verification.api",
    "Snapshot": "peftaudit.verification.snapshots",
    "Verdict": "peftaudit.verification.verdict",
    "VerificationFailed": "peftaudit.verification.errors",
    "Severity": "peftaudit.severity",
    "ExitCode": "peftaudit.exit_codes",
}

if TYPE_CHECKING:  # pragma: no cover
    from peftaudit.exit_codes import ExitCode
    from peftaudit.inventory import Inventory, take_inventory
    from peftaudit.report import Report, audit
    from peftaudit.severity import Severity
    from peftaudit.verification.api import snapshot, verify
    from peftaudit.verification.errors import VerificationFailed
    from peftaudit.verification.snapshots import Snapshot
    from peftaudit.verification.verdict import Verdict

__all__ = [
    "ExitCode",
    "Inventory",
    "Report",
    "Severity",
    "Snapshot",
    "Verdict",
    "VerificationFailed",
    "__version__",
    "audit",
    "hookimpl",
    "snapshot",
    "take_inventory",
    "verify",
]

__getattr__ = lazy_attributes(__name__, _LAZY)
