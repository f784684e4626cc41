"""Pieces every layer program shares: weights and linear layers by role, attention, embedding, loss.

A program asks the :class:`~peftaudit.memory.analytic.layout.Layout` for each
linear layer's :class:`~peftaudit.memory.analytic.linear.LinearSpec` and each
norm/embedding weight by role, so methods (LoRA, QLoRA, full, ...) change what
a layer keeps without changing the program.
"""

from __future__ import annotations

from peftaudit.memory.analytic import ops
from peftaudit.memory.analytic.layout import Layout, NoLayerProgram, Weight
from peftaudit.memory.analytic.linear import linear
from peftaudit.memory.analytic.ops import Context
from peftaudit.memory.analytic.shape import ModelShape
from peftaudit.memory.analytic.tape import LOGITS, Lin, Tape, Tensor, per_token, scale

FP32 = "fp32"


def param(tp: Tape, w: Weight) -> Tensor:
    """A norm or embedding weight as a tape parameter."""
    return tp.param(w.numel, w.dtype, w.trainable)


def linear_role(tp: Tape, ctx: Context, layout: Layout, layer: int | None, role: str, x: Tensor) -> Tensor:
    """The linear layer playing ``role`` in ``layer``, applied to ``x``.

    Raises :class:`NoLayerProgram` when the model has no such layer: the program
    does not read this model's layers.
    """
    spec = layout.linear(layer, role)
    if spec is None:
        where = "the model" if layer is None else f"layer {layer}"
        raise NoLayerProgram(f"{where} has no '{role}' linear layer for the layer program to read")
    return linear(tp, ctx, x, spec)


def self_attention(
    tp: Tape,
    ctx: Context,
    shape: ModelShape,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attention: str,
    heads: int,
    *,
    softmax_fp32: bool,
    cast_before_dropout: bool = True,
    returned: list[Tensor] | None = None,
) -> Tensor:
    """transformers' attention function: eager (with ``repeat_kv``) or SDPA's flash kernel."""
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
            cast_before_dropout=cast_before_dropout,
            returned=returned,
        )
        if repeat:
            tp.drop(kr, vr)
        return out
    # transformers < 4.54, and any release when a mask is passed (use_gqa_in_sdpa, integrations/
    # sdpa_attention.py: CUDA's kernels take grouped heads only without one): repeat_kv before SDPA,
    # which keeps the expanded copies for backward.
    if (shape.sdpa_repeats_kv or ctx.padding_mask) and shape.kv_heads and shape.kv_heads != heads:
        factor = heads / shape.kv_heads
        kr = tp.new(scale(k.numel, factor), k.dtype)
        tp.record([kr], [k])
        vr = tp.new(scale(v.numel, factor), v.dtype)
        tp.record([vr], [v])
        out = ops.flash_attention(tp, ctx, q, kr, vr, heads)
        tp.drop(kr, vr)
        return out
    return ops.flash_attention(tp, ctx, q, k, v, heads)


def embed_tokens(
    tp: Tape, ctx: Context, shape: ModelShape, layout: Layout, input_grad: bool, virtual: int = 0
) -> tuple[Tensor, Weight]:
    """The token embedding (and prompt-tuning's virtual tokens); returns it and the table's weight."""
    h = shape.hidden
    table = layout.weight(None, "embed")
    out = ops.embedding(tp, ctx, per_token(h), table.dtype, param(tp, table))
    if input_grad and not out.rg:
        # enable_input_require_grads(): a hook makes the input embedding's output require grad.
        out.rg = True
    if virtual:
        # prompt tuning: cat([prompt_embeddings, inputs_embeds]) over the sequence.
        prompt = param(tp, layout.weight(None, "prompt"))
        both = tp.new(per_token(h), out.dtype)
        tp.record([both], [out, prompt], alias=False)
        tp.drop(out)
        out = both
    if shape.model_type == "gemma":
        scaled = ops.scalar(tp, out)
        tp.drop(out)
        out = scaled
    return out, table


def head_loss(
    tp: Tape, ctx: Context, shape: ModelShape, layout: Layout, n: Tensor, kind: str, *, fp32_policy: bool
) -> Tensor:
    """The output head on the normed hidden states ``n`` and the loss.

    Causal LMs run transformers' ``ForCausalLMLoss`` (``logits.float()``);
    ``fp32_policy``: BERT's ``CrossEntropyLoss`` on the logits as they are (fp32
    under autocast's policy). ``kind="chunked"`` is a fused linear cross-entropy.
    """
    if kind == "chunked":
        return _chunked_loss(tp, ctx, shape, layout, n)
    if kind == "logprob":
        return _fused_logprob_head(tp, n)
    if kind in ("logits", "logits-nll"):
        return _logits_logprob_loss(tp, ctx, layout, n, nll=kind == "logits-nll")
    logits = linear_role(tp, ctx, layout, None, "output_head", n)
    tp.drop(n)
    lf = ops.to_fp32_policy(tp, ctx, logits) if fp32_policy else ops.cast(tp, logits, FP32)
    # The model output keeps the logits until Trainer.compute_loss returns, before backward.
    logp = ops.unary_saving_result(tp, lf)
    tp.drop(lf)
    loss_t = tp.new((0.0, 0.0, 1.0), FP32)
    target = tp.new(per_token(1), "int64")
    tp.record([loss_t], [logp], saved=[logp, target])
    tp.drop(logp, target, logits)
    return loss_t


def _chunked_loss(tp: Tape, ctx: Context, shape: ModelShape, layout: Layout, x: Tensor) -> Tensor:
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


def _fused_logprob_head(tp: Tape, n: Tensor) -> Tensor:
    """TRL's fused log-prob head (``ChunkedLogProbFunction``): only the hidden states pass through the tape.

    Its memory depends on how many tokens it scores, not on the tape's batch and sequence, so
    :mod:`peftaudit.memory.objectives` counts it (:func:`~peftaudit.memory.objectives.fused_head`);
    the tape keeps the hidden states' gradient, which flows back into the model.
    """
    loss_t = tp.new((0.0, 0.0, 1.0), FP32)
    tp.record([loss_t], [n])
    tp.drop(n)
    return loss_t


def _logits_logprob_loss(tp: Tape, ctx: Context, layout: Layout, n: Tensor, *, nll: bool) -> Tensor:
    """ORPO's and SimPO's loss (TRL 1.16 ``concatenated_forward``): full logits, log-probs of the labels.

    The model's output keeps the logits (compute dtype, not upcast); ``selective_log_softmax``'s
    Triton kernel reads them in place and keeps four fp32 values per position; its backward writes
    one logits-sized gradient. ORPO adds an NLL on the chosen half (the first half of the rows):
    ``logits[..., :-1, :].contiguous()`` and ``CrossEntropyLoss``'s log-softmax of it (fp32 under autocast).
    """
    logits = linear_role(tp, ctx, layout, None, "output_head", n)
    tp.drop(n)
    stats = tp.new(per_token(4), FP32, cat=LOGITS)
    logp = tp.new(per_token(1), FP32, cat=LOGITS)
    # logits[:, :-1, :]: a view whose backward writes the gradient into a full-size zero tensor.
    sliced = tp.view(logits, logits.numel)
    tp.record([logp], [sliced], saved=[sliced, stats])
    tp.drop(sliced)
    tp.drop(stats)
    loss_t = tp.new((0.0, 0.0, 1.0), FP32)
    inputs = [logp]
    if nll:
        chosen = tp.new(scale(logits.numel, 0.5), logits.dtype, cat=LOGITS)
        tp.record([chosen], [logits], alias=True)
        # Autocast runs cross_entropy's log-softmax in fp32: a cast copy, then an fp32 result it saves.
        upcast = ops.to_fp32_policy(tp, ctx, chosen)
        tp.drop(chosen)
        log_softmax = ops.unary_saving_result(tp, upcast)
        tp.drop(upcast)
        inputs.append(log_softmax)
    tp.record([loss_t], inputs, saved=inputs[1:])
    tp.drop(logits, *inputs)
    return loss_t
