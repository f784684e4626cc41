"""Vocabulary sizes that waste memory: unaligned to tensor-core tiles, or logits larger than the layers."""

from __future__ import annotations

from collections.abc import Iterator

from peftaudit.recommend.checks import CheckContext, check
from peftaudit.recommend.findings import Finding
from peftaudit.units import GIB


@check("vocab", "vocabulary sizes that waste memory: unaligned, or logits larger than the layers")
def vocabulary(ctx: CheckContext) -> Iterator[Finding]:
    inv = ctx.inventory
    vocab = inv.dims.vocab_size
    if not vocab:
        return
    if vocab % 64:
        padded = -(-vocab // 64) * 64
        yield Finding(
            "vocab.unaligned",
            "info",
            f"vocabulary of {vocab:,} is not a multiple of 64: the head's matmul misses the tensor-core tiles",
            fix=f"model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64) (to {padded:,}); "
            "the padding rows are never used and need no training",
        )
    logits = vocab * ctx.seq_len * 4
    if logits >= GIB:
        yield Finding(
            "vocab.logits-memory",
            "warning",
            f"fp32 logits for one {ctx.seq_len:,}-token sequence take {logits / GIB:.1f} GiB "
            f"({vocab:,} x {ctx.seq_len:,} x 4 bytes), and their gradient as much again",
            fix="use a chunked or fused cross-entropy (Liger kernel, Cut Cross-Entropy) and keep the "
            "micro-batch small; transformers upcasts all logits to fp32 for the loss",
        )
    vocab_params = sum(p.numel for p in inv.parameters if p.kind in ("embedding", "output_head") and len(p.shape) == 2)
    if inv.total and vocab_params / inv.total >= 0.2:
        yield Finding(
            "vocab.large-share",
            "info",
            f"embeddings and head are {vocab_params / inv.total:.0%} of the model ({vocab_params:,} parameters)",
            fix="avoid modules_to_save on them (a full trainable copy plus optimizer state); to learn new "
            "tokens use trainable_token_indices",
        )
