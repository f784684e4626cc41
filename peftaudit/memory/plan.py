"""The training plan: everything about a run that decides its memory, with defaults.

A :class:`TrainingPlan` is plain, frozen data. Every field has a default that
matches what a user gets from Hugging Face ``Trainer`` + ``peft`` when they do
not say otherwise, so ``TrainingPlan()`` is a LoRA run on all linear layers
with rank 16, batch 1 x 2048 tokens, bf16 weights with bf16 autocast, fused
AdamW, on one GPU.

Checks that need only the plan run in :meth:`TrainingPlan.validate` and raise
:class:`PlanError`; checks that need the model (a target that matches nothing,
QLoRA on a model without linear layers) run when the plan meets an inventory.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from peftaudit.errors import PeftauditError
from peftaudit.units import is_finite_number

MIB = 1024**2


class PlanError(PeftauditError):
    """A training plan that cannot be estimated (rank 0, negative batch, unknown optimizer...)."""


#: Training precisions, in the user's words.
#:
#: ``bf16``/``fp16``: weights stored in half precision and the forward run under
#: ``torch.autocast`` (what ``Trainer(bf16=True)`` does to a model loaded with
#: ``dtype=torch.bfloat16``; the most common setup).
#: ``bf16-true``/``fp16-true``: half-precision weights and no autocast ("pure" half).
#: ``bf16-mixed``/``fp16-mixed``: fp32 weights (the master copy) with autocast.
#: ``fp32``: everything in fp32.
PRECISIONS: tuple[str, ...] = ("bf16", "fp16", "bf16-true", "fp16-true", "bf16-mixed", "fp16-mixed", "fp32")

#: Storage of frozen base weights: ``None`` follows the precision; the others
#: store the base weights quantized and dequantize them layer by layer.
BASE_DTYPES: tuple[str, ...] = ("fp32", "bf16", "fp16", "fp8", "int8", "nf4", "fp4")

ADAPTER_DTYPES: tuple[str, ...] = ("fp32", "bf16", "fp16", "auto")

OPTIMIZERS: tuple[str, ...] = (
    "adamw",
    "adamw_8bit",
    "paged_adamw",
    "paged_adamw_8bit",
    "sgd",
    "sgd_momentum",
    "adafactor",
    "lion",
    "lion_8bit",
    "none",
)

#: How torch's optimizers run their step: one fused kernel (no temporaries, the
#: ``Trainer`` default ``adamw_torch_fused``), ``foreach`` (one temporary per
#: state, all tensors at once) or a ``for-loop`` (one parameter at a time).
OPTIMIZER_IMPLS: tuple[str, ...] = ("fused", "foreach", "for-loop")

ATTENTIONS: tuple[str, ...] = ("sdpa", "flash", "eager")
LOSSES: tuple[str, ...] = ("default", "chunked")
SHARDINGS: tuple[str, ...] = ("none", "ddp", "zero1", "zero2", "zero3", "fsdp", "fsdp-hybrid")
OFFLOADS: tuple[str, ...] = ("none", "optimizer", "parameters", "both")
LORA_BIAS: tuple[str, ...] = ("none", "all", "lora_only")
#: ``fixed``: every batch is ``seq_len`` long (packed or padded); ``varied``: batches of varying
#: length up to ``seq_len`` (dynamic padding), which leave the caching allocator more to keep.
LENGTHS: tuple[str, ...] = ("fixed", "varied")
QUANT_TYPES: tuple[str, ...] = ("nf4", "fp4")

#: LoRA initialisations, peft's ``init_lora_weights`` (``default`` is peft's ``True``). All but ``mica``
#: change only the starting values; ``mica`` freezes ``lora_B`` (peft ``tuners/lora/layer.py``), so only A
#: trains.
LORA_INITS: tuple[str, ...] = (
    "default",
    "gaussian",
    "pissa",
    "olora",
    "loftq",
    "eva",
    "corda",
    "orthogonal",
    "mica",
)
#: p-tuning's prompt encoder (peft's ``encoder_reparameterization_type``).
PROMPT_ENCODERS: tuple[str, ...] = ("mlp", "lstm")
#: GaLore's projection types (galore-torch 1.0 ``GaLoreProjector.proj_type``; transformers' ``optim_args``
#: ``proj_type``, default ``std``): which side of each matrix the projector takes, so which states are small.
GALORE_PROJECTIONS: tuple[str, ...] = ("std", "reverse_std", "right", "left", "full")
#: GaLore's methods (:mod:`peftaudit.memory.galore`): full training with their own optimizer.
GALORE_METHOD_NAMES: tuple[str, ...] = ("galore", "galore-layerwise")

#: Training objectives (TRL 1.16's trainers; ``sft`` is the plain language-model loss of ``Trainer``/
#: ``SFTTrainer``): :mod:`peftaudit.memory.objectives` says what each one's step holds.
OBJECTIVES: tuple[str, ...] = ("sft", "dpo", "kto", "orpo", "simpo", "reward", "grpo")
#: Where GRPO's completions are generated: ``transformers`` (``model.generate`` on the training GPU, TRL's
#: default), ``vllm-colocate`` (a vLLM engine in the training process holding ``vllm_memory`` of each GPU),
#: ``vllm-server`` (a vLLM server on other GPUs: nothing on these).
GENERATIONS: tuple[str, ...] = ("transformers", "vllm-colocate", "vllm-server")
#: Methods that train through peft: their reference model is the base with adapters disabled (TRL's
#: ``use_adapter(model, None)``); the others (full, freeze, GaLore) need a second copy of the model.
PEFT_METHOD_NAMES: tuple[str, ...] = (
    "lora",
    "qlora",
    "lora-8bit",
    "dora",
    "ia3",
    "prompt-tuning",
    "prefix-tuning",
    "p-tuning",
    "adalora",
    "loha",
    "lokr",
    "vera",
    "oft",
    "boft",
    "trainable-tokens",
)
#: Prompt-learning methods (virtual tokens): their generation runs through peft's own generation hooks.
PROMPT_METHOD_NAMES: tuple[str, ...] = ("prompt-tuning", "prefix-tuning", "p-tuning")

#: Every built-in method, as ``--method``'s help lists them without importing the registry (a test checks the
#: registry has exactly these); the option checks of :meth:`TrainingPlan.validate` cover these.
BUILTIN_METHOD_NAMES: tuple[str, ...] = ("full", "freeze", *PEFT_METHOD_NAMES, *GALORE_METHOD_NAMES)


_LORA_FAMILY = ("lora", "qlora", "lora-8bit", "dora")
#: The tuners whose config has ``layers_to_transform`` (IA3's has not, peft 0.21.2).
_LAYERED_TUNERS = (*_LORA_FAMILY, "adalora", "loha", "lokr", "vera", "oft", "boft")
#: Built-in methods that read each method option (a non-default value given to another method is a
#: mistake worth saying). A plugin's methods are not checked: they may read any field.
METHOD_OPTIONS: dict[str, tuple[str, ...]] = {
    "lora_init": _LORA_FAMILY,
    "use_rslora": (*_LORA_FAMILY, "adalora"),
    "lora_plus_ratio": _LORA_FAMILY,
    "bdlora_a": _LORA_FAMILY,
    "bdlora_b": _LORA_FAMILY,
    "bdlora_blocks": _LORA_FAMILY,
    "trainable_tokens": (*_LORA_FAMILY, "trainable-tokens"),
    "layers_to_transform": _LAYERED_TUNERS,
    "layers_pattern": _LAYERED_TUNERS,
    "prefix_projection": ("prefix-tuning",),
    "encoder_hidden_size": ("prefix-tuning", "p-tuning"),
    "prompt_encoder": ("p-tuning",),
    "encoder_layers": ("p-tuning",),
    "lokr_factor": ("lokr",),
    "lokr_decompose_both": ("lokr",),
    "oft_block_size": ("oft",),
    "oft_blocks": ("oft",),
    "block_share": ("oft",),
    "boft_block_size": ("boft",),
    "boft_blocks": ("boft",),
    "boft_butterfly": ("boft",),
    "adalora_allocator": ("adalora",),
    "feedforward_modules": ("ia3",),
    "galore_rank": GALORE_METHOD_NAMES,
    "galore_targets": GALORE_METHOD_NAMES,
    "galore_proj": GALORE_METHOD_NAMES,
}
#: Objective options and the objectives that read each (given to another objective, refused).
OBJECTIVE_OPTIONS: dict[str, tuple[str, ...]] = {
    "precompute_ref": ("dpo", "kto"),
    "beta": ("dpo", "kto", "orpo", "simpo", "grpo"),
    "generations": ("grpo",),
    "completion_len": ("grpo",),
    "generation": ("grpo",),
    "vllm_memory": ("grpo",),
}


@dataclass(frozen=True)
class TrainingPlan:
    """One training run as far as memory is concerned. All fields have defaults.

    Sizes are per GPU: ``batch_size`` is the micro-batch one GPU processes in
    one forward pass (gradient accumulation does not multiply it).
    """

    # --- what trains ------------------------------------------------------------
    method: str = "lora"
    """A registered method: ``full``, ``freeze``, ``lora``, ``qlora``, ``lora-8bit``, ``dora``,
    ``ia3``, ``prompt-tuning``, ``prefix-tuning``, ``p-tuning``, ``adalora``, ``loha``, ``lokr``,
    ``vera``, ``oft``, ``boft``, ``trainable-tokens``, ``galore``, ``galore-layerwise``
    (see ``peftaudit.memory.available_methods()``)."""
    rank: int = 16
    """Adapter rank ``r`` (LoRA, QLoRA, DoRA, LoHa, LoKr, VeRA; AdaLoRA's initial rank ``init_r``)."""
    alpha: float | None = None
    """LoRA alpha; ``None`` is ``2 * rank``. It scales the update and costs no memory."""
    dropout: float = 0.0
    """LoRA dropout (peft's default 0). With p > 0 every adapted layer keeps a
    dropped copy of its input and a mask for the backward pass."""
    targets: str | tuple[str, ...] = "all-linear"
    """Which modules get adapters, as peft reads ``target_modules``: ``"all-linear"``;
    a tuple of names matched against the end of the module path (``("q_proj", "v_proj")``);
    or one string, a regular expression that must match the whole module path;
    ``"default"`` is peft's per-architecture default (q and v for Llama)."""
    exclude: tuple[str, ...] = ()
    """Module names never adapted (peft's ``exclude_modules``)."""
    target_parameters: tuple[str, ...] = ()
    """Parameters adapted directly (peft's ``target_parameters``), e.g.
    ``("mlp.experts.gate_up_proj", "mlp.experts.down_proj")`` for fused MoE experts."""
    modules_to_save: tuple[str, ...] = ()
    """Modules trained in full next to the adapters (peft keeps a trainable copy)."""
    rank_pattern: tuple[tuple[str, int], ...] = ()
    """Per-module ranks as ``((regex, rank), ...)``, peft's ``rank_pattern`` (a dict is accepted)."""
    lora_bias: str = "none"
    """peft's ``bias``: ``"none"``, ``"all"`` (train every base bias) or ``"lora_only"``."""
    trainable: tuple[str, ...] = ()
    """``freeze`` method: regular expressions over parameter names that train.
    Empty means the last ``trainable_layers`` decoder layers (LLaMA-Factory's default)."""
    trainable_layers: int = 2
    """``freeze`` method without ``trainable``: how many of the last layers train."""
    num_virtual_tokens: int = 20
    """``prompt-tuning``, ``prefix-tuning``, ``p-tuning``: virtual tokens prepended to every sequence."""

    # --- options of peft's methods (peft's config field in brackets; :data:`METHOD_OPTIONS` says which
    # --- methods read each). ``rank`` is also AdaLoRA's ``init_r``, LoHa's, LoKr's and VeRA's ``r``.
    lora_init: str = "default"
    """LoRA initialisation (``init_lora_weights``, :data:`LORA_INITS`). Only ``mica`` changes memory
    (it freezes ``lora_B``); PiSSA, OLoRA, LoftQ, EVA, CorDA, orthogonal and gaussian change the
    starting values only."""
    use_rslora: bool = False
    """rsLoRA (``use_rslora``): scales by alpha/sqrt(r). Changes no memory; accepted so a config says it."""
    lora_plus_ratio: float | None = None
    """LoRA+: B's learning rate over A's, an optimizer recipe. Changes no memory."""
    layers_to_transform: tuple[int, ...] = ()
    """Only these layer indices get adapters (``layers_to_transform``); empty is every layer."""
    layers_pattern: tuple[str, ...] = ()
    """The name of the layer list ``layers_to_transform`` counts in (``layers_pattern``, e.g. ``layers``)."""
    bdlora_a: tuple[str, ...] = ()
    """BD-LoRA (``use_bdlora.target_modules_bd_a``): modules whose ``lora_A`` is block-diagonal."""
    bdlora_b: tuple[str, ...] = ()
    """BD-LoRA (``use_bdlora.target_modules_bd_b``): modules whose ``lora_B`` is block-diagonal."""
    bdlora_blocks: int = 1
    """BD-LoRA (``use_bdlora.nblocks``): blocks of each block-diagonal factor."""
    trainable_tokens: int = 0
    """Token embeddings trained in place (``trainable_token_indices``; ``trainable-tokens``'
    ``token_indices``): how many token ids."""
    feedforward_modules: tuple[str, ...] | None = None
    """``ia3``: targets whose input is scaled instead of their output (``feedforward_modules``);
    ``None`` is peft's per-architecture default (``down_proj`` for Llama)."""
    prefix_projection: bool = False
    """``prefix-tuning``: pass the prefix through a two-layer MLP (``prefix_projection``)."""
    encoder_hidden_size: int | None = None
    """``prefix-tuning`` with projection and ``p-tuning``: the prompt encoder's hidden size
    (``encoder_hidden_size``); ``None`` is peft's default, the model's token dimension."""
    prompt_encoder: str = "mlp"
    """``p-tuning``: ``mlp`` or ``lstm`` (``encoder_reparameterization_type``)."""
    encoder_layers: int = 2
    """``p-tuning``: the prompt encoder's layers (``encoder_num_layers``)."""
    lokr_factor: int = -1
    """``lokr``: ``decompose_factor``; -1 splits each dimension as evenly as it divides."""
    lokr_decompose_both: bool = False
    """``lokr``: factorise the left Kronecker factor too (``decompose_both``)."""
    oft_block_size: int = 32
    """``oft``: the rotation blocks' size (``oft_block_size``), when ``oft_blocks`` is 0."""
    oft_blocks: int = 0
    """``oft``: number of blocks per layer (peft's ``r``); given (> 0), it decides the block size."""
    block_share: bool = False
    """``oft``: one rotation shared by every block (``block_share``; BOFT has no such option)."""
    boft_block_size: int = 4
    """``boft``: the butterfly blocks' size (``boft_block_size``), when ``boft_blocks`` is 0."""
    boft_blocks: int = 0
    """``boft``: number of blocks (``boft_block_num``); given (> 0), it decides the block size."""
    boft_butterfly: int = 1
    """``boft``: butterfly factor (``boft_n_butterfly_factor``; 1 is plain block-diagonal OFT)."""
    adalora_allocator: bool = True
    """``adalora``: the rank allocator runs (``update_and_allocate`` every step, as peft's docs say),
    keeping three running statistics per adapter weight."""

    # --- GaLore (transformers' ``optim="galore_adamw"`` / ``"galore_adamw_layerwise"``, galore-torch 1.0;
    # --- ``update_proj_gap`` and ``scale`` change no memory: the first step computes the projection anyway).
    galore_rank: int = 128
    """``galore``: the projection rank (``optim_args`` ``rank``; transformers' default 128)."""
    galore_targets: str | tuple[str, ...] = ("attn", "mlp")
    """``galore``: the ``nn.Linear`` modules whose weights get low-rank states (transformers'
    ``optim_target_modules``): ``"all-linear"``, a tuple of names (a module matches when its path is one
    of them or contains one) or one regular expression over the whole path. transformers has no default and
    refuses to run without one; ``("attn", "mlp")`` is the example its docs give."""
    galore_proj: str = "std"
    """``galore``: the projection type (``optim_args`` ``proj_type``, :data:`GALORE_PROJECTIONS`)."""

    # --- objective (TRL 1.16's trainers; defaults are their configs' defaults) ------------------------
    objective: str = "sft"
    """What the step optimises (:data:`OBJECTIVES`): ``sft`` (next-token loss), ``dpo``/``kto`` (preference
    pairs / labelled completions against a reference model), ``orpo``/``simpo`` (pairs, no reference),
    ``reward`` (pairs through a sequence-classification head), ``grpo`` (generated completions)."""
    precompute_ref: bool = False
    """``dpo``/``kto``: reference log-probs computed over the dataset before training
    (``precompute_ref_log_probs``): no reference pass or reference copy in the step."""
    beta: float | None = None
    """The objective's beta; ``None`` is TRL's default (0.1 for dpo, kto, orpo, simpo; 0.0 for grpo). Only
    GRPO's changes memory: above 0 it loads a reference model (TRL's ``GRPOConfig.beta``)."""
    generations: int = 8
    """``grpo``: completions per prompt (``num_generations``, TRL's default 8). ``batch_size`` counts
    prompts: the step trains ``batch_size x generations`` sequences (TRL's ``per_device_train_batch_size``)."""
    completion_len: int = 512
    """``grpo``: tokens per completion (``max_completion_length``, TRL's default 512), within ``seq_len``
    (prompt + completion)."""
    generation: str = "transformers"
    """``grpo``: where completions are generated (:data:`GENERATIONS`)."""
    vllm_memory: float = 0.3
    """``grpo`` with ``vllm-colocate``: the fraction of each GPU's memory vLLM holds
    (``vllm_gpu_memory_utilization``, TRL's default 0.3)."""

    # --- precision and quantization ------------------------------------------------
    precision: str = "bf16"
    """One of :data:`PRECISIONS`; ``bf16`` is half-precision weights under autocast."""
    base_dtype: str | None = None
    """Storage of frozen base weights (:data:`BASE_DTYPES`); ``None`` follows the
    checkpoint's own ``quantization_config`` when it has one (a ``*-bnb-4bit``, GPTQ,
    AWQ or FP8 upload, :mod:`peftaudit.memory.quantized`), else the precision; QLoRA
    uses ``nf4`` and 8-bit LoRA ``int8``. ``fp8`` stores frozen weights as float8 with
    one fp32 scale per 128x128 block. Given, it overrides the checkpoint."""
    adapter_dtype: str = "fp32"
    """Adapter weights' dtype: peft upcasts adapters to fp32 by default
    (``autocast_adapter_dtype=True``); ``auto`` keeps the base weights' dtype."""
    quant_type: str = "nf4"
    """QLoRA 4-bit format (``nf4`` or ``fp4``); used when the base is 4-bit."""
    double_quant: bool = True
    """QLoRA double quantization (quantizes the per-block absmax constants too)."""
    kbit_upcast: bool = False
    """What ``peft.prepare_model_for_kbit_training`` does: cast every
    non-quantized parameter (embeddings, norms, head) to fp32."""

    # --- optimizer ------------------------------------------------------------------------
    optimizer: str = "adamw"
    """One of :data:`OPTIMIZERS`; ``none`` is inference (forward only, no gradients)."""
    optimizer_impl: str = "fused"
    """torch optimizers' implementation, :data:`OPTIMIZER_IMPLS`."""

    # --- activations ------------------------------------------------------------------------
    batch_size: int = 1
    """Sequences per GPU per forward pass (the micro-batch)."""
    seq_len: int = 2048
    """Tokens per sequence."""
    gradient_checkpointing: bool = False
    """Recompute each layer in the backward pass (transformers' non-reentrant default)."""
    attention: str = "sdpa"
    """``sdpa`` and ``flash`` keep O(seq) memory; ``eager`` keeps the attention matrix."""
    loss: str = "default"
    """``default``: transformers' loss, which upcasts all logits to fp32; ``chunked``:
    a fused/chunked linear cross-entropy that never holds the full logits."""
    gradient_accumulation: int = 1
    """Micro-batches per optimizer step; above 1 the gradients stay alive through
    every forward pass."""

    # --- images -------------------------------------------------------------------------------------
    images: int = 0
    """Multimodal models: images per sample. Their placeholder tokens count in ``seq_len``."""
    image_tokens: int | None = None
    """Multimodal models: tokens one image takes in the language model's sequence; ``None`` is
    the model's own (LLaVA's ``image_seq_length`` or (image size / patch)^2, Gemma 3's
    ``mm_tokens_per_image``, Qwen-VL's at 756 px; :mod:`peftaudit.memory.images`)."""
    image_size: int | None = None
    """Vision models (ViT, DINOv2, ConvNeXt, Swin, CLIP): the square image side in pixels;
    ``None`` is the config's ``image_size``. Their batch is ``batch_size`` images."""

    # --- scale-out ----------------------------------------------------------------------------
    gpus: int = 1
    """GPUs in the job (all nodes)."""
    gpus_per_node: int = 8
    """GPUs per node, for hybrid sharding (shard within a node, replicate across)."""
    sharding: str = "none"
    """``none`` (one GPU), ``ddp``, ``zero1``, ``zero2``, ``zero3``, ``fsdp`` (full shard)
    or ``fsdp-hybrid`` (:data:`SHARDINGS`)."""
    offload: str = "none"
    """CPU offload: ``optimizer`` (states and master weights), ``parameters`` (ZeRO-3/FSDP
    only) or ``both``."""

    # --- software stack ------------------------------------------------------------------------
    stack: tuple[tuple[str, str], ...] = ()
    """Releases the run uses, as ``(package, version)`` pairs (``--stack transformers==4.44,peft==0.12``;
    a dict or that text is accepted): transformers, peft, bitsandbytes, torch. Packages not named are
    modelled at the installed release (:mod:`peftaudit.memory.stack`)."""

    # --- fixed costs ---------------------------------------------------------------------------
    cuda_context_bytes: int = 1024 * MIB
    """CUDA context, cuBLAS/cuDNN workspaces and kernels, allocated outside PyTorch's
    allocator. Measured 300 MiB to 1.3 GiB per process (1343 MB in transformers' docs);
    1 GiB is what the published end-to-end measurements calibrate to (docs/memory.md)."""
    allocator_fraction: float | None = None
    """Caching-allocator slack on top of the allocated peak, as a fraction of allocated; ``None``
    (the default) is what PyTorch's caching allocator needs for this plan shape, learned from
    replays of traced steps (:mod:`peftaudit.memory.allocator.reserve`)."""
    expandable_segments: bool = False
    """``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True``: the allocator maps pages into one
    growing segment per pool, which wastes less than fixed segments."""
    lengths: str = "fixed"
    """``fixed`` or ``varied`` batch lengths (:data:`LENGTHS`)."""

    def __post_init__(self) -> None:
        # Accept the natural Python spellings and keep the dataclass hashable.
        if isinstance(self.rank_pattern, Mapping):
            # Insertion order matters: peft uses the first pattern that matches.
            object.__setattr__(self, "rank_pattern", tuple(self.rank_pattern.items()))
        for name in _TUPLE_FIELDS:
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, (value,))
            elif isinstance(value, list):
                object.__setattr__(self, name, tuple(tuple(v) if isinstance(v, list) else v for v in value))
        if isinstance(self.targets, list):
            object.__setattr__(self, "targets", tuple(self.targets))
        if isinstance(self.galore_targets, list):
            object.__setattr__(self, "galore_targets", tuple(self.galore_targets))
        if not self.stack or (isinstance(self.stack, str) and not self.stack.strip()):
            object.__setattr__(self, "stack", ())  # {}, [] and "" name nothing: the installed releases
        else:
            from peftaudit.memory.stack import normalize_stack

            try:
                object.__setattr__(self, "stack", normalize_stack(self.stack))
            except PlanError:
                # Kept (hashable) as given: validate() says what is wrong with it.
                value = self.stack.items() if isinstance(self.stack, Mapping) else self.stack
                if not isinstance(value, str):
                    value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
                object.__setattr__(self, "stack", value)

    # --- derived -------------------------------------------------------------------------------
    @property
    def lora_alpha(self) -> float:
        return float(self.alpha) if self.alpha is not None else 2.0 * self.rank

    @property
    def training(self) -> bool:
        """False for inference plans (``optimizer="none"``)."""
        return self.optimizer != "none"

    @property
    def tokens(self) -> int:
        """Tokens in one micro-batch on one GPU."""
        return self.batch_size * self.seq_len

    @property
    def autocast(self) -> bool:
        """Whether the forward runs under ``torch.autocast``."""
        return self.precision in ("bf16", "fp16", "bf16-mixed", "fp16-mixed")

    @property
    def compute_dtype(self) -> str:
        """The dtype matrix multiplications run in."""
        if self.precision == "fp32":
            return "fp32"
        return "fp16" if self.precision.startswith("fp16") else "bf16"

    @property
    def weight_dtype(self) -> str:
        """The dtype trainable and unquantized weights are stored in."""
        if self.precision in ("fp32", "bf16-mixed", "fp16-mixed"):
            return "fp32"
        return self.compute_dtype

    def with_(self, **changes: Any) -> TrainingPlan:
        """A copy with ``changes`` applied (``dataclasses.replace``)."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["rank_pattern"] = dict(self.rank_pattern)
        for key in _TUPLE_FIELDS:
            if key != "rank_pattern" and data[key] is not None:
                data[key] = list(data[key])
        if isinstance(self.targets, tuple):
            data["targets"] = list(self.targets)
        if isinstance(self.galore_targets, tuple):
            data["galore_targets"] = list(self.galore_targets)
        data["stack"] = dict(self.stack) if isinstance(self.stack, tuple) else self.stack
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainingPlan:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PlanError(f"unknown training plan field(s): {', '.join(unknown)}")
        return cls(**dict(data))

    def validate(self, spelling: Mapping[str, str] | None = None) -> None:
        """Raise :class:`PlanError` for a plan that makes no sense on any model.

        ``spelling``: how the caller names fields in messages (the CLI passes its flags, ``--init`` for
        ``lora_init``); a field not in it is named as the field.
        """
        from peftaudit.plugins import memory_methods

        methods = memory_methods()
        if self.method not in methods:
            raise PlanError(f"unknown method '{self.method}'; known: {', '.join(sorted(methods))}")
        _one_of("precision", self.precision, PRECISIONS)
        if self.base_dtype is not None:
            _one_of("base_dtype", self.base_dtype, BASE_DTYPES)
        _one_of("adapter_dtype", self.adapter_dtype, ADAPTER_DTYPES)
        _one_of("quant_type", self.quant_type, QUANT_TYPES)
        _one_of("optimizer", self.optimizer, OPTIMIZERS)
        _one_of("optimizer_impl", self.optimizer_impl, OPTIMIZER_IMPLS)
        _one_of("attention", self.attention, ATTENTIONS)
        _one_of("loss", self.loss, LOSSES)
        _one_of("sharding", self.sharding, SHARDINGS)
        _one_of("offload", self.offload, OFFLOADS)
        _one_of("lora_bias", self.lora_bias, LORA_BIAS)
        if self.stack:
            from peftaudit.memory.stack import normalize_stack

            normalize_stack(self.stack)
        for name in ("batch_size", "seq_len", "gradient_accumulation", "gpus", "gpus_per_node"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PlanError(f"{name.replace('_', ' ')} must be a positive integer, got {value!r}")
        if not isinstance(self.images, int) or isinstance(self.images, bool) or self.images < 0:
            raise PlanError(f"images must be a whole number >= 0, got {self.images!r}")
        for name in ("image_tokens", "image_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise PlanError(f"{name.replace('_', ' ')} must be a positive integer, got {value!r}")
        if self.image_tokens is not None and self.images * self.image_tokens >= self.seq_len:
            raise PlanError(
                f"{self.images} image(s) x {self.image_tokens} tokens do not fit in seq-len {self.seq_len:,} "
                "(it counts image tokens too): raise --seq-len or lower --images/--image-tokens"
            )
        if not isinstance(self.rank, int) or self.rank < 1:
            raise PlanError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        for pattern, rank in self.rank_pattern:
            if not isinstance(rank, int) or rank < 1:
                raise PlanError(f"rank_pattern '{pattern}' gives rank {rank!r}; ranks must be positive integers")
        if self.alpha is not None and not (is_finite_number(self.alpha) and self.alpha > 0):
            raise PlanError(f"LoRA alpha must be a positive finite number, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise PlanError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.num_virtual_tokens < 1:
            raise PlanError(f"num_virtual_tokens must be positive, got {self.num_virtual_tokens!r}")
        self._validate_method_options(spelling or {})
        self._validate_objective(spelling or {})
        if self.trainable_layers < 0:
            raise PlanError(f"trainable_layers must be >= 0, got {self.trainable_layers!r}")
        if not is_finite_number(self.cuda_context_bytes) or self.cuda_context_bytes < 0:
            raise PlanError(f"cuda_context_bytes must be a finite number >= 0, got {self.cuda_context_bytes!r}")
        _one_of("lengths", self.lengths, LENGTHS)
        if not isinstance(self.expandable_segments, bool):
            raise PlanError(f"expandable_segments must be true or false, got {self.expandable_segments!r}")
        if self.allocator_fraction is not None and not (
            is_finite_number(self.allocator_fraction) and 0.0 <= self.allocator_fraction <= 4.0
        ):
            raise PlanError(f"allocator_fraction must be between 0 and 4, got {self.allocator_fraction!r}")
        if self.sharding == "none" and self.gpus > 1:
            raise PlanError(f"{self.gpus} GPUs need a sharding strategy: ddp, zero1, zero2, zero3, fsdp or fsdp-hybrid")
        if self.offload in ("parameters", "both") and self.sharding not in ("zero3", "fsdp", "fsdp-hybrid"):
            raise PlanError("offloading parameters needs parameter sharding: zero3, fsdp or fsdp-hybrid")
        if self.offload != "none" and not self.training:
            raise PlanError("offload applies to training; an inference plan (optimizer none) has nothing to offload")
        if self.sharding == "fsdp-hybrid" and self.gpus % min(self.gpus_per_node, self.gpus):
            raise PlanError(f"fsdp-hybrid needs whole nodes: {self.gpus} GPUs, {self.gpus_per_node} per node")
        if isinstance(self.targets, str) and not self.targets.strip():
            raise PlanError("targets must not be empty")
        if isinstance(self.targets, tuple) and not self.targets and not self.target_parameters:
            raise PlanError("targets is empty and no target_parameters were given: nothing would train")

    def check_option_read(self, name: str, spelled: str) -> None:
        """Raise :class:`PlanError` when the objective option ``name`` (spelled ``spelled``) is one this plan's
        objective (or generation) does not read; the CLI asks it of every flag given, even at its default."""
        readers = OBJECTIVE_OPTIONS.get(name)
        if readers is not None and self.objective not in readers:
            objectives = ", ".join(readers[:-1]) + (" or " if len(readers) > 1 else "") + readers[-1]
            raise PlanError(f"{spelled} applies to --objective {objectives}, not {self.objective}")
        if name == "vllm_memory" and self.generation != "vllm-colocate":
            raise PlanError(f"{spelled} applies to vllm-colocate generation only")

    def _validate_objective(self, spelling: Mapping[str, str]) -> None:
        _one_of("objective", self.objective, OBJECTIVES)
        _one_of("generation", self.generation, GENERATIONS)
        _positive("generations", self.generations)
        _positive("completion_len", self.completion_len)
        if self.beta is not None and not (is_finite_number(self.beta) and self.beta >= 0):
            raise PlanError(f"beta must be a finite number >= 0, got {self.beta!r}")
        if not (is_finite_number(self.vllm_memory) and 0.0 < self.vllm_memory < 1.0):
            raise PlanError(f"vLLM memory must be a fraction between 0 and 1, got {self.vllm_memory!r}")
        for name in OBJECTIVE_OPTIONS:
            if getattr(self, name) != PLAN_DEFAULTS[name]:
                self.check_option_read(name, spelling.get(name, name))
        if self.objective == "sft":
            return
        if self.loss != "default" and self.objective != "reward":
            raise PlanError(
                f"{spelling.get('loss', 'loss')} applies to the sft and reward objectives: TRL's {self.objective} "
                "trainer computes its own loss"
            )
        if not self.training:
            raise PlanError(f"the {self.objective} objective trains; optimizer none is inference")
        if self.objective == "grpo":
            if self.completion_len >= self.seq_len:
                raise PlanError(
                    f"completion length {self.completion_len:,} leaves no prompt in seq-len {self.seq_len:,} "
                    "(GRPO's seq-len is prompt + completion)"
                )
            if self.method in PROMPT_METHOD_NAMES:
                raise PlanError(
                    f"GRPO with {self.method} is not modelled: its generation runs through peft's prompt-learning "
                    "hooks, whose cache peftaudit does not model"
                )
        if self.objective in ("orpo", "simpo") and self.method in ("prompt-tuning", "p-tuning"):
            # ORPO's and CPO's losses compare the logits with the labels unsliced (trl 1.16
            # orpo_trainer.py:779-800, 727-728; cpo_trainer.py:774-775): TRL itself fails.
            raise PlanError(
                f"TRL 1.16's {self.objective} trainer cannot train {self.method}: peft prepends the virtual "
                "tokens' logits, which its loss does not slice off (prefix-tuning works)"
            )
        if self.images:
            raise PlanError(f"the {self.objective} objective with images is not modelled")

    def _validate_method_options(self, spelling: Mapping[str, str]) -> None:
        _one_of("lora_init", self.lora_init, LORA_INITS)
        _one_of("prompt_encoder", self.prompt_encoder, PROMPT_ENCODERS)
        for name in ("bdlora_blocks", "encoder_layers", "boft_butterfly"):
            _positive(name, getattr(self, name))
        for name in ("trainable_tokens", "oft_block_size", "oft_blocks", "boft_block_size", "boft_blocks"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise PlanError(f"{name.replace('_', ' ')} must be a whole number >= 0, got {value!r}")
        if self.encoder_hidden_size is not None:
            _positive("encoder_hidden_size", self.encoder_hidden_size)
        factor = self.lokr_factor
        if not isinstance(factor, int) or isinstance(factor, bool) or not (factor == -1 or factor >= 2):
            raise PlanError(f"lokr factor must be -1 or an integer >= 2, got {self.lokr_factor!r}")
        if self.lora_plus_ratio is not None and not (
            is_finite_number(self.lora_plus_ratio) and self.lora_plus_ratio > 0
        ):
            raise PlanError(f"LoRA+ ratio must be a positive finite number, got {self.lora_plus_ratio!r}")
        for layer in self.layers_to_transform:
            if not isinstance(layer, int) or isinstance(layer, bool) or layer < 0:
                raise PlanError(f"layers to transform must be layer indices >= 0, got {layer!r}")
        if self.layers_pattern and not self.layers_to_transform:
            raise PlanError("layers_pattern needs layers_to_transform (peft reads it only to count layers)")
        if self.oft_blocks == 0 and self.oft_block_size == 0:
            raise PlanError("OFT needs a block size or a number of blocks; both are 0")
        if self.boft_blocks == 0 and self.boft_block_size == 0:
            raise PlanError("BOFT needs a block size or a number of blocks; both are 0")
        if self.feedforward_modules is not None and isinstance(self.targets, tuple):
            # peft's IA3Config.__post_init__ refuses this when both are lists.
            outside = sorted(set(self.feedforward_modules) - set(self.targets))
            if outside:
                raise PlanError(f"IA3 feed-forward modules {outside} are not among the targets {list(self.targets)}")
        _positive("galore_rank", self.galore_rank)
        _one_of("galore_proj", self.galore_proj, GALORE_PROJECTIONS)
        if not self.galore_targets or (isinstance(self.galore_targets, str) and not self.galore_targets.strip()):
            raise PlanError("GaLore targets must not be empty (transformers requires optim_target_modules)")
        if self.galore_targets != "all-linear":
            # transformers re.fullmatch-es a string target, and each entry of a list that no path contains.
            patterns = (self.galore_targets,) if isinstance(self.galore_targets, str) else self.galore_targets
            for pattern in patterns:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise PlanError(f"GaLore target {pattern!r} is not a valid regular expression: {exc.msg}") from None
        overlap = set(self.bdlora_a) & set(self.bdlora_b)
        if overlap:
            raise PlanError(f"BD-LoRA modules {sorted(overlap)} cannot have both A and B block-diagonal")
        # A method option given to a built-in method that ignores it is a mistake: say so, not ignore it.
        if self.method not in BUILTIN_METHOD_NAMES:
            return
        for name, readers in METHOD_OPTIONS.items():
            if self.method not in readers and getattr(self, name) != PLAN_DEFAULTS[name]:
                methods = ", ".join(readers[:-1]) + (" or " if len(readers) > 1 else "") + readers[-1]
                raise PlanError(f"{spelling.get(name, name)} applies to {methods}, not {self.method}")


def _positive(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise PlanError(f"{name.replace('_', ' ')} must be a positive integer, got {value!r}")


def _one_of(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise PlanError(f"unknown {name.replace('_', ' ')} {value!r}; choose one of: {', '.join(allowed)}")


_TUPLE_FIELDS = (
    "exclude",
    "target_parameters",
    "modules_to_save",
    "trainable",
    "rank_pattern",
    "layers_to_transform",
    "layers_pattern",
    "bdlora_a",
    "bdlora_b",
    "feedforward_modules",
)
#: Every field's default (the one source ``--help`` quotes, :func:`peftaudit.memory.cli.plan_default`).
PLAN_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(TrainingPlan)}


@dataclass(frozen=True)
class PlanWarning:
    """A plan that works but probably is not what the user meant. ``code`` is stable."""

    code: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


__all__ = [
    "ADAPTER_DTYPES",
    "ATTENTIONS",
    "BASE_DTYPES",
    "BUILTIN_METHOD_NAMES",
    "GALORE_METHOD_NAMES",
    "GALORE_PROJECTIONS",
    "GENERATIONS",
    "LENGTHS",
    "LORA_INITS",
    "LOSSES",
    "METHOD_OPTIONS",
    "OBJECTIVES",
    "OBJECTIVE_OPTIONS",
    "OFFLOADS",
    "OPTIMIZERS",
    "OPTIMIZER_IMPLS",
    "PEFT_METHOD_NAMES",
    "PLAN_DEFAULTS",
    "PRECISIONS",
    "PROMPT_ENCODERS",
    "PROMPT_METHOD_NAMES",
    "SHARDINGS",
    "PlanError",
    "PlanWarning",
    "TrainingPlan",
]
