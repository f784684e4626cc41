"""Image-training memory: the calibrated formula against the fake-tensor trace of a real step."""

from __future__ import annotations

import functools

import pytest
from peftaudit_diffusers.memory import (
    CALIBRATION,
    CALIBRATION_POINTS,
    ImageMemoryEstimate,
    calibration_for,
    estimate_image_training,
    image_plan,
    trace_image_training,
)

from peftaudit.plugin_api import PlanError, take_inventory

pytestmark = pytest.mark.usefixtures("diffusers_plugin")

SD15 = "stable-diffusion-v1-5/unet"
SDXL = "sdxl/unet"
MIB = 1024**2


@functools.cache
def _traced(spec: str, method: str, resolution: int, batch: int, checkpointing: bool) -> ImageMemoryEstimate:
    return trace_image_training(spec, method, resolution, batch, checkpointing)


def _error(spec: str, method: str, resolution: int, batch: int, checkpointing: bool) -> float:
    traced = _traced(spec, method, resolution, batch, checkpointing)
    est = estimate_image_training(spec, method, resolution, batch, checkpointing)
    return est.allocated_bytes / traced.allocated_bytes - 1


def test_estimate_components_add_up_and_serialise() -> None:
    est = estimate_image_training(SD15, "lora", 512, 2)
    assert est.total_bytes == sum(est.components.values())
    assert est.source == "analytic"
    data = est.to_dict()
    assert data["resolution"] == 512 and data["batch_size"] == 2 and data["total_bytes"] == est.total_bytes
    # SD 1.5 UNet in bf16: 859,520,964 params x 2 bytes.
    assert est.components["base_weights"] == 859_520_964 * 2
    # rank-4 LoRA on to_q/k/v/out.0: 797,184 adapter parameters, fp32, with two fp32 Adam moments.
    assert est.trainable_params == 797_184
    assert est.components["trainable_weights"] == 797_184 * 4
    assert est.components["optimizer_states"] == 2 * 797_184 * 4


def test_activations_grow_with_pixels_and_batch() -> None:
    small = estimate_image_training(SD15, "lora", 256, 1)
    big = estimate_image_training(SD15, "lora", 512, 1)
    double = estimate_image_training(SD15, "lora", 512, 2)
    checkpointed = estimate_image_training(SD15, "lora", 512, 2, gradient_checkpointing=True)
    assert small.components["activations"] < big.components["activations"] < double.components["activations"]
    assert double.components["activations"] == pytest.approx(2 * big.components["activations"], rel=1e-6)
    assert checkpointed.components["activations"] < double.components["activations"] / 3


def test_inventory_is_matched_to_its_calibration() -> None:
    from peftaudit_diffusers.memory import _build

    inventory = take_inventory(_build(SD15))
    assert calibration_for(inventory) is CALIBRATION[SD15]
    assert estimate_image_training(inventory, "lora", 512, 1) == estimate_image_training(SD15, "lora", 512, 1)


def test_uncovered_inputs_are_refused() -> None:
    with pytest.raises(PlanError, match="multiple of 8"):
        estimate_image_training(SD15, "lora", 500, 1)
    with pytest.raises(PlanError, match="methods"):
        estimate_image_training(SD15, "qlora", 512, 1)
    with pytest.raises(PlanError, match="UNet2DConditionModel"):
        estimate_image_training("flux.1-dev/transformer", "lora", 512, 1)
    with pytest.raises(PlanError, match="half-precision"):
        image_plan("lora", 1, precision="fp32")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("resolution", "batch", "checkpointing"),
    # batch (512 x 1 and 2), resolution (384, 1024) and checkpointing each varied once
    [(512, 1, False), (384, 2, False), (512, 2, True), (1024, 1, False)],
)
def test_sd15_lora_estimate_matches_the_trace(resolution: int, batch: int, checkpointing: bool) -> None:
    assert (resolution, batch) not in CALIBRATION_POINTS
    assert abs(_error(SD15, "lora", resolution, batch, checkpointing)) < 0.10


@pytest.mark.slow
@pytest.mark.parametrize(("resolution", "batch"), [(256, 1), (512, 2)])
def test_sd15_full_finetuning_estimate_matches_the_trace(resolution: int, batch: int) -> None:
    traced = _traced(SD15, "full", resolution, batch, False)
    assert traced.trainable_params == 859_520_964
    assert abs(_error(SD15, "full", resolution, batch, False)) < 0.10


@pytest.mark.slow
def test_sdxl_lora_estimate_matches_the_trace() -> None:
    assert abs(_error(SDXL, "lora", 512, 2, False)) < 0.10


@pytest.mark.slow
def test_sd15_calibration_is_reproduced_by_calibrate() -> None:
    from peftaudit_diffusers.memory import calibrate

    fitted = calibrate(SD15)
    bundled = CALIBRATION[SD15]
    assert fitted.total_params == bundled.total_params
    for name in ("per_pixel", "per_image", "per_pixel_checkpointed", "per_image_checkpointed"):
        assert getattr(fitted, name) == pytest.approx(getattr(bundled, name), rel=0.01), name
