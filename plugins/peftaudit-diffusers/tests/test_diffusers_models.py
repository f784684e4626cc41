"""Bundled diffusers models: exact published counts, and the rules that classify their modules."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import pytest
from peftaudit_diffusers import MODEL_TYPES, DiffusersSource, lora_targets
from peftaudit_diffusers.bundled import entry, names

from peftaudit import Inventory, Report, audit
from peftaudit.plugin_api import ModuleRole, SourceOptions, take_inventory

# Every test here sees the plugin's rules as a user's install would (autoload may be off).
pytestmark = pytest.mark.usefixtures("diffusers_plugin")

# Each figure as its source prints it (see the bundled JSON for the source).
PUBLISHED: dict[str, int | str] = {
    "stable-diffusion-v1-5/unet": 859_520_964,
    "sdxl/unet": 2_567_463_684,
    "sd3-medium/transformer": "2B",
    "flux.1-dev/transformer": "12B",
}
# Our exact counts for the two models published only as rounded figures; a change here
# means diffusers (or the bundled config) changed the architecture.
EXACT = {"sd3-medium/transformer": 2_028_328_000, "flux.1-dev/transformer": 11_901_408_320}


@functools.cache
def _model(name: str) -> tuple[Any, Inventory]:
    source = DiffusersSource()
    resolved = source.resolve(f"diffusers:{name}", SourceOptions())
    assert resolved is not None
    module = source.build(resolved, SourceOptions())
    return module, take_inventory(module)


@pytest.mark.parametrize("name", ["stable-diffusion-v1-5/unet", "sdxl/unet", "sd3-medium/transformer"])
def test_report_matches_the_published_count(name: str) -> None:
    report: Report = audit(f"diffusers:{name}", use_cache=False)
    assert report.published is not None
    bundled = entry(name)
    assert bundled is not None
    assert report.published.value == PUBLISHED[name] == bundled["published_params"]["total"]
    assert report.published.matches
    if isinstance(PUBLISHED[name], int):
        assert report.params.total == PUBLISHED[name]
    else:
        assert report.params.total == EXACT[name]


@pytest.mark.slow
def test_flux_matches_its_published_12b() -> None:
    report = audit("diffusers:flux.1-dev/transformer", use_cache=False)
    assert report.params.total == EXACT["flux.1-dev/transformer"]
    assert report.published is not None and report.published.value == "12B" and report.published.matches


def test_every_bundled_config_is_tested() -> None:
    assert set(names()) == set(PUBLISHED)


def test_built_on_meta_with_a_model_type() -> None:
    module, inventory = _model("stable-diffusion-v1-5/unet")
    assert {p.device.type for p in module.parameters()} == {"meta"}
    assert inventory.model_type == MODEL_TYPES["UNet2DConditionModel"]


def _roles(inventory: Inventory) -> dict[str, str | None]:
    return {m.path: m.role for m in inventory.modules}


UNET_ATTENTION = {
    "to_q": ModuleRole.ATTENTION_Q,
    "to_k": ModuleRole.ATTENTION_K,
    "to_v": ModuleRole.ATTENTION_V,
    "to_out.0": ModuleRole.ATTENTION_O,
}
JOINT_ATTENTION = {
    **UNET_ATTENTION,
    "add_q_proj": ModuleRole.ATTENTION_Q,
    "add_k_proj": ModuleRole.ATTENTION_K,
    "add_v_proj": ModuleRole.ATTENTION_V,
    "to_add_out": ModuleRole.ATTENTION_O,
}


@pytest.mark.parametrize(
    ("name", "block", "expected"),
    [
        (
            "stable-diffusion-v1-5/unet",
            "down_blocks.0.attentions.0.transformer_blocks.0",
            {
                **{f"attn1.{k}": r for k, r in UNET_ATTENTION.items()},
                **{f"attn2.{k}": r for k, r in UNET_ATTENTION.items()},
                "ff.net.0.proj": ModuleRole.MLP_GATE_UP,
                "ff.net.2": ModuleRole.MLP_DOWN,
            },
        ),
        (
            "sdxl/unet",
            "down_blocks.2.attentions.1.transformer_blocks.9",
            {
                **{f"attn1.{k}": r for k, r in UNET_ATTENTION.items()},
                **{f"attn2.{k}": r for k, r in UNET_ATTENTION.items()},
                "ff.net.0.proj": ModuleRole.MLP_GATE_UP,
                "ff.net.2": ModuleRole.MLP_DOWN,
            },
        ),
        (
            "sd3-medium/transformer",
            "transformer_blocks.3",
            {
                **{f"attn.{k}": r for k, r in JOINT_ATTENTION.items()},
                "ff.net.0.proj": ModuleRole.MLP_UP,
                "ff.net.2": ModuleRole.MLP_DOWN,
                "ff_context.net.0.proj": ModuleRole.MLP_UP,
                "ff_context.net.2": ModuleRole.MLP_DOWN,
            },
        ),
    ],
)
def test_attention_and_feed_forward_are_classified(name: str, block: str, expected: dict[str, ModuleRole]) -> None:
    roles = _roles(_model(name)[1])
    assert {k: roles[f"{block}.{k}"] for k in expected} == expected


@pytest.mark.slow
def test_flux_double_and_single_blocks_are_classified() -> None:
    roles = _roles(_model("flux.1-dev/transformer")[1])
    double = {f"attn.{k}": r for k, r in JOINT_ATTENTION.items()}
    assert {k: roles[f"transformer_blocks.18.{k}"] for k in double} == double
    single = {
        "attn.to_q": ModuleRole.ATTENTION_Q,
        "attn.to_k": ModuleRole.ATTENTION_K,
        "attn.to_v": ModuleRole.ATTENTION_V,
        "proj_mlp": ModuleRole.MLP_UP,
        "proj_out": ModuleRole.ATTENTION_OTHER,
    }
    assert {k: roles[f"single_transformer_blocks.37.{k}"] for k in single} == single


@pytest.mark.parametrize(
    ("name", "kind"),
    [("stable-diffusion-v1-5/unet", "unet"), ("sdxl/unet", "sdxl"), ("sd3-medium/transformer", "sd3")],
)
def test_lora_targets_name_linear_attention_modules(name: str, kind: str) -> None:
    inventory = _model(name)[1]
    for target in lora_targets(kind):
        hits = [m for m in inventory.modules if m.path == target or m.path.endswith(f".{target}")]
        assert hits, target
        assert all(m.type == "Linear" for m in hits), target
        assert all(m.role is not None for m in hits), target


def test_lora_targets_follow_diffusers_training_scripts() -> None:
    assert lora_targets("unet") == ("to_q", "to_k", "to_v", "to_out.0")
    assert lora_targets("FluxTransformer2DModel") == lora_targets("sd3")
    assert {"add_q_proj", "to_add_out", "ff.net.0.proj", "ff_context.net.2"} <= set(lora_targets("flux"))
    with pytest.raises(ValueError, match="unknown diffusers model kind"):
        lora_targets("vae")


def test_other_folders_are_left_to_other_sources(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    assert DiffusersSource().resolve(str(tmp_path), SourceOptions()) is None
    assert DiffusersSource().resolve("meta-llama/Llama-3.1-8B", SourceOptions()) is None
