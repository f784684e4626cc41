"""The phases a training objective adds to the step: TRL's fused head, reference passes, generation.

:func:`objective_phases` takes the candidates the plain step gives (one component breakdown per
phase, :func:`peftaudit.memory.analytic.estimate.estimate`) and the walks of the policy's step and
of a no-grad pass of the same model, and returns them with what the objective adds
(:mod:`peftaudit.memory.objectives` says what each objective runs):

* the fused log-prob head's scratch at the end of the forward and the start of the backward, and
  what it keeps between them (``logits_and_loss``);
* a ``reference forward`` phase: the reference model's no-grad pass over the same rows, on top of
  the policy's kept activations (DPO, KTO), or before the training forward (GRPO with beta > 0);
  a reference copy of the model (``reference_weights``) in every phase;
* GRPO's ``generation`` phase: the KV cache of every completion generated at once and the
  largest of the prefill's pass and the last decoding step's scratch.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from peftaudit.memory.analytic.shape import ModelShape
from peftaudit.memory.analytic.step import StepProfile, walk
from peftaudit.memory.analytic.tape import CATEGORIES
from peftaudit.memory.dtypes import nbytes
from peftaudit.memory.objectives import ObjectiveStep, fused_head, kv_cache_bytes
from peftaudit.memory.plan import TrainingPlan

Components = dict[str, float]

#: fp32 values per scored token each fused-head pass returns (TRL 1.16 ``add_fused_lm_head(outputs=...)``):
#: DPO and KTO ask for log-probs, entropy, mean logits (fp32) and is-top-1 (bool); GRPO for two.
_FUSED_OUTPUTS = {"dpo": 3.25, "kto": 3.25, "grpo": 2.0}


@dataclass(frozen=True)
class OutputHead:
    """The model's output head as the fused head reads it."""

    vocab: int
    trainable: bool
    """Full fine-tuning trains the head: the fused backward builds its gradient in fp32 first."""
    fp32_under_autocast: bool
    """fp32 weights under autocast (``bf16-mixed``): each chunk of hidden states and head is cast."""


def objective_phases(
    candidates: dict[str, Components],
    *,
    static: Components,
    idle: Components,
    plan: TrainingPlan,
    step: ObjectiveStep,
    forward_end: tuple[float, ...],
    inference: StepProfile,
    seq: int,
    shape: ModelShape,
    head: OutputHead,
    reference_weights: float,
    gradient_fraction: float,
) -> dict[str, Components]:
    """``candidates`` (phase -> components) with the objective's passes added; the input is not changed.

    ``static``: the static memory alive through forward and backward; ``idle``: the same where the
    step begins, before any gradient exists (GRPO's generation and reference scoring run there).
    ``forward_end``: per category of :data:`~peftaudit.memory.analytic.tape.CATEGORIES`, what the
    policy's forward keeps (:attr:`~peftaudit.memory.analytic.step.Walk.forward_end`); ``inference``:
    the same model's step recorded without gradients (the reference's and generation's passes);
    ``gradient_fraction``: the share of a parameter gradient backward adds on this GPU (0 where
    accumulation holds them already or a layer-wise optimizer frees them at once).
    """
    out = {phase: dict(comp) for phase, comp in candidates.items()}
    static = {**static, "reference_weights": reference_weights}
    idle = {**idle, "reference_weights": reference_weights}
    for comp in out.values():
        comp["reference_weights"] = reference_weights
    kept_by_forward = dict(zip(CATEGORIES, forward_end, strict=True))
    compute = plan.compute_dtype
    if step.fused:
        scoring = functools.partial(
            fused_head,
            hidden=shape.hidden,
            vocab=head.vocab,
            compute=compute,
            weight=plan.weight_dtype,
            outputs=_FUSED_OUTPUTS[step.objective],
            autocast_casts=head.fp32_under_autocast,
        )
        policy = scoring(step.rows * step.scored_per_row, trainable_head=head.trainable)
        at_head = _plus(static, kept_by_forward)
        _add(at_head, "logits_and_loss", policy.kept)
        # The end of the forward: the head's scratch on top of everything the policy keeps.
        head_forward = dict(at_head)
        _add(head_forward, "logits_and_loss", policy.forward)
        out["forward"] = _higher(out["forward"], head_forward)
        # The start of the backward: the head's backward scratch and a trained head's gradient.
        head_backward = dict(at_head)
        _add(head_backward, "logits_and_loss", policy.backward)
        _add(head_backward, "temporaries", policy.head_gradient_scratch)
        _add(head_backward, "gradients", policy.head_gradient * gradient_fraction)
        _add(out["backward"], "gradients", policy.head_gradient * gradient_fraction)  # it stays in .grad
        out["backward"] = _higher(out["backward"], head_backward)
        if step.reference_rows:
            ref_head = scoring(step.reference_rows * step.scored_per_row, trainable_head=False)
            # DPO, KTO: while the policy's activations wait for backward; GRPO scores the reference
            # after generation, before the training forward.
            base = idle if step.objective == "grpo" else at_head
            # The reference's layers, then its head: under no_grad the head's gathered hidden states and
            # outputs live only through the pass, beside the last hidden states it reads.
            passes = walk(inference, step.reference_rows, seq, backward=False).phases["forward"][1]
            layers = _plus(base, dict(zip(CATEGORIES, passes, strict=True)))
            head_pass = dict(base)
            _add(head_pass, "activations", step.reference_rows * seq * shape.hidden * nbytes(compute))
            _add(head_pass, "logits_and_loss", ref_head.forward + ref_head.kept)
            out["reference forward"] = _higher(layers, head_pass)
    if step.generation_rows:
        out["generation"] = _generation(idle, plan, step, inference, shape, head)
    return out


def _generation(
    idle: Components,
    plan: TrainingPlan,
    step: ObjectiveStep,
    inference: StepProfile,
    shape: ModelShape,
    head: OutputHead,
) -> Components:
    """GRPO's ``model.generate`` over every completion of one optimizer step (transformers' ``_sample``).

    The prefill runs the prompts through the model (the no-grad pass) and fills the cache; each
    decoding step then appends one token to every layer's keys and values (``torch.cat``: the
    growing layer exists twice for a moment) and samples from the last position's logits (their fp32
    copy and softmax). No gradients are alive: the step begins with ``zero_grad``.
    """
    rows, compute = step.generation_rows, plan.compute_dtype
    kv_dim = shape.kv_heads * shape.head_dim
    base = idle
    prefill_pass = walk(inference, rows, step.prompt, backward=False).phases["forward"][1]
    prefill = _plus(base, dict(zip(CATEGORIES, prefill_pass, strict=True)))
    prefill["kv_cache"] = kv_cache_bytes(rows, step.prompt, layers=shape.layers, kv_dim=kv_dim, compute=compute)
    cached = step.prompt + step.completion - 1
    decode = dict(base)
    decode["kv_cache"] = kv_cache_bytes(rows, cached, layers=shape.layers, kv_dim=kv_dim, compute=compute)
    one_layer = rows * cached * kv_dim * nbytes(compute)
    _add(decode, "temporaries", one_layer)
    _add(decode, "logits_and_loss", rows * head.vocab * (nbytes(compute) + 4 + 4))
    return _higher(prefill, decode)


def _add(comp: Components, name: str, value: float) -> None:
    comp[name] = comp.get(name, 0.0) + value


def _plus(a: Components, b: Components) -> Components:
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, 0.0) + v
    return out


def _higher(a: Components, b: Components) -> Components:
    return b if sum(b.values()) > sum(a.values()) else a


__all__ = ["OutputHead", "objective_phases"]
