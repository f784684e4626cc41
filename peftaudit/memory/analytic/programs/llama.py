"""The Llama family's layer program: ``LlamaDecoderLayer`` as transformers 5 runs it.

``LlamaDecoderLayer.forward`` written against the
:class:`~peftaudit.memory.analytic.tape.Tape` line by line, so what it keeps for
backward can be read next to the real source. It also reads Mistral, Qwen2
(q/k/v biases), Qwen3 (q/k norms), OLMo, Granite, Gemma-1 and any model with
``q_proj``..``down_proj`` names. Sparse MoE blocks (Mixtral, Qwen-MoE) are derived
from a trace of the real expert kernels (:mod:`peftaudit.memory.derived`): routing,
grouped matmuls and LoRA on fused expert weights depend on kernel details a
program would have to copy line by line.
"""

from __future__ import annotations

from peftaudit.memory.analytic import ops
from peftaudit.memory.analytic.layout import Layout
from peftaudit.memory.analytic.ops import Context
from peftaudit.memory.analytic.programs.common import embed_tokens, head_loss, linear_role, param, self_attention
from peftaudit.memory.analytic.programs.registry import LayerProgram, register_program
from peftaudit.memory.analytic.shape import ModelShape
from peftaudit.memory.analytic.tape import Tape, Tensor


def llama_layer(
    tp: Tape, ctx: Context, shape: ModelShape, layout: Layout, layer: int, x: Tensor, attention: str
) -> Tensor:
    """``LlamaDecoderLayer.forward`` (and Mistral/Qwen2/Qwen3)."""
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
    "gemma",
    "smollm3",
    "olmo",
    "olmo2",
    "granite",
    "starcoder2",
)
