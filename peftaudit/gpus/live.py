"""Does the model in memory fit a GPU for a training plan? (What the pytest marker's ``fits=`` asks.)"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from peftaudit.errors import PeftauditError
from peftaudit.gpus.sizing import Fit


@dataclass(frozen=True)
class LiveFit:
    """A fit check of a live model, with the plan spelled out for people."""

    fit: Fit
    model: str
    plan: dict[str, Any]

    @property
    def fits(self) -> bool:
        return self.fit.fits

    @property
    def summary(self) -> str:
        f = self.fit
        from peftaudit.memory.stack import describe

        named = describe(self.plan.get("stack"))
        return (
            f"{self.model} {f.method} (r={self.plan.get('rank')}) batch {f.batch_size} x seq {f.seq_len:,} "
            f"on {f.setup()} {f.gpu}" + (f", stack {named}" if named else "")
        )

    def explain(self) -> str:
        f = self.fit
        gib = 2**30
        verdict = "fits" if f.fits else "does not fit"
        return (
            f"{self.summary} {verdict}: estimated peak {f.peak_bytes / gib:.2f} GiB per GPU, "
            f"{f.usable_bytes / gib:.2f} GiB usable ({abs(f.headroom_bytes) / gib:.2f} GiB "
            f"{'spare' if f.fits else 'short'})"
        )

    def to_dict(self) -> dict[str, Any]:
        return {**self.fit.to_dict(), "model": self.model, "summary": self.summary, "plan": self.plan}


def fit_live_model(
    model: Any,
    *,
    gpu: str,
    method: str = "lora",
    seq_len: int = 2048,
    batch_size: int = 1,
    gpus: int = 1,
    stack: str | tuple[tuple[str, str], ...] = (),
    expandable_segments: bool = False,
    lengths: str = "fixed",
) -> LiveFit:
    """Estimate ``model``'s training plan on ``gpu``, reading LoRA settings from a PeftModel.

    The architecture comes from the model's config (rebuilt on the meta device,
    so the live weights are never touched); rank, targets and
    ``modules_to_save`` come from the PeftModel's active adapter config. ``stack``: the
    releases the run uses (``"transformers==4.44,peft==0.12"``; default the installed ones).
    ``expandable_segments`` and ``lengths`` (``fixed`` or ``varied``): how the caching allocator
    is set up and what batches it sees (:class:`~peftaudit.memory.plan.TrainingPlan`).
    """
    from peftaudit.gpus.catalog import find_gpu
    from peftaudit.gpus.sizing import fit
    from peftaudit.memory import TrainingPlan
    from peftaudit.memory.stack import normalize_stack
    from peftaudit.sources.load import load_config

    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise PeftauditError(f"cannot size a {type(model).__name__}: it has no transformers config")
    data = config.to_dict()
    # Rebuild the class actually in use (a classifier, say), not the one the checkpoint's config names.
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    data["architectures"] = [type(base).__name__]
    name = str(getattr(config, "_name_or_path", "") or type(model).__name__)
    inventory = load_config(data, model_id=name, origin=f"live {type(model).__name__}").inventory
    fields: dict[str, Any] = {}
    peft_config = _active_peft_config(model)
    if peft_config is not None:
        fields["rank"] = int(getattr(peft_config, "r", 16))
        targets = getattr(peft_config, "target_modules", None)
        if isinstance(targets, str):
            fields["targets"] = targets
        elif targets:
            fields["targets"] = tuple(sorted(targets))
        # peft's task types list candidates (["classifier", "score"]) and keep those that exist.
        paths = [m.path for m in inventory.modules]
        saved = [
            n
            for n in getattr(peft_config, "modules_to_save", None) or ()
            if any(p == n or p.endswith("." + n) for p in paths)
        ]
        if saved:
            fields["modules_to_save"] = tuple(saved)
        dropout = getattr(peft_config, "lora_dropout", None)
        if dropout is not None:
            fields["dropout"] = float(dropout)
    plan = TrainingPlan(
        method=method,
        seq_len=seq_len,
        batch_size=batch_size,
        gpus=gpus,
        sharding="ddp" if gpus > 1 else "none",
        stack=normalize_stack(stack) if stack else (),
        expandable_segments=expandable_segments,
        lengths=lengths,
        **fields,
    )
    plan.validate()
    return LiveFit(fit=fit(inventory, plan, find_gpu(gpu)), model=name, plan=plan.to_dict())


def _active_peft_config(model: Any) -> Any:
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict) or not configs:
        return None
    active = getattr(model, "active_adapter", None)
    if isinstance(active, list | tuple):
        active = active[0] if active else None
    return configs.get(active) if active in configs else next(iter(configs.values()))
