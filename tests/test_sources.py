"""Model sources: local paths, the catalog, the hub cache, and every kind of bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import tiny

from peftaudit.errors import ConfigError, RemoteCodeRequired, SourceNotFound
from peftaudit.report import audit
from peftaudit.sources.base import SourceOptions, resolve


def _tiny_llama(**changes: object) -> str:
    return json.dumps({**tiny.TINY["llama"], **changes})


def write_config(folder: Path, config: dict[str, object] | str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.json"
    path.write_text(config if isinstance(config, str) else json.dumps(config))
    return path


def test_local_directory_and_config_file_give_the_same_report(tmp_path: Path) -> None:
    path = write_config(tmp_path / "model", tiny.TINY["llama"])
    by_dir = audit(str(tmp_path / "model"), use_cache=False)
    by_file = audit(str(path), use_cache=False)
    assert by_dir.model.source == by_file.model.source == "local"
    assert by_dir.params == by_file.params
    assert by_dir.params.total == sum(p.numel() for p in tiny.build("llama").parameters())


def test_weights_are_never_read(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    write_config(folder, tiny.TINY["gpt2"])
    # A corrupt weights file next to the config must not matter: only config.json is read.
    (folder / "model.safetensors").write_bytes(b"\x00garbage")
    assert audit(str(folder), use_cache=False).params.total > 0


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"model_type": "llama", "hidden_size": 64', "not valid JSON"),
        ("[1, 2]", "must hold a JSON object"),
        ("", "not valid JSON"),
        ('{"hidden_size": 64}', "no 'model_type'"),
        ('{"model_type": "no-such-arch"}', "does not know model type 'no-such-arch'"),
        ('{"model_type": "llama", "hidden_size": 0}', "'hidden_size' must be positive"),
        ('{"model_type": "llama", "num_hidden_layers": -2}', "'num_hidden_layers' must be positive"),
        ('{"model_type": "llama", "vocab_size": "big"}', "'vocab_size' must be an integer"),
        # Sizes per stage (Swin's num_heads): every one a positive integer.
        ('{"model_type": "swin", "num_heads": [3, 0, 12, 24]}', "'num_heads' must be positive"),
        ('{"model_type": "swin", "num_heads": [3, "6"]}', "'num_heads' must be an integer"),
        ('{"model_type": "llava", "text_config": {"hidden_size": -1}}', "'text_config.hidden_size' must be positive"),
        # transformers' own (strict dataclass) validation, as one line naming the field
        (_tiny_llama(hidden_size=None), "invalid config.json: Field 'hidden_size' expected int, got NoneType"),
        (_tiny_llama(head_dim=7), "RoPE requires an even rotary dimension, but got `head_dim`=7"),
        (_tiny_llama(num_attention_heads=5, num_key_value_heads=5), "not a multiple of the number of attention heads"),
        (_tiny_llama(architectures=5), "'architectures' must be a list of class names, got 5"),
        (_tiny_llama(architectures="LlamaForCausalLM"), "'architectures' must be a list of class names"),
        (_tiny_llama(architectures=["PreTrainedModel"]), "builds a PreTrainedModel with no parameters"),
        ("[" * 100_000, "not valid JSON"),
    ],
)
def test_bad_configs_are_one_clear_error(tmp_path: Path, content: str, message: str) -> None:
    write_config(tmp_path / "m", content)
    with pytest.raises(ConfigError, match=re.escape(message)):
        audit(str(tmp_path / "m"), use_cache=False)


def test_bare_pretrainedmodel_is_refused_unbuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Building transformers' base class left "may use grouped experts" cached on ``PreTrainedModel``
    (read from modeling_utils.py's own source) for every class not yet built to inherit: a BERT
    classifier built later in the process asked for grouped experts, and its ``BertModel`` (already
    asked, answer False) refused them. Full test runs failed that way when the tests met in that order."""
    import torch
    import transformers
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    cached = "_can_set_experts_implementation_cached_value"
    monkeypatch.setattr(transformers.PreTrainedModel, cached, None, raising=False)  # not asked yet
    monkeypatch.setattr(BertModel, cached, False, raising=False)  # asked when a checkpoint builds BertModel
    if cached in vars(BertForSequenceClassification):  # not asked yet: it inherits the base class's answer
        monkeypatch.delattr(BertForSequenceClassification, cached)
    write_config(tmp_path / "m", _tiny_llama(architectures=["PreTrainedModel"]))
    with pytest.raises(ConfigError, match="builds a PreTrainedModel with no parameters"):
        audit(str(tmp_path / "m"), use_cache=False)
    assert vars(transformers.PreTrainedModel)[cached] is None
    bert = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=64)
    with torch.device("meta"):
        BertForSequenceClassification(bert)  # "BertModel does not support setting experts implementation"


def test_directory_without_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"has no config\.json"):
        resolve(str(tmp_path))


def test_missing_path_is_not_mistaken_for_a_hub_id(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file or directory"):
        resolve(str(tmp_path / "nope" / "config.json"))


def test_remote_code_is_refused_without_the_flag(tmp_path: Path) -> None:
    config = {"model_type": "my_custom_arch", "auto_map": {"AutoModel": "modeling_custom.CustomModel"}}
    write_config(tmp_path / "custom", config)
    # The module the auto_map names would raise if imported: proof it is never executed.
    (tmp_path / "custom" / "modeling_custom.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(RemoteCodeRequired, match="--trust-remote-code"):
        audit(str(tmp_path / "custom"), use_cache=False)


def test_catalog_ids_resolve_case_insensitively_and_without_org() -> None:
    for spec in ("meta-llama/Llama-2-7b-hf", "META-LLAMA/llama-2-7B-HF", "Llama-2-7b-hf", "llama-2-7b-hf"):
        resolved, _ = resolve(spec)
        assert resolved.id == "meta-llama/Llama-2-7b-hf"
        assert resolved.source == "catalog"


def test_catalog_does_not_answer_for_another_org() -> None:
    with pytest.raises(SourceNotFound, match="not in the bundled catalog"):
        resolve("someone-else/Llama-2-7b-hf")


def test_unknown_id_offline_names_the_id() -> None:
    with pytest.raises(SourceNotFound, match="'acme/unknown-model-xyz'"):
        resolve("acme/unknown-model-xyz")


def _hub_cache(root: Path, repo_id: str, config: dict[str, object]) -> None:
    """Lay out a huggingface_hub cache entry the way the library writes one."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(config))


def test_hub_id_is_read_from_the_hub_cache_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    _hub_cache(tmp_path, "acme/tiny-mistral", tiny.TINY["mistral"])
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    report = audit("acme/tiny-mistral", use_cache=False)
    assert report.model.source == "hub"
    assert report.model.origin.startswith("hub cache: ")
    assert report.params.total == sum(p.numel() for p in tiny.build("mistral").parameters())


def test_online_falls_back_to_the_catalog_with_a_note(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    resolved, _ = resolve("openai-community/gpt2", SourceOptions(online=True))
    assert resolved.source == "catalog"
    assert any("bundled catalog" in note for note in resolved.notes)


def test_revision_is_never_answered_from_the_catalog(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(SourceNotFound):
        resolve("openai-community/gpt2", SourceOptions(revision="v2"))


def test_empty_spec() -> None:
    with pytest.raises(SourceNotFound, match="no model given"):
        resolve("  ")


# --- limits: what is refused before it is read or built ---------------------------------------------


def test_config_over_the_size_limit_is_refused_unread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from peftaudit.sources import build

    path = write_config(tmp_path / "m", tiny.TINY["llama"])
    size = path.stat().st_size
    monkeypatch.setattr(build, "MAX_CONFIG_BYTES", size)
    assert resolve(str(path))[0].config == tiny.TINY["llama"]  # at the limit: read
    monkeypatch.setattr(build, "MAX_CONFIG_BYTES", size - 1)
    with pytest.raises(ConfigError, match=rf"of {size} bytes exceeds the {size - 1}-byte limit"):
        resolve(str(path))


@pytest.mark.parametrize("spec", ["m", "m/config.json"])
def test_a_fifo_named_config_json_is_refused_without_waiting(tmp_path: Path, spec: str) -> None:
    import os

    (tmp_path / "m").mkdir()
    os.mkfifo(tmp_path / "m" / "config.json")  # no writer: a blocking open() would never return
    with pytest.raises(ConfigError, match=r"config\.json is not a regular file"):
        resolve(str(tmp_path / spec))


def test_layer_bound_is_inclusive_and_stated() -> None:
    from peftaudit.sources.build import MAX_LAYERS, validate_config

    validate_config({**tiny.TINY["llama"], "num_hidden_layers": MAX_LAYERS}, "m")
    with pytest.raises(ConfigError, match=r"'text_config\.num_hidden_layers' is 1001; .* at most 1,000 layers"):
        validate_config({"model_type": "llava", "text_config": {"num_hidden_layers": MAX_LAYERS + 1}}, "m")


def test_expert_bound_admits_the_largest_published_expert_count() -> None:
    """google/switch-c-2048's published config (huggingface.co/google/switch-c-2048, config.json)."""
    from peftaudit.sources.build import validate_config

    switch_c_2048 = {
        "model_type": "switch_transformers",
        "d_model": 2080,
        "d_ff": 6144,
        "d_kv": 64,
        "num_heads": 30,
        "num_layers": 15,
        "num_decoder_layers": 12,
        "num_experts": 2048,
        "vocab_size": 32128,
    }
    validate_config(switch_c_2048, "google/switch-c-2048")
    with pytest.raises(ConfigError, match=r"has 54 layers x 2,048 experts = 110,592 experts in all"):
        validate_config({**switch_c_2048, "num_layers": 30, "num_decoder_layers": 24}, "m")


def test_every_catalog_config_is_within_the_bounds() -> None:
    from peftaudit.sources.build import validate_config
    from peftaudit.sources.catalog import entries

    for entry in entries():
        validate_config(entry.config, entry.id)


# --- the hub's time bound -----------------------------------------------------------------------------


def test_hub_timeout_default_and_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from peftaudit.errors import PeftauditError
    from peftaudit.sources.hub import DEFAULT_HUB_TIMEOUT_S, hub_timeout

    monkeypatch.delenv("PEFTAUDIT_HUB_TIMEOUT", raising=False)
    assert hub_timeout() == DEFAULT_HUB_TIMEOUT_S == 15.0
    monkeypatch.setenv("PEFTAUDIT_HUB_TIMEOUT", " 2.5 ")
    assert hub_timeout() == 2.5
    for bad in ("0", "-3", "inf", "nan", "15s"):
        monkeypatch.setenv("PEFTAUDIT_HUB_TIMEOUT", bad)
        with pytest.raises(PeftauditError, match="PEFTAUDIT_HUB_TIMEOUT must be a positive number of seconds"):
            hub_timeout()


def test_hub_call_is_abandoned_at_the_bound_and_errors_pass_through() -> None:
    import threading
    import time

    from peftaudit.sources import hub

    release = threading.Event()
    start = time.monotonic()
    with pytest.raises(hub._TimedOut):
        hub._within(0.2, lambda: release.wait(30))
    assert time.monotonic() - start < 5
    release.set()
    assert hub._within(5, lambda: 42) == 42
    with pytest.raises(KeyError, match="boom"):
        hub._within(5, lambda: {}["boom"])
