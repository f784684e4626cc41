"""Trainable tokens: chosen rows of the token embedding train, the rest of the model is frozen.

peft 0.21.2's ``TRAINABLE_TOKENS`` method (``tuners/trainable_tokens``), and LoRA's
``trainable_token_indices`` option, which wraps the embedding the same way
(``utils/other.py``: ``TrainableTokensWrapper``):

* ``TrainableTokensLayer.update_layer`` creates ``trainable_tokens_delta``, a
  ``(len(token_indices), embedding_dim)`` parameter (float32 under peft's default
  ``autocast_adapter_dtype``), initialised from the embedding's rows;
* an output head tied to the embedding gets a layer tied to that one, adding nothing
  (``TrainableTokensModel.inject_adapter``);
* every forward writes the rows into a copy of the whole embedding matrix
  (``index_copy``) and embeds with it: activation memory the layer programs do not
  model, so the step of a plan with trainable tokens is derived from a trace.

The delta is one trainable tensor of :attr:`~peftaudit.memory.methods.Adaptation.prompt_tensors`.
"""

from __future__ import annotations

from peftaudit.inventory import Inventory
from peftaudit.matching import is_all_linear, targets_match
from peftaudit.memory.methods import Adaptation
from peftaudit.memory.plan import PlanError, TrainingPlan


def token_rows(inventory: Inventory, plan: TrainingPlan) -> tuple[tuple[int, ...], ...]:
    """The trainable-token delta as a tensor shape, ``((tokens, embedding_dim),)``; ``()`` without tokens.

    The embedding is the input embedding (peft's ``get_input_embeddings()``), or, for the
    ``trainable-tokens`` method with named ``targets``, the embedding those name.
    """
    if plan.trainable_tokens < 1:
        return ()
    named = plan.method == "trainable-tokens" and plan.targets != "default" and not is_all_linear(plan.targets)
    dim = _embedding_dim(inventory, plan.targets if named else None)
    return ((plan.trainable_tokens, dim),)


def _embedding_dim(inventory: Inventory, targets: str | tuple[str, ...] | None) -> int:
    embeddings = [p for p in inventory.parameters if p.kind == "embedding" and len(p.shape) == 2]
    if targets is not None:
        chosen = [p for p in embeddings if p.module and targets_match(targets, p.module)]
        if not chosen:
            raise PlanError(f"trainable-token targets {targets!r} match no embedding of this {inventory.architecture}")
        if len(chosen) > 1:
            raise PlanError(f"trainable-token targets {targets!r} match {len(chosen)} embeddings; peftaudit models one")
        return chosen[0].shape[1]
    vocab = inventory.dims.vocab_size
    # The token embedding (not a position embedding): the one with a row per vocabulary entry.
    token = [p for p in embeddings if vocab is None or p.shape[0] == vocab] or embeddings
    if not token:
        raise PlanError(f"trainable tokens need a token embedding; this {inventory.architecture} has none")
    return token[0].shape[1]


class TrainableTokensMethod:
    """peft's ``TRAINABLE_TOKENS``: a few embedding rows train; nothing else does."""

    name = "trainable-tokens"
    description = "trainable tokens: chosen rows of the token embedding train (peft's TrainableTokens)"

    def adapt(self, inventory: Inventory, plan: TrainingPlan) -> Adaptation:
        if plan.trainable_tokens < 1:
            raise PlanError("trainable-tokens needs how many tokens train: give --trainable-tokens N")
        rows = token_rows(inventory, plan)
        return Adaptation(self.name, prompt_params=rows[0][0] * rows[0][1], prompt_tensors=rows)


__all__ = ["TrainableTokensMethod", "token_rows"]
