"""Checkpoints in the Hugging Face hub cache, where every file is a symlink into ../../blobs/.

The cache is written by huggingface_hub's own ``hf_hub_download`` from a local
HTTP server standing in for the Hub (tests/verify_builders.py), so the layout
is the one on users' machines, not a copy of our idea of it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from verify_builders import hub_cache_download, sharded_checkpoint

from peftaudit.verification import CheckpointError, snapshot, verify
from peftaudit.verification.checkpoint import confinement, locate


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the source checkpoint, its snapshot folder in a fresh hub cache)."""
    root = tmp_path_factory.mktemp("hub")
    source = sharded_checkpoint(root / "source")
    return source, hub_cache_download(root / "cache", "org/name", source)


def shards(folder: Path) -> list[str]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return sorted(set(index["weight_map"].values()))


def test_shards_in_the_blobs_are_read_and_match_the_source(hub: tuple[Path, Path]) -> None:
    source, cached = hub
    names = shards(cached)
    assert len(names) >= 2
    assert all(os.readlink(cached / n).startswith("../../blobs/") for n in names)
    repo, where = confinement(cached / "model.safetensors.index.json")
    assert repo == cached.parent.parent.resolve() and repo.name == "models--org--name"
    assert where == f"the hub cache folder {repo}"
    assert [t.digest for t in snapshot(cached)] == [t.digest for t in snapshot(source)]
    verdict = verify(source, cached)
    assert verdict.ok and verdict.changed == 0 and verdict.compared == len(snapshot(source))


def _copy_cache(cached: Path, tmp_path: Path) -> Path:
    repo = cached.parent.parent
    shutil.copytree(repo.parent, tmp_path / "cache", symlinks=True)
    return tmp_path / "cache" / repo.name / "snapshots" / cached.name


@pytest.mark.parametrize("where", ["another-repo", "cache-root", "outside"])
def test_a_shard_resolving_outside_its_repo_folder_is_refused(
    hub: tuple[Path, Path], tmp_path: Path, where: str
) -> None:
    cached = _copy_cache(hub[1], tmp_path)
    shard = cached / shards(cached)[0]
    blob = shard.resolve()
    target = {
        "another-repo": tmp_path / "cache" / "models--other--repo" / "blobs" / "x",
        "cache-root": tmp_path / "cache" / "x",
        "outside": tmp_path / "x",
    }[where]
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(blob, target)
    shard.unlink()
    shard.symlink_to(os.path.relpath(target, shard.parent))
    with pytest.raises(CheckpointError, match=r"resolves outside the hub cache folder .*models--org--name"):
        locate(cached)


def test_an_index_in_a_subfolder_of_the_snapshot(hub: tuple[Path, Path], tmp_path: Path) -> None:
    # Repos that keep a model in a subfolder: snapshots/REV/sub/ -> ../../../blobs/.
    cached = _copy_cache(hub[1], tmp_path)
    sub = cached / "sub"
    sub.mkdir()
    for name in [*shards(cached), "model.safetensors.index.json"]:
        (sub / name).symlink_to(Path("..") / os.readlink(cached / name))
    assert len(locate(sub).files) == len(shards(cached))


def test_outside_a_hub_cache_the_checkpoint_directory_is_the_boundary(hub: tuple[Path, Path], tmp_path: Path) -> None:
    # The same symlinks in a folder that is not a cache snapshot still escape.
    cached = hub[1]
    plain = tmp_path / "snapshots" / "rev"
    plain.mkdir(parents=True)
    for name in [*shards(cached), "model.safetensors.index.json"]:
        (plain / name).symlink_to((cached / name).resolve())
    with pytest.raises(CheckpointError, match="resolves outside the checkpoint directory"):
        locate(plain)
