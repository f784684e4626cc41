"""Peak GPU memory of image training (SD 1.5 / SDXL UNets): resolution and batch, not tokens.

Two ways to get a number, both for one GPU:

* :func:`trace_image_training` is the oracle. It builds the UNet on the meta
  device and runs a real training step of diffusers' own code (LoRA via peft on
  :func:`~peftaudit_diffusers.lora_targets`, or full fine-tuning) on fake tensors
  with peftaudit's trace (:func:`peftaudit.plugin_api.run_trace`): latents
  ``(batch, 4, res/8, res/8)``, timesteps, text embeddings ``(batch, 77,
  cross_attention_dim)`` (SDXL: plus ``added_cond_kwargs``), an MSE loss,
  backward and an AdamW step. It takes a few seconds on a CPU.
* :func:`estimate_image_training` is analytic and instant::

      total = base_weights + trainable_weights + optimizer_states
              + max(activations, gradients + optimizer step scratch)
              + cuda_context + allocator_margin
      activations = batch * (per_pixel * (res / 8) ** 2 + per_image)

  Weights, adapters, gradients and optimizer states follow the core estimator's
  rules (``peftaudit.memory``'s methods and optimizer model). ``per_pixel`` and
  ``per_image`` are fitted to the trace at 256 and 768 px, batch 1, for each
  bundled UNet, with and without gradient checkpointing (:data:`CALIBRATION`);
  the tests check the formula against the trace at other resolutions and batches.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from peftaudit.plugin_api import Inventory, PeftauditError, PlanError, TrainingPlan
from peftaudit_diffusers.kinds import UNET
from peftaudit_diffusers.targets import lora_targets

#: The methods this estimate covers.
METHODS: tuple[str, ...] = ("lora", "full")

#: The precisions it is calibrated for: half-precision activations under autocast.
PRECISIONS: tuple[str, ...] = ("bf16", "fp16", "bf16-mixed", "fp16-mixed", "bf16-true", "fp16-true")

#: Calibration points (resolution, batch) the coefficients are fitted to.
CALIBRATION_POINTS: tuple[tuple[int, int], ...] = ((256, 1), (768, 1))


@dataclass(frozen=True)
class Calibration:
    """Activation bytes of one image: ``per_pixel * (res/8)**2 + per_image`` (half precision)."""

    model: str
    total_params: int
    """The UNet's parameter count: how an inventory is matched to its calibration."""
    per_pixel: float
    per_image: float
    per_pixel_checkpointed: float
    per_image_checkpointed: float

    def activations(self, resolution: int, batch_size: int, gradient_checkpointing: bool) -> int:
        pixels = latent_pixels(resolution)
        if gradient_checkpointing:
            return round(batch_size * (self.per_pixel_checkpointed * pixels + self.per_image_checkpointed))
        return round(batch_size * (self.per_pixel * pixels + self.per_image))


#: Fitted to :func:`trace_image_training` (LoRA rank 4, bf16 autocast, SDPA as flash
#: attention) at :data:`CALIBRATION_POINTS`; regenerate with :func:`calibrate`.
CALIBRATION: dict[str, Calibration] = {
    cal.model: cal
    for cal in (
        Calibration("stable-diffusion-v1-5/unet", 859_520_964, 281_742.625, 9_718_152, 66_696, 564_952),
        Calibration("sdxl/unet", 2_567_463_684, 468_472, 81_666_036, 44_000, 380_808),
    )
}


@dataclass(frozen=True)
class ImageMemoryEstimate:
    """Peak memory of one GPU for one image-training step, by component (they add up to ``total_bytes``)."""

    model: str
    method: str
    resolution: int
    batch_size: int
    gradient_checkpointing: bool
    total_bytes: int
    components: Mapping[str, int]
    trainable_params: int
    source: str = "analytic"
    """``analytic`` (the calibrated formula) or ``trace`` (the fake-tensor training step)."""
    calibration: str = ""
    """What the activation term was fitted to."""
    plan: Mapping[str, Any] = field(default_factory=dict)

    @property
    def allocated_bytes(self) -> int:
        """The peak of PyTorch's allocator: the total less the CUDA context and allocator slack."""
        return self.total_bytes - self.components.get("cuda_context", 0) - self.components.get("allocator_margin", 0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "method": self.method,
            "resolution": self.resolution,
            "batch_size": self.batch_size,
            "gradient_checkpointing": self.gradient_checkpointing,
            "total_bytes": self.total_bytes,
            "allocated_bytes": self.allocated_bytes,
            "components": dict(self.components),
            "trainable_params": self.trainable_params,
            "source": self.source,
            "calibration": self.calibration,
            "plan": dict(self.plan),
        }


def latent_pixels(resolution: int) -> int:
    """Latent positions per image: the VAE downsamples by 8 in each direction."""
    return (resolution // 8) ** 2


def image_plan(
    method: str = "lora",
    batch_size: int = 1,
    *,
    gradient_checkpointing: bool = False,
    rank: int = 4,
    **overrides: Any,
) -> TrainingPlan:
    """The :class:`TrainingPlan` of a diffusers training script: LoRA on ``to_q/k/v/out.0`` (rank 4,
    diffusers' default), bf16 autocast, fused AdamW. ``overrides`` are other plan fields."""
    if method not in METHODS:
        raise PlanError(f"image training memory covers methods {', '.join(METHODS)}, not '{method}'")
    fields: dict[str, Any] = {
        "method": method,
        "rank": rank,
        "targets": lora_targets(UNET),
        "batch_size": batch_size,
        "gradient_checkpointing": gradient_checkpointing,
    }
    fields.update(overrides)
    plan = TrainingPlan(**fields)
    plan.validate()
    if plan.precision not in PRECISIONS:
        raise PlanError(f"image training memory is calibrated for half-precision activations, not '{plan.precision}'")
    if plan.sharding not in ("none", "ddp") or plan.gpus > 1:
        raise PlanError("image training memory is for one GPU (no sharding)")
    return plan


def _build(spec: str) -> Any:
    """The UNet ``spec`` on the meta device (a diffusers ``UNet2DConditionModel``)."""
    from peftaudit.plugin_api import SourceOptions
    from peftaudit_diffusers.source import PREFIX, DiffusersSource

    source = DiffusersSource()
    full = spec if spec.lower().startswith(PREFIX) else PREFIX + spec
    resolved = source.resolve(full, SourceOptions())
    if resolved is None:  # pragma: no cover - resolve raises for a diffusers: spec
        raise PeftauditError(f"'{spec}': not a diffusers model")
    model = source.build(resolved, SourceOptions())
    if type(model).__name__ != "UNet2DConditionModel":
        raise PlanError(f"'{spec}': image training memory covers UNet2DConditionModel (SD 1.5, SDXL) only")
    return model


def _spec_name(spec: str) -> str:
    return spec[len("diffusers:") :] if spec.lower().startswith("diffusers:") else spec


# --- the oracle -------------------------------------------------------------------------------------


def trace_image_training(
    spec: str,
    method: str = "lora",
    resolution: int = 512,
    batch_size: int = 1,
    gradient_checkpointing: bool = False,
    *,
    plan: TrainingPlan | None = None,
    steps: int = 2,
) -> ImageMemoryEstimate:
    """Run ``steps`` real training steps of the UNet ``spec`` on fake tensors and return the peak.

    ``spec`` is a bundled name (``stable-diffusion-v1-5/unet``) or a diffusers spec
    (``diffusers:./my-unet``). ``plan`` overrides :func:`image_plan`'s defaults.
    """
    import torch
    import torch.nn.functional as F

    from peftaudit.plugin_api import run_trace

    _check_resolution(resolution)
    plan = plan or image_plan(method, batch_size, gradient_checkpointing=gradient_checkpointing)
    model = _build(spec)
    config: dict[str, Any] = dict(model.config)
    compute = getattr(torch, {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[plan.compute_dtype])
    side = resolution // 8
    text_time = config.get("addition_embed_type") == "text_time"

    def loss_fn(unet: Any) -> Any:
        b = plan.batch_size
        latents = torch.empty(b, config["in_channels"], side, side, dtype=compute)
        noise = torch.empty_like(latents)
        timesteps = torch.zeros(b, dtype=torch.long)
        text = torch.empty(b, 77, config["cross_attention_dim"], dtype=compute)
        kwargs: dict[str, Any] = {}
        if text_time:
            pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
            kwargs["added_cond_kwargs"] = {
                "text_embeds": torch.empty(b, pooled, dtype=compute),
                "time_ids": torch.empty(b, 6, dtype=compute),
            }
        pred = unet(latents, timesteps, text, **kwargs).sample
        return F.mse_loss(pred.float(), noise.float())

    result = run_trace(model, plan, steps=steps, loss_fn=loss_fn)
    return _image_estimate(
        _spec_name(spec),
        plan,
        resolution,
        dict(result.components),
        result.trainable_params,
        source="trace",
        calibration=f"fake-tensor trace of {steps} training step(s), peak in {result.peak_phase}",
    )


def calibrate(spec: str, *, points: tuple[tuple[int, int], ...] = CALIBRATION_POINTS) -> Calibration:
    """Fit the activation coefficients of UNet ``spec`` to the trace (LoRA, with and without checkpointing)."""
    if len(points) != 2 or latent_pixels(points[0][0]) == latent_pixels(points[1][0]):
        raise ValueError("calibrate takes two points of different resolutions")
    from peftaudit.plugin_api import take_inventory

    inventory = take_inventory(_build(spec))
    coeffs: list[float] = []
    for checkpointing in (False, True):
        per_image = []
        for res, batch in points:
            traced = trace_image_training(spec, "lora", res, batch, checkpointing)
            static = _static(inventory, image_plan("lora", batch))
            per_image.append((traced.allocated_bytes - static.resident) / batch)
        (r0, _), (r1, _) = points
        slope = (per_image[1] - per_image[0]) / (latent_pixels(r1) - latent_pixels(r0))
        coeffs += [slope, per_image[0] - slope * latent_pixels(r0)]
    return Calibration(_spec_name(spec), inventory.total, *coeffs)


# --- the analytic estimate ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Static:
    base_weights: int
    trainable_weights: int
    gradients: int
    optimizer_states: int
    step_scratch: int
    trainable_params: int

    @property
    def resident(self) -> int:
        return self.base_weights + self.trainable_weights + self.optimizer_states


def _static(inventory: Inventory, plan: TrainingPlan) -> _Static:
    """Weights, adapters, gradients and optimizer states by the core estimator's rules."""
    from peftaudit.plugin_api import TrainableTensor, dtype_bytes, memory_methods, optimizer_memory, short_dtype

    adaptation = memory_methods()[plan.method].adapt(inventory, plan)
    dense = plan.weight_dtype
    base = trainable = params = 0
    tensors: list[TrainableTensor] = []
    for p in inventory.parameters:
        size = p.numel * dtype_bytes(dense)
        if p.name in adaptation.trainable:
            trainable += size
            params += p.numel
            tensors.append(TrainableTensor(p.shape, dense))
        else:
            base += size
    base += sum(b.numel * dtype_bytes(short_dtype(b.dtype)) for b in inventory.buffers)
    adapter = dense if plan.adapter_dtype == "auto" else plan.adapter_dtype
    for a in adaptation.adapters:
        trainable += a.params * dtype_bytes(adapter)
        params += a.params
        tensors.append(TrainableTensor((a.rank, a.in_features), adapter))
        tensors.append(TrainableTensor((a.out_features, a.rank), adapter))
    grads = sum(t.numel * dtype_bytes(t.dtype) for t in tensors)
    opt = optimizer_memory(plan.optimizer, plan.optimizer_impl, tensors)
    return _Static(base, trainable, grads, opt.states, opt.step_temporaries, params)


def _check_resolution(resolution: int) -> None:
    if resolution <= 0 or resolution % 8:
        raise PlanError(f"resolution {resolution} must be a positive multiple of 8 (the VAE downsamples by 8)")


def calibration_for(inventory: Inventory) -> Calibration:
    """The bundled calibration of the UNet ``inventory`` is (matched by architecture and parameter count)."""
    if inventory.model_type == UNET:
        for cal in CALIBRATION.values():
            if cal.total_params == inventory.total:
                return cal
    known = ", ".join(CALIBRATION)
    raise PlanError(
        f"no image-training activation calibration for this {inventory.architecture} "
        f"({inventory.total:,} parameters); calibrated: {known}. "
        "peftaudit_diffusers.memory.trace_image_training measures any UNet directly"
    )


def estimate_image_training(
    inventory_or_spec: Inventory | str,
    method: str = "lora",
    resolution: int = 512,
    batch_size: int = 1,
    gradient_checkpointing: bool = False,
    *,
    plan: TrainingPlan | None = None,
) -> ImageMemoryEstimate:
    """Peak GPU memory of training a bundled UNet at ``resolution`` px and ``batch_size`` images per step.

    ``inventory_or_spec``: an inventory of the UNet, or a spec such as
    ``stable-diffusion-v1-5/unet`` / ``diffusers:sdxl/unet``. ``plan`` overrides
    :func:`image_plan`'s defaults (rank, optimizer, precision...); its
    ``batch_size`` and ``gradient_checkpointing`` then win over the arguments.
    """
    _check_resolution(resolution)
    plan = plan or image_plan(method, batch_size, gradient_checkpointing=gradient_checkpointing)
    if plan.method not in METHODS:
        raise PlanError(f"image training memory covers methods {', '.join(METHODS)}, not '{plan.method}'")
    if isinstance(inventory_or_spec, str):
        from peftaudit.plugin_api import take_inventory

        inventory = take_inventory(_build(inventory_or_spec))
    else:
        inventory = inventory_or_spec
    cal = calibration_for(inventory)
    static = _static(inventory, plan)
    activations = cal.activations(resolution, plan.batch_size, plan.gradient_checkpointing)
    # The forward/backward peak holds the activations; the step holds all gradients instead.
    step = static.gradients + static.step_scratch
    comps = {
        "base_weights": static.base_weights,
        "trainable_weights": static.trainable_weights,
        "optimizer_states": static.optimizer_states,
        "activations": activations if activations >= step else 0,
        "gradients": static.gradients if activations < step else 0,
        "temporaries": static.step_scratch if activations < step else 0,
    }
    return _image_estimate(
        cal.model,
        plan,
        resolution,
        comps,
        static.trainable_params,
        source="analytic",
        calibration=f"activations fitted to the fake-tensor trace at {_points()} (LoRA, bf16 autocast)",
    )


def _image_estimate(
    model: str,
    plan: Any,
    resolution: int,
    comps: dict[str, int],
    trainable_params: int,
    *,
    source: str,
    calibration: str,
) -> ImageMemoryEstimate:
    """The estimate from its components, with the fixed costs every estimate carries added."""
    comps = _with_overheads(comps, plan)
    return ImageMemoryEstimate(
        model=model,
        method=plan.method,
        resolution=resolution,
        batch_size=plan.batch_size,
        gradient_checkpointing=plan.gradient_checkpointing,
        total_bytes=sum(comps.values()),
        components=comps,
        trainable_params=trainable_params,
        source=source,
        calibration=calibration,
        plan=plan.to_dict(),
    )


#: The allocator margin of an image-model step, as a fraction of allocated memory. The core's
#: margins are learned from replays of language-model steps (peftaudit.memory.allocator.reserve),
#: whose working sets look nothing like a UNet's; this is the figure the published image-model
#: measurements above were calibrated with. ``--allocator-margin`` replaces it.
IMAGE_ALLOCATOR_FRACTION = 0.10


def _with_overheads(comps: dict[str, int], plan: Any) -> dict[str, int]:
    """Add the CUDA context and the allocator margin, the same two fixed costs the core estimate adds."""
    allocated = sum(comps.values())
    fraction = IMAGE_ALLOCATOR_FRACTION if plan.allocator_fraction is None else plan.allocator_fraction
    return {
        **comps,
        "cuda_context": int(plan.cuda_context_bytes),
        "allocator_margin": round(allocated * fraction),
    }


def _points() -> str:
    return " and ".join(f"{r} px x {b}" for r, b in CALIBRATION_POINTS)
