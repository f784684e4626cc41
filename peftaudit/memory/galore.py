"""GaLore: full-parameter training whose Adam states live in a low-rank projection.

What transformers 5.25 builds for ``optim="galore_adamw"`` and ``"galore_adamw_layerwise"``
(``trainer_optimizer.py:_get_galore_optimizer`` and ``_setup_low_rank_optimizer``) with
galore-torch 1.0's ``GaLoreAdamW``:

* every parameter trains (it is full fine-tuning; a quantized base cannot train);
* the weights of the ``nn.Linear`` modules ``optim_target_modules`` selects (:func:`galore_targets`) form
  one parameter group with ``rank``, ``update_proj_gap``, ``scale`` and ``proj_type``; every other
  parameter is in a plain group. Their state sizes are :mod:`peftaudit.memory.optimizers`'
  ``galore_adamw`` (paper: Zhao et al. 2024, arXiv:2403.03507, Table 1);
* the layer-wise variant makes one optimizer per parameter and steps it in a
  ``register_post_accumulate_grad_hook`` that then ``zero_grad()``\\ s it, so a gradient lives only
  until its parameter's step: :func:`without_gradients` takes the gradients out of the recorded
  backward pass and the estimate adds the one in flight. It refuses gradient accumulation
  (``trainer_optimizer.py:164-165``) and distributed training (``:116-117``).
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

import numpy as np

from peftaudit.inventory import Inventory
from peftaudit.memory.analytic.step import Segment, StepProfile
from peftaudit.memory.analytic.tape import GRAD, TEMP, CompiledEvents
from peftaudit.memory.methods import Adaptation
from peftaudit.memory.plan import GALORE_METHOD_NAMES, PlanError, TrainingPlan

#: The optimizer GaLore brings (:func:`peftaudit.memory.optimizers.optimizer_memory`'s name for it).
GALORE_OPTIMIZER = "galore_adamw"
_QUANTIZED = ("nf4", "fp4", "int8", "fp8")


def _all_linear(targets: str | tuple[str, ...]) -> bool:
    # transformers' own spelling rule (_setup_low_rank_optimizer), not peft's matching.is_all_linear.
    return isinstance(targets, str) and targets.replace("_", "-") == "all-linear"


def target_matches(targets: str | tuple[str, ...], name: str) -> bool:
    """transformers' ``check_target_module_exists`` (``trainer_utils.py:1018``): a string is a regular
    expression over the whole module path; a list matches a name in it, a path containing one of its
    entries, or an entry that fullmatches the path as a regular expression."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return name in targets or any(t in name for t in targets) or any(re.fullmatch(t, name) is not None for t in targets)


def galore_targets(inventory: Inventory, plan: TrainingPlan) -> tuple[str, ...]:
    """Names of the parameters GaLore projects, as ``_setup_low_rank_optimizer`` picks them.

    Only ``nn.Linear`` modules count (transformers' Conv1D, GPT-2's attention and MLP, is skipped with a
    warning); ``"all-linear"`` takes every one of them, the output head included. A module's
    ``.weight`` is then looked up in ``named_parameters()``, which names a tied tensor once: a head tied
    to the input embedding is trained as a plain parameter. Raises :class:`PlanError` where no
    ``nn.Linear`` module matches, as transformers raises ``ValueError`` there.
    """
    targets = plan.galore_targets
    every = _all_linear(targets)
    picked = [
        m.path + ".weight"
        for m in inventory.modules
        if m.path and m.is_linear and m.type != "Conv1D" and (every or target_matches(targets, m.path))
    ]
    if not picked:
        shown = targets if isinstance(targets, str) else list(targets)
        conv = any(m.type == "Conv1D" for m in inventory.modules)
        why = " (its Conv1D layers are not nn.Linear, which GaLore needs)" if conv else ""
        raise PlanError(f"GaLore targets {shown!r} match no nn.Linear module of this {inventory.architecture}{why}")
    names = {p.name for p in inventory.parameters}
    return tuple(n for n in picked if n in names)


class GaloreMethod:
    """GaLore with one optimizer for every parameter (``optim="galore_adamw"``)."""

    name = "galore"
    description = "GaLore: full training with Adam states in a low-rank gradient projection (galore_adamw)"
    layerwise = False
    quantization: str | None = None

    def adapt(self, inventory: Inventory, plan: TrainingPlan) -> Adaptation:
        if plan.base_dtype in _QUANTIZED or inventory.quantization_config:
            raise PlanError("GaLore trains every weight; a quantized base cannot train")
        if plan.optimizer not in ("adamw", "none"):
            raise PlanError(
                f"GaLore is modelled with galore_adamw (transformers' optim=galore_adamw); --optimizer "
                f"{plan.optimizer} with GaLore (galore_adamw_8bit, galore_adafactor) is not modelled"
            )
        if plan.sharding not in ("none", "ddp"):
            raise PlanError(f"GaLore projects whole weight matrices: {plan.sharding} sharding is not modelled with it")
        if self.layerwise:
            # transformers refuses both (trainer_optimizer.py:116-117 and 164-165).
            if plan.gradient_accumulation > 1:
                raise PlanError("layer-wise GaLore does not support gradient accumulation (transformers refuses it)")
            if plan.gpus > 1:
                raise PlanError("layer-wise GaLore does not support DDP (transformers refuses it): use --gpus 1")
        return Adaptation(
            self.name,
            trainable=frozenset(p.name for p in inventory.parameters),
            optimizer=GALORE_OPTIMIZER,
            low_rank=frozenset(galore_targets(inventory, plan)),
            layerwise=self.layerwise,
        )

    def quantization_for(self, plan: TrainingPlan) -> str | None:
        """GaLore stores no weight quantized (a quantized base is refused)."""
        return None


class GaloreLayerwiseMethod(GaloreMethod):
    """GaLore stepped parameter by parameter during backward (``optim="galore_adamw_layerwise"``)."""

    name = "galore-layerwise"
    description = "layer-wise GaLore: each weight steps and frees its gradient during backward"
    layerwise = True


GALORE_METHODS: tuple[GaloreMethod, ...] = (GaloreMethod(), GaloreLayerwiseMethod())


def without_gradients(
    profile: StepProfile, steps: tuple[tuple[int, int], ...], tied: tuple[int, ...] = ()
) -> StepProfile:
    """``profile`` under a layer-wise optimizer: each parameter gradient the backward pass makes is
    stepped and freed by its hook right away, so it becomes a transient of its bytes plus its step's
    scratch (``steps``: per gradient size, the largest scratch, :func:`~peftaudit.memory.optimizers.
    galore_in_flight`; a size not there takes the largest). A tied weight (``tied``: gradient bytes of each)
    is the exception: its first gradient part, from the output head, stays until the input embedding's
    backward adds the second; its step runs then. Segments shared by several layers stay shared (the
    walk composes runs of identical ones)."""
    scratch = dict(steps)
    largest = max(scratch.values(), default=0)
    done: dict[int, Segment] = {}

    def strip(seg: Segment, keep: tuple[int, ...] = (), release: tuple[int, ...] = ()) -> Segment:
        if id(seg) in done:
            return done[id(seg)]
        running = seg.backward.running
        deltas = np.diff(running, axis=0, prepend=np.zeros((1, *running.shape[1:])))
        rows: list[np.ndarray] = []
        kept = list(keep)
        for row in deltas:
            grad = row[GRAD].copy()
            if grad[2] <= 0 or grad[:2].any() or grad[3:].any():
                rows.append(row)
                continue
            size = round(grad[2])
            if size in kept:  # a tied weight's first part: it waits for the second
                kept.remove(size)
                rows.append(row)
                continue
            # A parameter's gradient: it and its step's scratch, then both gone.
            step = scratch.get(size, largest)
            alloc = row.copy()
            alloc[TEMP, 2] += step
            free = np.zeros_like(row)
            free[GRAD] = -grad
            free[TEMP, 2] = -step
            rows += [alloc, free]
        for size in release:  # the tied weights' hooks, once the embedding's part is added
            alloc = np.zeros_like(deltas[0])
            alloc[TEMP, 2] = scratch.get(size, largest)
            free = np.zeros_like(alloc)
            free[TEMP, 2] = -alloc[TEMP, 2]
            free[GRAD, 2] = -size
            rows += [alloc, free]
        done[id(seg)] = replace(seg, backward=CompiledEvents.of(np.array(rows) if rows else deltas))
        return done[id(seg)]

    head = strip(profile.head, keep=tied)
    layers = tuple(strip(s) for s in profile.layers)
    return StepProfile(strip(profile.embed, release=tied), layers, head)


def activations_twin(plan: TrainingPlan, fields: dict[str, Any]) -> tuple[TrainingPlan, dict[str, Any]]:
    """The plan whose traced step gives GaLore's activations: full fine-tuning (the same weights train;
    the optimizer is not in the derived profile), so GaLore plans share its stored profile and the
    layer-wise hooks do not run inside the traced backward. Other plans come back unchanged."""
    if plan.method not in GALORE_METHOD_NAMES:
        return plan, fields
    base = TrainingPlan()
    twin = replace(
        plan,
        method="full",
        galore_rank=base.galore_rank,
        galore_targets=base.galore_targets,
        galore_proj=base.galore_proj,
    )
    # The galore fields do not key a derived profile (estimate._NOT_IN_PROFILE): only the method changes.
    return twin, {**fields, "method": "full"}
