"""The tensor names peft saves in an adapter, and which of them training changes.

Every peft tuner layer class (a ``BaseTunerLayer`` subclass) declares two
tuples: ``adapter_layer_names``, the containers of its trainable weights
(``lora_A``, ``hada_w1_a``, ``vera_lambda_b``, ``oft_R``, ...), and
``other_param_names``, everything else it keeps per adapter: configuration
numbers (``r``, ``scaling``) and fixed tensors (VeRA's shared random
projections ``vera_A``/``vera_B``, RandLoRA's bases, index buffers).
peft's ``get_peft_model_state_dict`` saves what those containers hold, with
the adapter name dropped, so these names are how a saved adapter's keys are
told apart from copies of base tensors.

The names are read from the installed peft's source text, not by importing
it: importing peft imports torch, and verifying safetensors files must not
(docs/verify.md, "No torch for checkpoints"). Reading the installed peft
means a peft upgrade that adds a tuner is followed without a change here;
``tests/verification/test_verify_peft_methods.py`` checks that what is read
equals what the imported classes declare.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

#: ``adapter_layer_names = (...)`` / ``other_param_names: tuple[str, ...] = (...)``, and the
#: instance-level extensions LoRA variants make (``module.adapter_layer_names = ... + ("lora_diag",)``).
_DECLARED = ("adapter_layer_names", "other_param_names")
_ASSIGNMENT = re.compile(r"\s*(?::[^=\n]*)?=(?!=)\s*")
_NAME = re.compile(r"""["']([A-Za-z_][\w.]*)["']""")

#: Saved names no tuner layer class declares (they are not tuner layers), kept by hand:
#: prompt learning saves what ``BasePromptEncoder._get_adapter_state_dict`` returns,
#: ``prompt_embeddings`` (the prompt, or a prefix/p-tuning encoder's output for it), plus
#: ``prefix_task_cols``/``prefix_task_rows`` for multitask prompt tuning
#: (``MultitaskPromptTuningModel._get_adapter_state_dict``); adaption prompt saves its
#: ``adaption_prompt`` and ``adaption_gate`` parameters (``AdaptionPromptModel``). All are trained.
PROMPT_LEARNING_NAMES = frozenset(
    {"prompt_embeddings", "prefix_task_cols", "prefix_task_rows", "adaption_prompt", "adaption_gate"}
)

#: AdaLoRA's ``ranknum`` (fixed at r, never trained; peft 0.21 no longer saves it) is the one fixed
#: tensor whose name carries no tuner prefix, so the prefix rule of :func:`_fixed` cannot find it.
_UNPREFIXED_FIXED = frozenset({"ranknum"})

#: Used only if the installed peft's source cannot be read: the LoRA names this module replaced.
_FALLBACK_TRAINED = frozenset(
    {"lora_A", "lora_B", "lora_E", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"}
    | {"trainable_tokens_delta"}
)


@dataclass(frozen=True)
class PeftNames:
    """Attribute names that mark a saved key as a peft adapter's own tensor.

    ``trained``: the tuner layers' ``adapter_layer_names`` and the prompt-learning
    names; training changes them. ``fixed``: tensors peft saves that training never
    changes (``vera_A``, ``randlora_B``, ``shira_indices``, ``ranknum``, ...).
    """

    trained: frozenset[str]
    fixed: frozenset[str]
    source: str


def declared_names(tuners: Path) -> dict[str, frozenset[str]]:
    """Every name the ``.py`` files under ``tuners`` assign to ``adapter_layer_names`` / ``other_param_names``."""
    found: dict[str, set[str]] = {"adapter_layer_names": set(), "other_param_names": set()}
    for path in sorted(tuners.rglob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        for key in _DECLARED:
            # str.find, then a regex only where the name occurs: a regex over all of peft's
            # tuners (6 MB) would cost more than the rest of reading an adapter.
            at = text.find(key)
            while at >= 0:
                after = at + len(key)
                assignment = _ASSIGNMENT.match(text, after)
                if assignment is not None and not (text[at - 1 : at].isalnum() or text[at - 1 : at] == "_"):
                    end = _statement_end(text, assignment.end())
                    found[key].update(_NAME.findall(text, assignment.end(), end))
                at = text.find(key, after)
    return {key: frozenset(names) for key, names in found.items()}


def _statement_end(text: str, start: int) -> int:
    """Where the statement starting at ``start`` ends: the first newline outside brackets."""
    depth = 0
    for i in range(start, len(text)):
        char = text[i]
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "\n" and depth <= 0:
            return i
    return len(text)


def _fixed(trained: frozenset[str], other: frozenset[str]) -> frozenset[str]:
    """The tensors among ``other_param_names``: those named after their tuner (``vera_A`` beside ``vera_lambda_b``).

    ``other_param_names`` also holds configuration (``r``, ``alpha``, ``scaling``,
    ``indices``, ``topk``): generic names a base model's tensors may carry too, so
    they must not mark a key as the adapter's. A name that starts with a trained
    name's tuner prefix (the part before its first underscore) cannot be a base
    tensor's; the configuration ones among them (``lora_dropout``) never appear in a
    saved file, so counting them is harmless.
    """
    prefixes = tuple({name.split("_", 1)[0] + "_" for name in trained if "_" in name and not name.startswith("_")})
    # A leading underscore marks a private buffer (OSF's ``_osf_U_high``): still its tuner's.
    tuner_named = {name for name in other if name.lstrip("_").startswith(prefixes)}
    return frozenset((tuner_named | _UNPREFIXED_FIXED) - trained)


def _tuners_dir() -> Path | None:
    try:
        spec = importlib.util.find_spec("peft")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "tuners"
    return path if path.is_dir() else None


@lru_cache(maxsize=1)
def peft_names() -> PeftNames:
    """The names of the installed peft (read once per process, about 50 ms)."""
    tuners = _tuners_dir()
    declared = declared_names(tuners) if tuners is not None else {}
    trained = declared.get("adapter_layer_names", frozenset())
    source = f"the tuner classes in {tuners}"
    if not trained:
        trained, source = _FALLBACK_TRAINED, "peftaudit's LoRA names (peft's source was not found)"
    fixed = _fixed(trained, declared.get("other_param_names", frozenset()))
    return PeftNames(trained=trained | PROMPT_LEARNING_NAMES, fixed=fixed, source=source)
