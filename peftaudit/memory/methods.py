"""Fine-tuning methods as plugins: what trains, what is added, how the base is stored.

A method turns an :class:`~peftaudit.inventory.Inventory` and a
:class:`~peftaudit.memory.plan.TrainingPlan` into an :class:`Adaptation`. The
built-in methods are registered by :mod:`peftaudit.builtin.methods` through the
``peftaudit_register_methods`` hook, the same way a third-party plugin adds one::

    import peftaudit
    from peftaudit.memory.methods import Adaptation, LoraMethod

    class LoftQ(LoraMethod):
        name = "loftq"
        description = "LoRA on a 4-bit base initialised with LoftQ"
        quantization = "nf4"

    @peftaudit.hookimpl
    def peftaudit_register_methods(register):
        register(LoftQ())
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from peftaudit.inventory import Inventory
from peftaudit.memory.plan import PlanError, TrainingPlan
from peftaudit.memory.targets import (
    ModuleAdapter,
    SavedModule,
    buffers_bytes,
    ia3_adapters,
    lora_adapters,
    saved_modules,
)


@dataclass(frozen=True)
class Adaptation:
    """What one method does to one model: the input of the memory estimate."""

    method: str
    adapters: tuple[ModuleAdapter, ...] = ()
    """New adapter modules (LoRA, DoRA, IA3), with their exact shapes."""
    trainable: frozenset[str] = frozenset()
    """Names of base-model parameters that train in place (full, freeze, biases)."""
    saved: tuple[SavedModule, ...] = ()
    """``modules_to_save``: trained copies of whole modules."""
    quantization: str | None = None
    """How frozen linear weights are stored: ``None`` (as the plan's dtype), ``nf4``,
    ``fp4``, ``int8`` or ``fp8``."""
    virtual_tokens: int = 0
    """Prompt tuning, p-tuning: tokens prepended to each sequence."""
    prompt_params: int = 0
    """Parameters of the prompt (prompt tuning's embeddings, a prompt encoder's tensors)."""
    prompt_tensors: tuple[tuple[int, ...], ...] = ()
    """A prompt encoder's trainable tensors (prefix tuning, p-tuning; :mod:`peftaudit.memory.prompts`),
    each its own optimizer tensor, summing to ``prompt_params``; empty: one tensor of ``prompt_params``."""
    prefix_tokens: int = 0
    """Prefix tuning: keys and values prepended in every attention layer (the sequence is not longer)."""
    shared_buffers: tuple[tuple[tuple[int, ...], str], ...] = ()
    """Buffers the method adds once per model, as ``(shape, dtype)``: VeRA's shared random
    projections ``vera_A`` and ``vera_B`` (per-module buffers are on each :class:`ModuleAdapter`)."""
    optimizer: str | None = None
    """An optimizer the method brings in place of the plan's (GaLore's ``galore_adamw``,
    :mod:`peftaudit.memory.galore`); ``None``: the plan's."""
    low_rank: frozenset[str] = frozenset()
    """GaLore: trainable weights whose optimizer states live in a rank-``galore_rank`` projection."""
    layerwise: bool = False
    """The optimizer steps each parameter as soon as its gradient is complete and frees that gradient
    (transformers' ``*_layerwise`` optimizers): the gradients never all exist at once."""

    @property
    def adapter_params(self) -> int:
        """Parameters the method adds (adapters, trained copies, prompt embeddings)."""
        return sum(a.params for a in self.adapters) + sum(s.params for s in self.saved) + self.prompt_params

    @property
    def prompt_shapes(self) -> tuple[tuple[int, ...], ...]:
        """The prompt's trainable tensors: :attr:`prompt_tensors`, or one tensor of :attr:`prompt_params`."""
        if self.prompt_tensors or not self.prompt_params:
            return self.prompt_tensors
        return ((self.prompt_params,),)

    @property
    def buffer_bytes(self) -> int:
        """Bytes of the buffers the method adds (:attr:`shared_buffers` and each adapter's)."""
        return sum(a.buffer_bytes for a in self.adapters) + buffers_bytes(self.shared_buffers)


@runtime_checkable
class Method(Protocol):
    """A fine-tuning method: a name, a one-line description and ``adapt``."""

    name: str
    description: str

    def adapt(self, inventory: Inventory, plan: TrainingPlan) -> Adaptation: ...


class FullMethod:
    """Every parameter trains."""

    name = "full"
    description = "full fine-tuning: every parameter trains"

    def adapt(self, inventory: Inventory, plan: TrainingPlan) -> Adaptation:
        return Adaptation(self.name, trainable=frozenset(p.name for p in inventory.parameters))


class FreezeMethod:
    """Train some parameters, freeze the rest (LLaMA-Factory's ``freeze`` tuning)."""

    name = "freeze"
    description = "freeze tuning: only the last layers (or chosen parameters) train"

    def adapt(self, inventory: Inventory, plan: TrainingPlan) -> Adaptation:
        if plan.trainable:
            patterns = [re.compile(p) for p in plan.trainable]
            names = frozenset(p.name for p in inventory.parameters if any(r.search(p.name) for r in patterns))
            if not names:
                raise PlanError(f"trainable patterns {list(plan.trainable)} match no parameter")
        else:
            layers = sorted({p.layer for p in inventory.parameters if p.layer is not None})
            if not layers:
                raise PlanError("freeze tuning needs numbered layers; give trainable parameter patterns")
            if plan.trainable_layers == 0:
                raise PlanError("freeze tuning with 0 trainable layers trains nothing")
            last = set(layers[-plan.trainable_layers :])
            names = frozenset(p.name for p in inventory.parameters if p.layer in last)
        return Adaptation(self.name, trainable=names)


class LoraMethod:
    """LoRA adapters on a frozen base (stored as the plan's dtype or quantized)."""

    name = "lora"
    description = "LoRA: low-rank adapters on a frozen 16-bit base"
    kind = "lora"
    quantization: str | None = None

    def adapt(self, inventory: Inventory, plan: TrainingPlan) -> Adaptation:
        quant = self.quantization_for(plan)
        if quant is not None and not any(m.is_linear for m in inventory.modules):
            raise PlanError(f"{self.name} quantizes linear layers, and this {inventory.architecture} has none")
        adapters = lora_adapters(inventory, plan, kind=self.kind)
        from peftaudit.memory.trainable_tokens import token_rows  # it imports this module's Adaptation

        # trainable_token_indices: embedding rows trained next to the adapters (a delta tensor).
        tokens = token_rows(inventory, plan)
        return Adaptation(
            self.name,
            adapters=adapters,
            trainable=_lora_biases(inventory, plan, adapters),
            saved=saved_modules(inventory, plan),
            quantization=quant,
            prompt_params=sum(rows * dim for rows, dim in tokens),
            prompt_tensors=tokens,
        )

    def quantization_for(self, plan: TrainingPlan) -> str | None:
        """How this method stores the frozen linear weights under ``plan``: ``nf4``, ``fp4``, ``int8``,
        ``fp8``, or ``None`` (the plan's dtype)."""
        if plan.base_dtype in ("nf4", "fp4", "int8", "fp8"):
            return plan.base_dtype
        if self.quantization == "4bit":
            return plan.quant_type
        return self.quantization


class QloraMethod(LoraMethod):
    name = "qlora"
    description = "QLoRA: LoRA on a 4-bit (NF4/FP4) bitsandbytes base"
    quantization = "4bit"


class Lora8bitMethod(LoraMethod):
    name = "lora-8bit"
    description = "LoRA on an 8-bit (LLM.int8) bitsandbytes base"
    quantization = "int8"


class DoraMethod(LoraMethod):
    name = "dora"
    description = "DoRA: weight-decomposed LoRA (magnitude vector plus low-rank direction)"
    kind = "dora"


class Ia3Method:
    name = "ia3"
    description = "IA3: learned scaling vectors on keys, values and the feed-forward input"

    def adapt(self, inventory: Inventory, plan: TrainingPlan) -> Adaptation:
        return Adaptation(self.name, adapters=ia3_adapters(inventory, plan), saved=saved_modules(inventory, plan))


class PromptTuningMethod:
    name = "prompt-tuning"
    description = "prompt tuning: trained virtual-token embeddings prepended to every sequence"

    def adapt(self, inventory: Inventory, plan: TrainingPlan) -> Adaptation:
        hidden = inventory.dims.hidden_size
        if not hidden:
            raise PlanError("prompt tuning needs the model's hidden size, which its config does not give")
        return Adaptation(
            self.name,
            virtual_tokens=plan.num_virtual_tokens,
            prompt_params=plan.num_virtual_tokens * hidden,
        )


def base_quantization(plan: TrainingPlan) -> str | None:
    """How ``plan``'s method stores frozen linear weights (``nf4``, ``fp4``, ``int8``, ``fp8``), or ``None``
    where they keep the plan's dtype. Read from the registered method (a plugin's LoRA variant included);
    a checkpoint's own ``quantization_config`` aside, which the estimate's ``base_storage`` describes.
    """
    from peftaudit.plugins import memory_methods

    quantization_for = getattr(memory_methods().get(plan.method), "quantization_for", None)
    return quantization_for(plan) if callable(quantization_for) else None


def _lora_biases(inventory: Inventory, plan: TrainingPlan, adapters: tuple[ModuleAdapter, ...]) -> frozenset[str]:
    if plan.lora_bias == "none":
        return frozenset()
    head = inventory.output_head
    if plan.lora_bias == "all":
        return frozenset(p.name for p in inventory.parameters if p.is_bias and p.module != head)
    adapted = {a.path for a in adapters}
    return frozenset(p.name for p in inventory.parameters if p.is_bias and p.module in adapted)


BUILTIN_METHODS: tuple[Method, ...] = (
    FullMethod(),
    FreezeMethod(),
    LoraMethod(),
    QloraMethod(),
    Lora8bitMethod(),
    DoraMethod(),
    Ia3Method(),
    PromptTuningMethod(),
)
