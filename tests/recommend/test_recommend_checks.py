"""Readiness checks: each finding id fires where it should, with modules and a fix, and nowhere else."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
import recommend_tiny as rt

import peftaudit
from peftaudit.inventory import take_inventory
from peftaudit.plugins import checks as registered_checks
from peftaudit.plugins import register_plugin, unregister_plugin
from peftaudit.recommend.checks import CheckContext, check, run_checks
from peftaudit.recommend.facts import ModelFacts, model_facts, needs_remote_code
from peftaudit.recommend.findings import Finding, reaches, sort_findings
from peftaudit.recommend.targets import TargetSpec, resolve_preset


def context(name: str, targets: TargetSpec | None = None, **kwargs: Any) -> CheckContext:
    model = rt.build(name)
    return CheckContext(
        inventory=take_inventory(model), facts=model_facts(model, model_id=f"tiny-{name}"), targets=targets, **kwargs
    )


def catalog_context(spec: str, **kwargs: Any) -> CheckContext:
    from peftaudit.sources.base import SourceOptions, resolve

    resolved, source = resolve(spec)
    model = source.build(resolved, SourceOptions())
    return CheckContext(inventory=take_inventory(model), facts=model_facts(model, model_id=resolved.id), **kwargs)


def ids(findings: tuple[Finding, ...]) -> dict[str, Finding]:
    return {f.id: f for f in findings}


def test_every_builtin_check_is_registered() -> None:
    names = {c.name for c in registered_checks()}
    assert {"targets.match", "lora.fan-in-fan-out", "moe", "tokens", "model", "vocab", "lora.dropout"} <= names


# --- GPT-2: Conv1D and an ambiguous name ------------------------------------------------------


def test_gpt2_model_mode_conv1d_and_c_proj() -> None:
    found = ids(run_checks(context("gpt2")))
    conv = found["lora.fan-in-fan-out"]
    assert conv.severity == "info" and "fan_in_fan_out=True" in conv.fix
    assert conv.modules == (
        "transformer.h.*.attn.c_attn",
        "transformer.h.*.attn.c_proj",
        "transformer.h.*.mlp.c_fc",
        "transformer.h.*.mlp.c_proj",
    )
    ambiguous = found["targets.ambiguous-name"]
    assert "'c_proj'" in ambiguous.title and "attention output" in ambiguous.title and "MLP down" in ambiguous.title
    assert "'attn.c_proj'" in ambiguous.fix and "'mlp.c_proj'" in ambiguous.fix


def test_gpt2_plan_mode_wants_fan_in_fan_out_only_when_missing() -> None:
    missing = ids(run_checks(context("gpt2", TargetSpec(names=("c_attn",)))))
    assert missing["lora.fan-in-fan-out"].severity == "warning"
    good = resolve_preset(context("gpt2").inventory, "all-linear").spec
    assert "lora.fan-in-fan-out" not in ids(run_checks(context("gpt2", good)))


def test_fan_in_fan_out_on_linear_layers_is_flagged() -> None:
    found = ids(run_checks(context("llama", TargetSpec(names=("q_proj",), fan_in_fan_out=True))))
    assert "stored as (out, in)" in found["lora.fan-in-fan-out"].title


def test_ambiguous_name_in_a_plan_is_a_warning() -> None:
    found = ids(run_checks(context("gpt2", TargetSpec(names=("c_proj",), fan_in_fan_out=True))))
    assert found["targets.ambiguous-name"].severity == "warning"
    bert = ids(run_checks(context("bert", TargetSpec(names=("dense",)))))
    assert "4 kinds of layer" in bert["targets.ambiguous-name"].title


# --- targets that match nothing or the wrong thing ----------------------------------------------------


def test_names_matching_nothing() -> None:
    some = ids(run_checks(context("llama", TargetSpec(names=("q_proj", "query")))))
    assert some["targets.no-match"].severity == "warning" and "query" in some["targets.no-match"].title
    none = ids(run_checks(context("llama", TargetSpec(names=("query",)))))
    assert none["targets.no-match"].severity == "error"
    regex = ids(run_checks(context("llama", TargetSpec(pattern="q_proj"))))
    assert regex["targets.no-match"].severity == "error" and "re.fullmatch" in regex["targets.no-match"].fix
    params = ids(run_checks(context("mixtral", TargetSpec(names=("q_proj",), parameters=("experts.nope",)))))
    assert "experts.nope" in params["targets.no-match"].title


def test_a_container_module_is_not_adaptable() -> None:
    found = ids(run_checks(context("llama", TargetSpec(names=("mlp",)))))
    unsupported = found["targets.unsupported-layer"]
    assert unsupported.severity == "error" and "LlamaMLP" in unsupported.title
    assert unsupported.modules == ("model.layers.*.mlp",)


def test_a_good_preset_has_no_target_findings() -> None:
    spec = resolve_preset(context("llama").inventory, "all-linear").spec
    found = run_checks(context("llama", spec))
    assert not [f for f in found if f.id.startswith("targets.")]


# --- mixture of experts -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["qwen2_moe", "gpt_oss"])
def test_all_linear_leaves_experts_untrained_where_peft_does_not_convert(name: str) -> None:
    found = ids(run_checks(context(name)))
    untrained = found["moe.experts-untrained"]
    assert untrained.severity == "warning"
    assert "target_parameters=" in untrained.fix and "lora_dropout=0" in untrained.fix
    assert untrained.modules == ("model.layers.*.mlp.experts.gate_up_proj", "model.layers.*.mlp.experts.down_proj")
    assert "moe.experts-by-conversion" not in found


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_peft_converts_all_linear_for_mixtral_and_qwen3_moe(name: str) -> None:
    found = ids(run_checks(context(name)))
    assert "moe.experts-untrained" not in found
    assert found["moe.experts-by-conversion"].severity == "info"


def test_experts_preset_covers_experts_and_reports_frozen_routers() -> None:
    spec = resolve_preset(context("qwen2_moe").inventory, "all-linear+experts").spec
    found = ids(run_checks(context("qwen2_moe", spec)))
    assert "moe.experts-untrained" not in found
    assert found["moe.router-untrained"].modules == ("model.layers.*.mlp.gate",)


def test_deepseek_dense_mlp_is_retargeted_by_peft() -> None:
    found = ids(run_checks(context("deepseek_v3")))
    retarget = found["moe.peft-retargets"]
    assert retarget.severity == "warning"
    assert "gate_proj" in retarget.title and "model.layers.*.mlp.shared_experts.gate_proj" in retarget.modules
    # Llama has the same names, but peft rewrites nothing there.
    assert "moe.peft-retargets" not in ids(run_checks(context("llama")))


def test_dropout_with_target_parameters_is_an_error() -> None:
    spec = resolve_preset(context("mixtral").inventory, "all-linear+experts").spec
    found = ids(run_checks(context("mixtral", spec, dropout=0.1)))
    assert found["lora.dropout-experts"].severity == "error"
    assert "lora.dropout-experts" not in ids(run_checks(context("mixtral", spec, dropout=0.0)))


# --- embeddings and tokens ------------------------------------------------------------------------------------


def test_tied_embedding_saved_on_one_side() -> None:
    one = ids(run_checks(context("llama_tied", TargetSpec(names=("q_proj",), modules_to_save=("embed_tokens",)))))
    tied = one["tied.one-side-saved"]
    assert tied.modules == ("model.embed_tokens", "lm_head") and "ensure_weight_tying=True" in tied.fix
    both = TargetSpec(names=("q_proj",), modules_to_save=("embed_tokens", "lm_head"))
    assert "tied.one-side-saved" not in ids(run_checks(context("llama_tied", both)))
    # Untied model: saving one side is fine.
    assert "tied.one-side-saved" not in ids(
        run_checks(context("llama", TargetSpec(names=("q_proj",), modules_to_save=("embed_tokens",))))
    )


def test_added_tokens_need_trained_embeddings() -> None:
    found = ids(run_checks(context("llama", TargetSpec(names=("q_proj",)), added_tokens=3)))
    assert found["tokens.added"].modules == ("model.embed_tokens", "lm_head")
    saved = TargetSpec(names=("q_proj",), modules_to_save=("embed_tokens", "lm_head"))
    assert "tokens.added" not in ids(run_checks(context("llama", saved, added_tokens=3)))


def test_token_ids_outside_the_vocabulary() -> None:
    ctx = context("llama")
    facts = replace(ctx.facts, config={**ctx.facts.config, "eos_token_id": 500, "pad_token_id": 0})
    found = ids(run_checks(replace(ctx, facts=facts)))
    assert found["tokens.out-of-vocab"].severity == "error" and "eos_token_id=500" in found["tokens.out-of-vocab"].title


def test_missing_pad_token() -> None:
    assert ids(run_checks(context("gpt2")))["tokens.no-pad"].severity == "warning"
    assert ids(run_checks(context("gpt2", task="classification")))["tokens.no-pad"].severity == "error"
    assert "tokens.no-pad" not in ids(run_checks(context("bert")))  # BERT's config has pad_token_id 0


# --- the model class --------------------------------------------------------------------------------------------


def test_class_capabilities() -> None:
    ctx = context("llama")
    assert (ctx.facts.supports_gradient_checkpointing, ctx.facts.supports_sdpa) == (True, True)
    assert not [f for f in run_checks(ctx) if f.id.startswith("model.")]
    no_gc = replace(ctx, facts=replace(ctx.facts, supports_gradient_checkpointing=False))
    assert ids(run_checks(no_gc))["model.no-gradient-checkpointing"].severity == "warning"
    eager = replace(ctx, facts=replace(ctx.facts, supports_sdpa=False, supports_flash_attention=False))
    assert ids(run_checks(eager))["model.eager-attention"].severity == "warning"
    # gpt-oss: no SDPA but flash attention through kernels.
    assert ids(run_checks(context("gpt_oss")))["model.no-sdpa"].severity == "info"


def test_remote_code() -> None:
    assert needs_remote_code({"model_type": "my_model", "auto_map": {"AutoModel": "m.M"}})
    assert not needs_remote_code({"model_type": "llama", "auto_map": {"AutoModel": "m.M"}})
    assert not needs_remote_code({"model_type": "my_model"})
    ctx = context("llama")
    found = ids(run_checks(replace(ctx, facts=replace(ctx.facts, remote_code=True))))
    assert "revision" in found["model.remote-code"].fix


def test_layers_lora_cannot_wrap() -> None:
    found = [f for f in run_checks(catalog_context("google/gemma-3-4b-pt")) if f.id == "lora.unadaptable-layer"]
    assert [f.title.split()[0] for f in found] == ["Gemma3MultiModalProjector"]
    assert found[0].modules == ("model.multi_modal_projector.mm_input_projection_weight",)


# --- vocabulary ---------------------------------------------------------------------------------------------------


def test_vocabulary_findings() -> None:
    gpt2 = ids(run_checks(catalog_context("gpt2")))
    assert "50,304" in gpt2["vocab.unaligned"].fix
    assert gpt2["vocab.large-share"].severity == "info"
    assert "vocab.logits-memory" not in gpt2
    gemma = ids(run_checks(catalog_context("google/gemma-2-2b")))
    assert gemma["vocab.logits-memory"].severity == "warning" and "256,000" in gemma["vocab.logits-memory"].title
    assert "vocab.unaligned" not in gemma


# --- the runner and plugins -------------------------------------------------------------------------------------


def test_skip_drops_by_id_and_prefix() -> None:
    ctx = context("gpt2")
    assert "vocab.unaligned" not in ids(run_checks(ctx, skip=("vocab.unaligned",)))
    remaining = run_checks(ctx, skip=("vocab", "tokens"))
    assert remaining and not [f for f in remaining if f.id.startswith(("vocab.", "tokens."))]


def test_findings_are_sorted_most_severe_first() -> None:
    found = run_checks(context("gpt2", task="classification"))
    ranks = [("info", "warning", "error").index(f.severity) for f in found]
    assert ranks == sorted(ranks, reverse=True)
    assert sort_findings(reversed(found)) == found


def test_a_plugin_check_runs_and_a_broken_one_is_contained() -> None:
    @check("team.naming", "a team rule")
    def naming(ctx: CheckContext) -> Iterator[Finding]:
        yield Finding("team.naming", "error", "team rule", fix="rename")

    @check("team.broken", "a buggy rule")
    def broken(ctx: CheckContext) -> Iterator[Finding]:
        raise RuntimeError("boom")
        yield  # pragma: no cover

    class Plugin:
        @peftaudit.hookimpl
        def peftaudit_register_checks(self, register: Any) -> None:
            register(naming)
            register(broken)

    plugin = Plugin()
    register_plugin(plugin, name="team-checks")
    try:
        found = ids(run_checks(context("llama")))
    finally:
        unregister_plugin(plugin)
    assert found["team.naming"].severity == "error"
    assert "team.broken" in found["check.failed"].title and "boom" in found["check.failed"].title
    assert "team.naming" not in ids(run_checks(context("llama")))


def test_finding_severity_is_validated_and_levels_gate() -> None:
    with pytest.raises(ValueError, match="severity"):
        Finding("x", "fatal", "t", fix="f")
    findings = [Finding("a", "info", "t", fix="f"), Finding("b", "warning", "t", fix="f")]
    assert [f.id for f in reaches(findings, "warning")] == ["b"]
    assert [f.id for f in reaches(findings, "info")] == ["a", "b"]
    assert reaches(findings, "error") == [] and reaches(findings, "never") == []
    assert Finding.from_dict(findings[1].to_dict()) == findings[1]


def test_facts_read_from_the_config() -> None:
    facts = ModelFacts("m", config={"text_config": {"eos_token_id": [1, 2]}, "pad_token_id": 0})
    assert facts.token_id("eos_token_id") == [1, 2]
    assert facts.token_id("pad_token_id") == 0
    assert facts.token_id("bos_token_id") is None


def test_models_without_tokens_have_no_pad_token_to_miss() -> None:
    from transformers import ViTConfig, ViTModel

    from peftaudit.sources.build import build_from_config

    config = ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128).to_dict()
    config["architectures"] = [ViTModel.__name__]
    model = build_from_config(config, model_id="tiny-vit")
    ctx = CheckContext(inventory=take_inventory(model), facts=model_facts(model, model_id="tiny-vit"))
    assert "tokens.no-pad" not in {f.id for f in run_checks(ctx)}
    # A text model without a pad token still gets the finding.
    llama = rt.build("llama")
    text_ctx = CheckContext(inventory=take_inventory(llama), facts=model_facts(llama, model_id="tiny-llama"))
    assert ("tokens.no-pad" in {f.id for f in run_checks(text_ctx)}) is (llama.config.pad_token_id is None)
