"""Verification under torch.distributed: torchrun, gloo, two CPU processes (DDP and FSDP2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("dist")
    worker = Path(__file__).with_name("distributed_worker.py")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([*torchrun, str(worker), str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_every_rank_reaches_the_same_verdict(ranks: list[dict[str, Any]]) -> None:
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0] == ranks[1]


def test_ddp_replicas_split_the_hashing_and_combine_to_the_whole(ranks: list[dict[str, Any]]) -> None:
    ddp = ranks[0]["ddp"]
    assert ddp["same_as_local"] is True
    assert ddp["clean"]["ok"] is True
    assert ddp["clean"]["counts"]["intended_changed"] == ddp["clean"]["counts"]["intended"] == 8
    [finding] = ddp["nudged"]["findings"]
    assert finding["name"] == "base_model.model.model.layers.1.mlp.up_proj.weight"
    assert finding["problem"] == "unexpected-change" and finding["cause"] == "modified-in-place"


def test_fsdp_shards_are_fingerprinted_where_they_live(ranks: list[dict[str, Any]]) -> None:
    fsdp = ranks[0]["fsdp"]
    assert fsdp["layouts"] == ["(Shard(dim=0),) over 2 ranks"]
    assert fsdp["clean"]["ok"] is True
    assert fsdp["clean"]["counts"]["changed"] == 5  # the five norm weights
    # The change exists only in rank 1's shard, yet rank 0 reports it too.
    [finding] = fsdp["nudged"]["findings"]
    assert finding["name"] == "model.layers.0.self_attn.o_proj.weight"
    assert finding["problem"] == "unexpected-change"
    assert finding["size"]["max_abs"] == pytest.approx(1.0, rel=1e-6)
