"""The plan's optimizer, with a step that runs under fake tensors."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from peftaudit.memory.plan import PlanError, TrainingPlan


def optimizer_for(plan: TrainingPlan, params: list[Any]) -> tuple[Any, Callable[[], None]]:
    """The plan's optimizer and a step function that runs under fake tensors."""
    import torch

    name = plan.optimizer
    impl: dict[str, Any] = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}[
        plan.optimizer_impl
    ]
    if name == "adamw":
        opt: Any = torch.optim.AdamW(params, lr=1e-4, **impl)
    elif name in ("sgd", "sgd_momentum"):
        momentum = 0.9 if name == "sgd_momentum" else 0.0
        extra = impl if name == "sgd_momentum" else {}
        opt = torch.optim.SGD(params, lr=1e-3, momentum=momentum, **extra)
    elif name == "adafactor":
        from transformers.optimization import Adafactor

        opt = Adafactor(params, lr=1e-3, relative_step=False, scale_parameter=False, warmup_init=False)
    else:
        return _bnb_optimizer(name, params)
    return opt, opt.step


def _bnb_optimizer(name: str, params: list[Any]) -> tuple[Any, Callable[[], None]]:
    try:
        import bitsandbytes as bnb
    except ImportError as exc:  # pragma: no cover
        raise PlanError(f"tracing {name} needs bitsandbytes") from exc
    cls = {
        "adamw_8bit": bnb.optim.AdamW8bit,
        "paged_adamw": bnb.optim.PagedAdamW32bit,
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
        "lion": bnb.optim.Lion32bit,
        "lion_8bit": bnb.optim.Lion8bit,
    }[name]
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    # The constructor computes the 8-bit quantization maps from values: real (tiny) tensors.
    with unset_fake_temporarily():
        opt = cls(params, lr=1e-4)

    def step() -> None:
        # bitsandbytes' own init_state allocates the states; the CUDA update kernel cannot run.
        for gindex, group in enumerate(opt.param_groups):
            for pindex, p in enumerate(group["params"]):
                if p.grad is not None and len(opt.state[p]) == 0:
                    opt.init_state(group, p, gindex, pindex)

    return opt, step
