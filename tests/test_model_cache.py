"""The model cache: a model built once is read back exactly, and repeat commands need no torch.

Round trips are checked on real models of every shape the inventory records
(tied Conv1D, encoders, encoder-decoders, mixtures of experts, vision-language,
convolutional, pre-quantized); estimates and recommendations from a read-back
model equal the live one's; the keys miss on what must invalidate them; and
the repeat commands, in fresh processes, import none of torch, transformers
or peft and print what the same command prints with the caches off.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tiny

import peftaudit
from peftaudit import cache
from peftaudit.architecture import ArchitectureRule, ModuleRole
from peftaudit.cli import main
from peftaudit.inventory import Inventory
from peftaudit.matching import targets_match
from peftaudit.memory import PlanError, TrainingPlan, estimate
from peftaudit.memory.derived import derivation, store
from peftaudit.sources.base import SourceOptions, resolve
from peftaudit.sources.load import LoadedModel, load, load_config, load_resolved

BNB_4BIT = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}

#: Tiny configs (by tests/tiny.py name) and catalog models, one of each shape the inventory records.
TINY_MODELS = ("llama_tied", "gpt2", "bert", "t5", "mixtral", "falcon")
CATALOG_MODELS = (
    "Qwen/Qwen3-30B-A3B",  # fused experts, a router
    "llava-hf/llava-1.5-7b-hf",  # vision-language towers
    "facebook/convnext-base-224",  # no checkpointing in transformers; 1,000 integer-keyed labels
    "google/vit-base-patch16-224",
)


@pytest.fixture
def cache_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PEFTAUDIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("PEFTAUDIT_NO_CACHE", raising=False)
    return tmp_path / "cache"


def _live(name: str) -> LoadedModel:
    if name == "llama_bnb4":
        return load_config({**tiny.TINY["llama"], "quantization_config": BNB_4BIT}, model_id=name, origin="test")
    if name in tiny.TINY:
        return load_config(tiny.TINY[name], model_id=name, origin="test")
    return load(name)


def _round_trip(model: LoadedModel) -> tuple[Inventory, Any]:
    assert cache.store_model("k", model.inventory, model.facts)
    found = cache.load_model("k")
    assert found is not None
    return found


def _profile_key(config: Any) -> str | None:
    return store.key_for(config, TrainingPlan().to_dict(), ("dora-stack",))


@pytest.mark.parametrize("name", [*TINY_MODELS, "llama_bnb4", *CATALOG_MODELS])
def test_a_model_reads_back_exactly(name: str, cache_folder: Path) -> None:
    model = _live(name)
    inventory, facts = _round_trip(model)
    assert inventory == model.inventory
    assert inventory.supports_gradient_checkpointing is model.inventory.supports_gradient_checkpointing is not None
    assert inventory.config == model.inventory.config  # integer label keys stay integers
    assert inventory.quantization_config == model.inventory.quantization_config
    assert facts == model.facts
    assert all(type(m.role) is ModuleRole for m in inventory.modules if m.role is not None)
    # The derived step profiles are keyed by the config's text: the same key, so the same stored profile.
    assert _profile_key(inventory.config) == _profile_key(model.inventory.config)


PLANS = [
    TrainingPlan(method=m, gradient_checkpointing=gc) for m in ("full", "lora", "qlora", "dora") for gc in (False, True)
]


def _outcome(inventory: Inventory, plan: TrainingPlan) -> Any:
    try:
        return estimate(inventory, plan).to_dict()
    except PlanError as exc:  # DoRA on fused experts: refused alike
        return str(exc)


@pytest.mark.parametrize("name", ["llama_tied", "gpt2", pytest.param("mixtral", marks=pytest.mark.slow), "llama_bnb4"])
def test_estimates_and_recommendations_equal_the_live_models(
    name: str, cache_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from peftaudit.recommend.recommendation import recommend

    model = _live(name)
    inventory, facts = _round_trip(model)
    if name == "mixtral":
        # No layer program for mixtures of experts: each plan shape is traced once (seconds), so one,
        # through the stack rules' view of the experts (transformers 4.44's per-expert modules).
        # The read-back model finds the profile the live one derived: the same store key, no trace.
        plans = (TrainingPlan(stack="transformers==4.44"),)
        live = [_outcome(model.inventory, plan) for plan in plans]

        def no_trace(*args: Any, **kwargs: Any) -> None:
            raise AssertionError("traced again")

        monkeypatch.setattr(derivation, "_derive", no_trace)
        assert [_outcome(inventory, plan) for plan in plans] == live
        return
    for plan in PLANS:
        assert _outcome(inventory, plan) == _outcome(model.inventory, plan), plan
    assert recommend(inventory, facts).to_dict() == recommend(model.inventory, model.facts).to_dict()


def test_a_model_transformers_cannot_checkpoint_is_refused_from_the_cache_alone(
    cache_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from peftaudit.memory import checkpointing

    inventory, _ = _round_trip(_live("facebook/convnext-base-224"))
    assert inventory.supports_gradient_checkpointing is False

    def no_lookup(name: str) -> None:
        raise AssertionError("transformers was asked")

    monkeypatch.setattr(checkpointing, "_transformers_class", no_lookup)
    with pytest.raises(PlanError, match="ConvNextForImageClassification does not support activation checkpointing"):
        estimate(inventory, TrainingPlan(method="full", gradient_checkpointing=True, image_size=224))


# --- keys and entries ---------------------------------------------------------------------------


def _local(tmp_path: Path, config: dict[str, Any]) -> str:
    folder = tmp_path / "model"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def _key(spec: str) -> str | None:
    resolved, _ = resolve(spec)
    return cache.model_key(resolved, SourceOptions())


def test_the_key_misses_on_a_version_a_config_edit_and_a_plugin(
    cache_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from peftaudit.plugins import register_plugin, unregister_plugin

    spec = _local(tmp_path, tiny.TINY["llama"])
    key = _key(spec)
    assert key is not None and key == _key(spec)

    for dist in ("peftaudit", "transformers", "peft", "torch"):
        real = cache.installed_version
        with monkeypatch.context() as patch:
            patch.setattr(cache, "installed_version", lambda d, dist=dist, real=real: "9" if d == dist else real(d))
            patch.setattr(cache, "__version__", "9" if dist == "peftaudit" else cache.__version__)
            assert _key(spec) != key, dist

    class Rules:
        @peftaudit.hookimpl
        def peftaudit_register_architecture_rules(self, register: Any) -> None:
            register(ArchitectureRule(r"\.mlp\.up_proj$", ModuleRole.MLP_UP, model_types=("llama",)))

    plugin = Rules()
    register_plugin(plugin, name="test-model-cache-rules")
    try:
        assert _key(spec) != key
    finally:
        unregister_plugin(plugin)
    assert _key(spec) == key

    _local(tmp_path, {**tiny.TINY["llama"], "intermediate_size": 96})
    assert _key(spec) != key


def test_remote_code_is_in_the_key(cache_folder: Path, tmp_path: Path) -> None:
    spec = _local(tmp_path, {**tiny.TINY["llama"], "auto_map": {"AutoConfig": "configuration_x.XConfig"}})
    (Path(spec) / "modeling_x.py").write_text("# v1\n")
    key = _key(spec)
    (Path(spec) / "modeling_x.py").write_text("# v2\n")
    assert _key(spec) != key


def _entries(folder: Path) -> list[Path]:
    return sorted((folder / "models").glob("*.json")) if (folder / "models").is_dir() else []


def test_a_built_model_is_stored_then_read_without_building(
    cache_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    resolved, source = resolve(_local(tmp_path, tiny.TINY["mixtral"]))
    first = load_resolved(resolved, source, SourceOptions(), use_cache=True)
    (entry,) = _entries(cache_folder)

    def no_build(*args: Any) -> None:
        raise AssertionError("built again")

    monkeypatch.setattr(source, "build", no_build, raising=False)
    again = load_resolved(resolved, source, SourceOptions(), use_cache=True)
    assert again.inventory == first.inventory and again.facts == first.facts

    entry.write_text('{"format": 1, "inventory": {"architecture": "x"')  # truncated: a miss, rebuilt
    monkeypatch.undo()
    rebuilt = load_resolved(resolved, source, SourceOptions(), use_cache=True)
    assert rebuilt.inventory == first.inventory
    assert cache.load_model(entry.stem) is not None  # and rewritten


@pytest.mark.parametrize(
    "content", ["null", "[]", "", '{"format": 1}', '{"format": 0, "inventory": {}, "facts": {}}', "[" * 100_000]
)
def test_an_unreadable_entry_is_a_miss(cache_folder: Path, content: str) -> None:
    (cache_folder / "models").mkdir(parents=True)
    (cache_folder / "models" / "k.json").write_text(content)
    assert cache.load_model("k") is None


@pytest.mark.parametrize("value", [object(), {1: "a", "b": 2}, {(1, 2): "pair"}])
def test_a_config_that_would_not_read_back_is_not_cached(cache_folder: Path, value: Any) -> None:
    model = _live("llama_tied")
    odd = dataclasses.replace(model.inventory, config={**(model.inventory.config or {}), "x": value})
    assert not cache.store_model("k", odd, model.facts)
    assert _entries(cache_folder) == []


def _report_args(spec: str) -> list[str]:
    return ["report", spec, "--compare", "full,lora", "--json"]


def test_no_cache_and_the_variable_write_nothing(
    cache_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = _local(tmp_path, tiny.TINY["llama_tied"])
    for args in (["fit", spec, "--gpu", "H100"], ["recommend", spec], _report_args(spec), ["report", spec]):
        assert main([*args, "--no-cache"]) == 0
    monkeypatch.setenv("PEFTAUDIT_NO_CACHE", "1")
    assert main(["gpus", spec, "--gpu", "H100"]) == 0
    assert main(["report", spec]) == 0
    capsys.readouterr()
    assert not cache_folder.exists()
    monkeypatch.delenv("PEFTAUDIT_NO_CACHE")
    assert main(["fit", spec, "--gpu", "H100"]) == 0
    assert len(_entries(cache_folder)) == 1


# --- repeat commands in fresh processes -----------------------------------------------------------

HEAVY = {"torch", "transformers", "peft"}

REPEATS = (
    ["report", "{m}", "--compare", "full,lora,qlora"],
    ["gpus", "{m}"],
    ["fit", "{m}", "--gpu", "H100"],
    ["plan", "{m}", "--gpu", "H100", "--tokens", "1B"],
    ["recommend", "{m}"],
    ["report", "{m}", "--checks"],
)


def _repeat_in_fresh_process(commands: list[list[str]], env: dict[str, str]) -> tuple[list[Any], set[str]]:
    """Run each command with ``--json`` in one new interpreter; their outputs and the modules it imported."""
    script = (
        "import contextlib, io, json, sys\n"
        "from peftaudit.cli import main\n"
        "outs = []\n"
        "for args in json.loads(sys.argv[1]):\n"
        "    buffer = io.StringIO()\n"
        "    with contextlib.redirect_stdout(buffer):\n"
        "        assert main([*args, '--json']) == 0, args\n"
        "    outs.append(json.loads(buffer.getvalue()))\n"
        "print(json.dumps({'outs': outs, 'modules': sorted({m.split('.')[0] for m in sys.modules})}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, json.dumps(commands)],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout.splitlines()[-1])
    return data["outs"], set(data["modules"])


def _uncached(
    commands: list[list[str]], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> list[Any]:
    """The commands' outputs in this process with every cache off (``PEFTAUDIT_NO_CACHE``)."""
    outs = []
    with monkeypatch.context() as patch:
        patch.setenv("PEFTAUDIT_NO_CACHE", "1")
        for args in commands:
            capsys.readouterr()
            assert main([*args, "--json"]) == 0, args
            outs.append(json.loads(capsys.readouterr().out))
    return outs


@pytest.mark.slow
def test_repeat_commands_import_no_torch_and_answer_as_uncached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    model = "Qwen/Qwen2.5-0.5B"
    env = {"PEFTAUDIT_CACHE_DIR": str(tmp_path / "cache")}
    # Any first command stores the model: the counts alone, here.
    _, modules = _repeat_in_fresh_process([["report", model, "--params-only"]], env)
    assert modules & HEAVY
    repeats = [[a.format(m=model) for a in command] for command in REPEATS]
    outs, modules = _repeat_in_fresh_process(repeats, env)
    assert not modules & HEAVY, modules & HEAVY
    assert outs == _uncached(repeats, monkeypatch, capsys)


# --- the matching and the sweep the repeat commands spend their time in --------------------------------


def _old_targets_match(targets: Any, key: str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    return key in targets or any(key.endswith("." + name) for name in targets)


def _names(rng: random.Random) -> Iterator[str]:
    segments = ["", "a", "b", "q_proj", "0", "1", "layers", "mlp.up", ".", "a.b"]
    while True:
        yield ".".join(rng.choice(segments) for _ in range(rng.randint(0, 5))) + rng.choice(["", "."])


def test_targets_match_on_a_set_is_the_suffix_rule() -> None:
    rng = random.Random(15)
    names = _names(rng)
    for _ in range(400):
        targets = {next(names) for _ in range(rng.randint(0, 6))}
        for _ in range(10):
            key = next(names)
            expected = _old_targets_match(targets, key)
            assert targets_match(targets, key) is expected, (targets, key)
            assert targets_match(frozenset(targets), key) is expected
            assert targets_match(sorted(targets), key) is expected
    assert targets_match({""}, "a.") and not targets_match({""}, "a")
    assert targets_match({"b.c"}, "a.b.c") and not targets_match({"b.c"}, "ab.c")


def test_a_sweep_asks_each_setup_once_with_the_same_rows() -> None:
    from peftaudit.gpus import find_gpu
    from peftaudit.gpus.sizing import peak_bytes, smallest_setup, sweep

    inventory = load("meta-llama/Llama-3.1-70B").inventory
    plans = [TrainingPlan(method="full"), TrainingPlan(method="qlora")]
    gpus = [find_gpu(name) for name in ("A10G", "L40S", "H100 SXM")]
    asked: list[TrainingPlan] = []

    def counting(inv: Inventory, plan: TrainingPlan) -> int:
        asked.append(plan)
        return peak_bytes(inv, plan)

    rows = sweep(inventory, plans, gpus, peak=counting)
    assert len(asked) == len(set(asked))
    assert rows == [[smallest_setup(inventory, p, g) for p in plans] for g in gpus]


@pytest.mark.parametrize("method", ["full", "lora", "qlora", "dora"])
def test_a_shape_prepared_after_its_checkpointing_twin_estimates_as_alone(method: str) -> None:
    # The estimator lends a plan shape's static memory and layout to the same shape with gradient
    # checkpointing the other way: each estimate must be what it is on a model that saw no twin.
    plans = [TrainingPlan(method=method, gradient_checkpointing=gc) for gc in (False, True)]
    for first, second in (plans, plans[::-1]):
        together = _live("gpt2").inventory
        estimate(together, first)
        assert estimate(together, second).to_dict() == estimate(_live("gpt2").inventory, second).to_dict()


def test_a_library_load_leaves_the_garbage_collector_as_it_was() -> None:
    """The collector is paused while a model is built; a library user's process gets it back, with nothing
    frozen (only the console script, one short process, freezes what the build left: sources.load)."""
    import gc
    import importlib

    loading = importlib.import_module("peftaudit.sources.load")  # the module, not the function it exports
    assert not loading._ONE_SHOT_PROCESS
    frozen = gc.get_freeze_count()
    load_config(tiny.TINY["gpt2"], model_id="gpt2", origin="test")
    assert gc.isenabled() and gc.get_freeze_count() == frozen
    gc.disable()
    try:  # and a process that had it off keeps it off
        load_config(tiny.TINY["gpt2"], model_id="gpt2", origin="test")
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_the_console_script_freezes_what_a_build_leaves() -> None:
    code = (
        "import gc, sys, contextlib, io\n"
        "from peftaudit.cli import console_main\n"
        "sys.argv = ['peftaudit', 'report', 'meta-llama/Llama-3.2-1B', '--params-only', '--no-cache', '--json']\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    assert console_main() == 0\n"
        "print(gc.isenabled(), gc.get_freeze_count() > 100_000)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True"]
