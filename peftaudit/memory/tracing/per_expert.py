"""transformers 4.x's sparse MoE blocks under transformers 5: one ``nn.Linear`` per expert.

transformers 5 stores a MoE layer's experts as fused 3-D parameters (``experts.gate_up_proj``,
``experts.down_proj``) and its router as a ``*TopKRouter`` with a bare ``weight``; 4.x built
each expert as its own MLP of ``nn.Linear`` layers (Mixtral's ``w1``/``w3``/``w2``, Qwen-MoE's
``gate_proj``/``up_proj``/``down_proj``) and the router as an ``nn.Linear``, and looped over
the experts in Python. bitsandbytes quantizes and peft's ``all-linear`` adapts exactly those
``nn.Linear`` layers, so the 4.x step is another step. :func:`unfuse` rebuilds a transformers 5
model's MoE blocks that way, in place, so the fake-tensor trace runs the 4.x step under the
installed transformers (:mod:`peftaudit.memory.stack_rules`, rule ``moe-experts-per-expert``).
The names and split of the per-expert layers are the rule's (:class:`~peftaudit.memory.stack_rules.PerExpert`),
the same ones its inventory view uses.
"""

from __future__ import annotations

import copy
import functools
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from peftaudit.memory.stack_rules import PerExpert


def unfuse(model: Any, spec: PerExpert) -> int:
    """Give every fused MoE block of ``model`` 4.x's per-expert layers and forward; returns how many.

    A block is a module whose ``experts`` child holds fused ``gate_up_proj``/``down_proj``
    parameters and whose ``gate`` child is a router with a ``weight`` (experts, hidden): the
    layout of transformers 5's Mixtral, Qwen2-MoE and Qwen3-MoE blocks. The new layers are on the
    fused parameters' device and dtype (the trace builds on ``meta``); values are not copied.
    """
    import torch

    count = 0
    for block in [m for m in model.modules() if _is_fused_block(m)]:
        fused = block.experts
        router = block.gate
        experts, hidden = (int(d) for d in router.weight.shape)
        inter = int(fused.down_proj.shape[-1])
        like = {"device": fused.down_proj.device, "dtype": fused.down_proj.dtype}
        members = torch.nn.ModuleList()
        for _ in range(experts):
            mlp = _expert_class(spec.expert_class)()
            for leaf in spec.order:
                out_f, in_f = (hidden, inter) if leaf == spec.down else (inter, hidden)
                setattr(mlp, leaf, torch.nn.Linear(in_f, out_f, bias=False, **like))
            mlp.act_fn = copy.deepcopy(fused.act_fn)  # after the layers, as the 4.x __init__ orders them
            mlp._leaves = (spec.gate, spec.up, spec.down)
            members.append(mlp)
        gate = torch.nn.Linear(hidden, experts, bias=False, device=router.weight.device, dtype=router.weight.dtype)
        gate.weight.requires_grad_(router.weight.requires_grad)
        for p in (p for m in members for p in m.parameters()):
            p.requires_grad_(fused.down_proj.requires_grad)
        # The same attribute names, so the module order (and named_parameters) is 4.x's.
        block.gate = gate
        block.experts = members
        block.top_k = int(getattr(router, "top_k", 0) or getattr(block, "top_k", 0))
        block.num_experts = experts
        block.norm_topk_prob = bool(getattr(router, "norm_topk_prob", True)) if spec.norm_from_config else True
        block.jitter_noise = float(getattr(block, "jitter_noise", 0.0) or 0.0)
        block.__class__ = _per_expert_block(type(block))
        count += 1
    return count


def _is_fused_block(module: Any) -> bool:
    experts = getattr(module, "experts", None)
    router = getattr(module, "gate", None)
    return (
        experts is not None
        and router is not None
        and getattr(getattr(experts, "gate_up_proj", None), "dim", lambda: 0)() == 3
        and getattr(getattr(experts, "down_proj", None), "dim", lambda: 0)() == 3
        and getattr(getattr(router, "weight", None), "dim", lambda: 0)() == 2
    )


@functools.cache
def _expert_class(name: str) -> type:
    """One expert's MLP (``MixtralBlockSparseTop2MLP``, ``Qwen2MoeMLP``): ``down(act(gate(x)) * up(x))``."""
    import torch

    def forward(self: Any, hidden_states: Any) -> Any:
        gate, up, down = (getattr(self, leaf) for leaf in self._leaves)
        return down(self.act_fn(gate(hidden_states)) * up(hidden_states))

    return type(name, (torch.nn.Module,), {"forward": forward})


_BLOCKS: dict[type, type] = {}


def _per_expert_block(base: type) -> type:
    """``base`` (the transformers 5 block class, whose name the inventory keeps) with 4.x's forward."""
    if base not in _BLOCKS:
        _BLOCKS[base] = type(base.__name__, (base,), {"forward": _forward_4x, "__module__": base.__module__})
    return _BLOCKS[base]


def _forward_4x(self: Any, hidden_states: Any) -> Any:
    """``MixtralSparseMoeBlock.forward`` / ``Qwen2MoeSparseMoeBlock.forward`` of transformers 4.44-4.57.

    Line by line as at the tags (``src/transformers/models/mixtral/modeling_mixtral.py``), less
    the router logits the decoder layer drops unless ``output_router_logits``. The router's
    ``topk`` is a known balanced routing on fake tensors (:func:`~peftaudit.memory.tracing.compat.balanced_topk`,
    the same as the old-stack traces), because each expert's share of tokens is read from its values.
    """
    import torch
    import torch.nn.functional as F

    from peftaudit.memory.tracing.compat import balanced_topk

    batch_size, sequence_length, hidden_dim = hidden_states.shape
    if self.training and self.jitter_noise > 0:
        hidden_states *= torch.empty_like(hidden_states).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
    hidden_states = hidden_states.view(-1, hidden_dim)
    router_logits = self.gate(hidden_states)
    routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
    routing_weights, selected_experts = balanced_topk(torch.topk)(routing_weights, self.top_k, dim=-1)
    if self.norm_topk_prob:
        routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
    routing_weights = routing_weights.to(hidden_states.dtype)
    final_hidden_states = torch.zeros(
        (batch_size * sequence_length, hidden_dim), dtype=hidden_states.dtype, device=hidden_states.device
    )
    expert_mask = torch.nn.functional.one_hot(selected_experts, num_classes=self.num_experts).permute(2, 1, 0)
    for expert_idx in range(self.num_experts):
        expert_layer = self.experts[expert_idx]
        idx, top_x = torch.where(expert_mask[expert_idx])
        current_state = hidden_states[None, top_x].reshape(-1, hidden_dim)
        current_hidden_states = expert_layer(current_state) * routing_weights[top_x, idx, None]
        final_hidden_states.index_add_(0, top_x, current_hidden_states.to(hidden_states.dtype))
    shared = getattr(self, "shared_expert", None)
    if shared is not None:  # Qwen2-MoE: after the routed experts, as 4.x runs it
        shared_expert_output = shared(hidden_states)
        shared_expert_output = F.sigmoid(self.shared_expert_gate(hidden_states)) * shared_expert_output
        final_hidden_states = final_hidden_states + shared_expert_output
    return final_hidden_states.reshape(batch_size, sequence_length, hidden_dim)
