"""Bad-input rows for the memory estimator and ``plan`` (issue 11, items 13, 14 and 16; issue 14's ``--stack``).

Every number here is written out from something outside peftaudit: the
published configs and parameter counts of the catalog entries, the published
``quantization_config`` blocks of real pre-quantized uploads, the tensor
layouts of the quantization formats, and the 6N training-FLOPs rule.
"""

from __future__ import annotations

import json
import math
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from bad_input_corpus import Case, run_case, strict_json, write_config

CATALOG = Path(__file__).parents[2] / "peftaudit" / "catalog" / "models"
GIB = 2**30


def catalog_config(name: str) -> dict[str, Any]:
    return dict(json.loads((CATALOG / f"{name}.json").read_text())["config"])


# Llama-3.1-8B as published (config.json of meta-llama/Llama-3.1-8B, catalog entry).
LLAMA_PARAMS = 8_030_261_248  # published total, catalog meta-llama__Llama-3.1-8B.json
HIDDEN, LAYERS, VOCAB, FFN, KV = 4096, 32, 128_256, 14_336, 8 * 128
EMBEDDING = VOCAB * HIDDEN  # embed_tokens, and lm_head again (not tied)
NORMS = (2 * LAYERS + 1) * HIDDEN
LINEAR_PARAMS = LLAMA_PARAMS - 2 * EMBEDDING - NORMS  # q, k, v, o, gate, up, down of 32 layers
assert LINEAR_PARAMS == LAYERS * (2 * HIDDEN * HIDDEN + 2 * HIDDEN * KV + 3 * HIDDEN * FFN)

# The quantization_config of unsloth/Meta-Llama-3.1-8B-bnb-4bit (its config.json), the upload many
# QLoRA users start from: nf4, double quantization, no skip list (transformers' default keeps lm_head).
UNSLOTH_BNB_4BIT = {
    "bnb_4bit_compute_dtype": "bfloat16",
    "bnb_4bit_quant_type": "nf4",
    "bnb_4bit_use_double_quant": True,
    "llm_int8_enable_fp32_cpu_offload": False,
    "llm_int8_has_fp16_weight": False,
    "llm_int8_skip_modules": None,
    "llm_int8_threshold": 6.0,
    "load_in_4bit": True,
    "load_in_8bit": False,
    "quant_method": "bitsandbytes",
}
# hugging-quants/Meta-Llama-3.1-8B-Instruct-GPTQ-INT4 (its config.json).
GPTQ_INT4 = {
    "bits": 4,
    "checkpoint_format": "gptq",
    "damp_percent": 0.1,
    "desc_act": True,
    "group_size": 128,
    "quant_method": "gptq",
    "static_groups": False,
    "sym": True,
    "true_sequential": True,
}
# openai/gpt-oss-20b (its config.json): MoE experts in MXFP4, everything else bf16.
GPT_OSS_MXFP4 = {
    "modules_to_not_convert": [
        "model.layers.*.self_attn",
        "model.layers.*.mlp.router",
        "model.embed_tokens",
        "lm_head",
    ],
    "quant_method": "mxfp4",
}


def quantized_llama(quantization_config: dict[str, Any]) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        write_config(
            tmp / "m", {**catalog_config("meta-llama__Llama-3.1-8B"), "quantization_config": quantization_config}
        )

    return setup


def estimate_of(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    data = strict_json(result.stdout)
    (estimate,) = data["estimates"]
    return dict(estimate)


def warning_codes(result: subprocess.CompletedProcess[str]) -> dict[str, str]:
    return {w["code"]: w["message"] for w in estimate_of(result)["warnings"]}


# --- item 13: quiet nonsense in the plan -----------------------------------------------------


def has_warning(code: str, *fragments: str) -> Callable[[Path, subprocess.CompletedProcess[str]], None]:
    def check(_tmp: Path, result: subprocess.CompletedProcess[str]) -> None:
        codes = warning_codes(result)
        assert code in codes, codes
        for fragment in fragments:
            assert fragment in codes[code], codes[code]

    return check


def shows(*fragments: str) -> Callable[[Path, subprocess.CompletedProcess[str]], None]:
    def check(_tmp: Path, result: subprocess.CompletedProcess[str]) -> None:
        for fragment in fragments:
            assert fragment in result.stdout, result.stdout[-3000:]

    return check


QWEN_05B = ["report", "Qwen/Qwen2.5-0.5B", "--method", "lora"]
# Qwen2.5-0.5B's published config: max_position_embeddings 32768; k_proj/v_proj map 896 -> 2 x 64 = 128.
QWEN_CONTEXT = catalog_config("Qwen__Qwen2.5-0.5B")["max_position_embeddings"]
QWEN_KV_WIDTH = catalog_config("Qwen__Qwen2.5-0.5B")["num_key_value_heads"] * 64
assert (QWEN_CONTEXT, QWEN_KV_WIDTH) == (32768, 128)

ITEM_13 = [
    Case(
        "11.13-target-parameters-nosuch",
        [*QWEN_05B, "--target-parameters", "nosuch", "--no-cache"],
        stderr=r"target.parameters.*'nosuch'.*match no parameter",
    ),
    Case(
        "11.13-target-parameters-nosuch-fit",
        ["fit", "Qwen/Qwen2.5-0.5B", "--gpu", "H100", "--target-parameters", "nosuch"],
        stderr=r"'nosuch'",
    ),
    Case(
        "11.13-seq-len-above-max-positions-json",
        [*QWEN_05B, "--seq-len", str(2 * QWEN_CONTEXT), "--json"],
        exit_code=0,
        check=has_warning("seq-len-exceeds-max-positions", f"{2 * QWEN_CONTEXT:,}", f"{QWEN_CONTEXT:,}"),
    ),
    Case(
        "11.13-seq-len-above-max-positions-terminal",
        [*QWEN_05B, "--seq-len", str(2 * QWEN_CONTEXT)],
        exit_code=0,
        check=shows("seq-len-exceeds-max-positions"),
    ),
    Case(
        "11.13-rank-above-layer-dim-json",
        [*QWEN_05B, "--rank", str(2 * QWEN_KV_WIDTH), "--json"],
        exit_code=0,
        check=has_warning("rank-exceeds-layer-dim", "k_proj", f"{QWEN_KV_WIDTH}"),
    ),
    Case(
        "11.13-rank-above-layer-dim-terminal",
        [*QWEN_05B, "--rank", str(2 * QWEN_KV_WIDTH)],
        exit_code=0,
        check=shows("rank-exceeds-layer-dim"),
    ),
]


# --- item 14: plan's FLOPs follow the setup it chose -----------------------------------------


def plan_flops_include_recompute(_tmp: Path, result: subprocess.CompletedProcess[str]) -> None:
    """LoRA on Llama-3.1-8B on one RTX 4090 needs gradient checkpointing; its FLOPs must recompute.

    The 6N rule (Kaplan et al. 2020; Narayanan et al. 2021): a forward pass costs 2N per token for
    the N parameters in matrix multiplies (the input-embedding lookup is not one) plus attention,
    4 x seq x hidden per layer (QK^T and AV). Full training's backward is two forwards (6N). A frozen
    base skips weight gradients, so its backward is one forward, plus 6 FLOPs per trainable adapter
    parameter. Gradient checkpointing recomputes the forward once more: 3 forwards in all.
    """
    (row,) = strict_json(result.stdout)["plans"]
    assert row["setup"]["gradient_checkpointing"] is True, row["setup"]  # the setup the search chose
    seq = 2048
    n = LLAMA_PARAMS - EMBEDDING
    forward = 2 * n + 4 * seq * HIDDEN * LAYERS
    lora_params = 41_943_040  # peft's print_trainable_parameters, Llama-3(.1)-8B, r=16 on all 7 projections
    assert lora_params == LAYERS * 16 * (2 * (HIDDEN + HIDDEN) + 2 * (HIDDEN + KV) + 3 * (HIDDEN + FFN))
    expected = 3 * forward + 6 * lora_params
    assert row["run"]["flops_per_token"] == pytest.approx(expected, rel=1e-9)
    assert row["run"]["total_flops"] == pytest.approx(expected * 1_000_000, rel=1e-9)
    # ~6N, not the ~4N of a run without the recompute.
    assert 5.9 * n < row["run"]["flops_per_token"] < 6.6 * n


ITEM_14 = [
    Case(
        "11.14-plan-chosen-checkpointing-flops",
        ["plan", "meta-llama/Llama-3.1-8B", "--gpu", "RTX 4090", "--tokens", "1M", "--method", "lora", "--json"],
        exit_code=0,
        check=plan_flops_include_recompute,
    ),
]


# --- item 16: a checkpoint's own quantization_config -----------------------------------------


def bnb_4bit_base(_tmp: Path, result: subprocess.CompletedProcess[str]) -> None:
    """The 4-bit base of unsloth/Meta-Llama-3.1-8B-bnb-4bit, from bitsandbytes' layout.

    bitsandbytes packs two 4-bit codes per byte; with double quantization each block of 64
    weights keeps a uint8 absmax, each 256 of those an fp32 absmax, and every weight a 256-entry
    fp32 code book for the nested absmax, an fp32 offset and its 16-entry NF4 code book. The
    embedding and lm_head stay bf16 (transformers skips the output embedding). The upload's
    model.safetensors is listed at 5.7 GB on the Hub
    (https://huggingface.co/unsloth/Meta-Llama-3.1-8B-bnb-4bit/tree/main), which the packed weights
    plus constants plus the bf16 parts must reproduce.
    """
    estimate = estimate_of(result)
    components = estimate["components"]
    linear_modules = LAYERS * 7
    packed = LINEAR_PARAMS // 2
    bf16 = 2 * (2 * EMBEDDING + NORMS)
    rotary = 2 * 64 * 4  # the rotary inv_freq and original_inv_freq buffers, fp32
    assert components["base_weights"] == packed + bf16 + rotary
    assert 5.15 * GIB < components["base_weights"] < 5.25 * GIB  # "about 5.2 GiB", not 14.96
    blocks = LINEAR_PARAMS // 64
    nested = sum(math.ceil(o * i / 64 / 256) for o, i in _llama_linear_shapes())
    assert components["quantization_constants"] == blocks + 4 * nested + linear_modules * (4 * 256 + 4 + 4 * 16)
    on_disk = components["base_weights"] + components["quantization_constants"]
    assert on_disk == pytest.approx(5.7e9, rel=0.01)
    # Counts stay logical: the published total, not the packed element count.
    assert estimate["total_params"] == LLAMA_PARAMS
    storage = estimate["base_storage"]
    assert storage["source"] == "checkpoint" and storage["quant_method"] == "bitsandbytes"
    assert storage["quantized_params"] == LINEAR_PARAMS
    assert storage["packed_bytes"] == packed
    assert "quantization_config" in storage["note"] and "nf4" in storage["note"]


def _llama_linear_shapes() -> list[tuple[int, int]]:
    one = [(HIDDEN, HIDDEN), (KV, HIDDEN), (KV, HIDDEN), (HIDDEN, HIDDEN), (FFN, HIDDEN), (FFN, HIDDEN), (HIDDEN, FFN)]
    return one * LAYERS


def bf16_override(_tmp: Path, result: subprocess.CompletedProcess[str]) -> None:
    estimate = estimate_of(result)
    assert estimate["components"]["base_weights"] == 2 * LLAMA_PARAMS + 2 * 64 * 4
    assert estimate["components"]["quantization_constants"] == 0
    storage = estimate["base_storage"]
    assert storage["source"] == "override" and "--base-dtype bf16" in storage["note"]


def gptq_base(_tmp: Path, result: subprocess.CompletedProcess[str]) -> None:
    """GPTQ's tensors per linear layer (AutoGPTQ/optimum layout, group 128, 4 bits).

    qweight int32 (in / 8, out): half a byte per weight; scales fp16 (in / 128, out); qzeros int32
    (in / 128, out / 8); g_idx int32 (in,). Only the decoder layers' linears are quantized; the
    embedding and lm_head stay 16-bit.
    """
    estimate = estimate_of(result)
    components = estimate["components"]
    shapes = _llama_linear_shapes()
    scales = sum(2 * (i // 128) * o for o, i in shapes)
    zeros = sum((i // 128) * o // 2 for o, i in shapes)
    g_idx = sum(4 * i for _o, i in shapes)
    assert components["base_weights"] == LINEAR_PARAMS // 2 + 2 * (2 * EMBEDDING + NORMS) + 2 * 64 * 4
    assert components["quantization_constants"] == scales + zeros + g_idx
    storage = estimate["base_storage"]
    assert storage["quant_method"] == "gptq" and "group 128" in storage["note"]


def mxfp4_dequantized(_tmp: Path, result: subprocess.CompletedProcess[str]) -> None:
    """gpt-oss trains dequantized: OpenAI's cookbook loads it with Mxfp4Config(dequantize=True)."""
    estimate = estimate_of(result)
    total = estimate["total_params"]
    assert estimate["components"]["quantization_constants"] == 0
    # Every weight at bf16, and the rotary inv_freq and original_inv_freq buffers (32 fp32 values each).
    assert estimate["components"]["base_weights"] == 2 * total + 2 * 32 * 4
    storage = estimate["base_storage"]
    assert storage["source"] == "dequantized" and storage["quant_method"] == "mxfp4"
    assert "dequantize=True" in storage["note"]
    assert storage["reference"].startswith("https://cookbook.openai.com/")


ITEM_16 = [
    Case(
        "11.16-bnb-4bit-checkpoint-json",
        ["report", "{tmp}/m", "--method", "lora", "--json", "--no-cache"],
        exit_code=0,
        setup=quantized_llama(UNSLOTH_BNB_4BIT),
        check=bnb_4bit_base,
    ),
    Case(
        "11.16-bnb-4bit-checkpoint-terminal",
        ["report", "{tmp}/m", "--method", "lora", "--no-cache"],
        exit_code=0,
        setup=quantized_llama(UNSLOTH_BNB_4BIT),
        check=shows("quantization_config", "bitsandbytes"),
    ),
    Case(
        "11.16-base-dtype-overrides-checkpoint",
        ["report", "{tmp}/m", "--method", "lora", "--base-dtype", "bf16", "--json", "--no-cache"],
        exit_code=0,
        setup=quantized_llama(UNSLOTH_BNB_4BIT),
        check=bf16_override,
    ),
    Case(
        "11.16-gptq-checkpoint",
        ["report", "{tmp}/m", "--method", "lora", "--json", "--no-cache"],
        exit_code=0,
        setup=quantized_llama(GPTQ_INT4),
        check=gptq_base,
    ),
    Case(
        "11.16-mxfp4-gpt-oss-dequantized",
        ["report", "{tmp}/m", "--method", "lora", "--json", "--no-cache"],
        exit_code=0,
        setup=lambda t: write_config(
            t / "m", {**catalog_config("openai__gpt-oss-20b"), "quantization_config": GPT_OSS_MXFP4}
        ),
        check=mxfp4_dequantized,
    ),
    Case(
        "11.16-quantization-config-malformed",
        ["report", "{tmp}/m", "--method", "lora", "--no-cache"],
        setup=quantized_llama({**GPTQ_INT4, "bits": "x"}),
        stderr=r"quantization_config.*bits",
    ),
]

# Issue 13, images: llava-1.5-7b-hf's image is 336 px in 14 px patches, 24 x 24 = 576 tokens (its
# config.json); ViT-B/16 and GPT-2 take no images per sample.
LLAVA = ["report", "llava-hf/llava-1.5-7b-hf", "--method", "lora"]
LLAVA_IMAGE_TOKENS = (336 // 14) ** 2
ISSUE_13_IMAGES = [
    Case("13.images-zero-tokens", [*LLAVA, "--image-tokens", "0"], stderr=r"image tokens must be a positive integer"),
    Case("13.images-negative", [*LLAVA, "--images", "-1"], stderr=r"images must be a whole number >= 0, got -1"),
    Case(
        "13.image-size-zero",
        ["report", "google/vit-base-patch16-224", "--method", "lora", "--image-size", "0"],
        stderr=r"image size must be a positive integer, got 0",
    ),
    Case(
        "13.image-size-negative",
        ["report", "google/vit-base-patch16-224", "--method", "lora", "--image-size", "-8"],
        stderr=r"image size must be a positive integer",
    ),
    Case(
        "13.image-tokens-above-seq-len",
        [*LLAVA, "--images", "4", "--seq-len", "2048"],
        stderr=rf"4 image\(s\) x {LLAVA_IMAGE_TOKENS} tokens = {4 * LLAVA_IMAGE_TOKENS:,} tokens do not fit in seq-len",
    ),
    Case(
        "13.image-tokens-override-above-seq-len",
        [*LLAVA, "--images", "2", "--image-tokens", "1024", "--seq-len", "2048"],
        stderr=r"2 image\(s\) x 1024 tokens do not fit in seq-len 2,048",
    ),
    Case(
        "13.images-on-text-model",
        ["report", "gpt2", "--method", "lora", "--images", "1"],
        stderr=r"apply to multimodal models; GPT2LMHeadModel has no image inputs",
    ),
    Case(
        "13.image-size-on-text-model",
        ["report", "gpt2", "--method", "lora", "--image-size", "224"],
        stderr=r"--image-size applies to vision models",
    ),
    Case(
        "13.images-on-vision-model",
        ["report", "google/vit-base-patch16-224", "--method", "lora", "--images", "2"],
        stderr=r"is a vision model: its batch is images, set --image-size",
    ),
    Case(
        "13.images-fit",
        ["fit", "gpt2", "--gpu", "H100", "--images", "1"],
        stderr=r"GPT2LMHeadModel has no image inputs",
    ),
]

# Issue 14, --stack: malformed releases are refused where they are typed, on every command that takes them.
ISSUE_14_STACK = [
    Case("14.stack-empty", ["report", "gpt2", "--method", "lora", "--stack", ""], stderr=r"the stack is empty"),
    Case(
        "14.stack-unknown-package",
        ["fit", "gpt2", "--gpu", "H100", "--stack", "transformers==4.44,accelerate==1.0"],
        stderr=r"unknown package 'accelerate' in stack; known: transformers, peft, bitsandbytes, torch",
    ),
    Case(
        "14.stack-bad-version",
        ["gpus", "gpt2", "--stack", "peft==zero.twelve"],
        stderr=r"peft version 'zero.twelve' in stack is not a version",
    ),
    Case(
        "14.stack-twice",
        ["plan", "gpt2", "--tokens", "1M", "--gpu", "H100", "--stack", "peft==0.12,peft==0.13"],
        stderr=r"peft is named twice in stack",
    ),
    Case(
        "14.stack-not-a-pair",
        ["recommend", "gpt2", "--stack", "transformers>=4.44"],
        stderr=r"stack entry 'transformers>=4.44' is not PACKAGE==VERSION",
    ),
]


def _adapter_config(name: str, data: dict[str, Any]) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        (tmp / name).mkdir()
        (tmp / name / "adapter_config.json").write_text(json.dumps(data))

    return setup


# Issue 16: peft's other methods' options and --peft-config, refused where they are typed.
ISSUE_16_METHODS = [
    Case(
        "16.option-of-another-method",
        ["fit", "gpt2", "--gpu", "H100", "--prefix-projection"],
        stderr=r"--prefix-projection applies to prefix-tuning, not lora",
    ),
    Case("16.layers-backwards", ["report", "gpt2", "--method", "lora", "--layers", "5-2"], stderr=r"runs backwards"),
    Case(
        "16.peft-config-missing",
        ["report", "gpt2", "--peft-config", "{tmp}/nowhere"],
        stderr=r"nowhere",
    ),
    Case(
        "16.peft-config-unknown-type",
        ["gpus", "gpt2", "--peft-config", "{tmp}/adapter"],
        setup=_adapter_config("adapter", {"peft_type": "FOURIERFT", "n_frequency": 1000}),
        stderr=r"peft type FOURIERFT is not modelled; supported: .*LORA",
    ),
    Case(
        "16.peft-config-and-method",
        ["report", "gpt2", "--method", "qlora", "--peft-config", "{tmp}/adapter"],
        setup=_adapter_config("adapter", {"peft_type": "LORA", "r": 8, "target_modules": ["c_attn"]}),
        stderr=r"give --peft-config or --method, not both",
    ),
]

# Issue 16: GaLore trains every weight in full, so a quantized base is refused (as is what transformers refuses).
ISSUE_16_GALORE = [
    Case(
        "16.galore-quantized-base",
        ["report", "gpt2", "--method", "galore", "--base-dtype", "nf4"],
        stderr=r"GaLore trains every weight; a quantized base cannot train",
    ),
    Case(
        "16.galore-quantized-checkpoint",
        ["fit", "{tmp}/bnb4", "--gpu", "H100", "--method", "galore"],
        setup=lambda t: write_config(
            t / "bnb4", {**catalog_config("Qwen__Qwen2.5-0.5B"), "quantization_config": UNSLOTH_BNB_4BIT}
        ),
        stderr=r"GaLore trains every weight; a quantized base cannot train",
    ),
    Case(
        "16.galore-layerwise-accumulation",
        ["gpus", "gpt2", "--method", "galore-layerwise", "--galore-targets", "all-linear", "--grad-accum", "4"],
        stderr=r"layer-wise GaLore does not support gradient accumulation",
    ),
]

# Issue 16: the training objectives (TRL 1.16's trainers). Each row a plan no trainer runs, or a flag that
# applies to another objective.
ISSUE_16_OBJECTIVES = [
    Case(
        "16.generations-zero",
        ["report", "gpt2", "--objective", "grpo", "--generations", "0"],
        stderr=r"generations must be a positive integer, got 0",
    ),
    Case(
        "16.generations-without-grpo",
        ["plan", "gpt2", "--gpu", "H100", "--tokens", "20M", "--objective", "dpo", "--generations", "4"],
        stderr=r"--generations applies to --objective grpo, not dpo",
    ),
    Case(
        "16.completion-fills-seq",
        ["report", "gpt2", "--objective", "grpo", "--seq-len", "512"],
        stderr=r"completion length 512 leaves no prompt in seq-len 512",
    ),
    Case("16.unknown-objective", ["report", "gpt2", "--objective", "ppo"], stderr=r"invalid choice: 'ppo'"),
    Case(
        "16.precompute-ref-orpo",
        ["report", "gpt2", "--objective", "orpo", "--precompute-ref"],
        stderr=r"--precompute-ref applies to --objective dpo or kto, not orpo",
    ),
    Case(
        "16.beta-reward",
        ["report", "gpt2", "--objective", "reward", "--beta", "0.1"],
        stderr=r"--beta applies to --objective dpo, kto, orpo, simpo or grpo, not reward",
    ),
    Case(
        "16.beta-negative",
        ["report", "gpt2", "--objective", "grpo", "--beta", "-0.1"],
        stderr=r"beta must be a finite number >= 0",
    ),
    Case(
        "16.vllm-memory-without-colocate",
        ["report", "gpt2", "--objective", "grpo", "--vllm-memory", "0.5"],
        stderr=r"--vllm-memory applies to vllm-colocate generation only",
    ),
    Case(
        "16.vllm-memory-one",
        ["report", "gpt2", "--objective", "grpo", "--generation", "vllm-colocate", "--vllm-memory", "1"],
        stderr=r"vLLM memory must be a fraction between 0 and 1, got 1.0",
    ),
    Case(
        "16.objective-inference",
        ["report", "gpt2", "--objective", "dpo", "--optimizer", "none"],
        stderr=r"the dpo objective trains; optimizer none is inference",
    ),
    Case(
        "16.grpo-prompt-tuning",
        ["report", "gpt2", "--objective", "grpo", "--method", "prompt-tuning"],
        stderr=r"GRPO with prompt-tuning is not modelled",
    ),
    Case(
        "16.dpo-chunked-loss",
        ["report", "gpt2", "--objective", "dpo", "--loss", "chunked"],
        stderr=r"--loss applies to the sft and reward objectives: TRL's dpo trainer computes its own loss",
    ),
    Case(
        "16.dpo-encoder",
        ["report", "bert-base-uncased", "--objective", "dpo"],
        stderr=r"the dpo objective trains a decoder-only language model; BertForMaskedLM is not one",
    ),
]

CASES = [
    *ITEM_13,
    *ITEM_14,
    *ITEM_16,
    *ISSUE_13_IMAGES,
    *ISSUE_14_STACK,
    *ISSUE_16_METHODS,
    *ISSUE_16_GALORE,
    *ISSUE_16_OBJECTIVES,
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path: Path) -> None:
    run_case(case, tmp_path)
