"""The pytest marker's serving check (issue 17): ``serves=GPU, context=..., concurrency=...``, from the outside.

One pytester session holds every case: a PeftModel whose adapter is served unmerged, a plan past the GPU,
one past vLLM's scheduler cap, and arguments the marker refuses in one line. What fits is checked against
``peftaudit serve`` on the same architecture, so the marker and the command answer alike.
"""

from __future__ import annotations

import peft  # noqa: F401  (imported before pytester runs: torch cannot be imported twice in one process)
import pytest
import torch  # noqa: F401
import transformers  # noqa: F401

pytestmark = pytest.mark.slow  # a pytest session that imports torch

CONFTEST = """
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM


@pytest.fixture
def peft_model():
    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
                         tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return get_peft_model(model, LoraConfig(r=20, target_modules=["q_proj", "v_proj"]))
"""

TESTS = """
import pytest

@pytest.mark.peftaudit(serves="L4", context=8192, concurrency=4)
def test_fits(peft_model):
    pass

@pytest.mark.peftaudit(serves="L4", context=8192, concurrency=5)
def test_one_sequence_too_many(peft_model):
    pass

@pytest.mark.peftaudit(serves="H100", context=1024, concurrency=2000)
def test_past_max_num_seqs(peft_model):
    pass

@pytest.mark.peftaudit(serves="L4", context=0)
def test_context_zero(peft_model):
    pass

@pytest.mark.peftaudit(max_trainable=10**9, concurrency=4)
def test_concurrency_without_serves(peft_model):
    pass

@pytest.mark.peftaudit(serves="NoSuchGPU")
def test_unknown_gpu(peft_model):
    pass
"""


def test_marker_sizes_serving(pytester: pytest.Pytester) -> None:
    # The same architecture through the library: Llama-3.1-8B with one rank-32 slot (vLLM's smallest rank >= 20).
    from peftaudit.gpus import find_gpu
    from peftaudit.serving.estimate import size_serving
    from peftaudit.serving.plan import AdapterPlan, ServingPlan
    from peftaudit.sources.load import load

    l4 = find_gpu("L4")
    plan = ServingPlan(max_model_len=8192, tensor_parallel_size=1, adapters=AdapterPlan(max_lora_rank=32))
    served = size_serving(load("meta-llama/Llama-3.1-8B").inventory, plan, gpu=l4.name, total_bytes=l4.usable_bytes)
    assert 4 <= served.max_concurrency < 5  # the two cases below sit either side of it

    pytester.makeconftest(CONFTEST)
    pytester.makeini("[pytest]\naddopts = -p no:cacheprovider\n")
    pytester.makepyfile(TESTS)
    result = pytester.runpytest("--peftaudit-report")
    result.assert_outcomes(passed=1, failed=5)
    result.stdout.no_fnmatch_line("*Traceback*")
    result.stdout.fnmatch_lines([f"serve   * on 1 x L4, {served.max_concurrency:.2f} x 8,192 tokens: fits  *"])
    for test, message in (
        ("test_one_sequence_too_many", "  does not serve 5 sequences of 8,192 tokens on one L4: the KV cache holds *"),
        ("test_past_max_num_seqs", "  does not serve 2,000 sequences of 1,024 tokens on one H100 SXM:*"),
        ("test_context_zero", "*context=...) must be a positive integer, got 0"),
        ("test_concurrency_without_serves", "*concurrency=...) applies to serves=..., which is not given"),
        ("test_unknown_gpu", "@pytest.mark.peftaudit(serves=...): *NoSuchGPU*"),
    ):
        result.stdout.fnmatch_lines([f"_* {test} _*", message])
