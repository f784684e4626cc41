"""``PeftAuditCallback``: verification inside a transformers ``Trainer`` run.

Snapshots the model at train begin, watches the first optimizer steps for
evidence (did gradients reach the intended parameters, does the optimizer
hold them), and verifies at every save and at the end. A failing verdict
raises (stopping the run) or warns, by setting.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from peftaudit.render.json import dumps
from peftaudit.verification.api import snapshot, verify
from peftaudit.verification.diff import Evidence
from peftaudit.verification.expectations import Role, from_model, from_patterns
from peftaudit.verification.snapshots import Snapshot
from peftaudit.verification.verdict import Verdict

logger = logging.getLogger("peftaudit")

#: The verdict file written into each checkpoint directory.
VERDICT_FILE = "peftaudit-verdict.json"


class PeftAuditCallback(TrainerCallback):
    """Verify at each save and at the end of training that only intended parameters changed.

    ``on_failure="raise"`` raises :class:`VerificationFailed` from the
    Trainer (the run stops); ``"warn"`` logs the verdict and carries on.
    ``expect``/``allow``/``tolerate`` are passed to :func:`verify`. Verdicts
    are kept in ``self.verdicts`` as ``(global_step, verdict)`` and, on the
    main process, written as JSON into each checkpoint directory. Under
    ``torch.distributed`` every rank fingerprints its share.
    """

    def __init__(
        self,
        *,
        on_failure: Literal["raise", "warn"] = "raise",
        expect: Sequence[str] = (),
        allow: Sequence[str] = (),
        tolerate: Sequence[str] = (),
        verify_on_save: bool = True,
        distributed: bool | None = None,
    ) -> None:
        if on_failure not in ("raise", "warn"):
            raise ValueError(f"on_failure must be 'raise' or 'warn', not {on_failure!r}")
        self.on_failure = on_failure
        self.expect, self.allow, self.tolerate = tuple(expect), tuple(allow), tuple(tolerate)
        self.verify_on_save = verify_on_save
        self.distributed = distributed
        self.before: Snapshot | None = None
        self.verdicts: list[tuple[int, Verdict]] = []
        self._intended: dict[str, torch.nn.Parameter] = {}
        self._seen: set[str] = set()
        self._in_optimizer: set[str] | None = None

    def _is_distributed(self) -> bool:
        if self.distributed is not None:
            return self.distributed
        return bool(
            torch.distributed.is_available()
            and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1
        )

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: Any = None, **kwargs: Any
    ) -> None:
        if model is None:
            raise ValueError("PeftAuditCallback needs the Trainer to pass the model")
        self.before = snapshot(model, distributed=self._is_distributed())
        expectations = from_model(model).combine(from_patterns(self.expect, self.allow))
        self._intended = {name: p for name, p in model.named_parameters() if expectations.role(name) is Role.MUST}
        unexpected = [
            name for name, p in model.named_parameters() if p.requires_grad and expectations.role(name) is Role.FROZEN
        ]
        if unexpected and state.is_world_process_zero:
            listed = ", ".join(unexpected[:5]) + (" ..." if len(unexpected) > 5 else "")
            warnings.warn(
                f"peftaudit: {len(unexpected)} parameter(s) are trainable but not expected to change: {listed}",
                stacklevel=2,
            )

    def on_pre_optimizer_step(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        # Evidence for naming causes: cheap, as only parameters not yet seen with a gradient are read.
        with torch.no_grad():
            for name, param in self._intended.items():
                if name not in self._seen and param.grad is not None and bool(torch.count_nonzero(param.grad)):
                    self._seen.add(name)
        if self._in_optimizer is None and optimizer is not None:
            held = {id(p) for group in getattr(optimizer, "param_groups", ()) for p in group["params"]}
            self._in_optimizer = {name for name, p in self._intended.items() if id(p) in held}

    def _evidence(self) -> Evidence:
        in_optimizer = None if self._in_optimizer is None else frozenset(self._in_optimizer)
        return Evidence(gradient_seen=frozenset(self._seen), in_optimizer=in_optimizer)

    def _check(self, args: TrainingArguments, state: TrainerState, model: Any, where: Path | None) -> Verdict:
        if self.before is None:
            raise RuntimeError("PeftAuditCallback: on_train_begin never ran")
        verdict = verify(
            self.before,
            model,
            expect=self.expect,
            allow=self.allow,
            tolerate=self.tolerate,
            evidence=self._evidence() if state.global_step > 0 else None,
            distributed=self._is_distributed(),
        )
        self.verdicts.append((state.global_step, verdict))
        if state.is_world_process_zero and where is not None and where.is_dir():
            (where / VERDICT_FILE).write_text(dumps(verdict.to_dict()), encoding="utf-8")
        if not verdict.ok:
            if self.on_failure == "raise":
                verdict.raise_for_failures()
            if state.is_world_process_zero:
                logger.warning("peftaudit: step %d: %s", state.global_step, verdict.explain())
                warnings.warn(f"peftaudit: {verdict.summary()}", stacklevel=2)
        return verdict

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: Any = None, **kwargs: Any
    ) -> None:
        if self.verify_on_save and model is not None:
            checkpoint = Path(args.output_dir or ".") / f"checkpoint-{state.global_step}"
            self._check(args, state, model, checkpoint)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: Any = None, **kwargs: Any
    ) -> None:
        # A save at the last step has just verified this very state.
        if model is not None and not (self.verdicts and self.verdicts[-1][0] == state.global_step):
            self._check(args, state, model, None)
