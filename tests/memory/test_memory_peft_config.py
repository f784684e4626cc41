"""``--peft-config``: peft adapter configs turned into plans, checked against peft's own numbers.

The MetaMathQA experiments of peft's method comparison (tests/memory/data/metamathqa, Apache-2.0,
huggingface/peft @ 5d602fdb) record each adapter's trainable parameter count on Llama-3.2-3B:
for every experiment whose method peftaudit models, the plan ``plan_fields`` makes of its
``adapter_config.json`` must train exactly that many parameters.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
from memory_models import CONFIGS, build

from peftaudit.memory import TrainingPlan
from peftaudit.memory.peft_config import PEFT_DEFAULTS, SUPPORTED_PEFT_TYPES, plan_fields
from peftaudit.memory.plan import PlanError
from peftaudit.plugins import memory_methods

ROOT = Path(__file__).resolve().parents[2]
MMQA = Path(__file__).parent / "data" / "metamathqa"
RECORDED: dict[str, Any] = json.loads((MMQA / "counts.json").read_text())
EXPERIMENTS = sorted(RECORDED["experiments"])
#: Experiments whose recorded count the plan does not reproduce, each with the reason.
EXCEPTIONS: dict[str, Any] = {
    "lora--llama-3.2-3B-rank32-lorafa": pytest.mark.skip(
        reason="LoRA-FA is an optimizer (training_params.json) that freezes lora_A; the adapter config "
        "is plain LoRA, so --peft-config cannot know"
    ),
    "lora--llama-3.2-3B-rank32-kasa": pytest.mark.skip(reason="no result file at this commit (and KaSA is refused)"),
    "lora--llama-3.2-3B-rank32-riemannian": pytest.mark.skip(
        reason="no result file at this commit (Riemannian LoRA is an optimizer)"
    ),
}

#: The run's peft release where it matters: MetaMathQA's AdaLoRA run used peft 0.19.2.dev0, which kept
#: AdaLoRA's ``ranknum`` frozen; 0.21 trains it (stack rule ``adalora-ranknum-frozen``).
STACKS = {"adalora--llama-3.2-3B-rank32": (("peft", "0.19"),)}


@pytest.fixture(scope="module")
def llama_3b() -> Any:
    from peftaudit.inventory import take_inventory
    from peftaudit.sources.build import build_from_config

    entry = json.loads((ROOT / "peftaudit/catalog/models/meta-llama__Llama-3.2-3B.json").read_text())
    assert entry["id"] == RECORDED["base_model"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return take_inventory(build_from_config(entry["config"], model_id=entry["id"]))


def _trainable(inventory: Any, plan: TrainingPlan) -> int:
    plan.validate()
    adaptation = memory_methods()[plan.method].adapt(inventory, plan)
    return adaptation.adapter_params + sum(p.numel for p in inventory.parameters if p.name in adaptation.trainable)


@pytest.mark.slow
@pytest.mark.parametrize("name", [pytest.param(n, marks=EXCEPTIONS.get(n, ())) for n in EXPERIMENTS])
def test_metamathqa_counts_equal_the_recorded_ones(llama_3b: Any, name: str) -> None:
    plan = TrainingPlan(**plan_fields(MMQA / name), stack=STACKS.get(name, ()))
    assert _trainable(llama_3b, plan) == RECORDED["experiments"][name]["num_trainable_params"]


@pytest.mark.slow
def test_adalora_counts_ranknum_at_the_installed_peft(llama_3b: Any) -> None:
    # peft 0.21 trains one ranknum per adapted module: 28 layers x (q_proj, v_proj) more than the record.
    plan = TrainingPlan(**plan_fields(MMQA / "adalora--llama-3.2-3B-rank32"))
    recorded = RECORDED["experiments"]["adalora--llama-3.2-3B-rank32"]["num_trainable_params"]
    assert _trainable(llama_3b, plan) == recorded + 28 * 2


def _peft_defaults(peft_type: str) -> dict[str, Any]:
    from peft import PeftConfig, PeftType
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    base = {f.name for f in dataclasses.fields(PeftConfig)}
    found: dict[str, Any] = {}
    for f in dataclasses.fields(PEFT_TYPE_TO_CONFIG_MAPPING[PeftType(peft_type)]):
        if f.name in base or not f.init:
            continue
        value = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        if isinstance(value, enum.Enum):
            value = value.value
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        found[f.name] = value
    return found


@pytest.mark.parametrize("peft_type", SUPPORTED_PEFT_TYPES)
def test_default_tables_equal_the_installed_peft(peft_type: str) -> None:
    # A peft upgrade that adds, drops or changes a field default shows up here.
    assert PEFT_DEFAULTS[peft_type] == _peft_defaults(peft_type)


def test_a_peft_config_object_a_dict_and_a_file_give_the_same_plan(tmp_path: Path) -> None:
    from peft import LoraConfig

    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[1], use_dora=True)
    path = tmp_path / "adapter_config.json"
    config.save_pretrained(str(tmp_path))
    as_dict = json.loads(path.read_text())
    assert plan_fields(config) == plan_fields(as_dict) == plan_fields(tmp_path) == plan_fields(path)
    assert plan_fields(config)["method"] == "dora"
    assert plan_fields(config)["layers_to_transform"] == (1,)


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"peft_type": "LORA"}, {"method": "lora", "rank": 8, "alpha": 8.0, "targets": "default"}),
        ({"peft_type": "LORA", "init_lora_weights": "pissa_niter_16"}, {"lora_init": "pissa"}),
        ({"peft_type": "LORA", "init_lora_weights": False}, {"lora_init": "default"}),
        ({"peft_type": "LORA", "layers_to_transform": 3, "layers_pattern": "layers"}, {"layers_to_transform": (3,)}),
        ({"peft_type": "LORA", "target_modules": "all-linear", "bias": "lora_only"}, {"lora_bias": "lora_only"}),
        ({"peft_type": "LORA", "trainable_token_indices": {"embed_tokens": [1, 2, 3]}}, {"trainable_tokens": 3}),
        ({"peft_type": "LORA", "target_modules": None, "target_parameters": ["x.w"]}, {"targets": ()}),
        ({"peft_type": "LORA", "a_key_from_a_newer_peft": 1, "runtime_config": {}}, {"method": "lora"}),
        ({"peft_type": "OFT", "rank_pattern": {"q": 2}}, {"oft_blocks": 0, "oft_block_size": 32}),
        ({"peft_type": "ADALORA", "r": 2, "init_r": 6}, {"method": "adalora", "rank": 6}),
        ({"peft_type": "P_TUNING", "num_virtual_tokens": 5, "encoder_reparameterization_type": "LSTM"}, {}),
        ({"peft_type": "TRAINABLE_TOKENS", "token_indices": [5, 6]}, {"trainable_tokens": 2}),
    ],
)
def test_fields_peft_honours_become_plan_fields(config: dict[str, Any], expected: dict[str, Any]) -> None:
    fields = plan_fields(config)
    assert {k: fields.get(k) for k in expected} == expected
    TrainingPlan(**fields).validate()


def test_bad_configs_are_one_line_errors_naming_file_and_key(tmp_path: Path) -> None:
    def error(source: Any) -> str:
        with pytest.raises(PlanError) as info:
            plan_fields(source)
        assert "\n" not in str(info.value)
        return str(info.value)

    bad = tmp_path / "bad.json"
    assert "cannot read the peft config" in error(tmp_path / "missing.json")
    assert f"{tmp_path} has no adapter_config.json" in error(tmp_path)
    bad.write_text("{not json")
    assert f"{bad} is not JSON" in error(bad)
    bad.write_text("[1, 2]")
    assert "holds a JSON list, not an object" in error(bad)
    bad.write_text('{"r": 8}')
    assert "has no peft_type" in error(bad)
    bad.write_text('{"peft_type": "FOURIERFT"}')
    assert error(bad) == f"{bad}: peft type FOURIERFT is not modelled; supported: {', '.join(SUPPORTED_PEFT_TYPES)}"
    bad.write_text('{"peft_type": "LORA", "layer_replication": [[0, 2]]}')
    assert f"{bad}: layer_replication = [[0, 2]] changes the LORA adapter" in error(bad)
    assert "lora_bias = true changes the LORA adapter" in error({"peft_type": "LORA", "lora_bias": True})
    assert 'init_lora_weights = "magic" is not an' in error({"peft_type": "LORA", "init_lora_weights": "magic"})
    assert "r must be an integer" in error({"peft_type": "LORA", "r": "8"})
    assert "exclude_modules as a regular expression" in error({"peft_type": "LORA", "exclude_modules": ".*q"})
    assert "names 2 layers" in error({"peft_type": "LORA", "trainable_token_indices": {"a": [1], "b": [1]}})
    assert 'bias = "all" is not modelled for VERA' in error({"peft_type": "VERA", "bias": "all"})
    assert "num_virtual_tokens is missing" in error({"peft_type": "PREFIX_TUNING"})
    assert "token_indices is empty" in error({"peft_type": "TRAINABLE_TOKENS"})
    assert "kasa_config = {" in error(MMQA / "lora--llama-3.2-3B-rank32-kasa")


def test_reading_a_file_imports_neither_torch_nor_peft() -> None:
    code = (
        "import sys\nfrom peftaudit.memory import TrainingPlan\nfrom peftaudit.memory.peft_config import plan_fields\n"
        f"TrainingPlan(**plan_fields({str(MMQA / 'lora--llama-3.2-3B-rank14-target-mlp-bdlora')!r})).validate()\n"
        "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "[]", result.stderr


def test_live_peft_models_are_sized_as_their_adapter() -> None:
    from peft import LoHaConfig, LoraConfig, get_peft_model

    from peftaudit.gpus.live import fit_live_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loha = get_peft_model(build(CONFIGS["llama"]), LoHaConfig(r=4, target_modules=["q_proj"]))
        lora = get_peft_model(build(CONFIGS["llama"]), LoraConfig(r=4, target_modules=["q_proj"]))
    # The marker's default method (lora) leaves the adapter's own.
    fit = fit_live_model(loha, gpu="H100", method="lora", seq_len=64)
    assert (fit.plan["method"], fit.plan["rank"], fit.plan["targets"]) == ("loha", 4, ["q_proj"])
    assert fit_live_model(lora, gpu="H100", method="qlora", seq_len=64).plan["method"] == "qlora"
    full = fit_live_model(lora, gpu="H100", method="full", seq_len=64).plan
    assert (full["method"], full["rank"]) == ("full", 16)
