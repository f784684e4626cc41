"""The pytest marker's training objectives (issue 16): ``objective=`` and its options, from the outside.

One pytester session holds every case (each session imports torch's world again): plans that fit, one a
colocated vLLM's share makes too small, and arguments the marker or the plan refuses in one line.
"""

from __future__ import annotations

import math

import peft  # noqa: F401  (imported before pytester runs: torch cannot be imported twice in one process)
import pytest
import torch  # noqa: F401
import transformers  # noqa: F401

from peftaudit.gpus import find_gpu

pytestmark = pytest.mark.slow  # a pytest session that imports torch

CONFTEST = """
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM


@pytest.fixture
def peft_model():
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, tie_word_embeddings=False)
    return get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
"""

TESTS = """
import pytest

@pytest.mark.peftaudit(fits="H100", objective="grpo", generations=4, seq_len=1024, completion_len=256)
def test_grpo_fits(peft_model):
    pass

@pytest.mark.peftaudit(fits="H100", objective="dpo", precompute_ref=True, beta=0.2, seq_len=512, batch_size=2)
def test_dpo_fits(peft_model):
    pass

@pytest.mark.peftaudit(fits="T4", objective="grpo", generation="vllm-colocate", vllm_memory=0.99, seq_len=1024)
def test_vllm_leaves_too_little(peft_model):
    pass

@pytest.mark.peftaudit(fits="T4", objective="grpo", vllm_memory=0.4, seq_len=1024)
def test_vllm_memory_without_vllm(peft_model):
    pass

@pytest.mark.peftaudit(fits="T4", objective="grpo", seq_len=512, completion_len=512)
def test_no_prompt_left(peft_model):
    pass

@pytest.mark.peftaudit(fits="T4", objective="reward")
def test_reward_needs_a_classifier(peft_model):
    pass

@pytest.mark.peftaudit(fits="T4", objective="ppo")
def test_unknown_objective(peft_model):
    pass

@pytest.mark.peftaudit(fits="T4", objective="grpo", generations=0)
def test_no_generations(peft_model):
    pass

@pytest.mark.peftaudit(fits="T4", objective="dpo", precompute_ref="yes")
def test_precompute_ref_not_a_switch(peft_model):
    pass

@pytest.mark.peftaudit(fits="T4", objective="grpo", generation="vllm-colocate", vllm_memory="lots")
def test_vllm_memory_not_a_number(peft_model):
    pass
"""


def test_marker_sizes_the_objective(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makeini("[pytest]\naddopts = -p no:cacheprovider\n")
    pytester.makepyfile(TESTS)
    result = pytester.runpytest("--peftaudit-report")
    result.assert_outcomes(passed=2, failed=8)
    result.stdout.no_fnmatch_line("*Traceback*")
    result.stdout.fnmatch_lines(
        [
            "fit     * lora (r=4) grpo 1 x 4 generations x seq 1,024 (256 completion) on 1x H100 SXM: fits  *",
            "fit     * lora (r=4) dpo batch 2 x seq 512 on 1x H100 SXM: fits  *",
        ],
        consecutive=False,
    )
    # T4: 99% of its total (ceil) held by vLLM leaves less than the CUDA context alone.
    t4 = find_gpu("T4")
    held = math.ceil(t4.usable_bytes * 0.99)
    left, vllm = (t4.usable_bytes - held) / 2**30, held / 2**30
    result.stdout.fnmatch_lines(
        [
            "  does not fit: * grpo 1 x 8 generations x seq 1,024 (512 completion) on 1x T4 does not fit: "
            f"estimated peak * GiB per GPU, {left:.2f} GiB usable beside vLLM's {vllm:.2f} GiB (* GiB short)"
        ]
    )
    for test, message in (
        ("test_vllm_memory_without_vllm", "@pytest.mark.peftaudit(fits=...): vllm_memory applies to vllm-colocate *"),
        ("test_no_prompt_left", "@pytest.mark.peftaudit(fits=...): completion length 512 leaves no prompt in *"),
        ("test_reward_needs_a_classifier", "*: the reward objective trains a sequence classifier *"),
        (
            "test_unknown_objective",
            "*objective=...) must be one of sft, dpo, kto, orpo, simpo, reward, grpo, got 'ppo'",
        ),
        ("test_no_generations", "*generations=...) must be a positive integer, got 0"),
        ("test_precompute_ref_not_a_switch", "*precompute_ref=...) must be True or False, got 'yes'"),
        ("test_vllm_memory_not_a_number", "*vllm_memory=...) must be a number, got 'lots'"),
    ):
        result.stdout.fnmatch_lines([f"_* {test} _*", message])
