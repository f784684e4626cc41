"""Layer programs: the operations one transformers layer runs, per architecture family.

Each program is the ``forward`` of a transformers 5 module written against the
:class:`~peftaudit.memory.graph.Tape` (see :mod:`peftaudit.memory.ops`), line
by line, so what it keeps for backward can be read next to the real source:

* ``llama``: ``LlamaDecoderLayer`` (also Mistral, Qwen2 with q/k/v biases,
  Qwen3 with q/k norms, and any model with ``q_proj``..``down_proj`` names);
  with a sparse MoE block (Mixtral, Qwen2-MoE with a shared expert, Qwen3-MoE)
  run as transformers' default ``grouped_mm`` experts.
* ``gpt2``: ``GPT2Block`` (LayerNorm, fused ``c_attn``, ``gelu_new`` written in
  Python, residual and attention dropout).
* ``bert``: ``BertLayer`` (post-norm, GELU, dropout) and the MLM head.

A program asks a :class:`Layout` for each linear layer's :class:`LinearSpec`
and each norm/embedding weight, so methods (LoRA, QLoRA, full, ...) change
what a layer keeps without changing the program.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from peftaudit.memory import ops
from peftaudit.memory.graph import LOGITS, Lin, Tape, Tensor, per_token, scale
from peftaudit.memory.ops import Context, LinearSpec

FP32 = "fp32"


@dataclass(frozen=True)
class Shape:
    """Architecture numbers a program needs."""

    family: str
    """``llama``, ``gpt2`` or ``bert``."""
    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    experts: int = 0
    top_k: int = 0
    expert_ffn: int = 0
    shared_ffn: int = 0
    qk_norm: bool = False
    gemma_norm: bool = False
    router_fp32_weights: bool = True
    """Mixtral keeps routing weights in fp32; Qwen MoE casts them back to the activation dtype."""
    dropout: float = 0.0
    """Residual/embedding dropout (GPT-2 ``resid_pdrop``, BERT ``hidden_dropout_prob``)."""
    attn_dropout: float = 0.0
    causal: bool = True


@dataclass(frozen=True)
class Weight:
    """A non-linear-layer weight (norm, embedding table): element count, dtype, trains or not."""

    numel: int
    dtype: str
    trainable: bool


class Layout:
    """Answers a program's questions about one model under one method (see ``estimate``)."""

    def linear(self, layer: int | None, role: str) -> LinearSpec | None:  # pragma: no cover - interface
        raise NotImplementedError

    def weight(self, layer: int | None, role: str) -> Weight:  # pragma: no cover - interface
        raise NotImplementedError

    def expert_weight(self, layer: int, name: str) -> tuple[Weight, int | None]:  # pragma: no cover
        """A fused expert parameter (``gate_up_proj``/``down_proj``) and its LoRA rank, if adapted."""
        raise NotImplementedError

    def activation_dtype(self) -> str:  # pragma: no cover - interface
        raise NotImplementedError


def _p(tp: Tape, w: Weight) -> Tensor:
    return tp.param(w.numel, w.dtype, w.trainable)


def _lin(tp: Tape, ctx: Context, layout: Layout, layer: int | None, role: str, x: Tensor) -> Tensor:
    spec = layout.linear(layer, role)
    if spec is None:
        raise KeyError(role)
    return ops.linear(tp, ctx, x, spec)


# --- llama family ----------------------------------------------------------------------------------


def llama_layer(tp: Tape, ctx: Context, shape: Shape, layout: Layout, layer: int, x: Tensor, attention: str) -> Tensor:
    """``LlamaDecoderLayer.forward`` (and Mistral/Qwen2/Qwen3, MoE variants)."""
    residual = tp.view(x)
    held: list[Tensor] = []  # the attention weights the layer keeps in a local until it returns
    n1 = ops.rms_norm(tp, ctx, x, _p(tp, layout.weight(layer, "input_norm")), gemma=shape.gemma_norm)
    attn = _llama_attention(tp, ctx, shape, layout, layer, n1, attention, held)
    tp.drop(n1)
    x2 = ops.addt(tp, residual, attn)
    tp.drop(residual, attn)
    residual = tp.view(x2)
    n2 = ops.rms_norm(tp, ctx, x2, _p(tp, layout.weight(layer, "post_norm")), gemma=shape.gemma_norm)
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
    tp: Tape, ctx: Context, shape: Shape, layout: Layout, layer: int, x: Tensor, attention: str, held: list[Tensor]
) -> Tensor:
    q = _lin(tp, ctx, layout, layer, "attention.q", x)
    k = _lin(tp, ctx, layout, layer, "attention.k", x)
    v = _lin(tp, ctx, layout, layer, "attention.v", x)
    if shape.qk_norm:
        # Qwen3: RMSNorm over head_dim on q and k before rotary.
        qn = ops.rms_norm(tp, ctx, q, _p(tp, layout.weight(layer, "q_norm")))
        kn = ops.rms_norm(tp, ctx, k, _p(tp, layout.weight(layer, "k_norm")))
        tp.drop(q, k)
        q, k = qn, kn
    qr = ops.rope(tp, q)
    kr = ops.rope(tp, k)
    tp.drop(q, k)
    out = _attention(tp, ctx, shape, qr, kr, v, attention, shape.heads, softmax_fp32=True, returned=held)
    tp.drop(qr, kr, v)
    # transpose(1, 2).contiguous() in the attention function.
    o_in = ops.contiguous(tp, out)
    tp.drop(out)
    o = _lin(tp, ctx, layout, layer, "attention.o", o_in)
    tp.drop(o_in)
    return o


def _attention(
    tp: Tape,
    ctx: Context,
    shape: Shape,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attention: str,
    heads: int,
    *,
    softmax_fp32: bool,
    returned: list[Tensor] | None = None,
) -> Tensor:
    if attention == "eager":
        kr, vr = k, v
        repeat = shape.kv_heads and shape.kv_heads != heads
        if repeat:
            # repeat_kv: expand + reshape makes a copy at full head count.
            factor = heads / shape.kv_heads
            kr = tp.new(scale(k.numel, factor), k.dtype)
            tp.record([kr], [k])
            vr = tp.new(scale(v.numel, factor), v.dtype)
            tp.record([vr], [v])
        out = ops.eager_attention(
            tp,
            ctx,
            q,
            kr,
            vr,
            heads,
            softmax_fp32=softmax_fp32,
            mask=shape.causal,
            dropout_p=shape.attn_dropout,
            # q (and k, v unless repeat_kv copied them) are head-transposed views.
            copies=(True, not repeat, not repeat),
            cast_before_dropout=shape.family != "bert",
            returned=returned,
        )
        if repeat:
            tp.drop(kr, vr)
        return out
    return ops.flash_attention(tp, ctx, q, k, v, heads)


def _gated_mlp(tp: Tape, ctx: Context, layout: Layout, layer: int, x: Tensor, prefix: str) -> Tensor:
    """``down_proj(act_fn(gate_proj(x)) * up_proj(x))``."""
    g = _lin(tp, ctx, layout, layer, f"{prefix}.gate", x)
    u = _lin(tp, ctx, layout, layer, f"{prefix}.up", x)
    a = ops.unary_saving_input(tp, g)
    tp.drop(g)
    m = ops.mul(tp, a, u)
    tp.drop(a, u)
    d = _lin(tp, ctx, layout, layer, f"{prefix}.down", m)
    tp.drop(m)
    return d


def _moe(tp: Tape, ctx: Context, shape: Shape, layout: Layout, layer: int, x: Tensor) -> Tensor:
    """Sparse MoE block with transformers' ``grouped_mm`` experts (its default on GPUs)."""
    k = shape.top_k
    h, f = shape.hidden, shape.expert_ffn
    shared: Tensor | None = None
    if shape.shared_ffn:
        shared = _gated_mlp(tp, ctx, layout, layer, x, "shared_expert")
    # Router: logits, fp32 softmax, top-k.
    logits = _lin(tp, ctx, layout, layer, "router", x)
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
        g = _lin(tp, ctx, layout, layer, "shared_expert_gate", x)
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
    base = _p(tp, weight)
    if rank is None:
        return base
    # peft's _LoraFactorsProxy: baddbmm(W, B, A) builds W + s * B @ A at full size every forward.
    merged = tp.new((0.0, 0.0, float(weight.numel)), weight.dtype)
    lhs = tp.param(1, ctx.adapter_dtype, True)
    tp.record([merged], [lhs])
    return merged


# --- GPT-2 -------------------------------------------------------------------------------------------


def gpt2_layer(tp: Tape, ctx: Context, shape: Shape, layout: Layout, layer: int, x: Tensor, attention: str) -> Tensor:
    """``GPT2Block.forward``."""
    residual = tp.view(x)
    held: list[Tensor] = []
    n1 = ops.layer_norm(tp, ctx, x, _p(tp, layout.weight(layer, "ln_1")), _p(tp, layout.weight(layer, "ln_1.bias")))
    qkv = _lin(tp, ctx, layout, layer, "attention.qkv", n1)
    tp.drop(n1)
    third = scale(qkv.numel, 1.0 / 3.0)
    q, k, v = tp.view(qkv, third), tp.view(qkv, third), tp.view(qkv, third)
    tp.drop(qkv)
    a = _attention(tp, ctx, shape, q, k, v, attention, shape.heads, softmax_fp32=False, returned=held)
    tp.drop(q, k, v)
    a2 = ops.contiguous(tp, a)
    tp.drop(a)
    o = _lin(tp, ctx, layout, layer, "attention.o", a2)
    tp.drop(a2)
    od = ops.dropout(tp, ctx, o, shape.dropout)
    tp.drop(o)
    x2 = ops.addt(tp, od, residual)
    tp.drop(od, residual)
    residual = tp.view(x2)
    n2 = ops.layer_norm(tp, ctx, x2, _p(tp, layout.weight(layer, "ln_2")), _p(tp, layout.weight(layer, "ln_2.bias")))
    tp.drop(x2)
    up = _lin(tp, ctx, layout, layer, "mlp.up", n2)
    tp.drop(n2)
    act = _gelu_new(tp, ctx, up)
    tp.drop(up)
    down = _lin(tp, ctx, layout, layer, "mlp.down", act)
    tp.drop(act)
    dd = ops.dropout(tp, ctx, down, shape.dropout)
    tp.drop(down)
    out = ops.addt(tp, residual, dd)
    tp.drop(residual, dd, *held)
    return out


def _gelu_new(tp: Tape, ctx: Context, x: Tensor) -> Tensor:
    """``NewGELUActivation``: 0.5 * x * (1 + tanh(c * (x + 0.044715 * x**3))) in Python ops."""
    half = ops.scalar(tp, x)
    p_in = ops.to_fp32_policy(tp, ctx, x)  # pow is on autocast's fp32 list
    cube = ops.unary_saving_input(tp, p_in)
    tp.drop(p_in)
    c1 = ops.scalar(tp, cube)
    tp.drop(cube)
    s = ops.addt(tp, x, c1)
    tp.drop(c1)
    c2 = ops.scalar(tp, s)
    tp.drop(s)
    t = ops.unary_saving_result(tp, c2)
    tp.drop(c2)
    one = ops.scalar(tp, t)
    tp.drop(t)
    out = ops.mul(tp, half, one)
    tp.drop(half, one)
    return out


# --- BERT ----------------------------------------------------------------------------------------------


def bert_layer(tp: Tape, ctx: Context, shape: Shape, layout: Layout, layer: int, x: Tensor, attention: str) -> Tensor:
    """``BertLayer.forward``: attention, then ``dense -> dropout -> LayerNorm(h + input)`` twice."""
    q = _lin(tp, ctx, layout, layer, "attention.q", x)
    k = _lin(tp, ctx, layout, layer, "attention.k", x)
    v = _lin(tp, ctx, layout, layer, "attention.v", x)
    held: list[Tensor] = []
    a = _attention(tp, ctx, shape, q, k, v, attention, shape.heads, softmax_fp32=False, returned=held)
    tp.drop(q, k, v)
    a2 = ops.contiguous(tp, a)
    tp.drop(a)
    attn = _dense_dropout_norm(tp, ctx, shape, layout, layer, a2, x, "attention.o", "attention_norm")
    tp.drop(a2)
    up = _lin(tp, ctx, layout, layer, "mlp.up", attn)
    act = ops.unary_saving_input(tp, up)
    tp.drop(up)
    out = _dense_dropout_norm(tp, ctx, shape, layout, layer, act, attn, "mlp.down", "output_norm")
    tp.drop(act, attn, *held)
    return out


def _dense_dropout_norm(
    tp: Tape, ctx: Context, shape: Shape, layout: Layout, layer: int, h: Tensor, residual: Tensor, role: str, norm: str
) -> Tensor:
    d = _lin(tp, ctx, layout, layer, role, h)
    dd = ops.dropout(tp, ctx, d, shape.dropout)
    tp.drop(d)
    s = ops.addt(tp, dd, residual)
    tp.drop(dd)
    out = ops.layer_norm(tp, ctx, s, _p(tp, layout.weight(layer, norm)), _p(tp, layout.weight(layer, norm + ".bias")))
    tp.drop(s)
    return out


# --- embeddings and heads ----------------------------------------------------------------------------------


def embed(tp: Tape, ctx: Context, shape: Shape, layout: Layout, input_grad: bool, virtual: int = 0) -> Tensor:
    """The input embedding (plus GPT-2 positions, BERT positions/types/norm, prompt tokens)."""
    h = shape.hidden
    table = layout.weight(None, "embed")
    out = ops.embedding(tp, ctx, per_token(h), table.dtype, _p(tp, table))
    if input_grad and not out.rg:
        # enable_input_require_grads(): a hook makes the input embedding's output require grad.
        out.rg = True
    if virtual:
        # prompt tuning: cat([prompt_embeddings, inputs_embeds]) over the sequence.
        prompt = _p(tp, layout.weight(None, "prompt"))
        both = tp.new(per_token(h), out.dtype)
        tp.record([both], [out, prompt], alias=False)
        tp.drop(out)
        out = both
    if shape.model_type == "gemma":
        scaled = ops.scalar(tp, out)
        tp.drop(out)
        out = scaled
    if shape.family == "gpt2":
        pos = ops.embedding(tp, ctx, per_token(h), table.dtype, _p(tp, layout.weight(None, "position")))
        s = ops.addt(tp, out, pos)
        tp.drop(out, pos)
        out = ops.dropout(tp, ctx, s, shape.dropout)
        tp.drop(s)
    elif shape.family == "bert":
        pos = ops.embedding(tp, ctx, per_token(h), table.dtype, _p(tp, layout.weight(None, "position")))
        typ = ops.embedding(tp, ctx, per_token(h), table.dtype, _p(tp, layout.weight(None, "token_type")))
        s1 = ops.addt(tp, out, typ)
        tp.drop(out, typ)
        s2 = ops.addt(tp, s1, pos)
        tp.drop(s1, pos)
        n = ops.layer_norm(
            tp, ctx, s2, _p(tp, layout.weight(None, "embed_norm")), _p(tp, layout.weight(None, "embed_norm.bias"))
        )
        tp.drop(s2)
        out = ops.dropout(tp, ctx, n, shape.dropout)
        tp.drop(n)
    return out


def head(tp: Tape, ctx: Context, shape: Shape, layout: Layout, x: Tensor, loss: str) -> Tensor:
    """Final norm, output head and the loss (transformers' ``ForCausalLMLoss`` or BERT's MLM loss)."""
    if shape.family == "bert" and layout.linear(None, "output_head") is None:
        # Sequence classification: the pooler and classifier read one token per sequence, so what they
        # keep is negligible next to the encoder's activations; the loss is a scalar.
        loss_t = tp.new((0.0, 0.0, 1.0), FP32)
        tp.record([loss_t], [x])
        return loss_t
    if shape.family == "llama":
        n = ops.rms_norm(tp, ctx, x, _p(tp, layout.weight(None, "final_norm")), gemma=shape.gemma_norm)
    elif shape.family == "gpt2":
        n = ops.layer_norm(
            tp, ctx, x, _p(tp, layout.weight(None, "final_norm")), _p(tp, layout.weight(None, "final_norm.bias"))
        )
    else:  # bert: cls.predictions.transform = dense -> gelu -> LayerNorm
        d = _lin(tp, ctx, layout, None, "head_transform", x)
        g = ops.unary_saving_input(tp, d)
        tp.drop(d)
        n = ops.layer_norm(
            tp, ctx, g, _p(tp, layout.weight(None, "final_norm")), _p(tp, layout.weight(None, "final_norm.bias"))
        )
        tp.drop(g)
    if loss == "chunked":
        return _chunked_loss(tp, ctx, shape, layout, n)
    logits = _lin(tp, ctx, layout, None, "output_head", n)
    tp.drop(n)
    # BERT: CrossEntropyLoss on the logits as they are (fp32 under autocast's policy);
    # causal LMs: ForCausalLMLoss calls logits.float().
    lf = ops.to_fp32_policy(tp, ctx, logits) if shape.family == "bert" else ops.cast(tp, logits, FP32)
    # The model output keeps the logits until Trainer.compute_loss returns, before backward.
    logp = ops.unary_saving_result(tp, lf)
    tp.drop(lf)
    loss_t = tp.new((0.0, 0.0, 1.0), FP32)
    target = tp.new(per_token(1), "int64")
    tp.record([loss_t], [logp], saved=[logp, target])
    tp.drop(logp, target, logits)
    return loss_t


def _chunked_loss(tp: Tape, ctx: Context, shape: Shape, layout: Layout, x: Tensor) -> Tensor:
    """A fused linear cross-entropy (Liger-Kernel's): logits exist one chunk at a time.

    Liger computes the gradients during the forward in chunks of about
    ``tokens * hidden / vocab`` rows, so the peak holds one fp32 chunk of
    logits and its gradient (about 2 x 4 x tokens x hidden bytes), and keeps
    the input gradient (the size of the input) for backward.
    """
    spec = layout.linear(None, "output_head")
    h = shape.hidden
    chunk: Lin = per_token(h * 4 * 2)
    tp.temporary(chunk, LOGITS)
    grad_in = tp.new(x.numel, x.dtype, cat=LOGITS)
    loss_t = tp.new((0.0, 0.0, 1.0), FP32)
    w = tp.param(
        (spec.in_features * spec.out_features) if spec else 0,
        spec.dtype if spec else FP32,
        bool(spec and spec.trainable),
    )
    tp.record([loss_t], [x, w], saved=[grad_in])
    tp.drop(grad_in, x)
    return loss_t


LayerProgram = Callable[[Tape, Context, Shape, Layout, int, Tensor, str], Tensor]

PROGRAMS: dict[str, LayerProgram] = {"llama": llama_layer, "gpt2": gpt2_layer, "bert": bert_layer}
