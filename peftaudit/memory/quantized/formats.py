"""How a quantized checkpoint stores its weights, and which of its modules it converts.

:class:`WeightFormat` is one weight's layout (bitsandbytes, FP8, GPTQ, AWQ,
compressed-tensors) with the bytes it takes; :class:`CheckpointQuantization` is
a whole ``quantization_config`` as transformers' quantizers read it, with the
modules it converts (:meth:`CheckpointQuantization.formats`). The byte layouts
themselves live in :mod:`peftaudit.memory.dtypes`, shared with plan-driven
quantization (QLoRA), so there is one rule per format.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from peftaudit.memory.dtypes import (
    awq_bytes,
    fp8_bytes,
    gptq_bytes,
    int8_bytes,
    mxfp4_bytes,
    nf4_bytes,
    packed_int_bytes,
)

if TYPE_CHECKING:  # pragma: no cover
    from peftaudit.inventory import Inventory, ModuleRecord

#: transformers keeps FP8 weights only on GPUs that run FP8 matmuls (compute capability 8.9+).
FP8_NOTE = "transformers dequantizes FP8 weights to bf16 on GPUs below compute capability 8.9 (A100, V100, T4)"


@dataclass(frozen=True)
class WeightFormat:
    """How one quantized weight is stored: its layout and the numbers the layout needs."""

    layout: str
    """``bnb4``, ``bnb8``, ``fp8``, ``gptq``, ``awq``, ``mxfp4`` or ``packed`` (compressed-tensors)."""
    kind: str
    """The weight kind layer programs see (:data:`~peftaudit.memory.dtypes.QUANTIZED_KINDS`)."""
    bits: int
    group_size: int = 0
    """Input features per scale (GPTQ, AWQ, compressed-tensors ``group``); 0 or -1: one per row."""
    strategy: str = "group"
    """compressed-tensors scale strategy: ``group``, ``channel``, ``tensor`` or ``block``."""
    block: tuple[int, int] | None = None
    """FP8 (and compressed-tensors ``block``): rows x columns per scale; ``None`` one per tensor."""
    double_quant: bool = False
    zero_points: bool = False

    def storage(self, out_features: int, in_features: int) -> tuple[int, int]:
        """(weight bytes, constant bytes) of one ``out x in`` weight in this format."""
        numel = out_features * in_features
        if self.layout == "bnb4":
            return nf4_bytes(numel, double_quant=self.double_quant)
        if self.layout == "bnb8":
            return int8_bytes(numel, out_features)
        if self.layout == "fp8":
            return fp8_bytes(out_features, in_features, self.block)
        if self.layout == "gptq":
            return gptq_bytes(out_features, in_features, bits=self.bits, group_size=self.group_size)
        if self.layout == "awq":
            return awq_bytes(out_features, in_features, bits=self.bits, group_size=self.group_size)
        if self.layout == "mxfp4":
            return mxfp4_bytes(out_features, in_features)
        scales = self._scales(out_features, in_features)
        return packed_int_bytes(out_features, in_features, bits=self.bits, scales=scales, zero_points=self.zero_points)

    def _scales(self, out_features: int, in_features: int) -> int:
        if self.strategy == "tensor":
            return 1
        if self.strategy == "channel" or self.group_size <= 0:
            return out_features
        if self.strategy == "block" and self.block is not None:
            return -(-out_features // self.block[0]) * -(-in_features // self.block[1])
        return out_features * -(-in_features // self.group_size)


@dataclass(frozen=True)
class CheckpointQuantization:
    """A checkpoint's ``quantization_config``, read as transformers' quantizer reads it."""

    quant_method: str
    """As the config names it: ``bitsandbytes``, ``gptq``, ``awq``, ``compressed-tensors``, ``fp8``, ``mxfp4``."""
    label: str
    """What the format is, in a few words (``bitsandbytes nf4, double quant``)."""
    groups: tuple[tuple[tuple[str, ...], WeightFormat], ...] = ()
    """(targets, format) pairs; targets ``("Linear",)`` is every linear layer not skipped.
    Empty when the estimate assumes the weights dequantized."""
    skip: tuple[str, ...] | None = None
    """transformers' ``modules_to_not_convert`` patterns; ``None``: its defaults (output head, tied)."""
    default_skips: bool = False
    """Add the defaults even when ``skip`` is given (AWQ does)."""
    ignore: tuple[str, ...] = ()
    """compressed-tensors ``ignore`` (names or ``re:`` patterns)."""
    blocks_only: bool = False
    """GPTQ quantizes the repeated blocks' linear layers only."""
    block_modules: tuple[str, ...] = ()
    """GPTQ ``modules_in_block_to_quantize``, flattened (empty: every linear in a block)."""
    experts: bool = False
    """Fused 3-D expert weights are stored quantized too (transformers' ``FP8Experts``)."""
    dequantized: str | None = None
    """Why the estimate assumes the weights dequantized (a fine-tuning recipe), if it does."""
    reference: str | None = None
    """The recipe or document that backs the assumption."""

    @property
    def kind(self) -> str | None:
        """The weight kind frozen quantized layers run as; ``None`` when dequantized."""
        return self.groups[0][1].kind if self.groups and self.dequantized is None else None

    def formats(self, inventory: Inventory) -> dict[str, WeightFormat]:
        """Linear module path -> format, for every module this checkpoint stores quantized.

        A live model's parameters say it themselves (bitsandbytes ``Params4bit``/``Int8Params``,
        which the inventory counts at their true size); otherwise the config's rules decide.
        """
        if self.kind is None:
            return {}
        live = {p.module for p in inventory.parameters if p.quantization is not None}
        if live:
            fmt = self.groups[0][1]
            return {m.path: fmt for m in inventory.modules if m.path in live and m.is_linear}
        defaults = _default_skips(inventory)
        skips = list(self.skip or ())
        use_defaults = self.skip is None or self.default_skips
        if self.quant_method not in ("gptq", "compressed-tensors"):
            # transformers' quantizers leave what the model keeps in float32 unconverted (T5's wo);
            # GPTQ (optimum) and compressed-tensors' own schemes do not ask.
            skips += inventory.keep_in_fp32
        out: dict[str, WeightFormat] = {}
        for m in inventory.modules:
            if not m.path or not m.is_linear:
                continue
            if use_defaults and m.path in defaults:
                continue
            if skips and not converts(m.path, skips):
                continue
            if self.blocks_only and (m.layer is None or not _in_block(m.path, self.block_modules)):
                continue
            if self.ignore and _ct_matches(m, self.ignore):
                continue
            found = next((f for targets, f in self.groups if _ct_matches(m, targets)), None)
            if found is not None:
                out[m.path] = found
        return out

    def expert_formats(self, inventory: Inventory) -> dict[str, WeightFormat]:
        """Fused 3-D expert parameter name -> format, when the format stores experts quantized."""
        if self.kind is None or not self.experts:
            return {}
        fmt = self.groups[0][1]
        skips = list(self.skip or ())
        return {
            p.name: fmt
            for p in inventory.parameters
            if p.kind == "experts" and len(p.shape) == 3 and (not skips or converts(p.module, skips))
        }


# --- which modules are converted -----------------------------------------------------------------


def _default_skips(inventory: Inventory) -> set[str]:
    """transformers' ``get_keys_to_not_convert``: the output embedding, tied weights, the last parameter."""
    skips = {inventory.output_head or ""}
    for p in inventory.parameters:
        if p.tied_with:
            skips.add(p.module)
            skips.update(n.rpartition(".")[0] for n in p.tied_with)
    if inventory.parameters:
        skips.add(inventory.parameters[-1].module)
    return skips


def converts(path: str, patterns: Sequence[str]) -> bool:
    """transformers' ``should_convert_module``: skipped when a pattern matches from the start
    (at a module boundary), as a regular expression, or as a suffix."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return not any(re.match(rf"(?:{key}){boundary}", path) or path.endswith(key) for key in patterns)


def _in_block(path: str, names: tuple[str, ...]) -> bool:
    return not names or any(path.endswith("." + n) or path == n for n in names)


def _ct_matches(module: ModuleRecord, targets: Sequence[str]) -> bool:
    """compressed-tensors' target matching: a class name, an exact name, or ``re:`` + a regex."""
    for target in targets:
        if target.startswith("re:"):
            if re.match(target[3:], module.path):
                return True
        elif target in (module.type, module.path) or (target == "Linear" and module.is_linear):
            return True
    return False
