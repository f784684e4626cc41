"""A minimal peftaudit plugin: copy it to teach peftaudit your own model and GPU.

It does two things, each through one hook:

* architecture rules for a model whose modules peftaudit cannot name on its own
  (here a hypothetical ``acme-llm`` using Meta's original LLaMA names ``wq``,
  ``wk``, ``wv``, ``wo``, ``w1``, ``w2``, ``w3``), so reports and LoRA target
  recommendations know which module is attention q and which is the MLP's down;
* a GPU that peftaudit does not ship (the NVIDIA RTX A6000), so
  ``peftaudit gpus`` and ``--gpu "RTX A6000"`` know it.

Run ``peftaudit plugins`` after installing to see it listed with both hooks.
"""

from __future__ import annotations  # lets the type hints below name classes without importing them at runtime

from collections.abc import Callable  # the type of the `register` argument every hook receives

# A plugin imports from peftaudit.plugin_api only: everything a hook receives or registers is there.
from peftaudit.plugin_api import (
    GIB,  # 1024**3 bytes
    GPU,  # one accelerator, each figure with its source
    ArchitectureRule,  # a rule = regex over module path -> role
    ModuleRole,  # attention q/k/v/o, MLP gate/up/down, output head, ...
    hookimpl,  # the decorator that marks a function as a hook implementation
)

#: The ``model_type`` your model's config.json declares. Rules limited to it never
#: touch other models, and win over peftaudit's generic rules for this model.
MODEL_TYPE = "acme-llm"

#: The plugin's name as it appears in ``origin`` of what it registers.
PLUGIN = "peftaudit-example"


def rules() -> tuple[ArchitectureRule, ...]:
    """The architecture rules this plugin registers (a function, so tests can use them directly)."""
    only = (MODEL_TYPE,)  # limit every rule to our model type
    return (
        # Patterns are `re.search`ed in the module's dotted path, e.g. "layers.3.attention.wq".
        # Anchor them with `\.` and `$` so "wq" cannot match "wqkv" or "awq".
        ArchitectureRule(r"\.wq$", ModuleRole.ATTENTION_Q, model_types=only),  # query projection
        ArchitectureRule(r"\.wk$", ModuleRole.ATTENTION_K, model_types=only),  # key projection
        ArchitectureRule(r"\.wv$", ModuleRole.ATTENTION_V, model_types=only),  # value projection
        ArchitectureRule(r"\.wo$", ModuleRole.ATTENTION_O, model_types=only),  # attention output
        ArchitectureRule(r"\.w1$", ModuleRole.MLP_GATE, model_types=only),  # SwiGLU gate
        ArchitectureRule(r"\.w3$", ModuleRole.MLP_UP, model_types=only),  # SwiGLU up
        ArchitectureRule(r"\.w2$", ModuleRole.MLP_DOWN, model_types=only),  # MLP down
        # `module_types` narrows a rule to module classes: only the Linear named "output" is the head.
        ArchitectureRule(r"^output$", ModuleRole.OUTPUT_HEAD, model_types=only, module_types=("Linear",)),
    )


def rtx_a6000() -> GPU:
    """The NVIDIA RTX A6000, with every figure's source (write yours the same way)."""
    return GPU(
        name="RTX A6000",  # what users type after --gpu (case, spaces and dashes are ignored)
        vendor="NVIDIA",
        memory_gb=48.0,  # the vendor's figure, as printed
        # What a process can really allocate. NVIDIA does not print it; peftaudit's rule for
        # unmeasured cards is 99% of the printed figure in GiB. Replace it with what
        # `torch.cuda.mem_get_info()[1]` says on your machine, and set usable_estimated=False.
        usable_bytes=int(48 * 0.99 * GIB),
        usable_source="estimate: 99% of 48 GiB (not measured)",
        usable_estimated=True,
        bandwidth_gbs=768.0,  # GB/s, from the spec sheet
        # Dense tensor throughput only (never the "with sparsity" figure); None where unsupported.
        tflops={"bf16": 154.8, "fp16": 154.8, "fp8": None, "fp32": 38.7},
        tflops_source="NVIDIA RTX A6000 datasheet: 309.7 tensor TFLOPS with sparsity (154.8 dense), 38.7 FP32",
        aliases=("A6000",),  # other names users type
        memory_type="GDDR6",
        interconnect="PCIe 4.0 x16; NVLink bridge for 2 cards",
        origin=PLUGIN,  # `peftaudit gpus` shows where each entry came from
    )


@hookimpl  # the function's name must be a hook declared in peftaudit.hookspecs
def peftaudit_register_architecture_rules(register: Callable[[ArchitectureRule], None]) -> None:
    for rule in rules():  # call `register` once per item
        register(rule)


@hookimpl
def peftaudit_register_gpus(register: Callable[[GPU], None]) -> None:
    # A GPU with a bundled GPU's name replaces it; the user's GPU file still overrides ours.
    register(rtx_a6000())
