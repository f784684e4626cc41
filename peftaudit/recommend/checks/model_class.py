"""The model class: gradient checkpointing, attention kernels, remote code, layers LoRA cannot adapt."""

from __future__ import annotations

from collections.abc import Iterator

from peftaudit.architecture import ModuleRole as R
from peftaudit.recommend.checks import CheckContext, check
from peftaudit.recommend.checks.lora import ADAPTABLE_TYPES
from peftaudit.recommend.findings import Finding
from peftaudit.recommend.targets import compact_paths, fused_expert_parameters


@check("model", "gradient checkpointing, attention kernels, remote code and layers LoRA cannot adapt")
def model(ctx: CheckContext) -> Iterator[Finding]:
    facts = ctx.facts
    arch = ctx.inventory.architecture
    if facts.supports_gradient_checkpointing is False:
        yield Finding(
            "model.no-gradient-checkpointing",
            "warning",
            f"{arch} does not support gradient checkpointing: every layer's activations stay in memory",
            fix="budget activations for the full depth (shorter sequences or micro-batches), or use a "
            "trainer that wraps layers itself (FSDP activation checkpointing)",
        )
    if facts.supports_sdpa is False and not facts.supports_flash_attention:
        yield Finding(
            "model.eager-attention",
            "warning",
            f"{arch} supports neither SDPA nor flash attention: eager attention keeps the full "
            "sequence x sequence score matrix per head",
            fix="keep sequences short, or port the model to a transformers version with SDPA support",
        )
    elif facts.supports_sdpa is False:
        yield Finding(
            "model.no-sdpa",
            "info",
            f"{arch} does not support SDPA; without a flash-attention kernel it falls back to eager attention",
            fix="load it with a flash-attention implementation (attn_implementation=...), not the default",
        )
    if facts.remote_code:
        yield Finding(
            "model.remote-code",
            "warning",
            f"{ctx.facts.model_id} needs trust_remote_code: training runs code from the model's repository",
            fix="read the repository's modeling code and pin its revision (revision=<commit>) in every "
            "config that loads it",
        )
    yield from _unadaptable(ctx)


def _unadaptable(ctx: CheckContext) -> Iterator[Finding]:
    inv = ctx.inventory
    experts = set(fused_expert_parameters(inv))
    types = {m.path: m for m in inv.modules}
    stuck: dict[str, list[str]] = {}
    numel: dict[str, int] = {}
    for p in inv.parameters:
        owner = types.get(p.module)
        if owner is None or len(p.shape) < 2 or p.is_bias or p.name in experts or p.kind in ("embedding", "norm"):
            continue
        if owner.role == R.ROUTER:  # the moe check speaks for routers
            continue
        if owner.is_linear or owner.type in ADAPTABLE_TYPES:
            continue
        stuck.setdefault(owner.type, []).append(p.name)
        numel[owner.type] = numel.get(owner.type, 0) + p.numel
    for module_type in sorted(stuck):
        names = stuck[module_type]
        yield Finding(
            "lora.unadaptable-layer",
            "info",
            f"{module_type} holds {numel[module_type]:,} parameters in raw weights LoRA cannot wrap as a module",
            fix=f"reach them with target_parameters (e.g. {'.'.join(names[0].split('.')[-2:])!r}) or train "
            "them in full with modules_to_save; target_modules cannot adapt them",
            modules=tuple(compact_paths(names)),
        )
