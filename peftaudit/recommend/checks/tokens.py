"""Embeddings and tokens: tied embeddings saved on one side, added tokens, ids outside the vocabulary, pad token."""

from __future__ import annotations

from collections.abc import Iterator

from peftaudit.recommend.checks import CheckContext, check
from peftaudit.recommend.findings import Finding


@check("tokens", "tied embeddings saved on one side, added tokens, token ids outside the vocabulary, pad token")
def tokens(ctx: CheckContext) -> Iterator[Finding]:
    inv = ctx.inventory
    facts = ctx.facts
    adapted = ctx.adapted
    saved = {s.path for s in adapted.saved} if adapted else set()
    embed = _input_embedding(ctx)
    head = inv.output_head
    if ctx.targets is not None:
        for group in inv.tied_groups:
            owners = [n.rpartition(".")[0] for n in group.names]
            kept = [o for o in owners if _saved(o, saved)]
            if kept and len(kept) < len(owners):
                other = [o for o in owners if o not in kept]
                yield Finding(
                    "tied.one-side-saved",
                    "warning",
                    f"{', '.join(kept)} is in modules_to_save but its tied twin {', '.join(other)} is not: "
                    "the two drift apart in training and the saved copy doubles the tensor",
                    fix=f"save both ({', '.join(owners)}) with ensure_weight_tying=True, or neither",
                    modules=tuple(owners),
                )
    if ctx.added_tokens > 0:
        needed = [p for p in (embed, head) if p]
        if ctx.targets is None or not all(_saved(p, saved) for p in needed):
            yield Finding(
                "tokens.added",
                "warning",
                f"{ctx.added_tokens} new tokens need trained rows in the input embedding and the output head",
                fix=f"add {', '.join(needed)} to modules_to_save (full copies), or train only the new rows "
                "with trainable_token_indices; a tied head follows the embedding",
                modules=tuple(needed),
            )
    vocab = inv.dims.vocab_size
    if vocab:
        outside = {
            name: value
            for name in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
            for value in _ids(facts.token_id(name))
            if value >= vocab
        }
        if outside:
            yield Finding(
                "tokens.out-of-vocab",
                "error",
                "token ids outside the vocabulary of "
                + f"{vocab:,}: {', '.join(f'{k}={v}' for k, v in outside.items())}",
                fix="resize the embeddings to the tokenizer (model.resize_token_embeddings(len(tokenizer))) and "
                f"train the new rows ({', '.join(p for p in (embed, head) if p)} in modules_to_save)",
                modules=tuple(p for p in (embed, head) if p),
            )
    # Only models that read tokens have a pad token to miss (not a diffusion UNet, say).
    if facts.config and ctx.inventory.dims.vocab_size and facts.token_id("pad_token_id") is None:
        classification = ctx.task == "classification"
        eos = facts.token_id("eos_token_id")
        yield Finding(
            "tokens.no-pad",
            "error" if classification else "warning",
            "the config has no pad_token_id"
            + (": sequence classification cannot find the last token of a padded batch" if classification else ""),
            fix="set tokenizer.pad_token to an existing token (the eos token"
            + (f", id {eos}" if isinstance(eos, int) else "")
            + ", or a reserved one) and model.config.pad_token_id to its id; adding a new pad token forces "
            "training the embeddings",
        )


def _input_embedding(ctx: CheckContext) -> str | None:
    vocab = ctx.inventory.dims.vocab_size
    for p in ctx.inventory.parameters:
        if p.kind == "embedding" and len(p.shape) == 2 and (not vocab or p.shape[0] == vocab):
            return p.module
    return None


def _saved(path: str, saved: set[str]) -> bool:
    return any(path == s or path.startswith(s + ".") for s in saved)


def _ids(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]
