"""Vision-language towers against the real model's named parameters, for every multimodal catalog model.

The expected counts are computed here from ``model.named_parameters()`` of the real
transformers model on the meta device, by the submodule each tower is in, without
peftaudit's path rules: the vision module, the projector module and everything else.
"""

from __future__ import annotations

from typing import Any

import pytest

from peftaudit.inventory import take_inventory
from peftaudit.report import audit
from peftaudit.sources.build import build_from_config
from peftaudit.sources.catalog import entries, lookup
from peftaudit.towers import LANGUAGE_MODEL, PROJECTOR, VISION, split_towers

#: Catalog model -> (vision submodule, projector submodule(s)) as transformers builds them.
MULTIMODAL: dict[str, tuple[str, str | tuple[str, ...]]] = {
    "google/gemma-3-4b-pt": ("model.vision_tower", "model.multi_modal_projector"),
    "google/gemma-3-12b-pt": ("model.vision_tower", "model.multi_modal_projector"),
    "google/gemma-3-27b-pt": ("model.vision_tower", "model.multi_modal_projector"),
    "Qwen/Qwen2.5-VL-7B-Instruct": ("model.visual", "model.visual.merger"),
    "meta-llama/Llama-3.2-11B-Vision": ("model.vision_model", "model.multi_modal_projector"),
    "llava-hf/llava-1.5-7b-hf": ("model.vision_tower", "model.multi_modal_projector"),
    # LLaVA-NeXT's image_newline (model.image_newline) is outside both: the language model's.
    "llava-hf/llava-v1.6-mistral-7b-hf": ("model.vision_tower", "model.multi_modal_projector"),
    "google/paligemma-3b-pt-224": ("model.vision_tower", "model.multi_modal_projector"),
    "HuggingFaceTB/SmolVLM2-2.2B-Instruct": ("model.vision_model", "model.connector"),
    # Qwen3-VL's DeepStack mergers project vision features into the text too (vision blocks 8, 16, 24).
    "Qwen/Qwen3-VL-8B-Instruct": ("model.visual", ("model.visual.merger", "model.visual.deepstack_merger_list")),
    "Qwen/Qwen2-VL-7B-Instruct": ("model.visual", "model.visual.merger"),
}
VISION_ONLY = [
    "google/vit-base-patch16-224",
    "openai/clip-vit-large-patch14",
    "facebook/dinov2-large",
    "facebook/convnext-base-224",
    "microsoft/swin-tiny-patch4-window7-224",
]


def _build(model_id: str) -> Any:
    entry = lookup(model_id)
    assert entry is not None, model_id
    return build_from_config(entry.config, model_id=entry.id)


def _independent_counts(model: Any, vision: str, projector: str | tuple[str, ...]) -> dict[str, int]:
    """numel per tower straight from ``named_parameters()`` (tied tensors once, as torch yields them)."""
    counts = dict.fromkeys((VISION, PROJECTOR, LANGUAGE_MODEL), 0)
    projectors = (projector,) if isinstance(projector, str) else projector
    for name, param in model.named_parameters():
        if name.startswith(tuple(p + "." for p in projectors)):
            counts[PROJECTOR] += param.numel()
        elif name.startswith(vision + "."):
            counts[VISION] += param.numel()
        else:
            counts[LANGUAGE_MODEL] += param.numel()
    return counts


def test_every_multimodal_catalog_model_is_covered() -> None:
    with_towers = set()
    for entry in entries():
        if "vision_config" in entry.config and entry.config["architectures"][0].endswith("ForConditionalGeneration"):
            with_towers.add(entry.id)
    assert with_towers == set(MULTIMODAL)


@pytest.mark.parametrize("model_id", sorted(MULTIMODAL))
def test_towers_equal_the_real_models_submodules(model_id: str) -> None:
    vision, projector = MULTIMODAL[model_id]
    model = _build(model_id)
    expected = _independent_counts(model, vision, projector)
    inventory = take_inventory(model)
    towers = {t.name: t for t in split_towers(inventory)}
    assert {name: t.params for name, t in towers.items()} == expected
    assert sum(expected.values()) == inventory.total == sum(p.numel() for p in model.parameters())
    assert towers[VISION].modules == (vision,)
    assert towers[PROJECTOR].modules == ((projector,) if isinstance(projector, str) else projector)
    assert all(expected[name] > 0 for name in expected)


def test_gemma3_4b_language_model_is_the_published_text_decoder() -> None:
    # The catalog note's figure: Gemma3ForCausalLM built on text_config alone.
    towers = {t.name: t for t in split_towers(take_inventory(_build("google/gemma-3-4b-pt")))}
    assert towers[LANGUAGE_MODEL].params == 3_880_263_168


@pytest.mark.parametrize("model_id", ["meta-llama/Llama-3.2-1B", "openai-community/gpt2", *VISION_ONLY])
def test_models_without_a_language_and_vision_pair_have_no_towers(model_id: str) -> None:
    assert split_towers(take_inventory(_build(model_id))) == ()
    report = audit(model_id, use_cache=False)
    assert report.towers == ()
    assert "towers" not in report.to_dict()


def test_report_json_and_terminal_show_the_towers() -> None:
    from peftaudit.report.model import Report
    from peftaudit.report.render import RenderOptions
    from peftaudit.report.render.markdown import MarkdownRenderer
    from peftaudit.report.render.terminal import TerminalRenderer

    report = audit("llava-hf/llava-1.5-7b-hf", use_cache=False)
    data = report.to_dict()
    assert [t["name"] for t in data["towers"]] == [VISION, PROJECTOR, LANGUAGE_MODEL]
    assert sum(t["params"] for t in data["towers"]) == data["params"]["total"]
    assert Report.from_dict(data) == report
    options = RenderOptions(width=120, color=False, tree=False)
    text = TerminalRenderer().render(report, options)
    assert "Parameters per tower" in text and "model.multi_modal_projector" in text and "20,979,712" in text
    markdown = MarkdownRenderer().render(report, options)
    assert "| projector | 20,979,712 |" in markdown


def test_a_language_model_parameter_beside_the_towers_is_named_by_its_path() -> None:
    # LLaVA-NeXT's image_newline is a parameter of `model`, the module holding every tower: the language
    # model lists it by its own path, not `model` (which would cover the vision tower and projector too).
    towers = {t.name: t for t in split_towers(take_inventory(_build("llava-hf/llava-v1.6-mistral-7b-hf")))}
    assert towers[LANGUAGE_MODEL].modules == ("model.image_newline", "model.language_model", "lm_head")
