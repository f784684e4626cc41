"""The architecture numbers a layer program runs with, read from the inventory.

:func:`shape_of` takes them from the config's dimensions; the :class:`~peftaudit.memory.analytic.programs.LayerProgram`
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
    qk_norm: bool = False
    gemma_norm: bool = False
    dropout: float = 0.0
    """Residual/embedding dropout (GPT-2 ``resid_pdrop``, BERT ``hidden_dropout_prob``)."""
    attn_dropout: float = 0.0
    causal: bool = True
    sdpa_repeats_kv: bool = False
    """SDPA gets keys and values expanded to every head (``repeat_kv``), as transformers before 4.54
    ran it (stack rule ``kv-expanded-before-sdpa``); later releases pass the grouped heads."""


def shape_of(inventory: Inventory, program: LayerProgram) -> ModelShape:
    """The numbers ``program`` needs to replay ``inventory``'s layers."""
    dims = inventory.dims
    mt = inventory.model_type or ""
    hidden = dims.hidden_size or 0
    heads = dims.num_attention_heads or 1
    layers = dims.num_layers or 0
    if not hidden or not layers:
        # Configs with per-stage sizes (ConvNeXt's hidden_sizes and depths, Swin's embed_dim and
        # depths) name no one hidden size: read the widest stack's layers instead.
        hidden, layers = _from_layers(inventory)
    if not hidden or not layers:
        raise PlanError(f"{inventory.architecture}: its config gives no hidden size or layer count to estimate from")
    return ModelShape(
        model_type=mt,
        hidden=hidden,
        layers=layers,
        heads=heads,
        kv_heads=dims.num_key_value_heads or heads,
        head_dim=dims.head_dim or hidden // heads,
        intermediate=dims.intermediate_size or 4 * hidden,
        vocab=dims.vocab_size or 0,
        qk_norm=any(p.name.endswith("self_attn.q_norm.weight") for p in inventory.parameters),
        gemma_norm=mt.startswith("gemma"),
        dropout=program.dropout,
        attn_dropout=program.dropout,
        causal=program.causal,
    )


def _from_layers(inventory: Inventory) -> tuple[int, int]:
    """(hidden size, layer count) of the stack holding most parameters: its layers' widest norm or scale vector."""
    from peftaudit.memory.analytic.layout import layer_indices, main_block

    try:
        block = main_block(inventory)
    except PlanError:
        return 0, 0
    widths = [p.shape[0] for p in inventory.parameters if p.block == block and len(p.shape) == 1]
    return (max(widths) if widths else 0), len(layer_indices(inventory, block))
