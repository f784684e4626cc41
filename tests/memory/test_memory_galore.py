"""GaLore (``--method galore``/``galore-layerwise``) against transformers, galore-torch and the paper.

* the targets are transformers' own selection (``trainer_utils.check_target_module_exists`` over the
  ``nn.Linear`` modules, and the param groups of its ``_get_galore_optimizer``);
* the optimizer states are those a real ``GaLoreAdamW`` step leaves in ``optimizer.state`` on a small
  real CPU model, projector storages included;
* one matrix's states are the paper's mr + 2nr (Zhao et al. 2024, arXiv:2403.03507, Table 1);
* the estimate is within 10 % of the trace, which runs transformers' GaLore setup and galore-torch's step;
* a quantized base, and layer-wise GaLore with gradient accumulation or several GPUs, are one-line errors.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from typing import Any

import pytest
from memory_models import build

from peftaudit.memory import PlanError, TrainingPlan, estimate, trace
from peftaudit.memory.galore import GALORE_METHODS, galore_targets
from peftaudit.memory.optimizers import TrainableTensor, galore_shapes, optimizer_memory

pytest.importorskip("galore_torch")

TARGET_CASES: list[str | tuple[str, ...]] = [
    ("attn", "mlp"),
    ("q_proj", "v_proj"),
    (r"model\.layers\.1\.mlp\..*",),
    r".*\.(gate|up)_proj",
    "all-linear",
]


def _transformers_targets(model: Any, targets: str | tuple[str, ...]) -> set[str]:
    """``_setup_low_rank_optimizer``'s loop (transformers 5.25 trainer_optimizer.py:137-157), run on
    transformers' own matcher."""
    import torch
    from transformers.trainer_utils import check_target_module_exists

    spec = list(targets) if isinstance(targets, tuple) else targets
    every = isinstance(spec, str) and spec.replace("_", "-") == "all-linear"
    names = {
        f"{name}.weight"
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and (every or check_target_module_exists(spec, name))
    }
    return names & {n for n, _ in model.named_parameters()}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("targets", TARGET_CASES)
def test_targets_are_transformers_selection(inventory_of, arch: str, targets: str | tuple[str, ...]) -> None:
    expected = _transformers_targets(build(arch), targets)
    plan = TrainingPlan(method="galore", galore_targets=targets)
    if not expected and arch == "gpt2" and targets != "all-linear":
        # GPT-2's attention and MLP are Conv1D, which transformers skips: no target, its ValueError.
        with pytest.raises(PlanError, match=r"match no nn\.Linear module"):
            galore_targets(inventory_of(arch), plan)
        return
    assert set(galore_targets(inventory_of(arch), plan)) == expected


def test_trace_optimizer_groups_are_the_targets(inventory_of) -> None:
    """The trace builds GaLore with transformers' ``_get_galore_optimizer``: its rank group holds
    exactly the estimate's targets (a tied head stays in the plain group, transformers names it once)."""
    from peftaudit.memory.tracing.optimizer import optimizer_for

    for arch in ("llama", "qwen2"):
        model = build(arch)
        plan = TrainingPlan(method="galore", galore_targets="all-linear", galore_rank=8)
        names = {id(p): n for n, p in model.named_parameters()}
        params = [p for p in model.parameters() if p.requires_grad]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            states, _ = optimizer_for(plan, params, model)
        (opt,) = states._optimizers
        low = {names[id(p)] for g in opt.param_groups if "rank" in g for p in g["params"]}
        assert low == set(galore_targets(inventory_of(arch), plan))


def _real_step(dtype: str, proj: str) -> tuple[int, int, Any]:
    """One real GaLoreAdamW step on a small real Llama on the CPU: (state bytes, estimated, model)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.trainer_optimizer import OptimizerContext, _get_galore_optimizer
    from transformers.training_args import OptimizerNames, ParallelMode

    from peftaudit.inventory import take_inventory

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=96,
    )
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    args = dataclasses.make_dataclass("Args", ["optim", "optim_target_modules", "parallel_mode"])(
        OptimizerNames.GALORE_ADAMW, ["attn", "mlp"], ParallelMode.NOT_DISTRIBUTED
    )
    ctx = OptimizerContext(args, model, {"lr": 1e-3}, {}, {"rank": "8", "proj_type": proj})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cls, kwargs = _get_galore_optimizer(ctx)
        opt = cls(**kwargs)
    ids = torch.randint(0, 96, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    storages: dict[int, int] = {}
    for state in opt.state.values():
        tensors = [v for v in state.values() if isinstance(v, torch.Tensor)]
        projector = state.get("projector")
        if projector is not None:
            m = projector.ortho_matrix
            tensors += m if isinstance(m, list) else [m]
        for t in tensors:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    precision = "fp32" if dtype == "float32" else "bf16-true"
    plan = TrainingPlan(method="galore", precision=precision, galore_rank=8, galore_proj=proj, seq_len=16)
    estimated = estimate(take_inventory(model), plan).components["optimizer_states"]
    return sum(storages.values()), estimated, model


@pytest.mark.parametrize(
    ("dtype", "proj"), [("float32", "std"), ("bfloat16", "std"), ("float32", "full"), ("bfloat16", "reverse_std")]
)
def test_states_equal_a_real_galore_step(dtype: str, proj: str) -> None:
    """Every state tensor a real step leaves, by storage: exp_avg/exp_avg_sq of the low-rank gradient,
    the projector (in fp32 a view that keeps the whole U or Vh of the SVD), plain Adam for the rest."""
    real, estimated, _ = _real_step(dtype, proj)
    assert estimated == real


def test_paper_state_count() -> None:
    """Zhao et al. 2024, Table 1: an m x n weight (m <= n) keeps mr + 2nr optimizer state elements; the
    larger side gets the two moments either way (galore-torch's std projection)."""
    for m, n, r in ((1024, 4096, 128), (4096, 1024, 128), (512, 512, 64)):
        t = TrainableTensor((m, n), "bf16", low_rank=r)
        small, large = min(m, n), max(m, n)
        assert optimizer_memory("galore_adamw", "fused", [t]).states == 2 * (small * r + 2 * large * r)
        low, projectors, _ = galore_shapes(t)
        assert sum(a * b for a, b in projectors) + 2 * low[0] * low[1] == small * r + 2 * large * r
    # A rank above the smaller side keeps that side (the SVD's slices stop there).
    assert galore_shapes(TrainableTensor((64, 256), "bf16", low_rank=128))[0] == (64, 256)


@pytest.mark.parametrize("method", ["galore", "galore-layerwise"])
@pytest.mark.parametrize("ckpt", [False, True])
def test_estimate_within_ten_percent_of_the_trace(inventory_of, method: str, ckpt: bool) -> None:
    plan = TrainingPlan(method=method, seq_len=128, batch_size=1, galore_rank=32, gradient_checkpointing=ckpt)
    analytic = estimate(inventory_of("llama"), plan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = trace(build("llama"), plan)
    assert abs(analytic.allocated_bytes / traced.allocated_bytes - 1.0) <= 0.10, (
        analytic.components,
        traced.components,
    )
    assert analytic.trainable_params == traced.trainable_params
    assert analytic.peak_phase == traced.peak_phase


@pytest.mark.parametrize("method", ["galore", "galore-layerwise"])
def test_tied_embeddings_all_linear_within_ten_percent_of_the_trace(inventory_of, method: str) -> None:
    """Qwen2 ties its head to the embedding: all-linear leaves that tensor plain (transformers names it
    once), and layer-wise, its gradient's first part waits in autograd for the second."""
    plan = TrainingPlan(method=method, seq_len=128, batch_size=1, galore_rank=32, galore_targets="all-linear")
    analytic = estimate(inventory_of("qwen2"), plan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = trace(build("qwen2"), plan)
    assert abs(analytic.allocated_bytes / traced.allocated_bytes - 1.0) <= 0.10, (
        analytic.components,
        traced.components,
    )


def test_layerwise_keeps_no_full_set_of_gradients(inventory_of) -> None:
    """Layer-wise GaLore never holds every gradient: its peak is in backward, below plain GaLore's
    optimizer step, and its gradients at the peak are one parameter's (no tied weights here)."""
    inventory = inventory_of("llama")
    plain = estimate(inventory, TrainingPlan(method="galore", seq_len=128, galore_rank=32))
    layerwise = estimate(inventory, TrainingPlan(method="galore-layerwise", seq_len=128, galore_rank=32))
    assert plain.peak_phase == "optimizer step" and "optimizer step" not in layerwise.phase_peaks
    assert layerwise.components["gradients"] < plain.components["gradients"] / 5
    assert layerwise.components["optimizer_states"] == plain.components["optimizer_states"]
    assert layerwise.allocated_bytes < plain.allocated_bytes


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"method": "galore", "base_dtype": "nf4"}, "GaLore trains every weight; a quantized base cannot train"),
        ({"method": "galore-layerwise", "base_dtype": "int8"}, "a quantized base cannot train"),
        ({"method": "galore-layerwise", "gradient_accumulation": 2}, "does not support gradient accumulation"),
        ({"method": "galore-layerwise", "gpus": 2, "sharding": "ddp"}, "does not support DDP"),
        ({"method": "galore", "optimizer": "adamw_8bit"}, "galore_adamw_8bit, galore_adafactor) is not modelled"),
        ({"method": "galore", "gpus": 2, "sharding": "zero2"}, "zero2 sharding is not modelled"),
        ({"method": "lora", "galore_rank": 8}, "galore_rank applies to galore or galore-layerwise, not lora"),
        ({"method": "galore", "galore_proj": "diagonal"}, "unknown galore proj 'diagonal'"),
        ({"method": "galore", "galore_targets": "(unclosed"}, "is not a valid regular expression"),
        ({"method": "galore", "galore_targets": ("attn", "(unclosed")}, "is not a valid regular expression"),
    ],
)
def test_refusals_are_one_line(inventory_of, fields: dict[str, Any], message: str) -> None:
    with pytest.raises(PlanError) as info:
        estimate(inventory_of("llama"), TrainingPlan(**fields))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_pre_quantized_checkpoint_is_refused(inventory_of) -> None:
    quantized = dataclasses.replace(
        inventory_of("llama"), quantization_config={"quant_method": "bitsandbytes", "load_in_4bit": True}
    )
    with pytest.raises(PlanError, match="a quantized base cannot train"):
        estimate(quantized, TrainingPlan(method="galore"))


def test_plan_round_trip() -> None:
    plan = TrainingPlan(method="galore", galore_targets=["attn", "mlp"], galore_rank=64, galore_proj="full")
    assert plan.galore_targets == ("attn", "mlp")
    assert TrainingPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan


def test_cli(capsys: pytest.CaptureFixture[str]) -> None:
    """The offline catalog's GPT-2: its attention and MLP are Conv1D, so the default targets are an
    error (exit 2, one line); all-linear picks only the head, tied to the embedding, so every weight
    is plain Adam of galore-torch's, as transformers would run it."""
    from peftaudit.cli import main

    assert main(["report", "gpt2", "--method", "galore", "--json"]) == 2
    err = capsys.readouterr().err.strip()
    assert "match no nn.Linear module" in err and "\n" not in err
    assert main(["report", "gpt2", "--method", "galore", "--galore-targets", "all-linear", "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)["estimates"]
    assert result["method"] == "galore" and result["plan"]["galore_targets"] == "all-linear"
    assert result["trainable_params"] == 124_439_808
    # No target: galore-torch's plain Adam, two states in the bf16 weights' dtype.
    assert result["components"]["optimizer_states"] == 2 * result["components"]["trainable_weights"]
    args = ["report", "meta-llama/Llama-3.2-1B", "--method", "galore-layerwise", "--galore-rank", "256", "--json"]
    assert main(args) == 0
    (result,) = json.loads(capsys.readouterr().out)["estimates"]
    assert result["peak_phase"] != "optimizer step" and result["plan"]["galore_rank"] == 256


def test_the_plan_names_the_registered_galore_methods() -> None:
    """plan.py lists GaLore's method names for its option checks without importing the methods."""
    from peftaudit.memory.plan import GALORE_METHOD_NAMES

    assert tuple(m.name for m in GALORE_METHODS) == GALORE_METHOD_NAMES
