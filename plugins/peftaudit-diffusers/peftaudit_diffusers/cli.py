"""``peftaudit image-memory``: the image-training estimate on the command line.

Registered through ``peftaudit_register_commands``. Adding the parser runs for
every ``peftaudit`` command line (``--help`` too), so this module imports
nothing heavy; the estimate (diffusers, torch) is imported when the command runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from peftaudit.plugin_api import GIB, ExitCode

if TYPE_CHECKING:  # pragma: no cover
    from peftaudit_diffusers.memory import ImageMemoryEstimate

COMMAND = "image-memory"


def add_parser(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add ``image-memory`` to peftaudit's subcommands."""
    parser = subparsers.add_parser(
        COMMAND,
        help="peak GPU memory of training an SD 1.5 / SDXL UNet (peftaudit-diffusers)",
        description=(
            "Peak memory of one GPU for one image-training step of a bundled UNet (SD 1.5, SDXL): "
            "weights, adapters, optimizer states and activations calibrated against a fake-tensor "
            "trace of diffusers' own training step (bf16 autocast, fused AdamW, LoRA rank 4 on "
            "to_q/k/v/out.0 as diffusers' scripts). From the peftaudit-diffusers plugin."
        ),
    )
    parser.add_argument(
        "model",
        metavar="MODEL",
        help="a bundled UNet: stable-diffusion-v1-5/unet or sdxl/unet (diffusers: prefix optional)",
    )
    parser.add_argument(
        "--resolution", type=int, default=512, metavar="PX", help="image side in pixels, a multiple of 8 (default 512)"
    )
    parser.add_argument("--method", default="lora", metavar="NAME", help="lora (default) or full")
    parser.add_argument("--batch-size", type=int, default=1, metavar="N", help="images per step (default 1)")
    parser.add_argument(
        "--gradient-checkpointing", action="store_true", help="recompute activations in the backward pass"
    )
    parser.add_argument("--format", choices=("table", "json"), default="table", help="output format (default table)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Print the estimate; bad input raises a ``PeftauditError`` (one line, exit 2)."""
    from peftaudit_diffusers.memory import estimate_image_training

    estimate = estimate_image_training(
        args.model, args.method, args.resolution, args.batch_size, args.gradient_checkpointing
    )
    if args.format == "json":
        sys.stdout.write(json.dumps(estimate.to_dict(), indent=2) + "\n")
    else:
        sys.stdout.write(render_table(estimate))
    return int(ExitCode.OK)


def render_table(est: ImageMemoryEstimate) -> str:
    """The estimate as aligned text: one row per component, then the total."""
    checkpointing = "gradient checkpointing" if est.gradient_checkpointing else "no gradient checkpointing"
    rows = [(name.replace("_", " "), size) for name, size in est.components.items()]
    rows += [("total", est.total_bytes), ("of which allocated by PyTorch", est.allocated_bytes)]
    width = max(len(name) for name, _ in rows)
    lines = [
        f"{est.model}: {est.method}, {est.resolution} px, batch {est.batch_size}, {checkpointing}",
        f"trainable parameters: {est.trainable_params:,}",
        "",
        f"{'component':<{width}}  {'GiB':>8}",
    ]
    for name, size in rows:
        if name == "total":
            lines.append("-" * (width + 10))
        lines.append(f"{name:<{width}}  {size / GIB:>8.2f}")
    lines += ["", f"{est.source}: {est.calibration}"]
    return "\n".join(lines) + "\n"
