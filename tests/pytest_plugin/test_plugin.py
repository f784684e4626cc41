"""The pytest plugin from the outside, with pytester: what a training pipeline's CI sees."""

from __future__ import annotations

import os
import subprocess
import sys

import peft  # noqa: F401  (imported before pytester runs: see below)
import pytest
import torch  # noqa: F401
import transformers  # noqa: F401

# In-process pytester runs drop modules first imported during a run; torch cannot be
# imported twice in one process, so the heavy modules are imported here, up front.

pytestmark = pytest.mark.slow  # each test runs a pytest session that imports torch

# torch, transformers and peft are imported where used: an xdist controller (which runs no test)
# then starts without them, as the plugin itself does (test_importing_the_plugin_imports_no_torch).
CONFTEST = """
import pytest


def tiny_llama():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


@pytest.fixture
def peft_model():
    from peft import LoraConfig, get_peft_model

    return get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))


@pytest.fixture
def train_a_few_steps():
    def train(model, steps=3):
        import torch

        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
        for _ in range(steps):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    return train
"""

# Base: embeddings and head 2 x 64x32, per layer q,o 32x32, k,v 16x32, gate/up/down 3 x 64x32, 2 norms of 32,
# final norm 32. Adapters r=4 on q (4x32 + 32x4) and v (4x32 + 16x4), 2 layers.
BASE = 2 * 64 * 32 + 2 * (2 * 32 * 32 + 2 * 16 * 32 + 3 * 64 * 32 + 2 * 32) + 32
TRAINABLE = 2 * ((4 * 32 + 32 * 4) + (4 * 32 + 16 * 4))
TOTAL = BASE + TRAINABLE


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest(CONFTEST)
    pytester.makeini("[pytest]\naddopts = -p no:cacheprovider\n")
    return pytester


def test_passing_suite_with_marker_and_snapshot(suite: pytest.Pytester) -> None:
    suite.makepyfile(
        """
        import pytest

        @pytest.mark.peftaudit(max_trainable_fraction=0.05)
        def test_training_plan(peft_model):
            pass

        def test_only_adapters_change(peft_model, param_snapshot, train_a_few_steps):
            before = param_snapshot(peft_model)
            train_a_few_steps(peft_model)
            assert before.only_intended_changed(peft_model)

        def test_targets(peftaudit):
            report = peftaudit.audit("meta-llama/Llama-3.2-1B")
            assert report.params.total == 1_235_814_400
        """
    )
    result = suite.runpytest("--peftaudit-report")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(
        [
            "*= peftaudit =*",
            f"audit   * (PeftModel): {TOTAL:,} parameters, {TRAINABLE:,} trainable (3.7992%)  "
            "[[]*test_training_plan[]]",
            "verify  PASS: * tensors compared, 8 changed, 8/8 intended changed*[[]*test_only_adapters_change[]]",
            "audit   meta-llama/Llama-3.2-1B (LlamaForCausalLM): 1,235,814,400 parameters*[[]*test_targets[]]",
        ]
    )


def test_failing_suite_explains_itself(suite: pytest.Pytester) -> None:
    suite.makepyfile(
        """
        import pytest
        import torch

        @pytest.mark.peftaudit(max_trainable_fraction=0.01)
        def test_too_many_trainable(peft_model):
            pass

        def test_frozen_weight_nudged(peft_model, param_snapshot, train_a_few_steps):
            before = param_snapshot(peft_model)
            train_a_few_steps(peft_model)
            with torch.no_grad():
                peft_model.base_model.model.model.layers[0].mlp.down_proj.weight[0, 0] += 1.0
            assert before.only_intended_changed(peft_model)
        """
    )
    result = suite.runpytest()
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(
        [
            "peftaudit marker checks failed:",
            f"  trainable fraction 3.7992% > max_trainable_fraction 1.0000%: {TRAINABLE:,} of {TOTAL:,} "
            "parameters trainable (3.7992%)",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "E*assert <peftaudit FAIL: *1 failure; first: unexpected-change *layers.0.mlp.down_proj.weight>",
            "*- peftaudit verification -*",
            "FAIL: * tensors compared, 9 changed, 8/8 intended changed, 1 failure",
            "  unexpected-change: *layers.0.mlp.down_proj.weight: *(max |Δ| 1, *)*",
        ]
    )
    assert result.ret == 1


@pytest.mark.parametrize(
    ("marker", "message"),
    [
        ("max_trainable_fracton=0.1", "unknown argument(s) max_trainable_fracton"),
        ("max_trainable_fraction=2", "must be a number between 0 and 1, got 2"),
        ("", "needs at least one check"),
        ("seq_len=-4, fits='A10G'", "seq_len=...) must be a positive integer, got -4"),
        ("stack='jax==0.4', fits='A10G'", "stack=...): unknown package 'jax' in stack"),
        ("stack=4.44, fits='A10G'", "stack=...) must be a non-empty string, got 4.44"),
        ("lengths='random', fits='A10G'", "lengths=...) must be one of fixed, varied, got 'random'"),
        ("expandable_segments=1, fits='A10G'", "expandable_segments=...) must be True or False, got 1"),
    ],
)
def test_marker_arguments_are_validated(suite: pytest.Pytester, marker: str, message: str) -> None:
    suite.makepyfile(
        f"""
        import pytest

        @pytest.mark.peftaudit({marker})
        def test_x(peft_model):
            pass
        """
    )
    result = suite.runpytest()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([f"*{message}*"])
    result.stdout.no_fnmatch_line("*Traceback*")


def test_marker_needs_one_model(suite: pytest.Pytester) -> None:
    suite.makepyfile(
        """
        import pytest

        @pytest.mark.peftaudit(max_trainable=10)
        def test_x():
            pass
        """
    )
    result = suite.runpytest()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*needs exactly one torch.nn.Module fixture or model='fixture_name' (found: none)*"])


def test_help_and_markers(suite: pytest.Pytester) -> None:
    help_text = suite.runpytest("--help")
    help_text.stdout.fnmatch_lines(["peftaudit: audit and verify fine-tuning in tests:", "*--peftaudit-report*"])
    help_text.stdout.fnmatch_lines(
        ["  peftaudit_gpu (string):", "*default GPU for @pytest.mark.peftaudit(fits=...) checks"]
    )
    markers = suite.runpytest("--markers")
    markers.stdout.fnmatch_lines(["@pytest.mark.peftaudit(max_trainable_fraction=..., *): check the model*"])
    fixtures = suite.runpytest("--fixtures")
    fixtures.stdout.fnmatch_lines(["param_snapshot -- *", "    Take a snapshot of a model's parameters*"])


def test_plugin_can_be_disabled(suite: pytest.Pytester) -> None:
    suite.makepyfile("def test_x(peftaudit):\n    pass\n")
    result = suite.runpytest("-p", "no:peftaudit")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*fixture 'peftaudit' not found*"])


def test_xdist_workers_report_to_the_summary(suite: pytest.Pytester) -> None:
    suite.makepyfile(
        """
        import pytest

        @pytest.mark.parametrize("n", range(4))
        @pytest.mark.peftaudit(max_trainable_fraction=0.5)
        def test_many(peft_model, n):
            pass
        """
    )
    result = suite.runpytest_subprocess("-n", "2", "--peftaudit-report")
    result.assert_outcomes(passed=4)
    lines = [line for line in result.outlines if line.startswith("audit   ")]
    assert len(lines) == 4


def test_importing_the_plugin_imports_no_torch() -> None:
    code = (
        "import sys, peftaudit.pytest_plugin; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ, check=True)
    assert out.stdout.strip() == "[]"


def test_fits_marker_passes_and_fails_with_the_numbers(suite: pytest.Pytester) -> None:
    suite.makepyfile(
        """
        import pytest
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        @pytest.fixture
        def llama_7b():
            # Llama-2-7B's shape on the meta device: sized from its config, no memory used.
            config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                 num_attention_heads=32, vocab_size=32000)
            with torch.device("meta"):
                return LlamaForCausalLM(config)

        @pytest.mark.peftaudit(fits="H100", method="qlora", seq_len=1024)
        def test_qlora_fits_h100(llama_7b):
            pass

        @pytest.mark.peftaudit(fits="T4", method="full", seq_len=2048)
        def test_full_does_not_fit_t4(llama_7b):
            pass

        @pytest.mark.peftaudit(fits="H1000")
        def test_unknown_gpu(llama_7b):
            pass
        """
    )
    result = suite.runpytest("--peftaudit-report")
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines(
        [
            "peftaudit marker checks failed:",
            "  does not fit: * full (r=16) batch 1 x seq 2,048 on 1x T4 does not fit: estimated peak * GiB per GPU, "
            "14.60 GiB usable (* GiB short)",
        ]
    )
    result.stdout.fnmatch_lines(["*@pytest.mark.peftaudit(fits=...): unknown GPU 'H1000'*"])
    result.stdout.fnmatch_lines(["fit     * qlora (r=16) batch 1 x seq 1,024 on 1x H100 SXM: fits  *"])


def test_fits_marker_models_the_stack_from_the_marker_or_the_ini_key(suite: pytest.Pytester) -> None:
    suite.makeini("[pytest]\naddopts = -p no:cacheprovider\npeftaudit_stack = transformers==4.44,peft==0.12\n")
    suite.makepyfile(
        """
        import pytest

        @pytest.mark.peftaudit(fits="H100", seq_len=64)
        def test_from_ini(peft_model):
            pass

        @pytest.mark.peftaudit(fits="H100", seq_len=64, stack="peft==0.17", expandable_segments=True, lengths="varied")
        def test_from_marker(peft_model):
            pass
        """
    )
    result = suite.runpytest("--peftaudit-report")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        [
            "fit     * on 1x H100 SXM, stack transformers 4.44, peft 0.12: fits  *",
            "fit     * on 1x H100 SXM, stack peft 0.17: fits  *",
        ],
        consecutive=False,
    )
    suite.makeini("[pytest]\naddopts = -p no:cacheprovider\npeftaudit_stack = transformers=4.44\n")
    bad = suite.runpytest()
    bad.assert_outcomes(passed=1, failed=1)  # the marker's own stack overrides the malformed ini value
    bad.stdout.fnmatch_lines(["*the peftaudit_stack ini key: stack entry 'transformers=4.44' is not PACKAGE==VERSION*"])


def test_comparisons_of_verdicts_are_explained(suite: pytest.Pytester) -> None:
    suite.makepyfile(
        """
        import torch

        def test_compare(peft_model, param_snapshot, train_a_few_steps):
            before = param_snapshot(peft_model)
            train_a_few_steps(peft_model)
            with torch.no_grad():
                peft_model.base_model.model.model.norm.weight.add_(1.0)
            assert before.only_intended_changed(peft_model) == True
        """
    )
    result = suite.runpytest()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "E*assert peftaudit verification failed: FAIL: * tensors compared, 9 changed, 8/8 intended changed, "
            "1 failure",
            "E*unexpected-change: base_model.model.model.norm.weight",
        ]
    )
