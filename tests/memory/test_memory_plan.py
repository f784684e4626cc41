"""TrainingPlan: defaults, round trips, and bad plans that must fail loudly."""

from __future__ import annotations

import dataclasses

import pytest

from peftaudit.errors import PeftauditError
from peftaudit.memory import PlanError, TrainingPlan, estimate


def test_every_field_has_a_default_and_a_docstring() -> None:
    import inspect

    source = inspect.getsource(TrainingPlan)
    plan = TrainingPlan()
    for f in dataclasses.fields(TrainingPlan):
        assert f.default is not dataclasses.MISSING, f.name
        # Each field is followed by its own docstring in the class body.
        after = source.split(f"    {f.name}:", 1)[1].split("\n", 2)
        assert '"""' in after[1], f"{f.name} has no docstring"
    assert plan.method == "lora" and plan.rank == 16 and plan.targets == "all-linear"
    assert plan.precision == "bf16" and plan.optimizer == "adamw" and plan.optimizer_impl == "fused"


def test_plan_round_trips_through_a_dict() -> None:
    plan = TrainingPlan(
        method="qlora",
        targets=("q_proj", "v_proj"),
        rank_pattern={"q_proj": 8, "v_proj": 4},
        modules_to_save=["lm_head"],
        seq_len=4096,
        layers_to_transform=[0, 1],
        bdlora_a=["o_proj"],
        bdlora_blocks=2,
    )
    data = plan.to_dict()
    assert data["rank_pattern"] == {"q_proj": 8, "v_proj": 4}
    assert data["layers_to_transform"] == [0, 1] and data["bdlora_a"] == ["o_proj"]
    assert TrainingPlan.from_dict(data) == plan
    assert hash(plan) == hash(TrainingPlan.from_dict(data))


def test_rank_pattern_keeps_insertion_order() -> None:
    # peft uses the first pattern that matches, so order is meaning.
    plan = TrainingPlan(rank_pattern={"z_proj": 1, "a_proj": 2})
    assert [k for k, _ in plan.rank_pattern] == ["z_proj", "a_proj"]


def test_unknown_field_in_dict_is_refused() -> None:
    with pytest.raises(PlanError, match="unknown training plan field"):
        TrainingPlan.from_dict({"method": "lora", "ranks": 4})


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"rank": 0}, "rank must be a positive integer"),
        ({"batch_size": -1}, "batch size must be a positive integer"),
        ({"seq_len": 0}, "seq len must be a positive integer"),
        ({"optimizer": "adamax"}, "unknown optimizer"),
        ({"method": "lorax"}, "unknown method 'lorax'"),
        ({"precision": "int4"}, "unknown precision"),
        ({"dropout": 1.0}, "dropout must be in"),
        ({"gpus": 4}, "4 GPUs need a sharding strategy"),
        ({"offload": "parameters", "sharding": "zero2", "gpus": 2}, "offloading parameters needs parameter sharding"),
        ({"rank_pattern": {"q_proj": 0}}, "ranks must be positive"),
        ({"targets": ()}, "nothing would train"),
        ({"sharding": "fsdp-hybrid", "gpus": 12, "gpus_per_node": 8}, "whole nodes"),
        ({"lora_init": "pisa"}, "unknown lora init 'pisa'"),
        ({"prompt_encoder": "gru"}, "unknown prompt encoder"),
        ({"lokr_factor": 0}, "lokr factor must be -1 or an integer >= 2"),
        ({"layers_to_transform": (-1,)}, "layer indices >= 0"),
        ({"layers_pattern": ("layers",)}, "layers_pattern needs layers_to_transform"),
        ({"bdlora_blocks": 0}, "bdlora blocks must be a positive integer"),
        ({"lora_plus_ratio": float("nan")}, "LoRA\\+ ratio must be a positive finite number"),
        ({"method": "full", "trainable_tokens": 2}, "trainable_tokens applies to lora, .* not full"),
        ({"method": "dora", "adalora_allocator": False}, "adalora_allocator applies to adalora, not dora"),
    ],
)
def test_bad_plans_raise_plan_errors(changes: dict[str, object], message: str) -> None:
    with pytest.raises(PlanError, match=message) as info:
        TrainingPlan(**changes).validate()  # type: ignore[arg-type]
    assert isinstance(info.value, PeftauditError)  # the CLI prints one line and exits 2


def test_target_that_matches_nothing_is_an_error(inventory_of) -> None:
    with pytest.raises(PlanError, match="match no module"):
        estimate(inventory_of("llama"), TrainingPlan(targets=("qkv_nonexistent",)))


def test_lora_on_a_container_module_is_an_error(inventory_of) -> None:
    with pytest.raises(PlanError, match="LoRA wraps Linear"):
        estimate(inventory_of("llama"), TrainingPlan(targets=("self_attn",)))


def test_qlora_on_a_model_without_linear_layers_is_an_error() -> None:
    from peftaudit.inventory import Inventory, ModelDims

    empty = Inventory("Conv", "conv", (), (), (), (), ModelDims(hidden_size=8, num_layers=1))
    with pytest.raises(PlanError, match="has none"):
        estimate(empty, TrainingPlan(method="qlora"))


def test_zero3_on_one_gpu_without_offload_is_a_named_warning(inventory_of) -> None:
    e = estimate(inventory_of("llama"), TrainingPlan(sharding="zero3", seq_len=64))
    assert "zero3-single-gpu" in [w.code for w in e.warnings]
    quiet = estimate(inventory_of("llama"), TrainingPlan(sharding="zero3", offload="optimizer", seq_len=64))
    assert "zero3-single-gpu" not in [w.code for w in quiet.warnings]


def test_a_model_type_without_a_program_is_derived_not_approximated(inventory_of) -> None:
    from memory_models import CONFIGS

    config = {**CONFIGS["llama"], "model_type": "olmo2"}
    e = estimate(inventory_of(config), TrainingPlan(seq_len=64))
    assert "approximate-activations" not in [w.code for w in e.warnings]  # olmo2 is llama-like and known
    helium = {**CONFIGS["llama"], "model_type": "helium", "head_dim": 64}
    other = estimate(inventory_of(helium), TrainingPlan(seq_len=64))
    assert "approximate-activations" not in [w.code for w in other.warnings]  # derived from a trace


def test_a_model_whose_step_cannot_run_keeps_a_named_stand_in(inventory_of) -> None:
    """Helium's default head_dim (128) does not fit these sizes: its forward fails, so no trace can run."""
    from memory_models import CONFIGS

    broken = estimate(inventory_of({**CONFIGS["llama"], "model_type": "helium"}), TrainingPlan(seq_len=64))
    (warning,) = [w for w in broken.warnings if w.code == "approximate-activations"]
    assert "could not be traced (RuntimeError: a and b must have same reduction dim" in warning.message
    assert broken.total_bytes > broken.components["cuda_context"]


def test_an_estimate_says_where_its_activations_came_from(inventory_of) -> None:
    """A layer program, a profile derived from traces, or the stand-in (whose warning says why)."""
    from memory_models import CONFIGS

    from peftaudit.memory import MemoryEstimate

    plan = TrainingPlan(seq_len=64)
    program = estimate(inventory_of("llama"), plan)
    derived = estimate(inventory_of({**CONFIGS["llama"], "model_type": "helium", "head_dim": 64}), plan)
    stand_in = estimate(inventory_of({**CONFIGS["llama"], "model_type": "helium"}), plan)
    assert (program.activations_source, derived.activations_source, stand_in.activations_source) == (
        "program",
        "derived",
        "stand-in",
    )
    assert estimate(inventory_of("llama"), plan, activations="derived").activations_source == "derived"
    warned = [
        e.activations_source
        for e in (program, derived, stand_in)
        for w in e.warnings
        if w.code == "approximate-activations"
    ]
    assert warned == ["stand-in"]
    data = stand_in.to_dict()
    assert data["activations_source"] == "stand-in"
    assert MemoryEstimate.from_dict(data) == stand_in


SMALL = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 128,
    "ffn_dim": 128,
    "word_embed_proj_dim": 64,
    "num_local_experts": 4,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "n_routed_experts": 4,
    "moe_intermediate_size": 32,
    "first_k_dense_replace": 1,
    "kv_lora_rank": 16,
    "q_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 16,
    "n_shared_experts": 1,
}


@pytest.mark.parametrize(
    "model_type", ["opt", "gemma2", "gpt_oss", "deepseek_v3", "roberta", "qwen3", "qwen3_moe", "olmo2"]
)
def test_every_family_gets_an_estimate(inventory_of, model_type: str) -> None:
    config: dict[str, object] = {"model_type": model_type, **SMALL}
    if model_type == "deepseek_v3":
        # DeepSeek's rotary dimension is qk_rope_head_dim (a head_dim of its own would not run), and
        # its router's 8 expert groups need at least 8 experts: one group for these 4.
        del config["head_dim"]
        config.update(n_group=1, topk_group=1)
    if model_type == "roberta":
        config["architectures"] = ["RobertaForMaskedLM"]
    inv = inventory_of(config)
    for method in ("full", "lora", "qlora"):
        for ckpt in (False, True):
            e = estimate(inv, TrainingPlan(method=method, seq_len=64, gradient_checkpointing=ckpt))
            assert e.total_bytes > e.components["cuda_context"] and all(a > 0 for a in e.activations_per_layer)
            assert "approximate-activations" not in [w.code for w in e.warnings]


def test_an_estimate_does_not_depend_on_what_was_estimated_before(inventory_of) -> None:
    """The optimizer's implementation changes static memory only (foreach's scratch), not the recorded step;
    what an estimate keeps per model must still tell implementations apart, in either order."""
    from peftaudit.memory.analytic.estimate import _PROFILES

    fused, foreach = TrainingPlan(method="full"), TrainingPlan(method="full", optimizer_impl="foreach")
    inventory = inventory_of("llama")
    first = {p.optimizer_impl: estimate(inventory, p) for p in (fused, foreach)}
    _PROFILES.pop(id(inventory), None)  # nothing kept: the other order
    second = {p.optimizer_impl: estimate(inventory, p) for p in (foreach, fused)}
    assert first["foreach"].phase_peaks != first["fused"].phase_peaks
    for impl in ("fused", "foreach"):
        assert first[impl].phase_peaks == second[impl].phase_peaks, impl
