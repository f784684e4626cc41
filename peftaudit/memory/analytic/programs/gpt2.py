"""GPT-2's layer program: ``GPT2Block`` as transformers 5 runs it.

LayerNorm, a fused ``c_attn`` (a ``Conv1D``), ``gelu_new`` written in Python
ops, residual, embedding and attention dropout (0.1 in GPT-2's configs), and
learned position embeddings.
"""

from __future__ import annotations

from peftaudit.memory.analytic import ops
from peftaudit.memory.analytic.layout import Layout
from peftaudit.memory.analytic.ops import Context
from peftaudit.memory.analytic.programs.common import embed_tokens, head_loss, linear_role, param, self_attention
from peftaudit.memory.analytic.programs.registry import LayerProgram, register_program
from peftaudit.memory.analytic.shape import ModelShape
from peftaudit.memory.analytic.tape import Tape, Tensor, per_token, scale


def gpt2_layer(
    tp: Tape, ctx: Context, shape: ModelShape, layout: Layout, layer: int, x: Tensor, attention: str
) -> Tensor:
    """``GPT2Block.forward``."""
    residual = tp.view(x)
    held: list[Tensor] = []
    n1 = ops.layer_norm(
        tp, ctx, x, param(tp, layout.weight(layer, "ln_1")), param(tp, layout.weight(layer, "ln_1.bias"))
    )
    qkv = linear_role(tp, ctx, layout, layer, "attention.qkv", n1)
    tp.drop(n1)
    third = scale(qkv.numel, 1.0 / 3.0)
    q, k, v = tp.view(qkv, third), tp.view(qkv, third), tp.view(qkv, third)
    tp.drop(qkv)
    a = self_attention(tp, ctx, shape, q, k, v, attention, shape.heads, softmax_fp32=False, returned=held)
    tp.drop(q, k, v)
    a2 = ops.contiguous(tp, a)
    tp.drop(a)
    o = linear_role(tp, ctx, layout, layer, "attention.o", a2)
    tp.drop(a2)
    od = ops.dropout(tp, ctx, o, shape.dropout)
    tp.drop(o)
    x2 = ops.addt(tp, od, residual)
    tp.drop(od, residual)
    residual = tp.view(x2)
    n2 = ops.layer_norm(
        tp, ctx, x2, param(tp, layout.weight(layer, "ln_2")), param(tp, layout.weight(layer, "ln_2.bias"))
    )
    tp.drop(x2)
    up = linear_role(tp, ctx, layout, layer, "mlp.up", n2)
    tp.drop(n2)
    act = _gelu_new(tp, ctx, up)
    tp.drop(up)
    down = linear_role(tp, ctx, layout, layer, "mlp.down", act)
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


def embed(tp: Tape, ctx: Context, shape: ModelShape, layout: Layout, input_grad: bool, virtual: int = 0) -> Tensor:
    """Token plus learned position embeddings, then dropout."""
    out, table = embed_tokens(tp, ctx, shape, layout, input_grad, virtual)
    pos = ops.embedding(tp, ctx, per_token(shape.hidden), table.dtype, param(tp, layout.weight(None, "position")))
    s = ops.addt(tp, out, pos)
    tp.drop(out, pos)
    out = ops.dropout(tp, ctx, s, shape.dropout)
    tp.drop(s)
    return out


def head(tp: Tape, ctx: Context, shape: ModelShape, layout: Layout, x: Tensor, loss: str) -> Tensor:
    """``ln_f``, the (tied) output head and transformers' ``ForCausalLMLoss``."""
    n = ops.layer_norm(
        tp, ctx, x, param(tp, layout.weight(None, "final_norm")), param(tp, layout.weight(None, "final_norm.bias"))
    )
    return head_loss(tp, ctx, shape, layout, n, loss, fp32_policy=False)


# GPT-2's configs: resid_pdrop, embd_pdrop and attn_pdrop 0.1.
GPT2 = LayerProgram("gpt2", gpt2_layer, embed, head, dropout=0.1)

register_program(GPT2, "gpt2")
