"""Layer programs: the operations one transformers layer runs, per architecture family.

Each program is the ``forward`` of a transformers 5 module written against the
:class:`~peftaudit.memory.analytic.tape.Tape` (with the operations of
:mod:`~peftaudit.memory.analytic.ops` and :mod:`~peftaudit.memory.analytic.linear`),
line by line, so what it keeps for backward can be read next to the real source:

* :mod:`.llama`: ``LlamaDecoderLayer`` (Mistral, Qwen2/3, Gemma-1, OLMo, Granite,
  and the Mixtral/Qwen MoE blocks);
* :mod:`.gpt2`: ``GPT2Block``;
* :mod:`.bert`: ``BertLayer`` and the MLM head (BERT, RoBERTa).

Each module registers the ``model_type`` values it reads
(:func:`~peftaudit.memory.analytic.programs.registry.register_program`); a new
architecture is one more module imported here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from peftaudit.memory.analytic.layout import NoLayerProgram
from peftaudit.memory.analytic.programs import bert, gpt2, llama
from peftaudit.memory.analytic.programs.registry import (
    LayerProgram,
    lookup,
    register_program,
    registered_programs,
)
from peftaudit.memory.plan import PlanWarning

if TYPE_CHECKING:  # pragma: no cover
    from peftaudit.inventory import Inventory

#: The program that stands in for layers no registered program reads, at their own sizes.
STAND_IN: LayerProgram = llama.LLAMA


def program_for(inventory: Inventory) -> tuple[LayerProgram, list[PlanWarning]]:
    """The program registered for the model's type, or :data:`STAND_IN` with a warning that says so."""
    model_type = inventory.model_type or ""
    program = lookup(model_type)
    if program is not None:
        return program, []
    warning = PlanWarning(
        "approximate-activations",
        f"no layer program for model type '{model_type}': activations use the Llama program with its sizes",
    )
    return STAND_IN, [warning]


__all__ = [
    "STAND_IN",
    "LayerProgram",
    "NoLayerProgram",
    "bert",
    "gpt2",
    "llama",
    "lookup",
    "program_for",
    "register_program",
    "registered_programs",
]
