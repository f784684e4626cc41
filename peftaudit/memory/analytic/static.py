"""Static memory: weights at their storage dtype, trainable weights, gradients, optimizer states.

Per model replica, before sharding (:mod:`peftaudit.memory.analytic.sharding`
divides it across GPUs): frozen weights packed where quantized (bitsandbytes'
defaults for plan-driven quantization, or what a checkpoint's own
``quantization_config`` converts), adapters and trained weights, their
gradients, and the optimizer's states.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from peftaudit.inventory import Inventory, ParameterRecord
from peftaudit.memory.analytic.layout import ModelLayout
from peftaudit.memory.dtypes import fp8_bytes, int8_bytes, nbytes, nf4_bytes, short
from peftaudit.memory.methods import Adaptation
from peftaudit.memory.optimizers import TrainableTensor, galore_in_flight, optimizer_memory
from peftaudit.memory.plan import TrainingPlan
from peftaudit.memory.prompts import prompt_dtype
from peftaudit.memory.reached import is_unreached, unreached


@dataclass(frozen=True)
class Static:
    base_weights: int
    quantization_constants: int
    trainable_weights: int
    gradients: int
    """Gradients of the trainable weights the step reaches (:mod:`~peftaudit.memory.reached`)."""
    optimizer_states: int
    """States of those weights: torch's optimizers keep none for a weight without a gradient."""
    optimizer_step_scratch: int
    master_weights: int
    optimizer_states_fp32: int
    """States of every trainable weight, fp32: DeepSpeed ZeRO's optimizer steps flat fp32 partitions of all of
    them, reached or not (its master copies, with half weights)."""
    trainable_params: int
    paged_optimizer: bool
    largest_layer_params: int
    """Bytes of the largest layer's weights (ZeRO-3/FSDP gather one or two of these)."""
    quantized_params: int = 0
    """Frozen parameters stored quantized (logical count)."""
    packed_bytes: int = 0
    """Their packed storage (constants apart)."""
    dequantized_trained: int = 0
    """Parameters a pre-quantized checkpoint stores packed that train here, so are dense."""
    flat_gradients: int = 0
    """Gradients of every trainable weight, reached or not: DeepSpeed ZeRO's gradient partitions and
    DDP's buckets are allocated for all of them."""
    flat_optimizer_states: int = 0
    """States of every trainable weight at its own dtype (DeepSpeed ZeRO's flat partitions, fp32 weights)."""
    rank_allocator: int = 0
    """AdaLoRA's rank allocator statistics (three per adapter weight), counted in the optimizer states
    above: persistent between steps, but peft's, not the optimizer's (ZeRO does not partition them)."""
    layerwise_steps: tuple[tuple[int, int], ...] = ()
    """A layer-wise optimizer (layer-wise GaLore, :mod:`peftaudit.memory.galore`) steps each parameter
    in backward as its gradient completes: per gradient size in bytes, the largest step scratch then."""
    tied_gradients: tuple[int, ...] = ()
    """Layer-wise: gradient bytes of each trained tied weight, whose first part (from the output head)
    waits in autograd for the second (from the input embedding): its hook runs once, on the sum."""


def static_memory(inventory: Inventory, plan: TrainingPlan, adaptation: Adaptation, layout: ModelLayout) -> Static:
    """Weights, gradients and optimizer states, per model replica (before sharding)."""
    # Modules stored quantized: bitsandbytes' defaults for plan-driven quantization (QLoRA), or
    # what the checkpoint's own quantization_config converts (layout._formats, one format each).
    quantizable = layout._quantizable
    formats = layout._formats
    experts = layout.checkpoint.expert_formats(inventory) if layout.checkpoint is not None else {}
    quant = adaptation.quantization
    base = consts = trainable_bytes = 0
    quantized_params = packed = dequantized = 0
    tensors: list[TrainableTensor] = []
    reached: list[bool] = []  # per tensor: whether the step gives it a gradient
    skipped = unreached(inventory, plan)
    trainable_params = 0
    tied: list[int] = []  # bytes of trained tied weights (their gradient arrives in two parts)
    per_layer: dict[int, int] = {}
    for p in inventory.parameters:
        trains = p.name in adaptation.trainable or _in_saved(p, adaptation)
        dtype = layout.param_dtype(p, trains)  # float32 where the model keeps it so (T5's wo in fp16)
        stored_packed = (p.module in formats and not p.is_bias) or p.name in experts
        if trains:
            size = p.numel * nbytes(dtype)
            trainable_bytes += size
            low_rank = plan.galore_rank if p.name in adaptation.low_rank else 0
            tensors.append(TrainableTensor(p.shape, dtype, low_rank, plan.galore_proj))
            reached.append(not is_unreached(p.name, skipped))
            tied += [size] if p.tied_with else []
            trainable_params += p.numel
            dequantized += p.numel if stored_packed else 0
            if _in_saved(p, adaptation) and p.name not in adaptation.trainable:
                base += size  # the frozen original stays next to the trained copy
        elif quant is not None and p.module in quantizable and not p.is_bias and len(p.shape) == 2:
            size, c = _quantized(quant, p, plan, layout)
            base += size
            consts += c
            quantized_params += p.numel
            packed += size
        elif p.name in experts:
            count, rows, cols = p.shape  # fused (experts, out, in), each expert scaled on its own
            size, c = (count * v for v in experts[p.name].storage(rows, cols))
            base += size
            consts += c
            quantized_params += p.numel
            packed += size
        else:
            size = p.numel * nbytes(dtype)
            base += size
        if p.layer is not None:
            per_layer[p.layer] = per_layer.get(p.layer, 0) + size
    base += sum(b.numel * nbytes(short(b.dtype)) for b in inventory.buffers)
    adapter_dtype = plan.weight_dtype if plan.adapter_dtype == "auto" else plan.adapter_dtype
    # Adapter weights peft creates frozen (mica's lora_B) stay in fp32 unless the adapters follow the base:
    # an explicit bf16/fp16 adapter dtype casts the trainable ones only.
    frozen_dtype = plan.weight_dtype if plan.adapter_dtype == "auto" else "fp32"
    # Buffers the method adds (VeRA's shared projections, OFT's indices, BOFT's permutations): stored
    # like the model's own buffers, never trained.
    base += adaptation.buffer_bytes
    allocator = 0
    for a in adaptation.adapters:
        n = a.params
        trainable_bytes += n * nbytes(adapter_dtype)
        trainable_params += n
        tensors.extend(TrainableTensor(shape, adapter_dtype) for shape in a.tensors())
        base += a.frozen_params * nbytes(frozen_dtype)
        reached += [not is_unreached(a.path, skipped)] * (len(tensors) - len(reached))
        if a.kind == "adalora" and plan.adalora_allocator and plan.training:
            # RankAllocator.update_ipt (peft tuners/adalora/layer.py) keeps ipt, exp_avg_ipt and
            # exp_avg_unc, zeros_like each lora_A, lora_E and lora_B, from the first
            # update_and_allocate on: optimizer-state-like memory (ranknum is not among them).
            allocator += 3 * sum(math.prod(shape) for shape in a.tensors()[:3])
    allocator *= nbytes(adapter_dtype)
    # peft builds prompt encoders (prompt tuning's embedding too) in float32 after the model is loaded and
    # never casts them (peft_model.py:_setup_prompt_encoder); only an explicit adapter dtype changes that.
    dtype = prompt_dtype(plan)
    for shape in adaptation.prompt_shapes:
        tensor = TrainableTensor(shape, dtype)
        trainable_bytes += tensor.numel * nbytes(dtype)
        trainable_params += tensor.numel
        tensors.append(tensor)
        reached.append(True)
    if not plan.training:
        return Static(
            base,
            consts,
            trainable_bytes,
            0,
            0,
            0,
            0,
            0,
            trainable_params,
            False,
            max(per_layer.values(), default=0),
            quantized_params,
            packed,
            dequantized,
        )
    stepped = [t for t, r in zip(tensors, reached, strict=True) if r]
    grads = sum(t.numel * nbytes(t.dtype) for t in stepped)
    optimizer = adaptation.optimizer or plan.optimizer  # GaLore brings its own
    opt = optimizer_memory(optimizer, plan.optimizer_impl, stepped)
    flat = optimizer_memory(optimizer, plan.optimizer_impl, tensors)
    # DeepSpeed's mixed-precision optimizer steps fp32 master weights, so there its states are fp32.
    opt32 = optimizer_memory(optimizer, plan.optimizer_impl, [replace(t, dtype="fp32") for t in tensors])
    layerwise = galore_in_flight(stepped) if adaptation.layerwise else ()
    return Static(
        base_weights=base,
        quantization_constants=consts,
        trainable_weights=trainable_bytes,
        gradients=grads,
        optimizer_states=opt.states + allocator,
        optimizer_step_scratch=opt.step_temporaries,
        master_weights=0,
        optimizer_states_fp32=opt32.states + allocator,
        trainable_params=trainable_params,
        paged_optimizer=opt.paged,
        largest_layer_params=max(per_layer.values(), default=0),
        quantized_params=quantized_params,
        packed_bytes=packed,
        dequantized_trained=dequantized,
        flat_gradients=sum(t.numel * nbytes(t.dtype) for t in tensors),
        flat_optimizer_states=flat.states + allocator,
        rank_allocator=allocator,
        layerwise_steps=layerwise,
        tied_gradients=tuple(tied) if adaptation.layerwise else (),
    )


def _in_saved(p: ParameterRecord, adaptation: Adaptation) -> bool:
    return any(p.module == s.path or p.module.startswith(s.path + ".") for s in adaptation.saved)


def _quantized(quant: str, p: ParameterRecord, plan: TrainingPlan, layout: ModelLayout) -> tuple[int, int]:
    """(packed bytes, constant bytes) of a frozen linear weight: the checkpoint's format, or the plan's."""
    fmt = layout._formats.get(p.module)
    if fmt is not None:
        # The module's features, not p.shape: a live bitsandbytes weight has a packed shape.
        m = layout._modules.get(p.module)
        out_f, in_f = (m.out_features, m.in_features) if m is not None else (None, None)
        return fmt.storage(out_f or p.shape[0], in_f or p.shape[1])
    if quant in ("nf4", "fp4"):
        return nf4_bytes(p.numel, double_quant=plan.double_quant)
    if quant == "int8":
        return int8_bytes(p.numel, p.shape[0])
    return fp8_bytes(p.shape[0], p.shape[1])
