"""The example plugin: its rules name an unfamiliar model's modules; its GPU reaches `peftaudit gpus`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from peftaudit_example import MODEL_TYPE, rules
from torch import nn

from peftaudit.architecture import ArchitectureRules, ModuleRole
from peftaudit.inventory import take_inventory


class _Config:
    """Just enough of a config for the inventory to read the model type."""

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": MODEL_TYPE}


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.Module()
        for name in ("wq", "wk", "wv", "wo"):
            self.attention.add_module(name, nn.Linear(8, 8, bias=False))
        self.feed_forward = nn.Module()
        for name, shape in (("w1", (8, 16)), ("w3", (8, 16)), ("w2", (16, 8))):
            self.feed_forward.add_module(name, nn.Linear(*shape, bias=False))


class _AcmeLLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.config = _Config()
        self.layers = nn.ModuleList([_Block(), _Block()])
        self.output = nn.Linear(8, 32, bias=False)


def test_rules_name_every_projection() -> None:
    inventory = take_inventory(_AcmeLLM(), rules=ArchitectureRules.from_rules(rules()))
    roles = {m.path: m.role for m in inventory.modules}
    assert inventory.model_type == "acme-llm"
    assert roles["layers.1.attention.wq"] == ModuleRole.ATTENTION_Q
    assert roles["layers.1.attention.wo"] == ModuleRole.ATTENTION_O
    assert roles["layers.0.feed_forward.w1"] == ModuleRole.MLP_GATE
    assert roles["layers.0.feed_forward.w3"] == ModuleRole.MLP_UP
    assert roles["layers.0.feed_forward.w2"] == ModuleRole.MLP_DOWN
    assert roles["output"] == ModuleRole.OUTPUT_HEAD


def _gpus(env_extra: dict[str, str]) -> list[dict[str, Any]]:
    env = {**os.environ, **env_extra}
    env.pop("PEFTAUDIT_DISABLE_PLUGIN_AUTOLOAD", None)  # load the plugin from its entry point, as users do
    result = subprocess.run(
        [sys.executable, "-m", "peftaudit", "gpus", "--json"], capture_output=True, text=True, env=env, timeout=60
    )
    assert result.returncode == 0, result.stderr
    rows: list[dict[str, Any]] = json.loads(result.stdout)
    return rows


def test_plugin_gpu_is_listed_and_the_user_file_still_wins(tmp_path: Path) -> None:
    missing = tmp_path / "no-gpus.toml"
    [a6000] = [g for g in _gpus({"PEFTAUDIT_GPUS_FILE": str(missing)}) if g["name"] == "RTX A6000"]
    assert a6000["origin"] == "peftaudit-example"
    assert (a6000["memory_gb"], a6000["bandwidth_gbs"], a6000["tflops"]["bf16"]) == (48.0, 768.0, 154.8)

    user = tmp_path / "gpus.toml"
    user.write_text('[gpu."a6000"]\nusable_gib = 47.0\nprice_per_hour = 0.79\n')
    [mine] = [g for g in _gpus({"PEFTAUDIT_GPUS_FILE": str(user)}) if g["name"] == "RTX A6000"]
    assert mine["usable_gib"] == 47.0 and mine["price_per_hour"] == 0.79
    assert mine["origin"] == str(user)
    assert mine["tflops"]["bf16"] == 154.8  # what the user did not override stays the plugin's


def test_registering_the_plugin_at_run_time_refreshes_the_gpu_catalog(tmp_path: Path, monkeypatch: Any) -> None:
    import peftaudit_example

    from peftaudit import plugins
    from peftaudit.gpus import catalog

    monkeypatch.setenv("PEFTAUDIT_GPUS_FILE", str(tmp_path / "none.toml"))
    catalog.reset()
    if plugins.get_plugin_manager().is_registered(peftaudit_example):  # autoload on: already there
        assert catalog.find_gpu("a6000").origin == "peftaudit-example"
        return
    assert "RTX A6000" not in {g.name for g in catalog.gpus()}
    plugins.register_plugin(peftaudit_example, name="peftaudit-example-under-test")
    try:
        assert catalog.find_gpu("a6000").origin == "peftaudit-example"
    finally:
        plugins.unregister_plugin(peftaudit_example)
    assert "RTX A6000" not in {g.name for g in catalog.gpus()}
