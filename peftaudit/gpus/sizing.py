"""Sizing answers from the memory estimator: what fits where, how much, how long, how dear.

Every answer is a search over :func:`peftaudit.memory.estimate`, never a rule
of thumb: a GPU fits a plan when the estimated peak per GPU (CUDA context and
allocator margin included) is at most the GPU's usable memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from peftaudit.errors import PeftauditError

if TYPE_CHECKING:  # pragma: no cover
    from peftaudit.gpus.catalog import GPU
    from peftaudit.inventory import Inventory
    from peftaudit.memory import TrainingPlan
    from peftaudit.progress import Progress

#: GPU counts tried when one GPU is not enough.
GPU_COUNTS: tuple[int, ...] = (2, 4, 8, 16, 32, 64, 128)
#: Ways to spread a plan over several GPUs, cheapest in communication first.
SCALE_OUT: tuple[tuple[str, str], ...] = (
    ("ddp", "none"),
    ("zero2", "none"),
    ("zero3", "none"),
    ("zero3", "optimizer"),
    ("zero3", "both"),
)
#: Sequence lengths are searched in steps of this many tokens.
SEQ_STEP = 64
#: Objectives whose ``batch_size`` counts preference pairs: each pair is two sequences (chosen, rejected).
PAIR_OBJECTIVES: tuple[str, ...] = ("dpo", "orpo", "simpo", "reward")


def batch_unit(plan: TrainingPlan) -> str:
    """What ``plan.batch_size`` counts: ``pairs`` (:data:`PAIR_OBJECTIVES`), ``prompts`` (GRPO: each
    generates ``plan.generations`` completions) or ``sequences``."""
    if plan.objective in PAIR_OBJECTIVES:
        return "pairs"
    return "prompts" if plan.objective == "grpo" else "sequences"


def vllm_bytes(plan: TrainingPlan, gpu: GPU) -> int:
    """Bytes of ``gpu`` a colocated vLLM engine holds beside the training step (0 without one).

    TRL's ``vllm_gpu_memory_utilization`` becomes vLLM's ``gpu_memory_utilization``, a fraction of the
    device's total memory as the driver reports it (``requested_memory = ceil(total_memory x
    gpu_memory_utilization)``, vllm/v1/worker/utils.py ``request_memory``): the catalog's usable memory.
    A vLLM server (``vllm-server``) runs on other GPUs and ``transformers`` generates in the step itself.
    """
    return vllm_share(plan, gpu.usable_bytes)


def vllm_share(plan: TrainingPlan, total_bytes: int) -> int:
    """Bytes a colocated vLLM engine holds of a device with ``total_bytes`` (0 without one): :func:`vllm_bytes`."""
    if plan.objective != "grpo" or plan.generation != "vllm-colocate":
        return 0
    return math.ceil(total_bytes * plan.vllm_memory)


def training_usable_bytes(plan: TrainingPlan, gpu: GPU) -> int:
    """What the training step of ``plan`` may use of one ``gpu``: its usable memory less a colocated vLLM's."""
    return gpu.usable_bytes - vllm_bytes(plan, gpu)


@dataclass(frozen=True)
class Fit:
    """One plan on one GPU type: the peak per GPU against the GPU's usable memory."""

    gpu: str
    method: str
    gpus: int
    sharding: str
    offload: str
    batch_size: int
    seq_len: int
    gradient_checkpointing: bool
    peak_bytes: int
    usable_bytes: int
    """What the training step may use: the GPU's usable memory less what a colocated vLLM holds."""
    objective: str = "sft"
    generations: int = 0
    """GRPO: completions per prompt (``batch_size`` counts prompts); 0 for the other objectives."""
    completion_len: int = 0
    """GRPO: tokens per completion, within ``seq_len``; 0 for the other objectives."""
    vllm_bytes: int = 0
    """GRPO with vLLM colocated: the GPU's memory vLLM holds, already taken out of ``usable_bytes``."""

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.usable_bytes

    @property
    def headroom_bytes(self) -> int:
        """Usable memory left at the peak (negative when it does not fit)."""
        return self.usable_bytes - self.peak_bytes

    def setup(self) -> str:
        """``1x``, ``4x zero3``, ``8x zero3 + offload optimizer``, ``+ grad. ckpt`` when it is on."""
        text = f"{self.gpus}x"
        if self.gpus > 1 or self.sharding != "none":
            text += f" {self.sharding}"
        if self.offload != "none":
            text += f" + offload {self.offload}"
        if self.gradient_checkpointing:
            text += " + grad. ckpt"
        return text

    def applied_to(self, plan: TrainingPlan) -> TrainingPlan:
        """``plan`` as this setup runs it: its GPU count, sharding, offload and checkpointing.

        Time and cost must come from this plan: a setup that switched gradient checkpointing on
        pays for recomputing the forward pass.
        """
        return plan.with_(
            gpus=self.gpus,
            sharding=self.sharding,
            offload=self.offload,
            gradient_checkpointing=self.gradient_checkpointing,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data; an objective's own sizes (GRPO's generations, completion, vLLM) only under it."""
        data: dict[str, Any] = {
            "gpu": self.gpu,
            "method": self.method,
            "gpus": self.gpus,
            "sharding": self.sharding,
            "offload": self.offload,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "gradient_checkpointing": self.gradient_checkpointing,
            "peak_bytes": self.peak_bytes,
            "usable_bytes": self.usable_bytes,
            "fits": self.fits,
            "headroom_bytes": self.headroom_bytes,
        }
        if self.objective != "sft":
            data["objective"] = self.objective
        if self.objective == "grpo":
            data.update(generations=self.generations, completion_len=self.completion_len, vllm_bytes=self.vllm_bytes)
        return data


Estimator = Callable[["Inventory", "TrainingPlan"], int]


def peak_bytes(inventory: Inventory, plan: TrainingPlan) -> int:
    """The estimator's peak per GPU for ``plan``."""
    from peftaudit.memory import estimate

    return int(estimate(inventory, plan).total_bytes)


def fit(inventory: Inventory, plan: TrainingPlan, gpu: GPU, *, peak: Estimator = peak_bytes) -> Fit:
    """Whether ``plan`` fits one ``gpu`` (per GPU, at the plan's own GPU count and sharding).

    A colocated vLLM engine (GRPO, ``vllm-colocate``) holds its share of the GPU first: the step must fit
    in the rest (:func:`training_usable_bytes`).
    """
    grpo = plan.objective == "grpo"
    held = vllm_bytes(plan, gpu)
    return Fit(
        gpu=gpu.name,
        method=plan.method,
        gpus=plan.gpus,
        sharding=plan.sharding,
        offload=plan.offload,
        batch_size=plan.batch_size,
        seq_len=plan.seq_len,
        gradient_checkpointing=plan.gradient_checkpointing,
        peak_bytes=peak(inventory, plan),
        usable_bytes=gpu.usable_bytes - held,
        objective=plan.objective,
        generations=plan.generations if grpo else 0,
        completion_len=plan.completion_len if grpo else 0,
        vllm_bytes=held,
    )


def smallest_setup(
    inventory: Inventory, plan: TrainingPlan, gpu: GPU, *, max_gpus: int = 128, peak: Estimator = peak_bytes
) -> Fit:
    """The fewest GPUs of this type that hold ``plan``, with the sharding that makes it fit.

    For 1, then 2, 4, 8, ... GPUs: the plan as given (one GPU) or with DDP,
    ZeRO-2, ZeRO-3, ZeRO-3 with the optimizer offloaded, and with parameters
    offloaded too; at each count, gradient checkpointing is switched on as a
    last resort when the plan did not ask for it (activations do not shard) and
    the method and the model allow it (:func:`checkpointing_skipped`).
    Returns the last setup tried (which does not fit) when none does.
    """
    return _first_fit(inventory, _setups(inventory, plan, max_gpus), gpu, peak)


def checkpointing_skipped(inventory: Inventory, plan: TrainingPlan) -> str | None:
    """Why the searches do not try ``plan`` with gradient checkpointing on, or ``None`` where they may.

    The method (peft's prefix tuning) or the model's class (ConvNeXt) refuses it
    (:func:`peftaudit.memory.checkpointing.checkpointing_refused`): such a setup is left out, not failed.
    """
    from peftaudit.memory.checkpointing import checkpointing_refused

    return checkpointing_refused(inventory, plan.with_(gradient_checkpointing=True))


def checkpointing_notes(inventory: Inventory, plans: Sequence[TrainingPlan]) -> list[str]:
    """One line per method whose plans the searches size without gradient checkpointing, saying why."""
    notes = (checkpointing_note(plan.method, checkpointing_skipped(inventory, plan)) for plan in plans)
    return list(dict.fromkeys(note for note in notes if note))


def checkpointing_note(method: str, reason: str | None) -> str | None:
    """``prefix-tuning: gradient checkpointing not tried (REASON)``, or ``None`` without a reason."""
    return f"{method}: gradient checkpointing not tried ({reason})" if reason else None


def _setups(inventory: Inventory, plan: TrainingPlan, max_gpus: int) -> list[TrainingPlan]:
    """The setups :func:`smallest_setup` tries, in its order."""
    checkpointing = [plan.gradient_checkpointing]
    if not plan.gradient_checkpointing and checkpointing_skipped(inventory, plan) is None:
        checkpointing.append(True)
    setups: list[tuple[int, str, str, bool]] = [(1, "none", "none", gc) for gc in checkpointing]
    for count in (c for c in GPU_COUNTS if c <= max_gpus):
        setups += [(count, sharding, offload, gc) for gc in checkpointing for sharding, offload in SCALE_OUT]
    return [
        plan.with_(gpus=count, sharding=sharding, offload=offload, gradient_checkpointing=gc)
        for count, sharding, offload, gc in setups
    ]


def _first_fit(inventory: Inventory, setups: Sequence[TrainingPlan], gpu: GPU, peak: Estimator) -> Fit:
    """The first of ``setups`` that fits ``gpu``, else the last one."""
    last: Fit | None = None
    for candidate in setups:
        last = fit(inventory, candidate, gpu, peak=peak)
        if last.fits:
            return last
    assert last is not None
    return last


#: The largest micro-batch the batch search tries.
MAX_BATCH = 1 << 16
#: The longest sequence the sequence search tries for a model whose config states no context.
MAX_SEQ = 1 << 20


@dataclass(frozen=True)
class Largest:
    """The largest value a search found to fit, and the cap it searched up to.

    ``capped`` says the search stopped at its cap, not at the memory: the value
    fits, and more might, but the model's context (or the stated maximum) ends the search.
    """

    value: int
    """The largest that fits; 0 when not even the smallest does."""
    cap: int
    """The most the search could try: the model's ``max_position_embeddings``, or the search's maximum."""
    cap_reason: str
    """``context`` (the model's ``max_position_embeddings``) or ``search-limit`` (a stated maximum)."""
    capped: bool
    """Whether the value is the largest the cap allows (the next step would pass the cap)."""

    def cap_to_dict(self) -> dict[str, Any] | None:
        """``{"limit": 131072, "reason": "context"}`` when the search hit its cap, else ``None``."""
        return {"limit": self.cap, "reason": self.cap_reason} if self.capped else None


def largest_batch_size(
    inventory: Inventory, plan: TrainingPlan, gpu: GPU, *, limit: int = MAX_BATCH, peak: Estimator = peak_bytes
) -> Largest:
    """The largest micro-batch that fits, up to ``limit`` (capped when ``limit`` itself fits)."""
    best = _largest(lambda n: fit(inventory, plan.with_(batch_size=n), gpu, peak=peak).fits, 1, limit, 1)
    return Largest(max(best, 0), limit, "search-limit", best >= limit)


def largest_seq_len(
    inventory: Inventory,
    plan: TrainingPlan,
    gpu: GPU,
    *,
    limit: int | None = None,
    step: int = SEQ_STEP,
    peak: Estimator = peak_bytes,
) -> Largest:
    """The longest sequence (a multiple of ``step``) that fits, up to ``limit``.

    ``limit`` defaults to the model's ``max_position_embeddings`` (the cap is then
    the model's context), or :data:`MAX_SEQ` tokens when the config states none. A GRPO plan keeps its
    completion length, so the search starts at the first step that leaves a prompt (0 when none fits).
    """
    context = inventory.dims.max_position_embeddings
    ceiling = limit or context or MAX_SEQ
    reason = "context" if not limit and context else "search-limit"
    top = ceiling // step
    low = plan.completion_len // step + 1 if plan.objective == "grpo" else 1
    steps = _largest(lambda k: fit(inventory, plan.with_(seq_len=k * step), gpu, peak=peak).fits, low, top, 1)
    return Largest(steps * step if steps >= low else 0, ceiling, reason, steps >= top >= low)


def max_batch_size(
    inventory: Inventory, plan: TrainingPlan, gpu: GPU, *, limit: int = MAX_BATCH, peak: Estimator = peak_bytes
) -> int:
    """The largest micro-batch that fits (0 when not even one sequence does); :func:`largest_batch_size`'s value."""
    return largest_batch_size(inventory, plan, gpu, limit=limit, peak=peak).value


def max_seq_len(
    inventory: Inventory,
    plan: TrainingPlan,
    gpu: GPU,
    *,
    limit: int | None = None,
    step: int = SEQ_STEP,
    peak: Estimator = peak_bytes,
) -> int:
    """The longest sequence (a multiple of ``step``) that fits, up to ``limit``; :func:`largest_seq_len`'s value.

    ``limit`` defaults to the model's ``max_position_embeddings`` (or 1M tokens
    when the config has none); 0 means not even ``step`` tokens fit.
    """
    return largest_seq_len(inventory, plan, gpu, limit=limit, step=step, peak=peak).value


@dataclass(frozen=True)
class LargestFit:
    """``peftaudit fit``'s answer for one plan: the largest micro-batch at the plan's length and the
    longest sequence at its batch, each with the fit at that size and the cap the search reached."""

    plan: TrainingPlan
    batch: Largest
    seq: Largest
    seq_step: int
    at_max_batch: Fit
    at_max_seq: Fit

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data; under an objective other than sft, its name and what the batch counts."""
        objective = {} if self.plan.objective == "sft" else {"objective": self.plan.objective}
        if objective:
            objective["batch_counts"] = batch_unit(self.plan)
        return {
            "method": self.plan.method,
            "gradient_checkpointing": self.plan.gradient_checkpointing,
            **objective,
            "max_batch_size": self.batch.value,
            "max_batch_size_cap": self.batch.cap_to_dict(),
            "at_seq_len": self.plan.seq_len,
            "max_seq_len": self.seq.value,
            "max_seq_len_cap": self.seq.cap_to_dict(),
            "at_batch_size": self.plan.batch_size,
            "seq_step": self.seq_step,
            "at_max_batch": self.at_max_batch.to_dict(),
            "at_max_seq": self.at_max_seq.to_dict(),
        }


def largest_fit(
    inventory: Inventory, plan: TrainingPlan, gpu: GPU, *, step: int = SEQ_STEP, peak: Estimator = peak_bytes
) -> LargestFit:
    """The largest micro-batch (at ``plan.seq_len``) and the longest sequence (at ``plan.batch_size``) on ``gpu``.

    Not for GRPO, whose sequence holds a completion of fixed length: :func:`largest_generation_fit` searches
    its generations and completion length (:func:`largest_for_objective` picks).
    """
    batch = largest_batch_size(inventory, plan, gpu, peak=peak)
    seq = largest_seq_len(inventory, plan, gpu, step=step, peak=peak)
    return LargestFit(
        plan=plan,
        batch=batch,
        seq=seq,
        seq_step=step,
        at_max_batch=fit(inventory, plan.with_(batch_size=max(batch.value, 1)), gpu, peak=peak),
        at_max_seq=fit(inventory, plan.with_(seq_len=max(seq.value, step)), gpu, peak=peak),
    )


def largest_generations(
    inventory: Inventory, plan: TrainingPlan, gpu: GPU, *, limit: int = MAX_BATCH, peak: Estimator = peak_bytes
) -> Largest:
    """GRPO: the most completions per prompt (``generations``) that fit at the plan's prompts and lengths,
    up to ``limit`` (capped when ``limit`` itself fits)."""
    best = _largest(lambda g: fit(inventory, plan.with_(generations=g), gpu, peak=peak).fits, 1, limit, 1)
    return Largest(max(best, 0), limit, "search-limit", best >= limit)


def prompt_len(plan: TrainingPlan) -> int:
    """GRPO: the prompt's tokens, ``seq_len`` less the completion (``TrainingPlan.completion_len``)."""
    from peftaudit.memory.objectives import objective_step

    return objective_step(plan).prompt


def largest_completion_len(
    inventory: Inventory,
    plan: TrainingPlan,
    gpu: GPU,
    *,
    limit: int | None = None,
    step: int = SEQ_STEP,
    peak: Estimator = peak_bytes,
) -> Largest:
    """GRPO: the longest completion (a multiple of ``step``) that fits after the plan's prompt, up to ``limit``.

    The prompt keeps its length (``seq_len - completion_len``); each try's ``seq_len`` is prompt plus
    completion, so every plan tried leaves a prompt. ``limit`` (on the completion) defaults to the model's
    ``max_position_embeddings`` less the prompt (the cap is then the model's context), or :data:`MAX_SEQ`
    tokens when the config states none.
    """
    prompt = prompt_len(plan)
    context = inventory.dims.max_position_embeddings
    ceiling = limit or (max(context - prompt, 0) if context else MAX_SEQ)
    reason = "context" if not limit and context else "search-limit"
    top = ceiling // step

    def fits(k: int) -> bool:
        return fit(inventory, plan.with_(seq_len=prompt + k * step, completion_len=k * step), gpu, peak=peak).fits

    steps = _largest(fits, 1, top, 1)
    return Largest(max(steps, 0) * step, ceiling, reason, steps >= top > 0)


@dataclass(frozen=True)
class LargestGenerationFit:
    """``peftaudit fit``'s answer for one GRPO plan: the most generations per prompt at the plan's prompt and
    completion lengths, and the longest completion at its generations (the prompts and the prompt's length
    fixed), each with the fit at that size and the cap the search reached."""

    plan: TrainingPlan
    generations: Largest
    completion: Largest
    completion_step: int
    at_max_generations: Fit
    at_max_completion: Fit

    @property
    def prompt_len(self) -> int:
        return prompt_len(self.plan)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.plan.method,
            "gradient_checkpointing": self.plan.gradient_checkpointing,
            "objective": self.plan.objective,
            "prompts": self.plan.batch_size,
            "prompt_len": self.prompt_len,
            "max_generations": self.generations.value,
            "max_generations_cap": self.generations.cap_to_dict(),
            "at_completion_len": self.plan.completion_len,
            "max_completion_len": self.completion.value,
            "max_completion_len_cap": self.completion.cap_to_dict(),
            "at_generations": self.plan.generations,
            "completion_step": self.completion_step,
            "at_max_generations": self.at_max_generations.to_dict(),
            "at_max_completion_len": self.at_max_completion.to_dict(),
        }


def largest_generation_fit(
    inventory: Inventory, plan: TrainingPlan, gpu: GPU, *, step: int = SEQ_STEP, peak: Estimator = peak_bytes
) -> LargestGenerationFit:
    """GRPO on ``gpu``: the most generations (at the plan's completion length) and the longest completion (at its
    generations), both at the plan's prompts and prompt length."""
    generations = largest_generations(inventory, plan, gpu, peak=peak)
    completion = largest_completion_len(inventory, plan, gpu, step=step, peak=peak)
    longest = max(completion.value, step)
    return LargestGenerationFit(
        plan=plan,
        generations=generations,
        completion=completion,
        completion_step=step,
        at_max_generations=fit(inventory, plan.with_(generations=max(generations.value, 1)), gpu, peak=peak),
        at_max_completion=fit(
            inventory, plan.with_(seq_len=prompt_len(plan) + longest, completion_len=longest), gpu, peak=peak
        ),
    )


def largest_for_objective(
    inventory: Inventory, plan: TrainingPlan, gpu: GPU, *, step: int = SEQ_STEP, peak: Estimator = peak_bytes
) -> LargestFit | LargestGenerationFit:
    """What ``peftaudit fit`` searches for ``plan``'s objective: GRPO's generations and completion length
    (:func:`largest_generation_fit`), the others' micro-batch and sequence length (:func:`largest_fit`)."""
    if plan.objective == "grpo":
        return largest_generation_fit(inventory, plan, gpu, step=step, peak=peak)
    return largest_fit(inventory, plan, gpu, step=step, peak=peak)


def _largest(fits: Callable[[int], bool], low: int, high: int, step: int) -> int:
    """Largest n in [low, high] with fits(n), assuming fits is monotone; low - step when none."""
    if high < low or not fits(low):
        return low - step
    # Grow geometrically to bracket the edge, then bisect: O(log n) estimates.
    good, probe = low, low * 2
    while probe <= high and fits(probe):
        good, probe = probe, probe * 2
    bad = min(probe, high + 1)
    while bad - good > step:
        mid = (good + bad) // 2
        if fits(mid):
            good = mid
        else:
            bad = mid
    return good


# --- time and cost ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RunCost:
    """How long a training run takes and what it costs, from FLOPs at a stated utilisation."""

    gpu: str
    gpus: int
    tokens: int
    flops_per_token: float
    total_flops: float
    dtype: str
    peak_tflops: float
    mfu: float
    seconds: float
    price_per_gpu_hour: float | None

    @property
    def gpu_hours(self) -> float:
        return self.seconds * self.gpus / 3600

    @property
    def cost(self) -> float | None:
        return None if self.price_per_gpu_hour is None else self.gpu_hours * self.price_per_gpu_hour

    def to_dict(self) -> dict[str, Any]:
        return {
            "gpu": self.gpu,
            "gpus": self.gpus,
            "tokens": self.tokens,
            "flops_per_token": self.flops_per_token,
            "total_flops": self.total_flops,
            "dtype": self.dtype,
            "peak_tflops": self.peak_tflops,
            "mfu": self.mfu,
            "seconds": self.seconds,
            "gpu_hours": self.gpu_hours,
            "price_per_gpu_hour": self.price_per_gpu_hour,
            "cost": self.cost,
        }


def training_flops_per_token(inventory: Inventory, plan: TrainingPlan) -> float:
    """FLOPs to train on one token under ``plan``.

    A forward pass costs 2 FLOPs per parameter used in a matrix multiply (all
    parameters a token touches, less the input embedding lookup) plus the
    attention scores and weighted sum, 4 x seq_len x heads x head_dim per
    layer. Full fine-tuning's backward costs twice the forward (gradients of
    activations and of weights: 6N in all). With a frozen base the weight
    gradients are skipped, so backward costs one forward, plus the adapters'
    own 6 FLOPs per adapter parameter. Gradient checkpointing recomputes the
    forward once more.
    """
    dims = inventory.dims
    active = inventory.moe.active_params if inventory.moe else inventory.total
    embedding = sum(p.numel for p in inventory.parameters if p.kind == "embedding" and not p.tied_with)
    matmul_params = max(active - embedding, 0)
    layers = dims.num_layers or 0
    heads = dims.num_attention_heads or 0
    head_dim = dims.head_dim or 0
    attention = 4 * plan.seq_len * heads * head_dim * layers
    forward = 2 * matmul_params + attention
    if plan.method == "full":
        per_token = 3.0 * forward
    else:
        from peftaudit.memory import estimate

        trainable = estimate(inventory, plan).trainable_params
        per_token = 2.0 * forward + 6.0 * trainable
    if plan.gradient_checkpointing:
        per_token += forward
    return float(per_token)


def _compute_dtype(plan: TrainingPlan) -> str:
    if plan.precision in ("fp32",):
        return "fp32"
    if plan.precision.startswith("fp16"):
        return "fp16"
    if plan.precision.startswith("fp8"):
        return "fp8"
    return "bf16"


def run_cost(
    inventory: Inventory,
    plan: TrainingPlan,
    gpu: GPU,
    *,
    tokens: int,
    mfu: float = 0.4,
    price_per_gpu_hour: float | None = None,
) -> RunCost:
    """Time and cost of training on ``tokens`` tokens with ``plan.gpus`` GPUs of this type."""
    if tokens <= 0:
        raise PeftauditError(f"--tokens must be positive, got {tokens}")
    if not 0 < mfu <= 1:
        raise PeftauditError(f"--mfu must be between 0 and 1, got {mfu}")
    dtype = _compute_dtype(plan)
    tflops = gpu.dense_tflops(dtype)
    if tflops is None:
        hint = (
            "it runs fp16: use --precision fp16-mixed"
            if dtype == "bf16" and gpu.dense_tflops("fp16")
            else "add `tflops` for it in your GPU file to get time estimates"
        )
        raise PeftauditError(f"{gpu.name} has no published dense {dtype} throughput in the catalog; {hint}")
    per_token = training_flops_per_token(inventory, plan)
    total = per_token * tokens
    seconds = total / (plan.gpus * tflops * 1e12 * mfu)
    price = price_per_gpu_hour if price_per_gpu_hour is not None else gpu.price_per_hour
    return RunCost(
        gpu=gpu.name,
        gpus=plan.gpus,
        tokens=tokens,
        flops_per_token=per_token,
        total_flops=total,
        dtype=dtype,
        peak_tflops=tflops,
        mfu=mfu,
        seconds=seconds,
        price_per_gpu_hour=price,
    )


def sweep(
    inventory: Inventory,
    plans: Sequence[TrainingPlan],
    gpus: Sequence[GPU],
    *,
    max_gpus: int = 128,
    peak: Estimator = peak_bytes,
    progress: Progress | None = None,
) -> list[list[Fit]]:
    """For each GPU, for each plan: the smallest setup that fits (rows follow ``gpus``).

    ``progress(done, total)`` is told how many of the ``len(gpus) x len(plans)`` searches are done.
    """
    total = len(gpus) * len(plans)
    # Every GPU tries the same setups of a plan (smallest_setup's), and a setup's peak per GPU does not
    # depend on the GPU it is compared with: each is made and estimated once (21 GPUs: a tenth of the work).
    once = _memoised(peak)
    setups = [_setups(inventory, plan, max_gpus) for plan in plans]
    rows: list[list[Fit]] = []
    for gpu in gpus:
        row: list[Fit] = []
        for candidates in setups:
            if progress is not None:
                progress(len(rows) * len(plans) + len(row), total)
            row.append(_first_fit(inventory, candidates, gpu, once))
        rows.append(row)
    if progress is not None:
        progress(total, total)
    return rows


def _memoised(peak: Estimator) -> Estimator:
    """``peak`` for one inventory, asked once per plan."""
    known: dict[TrainingPlan, int] = {}

    def once(inventory: Inventory, plan: TrainingPlan) -> int:
        if plan not in known:
            known[plan] = peak(inventory, plan)
        return known[plan]

    return once
