"""BERT's layer program: ``BertLayer`` as transformers 5 runs it (also RoBERTa).

Post-norm (``dense -> dropout -> LayerNorm(h + input)`` twice), GELU, dropout
0.1 as in BERT's configs, bidirectional attention; embeddings with positions,
token types and a LayerNorm; the MLM head (or a classifier's negligible one).
"""

from __future__ import annotations

from peftaudit.memory.analytic import ops
from peftaudit.memory.analytic.layout import Layout
from peftaudit.memory.analytic.ops import Context
from peftaudit.memory.analytic.programs.common import (
    FP32,
    embed_tokens,
    head_loss,
    linear_role,
    param,
    self_attention,
)
from peftaudit.memory.analytic.programs.registry import LayerProgram, register_program
from peftaudit.memory.analytic.shape import ModelShape
from peftaudit.memory.analytic.tape import Tape, Tensor, per_token


def bert_layer(
    tp: Tape, ctx: Context, shape: ModelShape, layout: Layout, layer: int, x: Tensor, attention: str
) -> Tensor:
    """``BertLayer.forward``: attention, then ``dense -> dropout -> LayerNorm(h + input)`` twice."""
    q = linear_role(tp, ctx, layout, layer, "attention.q", x)
    k = linear_role(tp, ctx, layout, layer, "attention.k", x)
    v = linear_role(tp, ctx, layout, layer, "attention.v", x)
    held: list[Tensor] = []
    # BERT drops out the fp32 probabilities and lets the matmul cast them.
    a = self_attention(
        tp, ctx, shape, q, k, v, attention, shape.heads, softmax_fp32=False, cast_before_dropout=False, returned=held
    )
    tp.drop(q, k, v)
    a2 = ops.contiguous(tp, a)
    tp.drop(a)
    attn = _dense_dropout_norm(tp, ctx, shape, layout, layer, a2, x, "attention.o", "attention_norm")
    tp.drop(a2)
    up = linear_role(tp, ctx, layout, layer, "mlp.up", attn)
    act = ops.unary_saving_input(tp, up)
    tp.drop(up)
    out = _dense_dropout_norm(tp, ctx, shape, layout, layer, act, attn, "mlp.down", "output_norm")
    tp.drop(act, attn, *held)
    return out


def _dense_dropout_norm(
    tp: Tape,
    ctx: Context,
    shape: ModelShape,
    layout: Layout,
    layer: int,
    h: Tensor,
    residual: Tensor,
    role: str,
    norm: str,
) -> Tensor:
    d = linear_role(tp, ctx, layout, layer, role, h)
    dd = ops.dropout(tp, ctx, d, shape.dropout)
    tp.drop(d)
    s = ops.addt(tp, dd, residual)
    tp.drop(dd)
    out = ops.layer_norm(
        tp, ctx, s, param(tp, layout.weight(layer, norm)), param(tp, layout.weight(layer, norm + ".bias"))
    )
    tp.drop(s)
    return out


def embed(tp: Tape, ctx: Context, shape: ModelShape, layout: Layout, input_grad: bool, virtual: int = 0) -> Tensor:
    """Token, token-type and position embeddings, LayerNorm, dropout."""
    out, table = embed_tokens(tp, ctx, shape, layout, input_grad, virtual)
    h = shape.hidden
    pos = ops.embedding(tp, ctx, per_token(h), table.dtype, param(tp, layout.weight(None, "position")))
    typ = ops.embedding(tp, ctx, per_token(h), table.dtype, param(tp, layout.weight(None, "token_type")))
    s1 = ops.addt(tp, out, typ)
    tp.drop(out, typ)
    s2 = ops.addt(tp, s1, pos)
    tp.drop(s1, pos)
    n = ops.layer_norm(
        tp, ctx, s2, param(tp, layout.weight(None, "embed_norm")), param(tp, layout.weight(None, "embed_norm.bias"))
    )
    tp.drop(s2)
    out = ops.dropout(tp, ctx, n, shape.dropout)
    tp.drop(n)
    return out


def head(tp: Tape, ctx: Context, shape: ModelShape, layout: Layout, x: Tensor, loss: str) -> Tensor:
    """The MLM head (``cls.predictions.transform`` = dense -> gelu -> LayerNorm, the decoder) and its loss."""
    if layout.linear(None, "output_head") is None:
        # Sequence classification: the pooler and classifier read one token per sequence, so what they
        # keep is negligible next to the encoder's activations; the loss is a scalar.
        loss_t = tp.new((0.0, 0.0, 1.0), FP32)
        tp.record([loss_t], [x])
        return loss_t
    d = linear_role(tp, ctx, layout, None, "head_transform", x)
    g = ops.unary_saving_input(tp, d)
    tp.drop(d)
    n = ops.layer_norm(
        tp, ctx, g, param(tp, layout.weight(None, "final_norm")), param(tp, layout.weight(None, "final_norm.bias"))
    )
    tp.drop(g)
    return head_loss(tp, ctx, shape, layout, n, loss, fp32_policy=True)


# BERT's configs: hidden_dropout_prob and attention_probs_dropout_prob 0.1.
BERT = LayerProgram("bert", bert_layer, embed, head, dropout=0.1, causal=False)

register_program(BERT, "bert", "roberta")
