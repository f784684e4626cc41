"""The model as a layer program sees it: linear specs and weights by role.

:class:`Layout` is what a program (:mod:`peftaudit.memory.analytic.programs`)
asks; :class:`ModelLayout` answers it from an
:class:`~peftaudit.inventory.Inventory`, the plan and the method's
:class:`~peftaudit.memory.methods.Adaptation`: which linear layer plays which
role in layer ``i``, whether its weight trains, how it is stored, and which
adapter sits on it. :class:`SyntheticLayout` answers for a Llama-shaped
stand-in layer where no program reads the real ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from peftaudit.inventory import Inventory, ModuleRecord, ParameterRecord
from peftaudit.memory import keep_fp32
from peftaudit.memory.analytic.linear import PROGRAMMED_KINDS, LinearSpec
from peftaudit.memory.analytic.shape import ModelShape
from peftaudit.memory.dtypes import QUANTIZED_KINDS
from peftaudit.memory.methods import Adaptation
from peftaudit.memory.plan import PlanError, PlanWarning, TrainingPlan
from peftaudit.memory.prompts import prompt_dtype
from peftaudit.memory.quantized import CheckpointQuantization, WeightFormat
from peftaudit.memory.targets import ModuleAdapter

_LLAMA_LIKE_MLP = {"mlp.gate", "mlp.up", "mlp.down"}

# Local parameter names (relative to the layer) for the weights programs ask for by role.
_WEIGHT_NAMES: dict[str, tuple[str, ...]] = {
    "input_norm": ("input_layernorm.weight", "ln_1.weight", "attention_norm.weight"),
    "post_norm": ("post_attention_layernorm.weight", "ln_2.weight", "ffn_norm.weight"),
    "q_norm": ("self_attn.q_norm.weight",),
    "k_norm": ("self_attn.k_norm.weight",),
    "ln_1": ("ln_1.weight",),
    "ln_1.bias": ("ln_1.bias",),
    "ln_2": ("ln_2.weight",),
    "ln_2.bias": ("ln_2.bias",),
    "attention_norm": ("attention.output.LayerNorm.weight",),
    "attention_norm.bias": ("attention.output.LayerNorm.bias",),
    "output_norm": ("output.LayerNorm.weight",),
    "output_norm.bias": ("output.LayerNorm.bias",),
}
_GLOBAL_NAMES: dict[str, tuple[str, ...]] = {
    "final_norm": (
        "model.norm.weight",
        "transformer.ln_f.weight",
        "cls.predictions.transform.LayerNorm.weight",
        "lm_head.layer_norm.weight",
    ),
    "final_norm.bias": ("transformer.ln_f.bias", "cls.predictions.transform.LayerNorm.bias", "lm_head.layer_norm.bias"),
    "position": ("transformer.wpe.weight", "embeddings.position_embeddings.weight"),
    "token_type": ("embeddings.token_type_embeddings.weight",),
    "embed_norm": ("embeddings.LayerNorm.weight",),
    "embed_norm.bias": ("embeddings.LayerNorm.bias",),
}


class NoLayerProgram(PlanError):
    """The program asked for a layer this model does not have: it does not read this model's layers.

    Raised while a step is recorded (a missing ``q_proj``, a fused ``qkv_proj``,
    experts in another layout); the estimate then derives the step from a trace
    instead (:mod:`peftaudit.memory.derived`).
    """


@dataclass(frozen=True)
class Weight:
    """A non-linear-layer weight (norm, embedding table): element count, dtype, trains or not."""

    numel: int
    dtype: str
    trainable: bool


class Layout:
    """Answers a program's questions about one model under one method (see ``estimate``)."""

    def linear(self, layer: int | None, role: str) -> LinearSpec | None:  # pragma: no cover - interface
        raise NotImplementedError

    def weight(self, layer: int | None, role: str) -> Weight:  # pragma: no cover - interface
        raise NotImplementedError

    def activation_dtype(self) -> str:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass
class ModelLayout(Layout):
    """One model under one plan and method."""

    inventory: Inventory
    plan: TrainingPlan
    adaptation: Adaptation
    shape: ModelShape
    block: str
    warnings: list[PlanWarning] = field(default_factory=list)
    checkpoint: CheckpointQuantization | None = None
    """The checkpoint's own quantization when frozen weights follow it (:mod:`peftaudit.memory.quantized`)."""
    _modules: dict[str, ModuleRecord] = field(default_factory=dict)
    _params: dict[str, ParameterRecord] = field(default_factory=dict)
    _roles: dict[tuple[int | None, str], str] = field(default_factory=dict)
    _adapters: dict[str, ModuleAdapter] = field(default_factory=dict)
    _saved: set[str] = field(default_factory=set)
    _quantizable: set[str] = field(default_factory=set)
    _formats: dict[str, WeightFormat] = field(default_factory=dict)

    def __post_init__(self) -> None:
        inv = self.inventory
        self._modules = {m.path: m for m in inv.modules if m.path}
        for p in inv.parameters:
            for name in (p.name, *p.tied_with):
                self._params[name] = p
        for a in self.adaptation.adapters:
            if a.parameter is None:
                self._adapters[a.path] = a
        self._saved = {s.path for s in self.adaptation.saved}
        head = inv.output_head
        self._head = head
        if self.checkpoint is not None:
            # A pre-quantized checkpoint: the modules its quantization_config converts.
            self._formats = self.checkpoint.formats(inv)
            self._quantizable = set(self._formats)
        else:
            # Plan-driven quantization (QLoRA): what bitsandbytes converts by default. transformers'
            # replace_with_bnb_linear takes `type(module) is nn.Linear` or Conv1D: subclasses of
            # nn.Linear (Falcon's FalconLinear) stay in the model's dtype, and so do the modules the
            # model keeps in float32 (T5's `wo`).
            # transformers' get_keys_to_not_convert also keeps the module of the model's last parameter (a
            # classifier's score head, which has no output embeddings).
            last = inv.parameters[-1].module if inv.parameters else None
            for m in inv.modules:
                bnb_converts = m.type in ("Linear", "Conv1D") and not keep_fp32.never_quantized(inv, m.path)
                kept = m.path in (head, last) or self._is_tied(m.path)
                if bnb_converts and m.is_linear and m.path and not kept:
                    self._quantizable.add(m.path)
        for m in inv.modules:
            if not m.path or m.layer is None or not m.path.startswith(self.block + "."):
                continue
            if m.is_linear and m.role is not None:  # the architecture rules' role is the program's
                self._roles.setdefault((m.layer, str(m.role)), m.path)
        if head is not None:
            self._roles[(None, "output_head")] = head
        for name in ("cls.predictions.transform.dense", "lm_head.dense"):  # BERT, RoBERTa MLM heads
            transform = self._modules.get(name)
            if transform is not None:
                self._roles[(None, "head_transform")] = transform.path

    # --- Layout interface ------------------------------------------------------------------------
    def activation_dtype(self) -> str:
        return self._dense_dtype(trainable=False)

    def linear(self, layer: int | None, role: str) -> LinearSpec | None:
        path = self._roles.get((layer, role))
        return None if path is None else self.spec_for(path)

    def spec_for(self, path: str) -> LinearSpec:
        """The spec of the linear module at ``path`` under this plan and method."""
        m = self._modules[path]
        weight = self._params.get(path + ".weight")
        bias = self._params.get(path + ".bias")
        trainable = path in self._saved or (weight is not None and weight.name in self.adaptation.trainable)
        quant = self.adaptation.quantization if (path in self._quantizable and not trainable) else None
        if quant is not None and path in self._formats:
            quant = self._formats[path].kind
        if quant is not None:
            dtype = self._dense_dtype(False, quantized_model=True)
        else:
            dtype = self._dense_dtype(trainable) if weight is None else self.param_dtype(weight, trainable)
        return LinearSpec(
            in_features=m.in_features or 0,
            out_features=m.out_features or 0,
            bias=bias is not None,
            weight="dense" if quant is None else quant,
            dtype=dtype,
            trainable=trainable,
            bias_trainable=bias is not None and (bias.name in self.adaptation.trainable or path in self._saved),
            adapter=None if path in self._saved else self._adapters.get(path),
        )

    def weight(self, layer: int | None, role: str) -> Weight:
        if role == "embed":
            encoder = self.adaptation.prefix_tokens or self.adaptation.prompt_tensors
            if encoder and not isinstance(self, SyntheticLayout):
                # Every program starts at the embedding: no program models a prefix's keys and values in
                # each attention layer or a p-tuning encoder, so the step is derived from a trace (the
                # Llama-shaped stand-in, with its warning, only where no trace runs).
                raise NoLayerProgram(
                    f"the layer programs do not model {self.adaptation.method}'s prompt encoder"
                    " (its step is derived from a trace)"
                )
            unmodelled = sorted({a.kind for a in self.adaptation.adapters if a.kind not in PROGRAMMED_KINDS})
            if unmodelled:
                # peft's other module adapters (memory/adapters.py), wherever they sit (embeddings and heads
                # too, which no program passes through linear()): the step is derived from a trace.
                raise NoLayerProgram(f"the layer programs do not model {', '.join(unmodelled)} adapters")
            p = next((q for q in self.inventory.parameters if q.kind == "embedding"), None) or next(
                (q for q in self.inventory.parameters if q.kind == "output_head"), None
            )
            return self._weight_of(p)
        if role == "prompt":
            # peft keeps prompt embeddings in float32 (prompts.prompt_dtype): their gradient is float32 too.
            return Weight(self.adaptation.prompt_params, prompt_dtype(self.plan), True)
        if layer is None:
            names = _GLOBAL_NAMES.get(role, ())
            p = next((self._find_suffix(n) for n in names if self._find_suffix(n) is not None), None)
            return self._weight_of(p)
        for local in _WEIGHT_NAMES.get(role, ()):
            p = self._params.get(f"{self.block}.{layer}.{local}")
            if p is not None:
                return self._weight_of(p)
        return self._weight_of(None)

    # --- helpers -------------------------------------------------------------------------------------
    def _find_suffix(self, name: str) -> ParameterRecord | None:
        if name in self._params:
            return self._params[name]
        for key, p in self._params.items():
            if key.endswith("." + name) or key == name:
                return p
        return None

    def _is_tied(self, path: str) -> bool:
        p = self._params.get(path + ".weight")
        return p is not None and bool(p.tied_with)

    def _weight_of(self, p: ParameterRecord | None) -> Weight:
        if p is None:
            return Weight(self.shape.hidden, self._dense_dtype(False), False)
        trainable = p.name in self.adaptation.trainable or any(
            p.module == s or p.module.startswith(s + ".") for s in self._saved
        )
        return Weight(p.numel, self.param_dtype(p, trainable), trainable)

    def param_dtype(self, p: ParameterRecord, trainable: bool) -> str:
        """The dtype an unquantized parameter is stored in: the plan's, or float32 where a half-precision
        load keeps it so (:mod:`peftaudit.memory.keep_fp32`)."""
        return keep_fp32.dtype_of(self.inventory, p.name, self._dense_dtype(trainable))

    def _dense_dtype(self, trainable: bool, quantized_model: bool = False) -> str:
        plan = self.plan
        if self.adaptation.quantization in QUANTIZED_KINDS and plan.kbit_upcast and not quantized_model:
            return "fp32"
        if quantized_model:
            return plan.compute_dtype
        if plan.base_dtype in ("fp32", "bf16", "fp16") and not trainable:
            return plan.base_dtype
        return plan.weight_dtype


@dataclass
class SyntheticLayout(ModelLayout):
    """A Llama-shaped stand-in for layers no program reads and no trace can run (``approximate-activations``).

    Each role (q, k, v, o, gate, up, down) is a linear layer sized from the
    config's dimensions; whether it trains, carries an adapter (of the layer's
    most common rank) or is quantized follows what the method does to the real
    linear layers of the same layer. Static memory still comes from the real
    inventory; only the activation replay is approximate.
    """

    _layer_specs: dict[int | None, list[LinearSpec]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        for m in self.inventory.modules:
            if m.is_linear and m.path and m.layer is not None and m.path != self._head:
                self._layer_specs.setdefault(m.layer, []).append(self.spec_for(m.path))

    def linear(self, layer: int | None, role: str) -> LinearSpec | None:
        if layer is None:
            return super().linear(layer, role)
        s = self.shape
        io = {
            "attention.q": (s.hidden, s.heads * s.head_dim),
            "attention.k": (s.hidden, s.kv_heads * s.head_dim),
            "attention.v": (s.hidden, s.kv_heads * s.head_dim),
            "attention.o": (s.heads * s.head_dim, s.hidden),
            "mlp.gate": (s.hidden, s.intermediate),
            "mlp.up": (s.hidden, s.intermediate),
            "mlp.down": (s.intermediate, s.hidden),
        }
        if role not in io:
            return None
        real = self._layer_specs.get(layer, [])
        in_f, out_f = io[role]
        trainable = any(r.trainable for r in real)
        quantized = [r.weight for r in real if r.weight != "dense"]
        adapters = [r.adapter for r in real if r.adapter is not None]
        adapter = None
        if adapters:
            ranks = [a.rank for a in adapters]
            a = adapters[0]
            adapter = ModuleAdapter(f"synthetic.{layer}.{role}", a.kind, max(set(ranks), key=ranks.count), in_f, out_f)
        dtype = real[0].dtype if real else self._dense_dtype(trainable)
        weight = quantized[0] if quantized and not trainable else "dense"
        return LinearSpec(in_f, out_f, False, weight, dtype, trainable, False, adapter)


def main_block(inventory: Inventory) -> str:
    """The container of the repeated decoder/encoder layers (``model.layers``, ``transformer.h``)."""
    counts: dict[str, int] = {}
    for p in inventory.parameters:
        if p.block is not None:
            counts[p.block] = counts.get(p.block, 0) + p.numel
    if not counts:
        raise PlanError(f"{inventory.architecture} has no repeated layers to estimate activations for")
    return max(counts, key=lambda b: counts[b])


def layer_indices(inventory: Inventory, block: str) -> list[int]:
    return sorted({p.layer for p in inventory.parameters if p.block == block and p.layer is not None})
