"""The plan line: what an estimate assumed, in one line of the user's words.

Every command that shows an estimate (``report --method/--compare``, ``plan``,
``fit``, ``gpus``, ``recommend``) prints this line above it, so a figure never
stands without its batch, sequence, checkpointing, precision, optimizer,
attention, GPUs and software stack (one line; wrapped here)::

    plan: batch 1 x 2,048 tokens · checkpointing off · bf16 · AdamW (torch, fused) · attention sdpa ·
          1 GPU, no sharding · stack: installed

Where several plans are shown side by side (``--compare full,lora,qlora``), the
line states what they share; what differs (QLoRA's 4-bit base) is returned per
plan for the rows of the table to carry. Settings at their defaults that rarely
change (allocator, CUDA context, loss, images) are named only when set.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from peftaudit.memory.plan import GALORE_METHOD_NAMES, MIB, TrainingPlan
from peftaudit.memory.stack import describe

#: A plan as the commands hold it, or as an estimate carries it (``MemoryEstimate.plan``).
PlanLike = TrainingPlan | Mapping[str, Any]

#: Parts of the line, in the order they are shown. ``omit=`` takes these names.
PARTS: tuple[str, ...] = (
    "objective",
    "batch",
    "generation",
    "accumulation",
    "images",
    "checkpointing",
    "precision",
    "base",
    "optimizer",
    "attention",
    "loss",
    "gpus",
    "expandable_segments",
    "lengths",
    "allocator_margin",
    "cuda_context",
    "stack",
)

#: Optimizers in the user's words, with the library that runs them.
_OPTIMIZERS: dict[str, str] = {
    "adamw": "AdamW (torch, {impl})",
    "sgd": "SGD (torch)",
    "sgd_momentum": "SGD with momentum (torch, {impl})",
    "adamw_8bit": "AdamW 8-bit (bitsandbytes)",
    "paged_adamw": "paged AdamW (bitsandbytes)",
    "paged_adamw_8bit": "paged AdamW 8-bit (bitsandbytes)",
    "lion": "Lion (bitsandbytes)",
    "lion_8bit": "Lion 8-bit (bitsandbytes)",
    "adafactor": "Adafactor (transformers)",
    "none": "no optimizer (inference)",
}

SEPARATOR = " · "
_PREFIX = "plan: "
#: Continuation lines of a wrapped plan line start under its first part.
_INDENT = " " * len(_PREFIX)


@dataclass(frozen=True)
class PlanLine:
    """The line all plans share, and per plan the words it leaves to that plan's row."""

    text: str
    """``"plan: batch 1 x 2,048 tokens · ..."``."""
    rest: tuple[str, ...]
    """Per plan, in the order given: what differs from the others, short for a table cell (``"nf4"`` for a
    4-bit base), ``""`` where nothing does."""

    def wrapped(self, width: int) -> list[str]:
        """The line for a terminal ``width`` columns wide, broken between parts, never inside one."""
        first, *others = self.text.split(SEPARATOR)
        lines = [first]
        for i, part in enumerate(others):
            # Room for the part, and for the dot that says the line goes on when it is not the last.
            tail = len(SEPARATOR.rstrip()) if i < len(others) - 1 else 0
            if len(lines[-1]) + len(SEPARATOR) + len(part) + tail <= width:
                lines[-1] += SEPARATOR + part
            else:
                lines[-1] += SEPARATOR.rstrip()
                lines.append(_INDENT + part)
        return lines


def plan_line(plans: PlanLike | Sequence[PlanLike], *, omit: Collection[str] = ()) -> PlanLine:
    """The plan line of one plan or of several shown together.

    ``omit``: names from :data:`PARTS` that the table beside the line shows itself
    (``fit`` searches the batch and the sequence, so its table carries them).
    """
    many = [plans] if isinstance(plans, TrainingPlan | Mapping) else list(plans)
    parts = [_parts(_plan(p)) for p in many]
    shared: list[str] = []
    for name in PARTS:
        if name in omit:
            continue
        words = {p.get(name) for p in parts}
        if len(words) == 1 and None not in words:
            shared.append(parts[0][name])
    differ = [n for n in PARTS if n not in omit and len({p.get(n) for p in parts}) > 1]
    rest = tuple(", ".join(_in_row(n, p[n]) for n in differ if n in p) for p in parts)
    return PlanLine(_PREFIX + SEPARATOR.join(shared), rest)


def _in_row(name: str, words: str) -> str:
    """A part as a row's method cell carries it: ``qlora (nf4)``, short enough for a table column."""
    return words.removeprefix("base ") if name == "base" else words


def _plan(plan: PlanLike) -> TrainingPlan:
    if isinstance(plan, TrainingPlan):
        return plan
    # Read, not validated: a renderer shows what an estimate (perhaps an older one, from JSON) carries.
    known = {f.name for f in fields(TrainingPlan)}
    return TrainingPlan(**{k: v for k, v in plan.items() if k in known})


def _parts(plan: TrainingPlan) -> dict[str, str]:
    """Each part of the line for one plan; parts at their defaults that go without saying are absent."""
    from peftaudit.memory.methods import base_quantization

    parts = _objective(plan)
    if plan.gradient_accumulation > 1:
        parts["accumulation"] = f"gradient accumulation {plan.gradient_accumulation:,}"
    if plan.images:
        tokens = f" of {plan.image_tokens:,} tokens" if plan.image_tokens else ""
        parts["images"] = f"{plan.images} image{'s' if plan.images != 1 else ''}{tokens} per sample"
    elif plan.image_size:
        parts["images"] = f"images {plan.image_size} px"
    parts["checkpointing"] = f"checkpointing {'on' if plan.gradient_checkpointing else 'off'}"
    parts["precision"] = plan.precision
    quantized = base_quantization(plan)
    if quantized in ("nf4", "fp4"):
        parts["base"] = f"base {quantized}" + ("" if plan.double_quant else " (no double quant)")
    elif quantized is not None or plan.base_dtype is not None:
        parts["base"] = f"base {quantized or plan.base_dtype}"
    parts["optimizer"] = _OPTIMIZERS.get(plan.optimizer, plan.optimizer).format(impl=plan.optimizer_impl)
    if plan.method in GALORE_METHOD_NAMES and plan.training:  # GaLore brings its own optimizer
        parts["optimizer"] = f"GaLore AdamW r{plan.galore_rank}"
    parts["attention"] = f"attention {plan.attention}"
    if plan.loss != "default":
        parts["loss"] = f"{plan.loss} loss"
    parts["gpus"] = _gpus(plan)
    if plan.expandable_segments:
        parts["expandable_segments"] = "expandable segments"
    if plan.lengths != "fixed":
        parts["lengths"] = f"{plan.lengths} lengths"
    if plan.allocator_fraction is not None:
        parts["allocator_margin"] = f"allocator margin {plan.allocator_fraction:g}"
    if plan.cuda_context_bytes != TrainingPlan.cuda_context_bytes:
        parts["cuda_context"] = f"CUDA context {plan.cuda_context_bytes / MIB:,.0f} MiB"
    parts["stack"] = f"stack: {describe(plan.stack) or 'installed'}"
    return parts


def _objective(plan: TrainingPlan) -> dict[str, str]:
    """The batch in the objective's words (pairs, prompts x generations) and what else it runs."""
    from peftaudit.memory.objectives import trl_beta

    batch, seq, objective = plan.batch_size, plan.seq_len, plan.objective
    if objective == "sft":
        return {"batch": f"batch {batch:,} x {seq:,} tokens"}
    name = objective.upper() if objective != "reward" else "reward model"
    if plan.precompute_ref:
        name += ", reference precomputed"
    if objective == "grpo":
        beta = trl_beta(plan)
        if beta > 0:
            name += f", beta {beta:g} (reference model)"
        prompts = f"{batch:,} prompt{'s' if batch != 1 else ''}"
        where = {
            "transformers": "generation in transformers",
            "vllm-colocate": f"vLLM colocated ({plan.vllm_memory:.0%} of each GPU)",
            "vllm-server": "generation on a vLLM server",
        }[plan.generation]
        completion = f"({plan.completion_len:,} completion)"
        batch_words = f"{prompts} x {plan.generations:,} generations x {seq:,} tokens {completion}"
        return {"objective": name, "batch": batch_words, "generation": where}
    if objective == "kto":
        words = f"batch {batch:,} x {seq:,} tokens (+ {batch:,} KL completion{'s' if batch != 1 else ''})"
    else:
        words = f"{batch:,} pair{'s' if batch != 1 else ''} ({2 * batch:,} sequences) x {seq:,} tokens"
    return {"objective": name, "batch": words}


def _gpus(plan: TrainingPlan) -> str:
    text = f"{plan.gpus:,} GPU{'s' if plan.gpus != 1 else ''}"
    if plan.sharding == "none":
        text += ", no sharding"
    elif plan.sharding == "fsdp-hybrid":
        text += f", fsdp-hybrid ({min(plan.gpus_per_node, plan.gpus)} per node)"
    else:
        text += f", {plan.sharding}"
    if plan.offload != "none":
        text += f", offload {plan.offload}"
    return text


__all__ = ["PARTS", "PlanLike", "PlanLine", "plan_line"]
