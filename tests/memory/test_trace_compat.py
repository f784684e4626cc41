"""The trace's compatibility layer for older transformers/peft releases, and the traced peaks recorded under them.

The old releases themselves are not installed here (``benchmarks/trace_stacks.py`` runs them in
scratch environments); these tests check each shim's mechanism under the installed stack, where
every shim must be a no-op for the trace, and the integrity of ``tests/memory/data/stack_traces.json``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from peftaudit.memory.plan import PlanError

DATA = Path(__file__).parent / "data" / "stack_traces.json"


def test_lora_fields_an_older_peft_lacks_are_dropped_while_unset() -> None:
    import peft

    from peftaudit.memory.tracing.compat import lora_config_kwargs

    # PromptTuningConfig is a real config class without these fields, as LoraConfig was before peft 0.14.
    kept = lora_config_kwargs(peft.PromptTuningConfig, {"exclude_modules": None, "num_virtual_tokens": 4})
    assert kept == {"num_virtual_tokens": 4}
    with pytest.raises(PlanError, match=r"no PromptTuningConfig\.exclude_modules") as err:
        lora_config_kwargs(peft.PromptTuningConfig, {"exclude_modules": ["lm_head"]})
    assert "\n" not in str(err.value)
    assert lora_config_kwargs(peft.LoraConfig, {"exclude_modules": None, "target_parameters": None}) == {
        "exclude_modules": None,
        "target_parameters": None,
    }


def test_balanced_topk_routes_every_expert_the_same_number_of_tokens() -> None:
    import torch
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    from peftaudit.memory.tracing.compat import balanced_topk

    topk = balanced_topk(torch.topk)
    tokens, experts, k = 12, 4, 2
    with FakeTensorMode(allow_non_fake_inputs=True):
        hidden = torch.empty(tokens, 8, dtype=torch.bfloat16)
        probs = torch.empty(tokens, experts).softmax(-1)
        weights, chosen = topk(probs, k, dim=-1)
        assert isinstance(weights, FakeTensor) and tuple(weights.shape) == (tokens, k)
        # What transformers 4.x MoE blocks do with the indices: per expert, the tokens it gets.
        mask = torch.nn.functional.one_hot(chosen, num_classes=experts).permute(2, 1, 0)
        for e in range(experts):
            _slot, rows = torch.where(mask[e])
            assert rows.numel() == tokens * k // experts
            picked = hidden[None, rows].reshape(-1, 8)  # indexing a fake tensor with known indices
            assert isinstance(picked, FakeTensor) and tuple(picked.shape) == (tokens * k // experts, 8)
    assert sorted(chosen.tolist()[0]) == [0, 1] and len({tuple(r) for r in chosen.tolist()}) > 1
    real = torch.tensor([[0.1, 0.7, 0.2]])
    assert topk(real, 1).indices.tolist() == [[1]]


def test_attention_classes_leave_models_with_the_attention_interface_alone() -> None:
    from memory_models import build

    from peftaudit.memory.tracing.compat import attention_classes

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build("llama")
    before = [type(m) for m in model.modules()]
    assert attention_classes(model, "eager") == 0
    assert [type(m) for m in model.modules()] == before


def test_recorded_stack_traces_are_whole() -> None:
    data = json.loads(DATA.read_text())
    stacks = {r["stack"] for r in data["rows"]}
    assert len(stacks) >= 2 and any(s.startswith("transformers==4.") for s in stacks)
    for case in data["cases"]:
        rows = [r for r in data["rows"] if r["case"] == case]
        assert {r["stack"] for r in rows} == stacks, case
        for r in rows:
            v = r["versions"]
            assert r["stack"] == f"transformers=={v['transformers']},peft=={v['peft']}"
            # What was alive at the peak adds up to the peak.
            assert sum(r["at_peak"].values()) == r["peak_allocated_bytes"] > 0
