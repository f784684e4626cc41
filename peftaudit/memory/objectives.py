"""What one step of each training objective runs, as TRL 1.16's trainers run it.

Plain rules, no torch: the estimator (:mod:`peftaudit.memory.analytic.objective_step`) composes
them with the model's recorded step. Sources are trl 1.16.0's files (line numbers in
``docs/memory.md``, "Objectives"):

* ``sft``: ``Trainer``'s step, the model's own loss (transformers' ``ForCausalLMLoss``).
* ``dpo`` (``DPOTrainer._compute_loss``): chosen and rejected sequences in one forward (2 x batch
  rows); TRL's fused log-prob head; then the reference model's forward over the same rows under
  ``no_grad`` while the policy's activations are alive: the base with its adapters disabled for
  PEFT, else a second copy of the model (``precompute_ref_log_probs`` drops both).
* ``kto`` (``KTOTrainer._compute_loss``): batch completions with gradients, after a no-grad pass over
  as many mismatched (KL) completions; the reference scores both under ``no_grad``.
* ``orpo``/``simpo`` (``ORPOTrainer``/``CPOTrainer`` ``concatenated_forward``): pairs, the model's full
  logits, no reference; ORPO adds an NLL on the chosen half.
* ``reward`` (``RewardTrainer.compute_loss``): pairs through ``AutoModelForSequenceClassification``
  with one label.
* ``grpo`` (``GRPOTrainer``): ``generations`` completions per prompt generated first (KV cache), then
  one training step over ``batch x generations`` sequences scoring completion tokens only; a
  reference model only when ``beta > 0`` (its default is 0.0).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from peftaudit.memory.dtypes import nbytes
from peftaudit.memory.plan import PEFT_METHOD_NAMES, PlanError, TrainingPlan

if TYPE_CHECKING:
    from peftaudit.inventory import Inventory

#: Objectives that train a causal language model (reward trains a sequence classifier).
CAUSAL_OBJECTIVES: tuple[str, ...] = ("sft", "dpo", "kto", "orpo", "simpo", "grpo")
#: Objectives whose loss runs TRL's fused log-prob head (``add_fused_lm_head``) instead of full logits.
FUSED_HEAD_OBJECTIVES: tuple[str, ...] = ("dpo", "kto", "grpo")

#: TRL's chunk of vocabulary columns the fused head multiplies at a time
#: (``_CHUNKED_LOGPROB_CHUNK_SIZE``, trl/trainer/utils.py), whatever the vocabulary's size.
FUSED_HEAD_COLUMNS = 32768
#: ...and the most rows (scored tokens) one chunk holds (``chunked_logprob.py``).
FUSED_HEAD_ROWS = 4096
#: fp32 statistics the fused head's forward keeps per scored token while it folds the chunks.
FUSED_HEAD_STATS = 7

#: peft's classification heads (``PeftModelForSequenceClassification.classifier_module_names``): the
#: SEQ_CLS task type trains them in full next to the adapters, as TRL's reward trainer asks.
CLASSIFIER_HEADS: tuple[str, ...] = ("classifier", "score")


def check_objective(inventory: Inventory, plan: TrainingPlan) -> None:
    """Raise :class:`PlanError` where ``plan.objective`` cannot train ``inventory``'s model."""
    objective, architecture = plan.objective, inventory.architecture or "this model"
    if objective == "sft":
        return
    if objective == "reward":
        if not architecture.endswith("ForSequenceClassification"):
            raise PlanError(
                f"the reward objective trains a sequence classifier with one output (TRL's RewardTrainer): "
                f"{architecture} is not one; load it as its ForSequenceClassification class with num_labels=1"
            )
        return
    config = inventory.config or {}
    causal = architecture.endswith(_LM_CLASS_ENDINGS) and inventory.output_head is not None
    if not causal or config.get("is_encoder_decoder"):
        raise PlanError(f"the {objective} objective trains a decoder-only language model; {architecture} is not one")


def for_objective(inventory: Inventory, plan: TrainingPlan) -> TrainingPlan:
    """``plan`` as TRL trains it under its objective: a reward model's classification head trains in full next
    to the adapters (peft's SEQ_CLS task type adds it to ``modules_to_save``, as TRL's reward trainer asks)."""
    if plan.objective != "reward" or plan.method not in PEFT_METHOD_NAMES:
        return plan
    paths = {m.path for m in inventory.modules}
    heads = [
        name
        for name in CLASSIFIER_HEADS
        if name not in plan.modules_to_save and any(p == name or p.endswith("." + name) for p in paths)
    ]
    return plan.with_(modules_to_save=(*plan.modules_to_save, *heads)) if heads else plan


#: The endings of a language model's class name that its sequence-classification class replaces.
_LM_CLASS_ENDINGS = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def reward_model_config(config: Mapping[str, Any]) -> dict[str, Any] | None:
    """The config of the model TRL's reward trainer trains from a language model's ``config``:
    ``AutoModelForSequenceClassification`` with one label (reward_trainer.py); ``None`` when ``config``
    already is a sequence classifier or names no language-model class to replace."""
    architectures = config.get("architectures") or []
    name = str(architectures[0]) if architectures else ""
    ending = next((e for e in _LM_CLASS_ENDINGS if name.endswith(e)), None)
    if ending is None:
        return None
    # One label: transformers reads num_labels from id2label. The classifier pools each sequence's last
    # token before padding, so it needs a pad token: TRL sets the tokenizer's, commonly the end-of-text one.
    pad = config.get("pad_token_id")
    if pad is None:
        eos = config.get("eos_token_id")
        pad = (eos[0] if isinstance(eos, list) and eos else eos) if eos is not None else 0
    return {
        **config,
        "architectures": [name[: -len(ending)] + "ForSequenceClassification"],
        "id2label": {"0": "LABEL_0"},
        "label2id": {"LABEL_0": 0},
        "pad_token_id": pad,
    }


def trl_beta(plan: TrainingPlan) -> float:
    """The objective's beta: the plan's, else TRL's default (``GRPOConfig.beta`` 0.0, the others' 0.1)."""
    if plan.beta is not None:
        return float(plan.beta)
    return 0.0 if plan.objective == "grpo" else 0.1


@dataclass(frozen=True)
class ObjectiveStep:
    """The passes one micro-batch of an objective runs, in sequences (rows) and tokens."""

    objective: str
    rows: int
    """Sequences the policy's forward and backward run over (2 x batch for pairs, batch x G for GRPO)."""
    head: str
    """The loss head the tape records: ``default``/``chunked`` (the plan's), ``logprob`` (TRL's fused
    head, counted by :func:`fused_head`), ``logits``, ``logits-nll``."""
    scored_per_row: int
    """Tokens per row the fused head scores (every position but the last; GRPO: the completion)."""
    reference: str
    """``none``, ``adapters-off`` (PEFT: the same weights, adapters disabled) or ``copy`` (a second model)."""
    reference_rows: int
    """Rows of each no-grad reference pass (0: none in the step)."""
    generation_rows: int
    """GRPO: completions generated at once (batch x G x gradient accumulation); 0: no generation here."""
    prompt: int
    completion: int

    @property
    def fused(self) -> bool:
        return self.head == "logprob"


def head_kind(plan: TrainingPlan) -> str:
    """The loss head the step's tape records for ``plan`` (:attr:`ObjectiveStep.head`)."""
    if plan.objective in ("sft", "reward"):
        return plan.loss
    return {"orpo": "logits-nll", "simpo": "logits"}.get(plan.objective, "logprob")


def objective_step(plan: TrainingPlan) -> ObjectiveStep:
    """The passes of one micro-batch of ``plan.objective`` (see the module docstring)."""
    objective = plan.objective
    batch, seq = plan.batch_size, plan.seq_len
    peft = plan.method in PEFT_METHOD_NAMES
    rows = {"sft": batch, "kto": batch, "grpo": batch * plan.generations}.get(objective, 2 * batch)
    wants_reference = (objective in ("dpo", "kto") and not plan.precompute_ref) or (
        objective == "grpo" and trl_beta(plan) > 0
    )
    reference = ("adapters-off" if peft else "copy") if wants_reference else "none"
    generated = objective == "grpo" and plan.generation == "transformers"
    return ObjectiveStep(
        objective=objective,
        rows=rows,
        head=head_kind(plan),
        scored_per_row=plan.completion_len if objective == "grpo" else seq - 1,
        reference=reference,
        reference_rows=rows if reference != "none" else 0,
        # steps_per_generation defaults to gradient_accumulation_steps: one generation per optimizer step.
        generation_rows=rows * plan.gradient_accumulation if generated else 0,
        prompt=seq - plan.completion_len if objective == "grpo" else seq,
        completion=plan.completion_len if objective == "grpo" else 0,
    )


@dataclass(frozen=True)
class FusedHead:
    """Bytes of TRL's fused log-prob head (``ChunkedLogProbFunction``, CUDA path) for one pass."""

    forward: int
    """Scratch of the forward: one chunk of logits and the running statistics."""
    kept: int
    """What the forward keeps for backward (policy pass only) and its outputs."""
    backward: int
    """Scratch of the backward: the chunk of logits again and the hidden states' fp32 gradient."""
    head_gradient: int
    """A trainable head's gradient (full fine-tuning), left in ``.grad``."""
    head_gradient_scratch: int
    """Its fp32 accumulator, freed when the backward ends."""


def fused_head(
    scored: int,
    *,
    hidden: int,
    vocab: int,
    compute: str,
    weight: str,
    outputs: float,
    autocast_casts: bool,
    trainable_head: bool,
) -> FusedHead:
    """TRL 1.16's fused head scoring ``scored`` tokens (trl/kernels/chunked_logprob.py, Triton path).

    ``outputs``: fp32 values per scored token it returns (log-probs, entropy...). ``autocast_casts``:
    fp32 weights under autocast, so each chunk of the hidden states and of the head is cast first.
    """
    c, w = nbytes(compute), nbytes(weight)
    rows = min(scored, FUSED_HEAD_ROWS)
    chunk = rows * FUSED_HEAD_COLUMNS * c
    casts = (rows * hidden + min(vocab, FUSED_HEAD_COLUMNS) * hidden) * c if autocast_casts else 0
    forward = chunk + FUSED_HEAD_STATS * scored * 4 + casts
    # The gathered hidden states (compute dtype), int64 labels, log-normaliser and the outputs.
    kept = int(scored * (hidden * c + 8 + 4 + 4 * outputs))
    backward = chunk + scored * hidden * (4 + c) + casts
    grad = vocab * hidden * w if trainable_head else 0
    return FusedHead(forward, kept, backward, grad, vocab * hidden * 4 if trainable_head else 0)


def kv_cache_bytes(rows: int, tokens: int, *, layers: int, kv_dim: int, compute: str) -> int:
    """transformers' ``DynamicCache`` after ``tokens`` positions: keys and values of every layer."""
    return rows * tokens * layers * 2 * kv_dim * nbytes(compute)


__all__ = [
    "CAUSAL_OBJECTIVES",
    "CLASSIFIER_HEADS",
    "FUSED_HEAD_OBJECTIVES",
    "FusedHead",
    "ObjectiveStep",
    "check_objective",
    "for_objective",
    "fused_head",
    "head_kind",
    "kv_cache_bytes",
    "objective_step",
    "reward_model_config",
    "trl_beta",
]
