"""The Llama family's layer program: ``LlamaDecoderLayer`` as transformers 5 runs it.

``LlamaDecoderLayer.forward`` written against the
:class:`~peftaudit.memory.analytic.tape.Tape` line by line, so what it keeps for
backward can be read next to the real source. It also reads Mistral, Qwen2
(q/k/v biases), Qwen3 (q/k norms), OLMo, Granite, Gemma-1 and any model with
``q_proj``..``down_proj`` names; with a sparse MoE block (Mixtral, Qwen2-MoE with
a shared expert, Qwen3-MoE) run as transformers' default ``grouped_mm`` experts.
"""

from __future__ import annotations

from peftaudit.memory.analytic import ops
from peftaudit.memory.analytic.layout import Layout
from peftaudit.memory.analytic.ops import Context
from peftaudit.memory.analytic.programs.common import FP32, embed_tokens, head_loss, linear_role, param, self_attention
from peftaudit.memory.analytic.programs.registry import LayerProgram, register_program
from peftaudit.memory.analytic.shape import ModelShape
from peftaudit.memory.analytic.tape import Lin, Tape, Tensor, per_token


def llama_layer(
    tp: Tape, ctx: Context, shape: ModelShape, layout: Layout, layer: int, x: Tensor, attention: str
) -> Tensor:
    """``LlamaDecoderLayer.forward`` (and Mistral/Qwen2/Qwen3, MoE variants)."""
    residual = tp.view(x)
    held: list[Tensor] = []  # the attention weights the layer keeps in a local until it returns
    n1 = ops.rms_norm(tp, ctx, x, param(tp, layout.weight(layer, "input_norm")), gemma=shape.gemma_norm)
    attn = _llama_attention(tp, ctx, shape, layout, layer, n1, attention, held)
    tp.drop(n1)
    x2 = ops.addt(tp, residual, attn)
    tp.drop(residual, attn)
    residual = tp.view(x2)
    n2 = ops.rms_norm(tp, ctx, x2, param(tp, layout.weight(layer, "post_norm")), gemma=shape.gemma_norm)
    tp.drop(x2)
    if shape.experts and layout.linear(layer, "mlp.gate") is None:
        mlp = _moe(tp, ctx, shape, layout, layer, n2)
    else:
        mlp = _gated_mlp(tp, ctx, layout, layer, n2, "mlp")
    tp.drop(n2)
    out = ops.addt(tp, residual, mlp)
    tp.drop(residual, mlp, *held)
    return out


def _llama_attention(
    tp: Tape, ctx: Context, shape: ModelShape, layout: Layout, layer: int, x: Tensor, attention: str, held: list[Tensor]
) -> Tensor:
    q = linear_role(tp, ctx, layout, layer, "attention.q", x)
    k = linear_role(tp, ctx, layout, layer, "attention.k", x)
    v = linear_role(tp, ctx, layout, layer, "attention.v", x)
    if shape.qk_norm:
        # Qwen3: RMSNorm over head_dim on q and k before rotary.
        qn = ops.rms_norm(tp, ctx, q, param(tp, layout.weight(layer, "q_norm")))
        kn = ops.rms_norm(tp, ctx, k, param(tp, layout.weight(layer, "k_norm")))
        tp.drop(q, k)
        q, k = qn, kn
    qr = ops.rope(tp, q)
    kr = ops.rope(tp, k)
    tp.drop(q, k)
    out = self_attention(tp, ctx, shape, qr, kr, v, attention, shape.heads, softmax_fp32=True, returned=held)
    tp.drop(qr, kr, v)
    # transpose(1, 2).contiguous() in the attention function.
    o_in = ops.contiguous(tp, out)
    tp.drop(out)
    o = linear_role(tp, ctx, layout, layer, "attention.o", o_in)
    tp.drop(o_in)
    return o


def _gated_mlp(tp: Tape, ctx: Context, layout: Layout, layer: int, x: Tensor, prefix: str) -> Tensor:
    """``down_proj(act_fn(gate_proj(x)) * up_proj(x))``."""
    g = linear_role(tp, ctx, layout, layer, f"{prefix}.gate", x)
    u = linear_role(tp, ctx, layout, layer, f"{prefix}.up", x)
    a = ops.unary_saving_input(tp, g)
    tp.drop(g)
    m = ops.mul(tp, a, u)
    tp.drop(a, u)
    d = linear_role(tp, ctx, layout, layer, f"{prefix}.down", m)
    tp.drop(m)
    return d


def _moe(tp: Tape, ctx: Context, shape: ModelShape, layout: Layout, layer: int, x: Tensor) -> Tensor:
    """Sparse MoE block with transformers' ``grouped_mm`` experts (its default on GPUs)."""
    k = shape.top_k
    h, f = shape.hidden, shape.expert_ffn
    shared: Tensor | None = None
    if shape.shared_ffn:
        shared = _gated_mlp(tp, ctx, layout, layer, x, "shared_expert")
    # Router: logits, fp32 softmax, top-k.
    logits = linear_role(tp, ctx, layout, layer, "router", x)
    probs_in = ops.cast(tp, logits, FP32)
    tp.drop(logits)
    probs = ops.unary_saving_result(tp, probs_in)
    tp.drop(probs_in)
    top = tp.new(per_token(k), FP32)
    idx = tp.new(per_token(k), "int64")
    tp.record([top], [probs], saved=[idx])
    tp.drop(probs)
    weights = ops.scalar(tp, top)  # renormalised top-k weights
    tp.drop(top)
    if not shape.router_fp32_weights:
        w2 = ops.cast(tp, weights, x.dtype)
        tp.drop(weights)
        weights = w2
    # Experts (grouped_mm_experts_forward): sort by expert, gather, two grouped matmuls.
    order = tp.new(per_token(2 * k), "int64")  # sorted expert ids and the permutation
    gathered = tp.new(per_token(k * h), x.dtype)
    tp.record([gathered], [x], saved=[order])
    sw = tp.new(per_token(k), weights.dtype)
    tp.record([sw], [weights], saved=[order])
    tp.drop(weights)
    tp.temporary(per_token(4 * k))  # histc input (expert ids as fp32 on CPU, int on GPU)
    gate_up = _expert_weight(tp, ctx, layout, layer, "gate_up_proj")
    proj = _grouped_matmul(tp, ctx, gathered, gate_up, per_token(k * 2 * f))
    tp.drop(gathered, gate_up)
    gate = tp.view(proj, per_token(k * f))
    up = tp.view(proj, per_token(k * f))
    tp.drop(proj)
    act = ops.unary_saving_input(tp, gate)
    tp.drop(gate)
    m = ops.mul(tp, act, up)
    tp.drop(act, up)
    down_w = _expert_weight(tp, ctx, layout, layer, "down_proj")
    down = _grouped_matmul(tp, ctx, m, down_w, per_token(k * h))
    tp.drop(m, down_w)
    weighted = ops.mul(tp, down, sw, out_numel=down.numel)
    tp.drop(down, sw)
    inv = tp.new(per_token(k), "int64")
    unperm = tp.new(weighted.numel, weighted.dtype)
    tp.record([unperm], [weighted], saved=[inv])
    tp.drop(weighted, inv, order, idx)
    summed_in = ops.to_fp32_policy(tp, ctx, unperm)
    summed = tp.new(per_token(h), summed_in.dtype)
    tp.record([summed], [summed_in])
    tp.drop(unperm, summed_in)
    out = ops.cast(tp, summed, x.dtype)
    tp.drop(summed)
    if shared is not None:
        g = linear_role(tp, ctx, layout, layer, "shared_expert_gate", x)
        sg = ops.unary_saving_result(tp, g)
        tp.drop(g)
        s = ops.mul(tp, sg, shared, out_numel=shared.numel)
        tp.drop(sg, shared)
        total = ops.addt(tp, out, s)
        tp.drop(out, s)
        out = total
    return out


def _grouped_matmul(tp: Tape, ctx: Context, x: Tensor, w: Tensor, out_numel: Lin) -> Tensor:
    """transformers' ``_grouped_mm``: torch's grouped matmul for bf16 weights, else its fallback op.

    The fallback (``transformers::grouped_mm_fallback``) casts the input to the
    weight's dtype, saves input and weight whatever needs a gradient, and its
    backward allocates a zero gradient for the weight even when it is frozen.
    """
    if w.dtype == "bf16":
        xc = ops.cast(tp, x, w.dtype)
        out = ops.matmul(tp, ctx, xc, w, out_numel)
        tp.drop(xc)
        return out
    xc = ops.cast(tp, x, w.dtype)
    out = tp.new(out_numel, w.dtype)
    weight_grad = (0.0, 0.0, w.nbytes[2]) if not w.rg else (0.0, 0.0, 0.0)
    tp.record([out], [xc, w], saved=[xc, w], temp=weight_grad)
    tp.drop(xc)
    return out


def _expert_weight(tp: Tape, ctx: Context, layout: Layout, layer: int, name: str) -> Tensor:
    """A fused expert weight; with peft's ``target_parameters`` a merged copy per forward."""
    weight, rank = layout.expert_weight(layer, name)
    base = param(tp, weight)
    if rank is None:
        return base
    # peft's _LoraFactorsProxy: baddbmm(W, B, A) builds W + s * B @ A at full size every forward.
    merged = tp.new((0.0, 0.0, float(weight.numel)), weight.dtype)
    lhs = tp.param(1, ctx.adapter_dtype, True)
    tp.record([merged], [lhs])
    return merged


def embed(tp: Tape, ctx: Context, shape: ModelShape, layout: Layout, input_grad: bool, virtual: int = 0) -> Tensor:
    """The input embedding (scaled by sqrt(hidden) in Gemma), with prompt tokens."""
    out, _table = embed_tokens(tp, ctx, shape, layout, input_grad, virtual)
    return out


def head(tp: Tape, ctx: Context, shape: ModelShape, layout: Layout, x: Tensor, loss: str) -> Tensor:
    """The final RMSNorm, the output head and transformers' ``ForCausalLMLoss``."""
    n = ops.rms_norm(tp, ctx, x, param(tp, layout.weight(None, "final_norm")), gemma=shape.gemma_norm)
    return head_loss(tp, ctx, shape, layout, n, loss, fp32_policy=False)


LLAMA = LayerProgram("llama", llama_layer, embed, head)

register_program(
    LLAMA,
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "gemma",
    "smollm3",
    "olmo",
    "olmo2",
    "granite",
    "starcoder2",
)
