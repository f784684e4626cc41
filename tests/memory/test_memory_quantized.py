"""A checkpoint's own ``quantization_config``, checked against bitsandbytes and transformers themselves.

* bytes per weight: bitsandbytes quantizes a real tensor on the CPU and its packed weight and
  quantization state are counted;
* which modules are converted: transformers' own quantizers convert a meta-device model, and
  the modules they replaced are compared with ours;
* the whole step: the trace oracle (fake tensors through real peft layers) against the analytic
  estimate for pre-quantized tiny models;
* the warnings of item 13 do not fire where nothing is wrong.
"""

from __future__ import annotations

import json
import warnings
from typing import Any

import pytest
from memory_models import CONFIGS, build

from peftaudit.errors import ConfigError
from peftaudit.memory import TrainingPlan, estimate
from peftaudit.memory.dtypes import int8_bytes, nf4_bytes
from peftaudit.memory.quantized import WeightFormat, checkpoint_quantization

BNB_4BIT = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}


def _with(config: dict[str, Any], quantization_config: dict[str, Any]) -> dict[str, Any]:
    return {**config, "quantization_config": quantization_config}


# --- bytes, from bitsandbytes -------------------------------------------------------------------


@pytest.mark.parametrize("double_quant", [True, False])
def test_4bit_bytes_are_bitsandbytes_own(double_quant: bool) -> None:
    torch = pytest.importorskip("torch")
    functional = pytest.importorskip("bitsandbytes.functional")
    weight = torch.randn(384, 640, dtype=torch.bfloat16)
    packed, state = functional.quantize_4bit(weight, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    tensors = [packed, state.absmax, state.code]
    if state.nested:
        tensors += [state.state2.absmax, state.state2.code, state.offset]
    measured = sum(t.numel() * t.element_size() for t in tensors)
    ours = WeightFormat("bnb4", "nf4", 4, double_quant=double_quant).storage(384, 640)
    assert ours == nf4_bytes(384 * 640, double_quant=double_quant)  # one rule for QLoRA and checkpoints
    assert ours[0] == packed.numel() * packed.element_size()
    assert sum(ours) == measured


def test_8bit_bytes_are_bitsandbytes_own() -> None:
    torch = pytest.importorskip("torch")
    functional = pytest.importorskip("bitsandbytes.functional")
    weight = torch.randn(384, 640, dtype=torch.float16)
    codes, row_scales, _outliers = functional.int8_vectorwise_quant(weight)
    measured = codes.numel() * codes.element_size() + row_scales.numel() * row_scales.element_size()
    assert sum(WeightFormat("bnb8", "int8", 8).storage(384, 640)) == sum(int8_bytes(384 * 640, 384)) == measured


# --- which modules, from transformers -------------------------------------------------------------


def _converted_by_transformers(config: dict[str, Any], quantization_config: Any) -> set[str]:
    """Modules transformers' quantizer replaces when it loads a pre-quantized checkpoint."""
    torch = pytest.importorskip("torch")
    from transformers.quantizers.auto import AutoHfQuantizer

    model = build(config)
    quantizer = AutoHfQuantizer.from_config(quantization_config, pre_quantized=True)
    quantizer.preprocess_model(model, dtype=torch.bfloat16, device_map={"": "cpu"})
    return {
        name
        for name, m in model.named_modules()
        if name and isinstance(m, torch.nn.Linear) and type(m) is not torch.nn.Linear
    }


@pytest.mark.parametrize(
    ("arch", "quantization_config"),
    [
        ("llama", BNB_4BIT),
        ("llama", {**BNB_4BIT, "llm_int8_skip_modules": ["mlp.down_proj"]}),  # lm_head is converted then
        ("llama", {"quant_method": "bitsandbytes", "load_in_8bit": True}),
        ("qwen2", BNB_4BIT),  # tied embeddings
        ("llama", {"quant_method": "fp8", "weight_block_size": [128, 128]}),
        ("llama", {"quant_method": "fp8", "weight_block_size": [128, 128], "modules_to_not_convert": ["self_attn"]}),
    ],
    ids=["bnb4", "bnb4-skip-list", "bnb8", "bnb4-tied", "fp8", "fp8-skip"],
)
def test_converted_modules_are_transformers_own(inventory_of, arch: str, quantization_config: dict[str, Any]) -> None:
    from transformers import BitsAndBytesConfig, FineGrainedFP8Config

    config = _with(CONFIGS[arch], quantization_config)
    fields = {k: v for k, v in quantization_config.items() if k != "quant_method"}
    if quantization_config["quant_method"] == "bitsandbytes":
        hf_config: Any = BitsAndBytesConfig(**fields)
    else:
        fields["weight_block_size"] = tuple(fields["weight_block_size"])
        hf_config = FineGrainedFP8Config(**fields)
    expected = _converted_by_transformers(CONFIGS[arch], hf_config)
    quant = checkpoint_quantization(quantization_config, arch)
    assert quant is not None
    ours = set(quant.formats(inventory_of(config)))
    assert ours == expected and expected


# --- the whole step, against the trace -------------------------------------------------------------

GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 64, "sym": True, "desc_act": False}


@pytest.mark.parametrize(
    "quantization_config",
    [
        BNB_4BIT,
        {**BNB_4BIT, "bnb_4bit_use_double_quant": True},
        GPTQ,
        {"quant_method": "fp8", "weight_block_size": [128, 128]},
    ],
    ids=["bnb4", "bnb4-double", "gptq", "fp8"],
)
@pytest.mark.parametrize("ckpt", [False, True])
def test_prequantized_estimate_agrees_with_trace(inventory_of, quantization_config: dict[str, Any], ckpt: bool) -> None:
    from peftaudit.memory import trace

    config = _with(CONFIGS["llama"], quantization_config)
    plan = TrainingPlan(method="lora", seq_len=256, batch_size=2, gradient_checkpointing=ckpt)
    analytic = estimate(inventory_of(config), plan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = trace(build(config), plan)
    # Same storage in both: the trace's fake tensors are sized from the same format.
    for part in ("base_weights", "quantization_constants"):
        assert analytic.components[part] == pytest.approx(traced.components[part], rel=0.01), part
    assert abs(analytic.allocated_bytes / traced.allocated_bytes - 1) <= 0.10
    plain = estimate(inventory_of(CONFIGS["llama"]), plan)
    assert analytic.components["base_weights"] < 0.7 * plain.components["base_weights"]


def test_lora_on_a_4bit_checkpoint_is_qlora(inventory_of) -> None:
    """LoRA on a pre-quantized 4-bit upload stores and runs exactly what QLoRA would."""
    config = _with(CONFIGS["llama"], {**BNB_4BIT, "bnb_4bit_use_double_quant": True})
    on_checkpoint = estimate(inventory_of(config), TrainingPlan(method="lora"))
    qlora = estimate(inventory_of(CONFIGS["llama"]), TrainingPlan(method="qlora", double_quant=True))
    assert on_checkpoint.components == qlora.components
    assert on_checkpoint.base_storage is not None and qlora.base_storage is None
    assert on_checkpoint.to_dict()["base_storage"]["source"] == "checkpoint"
    assert "base_storage" not in qlora.to_dict()


def test_full_fine_tuning_of_a_packed_checkpoint_is_dequantized(inventory_of) -> None:
    config = _with(CONFIGS["llama"], BNB_4BIT)
    full = estimate(inventory_of(config), TrainingPlan(method="full"))
    plain = estimate(inventory_of(CONFIGS["llama"]), TrainingPlan(method="full"))
    assert full.components == plain.components
    assert full.base_storage is not None and "dequantized" in full.base_storage.note


def test_unmodelled_method_warns(inventory_of) -> None:
    config = _with(CONFIGS["llama"], {"quant_method": "hqq", "nbits": 4})
    result = estimate(inventory_of(config), TrainingPlan())
    assert "checkpoint-quantization-not-modelled" in {w.code for w in result.warnings}


@pytest.mark.parametrize(
    ("quantization_config", "message"),
    [
        ({"quant_method": "gptq", "bits": "x"}, r"quantization_config\.bits \(gptq\) must be one of 2, 3, 4, 8"),
        ({"quant_method": "gptq", "bits": 4, "group_size": 0}, r"group_size"),
        ({"quant_method": "bitsandbytes"}, r"exactly one of 4-bit and 8-bit"),
        ({**BNB_4BIT, "bnb_4bit_quant_type": "int3"}, r"bnb_4bit_quant_type"),
        ({**BNB_4BIT, "llm_int8_skip_modules": ["(["]}, r"not a pattern"),
        ({"quant_method": "fp8", "weight_block_size": [128]}, r"weight_block_size"),
        ({"quant_method": 5}, r"quant_method must be a string"),
        ({"quant_method": "compressed-tensors", "config_groups": []}, r"config_groups"),
    ],
)
def test_malformed_configs_are_one_line_errors(quantization_config: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        checkpoint_quantization(quantization_config, "llama")


def test_no_quantization_config_changes_nothing(inventory_of) -> None:
    result = estimate(inventory_of("llama"), TrainingPlan())
    assert result.base_storage is None and "base_storage" not in json.loads(json.dumps(result.to_dict()))


# --- item 13: the warnings stay quiet where nothing is wrong --------------------------------------


def test_seq_len_warning_only_beyond_the_context(inventory_of) -> None:
    config = {**CONFIGS["llama"], "max_position_embeddings": 512}
    codes = {w.code for w in estimate(inventory_of(config), TrainingPlan(seq_len=512)).warnings}
    assert "seq-len-exceeds-max-positions" not in codes
    codes = {w.code for w in estimate(inventory_of(config), TrainingPlan(seq_len=576)).warnings}
    assert "seq-len-exceeds-max-positions" in codes


def test_rank_warning_only_above_the_smaller_dimension(inventory_of) -> None:
    # k_proj and v_proj of the tiny Llama map 256 -> 2 x 64 = 128.
    inv = inventory_of("llama")
    codes = {w.code for w in estimate(inv, TrainingPlan(rank=128)).warnings}
    assert "rank-exceeds-layer-dim" not in codes
    (warning,) = [w for w in estimate(inv, TrainingPlan(rank=129)).warnings if w.code == "rank-exceeds-layer-dim"]
    assert "k_proj" in warning.message and "rank 128" in warning.message
