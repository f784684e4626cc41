"""Quantized stand-ins: bitsandbytes layers holding packed fake weights.

Subclasses of ``bnb.nn.Linear4bit``/``Linear8bitLt`` (so peft wraps them with
its bnb LoRA layers) that hold a packed uint8 (or int8) weight and the
quantization constants as fake tensors, and run bitsandbytes' matmul memory
behaviour (4-bit: the dequantized weight is scratch and nothing of the input
is kept; 8-bit: the input is kept).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

from peftaudit.memory.plan import PlanError, TrainingPlan
from peftaudit.memory.quantized import WeightFormat
from peftaudit.units import SHORT_DTYPES


def quant_layer_classes() -> tuple[type, type]:
    try:
        import bitsandbytes as bnb
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise PlanError("tracing a quantized base needs bitsandbytes (pip install bitsandbytes)") from exc
    import torch

    class MatMul4bit(torch.autograd.Function):
        """bitsandbytes' MatMul4Bit: dequantize, matmul; keep the packed weight only."""

        @staticmethod
        def forward(ctx: Any, a: Any, packed: Any, out_features: int, bias: Any) -> Any:
            w = torch.empty(out_features, a.shape[-1], dtype=a.dtype, device=a.device)
            ctx.save_for_backward(packed)
            ctx.shape = (out_features, a.shape[-1])
            return torch.nn.functional.linear(a, w, bias)

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            w = torch.empty(ctx.shape, dtype=grad.dtype, device=grad.device)
            return grad @ w, None, None, None

    class MatMul8bit(torch.autograd.Function):
        """bitsandbytes' MatMul8bitLt: fp16 and int8 copies of the input are scratch; the input is kept."""

        @staticmethod
        def forward(ctx: Any, a: Any, weight: Any, bias: Any) -> Any:
            a16 = a.to(torch.float16)
            ca = torch.empty(a16.shape, dtype=torch.int8, device=a.device)
            del a16
            acc = torch.empty((*a.shape[:-1], weight.shape[0]), dtype=torch.int32, device=a.device)
            del ca
            out = torch.empty((*a.shape[:-1], weight.shape[0]), dtype=a.dtype, device=a.device)
            del acc
            ctx.keep = a
            ctx.shape = tuple(weight.shape)
            return out

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            w = torch.empty(ctx.shape, dtype=grad.dtype, device=grad.device)
            return grad @ w, None, None

    class FakeLinear4bit(bnb.nn.Linear4bit):
        def forward(self, x: Any) -> Any:
            inp_dtype = x.dtype
            x = x.to(self.compute_dtype) if self.compute_dtype is not None else x
            return MatMul4bit.apply(x, self.weight, self.out_features, self.bias).to(inp_dtype)

    class FakeLinear8bit(bnb.nn.Linear8bitLt):
        def forward(self, x: Any) -> Any:
            return MatMul8bit.apply(x, self.weight, self.bias)

    return FakeLinear4bit, FakeLinear8bit


def quantize_linears(
    model: Any, plan: TrainingPlan, kind: str, skip: set[str], formats: Mapping[str, WeightFormat] | None = None
) -> dict[str, dict[str, tuple[tuple[int, ...], str]]]:
    """Replace frozen ``nn.Linear`` layers by quantized stand-ins; return their extra tensors' shapes.

    ``formats`` are a pre-quantized checkpoint's (:mod:`peftaudit.memory.quantized`): a module in
    it is stored as its format says; formats without a bitsandbytes layer of their own (fp8,
    GPTQ, AWQ, compressed-tensors) dequantize per matmul like the 4-bit stand-in, with their
    packed bytes and constants as fake tensors.
    """
    import torch

    from peftaudit.memory.dtypes import BNB_4BIT_BLOCK, BNB_NESTED_BLOCK

    lin4, lin8 = quant_layer_classes()
    extras: dict[str, dict[str, tuple[tuple[int, ...], str]]] = {}
    compute = getattr(torch, SHORT_DTYPES[plan.compute_dtype])
    for name, module in list(model.named_modules()):
        conv1d = type(module).__name__ == "Conv1D"
        if not (type(module) is torch.nn.Linear or conv1d) or name in skip:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        # transformers' Conv1D stores (in, out); bitsandbytes replaces it like a Linear.
        in_f, out_f = module.weight.shape if conv1d else (module.in_features, module.out_features)
        numel = out_f * in_f
        fmt = (formats or {}).get(name)
        layer_kind = fmt.kind if fmt is not None else kind
        double_quant = fmt.double_quant if fmt is not None else plan.double_quant

        # One 4-bit layer shape for every format: formats without a bitsandbytes layer of their
        # own (fp8, GPTQ, AWQ, compressed-tensors) dequantize per matmul as a 4-bit layer does.
        lin4_like = functools.partial(lin4, in_f, out_f, bias=module.bias is not None, compute_dtype=compute)
        with torch.device("meta"):
            if fmt is not None and fmt.layout not in ("bnb4", "bnb8"):
                new = lin4_like(quant_type="nf4", compress_statistics=False)
                packed, constants = fmt.storage(out_f, in_f)
                shapes: dict[str, tuple[tuple[int, ...], str]] = {
                    "weight": ((packed, 1), "uint8"),
                    "constants": ((constants,), "uint8"),
                }
            elif layer_kind in ("nf4", "fp4"):
                new = lin4_like(quant_type=layer_kind, compress_statistics=double_quant)
                blocks = math.ceil(numel / BNB_4BIT_BLOCK)
                shapes = {"weight": (((numel + 1) // 2, 1), "uint8")}
                if double_quant:
                    shapes.update(
                        absmax=((blocks,), "uint8"),
                        absmax2=((math.ceil(blocks / BNB_NESTED_BLOCK),), "float32"),
                        code2=((256,), "float32"),
                        offset=((1,), "float32"),
                    )
                else:
                    shapes.update(absmax=((blocks,), "float32"))
                shapes["code"] = ((16,), "float32")
            elif layer_kind == "int8":
                new = lin8(in_f, out_f, bias=module.bias is not None, has_fp16_weights=False)
                shapes = {"weight": ((out_f, in_f), "int8"), "SCB": ((out_f,), "float32")}
            else:  # fp8: block-scaled float8 weight, dequantized per matmul like the 4-bit path
                new = lin4_like(quant_type="nf4", compress_statistics=False)
                scales = math.ceil(out_f / 128) * math.ceil(in_f / 128)
                shapes = {"weight": ((out_f * in_f, 1), "uint8"), "scale_inv": ((scales,), "float32")}
        if module.bias is not None:
            new.bias = torch.nn.Parameter(
                torch.empty(out_f, dtype=module.bias.dtype, device="meta"), requires_grad=False
            )
        else:
            new.bias = None
        new._peftaudit_shapes = shapes
        setattr(parent, child, new)
        extras[name] = shapes
    return extras
