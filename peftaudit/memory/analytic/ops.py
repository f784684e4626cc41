"""Operations on a :class:`~peftaudit.memory.analytic.tape.Tape`, with PyTorch's saving rules.

Each function allocates what the real operation allocates and records an
autograd node that saves exactly what PyTorch's derivative formulas save
(``tools/autograd/derivatives.yaml``): ``mm`` keeps its input only if the weight
needs a gradient, ``mul`` keeps each operand only for the other's gradient,
``silu``/``gelu`` keep their input, ``softmax``/``tanh``/``rsqrt`` their result,
layer norm its input plus per-row statistics, flash attention ``q, k, v``, the
output and the log-sum-exp. Autocast follows the CUDA policy (matmuls in half
precision, norms/softmax/reductions/pow in fp32; casts of trainable leaf weights
cached for the forward pass).

Linear layers with their adapters and quantized weights are in
:mod:`peftaudit.memory.analytic.linear`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from peftaudit.memory.analytic.tape import COPIES, ZERO, Lin, Tape, Tensor, per_token, per_token_seq, scale

FP32 = "fp32"


@dataclass
class Context:
    """Numerics shared by every operation of one simulated step."""

    compute: str
    """Matmul dtype (``bf16``, ``fp16`` or ``fp32``)."""
    autocast: bool
    adapter_dtype: str
    dropout: float
    """LoRA dropout probability."""
    training: bool = True
    lora_scaling_is_one: bool = False
    dora_eye_held: bool = False
    """peft before 0.19: DoRA's forward keeps its identity matrix (and the autocast copy that
    ``lora_A`` saves) until it returns (stack rule ``dora-eye-held``)."""
    dora_recomputes_base: bool = False
    """peft before 0.14: DoRA's forward recomputes the base output from the weight in the input's
    dtype (stack rule ``dora-base-recomputed``)."""
    padding_mask: bool = False
    """SDPA runs with a padding mask (TRL's padded batches): transformers builds a boolean
    ``[rows, 1, S, S]`` mask once per forward and repeats keys and values to every head; each SDPA
    call converts it to an additive mask that CUDA's memory-efficient kernel keeps for backward
    (:func:`flash_attention`, :func:`padding_mask`)."""
    weight_cache: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)
    """Autocast's cache of half-precision copies of trainable leaf weights (weight, copy)."""

    def end_forward(self, tape: Tape) -> None:
        """Autocast clears its cache when the outermost autocast region exits."""
        for _w, t in self.weight_cache.values():
            tape.drop(t)
        self.weight_cache.clear()


# --- primitives ----------------------------------------------------------------------------------


def cast(tp: Tape, x: Tensor, dtype: str, cat: int | None = None) -> Tensor:
    """``x.to(dtype)``: a new tensor unless the dtype already matches (ToCopyBackward saves nothing)."""
    if x.dtype == dtype:
        return tp.view(x)
    out = tp.new(x.numel, dtype, cat=cat)
    tp.record([out], [x])
    return out


def weight_for_matmul(tp: Tape, ctx: Context, w: Tensor) -> Tensor:
    """The weight operand of a matmul: under autocast a half copy (cached when trainable)."""
    if not ctx.autocast or w.dtype == ctx.compute:
        return tp.view(w) if w.storage is not None else w
    if w.is_param and w.rg:
        # The entry keeps the weight object alive so its id cannot be reused by another weight.
        entry = ctx.weight_cache.get(id(w))
        if entry is None:
            entry = (w, cast(tp, w, ctx.compute, cat=COPIES))
            ctx.weight_cache[id(w)] = entry
        return tp.view(entry[1])
    return cast(tp, w, ctx.compute, cat=COPIES)


def act_for_matmul(tp: Tape, ctx: Context, x: Tensor) -> Tensor:
    """The activation operand of a matmul: cast to the compute dtype under autocast."""
    if ctx.autocast and x.dtype != ctx.compute:
        return cast(tp, x, ctx.compute)
    return tp.view(x)


def to_fp32_policy(tp: Tape, ctx: Context, x: Tensor) -> Tensor:
    """Autocast's fp32 list (norms, softmax, pow, sum...): inputs cast up to fp32."""
    if ctx.autocast and x.dtype != FP32:
        return cast(tp, x, FP32)
    return tp.view(x)


def matmul(tp: Tape, ctx: Context, x: Tensor, w: Tensor, out_numel: Lin, bias: Tensor | None = None) -> Tensor:
    """``x @ w`` (``F.linear``, ``addmm``, ``bmm``): saves x for w's gradient and w for x's."""
    xc = act_for_matmul(tp, ctx, x)
    wc = weight_for_matmul(tp, ctx, w)
    out = tp.new(out_numel, xc.dtype)
    inputs = [xc, wc] + ([bias] if bias is not None else [])
    tp.record([out], inputs, saved=[xc if wc.rg else None, wc if xc.rg else None])
    tp.drop(xc, wc)
    return out


def mul(tp: Tape, a: Tensor, b: Tensor, out_numel: Lin | None = None, dtype: str | None = None) -> Tensor:
    """Elementwise ``a * b`` (broadcasting): each operand saved for the other's gradient."""
    out = tp.new(out_numel if out_numel is not None else a.numel, dtype or promote(a.dtype, b.dtype))
    # A broadcast operand's gradient is computed at the output's size, then summed down.
    broadcast = any(t.rg and t.numel[0] < out.numel[0] for t in (a, b))
    temp = out.nbytes if broadcast else ZERO
    tp.record([out], [a, b], saved=[b if a.rg else None, a if b.rg else None], temp=temp)
    return out


def scalar(tp: Tape, a: Tensor) -> Tensor:
    """``a * c`` or ``a + c`` with a Python number: a new tensor, nothing saved."""
    out = tp.new(a.numel, a.dtype)
    tp.record([out], [a])
    return out


def addt(tp: Tape, a: Tensor, b: Tensor, dtype: str | None = None) -> Tensor:
    """``a + b``: nothing saved; the output gradient flows to both inputs as is."""
    numel = a.numel if a.numel[0] >= b.numel[0] else b.numel
    out = tp.new(numel, dtype or promote(a.dtype, b.dtype))
    tp.record([out], [a, b], alias=True)
    return out


def unary_saving_input(tp: Tape, x: Tensor, dtype: str | None = None) -> Tensor:
    """``silu``, ``gelu``, ``pow``: the input is saved."""
    out = tp.new(x.numel, dtype or x.dtype)
    tp.record([out], [x], saved=[x])
    return out


def unary_saving_result(tp: Tape, x: Tensor, dtype: str | None = None) -> Tensor:
    """``tanh``, ``sigmoid``, ``rsqrt``, ``softmax``: the result is saved."""
    out = tp.new(x.numel, dtype or x.dtype)
    tp.record([out], [x], saved=[out])
    return out


def contiguous(tp: Tape, x: Tensor) -> Tensor:
    """``.contiguous()`` of a transposed tensor: a copy; its gradient passes through."""
    out = tp.new(x.numel, x.dtype)
    tp.record([out], [x], alias=True)
    return out


def dropout(tp: Tape, ctx: Context, x: Tensor, p: float) -> Tensor:
    """CUDA's fused dropout: a new output and a bool mask, the mask saved for backward."""
    if p <= 0 or not ctx.training:
        return tp.view(x)
    out = tp.new(x.numel, x.dtype)
    mask = tp.new(x.numel, "bool")
    tp.record([out], [x], saved=[mask])
    tp.drop(mask)
    return out


def promote(a: str, b: str) -> str:
    if FP32 in (a, b):
        return FP32
    return a if a == b else FP32


# --- normalisation ----------------------------------------------------------------------------------


def rms_norm(tp: Tape, ctx: Context, x: Tensor, weight: Tensor, *, gemma: bool = False) -> Tensor:
    """transformers' ``LlamaRMSNorm`` (``gemma=True``: ``GemmaRMSNorm``'s ``(1 + w)`` in fp32).

    ``x.to(fp32)``; ``pow(2)`` and ``x * rsqrt(...)`` save the fp32 input; the
    result is cast back and multiplied by the weight (which keeps the cast
    result only when the weight trains).
    """
    tokens = scale(x.numel, 1.0 / max(1.0, float(weight.numel[2])))
    x32 = cast(tp, x, FP32)
    sq = unary_saving_input(tp, x32)
    var = tp.new(tokens, FP32)
    tp.record([var], [sq])
    tp.drop(sq)
    var_eps = scalar(tp, var)
    tp.drop(var)
    r = unary_saving_result(tp, var_eps)
    tp.drop(var_eps)
    normed = mul(tp, x32, r, out_numel=x32.numel)
    tp.drop(x32, r)
    if gemma:
        w32 = cast(tp, weight, FP32)
        w1 = tp.new(w32.numel, FP32)
        tp.record([w1], [w32])
        out = mul(tp, normed, w1)
        tp.drop(normed, w32, w1)
        y = cast(tp, out, x.dtype)
        tp.drop(out)
        return y
    back = cast(tp, normed, x.dtype)
    tp.drop(normed)
    out = mul(tp, weight, back, out_numel=back.numel)
    tp.drop(back)
    return out


def layer_norm(tp: Tape, ctx: Context, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``F.layer_norm``: saves the input and per-row mean and rstd (fp32); fp32 under autocast."""
    xin = to_fp32_policy(tp, ctx, x)
    w = weight if not ctx.autocast else weight_fp32(tp, weight)
    b = bias if not ctx.autocast else weight_fp32(tp, bias)
    out = tp.new(xin.numel, xin.dtype)
    rows = scale(xin.numel, 1.0 / max(1.0, float(weight.numel[2])))
    mean = tp.new(rows, FP32)
    rstd = tp.new(rows, FP32)
    tp.record([out], [xin, w, b], saved=[xin, mean, rstd, w])
    tp.drop(xin, mean, rstd)
    if w is not weight:
        tp.drop(w)
    if b is not bias:
        tp.drop(b)
    return out


def weight_fp32(tp: Tape, w: Tensor) -> Tensor:
    if w.dtype == FP32:
        return w
    return cast(tp, w, FP32, cat=COPIES)


# --- attention --------------------------------------------------------------------------------------


def rope(tp: Tape, x: Tensor) -> Tensor:
    """``x * cos + rotate_half(x) * sin``: cos and sin (not trained) are what is saved."""
    a = tp.new(x.numel, x.dtype)  # x * cos
    tp.record([a], [x])
    half = tp.new(scale(x.numel, 0.5), x.dtype)  # -x2
    tp.record([half], [x])
    rot = tp.new(x.numel, x.dtype)  # cat((-x2, x1))
    tp.record([rot], [half, x])
    tp.drop(half)
    b = tp.new(x.numel, x.dtype)  # rot * sin
    tp.record([b], [rot])
    tp.drop(rot)
    out = addt(tp, a, b)
    tp.drop(a, b)
    return out


def flash_attention(tp: Tape, ctx: Context, q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    """SDPA on its flash / memory-efficient kernels: saves q, k, v, out and an fp32 log-sum-exp.

    With a padding mask (``ctx.padding_mask``) flash cannot run and CUDA takes the memory-efficient
    kernel: ``scaled_dot_product_attention`` first converts the boolean mask to an additive one in
    the query's dtype (``convert_boolean_attn_mask``, a new ``[rows, 1, S, S]`` tensor per call) and
    ``_scaled_dot_product_efficient_attention`` saves it (``attn_bias``) with q, k, v, the output and
    the log-sum-exp.
    """
    qc, kc, vc = (act_for_matmul(tp, ctx, t) for t in (q, k, v))
    bias = additive_mask(tp, qc.dtype) if ctx.padding_mask else None
    out = tp.new(q.numel, qc.dtype)
    lse = tp.new(per_token(heads), FP32)
    tp.record([out], [qc, kc, vc], saved=[qc, kc, vc, out, lse, bias])
    tp.drop(qc, kc, vc, lse, bias)
    return out


def padding_mask(tp: Tape) -> Tensor:
    """transformers' ``create_causal_mask`` for a padded batch under SDPA: one boolean ``[rows, 1, S, S]``."""
    return tp.new(per_token_seq(1), "bool")


def additive_mask(tp: Tape, dtype: str) -> Tensor:
    """torch's ``convert_boolean_attn_mask``: ``where(mask, 0, -inf)`` in the query's dtype, ``[rows, 1, S, S]``.

    (The memory-efficient path pads its last dimension to a multiple of 8 when S is not one; the tape's
    sizes are linear in S x S, so that padding is left out.)
    """
    return tp.new(per_token_seq(1), dtype)


def eager_attention(
    tp: Tape,
    ctx: Context,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    heads: int,
    *,
    softmax_fp32: bool,
    mask: bool,
    dropout_p: float,
    copies: tuple[bool, bool, bool] = (True, True, True),
    cast_before_dropout: bool = True,
    returned: list[Tensor] | None = None,
) -> Tensor:
    """transformers' ``eager_attention_forward``: the (heads x seq x seq) matrices are kept.

    ``copies`` says which of q, k, v are head-transposed views that ``matmul`` must
    make contiguous first (the copies are what its backward keeps). Llama-style
    code casts the probabilities to the value dtype before dropout
    (``cast_before_dropout``); BERT drops out the fp32 probabilities and lets the
    matmul cast them. The probabilities are also returned (``attn_weights``) and
    the layer holds them until it returns: they go to ``returned``.
    """
    scores_numel: Lin = (0.0, float(heads), 0.0)
    qc = _contiguous_operand(tp, act_for_matmul(tp, ctx, q), copies[0])
    kc = _contiguous_operand(tp, act_for_matmul(tp, ctx, k), copies[1])
    scores = tp.new(scores_numel, qc.dtype)
    tp.record([scores], [qc, kc], saved=[kc if qc.rg else None, qc if kc.rg else None])
    tp.drop(qc, kc)
    scaled = scalar(tp, scores)
    tp.drop(scores)
    if mask:
        masked = tp.new(scores_numel, scaled.dtype)
        tp.record([masked], [scaled], alias=True)
        tp.drop(scaled)
        scaled = masked
    sm_in = to_fp32_policy(tp, ctx, scaled)
    dtype = FP32 if softmax_fp32 else sm_in.dtype
    probs = unary_saving_result(tp, sm_in, dtype=dtype)
    tp.drop(scaled, sm_in)
    p = cast(tp, probs, v.dtype if not ctx.autocast else ctx.compute) if cast_before_dropout else tp.view(probs)
    tp.drop(probs)
    if dropout_p > 0 and ctx.training:
        pd = dropout(tp, ctx, p, dropout_p)
        tp.drop(p)
        p = pd
    vc = _contiguous_operand(tp, act_for_matmul(tp, ctx, v), copies[2])
    out = matmul_act(tp, ctx, p, vc, q.numel)
    tp.drop(vc)
    if returned is not None:
        returned.append(p)
    else:
        tp.drop(p)
    return out


def _contiguous_operand(tp: Tape, x: Tensor, copy: bool) -> Tensor:
    """``matmul`` on a non-mergeable strided view copies it first (the copy is what is saved)."""
    if not copy:
        return x
    out = contiguous(tp, x)
    tp.drop(x)
    return out


def matmul_act(tp: Tape, ctx: Context, a: Tensor, b: Tensor, out_numel: Lin) -> Tensor:
    """A matmul of two activations (``probs @ v``): each saved for the other's gradient."""
    ac = act_for_matmul(tp, ctx, a)
    bc = act_for_matmul(tp, ctx, b)
    out = tp.new(out_numel, ac.dtype)
    tp.record([out], [ac, bc], saved=[bc if ac.rg else None, ac if bc.rg else None])
    tp.drop(ac, bc)
    return out


def nbytes_of(dtype: str) -> int:
    from peftaudit.memory.dtypes import nbytes

    return nbytes(dtype)


def embedding(tp: Tape, ctx: Context, numel_out: Lin, dtype: str, weight: Tensor) -> Tensor:
    """``nn.Embedding``: keeps the indices (int64) when the table trains."""
    out = tp.new(numel_out, dtype)
    idx = tp.new(scale(numel_out, 0.0) if not weight.rg else per_token(1.0), "int64") if weight.rg else None
    tp.record([out], [weight], saved=[idx])
    if idx is not None:
        tp.drop(idx)
    return out


__all__ = ["Context"]
