"""Does the model in memory fit a GPU for a training plan? (What the pytest marker's ``fits=`` asks.)"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from peftaudit.errors import PeftauditError
from peftaudit.gpus.sizing import Fit

if TYPE_CHECKING:  # pragma: no cover
    from peftaudit.inventory import Inventory


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
        batch = f"batch {f.batch_size} x seq {f.seq_len:,}"
        if f.objective == "grpo":
            batch = (
                f"{f.batch_size} x {f.generations} generations x seq {f.seq_len:,} ({f.completion_len:,} completion)"
            )
        if f.objective != "sft":
            batch = f"{f.objective} {batch}"
        return f"{self.model} {f.method} (r={self.plan.get('rank')}) {batch} on {f.setup()} {f.gpu}" + (
            f", stack {named}" if named else ""
        )

    def explain(self) -> str:
        f = self.fit
        gib = 2**30
        verdict = "fits" if f.fits else "does not fit"
        return (
            f"{self.summary} {verdict}: estimated peak {f.peak_bytes / gib:.2f} GiB per GPU, "
            f"{f.usable_bytes / gib:.2f} GiB usable"
            + (f" beside vLLM's {f.vllm_bytes / gib:.2f} GiB" if f.vllm_bytes else "")
            + f" ({abs(f.headroom_bytes) / gib:.2f} GiB {'spare' if f.fits else 'short'})"
        )

    def to_dict(self) -> dict[str, Any]:
        return {**self.fit.to_dict(), "model": self.model, "summary": self.summary, "plan": self.plan}


def fit_live_model(
    model: Any,
    *,
    gpu: str,
    method: str | None = None,
    seq_len: int = 2048,
    batch_size: int = 1,
    gpus: int = 1,
    stack: str | tuple[tuple[str, str], ...] = (),
    expandable_segments: bool = False,
    lengths: str = "fixed",
    objective: Mapping[str, Any] | None = None,
) -> LiveFit:
    """Estimate ``model``'s training plan on ``gpu``, reading the adapter from a PeftModel.

    The architecture comes from the model's config (rebuilt on the meta device,
    so the live weights are never touched). A PeftModel's active adapter config, of
    any peft type peftaudit models, gives the method and its options
    (:func:`peftaudit.memory.peft_config.plan_fields`). ``method``: the method of a
    model without an adapter (default ``lora``); given with a PeftModel, it picks how a
    LoRA adapter's base is stored (``qlora``, ``lora-8bit``), or sizes another kind of
    training of the same model (``full``, ``freeze``, ...) instead of its adapter;
    ``lora`` (the pytest marker's default) leaves the adapter's own method. ``stack``: the
    releases the run uses (``"transformers==4.44,peft==0.12"``; default the installed ones).
    ``expandable_segments`` and ``lengths`` (``fixed`` or ``varied``): how the caching allocator
    is set up and what batches it sees (:class:`~peftaudit.memory.plan.TrainingPlan`). ``objective``: the
    training objective's plan fields (``{"objective": "grpo", "generations": 16}``; default sft), checked as
    any plan is.
    """
    from peftaudit.gpus.catalog import find_gpu
    from peftaudit.gpus.sizing import fit
    from peftaudit.memory import TrainingPlan
    from peftaudit.memory.stack import normalize_stack

    inventory, name = live_inventory(model)
    fields = _adapter_fields(active_peft_config(model), [m.path for m in inventory.modules], method)
    plan = TrainingPlan(
        seq_len=seq_len,
        batch_size=batch_size,
        gpus=gpus,
        sharding="ddp" if gpus > 1 else "none",
        stack=normalize_stack(stack) if stack else (),
        expandable_segments=expandable_segments,
        lengths=lengths,
        **fields,
        **dict(objective or {}),
    )
    plan.validate()
    return LiveFit(fit=fit(inventory, plan, find_gpu(gpu)), model=name, plan=plan.to_dict())


def live_inventory(model: Any) -> tuple[Inventory, str]:
    """The inventory of a live model's architecture, rebuilt on the meta device from its config (the live
    weights are never touched), and the model's name."""
    from peftaudit.sources.load import load_config

    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise PeftauditError(f"cannot size a {type(model).__name__}: it has no transformers config")
    data = config.to_dict()
    # Rebuild the class actually in use (a classifier, say), not the one the checkpoint's config names.
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    data["architectures"] = [type(base).__name__]
    name = str(getattr(config, "_name_or_path", "") or type(model).__name__)
    return load_config(data, model_id=name, origin=f"live {type(model).__name__}").inventory, name


#: Methods that train a LoRA adapter and differ only in how the frozen base is stored.
_LORA_BASES = ("lora", "qlora", "lora-8bit")


def _adapter_fields(peft_config: Any, paths: list[str], method: str | None) -> dict[str, Any]:
    """Plan fields for the live adapter ``peft_config`` (None: no adapter) and the caller's ``method``."""
    if peft_config is None:
        return {"method": method or "lora"}
    from peftaudit.memory.peft_config import plan_fields

    fields = plan_fields(peft_config)
    own = fields["method"]
    if method is None or method == "lora" or method == own:
        pass  # the adapter's own method
    elif own == "lora" and method in _LORA_BASES:
        fields["method"] = method  # the same LoRA adapter on a quantized base
    else:
        return {"method": method}  # another kind of training of this model, not its adapter
    # peft's task types list candidates (["classifier", "score"]) and keep those that exist.
    saved = [n for n in fields.get("modules_to_save", ()) if any(p == n or p.endswith("." + n) for p in paths)]
    if saved:
        fields["modules_to_save"] = tuple(saved)
    else:
        fields.pop("modules_to_save", None)
    return fields


def active_peft_config(model: Any) -> Any:
    """The active adapter's peft config of a PeftModel; ``None`` for a model without one."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict) or not configs:
        return None
    active = getattr(model, "active_adapter", None)
    if isinstance(active, list | tuple):
        active = active[0] if active else None
    return configs.get(active) if active in configs else next(iter(configs.values()))
