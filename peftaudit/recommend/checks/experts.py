"""Mixture of experts: fused experts and routers left untrained, and peft re-targeting MoE names."""

from __future__ import annotations

from collections.abc import Iterator

from peftaudit.architecture import ModuleRole as R
from peftaudit.matching import all_linear
from peftaudit.recommend.checks import CheckContext, check
from peftaudit.recommend.findings import Finding
from peftaudit.recommend.targets import compact_paths, fused_expert_parameters, spec_matches


def _mode(ctx: CheckContext) -> str:
    return "peft's all-linear" if ctx.targets is None else "the targets"


@check("moe", "fused experts and routers left untrained, and peft re-targeting MoE names")
def moe(ctx: CheckContext) -> Iterator[Finding]:
    inv = ctx.inventory
    experts = fused_expert_parameters(inv)
    adapted = ctx.adapted
    adapted_params = set(adapted.parameter_paths) if adapted else set()
    adapted_modules = set(adapted.module_paths) if adapted else set()
    model_type = inv.model_type or inv.architecture
    if experts:
        missing = [p for p in experts if p not in adapted_params]
        numel = sum(p.numel for p in inv.parameters if p.name in set(missing))
        names = _expert_names(experts)
        if missing:
            share = numel / inv.total if inv.total else 0.0
            yield Finding(
                "moe.experts-untrained",
                "warning",
                f"{_mode(ctx)} leave{'s' if ctx.targets is None else ''} the fused experts untrained on "
                f"{model_type}: {numel:,} parameters ({share:.0%} of the model) get no adapter",
                fix=f"add target_parameters={names!r} with lora_dropout=0 (peftaudit recommend --preset "
                "all-linear+experts writes it), or accept attention-only adaptation of the MoE layers",
                modules=tuple(compact_paths(missing)),
                detail="transformers 5 fuses each layer's experts into 3-D parameters that no Linear holds; "
                "peft 0.21 rewrites all-linear to reach them for mixtral and qwen3_moe-style models only",
            )
        elif ctx.targets is None:
            yield Finding(
                "moe.experts-by-conversion",
                "info",
                f"peft's all-linear reaches the fused experts on {model_type} only through its transformers-5 "
                "MoE conversion, which also adds the router and doubles the rank of gate_up_proj",
                fix=f"write target_parameters={names!r} explicitly so the config says what trains "
                "(peftaudit recommend --preset all-linear+experts)",
                modules=tuple(compact_paths(experts)),
            )
    routers = [m for m in inv.modules if m.path and m.role == R.ROUTER and m.own_params and not m.is_linear]
    untouched = [m.path for m in routers if m.path not in adapted_modules and f"{m.path}.weight" not in adapted_params]
    if untouched:
        yield Finding(
            "moe.router-untrained",
            "info",
            f"{len(untouched)} routers stay frozen under {_mode(ctx)}",
            fix="usually right (a frozen router keeps the experts' load balance); to adapt them anyway add "
            f"target_parameters=['{untouched[0].rpartition('.')[2]}.weight']",
            modules=tuple(compact_paths(untouched)),
        )
    if adapted is None:
        return
    # peft re-targets names on MoE models transformers 5 fused: compare plain matching with what peft does.
    linear = frozenset(all_linear(inv))  # once, not once per module
    plain = [
        m.path for m in inv.modules if m.path and m.is_linear and spec_matches(ctx.planned, m.path, linear_paths=linear)
    ]
    lost = [p for p in plain if p not in adapted_modules]
    if lost:
        leaves = sorted({p.rpartition(".")[2] for p in lost})
        yield Finding(
            "moe.peft-retargets",
            "warning",
            f"peft re-targets the names {', '.join(leaves)} to the fused experts on {model_type}: "
            f"{len(lost)} dense layers named so get no adapter",
            fix="no target_modules spelling avoids this in peft 0.21 (any name ending in those words is "
            "rewritten); leave them out so the config says what trains, or train them in full with "
            "modules_to_save",
            modules=tuple(compact_paths(lost)),
        )


def _expert_names(experts: list[str]) -> list[str]:
    out: list[str] = []
    for name in experts:
        short = ".".join(name.split(".")[-3:])
        if short not in out:
            out.append(short)
    return out
