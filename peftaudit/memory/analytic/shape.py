"""The architecture numbers a layer program runs with, read from the inventory.

:func:`shape_of` takes them from the config's dimensions (and, for MoE models,
from the expert weights' shapes); the :class:`~peftaudit.memory.analytic.programs.LayerProgram`
adds what the inventory cannot tell (the dropout its family's configs use,
causal or bidirectional attention).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from peftaudit.memory.plan import PlanError

if TYPE_CHECKING:  # pragma: no cover
    from peftaudit.inventory import Inventory
    from peftaudit.memory.analytic.programs.registry import LayerProgram


@dataclass(frozen=True)
class ModelShape:
    """Architecture numbers a program needs (not to be confused with a tensor's shape)."""

    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    experts: int = 0
    top_k: int = 0
    expert_ffn: int = 0
    shared_ffn: int = 0
    qk_norm: bool = False
    gemma_norm: bool = False
    router_fp32_weights: bool = True
    """Mixtral keeps routing weights in fp32; Qwen MoE casts them back to the activation dtype."""
    dropout: float = 0.0
    """Residual/embedding dropout (GPT-2 ``resid_pdrop``, BERT ``hidden_dropout_prob``)."""
    attn_dropout: float = 0.0
    causal: bool = True


def shape_of(inventory: Inventory, program: LayerProgram) -> ModelShape:
    """The numbers ``program`` needs to replay ``inventory``'s layers."""
    dims = inventory.dims
    mt = inventory.model_type or ""
    hidden = dims.hidden_size or 0
    heads = dims.num_attention_heads or 1
    if not hidden or not dims.num_layers:
        raise PlanError(f"{inventory.architecture}: its config gives no hidden size or layer count to estimate from")
    config_moe = inventory.moe
    experts = config_moe.num_experts if config_moe else 0
    top_k = config_moe.experts_per_token if config_moe else 0
    expert_ffn = 0
    shared_ffn = 0
    if experts:
        for p in inventory.parameters:
            if p.name.endswith("mlp.experts.down_proj") and len(p.shape) == 3:
                expert_ffn = p.shape[2]
                break
        for m in inventory.modules:
            if m.path.endswith("shared_expert.down_proj") and m.in_features:
                shared_ffn = m.in_features
                break
    return ModelShape(
        model_type=mt,
        hidden=hidden,
        layers=dims.num_layers,
        heads=heads,
        kv_heads=dims.num_key_value_heads or heads,
        head_dim=dims.head_dim or hidden // heads,
        intermediate=dims.intermediate_size or 4 * hidden,
        vocab=dims.vocab_size or 0,
        experts=experts,
        top_k=top_k,
        expert_ffn=expert_ffn,
        shared_ffn=shared_ffn,
        qk_norm=any(p.name.endswith("self_attn.q_norm.weight") for p in inventory.parameters),
        gemma_norm=mt.startswith("gemma"),
        router_fp32_weights=mt in ("mixtral", "minimax"),
        dropout=program.dropout,
        attn_dropout=program.dropout,
        causal=program.causal,
    )
