"""Images in memory estimates: vision models (ViT, CLIP, DINOv2, ConvNeXt, Swin) and multimodal models with images.

Every estimate is checked against the fake-tensor trace of the same model and plan
(:func:`peftaudit.memory.trace`): real transformers models on meta, real peft, no mocks.
The models are the catalog's published configs with fewer layers (the estimate's
profile is derived from a depth-reduced trace either way; fewer layers keep the
oracle's full trace quick).
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any

import pytest

from peftaudit.memory import PlanError, TrainingPlan, estimate, trace

CATALOG = Path(__file__).parents[2] / "peftaudit" / "catalog" / "models"
LORA = TrainingPlan(method="lora", batch_size=2)
QLORA = TrainingPlan(method="qlora", batch_size=2, gradient_checkpointing=True)


def catalog(name: str, layers: int = 3) -> dict[str, Any]:
    """A catalog entry's published config with ``layers`` layers in every stack."""
    config = copy.deepcopy(json.loads((CATALOG / f"{name}.json").read_text())["config"])
    for section in (config, config.get("vision_config", {}), config.get("text_config", {})):
        for key in ("num_hidden_layers", "depth"):
            if key in section:
                section[key] = layers
    if "text_config" in config:  # LLaVA's leaves its depth implicit: LlamaConfig's 32 layers, not `layers`
        config["text_config"].setdefault("num_hidden_layers", layers)
    if "depths" in config:  # ConvNeXt: one or two blocks per stage, four stages
        config["depths"] = [1, 1, 2, 1]
    return config


def build(config: dict[str, Any]) -> Any:
    from peftaudit.sources.build import build_from_config

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_from_config(config, model_id="test")


def inventory(config: dict[str, Any]) -> Any:
    from peftaudit.inventory import take_inventory

    return take_inventory(build(config))


def allocated(e: Any) -> int:
    """The allocated peak: the total without the CUDA context and the allocator's slack."""
    return int(e.total_bytes - e.components["cuda_context"] - e.components["allocator_margin"])


def assert_close(config: dict[str, Any], plan: TrainingPlan, tolerance: float = 0.03) -> tuple[int, int]:
    est = estimate(inventory(config), plan)
    assert "approximate-activations" not in [w.code for w in est.warnings]
    traced = trace(build(config), plan)
    a, t = allocated(est), allocated(traced)
    assert abs(a - t) <= tolerance * t, f"estimate {a:,} vs trace {t:,} ({(a - t) / t:+.2%})"
    return a, t


VISION = [
    pytest.param("google__vit-base-patch16-224", LORA, id="vit-lora"),
    pytest.param("google__vit-base-patch16-224", QLORA, id="vit-qlora-ckpt"),
    pytest.param("facebook__dinov2-large", LORA, id="dinov2-lora", marks=pytest.mark.slow),
    pytest.param("facebook__dinov2-large", QLORA, id="dinov2-qlora-ckpt"),
    pytest.param("openai__clip-vit-large-patch14", LORA, id="clip-lora", marks=pytest.mark.slow),
    pytest.param("openai__clip-vit-large-patch14", QLORA, id="clip-qlora-ckpt", marks=pytest.mark.slow),
    pytest.param("facebook__convnext-base-224", LORA, id="convnext-lora"),
    # transformers refuses gradient checkpointing for ConvNeXt (test below): QLoRA without it.
    pytest.param("facebook__convnext-base-224", QLORA.with_(gradient_checkpointing=False), id="convnext-qlora"),
    # Swin: window attention over 7 x 7 patches with a relative position bias, stages joined by patch merging.
    pytest.param("microsoft__swin-tiny-patch4-window7-224", LORA, id="swin-lora", marks=pytest.mark.slow),
    pytest.param("microsoft__swin-tiny-patch4-window7-224", QLORA, id="swin-qlora-ckpt", marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("name", "plan"), VISION)
def test_vision_model_estimate_matches_the_trace(name: str, plan: TrainingPlan) -> None:
    assert_close(catalog(name), plan)


def test_image_size_changes_a_vision_estimate_as_the_trace_does() -> None:
    """ViT-B/16 at 384 px: (384/16)^2 = 576 patches instead of 196, position embeddings interpolated."""
    config = catalog("google__vit-base-patch16-224", layers=2)
    small, _ = assert_close(config, LORA)
    large, _ = assert_close(config, LORA.with_(image_size=384))
    assert large > small


def test_a_vision_model_ignores_seq_len() -> None:
    inv = inventory(catalog("openai__clip-vit-large-patch14", layers=2))
    short, long = estimate(inv, LORA.with_(seq_len=64)), estimate(inv, LORA.with_(seq_len=8192))
    assert short.total_bytes == long.total_bytes
    # CLIP's 77 text positions are the text tower's own: no warning about seq-len.
    assert "seq-len-exceeds-max-positions" not in [w.code for w in long.warnings]


def test_convnext_with_checkpointing_is_the_same_one_line_plan_error_in_estimate_and_trace() -> None:
    config = catalog("facebook__convnext-base-224")
    with pytest.raises(PlanError, match="does not support activation checkpointing") as estimated:
        estimate(inventory(config), QLORA)
    with pytest.raises(PlanError) as traced:
        trace(build(config), QLORA)
    assert str(estimated.value) == str(traced.value)
    assert str(traced.value) == (
        "ConvNextForImageClassification does not support activation checkpointing in transformers: "
        "train it without gradient checkpointing"
    )


MULTIMODAL = [
    pytest.param("llava-hf__llava-1.5-7b-hf", 1024, LORA, id="lora-llava-1.5"),
    # QLoRA with checkpointing on a CLIP tower with images is LLaVA-NeXT's test below (the same tower,
    # tiled); LLaVA-1.5's own took a minute and a half of the suite's time.
    pytest.param("google__gemma-3-4b-pt", 2048, LORA, id="lora-gemma-3-4b"),
    pytest.param("google__gemma-3-4b-pt", 2048, QLORA, id="qlora-ckpt-gemma-3-4b"),
    # PaliGemma: 256 image tokens as a bidirectional prefix (token_type_ids), 3 text and 3 vision layers.
    pytest.param("google__paligemma-3b-pt-224", 512, LORA, id="lora-paligemma-3b"),
    pytest.param("google__paligemma-3b-pt-224", 512, QLORA, id="qlora-ckpt-paligemma-3b"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "seq", "plan"), MULTIMODAL)
def test_images_add_the_vision_activations_the_trace_sees(name: str, seq: int, plan: TrainingPlan) -> None:
    config = catalog(name)
    text_est, text_trace = assert_close(config, plan.with_(seq_len=seq))
    image_est, image_trace = assert_close(config, plan.with_(seq_len=seq, images=1))
    assert image_est > text_est and image_trace > text_trace
    # The difference is the vision tower's activations and the image's pixels, as the trace sees them
    # (to 15 %: QLoRA LLaVA with 3 layers, 64.5 MB estimated vs 70.9 MB traced).
    assert abs((image_est - text_est) - (image_trace - text_trace)) <= 0.15 * (image_trace - text_trace)


def mllama(depth: int = 6) -> dict[str, Any]:
    """Llama 3.2 11B Vision cut to ``depth`` text and vision layers, two global vision layers.

    Its layer-index lists are cut with it (:func:`memory_models.reduced_config`): text layer 3 stays
    a cross-attention layer (so the derivation's copy keeps it at position 2, where the full model
    has it at 3), and the vision model still stacks five layer outputs (``vision_output_dim`` is
    6 x 1280).
    """
    from memory_models import reduced_config

    config = reduced_config(catalog("meta-llama__Llama-3.2-11B-Vision"), depth)
    text, vision = config["text_config"], config["vision_config"]
    text["num_hidden_layers"] = vision["num_hidden_layers"] = depth
    vision["num_global_layers"] = 2
    return config


@pytest.mark.slow
@pytest.mark.parametrize("plan", [LORA, QLORA], ids=["lora", "qlora-ckpt"])
def test_mllama_cross_attention_images_match_the_trace(plan: TrainingPlan) -> None:
    """Mllama's images reach the text through cross-attention layers, which run only with images.

    Text-only, the cross-attention layers are skipped (no warning: the copy keeps layer 3 as one);
    with an image, the vision tower's 4 tiles x 1,601 patches and the cross-attention over them.
    """
    config = mllama()
    assert config["text_config"]["cross_attention_layers"] == [3]
    text_est, text_trace = assert_close(config, plan.with_(seq_len=1024))
    image_est, image_trace = assert_close(config, plan.with_(seq_len=1024, images=1))
    assert image_est > text_est and image_trace > text_trace


def qwen_vl() -> dict[str, Any]:
    """Qwen2.5-VL 7B with 3 text and 3 vision layers, the middle vision layer a full-attention one."""
    config = catalog("Qwen__Qwen2.5-VL-7B-Instruct")
    config["vision_config"]["fullatt_block_indexes"] = [1]
    return config


@pytest.mark.slow
@pytest.mark.parametrize("plan", [LORA, QLORA], ids=["lora", "qlora-ckpt"])
def test_qwen_vl_images_match_the_trace(plan: TrainingPlan) -> None:
    """Qwen2.5-VL reads its image grid's values: the trace runs its vision tower on a known grid."""
    config = qwen_vl()
    text_est, text_trace = assert_close(config, plan.with_(seq_len=2048))
    image_est, image_trace = assert_close(config, plan.with_(seq_len=2048, images=1))
    assert image_est > text_est and image_trace > text_trace


@pytest.mark.slow
def test_qwen_vl_one_attention_sequence_keeps_what_the_per_window_split_keeps(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The trace's one attention over all patches (standins._one_sequence) against the model's own split.

    The model attends per image (full-attention layers) and per 112 px window (the others); with
    SDPA's flash kernel what a step keeps is per token, so the peaks are equal.
    """
    from peftaudit.memory.tracing import standins

    config, plan = qwen_vl(), LORA.with_(seq_len=2048, images=1)
    one = allocated(trace(build(config), plan))
    monkeypatch.setattr(standins, "_one_sequence", lambda cu_seqlens: cu_seqlens)
    split = allocated(trace(build(config), plan))
    assert one == split


def test_image_tokens_default_from_the_config() -> None:
    from peftaudit.memory.images import image_tokens_of

    llava = json.loads((CATALOG / "llava-hf__llava-1.5-7b-hf.json").read_text())["config"]
    gemma = json.loads((CATALOG / "google__gemma-3-4b-pt.json").read_text())["config"]
    qwen = json.loads((CATALOG / "Qwen__Qwen2.5-VL-7B-Instruct.json").read_text())["config"]
    assert image_tokens_of(llava, TrainingPlan()) == (336 // 14) ** 2  # 576, CLS dropped
    assert image_tokens_of(gemma, TrainingPlan()) == 256  # mm_tokens_per_image
    assert image_tokens_of(qwen, TrainingPlan()) == (756 // 28) ** 2  # 729 at 756 px
    assert image_tokens_of(llava, TrainingPlan(image_tokens=100)) == 100
    # Mllama: one <|image|> token per image in the text; its vision tokens go to cross-attention.
    assert image_tokens_of({"model_type": "mllama"}, TrainingPlan()) == 1


@pytest.mark.parametrize(
    ("name", "fields", "message"),
    [
        ("llava-hf__llava-1.5-7b-hf", {"images": 4, "seq_len": 2048}, "2,304 tokens do not fit in seq-len 2,048"),
        ("openai-community__gpt2", {"images": 1}, "has no image inputs"),
        ("google__vit-base-patch16-224", {"images": 1}, "is a vision model"),
        ("openai-community__gpt2", {"image_size": 224}, "--image-size applies to vision models"),
        ("Qwen__Qwen2.5-VL-7B-Instruct", {"images": 1, "attention": "eager"}, "images are not estimated yet"),
        ("meta-llama__Llama-3.2-11B-Vision", {"images": 1, "image_tokens": 64}, "--image-tokens does not apply"),
    ],
)
def test_images_that_do_not_apply_are_plan_errors(name: str, fields: dict[str, Any], message: str) -> None:
    from peftaudit.memory.images import check_images

    config = json.loads((CATALOG / f"{name}.json").read_text())["config"]
    with pytest.raises(PlanError, match=message):
        check_images(config, TrainingPlan(**fields), name)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"images": -1}, "images must be a whole number >= 0"),
        ({"image_tokens": 0}, "image tokens must be a positive integer"),
        ({"image_size": -224}, "image size must be a positive integer"),
        ({"images": 2, "image_tokens": 1024, "seq_len": 2048}, "do not fit in seq-len 2,048"),
    ],
)
def test_bad_image_fields_fail_validation(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(PlanError, match=message):
        TrainingPlan(**fields).validate()


# --- Idefics3 / SmolVLM, Qwen3-VL and Qwen2-VL --------------------------------------------------


def smolvlm(model_type: str = "smolvlm", layers: int = 2) -> dict[str, Any]:
    """SmolVLM2-2.2B-Instruct with ``layers`` text and vision layers; as ``idefics3``, the same model as Idefics3.

    SmolVLM is the Idefics3 architecture (SigLIP, pixel-shuffle connector, a Llama decoder):
    Idefics3ForConditionalGeneration builds the same modules from the same config.
    """
    config = catalog("HuggingFaceTB__SmolVLM2-2.2B-Instruct", layers)
    if model_type == "idefics3":
        config.update(model_type="idefics3", architectures=["Idefics3ForConditionalGeneration"])
        config["vision_config"]["model_type"] = "idefics3_vision"
    return config


@pytest.mark.slow
def test_smolvlm_sub_images_match_the_trace() -> None:
    """SmolVLM: an image is sub-images of 81 tokens; two per image here (the default 17 is slow).

    The model reads which images are padding from their pixel values: the trace answers that none
    is (standins._idefics3_stand_ins). The derived profile replays the trace exactly: 1 %. Text
    only, the catalog check runs SmolVLM2 in three plan shapes (test_memory_derived_catalog.py).
    """
    assert_close(smolvlm(), LORA.with_(seq_len=256, images=1, image_tokens=162), tolerance=0.01)


@pytest.mark.slow
def test_idefics3_images_match_the_trace() -> None:
    """The same model as Idefics3 (its own classes and stand-ins), QLoRA with checkpointing, one sub-image."""
    assert_close(smolvlm("idefics3"), QLORA.with_(seq_len=256, images=1, image_tokens=81), tolerance=0.01)


def qwen3_vl() -> dict[str, Any]:
    """Qwen3-VL 8B with 3 text and 4 vision layers, DeepStack after vision blocks 1 and 3.

    As in the full model (blocks 8, 16 and 24 of 27), vision blocks each feed a merger of their
    own, with a plain block between them, and the first decoder layers (as many) add the mergers'
    outputs to the image tokens.
    """
    config = catalog("Qwen__Qwen3-VL-8B-Instruct")
    config["vision_config"].update(depth=4, deepstack_visual_indexes=[1, 3])
    return config


@pytest.mark.slow
def test_qwen3_vl_deepstack_images_match_the_trace() -> None:
    """Qwen3-VL reads its grid's and token types' values and adds DeepStack features: the trace runs them all.

    The derived copy keeps every DeepStack layer (derived/kinds.py): the profile replays the trace
    to a few bytes, where keeping one of them leaves out a merger and an addition (0.65 % short).
    Text only, the catalog check runs Qwen3-VL in three plan shapes.
    """
    assert_close(qwen3_vl(), LORA.with_(seq_len=640, images=1), tolerance=0.001)


@pytest.mark.slow
def test_qwen2_vl_images_match_the_trace() -> None:
    """Qwen2-VL (no windows, unlike Qwen2.5-VL): with images it requires the token types, which the step passes.

    QLoRA with checkpointing, 729 image tokens; its text path is Qwen2's (the catalog check covers it).
    """
    assert_close(catalog("Qwen__Qwen2-VL-7B-Instruct", layers=2), QLORA.with_(seq_len=768, images=1), tolerance=0.01)


def test_deepstack_layers_are_kept_in_the_derived_copy() -> None:
    """Every DeepStack vision block and decoder layer is a kind of its own; the mergers are no stack."""
    from peftaudit.memory.derived.kinds import stacks
    from peftaudit.plugins import memory_methods

    config = catalog("Qwen__Qwen3-VL-8B-Instruct", layers=1)
    config["vision_config"]["depth"] = 27  # blocks 8, 16 and 24 feed the mergers, as published
    config["text_config"]["num_hidden_layers"] = 6
    inv = inventory(config)
    kept = {s.path: s.kept for s in stacks(inv, memory_methods()["lora"].adapt(inv, LORA))}
    assert kept == {"model.visual.blocks": (0, 1, 8, 16, 24), "model.language_model.layers": (0, 1, 2, 3)}


def test_idefics3_and_qwen_vl_image_tokens_are_their_processors() -> None:
    """Default image tokens against transformers' own processors at the published settings.

    SmolVLM2: Idefics3's processor splits a square image into 4 x 4 sub-images plus the global one
    (``get_number_of_image_patches`` at ``size`` 1536 / ``max_image_size`` 384, its
    preprocessor_config.json), each ``image_seq_len`` tokens of the built model. Qwen3-VL and
    Qwen2-VL: the processor's patches for a 768 px image (LLaMA-Factory's ``image_max_pixels``),
    merged 2 x 2.
    """
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from peftaudit.memory.images import image_tokens_of

    names = ("HuggingFaceTB__SmolVLM2-2.2B-Instruct", "Qwen__Qwen3-VL-8B-Instruct", "Qwen__Qwen2-VL-7B-Instruct")
    smol, qwen3, qwen2 = (json.loads((CATALOG / f"{name}.json").read_text())["config"] for name in names)
    processor = Idefics3ImageProcessorPil(size={"longest_edge": 1536}, max_image_size={"longest_edge": 384})
    sub_images = {processor.get_number_of_image_patches(side, side)[0] for side in (384, 768, 1000, 4000)}
    assert sub_images == {17}
    assert image_tokens_of(smol, TrainingPlan()) == 17 * build(smolvlm(layers=1)).model.image_seq_len == 17 * 81
    assert image_tokens_of(smolvlm("idefics3"), TrainingPlan()) == 1377
    qwen3_patches = Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2)
    assert image_tokens_of(qwen3, TrainingPlan()) == qwen3_patches.get_number_of_image_patches(768, 768, {}) // 4 == 576
    at_most_768 = {"longest_edge": 768 * 768, "shortest_edge": 3136}  # LLaMA-Factory's image_max_pixels
    qwen2_patches = Qwen2VLImageProcessorPil(patch_size=14, merge_size=2, size=at_most_768)
    assert image_tokens_of(qwen2, TrainingPlan()) == qwen2_patches.get_number_of_image_patches(768, 768, {}) // 4 == 729
    # --image-tokens: whole sub-images (81: one image without splitting), a square grid for Qwen-VL.
    assert image_tokens_of(smol, TrainingPlan(image_tokens=81)) == 81
    assert image_tokens_of(qwen3, TrainingPlan(image_tokens=256)) == 256


@pytest.mark.parametrize(
    ("name", "fields", "message"),
    [
        (
            "HuggingFaceTB__SmolVLM2-2.2B-Instruct",
            {"images": 1, "image_tokens": 100},
            r"--image-tokens 100 does not fit .*whole sub-images of 81 tokens each \(17 = 1,377 tokens",
        ),
        ("HuggingFaceTB__SmolVLM2-2.2B-Instruct", {"images": 2}, r"2 image\(s\) x 1377 tokens = 2,754 tokens do not"),
        ("Qwen__Qwen3-VL-8B-Instruct", {"images": 1, "image_tokens": 500}, "a square grid of merged patches"),
        ("Qwen__Qwen3-VL-8B-Instruct", {"images": 1, "attention": "eager"}, "images are not estimated yet"),
        ("Qwen__Qwen2-VL-7B-Instruct", {"images": 1, "attention": "eager"}, "images are not estimated yet"),
    ],
)
def test_idefics3_and_qwen3_vl_plan_errors(name: str, fields: dict[str, Any], message: str) -> None:
    from peftaudit.memory.images import check_images

    config = json.loads((CATALOG / f"{name}.json").read_text())["config"]
    with pytest.raises(PlanError, match=message) as caught:
        check_images(config, TrainingPlan(**fields), name)
    assert "\n" not in str(caught.value)


def test_smolvlm_image_tokens_that_split_no_sub_image_are_one_line_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    from peftaudit.cli import main

    args = ["report", "HuggingFaceTB/SmolVLM2-2.2B-Instruct", "--method", "lora", "--images", "1"]
    assert main([*args, "--image-tokens", "100", "--no-cache"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("peftaudit: error: --image-tokens 100 does not fit") and err.count("\n") == 1


# --- LLaVA-NeXT and PaliGemma ------------------------------------------------------------------


def llava_next(depth: int = 2) -> dict[str, Any]:
    """llava-v1.6-mistral-7b-hf with ``depth`` text and vision layers (its text_config leaves the 32 implicit)."""
    config = catalog("llava-hf__llava-v1.6-mistral-7b-hf", depth)
    config["text_config"]["num_hidden_layers"] = depth
    return config


@pytest.mark.slow
def test_llava_next_any_resolution_images_match_the_trace() -> None:
    """LLaVA-NeXT reads its images' sizes to tile them: 5 tiles of 336 px and 2,928 tokens per 768 px image.

    The trace packs every image's tiles at once (tracing/anyres.py), so the profile fits over batch sizes.
    QLoRA with checkpointing only (the vision tower recomputed too), to keep the suite's time: LoRA
    without it matched as exactly when this was written (+0.00 % text-only and with one image).
    """
    config, plan = llava_next(), QLORA
    text_est, text_trace = assert_close(config, plan.with_(seq_len=3072))
    image_est, image_trace = assert_close(config, plan.with_(seq_len=3072, images=1))
    assert image_est > text_est and image_trace > text_trace


def test_llava_next_and_paligemma_image_tokens_are_their_processors() -> None:
    """Image tokens and tiles against transformers' own processor arithmetic and PaliGemma's config.

    LLaVA-NeXT: ``LlavaNextProcessor._get_number_of_features`` (the placeholders it writes; the
    "default" strategy drops the CLS token, one less) and ``image_size_to_num_patches`` (the tiles the
    model takes per image), for the 768 px default and for other sizes and aspects.
    """
    from transformers import PaliGemmaConfig
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches
    from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor

    from peftaudit.memory.images import LLAVA_NEXT_IMAGE_SIDE, any_resolution, image_tokens_of

    llava = json.loads((CATALOG / "llava-hf__llava-v1.6-mistral-7b-hf.json").read_text())["config"]
    pali = json.loads((CATALOG / "google__paligemma-3b-pt-224.json").read_text())["config"]
    processor = object.__new__(LlavaNextProcessor)  # its arithmetic only: no tokenizer or image files
    processor.__dict__.update(
        patch_size=14,
        num_additional_image_tokens=1,
        image_processor=type("ImageProcessor", (), {"image_grid_pinpoints": llava["image_grid_pinpoints"]})(),
    )
    for height, width in [(768, 768), (480, 640), (336, 336), (1000, 300), (224, 224), (2000, 900)]:
        layout = any_resolution(llava, height, width)
        assert layout.tokens == processor._get_number_of_features(height, width, 336, 336) - 1
        assert layout.tiles == image_size_to_num_patches((height, width), llava["image_grid_pinpoints"], 336)
    assert LLAVA_NEXT_IMAGE_SIDE == 768
    assert image_tokens_of(llava, TrainingPlan()) == 2928 == 24 * 24 + 48 * 48 + 48
    assert any_resolution(llava, 768, 768).tiles == 5
    # PaliGemma: 224 px in 14 px patches, what PaliGemmaConfig sets num_image_tokens to.
    built = PaliGemmaConfig(**{k: v for k, v in pali.items() if k != "model_type"})
    assert image_tokens_of(pali, TrainingPlan()) == built.get_text_config().num_image_tokens == 256
    assert image_tokens_of(pali, TrainingPlan(image_tokens=100)) == 100


def tiny_llava_next() -> Any:
    """A LLaVA-NeXT model small enough to run on real values: 28 px tiles of 2 x 2 patches, 16 features."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    config = LlavaNextConfig(
        vision_config={
            "model_type": "clip_vision_model",
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 28,
            "patch_size": 14,
        },
        text_config={
            "model_type": "mistral",
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "vocab_size": 64,
        },
        image_grid_pinpoints=[[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]],
        image_token_index=63,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    return LlavaNextForConditionalGeneration(config).eval()


@pytest.mark.parametrize(("height", "width"), [(64, 64), (60, 40), (30, 90)])
def test_llava_next_tiles_packed_at_once_are_the_models_own(height: int, width: int) -> None:
    """The trace's packing of every image at once (tracing/anyres.py) against the model's loop, on real values.

    Three images of one size (square; wider than its grid, so padding is cut; a 1 x 3 grid): the same
    features in the same order, and as many as :func:`any_resolution` counts.
    """
    import torch

    from peftaudit.memory.images import any_resolution
    from peftaudit.memory.tracing.anyres import packed_at_once
    from peftaudit.memory.tracing.standins import known_values

    model = tiny_llava_next().model
    config = model.config.to_dict()
    layout = any_resolution(config, height, width)
    torch.manual_seed(0)
    projected = torch.randn(3 * layout.tiles, 4, 16)  # 3 images' tiles of 2 x 2 features, as split by the model
    features = torch.split(projected, [layout.tiles] * 3, dim=0)
    sizes = known_values([[height, width]] * 3)
    own, own_lengths = type(model).pack_image_features(model, features, sizes, "default", model.image_newline)
    at_once, lengths = packed_at_once(type(model).pack_image_features)(
        model, features, sizes, "default", model.image_newline
    )
    assert [f.shape[0] for f in own] == [layout.tokens] * 3
    assert all(torch.equal(a, b) for a, b in zip(own, at_once, strict=True))
    assert torch.equal(own_lengths, lengths)


@pytest.mark.slow
def test_llava_next_packing_at_once_keeps_what_the_loop_keeps(monkeypatch: pytest.MonkeyPatch) -> None:
    """The trace's peak with the images packed at once and with the model's own loop, at one batch size."""
    from peftaudit.memory.tracing import anyres

    config, plan = llava_next(), QLORA.with_(batch_size=3, seq_len=3072, images=1)
    at_once = allocated(trace(build(config), plan))
    monkeypatch.setattr(anyres, "install", lambda patch: None)
    assert allocated(trace(build(config), plan)) == at_once


@pytest.mark.parametrize(
    ("name", "fields", "message"),
    [
        (
            "llava-hf__llava-v1.6-mistral-7b-hf",
            {"images": 1, "image_tokens": 576, "seq_len": 4096},
            r"--image-tokens does not apply to .*any-resolution tiles .* 768 px square image: 5 tiles, 2,928 tokens",
        ),
        ("llava-hf__llava-v1.6-mistral-7b-hf", {"images": 1}, "2,928 tokens do not fit in seq-len 2,048"),
        ("google__paligemma-3b-pt-224", {"images": 8}, "8 image\\(s\\) x 256 tokens = 2,048 tokens do not fit"),
    ],
)
def test_llava_next_and_paligemma_plan_errors(name: str, fields: dict[str, Any], message: str) -> None:
    from peftaudit.memory.images import check_images

    config = json.loads((CATALOG / f"{name}.json").read_text())["config"]
    with pytest.raises(PlanError, match=message) as caught:
        check_images(config, TrainingPlan(**fields), name)
    assert "\n" not in str(caught.value)


def test_llava_next_image_tokens_override_is_one_line_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    from peftaudit.cli import main

    args = ["report", "llava-hf/llava-v1.6-mistral-7b-hf", "--method", "lora", "--images", "1", "--image-tokens", "64"]
    assert main([*args, "--seq-len", "4096", "--no-cache"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("peftaudit: error: --image-tokens does not apply") and err.count("\n") == 1
