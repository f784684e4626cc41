"""Every bundled catalog model against its published parameter count.

Exact published counts are asserted exactly; figures a source prints rounded
("7.61B") are asserted to the printed digits. The published figures live in the
catalog files with their sources (see peftaudit/catalog/SOURCES.md), never
computed by peftaudit.
"""

from __future__ import annotations

import pytest

from peftaudit.inventory import take_inventory
from peftaudit.report import matches_published
from peftaudit.sources.build import build_from_config
from peftaudit.sources.catalog import entries, lookup

ENTRIES = {e.id: e for e in entries()}
# Sizes that take more than a second or two to build on the meta device.
HUGE = {i for i, e in ENTRIES.items() if str(e.published_params.get("total", "")).endswith(("405B", "671B", "235B"))}


def inventory_of(model_id: str, architecture: str | None = None):  # type: ignore[no-untyped-def]
    config = dict(ENTRIES[model_id].config)
    if architecture:
        config["architectures"] = [architecture]
    return take_inventory(build_from_config(config, model_id=model_id))


def test_catalog_has_the_families_people_fine_tune() -> None:
    assert len(ENTRIES) >= 30
    needed = [
        "meta-llama/Llama-2-7b-hf",
        "meta-llama/Meta-Llama-3-8B",
        "meta-llama/Llama-3.1-8B",
        "meta-llama/Llama-3.1-405B",
        "meta-llama/Llama-3.2-1B",
        "meta-llama/Llama-3.3-70B-Instruct",
        "mistralai/Mistral-7B-v0.1",
        "mistralai/Mixtral-8x7B-v0.1",
        "mistralai/Mixtral-8x22B-v0.1",
        "Qwen/Qwen2.5-7B",
        "Qwen/Qwen3-8B",
        "Qwen/Qwen3-30B-A3B",
        "google/gemma-2-9b",
        "google/gemma-3-1b-pt",
        "microsoft/Phi-3-mini-4k-instruct",
        "microsoft/Phi-3.5-mini-instruct",
        "microsoft/phi-4",
        "deepseek-ai/DeepSeek-V3",
        "openai/gpt-oss-20b",
        "HuggingFaceTB/SmolLM2-135M",
        "openai-community/gpt2",
        "google-bert/bert-base-uncased",
        "FacebookAI/roberta-base",
        "google-t5/t5-base",
        "tiiuae/falcon-7b",
        "facebook/opt-125m",
    ]
    missing = [m for m in needed if m not in ENTRIES and lookup(m) is None]
    assert missing == []


def test_every_entry_names_its_sources() -> None:
    for entry in ENTRIES.values():
        assert entry.config_source, entry.id
        assert entry.published_params.get("source"), entry.id
        assert isinstance(entry.published_params.get("total"), int | str), entry.id
        assert entry.config.get("model_type"), entry.id


@pytest.mark.parametrize(
    ("model_id", "published"),
    [
        # The counts our issue tracker quotes as published, asserted exactly.
        ("meta-llama/Llama-2-7b-hf", 6_738_415_616),
        ("meta-llama/Meta-Llama-3-8B", 8_030_261_248),
        ("meta-llama/Llama-3.1-8B", 8_030_261_248),
        ("meta-llama/Llama-3.2-1B", 1_235_814_400),
        ("mistralai/Mixtral-8x7B-v0.1", 46_702_792_704),
        ("openai-community/gpt2", 124_439_808),
    ],
)
def test_exact_published_counts(model_id: str, published: int) -> None:
    assert inventory_of(model_id).total == published


def test_bert_base_encoder_exact_count() -> None:
    # 109,482,240 is BERT-base's encoder with its pooler (BertModel), the figure papers quote;
    # the hub config names BertForMaskedLM, which drops the pooler and adds the MLM head.
    assert inventory_of("google-bert/bert-base-uncased", "BertModel").total == 109_482_240


def _params(model_id: str) -> object:
    marks = [pytest.mark.slow] if model_id in HUGE else []
    return pytest.param(model_id, marks=marks, id=model_id)


@pytest.mark.parametrize("model_id", [_params(i) for i in sorted(ENTRIES)])
def test_entry_matches_its_published_total(model_id: str) -> None:
    entry = ENTRIES[model_id]
    inventory = inventory_of(model_id)
    published = entry.published_params["total"]
    assert matches_published(inventory.total, published), (
        f"{model_id}: built {inventory.total:,}, published {published} ({entry.published_params['source']})"
    )
    # The inventory agrees with torch's own de-duplicated count of the same skeleton.
    assert inventory.weights + inventory.biases == inventory.total


# gpt-oss's card counts active parameters without the input embedding: a different definition.
ACTIVE_DEFINITION_DIFFERS = {"openai/gpt-oss-20b", "openai/gpt-oss-120b"}


@pytest.mark.parametrize(
    "model_id",
    [_params(i) for i in sorted(ENTRIES) if "active" in ENTRIES[i].published_params],
)
def test_moe_active_parameters(model_id: str) -> None:
    entry = ENTRIES[model_id]
    inventory = inventory_of(model_id)
    assert inventory.moe is not None
    active = inventory.moe.active_params
    if model_id in ACTIVE_DEFINITION_DIFFERS:
        embedding = inventory.by_kind()["embedding"]
        active -= embedding
    assert matches_published(active, entry.published_params["active"]), (
        f"{model_id}: active {active:,}, published {entry.published_params['active']}"
    )
