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
(:func:`~peftaudit.memory.analytic.programs.registry.register_program`). Every
other model's step is derived from a trace (:mod:`peftaudit.memory.derived`);
programs are kept where they exist because they need no trace at all.
"""

from __future__ import annotations

from peftaudit.memory.analytic.layout import NoLayerProgram
from peftaudit.memory.analytic.programs import bert, gpt2, llama
from peftaudit.memory.analytic.programs.registry import (
    LayerProgram,
    lookup,
    register_program,
    registered_programs,
)

#: The program that stands in, at the model's own sizes, for layers that neither a registered
#: program reads nor a trace can run (:mod:`peftaudit.memory.derived`).
STAND_IN: LayerProgram = llama.LLAMA


__all__ = [
    "STAND_IN",
    "LayerProgram",
    "NoLayerProgram",
    "bert",
    "gpt2",
    "llama",
    "lookup",
    "register_program",
    "registered_programs",
]
