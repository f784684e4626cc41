"""Linear layers as peft and bitsandbytes run them, on a :class:`~peftaudit.memory.analytic.tape.Tape`.

:func:`linear` reproduces what peft and bitsandbytes do around a matmul: peft
casts the input to the adapter dtype (fp32 by default) and keeps that copy for
``lora_A``'s gradient; dropout keeps its output and a bool mask; bitsandbytes
4-bit dequantizes the weight for one matmul and keeps nothing of the input;
LLM.int8() keeps the input itself; DoRA rebuilds the weight norm every forward.
"""

from __future__ import annotations

from dataclasses import dataclass

from peftaudit.memory.analytic.ops import (
    Context,
    addt,
    cast,
    dropout,
    matmul,
    mul,
    nbytes_of,
    promote,
    scalar,
)
from peftaudit.memory.analytic.tape import COPIES, TEMP, Lin, Tape, Tensor, add, const, scale
from peftaudit.memory.targets import ModuleAdapter

#: Adapter kinds :func:`linear` turns into ops; any other raises :class:`NoLayerProgram`.
PROGRAMMED_KINDS = frozenset({"lora", "dora", "lora_embedding", "ia3"})


@dataclass(frozen=True)
class LinearSpec:
    """A linear layer as the step sees it: weight storage, trainability, adapter."""

    in_features: int
    out_features: int
    bias: bool
    weight: str
    """``dense``, ``nf4``, ``fp4``, ``int8``, ``fp8`` or ``int`` (GPTQ/AWQ/compressed-tensors);
    all but ``int8`` are dequantized per matmul."""
    dtype: str
    """Dense weights' dtype (for quantized weights: the bias' dtype)."""
    trainable: bool
    bias_trainable: bool = False
    adapter: ModuleAdapter | None = None


def linear(tp: Tape, ctx: Context, x: Tensor, spec: LinearSpec) -> Tensor:
    """One ``nn.Linear`` as peft and bitsandbytes run it; returns the output tensor."""
    tokens = scale(x.numel, 1.0 / spec.in_features)
    out_numel = scale(tokens, spec.out_features)
    adapter = spec.adapter
    if adapter is not None and adapter.kind not in PROGRAMMED_KINDS:
        # peft's other module adapters (LoHa, LoKr, VeRA, OFT, BOFT, AdaLoRA) are not written as tape
        # ops: the estimate derives the step from a trace of the model instead.
        from peftaudit.memory.analytic.layout import NoLayerProgram  # layout imports this module

        raise NoLayerProgram(f"the layer programs do not model {adapter.kind} adapters (the step is traced)")
    ia3 = adapter is not None and adapter.kind == "ia3"
    x_in = x
    ia3_scale: Tensor | None = None
    if ia3 and adapter is not None and adapter.feedforward:
        # peft IA3 on a feed-forward layer: (x.to(fp32) * ia3_l).to(dtype) goes into the base layer.
        ia3_scale = tp.param(adapter.in_features, ctx.adapter_dtype, True)
        xa = cast(tp, x, ctx.adapter_dtype)
        scaled = mul(tp, xa, ia3_scale, out_numel=xa.numel)
        tp.drop(xa)
        x_in = cast(tp, scaled, x.dtype)
        tp.drop(scaled)
    result = _base_linear(tp, ctx, x_in, spec, out_numel)
    if x_in is not x:
        tp.drop(x_in)
    if adapter is None or adapter.kind == "lora_embedding":
        return result
    if ia3:
        if adapter.feedforward:
            return result
        ia3_scale = tp.param(adapter.out_features, ctx.adapter_dtype, True)
        scaled = mul(tp, result, ia3_scale, out_numel=result.numel)
        tp.drop(result)
        out = cast(tp, scaled, result.dtype)
        tp.drop(scaled)
        return out
    return _lora_branch(tp, ctx, x, result, spec, adapter, tokens, out_numel)


def _base_linear(tp: Tape, ctx: Context, x: Tensor, spec: LinearSpec, out_numel: Lin) -> Tensor:
    numel = spec.in_features * spec.out_features
    bias = tp.param(spec.out_features, spec.dtype, spec.bias_trainable) if spec.bias else None
    if spec.weight == "dense":
        w = tp.param(numel, spec.dtype, spec.trainable)
        return matmul(tp, ctx, x, w, out_numel, bias)
    dequant = const(numel * 2.0)  # the weight dequantized to bf16/fp16 for one matmul
    if spec.weight != "int8":
        # bitsandbytes Linear4bit: x.to(compute_dtype); MatMul4Bit saves only the packed weight;
        # backward dequantizes again for the input gradient; the output goes back to x's dtype.
        # Weight-only fp8 and packed-integer (GPTQ, AWQ) layers dequantize the same way.
        xc = cast(tp, x, ctx.compute)
        tp.temporary(dequant, COPIES)
        out = tp.new(out_numel, ctx.compute)
        tp.record([out], [xc] + ([bias] if bias is not None else []), temp=dequant)
        tp.drop(xc)
        back = cast(tp, out, x.dtype)
        tp.drop(out)
        return back
    # LLM.int8(): A.to(fp16) and its int8 copy are scratch; A itself is kept for backward.
    tp.temporary(add(scale(x.numel, 2.0 if x.dtype != "fp16" else 0.0), scale(x.numel, 1.0)), TEMP)
    tp.temporary(scale(out_numel, 4.0), TEMP)  # int32 accumulator of int8_scaled_mm
    out = tp.new(out_numel, x.dtype)
    tp.record([out], [x] + ([bias] if bias is not None else []), held=[x], temp=dequant)
    return out


def _lora_branch(
    tp: Tape,
    ctx: Context,
    x: Tensor,
    result: Tensor,
    spec: LinearSpec,
    adapter: ModuleAdapter,
    tokens: Lin,
    out_numel: Lin,
) -> Tensor:
    result_dtype = result.dtype
    a_w = tp.param(adapter.rank * adapter.in_features, ctx.adapter_dtype, True)
    b_w = tp.param(adapter.rank * adapter.out_features, ctx.adapter_dtype, True)
    r_numel = scale(tokens, adapter.rank)
    if spec.weight != "dense" and adapter.kind == "lora":
        return _lora_bnb(tp, ctx, x, result, a_w, b_w, r_numel, out_numel)
    xa = cast(tp, x, ctx.adapter_dtype)  # peft's _cast_input_dtype
    if adapter.kind == "dora":
        return _dora(tp, ctx, xa, result, spec, adapter, a_w, b_w, r_numel, out_numel, result_dtype)
    scaled = _scaled_delta(tp, ctx, xa, a_w, b_w, r_numel, out_numel)
    summed = addt(tp, result, scaled)
    tp.drop(result, scaled)
    out = cast(tp, summed, result_dtype)
    tp.drop(summed)
    tp.drop(xa)  # peft's forward keeps the cast input in a local until it returns
    return out


def _scaled_delta(tp: Tape, ctx: Context, xa: Tensor, a_w: Tensor, b_w: Tensor, r_numel: Lin, out_numel: Lin) -> Tensor:
    """peft's ``lora_B(lora_A(dropout(x))) * scaling``, each intermediate freed once the next exists."""
    xd = dropout(tp, ctx, xa, ctx.dropout)
    a_out = matmul(tp, ctx, xd, a_w, r_numel)
    tp.drop(xd)
    b_out = matmul(tp, ctx, a_out, b_w, out_numel)
    tp.drop(a_out)
    scaled = scalar(tp, b_out)
    tp.drop(b_out)
    return scaled


def _lora_bnb(
    tp: Tape, ctx: Context, x: Tensor, result: Tensor, a_w: Tensor, b_w: Tensor, r_numel: Lin, out_numel: Lin
) -> Tensor:
    """peft's LoRA on bitsandbytes layers: the result is cloned; the input is cast only without autocast."""
    cloned = tp.new(result.numel, result.dtype)
    tp.record([cloned], [result], alias=True)
    tp.drop(result)
    expected = cloned.dtype
    xa = tp.view(x) if ctx.autocast else cast(tp, x, ctx.adapter_dtype)
    scaled = _scaled_delta(tp, ctx, xa, a_w, b_w, r_numel, out_numel)
    if not ctx.autocast:
        back = cast(tp, scaled, expected)
        tp.drop(scaled)
        scaled = back
    out = addt(tp, cloned, scaled, dtype=promote(cloned.dtype, scaled.dtype))
    tp.drop(cloned, scaled, xa)
    return out


def _dora(
    tp: Tape,
    ctx: Context,
    xa: Tensor,
    result: Tensor,
    spec: LinearSpec,
    adapter: ModuleAdapter,
    a_w: Tensor,
    b_w: Tensor,
    r_numel: Lin,
    out_numel: Lin,
    result_dtype: str,
) -> Tensor:
    """peft's DoRA: the weight norm of W + scaling * B @ A is rebuilt every forward (as scratch)."""
    i, o, r = adapter.in_features, adapter.out_features, adapter.rank
    ad = nbytes_of(ctx.adapter_dtype)
    w_cast = 0 if spec.dtype == ctx.adapter_dtype and spec.weight == "dense" else i * o * ad
    held: Tensor | None = None
    w_x: Tensor | None = None
    cd = nbytes_of(ctx.compute) if ctx.autocast else ad
    # lora_weight = lora_B(lora_A(eye(in))).T: the eye in x's dtype, lora_A's autocast copy of it (saved
    # for lora_A's gradient while lora_weight lives), lora_A's output and lora_weight in the compute dtype.
    eye_copy = i * i * cd if ctx.autocast and cd != ad else 0
    if ctx.dora_eye_held:
        # peft < 0.19 (stack rule dora-eye-held): the eye, lora_weight and W.to(x.dtype) are locals of
        # DoraLinearLayer.forward, alive until it returns. The norm adds scaling * lora_weight
        # (compute dtype) and W + that (x's dtype) on top.
        kept = i * i * ad + eye_copy + i * r * cd + i * o * cd
        if ctx.dora_recomputes_base and w_cast:
            w_x = tp.new(const(i * o), ctx.adapter_dtype, cat=COPIES)  # W.to(x.dtype), F.linear's weight below
        else:
            kept += w_cast
        held = tp.new(const(kept / ad), ctx.adapter_dtype, cat=COPIES)
        tp.temporary(const(i * o * cd + i * o * ad), COPIES)
    else:
        # get_lora_weight frees its eye when it returns; forward then casts lora_weight to x's dtype (the
        # half one goes), makes W.to(x.dtype), scaling * lora_weight and W + that, and takes the norm.
        building = i * i * ad + eye_copy + i * r * cd + i * o * cd
        lora_x = i * o * ad if cd != ad else i * o * cd
        norm = eye_copy + i * r * cd + lora_x + w_cast + 2 * i * o * ad
        tp.temporary(const(max(building, norm)), COPIES)
    magnitude = tp.param(o, ctx.adapter_dtype, True)
    mns = tp.new(const(o), ctx.adapter_dtype)
    tp.record([mns], [magnitude])
    xd = dropout(tp, ctx, xa, ctx.dropout)
    base = result
    if ctx.dora_recomputes_base:
        # peft < 0.14 (stack rule dora-base-recomputed): F.linear(x, W.to(x.dtype)) on every forward;
        # under autocast its half-precision copy of W is saved for x's gradient.
        w = w_x if w_x is not None else tp.param(i * o, spec.dtype, False)
        base = matmul(tp, ctx, xd, w, out_numel)
    elif ctx.dropout > 0 and ctx.training:
        # With dropout peft recomputes the base output on the dropped input.
        w = tp.param(i * o, spec.dtype, False)
        base = matmul(tp, ctx, xd, w, out_numel)
    a_out = matmul(tp, ctx, xd, a_w, r_numel)
    b_out = matmul(tp, ctx, a_out, b_w, out_numel)
    tp.drop(a_out, xd, xa)
    m1 = scalar(tp, mns)
    t1 = mul(tp, m1, base, out_numel=out_numel)
    tp.drop(m1)
    if base is not result:
        tp.drop(base)
    t2 = mul(tp, mns, b_out, out_numel=out_numel)
    tp.drop(b_out, mns)
    t3 = scalar(tp, t2)
    tp.drop(t2)
    dora = addt(tp, t1, t3)
    tp.drop(t1, t3)
    summed = addt(tp, result, dora)
    tp.drop(result, dora, held, w_x)
    out = cast(tp, summed, result_dtype)
    tp.drop(summed)
    return out


__all__ = ["LinearSpec", "linear"]
