"""Write the pictures under docs/img/ (offline, deterministic).

    python docs/gen_pictures.py

- ``report.svg``: ``peftaudit report`` of a bundled catalog model, as a colour
  terminal shows it, recorded by rich (``Console(record=True)``, ``export_svg``);
- ``sizing.svg``: ``peftaudit gpus MODEL --plot``, peak memory per GPU against
  sequence length with the GPUs' limits;
- ``verify-failure.svg``: a verifier verdict that fails, for a tiny LoRA model
  whose frozen embedding was changed and one of whose adapters was not.

Everything is built from the bundled catalog or seeded on the CPU: running the
script twice writes the same bytes.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Iterator
from pathlib import Path

#: The environment the pictures are made in: offline, no plugins, no cache, a colour terminal.
ENVIRONMENT = {
    "PEFTAUDIT_DISABLE_PLUGIN_AUTOLOAD": "1",
    "PEFTAUDIT_NO_CACHE": "1",
    "HF_HUB_OFFLINE": "1",
    "TERM": "xterm-256color",
    "COLORTERM": "truecolor",
}

IMG = Path(__file__).resolve().parent / "img"
WIDTH = 100

#: The commands pictured, exactly as the docs show them.
REPORT_ARGS = ["report", "meta-llama/Llama-3.2-1B", "--compare", "lora,qlora", "--width", str(WIDTH)]
SIZING_MODEL = "meta-llama/Llama-3.1-8B"


@contextlib.contextmanager
def _environment() -> Iterator[None]:
    saved = dict(os.environ)
    os.environ.update(ENVIRONMENT)
    os.environ.pop("NO_COLOR", None)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


class _Terminal(io.StringIO):
    """stdout that says it is a terminal, so the CLI colours its output."""

    def isatty(self) -> bool:
        return True


def _svg(ansi: str, title: str) -> str:
    from rich.console import Console
    from rich.text import Text

    console = Console(
        record=True, width=WIDTH, file=io.StringIO(), force_terminal=True, color_system="truecolor", highlight=False
    )
    console.print(Text.from_ansi(ansi.rstrip("\n")), soft_wrap=True)
    return console.export_svg(title=title)


def _cli(args: list[str]) -> str:
    from peftaudit.cli import main

    out = _Terminal()
    with contextlib.redirect_stdout(out):
        code = main(args)
    if code != 0:
        raise SystemExit(f"peftaudit {' '.join(args)} exited {code}")
    return out.getvalue()


def report_svg() -> str:
    return _svg(_cli(REPORT_ARGS), "peftaudit " + " ".join(REPORT_ARGS[:-2]))


def sizing_svg(path: Path) -> None:
    _cli(["gpus", SIZING_MODEL, "--plot", str(path), "--width", str(WIDTH)])


def verify_failure_svg() -> str:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from peftaudit.verification import snapshot, verify
    from peftaudit.verification.render import render_text

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    before = snapshot(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            # A training step that reached every adapter but one ...
            if "lora_" in name and "layers.1.self_attn.v_proj" not in name:
                param.add_(0.01)
        # ... and a bug that wrote into the frozen embedding (tied to nothing, meant to stay put).
        model.get_input_embeddings().weight[:8].mul_(1.5)
    verdict = verify(before, model)
    out = _Terminal()
    render_text(verdict, file=out, color=True, width=WIDTH)
    return _svg(out.getvalue(), "verify(before, model)")


def write_all(directory: Path = IMG) -> None:
    """Write every picture into ``directory``."""
    directory.mkdir(exist_ok=True)
    with _environment():
        (directory / "report.svg").write_text(report_svg(), encoding="utf-8")
        sizing_svg(directory / "sizing.svg")
        (directory / "verify-failure.svg").write_text(verify_failure_svg(), encoding="utf-8")


def main() -> int:
    write_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
