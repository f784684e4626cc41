"""Exports read back by their consumers: peft itself where installable, the documented keys otherwise.

peft's exports are loaded with ``LoraConfig`` and applied with ``get_peft_model``
on the meta model. axolotl, LLaMA-Factory and TRL are not installable here
(axolotl needs Python 3.12, the others pull in their training stacks), so their
keys are checked against the keys each project declares, copied below from
their sources, and the ``LoraConfig`` each builds is made the way its source
builds it (cited per function) and applied with ``get_peft_model``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import recommend_tiny as rt
import yaml
from peft import LoraConfig, get_peft_model

from peftaudit.inventory import take_inventory
from peftaudit.recommend.exports import Export, ExportError, export
from peftaudit.recommend.facts import model_facts
from peftaudit.recommend.recommendation import Recommendation, RecommendRequest, recommend
from peftaudit.recommend.targets import count_adapters


def _keys(text: str) -> frozenset[str]:
    return frozenset(text.split())


# axolotl 0.21.0: src/axolotl/utils/schemas/peft.py (LoraConfig), model.py (base_model,
# trust_remote_code), config.py (gradient_checkpointing).
AXOLOTL_KEYS = _keys(
    "load_in_8bit load_in_4bit nf4_backend adapter lora_model_dir nvfp4_merge_aware lora_r lora_alpha "
    "lora_fan_in_fan_out lora_target_modules lora_target_parameters lora_target_linear lora_modules_to_save "
    "lora_rank_pattern lora_alpha_pattern lora_dropout peft_layers_to_transform peft_layers_pattern peft "
    "peft_use_dora peft_use_rslora peft_layer_replication peft_init_lora_weights peft_trainable_token_indices "
    "peft_ensure_weight_tying lora_fp32_gradients peft_autocast_adapter_dtype qlora_sharded_model_loading "
    "lora_on_cpu gptq bnb_config_kwargs loraplus_lr_ratio loraplus_lr_embedding merge_lora merge_method "
    "base_model trust_remote_code gradient_checkpointing"
)
# LLaMA-Factory 0.9.5: hparams/finetuning_args.py (LoraArguments, FinetuningArguments.stage and
# finetuning_type), hparams/model_args.py (model_name_or_path, trust_remote_code, quantization_bit),
# and transformers' TrainingArguments.do_train.
LLAMA_FACTORY_KEYS = _keys(
    "additional_target lora_alpha lora_dropout lora_rank lora_target loraplus_lr_ratio loraplus_lr_embedding "
    "use_rslora use_dora pissa_init pissa_iter pissa_convert create_new_adapter stage finetuning_type "
    "model_name_or_path trust_remote_code quantization_bit do_train"
)
# TRL 1.16.0: trl/trainer/model_config.py (ModelConfig), plus TrainingArguments.gradient_checkpointing.
TRL_KEYS = _keys(
    "model_name_or_path model_revision dtype attn_implementation use_peft lora_r lora_alpha lora_dropout "
    "lora_target_modules lora_target_parameters lora_modules_to_save lora_task_type use_rslora use_dora "
    "load_in_8bit load_in_4bit bnb_4bit_quant_type use_bnb_nested_quant bnb_4bit_quant_storage "
    "gradient_checkpointing"
)

CASES = {
    "llama": RecommendRequest(),
    "gpt2": RecommendRequest(),
    "mixtral": RecommendRequest(),
    "bert_cls": RecommendRequest(task="classification"),
    "qwen2_moe": RecommendRequest(task="cpt"),
}


def _recommend(name: str, request: RecommendRequest | None = None) -> Recommendation:
    model = rt.build(name)
    return recommend(take_inventory(model), model_facts(model, model_id=f"tiny-{name}"), request or CASES[name])


def _trainable(name: str, config: LoraConfig) -> int:
    return int(get_peft_model(rt.build(name), config).get_nb_trainable_parameters()[0])


def _effective_trainable(name: str, written: Export) -> int:
    inventory = take_inventory(rt.build(name))
    e = written.effective
    count = count_adapters(
        inventory, e.targets, e.hyper.rank, rank_pattern=e.hyper.rank_patterns(), dropout=e.hyper.dropout
    )
    return count.trainable


@pytest.mark.parametrize("name", sorted(CASES))
def test_peft_python_runs_and_builds_the_recommended_adapter(name: str) -> None:
    rec = _recommend(name)
    written = export(rec.recipe, "peft")
    namespace: dict[str, Any] = {}
    exec(compile(written.text, "lora_config.py", "exec"), namespace)
    config = namespace["lora_config"]
    assert isinstance(config, LoraConfig)
    assert (config.r, config.lora_alpha) == (rec.recipe.hyper.rank, rec.recipe.hyper.alpha)
    assert _trainable(name, config) == rec.trainable
    assert written.effective == rec.recipe and not written.warnings


@pytest.mark.parametrize("name", sorted(CASES))
def test_adapter_config_json_loads_with_from_pretrained(name: str, tmp_path: Path) -> None:
    rec = _recommend(name)
    written = export(rec.recipe, "peft-json")
    (tmp_path / written.filename).write_text(written.text)
    config = LoraConfig.from_pretrained(str(tmp_path))
    data = json.loads(written.text)
    assert data["r"] == rec.recipe.hyper.rank and data["lora_alpha"] == rec.recipe.hyper.alpha
    assert config.base_model_name_or_path == f"tiny-{name}"
    assert _trainable(name, config) == rec.trainable


def test_qlora_python_export_builds_a_bitsandbytes_config() -> None:
    rec = _recommend("llama", RecommendRequest(method="qlora"))
    namespace: dict[str, Any] = {}
    exec(compile(export(rec.recipe, "peft").text, "lora_config.py", "exec"), namespace)
    bnb = namespace["bnb_config"]
    assert bnb.load_in_4bit and bnb.bnb_4bit_quant_type == "nf4"


# --- axolotl ------------------------------------------------------------------------------------------------


def _axolotl_lora_config(cfg: dict[str, Any]) -> LoraConfig:
    """axolotl 0.21 loaders/adapter.py: _build_peft_lora_config and _build_lora_config_kwargs."""
    kwargs: dict[str, Any] = {}
    if cfg.get("peft_use_rslora"):
        kwargs["use_rslora"] = cfg["peft_use_rslora"]
    if cfg.get("lora_rank_pattern"):
        kwargs["rank_pattern"] = cfg["lora_rank_pattern"]
    if cfg.get("lora_alpha_pattern"):
        kwargs["alpha_pattern"] = cfg["lora_alpha_pattern"]
    return LoraConfig(
        r=cfg["lora_r"],
        lora_alpha=cfg["lora_alpha"],
        target_modules=cfg.get("lora_target_modules") or [],
        target_parameters=cfg.get("lora_target_parameters") or [],
        lora_dropout=cfg["lora_dropout"],
        fan_in_fan_out=cfg.get("lora_fan_in_fan_out"),
        modules_to_save=cfg.get("lora_modules_to_save") or None,
        bias="none",
        **kwargs,
    )


@pytest.mark.parametrize("name", ["llama", "gpt2", "mixtral", "qwen2_moe"])
def test_axolotl_keys_are_documented_and_build_the_adapter(name: str) -> None:
    rec = _recommend(name)
    written = export(rec.recipe, "axolotl")
    cfg = yaml.safe_load(written.text)
    assert set(cfg) <= AXOLOTL_KEYS
    assert cfg["lora_r"] == rec.recipe.hyper.rank and cfg["lora_alpha"] == rec.recipe.hyper.alpha
    assert cfg["base_model"] == f"tiny-{name}" and cfg["adapter"] == "lora"
    assert _trainable(name, _axolotl_lora_config(cfg)) == rec.trainable
    if name == "gpt2":
        assert cfg["lora_fan_in_fan_out"] is True


def test_axolotl_takes_a_regex_string_for_bert_s_mlp() -> None:
    rec = _recommend("bert", RecommendRequest(preset="mlp"))
    cfg = yaml.safe_load(export(rec.recipe, "axolotl").text)
    assert isinstance(cfg["lora_target_modules"], str)
    assert _trainable("bert", _axolotl_lora_config(cfg)) == rec.trainable


# --- LLaMA-Factory ------------------------------------------------------------------------------------------------


def _llama_factory_lora_config(cfg: dict[str, Any]) -> LoraConfig:
    """LLaMA-Factory 0.9.5 model/adapter.py (_setup_lora_tuning) after hparams' split_arg on commas."""
    targets = [t.strip() for t in cfg["lora_target"].split(",")]
    assert targets != ["all"]
    extra = cfg.get("additional_target")
    return LoraConfig(
        r=cfg["lora_rank"],
        target_modules=targets,
        lora_alpha=cfg["lora_alpha"],
        lora_dropout=cfg["lora_dropout"],
        use_rslora=cfg.get("use_rslora", False),
        modules_to_save=[t.strip() for t in extra.split(",")] if extra else None,
    )


@pytest.mark.parametrize("name", ["llama", "gpt2", "qwen2_moe", "mixtral"])
def test_llama_factory_keys_are_documented_and_build_the_effective_adapter(name: str) -> None:
    rec = _recommend(name)
    written = export(rec.recipe, "llama-factory")
    cfg = yaml.safe_load(written.text)
    assert set(cfg) <= LLAMA_FACTORY_KEYS
    assert cfg["lora_rank"] == rec.recipe.hyper.rank and cfg["lora_alpha"] == rec.recipe.hyper.alpha
    assert cfg["stage"] == ("pt" if name == "qwen2_moe" else "sft")
    assert _trainable(name, _llama_factory_lora_config(cfg)) == _effective_trainable(name, written)
    if rec.recipe.targets.parameters:
        # No target_parameters in LLaMA-Factory: the experts drop out, and the export says so.
        assert not written.effective.targets.parameters
        assert any("target_parameters" in w for w in written.warnings)
        assert _effective_trainable(name, written) < rec.trainable
    else:
        assert _effective_trainable(name, written) == rec.trainable


def test_llama_factory_refuses_what_it_cannot_train() -> None:
    with pytest.raises(ExportError, match="classification"):
        export(_recommend("bert_cls").recipe, "llama-factory")
    with pytest.raises(ExportError, match="target_parameters"):
        export(_recommend("mixtral", RecommendRequest(preset="mlp")).recipe, "llama-factory")


# --- TRL -----------------------------------------------------------------------------------------------------------


def _trl_lora_config(cfg: dict[str, Any]) -> LoraConfig:
    """TRL 1.16: ModelConfig.__post_init__ (a one-element list becomes a string) and trainer/utils.get_peft_config."""
    modules = cfg.get("lora_target_modules")
    if modules is not None and len(modules) == 1:
        modules = modules[0]
    extra = {"target_parameters": cfg["lora_target_parameters"]} if cfg.get("lora_target_parameters") else {}
    return LoraConfig(
        task_type=cfg.get("lora_task_type", "CAUSAL_LM"),
        r=cfg.get("lora_r", 16),
        target_modules=modules,
        lora_alpha=cfg.get("lora_alpha", 32),
        lora_dropout=cfg.get("lora_dropout", 0.05),
        bias="none",
        use_rslora=cfg.get("use_rslora", False),
        use_dora=cfg.get("use_dora", False),
        modules_to_save=cfg.get("lora_modules_to_save"),
        **extra,
    )


@pytest.mark.parametrize("name", sorted(CASES))
def test_trl_keys_are_documented_and_build_the_effective_adapter(name: str) -> None:
    rec = _recommend(name)
    written = export(rec.recipe, "trl")
    cfg = yaml.safe_load(written.text)
    assert set(cfg) <= TRL_KEYS
    assert cfg["use_peft"] is True
    assert cfg["lora_r"] == rec.recipe.hyper.rank and cfg["lora_alpha"] == rec.recipe.hyper.alpha
    assert _trainable(name, _trl_lora_config(cfg)) == _effective_trainable(name, written)
    if rec.recipe.hyper.rank_pattern:
        assert any("rank_pattern" in w for w in written.warnings)
        assert _effective_trainable(name, written) > rec.trainable


def test_trl_single_target_is_written_as_a_regex_that_still_matches() -> None:
    # TRL turns ["c_attn"] into "c_attn", which peft reads as a regex matching no full path.
    rec = _recommend("gpt2", RecommendRequest(preset="qv"))
    cfg = yaml.safe_load(export(rec.recipe, "trl").text)
    assert cfg["lora_target_modules"] != ["c_attn"] and len(cfg["lora_target_modules"]) == 1
    assert _trainable("gpt2", _trl_lora_config(cfg)) == rec.trainable


def test_budget_driven_gradient_checkpointing_is_exported() -> None:
    from peftaudit.recommend.recommendation import RecommendRequest as Req

    rec = _recommend("llama", Req(budget_bytes=1))  # nothing fits one byte: the cheapest plan is kept
    assert rec.budget is not None and not rec.budget.fits
    assert rec.recipe.gradient_checkpointing
    assert yaml.safe_load(export(rec.recipe, "axolotl").text)["gradient_checkpointing"] is True
    assert yaml.safe_load(export(rec.recipe, "trl").text)["gradient_checkpointing"] is True


def test_unknown_format_lists_the_known_ones() -> None:
    from peftaudit.errors import PeftauditError

    with pytest.raises(PeftauditError, match="axolotl, llama-factory, peft, peft-json, trl"):
        export(_recommend("llama").recipe, "ms-swift")
