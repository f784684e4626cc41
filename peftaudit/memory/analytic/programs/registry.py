"""The registry of layer programs, keyed by transformers ``model_type``.

A :class:`LayerProgram` is one architecture family's forward written against
the tape: its layer, its embedding and its head (with the loss). Each program
module registers the model types it reads (as peft registers its tuners), so a
new architecture is a new module and one :func:`register_program` call, not an
edit to a chain of ``if model_type == ...``::

    register_program(LLAMA, "llama", "mistral", "qwen2")

A model type no program is registered for gets a step profile derived from a
trace of the model itself (:mod:`peftaudit.memory.derived`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from peftaudit.memory.analytic.layout import Layout
    from peftaudit.memory.analytic.ops import Context
    from peftaudit.memory.analytic.shape import ModelShape
    from peftaudit.memory.analytic.tape import Tape, Tensor

LayerFn = Callable[["Tape", "Context", "ModelShape", "Layout", int, "Tensor", str], "Tensor"]
"""``layer(tape, ctx, shape, layout, layer_index, x, attention) -> output``: one repeated layer."""
EmbedFn = Callable[["Tape", "Context", "ModelShape", "Layout", bool, int], "Tensor"]
"""``embed(tape, ctx, shape, layout, input_grad, virtual_tokens) -> hidden states``."""
HeadFn = Callable[["Tape", "Context", "ModelShape", "Layout", "Tensor", str], "Tensor"]
"""``head(tape, ctx, shape, layout, x, loss) -> loss``: final norm, output head and the loss."""


@dataclass(frozen=True)
class LayerProgram:
    """One architecture family's forward on the tape, and the defaults its configs train with."""

    name: str
    """The family (``llama``, ``gpt2``, ``bert``)."""
    layer: LayerFn
    embed: EmbedFn
    head: HeadFn
    dropout: float = 0.0
    """Residual/embedding and attention dropout the family's configs default to. The inventory
    carries dimensions, not dropout probabilities, so the program says what the configs use."""
    causal: bool = True
    """Decoders mask attention causally; encoders (BERT) do not."""


_PROGRAMS: dict[str, LayerProgram] = {}


def register_program(program: LayerProgram, *model_types: str) -> None:
    """Use ``program`` for models of these transformers ``model_type`` values."""
    for model_type in model_types:
        known = _PROGRAMS.get(model_type)
        if known is not None and known is not program:
            raise ValueError(f"model type '{model_type}' already has the '{known.name}' layer program")
        _PROGRAMS[model_type] = program


def registered_programs() -> Mapping[str, LayerProgram]:
    """Model type -> layer program, for every registered model type (read-only)."""
    return MappingProxyType(_PROGRAMS)


def lookup(model_type: str) -> LayerProgram | None:
    """The program registered for ``model_type``, or ``None``."""
    return _PROGRAMS.get(model_type)
