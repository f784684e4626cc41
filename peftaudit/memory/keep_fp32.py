"""Weights transformers keeps in float32 when it loads a model in half precision, and never quantizes.

A model class names them (``PreTrainedModel``'s class attributes, gathered from its sub-models):

* ``_keep_in_fp32_modules`` (T5's ``wo``, gpt-oss's norms) stay float32 in **fp16** loads only, and
  quantizers (bitsandbytes, FP8, AWQ, compressed-tensors, ...) leave those modules unconverted
  whatever the dtype (``HfQuantizer.get_modules_to_not_convert``);
* ``_keep_in_fp32_modules_strict`` (DeepSeek-V3's router ``gate.weight`` and
  ``e_score_correction_bias``) stay float32 in **fp16 and bf16** loads.

So a T5 trained in bf16 keeps ``wo`` in bf16 (it is only never quantized), and in fp16 keeps it
in float32. The names match as transformers 5 matches them: ``PreTrainedModel._get_dtype_plan``
and ``core_model_loading`` search each parameter or buffer name for any of them as a regular
expression (``*`` any characters); quantizers match module paths with ``should_convert_module``
(from the start at a module boundary, as a regular expression, or as a suffix).
:class:`~peftaudit.inventory.Inventory` records the two lists; the static estimate
(:mod:`peftaudit.memory.analytic.layout`) and the trace (:mod:`peftaudit.memory.tracing.model`)
both ask here.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from peftaudit.memory.quantized.formats import converts

if TYPE_CHECKING:  # pragma: no cover
    from peftaudit.inventory import Inventory

HALF = ("fp16", "bf16")


def patterns(inventory: Inventory, dtype: str) -> tuple[str, ...]:
    """The names kept in float32 when the model is loaded in ``dtype`` (a short name: ``bf16``)."""
    if dtype == "fp16":
        return (*inventory.keep_in_fp32, *inventory.keep_in_fp32_strict)
    if dtype == "bf16":
        return inventory.keep_in_fp32_strict
    return ()


def kept_in_fp32(name: str, names: Sequence[str]) -> bool:
    """Whether the parameter or buffer ``name`` is one of ``names`` (from :func:`patterns`)."""
    return bool(names) and re.search("|".join(f"(?:{n.replace('*', '.*')})" for n in names), name) is not None


def dtype_of(inventory: Inventory, name: str, dtype: str) -> str:
    """The dtype a parameter loaded at ``dtype`` has: float32 where the model keeps it, else ``dtype``."""
    return "fp32" if dtype in HALF and kept_in_fp32(name, patterns(inventory, dtype)) else dtype


def never_quantized(inventory: Inventory, path: str) -> bool:
    """Whether quantizers leave the module at ``path`` unconverted because the model keeps it in float32."""
    return not converts(path, inventory.keep_in_fp32)
