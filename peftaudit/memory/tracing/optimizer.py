"""The plan's optimizer, with a step that runs under fake tensors."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from peftaudit.memory.plan import PlanError, TrainingPlan


def optimizer_for(plan: TrainingPlan, params: list[Any], model: Any = None) -> tuple[Any, Callable[[], None]]:
    """The plan's optimizer and a step function that runs under fake tensors.

    ``model``: the traced model, which GaLore's setup reads (it picks its targets by module name).
    """
    import torch

    from peftaudit.memory.galore import GALORE_METHOD_NAMES

    if plan.method in GALORE_METHOD_NAMES:
        return _galore_optimizer(plan, model)

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


class _GaloreStates:
    """GaLore's optimizers as the trace reads them after a step: each parameter's state tensors, its
    projector matrices (kept on a ``GaLoreProjector`` object, not a tensor of the state) among them."""

    def __init__(self, optimizers: list[Any]) -> None:
        self._optimizers = optimizers

    @property
    def state(self) -> dict[Any, dict[str, Any]]:
        import torch

        out: dict[Any, dict[str, Any]] = {}
        for opt in self._optimizers:
            for p, state in opt.state.items():
                tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
                projector = state.get("projector")
                matrix = getattr(projector, "ortho_matrix", None)
                for i, m in enumerate(matrix if isinstance(matrix, list) else [matrix]):
                    if isinstance(m, torch.Tensor):
                        tensors[f"projector{i}"] = m
                out[p] = tensors
        return out

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self._optimizers:
            opt.zero_grad(set_to_none=set_to_none)


def _galore_optimizer(plan: TrainingPlan, model: Any) -> tuple[Any, Callable[[], None]]:
    """GaLore as transformers builds it for ``optim="galore_adamw"`` (``_layerwise``): its own
    ``_get_galore_optimizer`` (param groups by ``optim_target_modules``; layer-wise, one optimizer per
    parameter stepped in a post-accumulate-grad hook it registers on the model), galore-torch's AdamW.

    ``update_proj_gap`` is 1 here: every traced step recomputes the projection (the SVD), as steps 0,
    200, 400, ... of a real run do, the later ones with every state already allocated.
    """
    from types import SimpleNamespace

    try:
        from transformers.trainer_optimizer import OptimizerContext, _get_galore_optimizer
        from transformers.training_args import OptimizerNames, ParallelMode
    except ImportError as exc:  # pragma: no cover - transformers before its trainer_optimizer module
        raise PlanError(f"tracing GaLore needs transformers >= 5 ({exc})") from None
    if model is None:
        raise PlanError("tracing GaLore needs the model (its targets are chosen by module name)")
    layerwise = plan.method == "galore-layerwise"
    targets = plan.galore_targets
    args = SimpleNamespace(
        optim=OptimizerNames("galore_adamw_layerwise" if layerwise else "galore_adamw"),
        optim_target_modules=list(targets) if isinstance(targets, tuple) else targets,
        parallel_mode=ParallelMode.NOT_DISTRIBUTED,
        gradient_accumulation_steps=plan.gradient_accumulation,
    )
    ctx = OptimizerContext(
        args=args,  # type: ignore[arg-type]
        model=model,
        optimizer_kwargs={"lr": 1e-4},
        adam_kwargs={},
        optim_args={"rank": str(plan.galore_rank), "update_proj_gap": "1", "proj_type": plan.galore_proj},
    )
    try:
        cls, kwargs = _get_galore_optimizer(ctx)
    except (ImportError, ValueError) as exc:
        raise PlanError(f"GaLore: {exc}") from None
    opt = cls(**kwargs)
    if layerwise:
        # LayerWiseDummyOptimizer: step() and zero_grad() do nothing, the hooks do both.
        return _GaloreStates(list(opt.optimizer_dict.values())), lambda: None
    return _GaloreStates([opt]), opt.step
