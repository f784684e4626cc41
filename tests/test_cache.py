"""The report cache: an entry that cannot be read back is a miss, never an error."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import tiny

from peftaudit import cache
from peftaudit.report import audit


@pytest.fixture
def cache_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PEFTAUDIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("PEFTAUDIT_NO_CACHE", raising=False)
    return tmp_path / "cache"


def test_a_stored_report_reads_back_equal(cache_folder: Path) -> None:
    report = audit("gpt2", use_cache=False)
    cache.store("k", report)
    assert cache.load("k") == report


@pytest.mark.parametrize(
    "content",
    [
        "null",
        "[]",
        '"report"',
        "42",
        '{"schema_version": 1}',
        '{"schema_version": 1, "layers": [5]}',
        '{"schema_version": 1, "layers": [], "model": null}',
        '{"schema_version": 1',
        "[" * 100_000,
        "",
    ],
)
def test_an_unreadable_entry_is_a_miss(cache_folder: Path, content: str) -> None:
    cache_folder.mkdir()
    (cache_folder / "k.json").write_text(content)
    assert cache.load("k") is None


def test_a_fifo_entry_is_a_miss_without_waiting(cache_folder: Path) -> None:
    cache_folder.mkdir()
    os.mkfifo(cache_folder / "k.json")
    assert cache.load("k") is None


def test_a_bad_entry_is_replaced_by_the_rebuilt_report(cache_folder: Path, tmp_path: Path) -> None:
    from peftaudit.sources.base import SourceOptions, resolve

    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(tiny.TINY["llama"]))
    resolved, _ = resolve(str(folder))
    key = cache.key_for(resolved, SourceOptions())
    assert key is not None
    cache_folder.mkdir()
    (cache_folder / f"{key}.json").write_text("null")
    report = audit(str(folder))
    assert report.params.total == sum(p.numel() for p in tiny.build("llama").parameters())
    assert cache.load(key) == report
