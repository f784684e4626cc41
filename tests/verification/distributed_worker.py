"""Run by ``torchrun`` (gloo, CPU) from test_verify_distributed.py; writes one JSON per rank.

Not a test module itself: pytest collects only ``test_*.py``.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import peft
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for tiny.py
sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import build_tiny

from peftaudit.verification import snapshot, verify

warnings.simplefilter("ignore")


def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, vocab: int) -> None:
    torch.manual_seed(100 + dist.get_rank())  # each rank its own batch, as in data parallel training
    ids = torch.randint(0, vocab, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def ddp_case() -> dict[str, object]:
    model = peft.get_peft_model(build_tiny("llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    wrapped = DistributedDataParallel(model)
    before = snapshot(wrapped, distributed=True)
    local = snapshot(model)  # every rank holds the whole model: the combined digests must equal these
    same = all(before[t.name].digest == t.digest for t in local) and len(local) == len(before)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    for _ in range(2):  # two steps: after one, only lora_B has moved
        step(wrapped, optimizer, 128)
    clean = verify(before, wrapped, distributed=True)
    with torch.no_grad():
        model.base_model.model.model.layers[1].mlp.up_proj.weight[0, 0] += 1.0
    nudged = verify(before, wrapped, distributed=True)
    return {"same_as_local": same, "clean": clean.to_dict(), "nudged": nudged.to_dict()}


def fsdp_case() -> dict[str, object]:
    model = build_tiny("llama")
    for name, param in model.named_parameters():
        param.requires_grad_("norm" in name)  # train the norms; everything else frozen
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    before = snapshot(model, distributed=True)
    layouts = sorted({t.layout.split(":")[0] for t in before})
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    step(model, optimizer, 128)
    clean = verify(before, model, distributed=True)
    if dist.get_rank() == 1:  # only this rank's shard changes
        with torch.no_grad():
            model.model.layers[0].self_attn.o_proj.weight.to_local()[0, 0] += 1.0
    nudged = verify(before, model, distributed=True)
    return {"layouts": layouts, "clean": clean.to_dict(), "nudged": nudged.to_dict()}


def main() -> None:
    dist.init_process_group("gloo")
    out = Path(sys.argv[1])
    result = {"world": dist.get_world_size(), "ddp": ddp_case(), "fsdp": fsdp_case()}
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
