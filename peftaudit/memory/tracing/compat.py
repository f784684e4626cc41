"""A thin compatibility layer: the trace under older transformers and peft releases.

peftaudit itself requires transformers 5 and peft 0.17+, but the trace is also run under
the older stacks that training images still pin (transformers 4.4x/4.5x, peft 0.12-0.15),
in scratch environments, to record their traced peaks as test data
(``benchmarks/trace_stacks.py``). Each function here feature-detects one difference
and says why it exists; under the current stack every one of them is a no-op.
"""

from __future__ import annotations

import inspect
from typing import Any

from peftaudit.memory.plan import PlanError


def lora_config_kwargs(config_class: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` for ``config_class`` (``peft.LoraConfig``) without the unset fields it does not know.

    ``exclude_modules`` (peft 0.14) and ``target_parameters`` (peft 0.17) are not fields of
    older releases' ``LoraConfig``; unset (``None``) they change nothing and are dropped. A set
    one has no equivalent there: a one-line :class:`PlanError`.
    """
    fields = inspect.signature(config_class).parameters
    out: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key in fields:
            out[key] = value
        elif value is not None:
            raise PlanError(f"the installed peft has no {config_class.__name__}.{key}; the plan sets it")
    return out


def transformers_module(name: str) -> Any:
    """``transformers.<name>`` where the installed release has it, else ``None``.

    ``integrations.moe`` (the grouped-experts kernels, transformers 5) and ``masking_utils``
    (packed-sequence detection from position ids, 4.53+) are newer modules. Older releases run
    each expert as its own ``nn.Linear`` and build masks without reading position ids, so the
    stand-ins that patch those modules have nothing to patch there.
    """
    import importlib

    try:
        return importlib.import_module(f"transformers.{name}")
    except ImportError:
        return None


def balanced_topk(original: Any) -> Any:
    """``torch.topk`` whose indices, for a fake input, are a known balanced expert assignment.

    Before fused experts (transformers 4.x), an MoE block loops over its experts and picks each
    one's tokens with ``torch.where(expert_mask[e])``: an output whose size depends on the router's
    values, which fake tensors do not have (``DynamicOutputShapeException``). The router's
    ``torch.topk`` indices are therefore returned as a tensor of known values
    (:func:`~peftaudit.memory.tracing.standins.known_values`): token ``t``'s ``j``-th choice is
    expert ``(t * k + j) mod E``, so every expert gets ``tokens * k / E`` tokens (the balance the
    router's auxiliary loss aims at, and what the fused kernels' memory does not depend on). The
    values (the routing weights) stay fake and keep their gradient. Installed only where the
    transformers release has no fused experts (``stand_ins``); other ``topk`` calls on real
    tensors, or along another dimension, are the original.
    """
    import torch
    from torch._subclasses.fake_tensor import FakeTensor

    from peftaudit.memory.tracing.standins import known_values

    def topk(input: Any, k: int, dim: int = -1, largest: bool = True, sorted: bool = True, **kwargs: Any) -> Any:
        out = original(input, k, dim=dim, largest=largest, sorted=sorted, **kwargs)
        if not isinstance(input, FakeTensor) or dim not in (-1, input.dim() - 1) or kwargs:
            return out
        experts = int(input.shape[-1])
        rows = int(input.numel() // experts) if experts else 0
        balanced = [[(t * k + j) % experts for j in range(k)] for t in range(rows)]
        indices = known_values(balanced).reshape(*input.shape[:-1], k)
        return torch.return_types.topk((out[0], indices))

    return topk


def attention_classes(model: Any, impl: str) -> int:
    """Give every attention module the class of attention implementation ``impl``; returns how many changed.

    Before the attention interface (transformers 4.48), a model picked its attention class when it
    was built (``LLAMA_ATTENTION_CLASSES[config._attn_implementation]``: ``LlamaAttention`` for
    eager, ``LlamaSdpaAttention`` for SDPA, ...), so setting ``config._attn_implementation``
    afterwards, as the trace does, changes nothing there. Those classes share their weights and
    ``__init__`` (the SDPA and flash classes subclass the eager one), so the module's class is
    switched in place. Releases with the attention interface (``ALL_ATTENTION_FUNCTIONS``, 4.48+)
    dispatch at each call: nothing is switched there (the few 5.x models that still keep such a
    table, SAM or data2vec-vision, are left as the current trace has them).
    """
    import sys

    import transformers.modeling_utils as modeling_utils

    if hasattr(modeling_utils, "ALL_ATTENTION_FUNCTIONS"):
        return 0
    changed = 0
    for module in model.modules():
        cls = type(module)
        defining = sys.modules.get(cls.__module__)
        for name, table in vars(defining).items() if defining is not None else ():
            if name.endswith("_ATTENTION_CLASSES") and isinstance(table, dict) and cls in table.values():
                target = table.get(impl)
                if target is not None and target is not cls:
                    module.__class__ = target
                    changed += 1
                break
    return changed
