"""Built-in config exporters (:mod:`peftaudit.recommend.exports`): peft (Python and
adapter_config.json), axolotl, LLaMA-Factory, TRL, registered like any plugin's."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from peftaudit import hookimpl

if TYPE_CHECKING:  # pragma: no cover
    from peftaudit.recommend.exports import Exporter


@hookimpl
def peftaudit_register_exporters(register: Callable[[Exporter], None]) -> None:
    from peftaudit.recommend.exports.axolotl import Axolotl
    from peftaudit.recommend.exports.llama_factory import LlamaFactory
    from peftaudit.recommend.exports.peft import PeftJson, PeftPython
    from peftaudit.recommend.exports.trl import Trl

    for exporter in (PeftPython(), PeftJson(), Axolotl(), LlamaFactory(), Trl()):
        register(exporter)
