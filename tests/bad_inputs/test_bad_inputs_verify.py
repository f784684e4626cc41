"""Bad-input rows for ``verify`` and ``snapshot`` (issue 11, items 2, 3, 4, 7, 12, 13).

The checkpoints are real: a tiny Llama saved by transformers, a LoRA adapter
saved by peft and merged by ``merge_and_unload``, and a hub cache written by
huggingface_hub's own ``hf_hub_download`` (see tests/verify_builders.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from bad_input_corpus import Case, run_case
from verify_builders import edit_json, hub_cache_download, lora_checkpoints, scale_merge, sharded_checkpoint

MERGE = ["verify", "{tmp}/base", "{tmp}/merged", "--adapter", "{tmp}/adapter"]
AUDIT = ["verify", "{tmp}/base", "--adapter", "{tmp}/adapter"]
TARGETS = [f"model.layers.{i}.self_attn.{m}_proj.weight" for i in (0, 1) for m in ("q", "v")]


def five_x_merge(
    edit: Callable[[dict[str, Any]], None] | None = None, *, config: bool = True
) -> Callable[[Path], None]:
    """A real adapter (r=4, peft's default lora_alpha 8) merged at 5x its scale; then its config edited."""

    def setup(tmp: Path) -> None:
        base, adapter, merged = lora_checkpoints(tmp)
        assert scale_merge(base, merged, 5.0) == TARGETS
        if not config:
            (adapter / "adapter_config.json").unlink()
        elif edit is not None:
            edit_json(adapter / "adapter_config.json", edit)

    return setup


def adapter_with(edit: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    """A real, correctly merged adapter whose adapter_config.json is then edited."""

    def setup(tmp: Path) -> None:
        _, adapter, _ = lora_checkpoints(tmp)
        edit_json(adapter / "adapter_config.json", edit)

    return setup


def found_scale_per_layer(tmp: Path, result: subprocess.CompletedProcess[str]) -> None:
    """Every target is a merge-mismatch that names the expected scale 2 (8 / 4) and the found 10 (5x)."""
    verdict = json.loads(result.stdout)
    assert verdict["ok"] is False
    mismatch = {f["name"]: f for f in verdict["findings"] if f["problem"] == "merge-mismatch"}
    assert sorted(mismatch) == TARGETS
    for finding in mismatch.values():
        scale = finding["scale"]
        assert scale["expected"] == 2.0
        assert scale["found"] == pytest.approx(10.0, rel=1e-3)
        assert "lora_alpha 8 (peft's default" in scale["rule"]
        assert "found scale 10, 5x the expected scale" in finding["message"]
    origin = " ".join(verdict["expectations"])
    assert "adapter_config.json" in origin and "lora_alpha missing: peft's default 8" in origin


def unchanged(name: str) -> tuple[Callable[[Path], None], Callable[[Path, Any], None]]:
    """A setup that keeps a copy of ``tmp/name``, and a check that the file still has those bytes."""

    def keep(tmp: Path) -> None:
        (tmp / ".original").write_bytes((tmp / name).read_bytes())

    def check(tmp: Path, result: Any) -> None:
        digest = hashlib.sha256((tmp / name).read_bytes()).hexdigest()
        assert digest == hashlib.sha256((tmp / ".original").read_bytes()).hexdigest(), f"{name} was overwritten"

    return keep, check


def checkpoint_then(keep: Callable[[Path], None]) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        import torch
        from safetensors.torch import save_file

        (tmp / "m").mkdir()
        save_file({"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}, tmp / "m" / "model.safetensors")
        (tmp / "notes.txt").write_text("my notes\n")
        keep(tmp)

    return setup


def fifo(name: str) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        (tmp / "m").mkdir()
        os.mkfifo(tmp / "m" / name)

    return setup


REPO = "org/name"
HUB_SNAPSHOT = "{tmp}/hub/models--org--name/snapshots/0123456789abcdef0123456789abcdef01234567"


def hub_cache(escape: bool = False) -> Callable[[Path], None]:
    """A sharded checkpoint downloaded into a hub cache by huggingface_hub (shards link into ../../blobs/).

    With ``escape``, one shard's link is re-pointed at another repo's blob in the
    same cache: outside this repo's folder, so still refused.
    """

    def setup(tmp: Path) -> None:
        source = sharded_checkpoint(tmp / "source")
        snapshot = hub_cache_download(tmp / "hub", REPO, source)
        index = json.loads((snapshot / "model.safetensors.index.json").read_text())
        shard = snapshot / sorted(set(index["weight_map"].values()))[-1]
        assert shard.is_symlink() and os.readlink(shard).startswith("../../blobs/")
        if escape:
            other = tmp / "hub" / "models--other--repo" / "blobs"
            other.mkdir(parents=True)
            (other / "stolen").write_bytes(shard.read_bytes())
            shard.unlink()
            shard.symlink_to(Path("../../../models--other--repo/blobs/stolen"))

    return setup


SNAP_OVER_CKPT = unchanged("m/model.safetensors")
SNAP_OVER_NOTES = unchanged("notes.txt")

CASES = [
    # Item 2: a merge at 5x the scale passes when the scale cannot be read.
    Case(
        "11.2-lora-alpha-missing-5x-merge",
        [*MERGE, "--json"],
        exit_code=1,
        setup=five_x_merge(lambda c: c.pop("lora_alpha")),
        check=found_scale_per_layer,
    ),
    Case(
        "11.2-lora-alpha-string-5x-merge",
        MERGE,
        stderr=r"adapter/adapter_config\.json: lora_alpha",
        setup=five_x_merge(lambda c: c.update(lora_alpha="x")),
    ),
    Case(
        "11.2-adapter-config-absent-5x-merge",
        MERGE,
        stderr=r"adapter_config\.json",
        setup=five_x_merge(config=False),
    ),
    Case(
        "11.2-adapter-config-absent-audit",
        AUDIT,
        stderr=r"adapter_config\.json",
        setup=five_x_merge(config=False),
    ),
    # Item 13: a rank that is not a number passes.
    Case(
        "11.13-adapter-r-string-audit",
        AUDIT,
        stderr=r"adapter_config\.json: r ",
        setup=adapter_with(lambda c: c.update(r="x")),
    ),
    Case(
        "11.13-adapter-r-string-merge",
        MERGE,
        stderr=r"adapter_config\.json: r ",
        setup=adapter_with(lambda c: c.update(r="x")),
    ),
    # Item 7: an alpha_pattern key that is not a regular expression is a bug (exit 3).
    Case(
        "11.7-alpha-pattern-bad-regex-merge",
        MERGE,
        stderr=re.escape("adapter_config.json: alpha_pattern key '(['"),
        setup=adapter_with(lambda c: c.update(alpha_pattern={"([": 16})),
    ),
    Case(
        "11.7-rank-pattern-bad-regex-audit",
        AUDIT,
        stderr=re.escape("adapter_config.json: rank_pattern key '(['"),
        setup=adapter_with(lambda c: c.update(rank_pattern={"([": 2})),
    ),
    # Item 11: Python's json reads NaN, which no strict JSON parser accepts; a snapshot must never carry it.
    Case(
        "11.11-adapter-config-nan-snapshot",
        ["snapshot", "{tmp}/adapter", "--no-progress"],
        stderr=r"adapter_config\.json.*not valid JSON: NaN",
        setup=adapter_with(lambda c: c.update(lora_dropout=float("nan"))),
    ),
    # Item 3: a snapshot written over the checkpoint it fingerprints, or over any file that is not a snapshot.
    Case(
        "11.3-snapshot-over-the-checkpoint",
        ["snapshot", "{tmp}/m", "-o", "{tmp}/m/model.safetensors"],
        stderr="--force",
        setup=checkpoint_then(SNAP_OVER_CKPT[0]),
        check=SNAP_OVER_CKPT[1],
    ),
    Case(
        "11.3-snapshot-over-a-file-that-is-not-a-snapshot",
        ["snapshot", "{tmp}/m", "-o", "{tmp}/notes.txt"],
        stderr="not a peftaudit snapshot.*--force",
        setup=checkpoint_then(SNAP_OVER_NOTES[0]),
        check=SNAP_OVER_NOTES[1],
    ),
    # Item 12: a FIFO where a weight file should be blocks forever on open().
    Case(
        "11.12-verify-fifo-model-safetensors",
        ["verify", "{tmp}/m", "{tmp}/m"],
        stderr="not a regular file",
        setup=fifo("model.safetensors"),
        timeout=30,
    ),
    Case(
        "11.12-snapshot-fifo-model-safetensors",
        ["snapshot", "{tmp}/m/model.safetensors"],
        stderr="not a regular file",
        setup=fifo("model.safetensors"),
        timeout=30,
    ),
    Case(
        "11.12-verify-fifo-index",
        ["verify", "{tmp}/m", "{tmp}/m"],
        stderr="not a regular file",
        setup=fifo("model.safetensors.index.json"),
        timeout=30,
    ),
    Case(
        "11.12-verify-fifo-pytorch-model-bin",
        ["verify", "{tmp}/m", "{tmp}/m", "--allow-pickle"],
        stderr="not a regular file",
        setup=fifo("pytorch_model.bin"),
        timeout=30,
    ),
    # Item 4: a sharded checkpoint in the hub cache (shards are symlinks into ../../blobs/).
    Case("11.4-hub-cache-sharded-verify", ["verify", HUB_SNAPSHOT, HUB_SNAPSHOT], exit_code=0, setup=hub_cache()),
    Case("11.4-hub-cache-sharded-snapshot", ["snapshot", HUB_SNAPSHOT], exit_code=0, setup=hub_cache()),
    Case(
        "11.4-hub-cache-shard-escaping-the-repo-folder",
        ["verify", HUB_SNAPSHOT, HUB_SNAPSHOT],
        stderr=r"model-\d+-of-\d+\.safetensors.*resolves outside .*models--org--name",
        setup=hub_cache(escape=True),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path: Path) -> None:
    run_case(case, tmp_path)
