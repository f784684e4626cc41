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
        ('{"model_type": "llava", "text_config": {"hidden_size": -1}}', "'text_config.hidden_size' must be positive"),
    ],
)
def test_bad_configs_are_one_clear_error(tmp_path: Path, content: str, message: str) -> None:
    write_config(tmp_path / "m", content)
    with pytest.raises(ConfigError, match=re.escape(message)):
        audit(str(tmp_path / "m"), use_cache=False)


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
