"""Building the model to trace: precision, quantization and the method, on the meta device; then fake storages."""

from __future__ import annotations

import functools
from typing import Any

from peftaudit.memory import keep_fp32
from peftaudit.memory.adapters import DEFAULT_TARGETS as PEFT_ADAPTERS
from peftaudit.memory.adapters import peft_config_kwargs
from peftaudit.memory.plan import GALORE_METHOD_NAMES, PlanError, TrainingPlan
from peftaudit.memory.quantized import resolve
from peftaudit.memory.tracing.autocast import emulate_autocast_in_recompute
from peftaudit.memory.tracing.compat import attention_classes, lora_config_kwargs
from peftaudit.memory.tracing.quantized import quantize_linears
from peftaudit.memory.tracing.standins import peft_adapter_building
from peftaudit.units import SHORT_DTYPES


def unique_params(model: Any) -> list[Any]:
    seen: dict[int, Any] = {}
    for p in model.parameters():
        seen.setdefault(id(p), p)
    return list(seen.values())


@functools.cache
def _experts_forward_code() -> Any:
    """The code of the forward ``@use_experts_implementation`` gives every experts class, or ``None``.

    The decorator wraps each class's forward in the same function (it dispatches on
    ``config._experts_implementation``), so its code object identifies experts modules exactly.
    """
    import torch

    try:
        from transformers.integrations import use_experts_implementation
    except ImportError:  # transformers before the experts interface: nothing to set
        return None

    class Probe(torch.nn.Module):
        def forward(self) -> None:  # pragma: no cover - never called
            return None

    return use_experts_implementation(Probe).forward.__code__


def prepare_model(
    model: Any, plan: TrainingPlan
) -> tuple[Any, dict[str, dict[str, tuple[tuple[int, ...], str]]], list[str]]:
    """Apply precision, quantization and the method, all on the meta device."""
    import torch

    from peftaudit.inventory import take_inventory
    from peftaudit.plugins import memory_methods

    notes: list[str] = []
    inventory = take_inventory(model)
    # The same storage decision as the analytic estimate: a checkpoint's quantization_config wins.
    resolved = resolve(inventory, plan, memory_methods()[plan.method].adapt(inventory, plan))
    adaptation = resolved.adaptation
    dtype = getattr(torch, SHORT_DTYPES[plan.weight_dtype])
    model.to(dtype)
    _keep_fp32(model, inventory, plan.weight_dtype)
    impl = "sdpa" if plan.attention in ("sdpa", "flash") else "eager"
    model.config._attn_implementation = impl
    experts_forward = _experts_forward_code()
    for sub in model.modules():
        cfg = getattr(sub, "config", None)
        if cfg is not None:
            cfg._attn_implementation = impl
        if experts_forward is not None and getattr(type(sub).forward, "__code__", None) is experts_forward:
            # transformers' default kernel on GPUs, set where it is read: an experts module picks its
            # kernel from its config at each call. Only there: a class without experts (BERT) refuses
            # to be built again from a config that names one.
            sub.config._experts_implementation = "grouped_mm"
    attention_classes(model, impl)  # transformers < 4.48 chose them when it built the model (compat.py)
    extras: dict[str, dict[str, tuple[tuple[int, ...], str]]] = {}
    if adaptation.quantization is not None:
        formats = resolved.checkpoint.formats(inventory) if resolved.checkpoint is not None else {}
        if resolved.checkpoint is not None:
            skip = {m.path for m in inventory.modules if m.is_linear} - set(formats)
            if resolved.checkpoint.expert_formats(inventory):
                notes.append(
                    "fused expert weights stay 16-bit in the trace; the checkpoint stores them "
                    f"{resolved.checkpoint.label} (the analytic estimate counts that)"
                )
        else:
            head = inventory.output_head
            tied = {p.module for p in inventory.parameters if p.tied_with} | {
                n.rpartition(".")[0] for p in inventory.parameters for n in p.tied_with
            }
            # and, as every transformers quantizer, what the model keeps in float32 (T5's wo)
            kept = {m.path for m in inventory.modules if keep_fp32.never_quantized(inventory, m.path)}
            skip = {head or ""} | tied | kept
            # transformers also keeps the module of the last parameter unquantized
            # (quantizers/base.py:get_keys_to_not_convert): a classifier's score head.
            skip.add(list(model.named_parameters())[-1][0].rpartition(".")[0])
        extras = quantize_linears(model, plan, adaptation.quantization, skip, formats)
        # What transformers sets on a bitsandbytes-quantized model; peft dispatches on it.
        model.is_loaded_in_4bit = adaptation.quantization in ("nf4", "fp4", "fp8", "int")
        model.is_loaded_in_8bit = adaptation.quantization == "int8"
        if plan.kbit_upcast:
            # prepare_model_for_kbit_training: every non-quantized floating parameter to fp32.
            for name, p in model.named_parameters():
                if p.dtype in (torch.float16, torch.bfloat16) and not any(name.startswith(k + ".") for k in extras):
                    p.data = p.data.to(torch.float32)
    if plan.base_dtype in ("fp32", "bf16", "fp16"):
        base = getattr(torch, SHORT_DTYPES[plan.base_dtype])
        fp32_names = keep_fp32.patterns(inventory, plan.base_dtype)
        for name, p in model.named_parameters():
            if name not in adaptation.trainable:
                p.data = p.data.to(torch.float32 if keep_fp32.kept_in_fp32(name, fp32_names) else base)
    if plan.gradient_checkpointing and plan.training:
        if hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:  # diffusers models (non-reentrant by default)
            model.enable_gradient_checkpointing()
        emulate_autocast_in_recompute(model)
    model = _apply_method(model, plan, adaptation)
    return model, extras, notes


def _keep_fp32(model: Any, inventory: Any, dtype: str) -> None:
    """Put back in float32 what a ``dtype`` load keeps so: parameters and persistent buffers
    (the state dict transformers loads), as :mod:`peftaudit.memory.keep_fp32` says."""
    import torch

    names = keep_fp32.patterns(inventory, dtype)
    if not names:
        return
    for path, module in model.named_modules():
        prefix = f"{path}." if path else ""
        for name, p in module.named_parameters(recurse=False):
            if p.is_floating_point() and keep_fp32.kept_in_fp32(prefix + name, names):
                p.data = p.data.to(torch.float32)
        for name, b in list(module._buffers.items()):
            persistent = name not in module._non_persistent_buffers_set
            if b is not None and persistent and b.is_floating_point() and keep_fp32.kept_in_fp32(prefix + name, names):
                module._buffers[name] = b.to(torch.float32)


def _apply_method(model: Any, plan: TrainingPlan, adaptation: Any) -> Any:
    if plan.method in ("full", "freeze", *GALORE_METHOD_NAMES):  # GaLore is full training
        for name, p in model.named_parameters():
            p.requires_grad_(name in adaptation.trainable)
        return model
    import peft

    autocast_adapter = plan.adapter_dtype != "auto"
    causal = hasattr(model, "prepare_inputs_for_generation")
    # TRL's reward model is a sequence classifier: peft's SEQ_CLS task trains its score head in full
    # (modules_to_save), as RewardTrainer asks (trl reward_trainer.py:325-327).
    reward = plan.objective == "reward"
    task = "SEQ_CLS" if reward else ("CAUSAL_LM" if causal else None)
    if plan.method == "ia3":
        ia3_targets = None if plan.targets in ("default", "all-linear") else list(plan.targets)
        config: Any = peft.IA3Config(
            target_modules=ia3_targets,
            feedforward_modules=list(plan.feedforward_modules) if plan.feedforward_modules is not None else None,
            task_type=task,
        )
    elif plan.method == "prompt-tuning":
        if not causal and not reward:
            raise PlanError("the trace runs prompt tuning on causal language models only")
        config = peft.PromptTuningConfig(task_type=task, num_virtual_tokens=plan.num_virtual_tokens)
    elif plan.method in ("prefix-tuning", "p-tuning"):
        # encoder_hidden_size None is peft's default (the token dimension, utils/other.py).
        prompt: dict[str, Any] = {
            "task_type": "SEQ_CLS" if reward else "CAUSAL_LM",
            "num_virtual_tokens": plan.num_virtual_tokens,
            "encoder_hidden_size": plan.encoder_hidden_size,
        }
        if plan.method == "prefix-tuning":
            config = peft.PrefixTuningConfig(prefix_projection=plan.prefix_projection, **prompt)
        else:
            config = peft.PromptEncoderConfig(
                encoder_reparameterization_type=plan.prompt_encoder.upper(),
                encoder_num_layers=plan.encoder_layers,
                **prompt,
            )
    elif plan.method == "trainable-tokens":
        # Which ids train changes nothing but their number (tuners/trainable_tokens).
        named = plan.targets != "default" and plan.targets != "all-linear"
        config = peft.TrainableTokensConfig(
            token_indices=list(range(plan.trainable_tokens)),
            target_modules=(list(plan.targets) if isinstance(plan.targets, tuple) else plan.targets) if named else None,
        )
    elif plan.method in PEFT_ADAPTERS:
        # AdaLoRA, LoHa, LoKr, VeRA, OFT, BOFT: the config the plan stands for (memory/adapters.py).
        name, kwargs = peft_config_kwargs(plan)
        config = getattr(peft, name)(task_type=task, **kwargs)
    else:
        targets: Any = plan.targets
        if targets == "default":
            targets = None
        elif isinstance(targets, tuple):
            targets = list(targets)
        lora_kwargs: dict[str, Any] = {"lora_alpha": plan.lora_alpha, "bias": plan.lora_bias}
        # Fields older peft releases lack (tracing/compat.py): dropped there while unset.
        newer = {
            "exclude_modules": list(plan.exclude) or None,
            "target_parameters": list(plan.target_parameters) or None,
            **_lora_options(plan),
        }
        lora_kwargs.update(lora_config_kwargs(peft.LoraConfig, newer))
        config = peft.LoraConfig(
            r=plan.rank,
            lora_dropout=plan.dropout,
            target_modules=targets,
            modules_to_save=list(plan.modules_to_save) or None,
            rank_pattern=dict(plan.rank_pattern),
            use_dora=plan.method == "dora",
            task_type="SEQ_CLS" if reward else None,
            **lora_kwargs,
        )
    with peft_adapter_building(plan.method):  # BOFT's CUDA extension, as on a GPU (tracing/standins.py)
        model = peft.get_peft_model(model, config, autocast_adapter_dtype=autocast_adapter)
    if plan.lora_init == "mica":
        # MiCA's init is an SVD of real weights; its forward is LoRA's with lora_B frozen (lora/variants.py).
        for name, p in model.named_parameters():
            if ".lora_B." in name or ".lora_embedding_B." in name:
                p.requires_grad_(False)
    if plan.adapter_dtype in ("bf16", "fp16"):
        import torch

        target = getattr(torch, SHORT_DTYPES[plan.adapter_dtype])
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.to(target)
    return model


def _lora_options(plan: TrainingPlan) -> dict[str, Any]:
    """LoraConfig fields of the plan's LoRA options (``layers_to_transform``, BD-LoRA, trainable tokens);
    ``None`` where unset, which older peft releases (without the field) accept."""
    bdlora = plan.bdlora_a or plan.bdlora_b
    return {
        "layers_to_transform": list(plan.layers_to_transform) or None,
        "layers_pattern": list(plan.layers_pattern) or None,
        # Lenient: the plan models a target in neither list as plain LoRA (targets.lora_adapters).
        "use_bdlora": {
            "target_modules_bd_a": list(plan.bdlora_a),
            "target_modules_bd_b": list(plan.bdlora_b),
            "nblocks": plan.bdlora_blocks,
            "match_strict": False,
        }
        if bdlora
        else None,
        "trainable_token_indices": list(range(plan.trainable_tokens)) or None,
    }


def materialize(model: Any, mode: Any, extras: dict[str, dict[str, tuple[tuple[int, ...], str]]]) -> dict[int, str]:
    """Give every parameter and buffer a fake storage; returns storage id -> category."""
    import torch

    categories: dict[int, str] = {}
    memo: dict[int, Any] = {}
    del extras
    with mode:
        for module in model.modules():
            shapes = getattr(module, "_peftaudit_shapes", None)
            for name, p in list(module._parameters.items()):
                if p is None:
                    continue
                if id(p) not in memo:
                    if shapes is not None and name == "weight":
                        shape, dt = shapes["weight"]
                        fake = torch.empty(shape, dtype=getattr(torch, dt))
                    else:
                        fake = torch.empty(p.shape, dtype=p.dtype)
                    new = torch.nn.Parameter(fake, requires_grad=p.requires_grad)
                    memo[id(p)] = new
                    cat = "trainable_weights" if p.requires_grad else "base_weights"
                    categories[id(new.untyped_storage())] = cat
                module._parameters[name] = memo[id(p)]
            for name, b in list(module._buffers.items()):
                if b is None:
                    continue
                fb = torch.empty(b.shape, dtype=b.dtype)
                module._buffers[name] = fb
                categories[id(fb.untyped_storage())] = "base_weights"
            if shapes is not None:
                for extra, (shape, dt) in shapes.items():
                    if extra == "weight":
                        continue
                    t = torch.empty(shape, dtype=getattr(torch, dt))
                    object.__setattr__(module, f"_peftaudit_const_{extra}", t)
                    categories[id(t.untyped_storage())] = "quantization_constants"
    return categories


def decoder_layers(model: Any) -> list[Any]:
    import torch

    best: list[Any] = []
    for _name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > len(best):
            children = list(module)
            if (
                children
                and all(type(c) is type(children[0]) for c in children)
                and sum(p.numel() for p in children[0].parameters()) > 0
            ):
                best = children
    return best


def output_module(model: Any) -> Any:
    base = model
    for attr in ("get_base_model",):
        fn = getattr(base, attr, None)
        if callable(fn):
            base = fn()
    getter = getattr(base, "get_output_embeddings", None)
    out = getter() if callable(getter) else None
    if out is not None and hasattr(out, "base_layer"):
        out = out.base_layer
    return out
