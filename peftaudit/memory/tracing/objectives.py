"""One step of a TRL 1.16 objective under the trace: the trainer's own loss code on a stand-in ``self``.

``run_trace`` calls :func:`trl_step` when ``plan.objective`` is not ``sft``; the returned
:class:`TrlStep` is its ``loss_fn``. Each objective runs TRL's own method, unbound, on a
:class:`Stub` holding the attributes the method reads (TRL's config defaults), so the passes, the
reference model, the fused log-prob head and the loss are TRL's code (line numbers are trl 1.16.0):

* ``dpo``: ``DPOTrainer._compute_loss`` (dpo_trainer.py:1285) up to its first metric
  (``gather_for_metrics``, :1543; ``loss`` is complete at :1528).
* ``kto``: ``KTOTrainer._compute_loss`` (kto_trainer.py:1370) up to its first metric (:1484), then its
  last line ``losses.nanmean()`` (:1548).
* ``orpo``: ``ORPOTrainer.get_batch_loss_metrics`` (experimental/orpo/orpo_trainer.py:824), whole.
* ``simpo``: ``CPOTrainer.get_batch_loss_metrics`` (experimental/cpo/cpo_trainer.py:865) with
  ``loss_type="simpo"`` and ``cpo_alpha=0`` (the SimPO recipe), whole.
* ``reward``: ``RewardTrainer.compute_loss`` (reward_trainer.py:778), whole.
* ``grpo``: generation, then ``GRPOTrainer._compute_loss`` (grpo_trainer.py:3020) up to its first
  metric (:3268 with beta > 0, else :3270). Generation is a **re-statement**: ``model.generate``
  cannot run on fake tensors (its stop check reads values), so :func:`_decode` runs transformers
  5.25's ``_sample`` loop (generation/utils.py:3194-3300) for exactly ``completion_len`` tokens. The reference
  log-probs (``beta > 0``) and vLLM's recomputed old log-probs are TRL's own
  ``_get_per_token_logps_and_entropies`` (:1419), called as ``_generate_and_score_completions``
  calls it (:2633-2740).

Metrics need values (``.item()``, boolean indexing): where a method would compute them after its
loss is complete, the stub stops it and hands back the method's local ``loss``/``losses``
(:func:`_caller_local`, which fails with a clear error if TRL renamed them). The stand-ins for TRL's
CUDA kernels are in :mod:`peftaudit.memory.tracing.trl_standins`.

Phases and categories, for comparing with the analytic estimate:

* a model call under ``no_grad`` (a reference pass, KTO's KL pass, GRPO's log-prob passes) is the
  ``reference forward`` phase; GRPO's decoding is ``generation``;
* in any pass, what runs after the backbone (the fused head, full logits, a score head, the loss) is
  ``logits_and_loss``; in the backward, from the loss until the gradient of the backbone's output is
  complete (the head's backward) likewise;
* the reference copy of the model (full fine-tuning without ``precompute_ref``, GRPO with beta > 0) is
  ``reference_weights``: made in the policy's dtypes with the model's weights, before the first step; the KV
  cache of generation is ``kv_cache``.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import sys
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from peftaudit.errors import PeftauditError
from peftaudit.memory.plan import PlanError, TrainingPlan
from peftaudit.memory.tracing.trl_standins import MaskedRows, known_labels, trl_stand_ins

#: The TRL release whose trainer code the objective traces call (private names and local variables).
TRL_SERIES = (1, 16)
TRL_REQUIREMENT = "trl==1.16.*"

#: Per-token outputs each trainer asks of TRL's fused head (add_fused_lm_head calls).
_DPO_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")  # dpo_trainer.py:956-960
_KTO_OUTPUTS = ("log_probs", "entropy", "mean_logits")  # kto_trainer.py:967-970
_GRPO_OUTPUTS = ("log_probs", "entropy")  # grpo_trainer.py:1068-1073
#: TRL's config defaults where the plan leaves beta unset.
_DEFAULT_BETA = {"dpo": 0.1, "kto": 0.1, "orpo": 0.1, "simpo": 0.1, "grpo": 0.0}
#: The gradient-checkpointing kwargs of TRL's configs (use_reentrant False).
_CHECKPOINTING = {"use_reentrant": False}


class ObjectiveTraceError(PeftauditError):
    """TRL is missing, another release, or its trainer code no longer matches what the trace calls."""


def require_trl(objective: str) -> Any:
    """Import TRL for tracing ``objective``, or raise :class:`ObjectiveTraceError` in one line."""
    try:
        import trl
    except ImportError as exc:
        raise ObjectiveTraceError(
            f"tracing the {objective} objective runs TRL's own trainer code; TRL is not importable ({exc}): "
            f"pip install {TRL_REQUIREMENT}"
        ) from None
    version = tuple(int(p) for p in trl.__version__.split(".")[:2] if p.isdigit())
    if version != TRL_SERIES:
        raise ObjectiveTraceError(
            f"the objective traces call trl {TRL_SERIES[0]}.{TRL_SERIES[1]}'s trainer code; trl {trl.__version__} "
            f"is installed: pip install {TRL_REQUIREMENT}"
        )
    return trl


class _MetricsReached(Exception):
    """Raised by a stub where the trainer's metrics begin: the loss is complete."""

    def __init__(self, value: Any) -> None:
        super().__init__()
        self.value = value


def _caller_local(method: str, name: str) -> Any:
    """The local ``name`` of the nearest frame running TRL's ``method`` (the trainer method a stub stopped)."""
    frame = sys._getframe(2)
    try:
        while frame is not None and frame.f_code.co_name != method.rpartition(".")[2]:
            frame = frame.f_back  # type: ignore[assignment]
        if frame is None or name not in frame.f_locals:
            import trl

            raise ObjectiveTraceError(
                f"trl {trl.__version__}'s {method} has no local {name!r} where its metrics begin; the objective "
                f"trace reads it there (trl 1.16's code): pip install {TRL_REQUIREMENT}"
            )
        return frame.f_locals[name]
    finally:
        del frame


def stop_at_metrics(method: str, name: str) -> Callable[..., Any]:
    """A stub member that ends ``method`` where its metrics begin, handing back its local ``name``."""

    def stop(*_args: Any, **_kwargs: Any) -> Any:
        raise _MetricsReached(_caller_local(method, name))

    return stop


class _Sentinel:
    """A stub attribute (``_metrics``) whose first read ends the method, as :func:`stop_at_metrics`."""

    def __init__(self, method: str, name: str) -> None:
        self.method, self.name = method, name

    def __get__(self, obj: Any, owner: Any = None) -> Any:
        raise _MetricsReached(_caller_local(self.method, self.name))


def run_until_metrics(call: Callable[[], Any], method: str) -> Any:
    """Run ``call`` (a trainer method on a stub) and return what its stub handed back where metrics begin."""
    try:
        call()
    except _MetricsReached as reached:
        return reached.value
    raise ObjectiveTraceError(
        f"{method} returned without reaching its metrics, where the objective trace takes its loss: "
        f"pip install {TRL_REQUIREMENT}"
    )


class Dummy:
    """A gathered metric (``gather_for_metrics``/``gather``): reductions and ``.item()`` on it cost nothing."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: 0.0 if name == "item" else self

    def __gt__(self, other: Any) -> bool:
        return True

    def _same(self, other: Any) -> Dummy:
        return self

    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __truediv__ = __floordiv__ = _same


class Stub:
    """A stand-in ``self`` for a TRL trainer: the given attributes, and the trainer class's own methods
    bound to the stub (so ``self.concatenated_forward(...)`` inside a method runs TRL's method)."""

    def __init__(self, trainer: type, **attributes: Any) -> None:
        object.__setattr__(self, "_trainer", trainer)
        for key, value in attributes.items():
            object.__setattr__(self, key, value)

    def __getattr__(self, name: str) -> Any:
        trainer = object.__getattribute__(self, "_trainer")
        try:
            raw = inspect.getattr_static(trainer, name)
        except AttributeError:
            raise AttributeError(f"the {trainer.__name__} stub has no attribute {name!r}") from None
        if isinstance(raw, staticmethod):
            return raw.__func__
        if callable(raw):
            return types.MethodType(raw, self)
        raise AttributeError(f"the {trainer.__name__} stub has no attribute {name!r}")


def _stub_class(sentinel: _Sentinel | None) -> type[Stub]:
    """A :class:`Stub` subclass whose ``_metrics`` is ``sentinel`` (a descriptor needs a class)."""
    if sentinel is None:
        return Stub
    return type("MetricsStub", (Stub,), {"_metrics": sentinel})


def _accelerator(gather: Callable[..., Any]) -> Any:
    """What the trainers read of ``self.accelerator``: one process on the traced device."""
    import torch

    return types.SimpleNamespace(
        device=torch.device("cpu"),
        unwrap_model=lambda model: model,
        gather_for_metrics=gather,
        gather=gather,
        reduce=gather,
        autocast=contextlib.nullcontext,
        num_processes=1,
        is_main_process=True,
        sync_gradients=True,
    )


def reward_model(model: Any) -> Any:
    """``model`` as TRL's reward trainer loads it: its ``ForSequenceClassification`` class with one label
    and a pad token (reward_trainer.py:396-400, 571-572), on the meta device. A sequence classifier with one
    label is returned as it is."""
    import torch
    from transformers import AutoModelForSequenceClassification

    config = model.config
    if type(model).__name__.endswith("ForSequenceClassification") and getattr(config, "num_labels", 1) == 1:
        if config.get_text_config().pad_token_id is None:
            config.get_text_config().pad_token_id = 0
        return model
    config = copy.deepcopy(config)
    config.num_labels = 1
    if config.get_text_config().pad_token_id is None:
        # The classifier pools the last non-pad token; without a pad token it refuses batches above one.
        config.get_text_config().pad_token_id = 0
    try:
        with torch.device("meta"):
            return AutoModelForSequenceClassification.from_config(config)
    except ValueError:
        raise PlanError(
            f"the reward objective trains a sequence classifier; transformers has no ForSequenceClassification "
            f"class for {config.model_type}"
        ) from None


class TrlStep:
    """``run_trace``'s ``loss_fn`` for ``plan.objective``: builds the batch, runs TRL's loss, returns it.

    ``handles``: the forward hooks it put on the models (run_trace removes them);
    :meth:`traced`: entered by run_trace around the traced steps.
    """

    def __init__(self, model: Any, plan: TrainingPlan, tracker: Any, param_storages: set[int]) -> None:
        import torch

        require_trl(plan.objective)
        self.plan = plan
        self.tracker = tracker
        self.param_storages = param_storages
        self.policy = model
        self.is_peft = hasattr(model, "get_base_model") and hasattr(model, "peft_config")
        self.base = model.get_base_model() if self.is_peft else model
        self._torch = torch
        self.rows = MaskedRows()
        self.handles: list[Any] = []
        self.reference: Any = None
        self.beta = _DEFAULT_BETA.get(plan.objective, 0.1) if plan.beta is None else float(plan.beta)
        text_config = self.base.config.get_text_config()
        # The trainers' MoE auxiliary loss switch (dpo_trainer.py:896-905 and the same in kto, grpo).
        self.router_aux_loss_coef = float(getattr(text_config, "router_aux_loss_coef", 0.0) or 0.0)
        self.aux_loss_enabled = hasattr(text_config, "output_router_logits") and self.router_aux_loss_coef != 0.0
        self._watch(model, self.base, grad_outputs=True)
        builders = {
            "dpo": self._dpo,
            "kto": self._kto,
            "orpo": self._orpo,
            "simpo": self._simpo,
            "reward": self._reward,
            "grpo": self._grpo,
        }
        if plan.objective not in builders:
            raise PlanError(f"the trace has no {plan.objective} objective")
        self._loss: Callable[[Any], Any] = builders[plan.objective]()

    # --- run_trace's side --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def traced(self) -> Iterator[None]:
        """Entered by run_trace under the fake mode, before the steps: TRL's CUDA kernels as the trace runs
        them (:mod:`~peftaudit.memory.tracing.trl_standins`), and the reference copy's weights, made and
        counted with the model's (TRL loads it before training)."""
        with trl_stand_ins(self.rows):
            self._materialize_reference()
            yield

    def __call__(self, model: Any) -> Any:
        loss = self._loss(model)
        tracker = self.tracker
        if getattr(loss, "requires_grad", False):
            # The backward begins in the loss head (TRL's head backward): logits_and_loss until the
            # gradient of the backbone's output is complete (the hook _watch put on it).
            loss.register_hook(lambda grad: setattr(tracker, "category", "logits_and_loss"))
        return loss

    # --- phases and categories -----------------------------------------------------------------------------

    def _watch(self, top: Any, base: Any, *, grad_outputs: bool) -> None:
        """Tag the phases and categories of ``top``'s calls (see the module docstring)."""
        import torch

        tracker = self.tracker
        stack: list[str] = []
        backbone = getattr(base, "base_model", base)

        def enter(_module: Any, _args: Any) -> None:
            stack.append(tracker.phase)
            if tracker.phase != "generation" and not torch.is_grad_enabled():
                tracker.phase = "reference forward"
            tracker.category = "activations"

        def leave(_module: Any, _args: Any, _output: Any) -> None:
            if stack:
                tracker.phase = stack.pop()
            tracker.category = "logits_and_loss"

        def backbone_in(_module: Any, _args: Any) -> None:
            tracker.category = "activations"

        def backbone_out(_module: Any, _args: Any, output: Any) -> None:
            tracker.category = "logits_and_loss"
            hidden = getattr(output, "last_hidden_state", None)
            if hidden is None and isinstance(output, tuple) and output:
                hidden = output[0]
            if grad_outputs and isinstance(hidden, torch.Tensor) and hidden.requires_grad:
                hidden.register_hook(lambda grad: setattr(tracker, "category", "temporaries"))

        self.handles += [
            top.register_forward_pre_hook(enter),
            top.register_forward_hook(leave, always_call=True),
        ]
        if backbone is not top:
            self.handles += [
                backbone.register_forward_pre_hook(backbone_in),
                backbone.register_forward_hook(backbone_out, always_call=True),
            ]

    @contextlib.contextmanager
    def _phase(self, name: str) -> Iterator[None]:
        tracker = self.tracker
        previous = tracker.phase
        tracker.phase = name
        try:
            yield
        finally:
            tracker.phase = previous

    # --- the reference model -------------------------------------------------------------------------------

    def _needs_reference_copy(self) -> bool:
        """TRL builds a second model when the policy is not a PeftModel (dpo_trainer.py:907-927,
        kto_trainer.py, grpo_trainer.py:982-1003) and the step needs reference log-probs."""
        plan = self.plan
        if self.is_peft:
            return False
        if plan.objective in ("dpo", "kto"):
            return not plan.precompute_ref
        return plan.objective == "grpo" and self.beta != 0.0

    def _reference_skeleton(self) -> Any:
        """A second skeleton of the policy's class and config on the meta device (TRL's
        ``create_model_from_path(..., dtype=policy dtype, attn_implementation=policy's)``), frozen, in eval
        mode, with TRL's fused head (default outputs, dpo_trainer.py:961-962)."""
        import torch
        from trl.trainer.utils import add_fused_lm_head

        base = self.base
        config = copy.deepcopy(base.config)
        with torch.device("meta"):
            reference = type(base)(config)
        implementation = base.config._attn_implementation
        for module in reference.modules():
            sub = getattr(module, "config", None)
            if sub is not None:
                sub._attn_implementation = implementation
        reference.requires_grad_(False)
        reference.eval()
        add_fused_lm_head(reference)
        self._watch(reference, reference, grad_outputs=False)
        return reference

    def _materialize_reference(self) -> None:
        """Fake storages for the reference copy, in the policy's dtypes (the names it shares with the
        policy), counted as ``reference_weights``. Runs under the trace's fake mode."""
        if self.reference is None:
            return
        import torch

        dtypes = {name: p.dtype for name, p in self.base.named_parameters()}
        memo: dict[int, Any] = {}
        made: list[Any] = []
        for path, module in self.reference.named_modules():
            prefix = f"{path}." if path else ""
            for name, p in list(module._parameters.items()):
                if p is None:
                    continue
                if id(p) not in memo:  # a tied weight is one tensor
                    dtype = dtypes.get(prefix + name, p.dtype) if p.is_floating_point() else p.dtype
                    memo[id(p)] = torch.nn.Parameter(torch.empty(p.shape, dtype=dtype), requires_grad=False)
                    made.append(memo[id(p)])
                module._parameters[name] = memo[id(p)]
            for name, b in list(module._buffers.items()):
                if b is not None:
                    module._buffers[name] = torch.empty(b.shape, dtype=b.dtype)
                    made.append(module._buffers[name])
        for tensor in made:
            # Their autocast casts are weight copies, as the policy's are.
            self.param_storages.add(id(tensor.untyped_storage()))
            self.tracker.track(tensor.untyped_storage(), "reference_weights")

    def _prepare_reference(self) -> None:
        if self._needs_reference_copy():
            self.reference = self._reference_skeleton()

    # --- stubs --------------------------------------------------------------------------------------------

    def _stub(self, trainer: type, *, gather: Callable[..., Any], sentinel: _Sentinel | None = None, **kw: Any) -> Any:
        attributes: dict[str, Any] = {
            "model": self.policy,
            "accelerator": _accelerator(gather),
            "aux_loss_enabled": self.aux_loss_enabled,
            "router_aux_loss_coef": self.router_aux_loss_coef,
        }
        return _stub_class(sentinel)(trainer, **{**attributes, **kw})

    def _fused_head(self, outputs: tuple[str, ...]) -> None:
        # The trainers patch the policy after PEFT wraps it, on the inner transformers model (dpo_trainer.py:960).
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(self.base, outputs=outputs)

    def _tokens(self, rows: int, length: int | None = None) -> Any:
        torch = self._torch
        return torch.zeros(rows, length or self.plan.seq_len, dtype=torch.long)

    # --- objectives ---------------------------------------------------------------------------------------

    def _dpo(self) -> Callable[[Any], Any]:
        from trl.trainer.dpo_trainer import DPOTrainer

        method = "DPOTrainer._compute_loss"
        self._fused_head(_DPO_OUTPUTS)
        self._prepare_reference()
        plan = self.plan
        stub = self._stub(
            DPOTrainer,
            gather=stop_at_metrics(method, "loss"),  # dpo_trainer.py:1543: `loss` is complete (:1528)
            sentinel=_Sentinel(method, "loss"),  # :1533, the MoE aux loss metric, after `loss` too
            ld_alpha=None,
            precompute_ref_logps=plan.precompute_ref,
            args=types.SimpleNamespace(gradient_checkpointing_kwargs=_CHECKPOINTING),
            ref_model=self.reference,
            f_divergence_type="reverse_kl",
            f_alpha_divergence_coef=1.0,
            loss_types=["sigmoid"],  # dpo_config.py: loss_type default
            loss_weights=[1.0],
            beta=self.beta,
            label_smoothing=0.0,
            use_weighting=False,
        )

        def loss(model: Any) -> Any:
            torch = self._torch
            rows = 2 * plan.batch_size  # the collator stacks chosen then rejected
            ids = self._tokens(rows)
            inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": torch.ones_like(ids)}
            if plan.precompute_ref:
                inputs["ref_chosen_logps"] = torch.zeros(plan.batch_size)
                inputs["ref_rejected_logps"] = torch.zeros(plan.batch_size)
            return run_until_metrics(lambda: DPOTrainer._compute_loss(stub, model, inputs, False), method)

        return loss

    def _kto(self) -> Callable[[Any], Any]:
        from trl.trainer.kto_trainer import KTOTrainer

        method = "KTOTrainer._compute_loss"
        self._fused_head(_KTO_OUTPUTS)
        self._prepare_reference()
        plan = self.plan
        stub = self._stub(
            KTOTrainer,
            # The KL term is gathered before the loss (kto_trainer.py:1444): the identity for one process.
            gather=lambda tensor: tensor,
            sentinel=_Sentinel(method, "losses"),  # :1484, the first metric; `losses` is complete (:1478)
            calculate_KL=True,  # loss_type "kto" (:836)
            precompute_ref_logps=plan.precompute_ref,
            args=types.SimpleNamespace(gradient_checkpointing_kwargs=_CHECKPOINTING),
            ref_model=self.reference,
            loss_type="kto",
            beta=self.beta,
            desirable_weight=1.0,
            undesirable_weight=1.0,
        )

        def loss(model: Any) -> Any:
            torch = self._torch
            b = plan.batch_size
            ids = self._tokens(b)
            inputs = {
                "input_ids": ids,
                "attention_mask": torch.ones_like(ids),
                "completion_mask": torch.ones_like(ids),
                # the mismatched completions of the KL term (kto_trainer.py:1337-1368)
                "KL_input_ids": self._tokens(b),
                "KL_attention_mask": torch.ones_like(ids),
                "KL_completion_mask": torch.ones_like(ids),
                "label": torch.tensor([i % 2 == 0 for i in range(b)]),
            }
            if plan.precompute_ref:
                inputs["ref_logps"] = torch.zeros(b)
                inputs["ref_KL_logps"] = torch.zeros(b)
            with known_labels(chosen=(b + 1) // 2, total=b):
                losses = run_until_metrics(lambda: KTOTrainer._compute_loss(stub, model, inputs, False), method)
            return losses.nanmean()  # kto_trainer.py:1548

        return loss

    def _pairs_batch(self) -> dict[str, Any]:
        """ORPO/CPO's batch: chosen and rejected ids, masks and labels (concatenated by the trainer)."""
        torch = self._torch
        batch: dict[str, Any] = {}
        for side in ("chosen", "rejected"):
            ids = self._tokens(self.plan.batch_size)
            batch[f"{side}_input_ids"] = ids
            batch[f"{side}_attention_mask"] = torch.ones_like(ids)
            batch[f"{side}_labels"] = self._tokens(self.plan.batch_size)
        return batch

    def _orpo(self) -> Callable[[Any], Any]:
        from trl.experimental.orpo import ORPOTrainer

        stub = self._stub(
            ORPOTrainer,
            gather=lambda *args, **kwargs: Dummy(),
            is_encoder_decoder=False,
            padding_value=0,
            beta=self.beta,
            # orpo_trainer.py:348-349
            aux_loss_enabled=bool(getattr(self.base.config, "output_router_logits", False)),
            aux_loss_coef=float(getattr(self.base.config, "router_aux_loss_coef", 0.0) or 0.0),
        )

        def loss(model: Any) -> Any:
            value, _metrics = stub.get_batch_loss_metrics(model, self._pairs_batch(), train_eval="train")
            return value

        return loss

    def _simpo(self) -> Callable[[Any], Any]:
        from trl.experimental.cpo import CPOTrainer

        # cpo_config.py: SimPO is loss_type "simpo" with cpo_alpha 0 (no NLL term); simpo_gamma 0.5.
        stub = self._stub(
            CPOTrainer,
            gather=lambda *args, **kwargs: Dummy(),
            is_encoder_decoder=False,
            pad_token_id=0,
            beta=self.beta,
            cpo_alpha=0.0,
            loss_type="simpo",
            simpo_gamma=0.5,
            label_smoothing=0.0,
            alpha=0.0,
            # cpo_trainer.py:357-358
            aux_loss_enabled=bool(getattr(self.base.config, "output_router_logits", False)),
            aux_loss_coef=float(getattr(self.base.config, "router_aux_loss_coef", 0.0) or 0.0),
        )

        def loss(model: Any) -> Any:
            value, _metrics = stub.get_batch_loss_metrics(model, self._pairs_batch(), train_eval="train")
            return value

        return loss

    def _reward(self) -> Callable[[Any], Any]:
        import collections

        from trl.trainer.reward_trainer import RewardTrainer

        stub = self._stub(
            RewardTrainer,
            gather=lambda *args, **kwargs: Dummy(),
            args=types.SimpleNamespace(center_rewards_coefficient=None),
            _total_train_tokens=0,
            _tp_size=1,
            _metrics={"train": collections.defaultdict(list), "eval": collections.defaultdict(list)},
        )

        def loss(model: Any) -> Any:
            torch = self._torch
            ids = self._tokens(2 * self.plan.batch_size)  # chosen then rejected
            inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            return RewardTrainer.compute_loss(stub, model, inputs)

        return loss

    def _grpo(self) -> Callable[[Any], Any]:
        from trl.trainer import grpo_trainer
        from trl.trainer.grpo_trainer import GRPOTrainer

        method = "GRPOTrainer._compute_loss"
        plan = self.plan
        self._fused_head(_GRPO_OUTPUTS)
        self._prepare_reference()
        completion = plan.completion_len
        prompt = plan.seq_len - completion
        rows = plan.batch_size * plan.generations  # TRL's per_device_train_batch_size counts completions
        accumulation = plan.gradient_accumulation
        generation_rows = rows * accumulation  # steps_per_generation defaults to gradient accumulation
        use_vllm = plan.generation != "transformers"
        # The head scores completion tokens only: labels[:, :-logits_to_keep] = -100 (grpo_trainer.py:1493-1498).
        self.rows.per_row = completion
        stub = self._stub(
            GRPOTrainer,
            gather=lambda tensor, *args, **kwargs: tensor,
            sentinel=_Sentinel(method, "loss"),  # :3268 (beta > 0) or :3270, the first metric
            ref_model=self.reference,
            top_entropy_quantile=1.0,
            off_policy_mask_threshold=None,
            importance_sampling_level="token",
            beta=self.beta,
            loss_type="dapo",  # grpo_config.py:801
            epsilon_low=0.2,
            epsilon_high=0.2,
            use_vllm=use_vllm,
            vllm_importance_sampling_correction=True,  # grpo_config.py:925
            current_gradient_accumulation_steps=accumulation,
            _entropy_bonus_enabled=False,
            max_completion_length=completion,
            args=types.SimpleNamespace(
                delta=None,
                steps_per_generation=accumulation,
                use_bias_correction_kl=False,
                gradient_checkpointing_kwargs=_CHECKPOINTING,
                max_completion_length=completion,
            ),
        )
        state: dict[str, Any] = {"calls": 0, "batch": None}

        def generate_and_score(model: Any) -> dict[str, Any]:
            """The memory of ``_generate_and_score_completions`` (grpo_trainer.py:2324): the completions of
            the whole generation batch, then TRL's no-grad log-prob passes over it in chunks of the training
            batch (:2633-2740)."""
            torch = self._torch
            prompt_ids = self._tokens(generation_rows, prompt)
            if use_vllm:
                completion_ids = self._tokens(generation_rows, completion)  # vLLM generates elsewhere
            else:
                # unwrap_model_for_generation disables checkpointing; generate runs under no_grad (:1862-1876).
                with (
                    self._phase("generation"),
                    torch.no_grad(),
                    grpo_trainer.disable_gradient_checkpointing(model, _CHECKPOINTING),
                ):
                    completion_ids = _decode(self, model, prompt_ids, completion)
            batch: dict[str, Any] = {"prompt_ids": prompt_ids, "completion_ids": completion_ids}
            for tokens in batch.values():  # the batch's token ids, as an sft step's inputs are counted
                self.tracker.retag(tokens.untyped_storage(), "activations")
            ids = torch.cat([prompt_ids, completion_ids], dim=1)
            mask = torch.ones_like(ids)

            def logps(scorer: Any) -> Any:
                found, _entropies, _aux = stub._get_per_token_logps_and_entropies(
                    scorer, ids, mask, completion, batch_size=rows
                )
                return found

            with torch.no_grad(), grpo_trainer.disable_gradient_checkpointing(model, _CHECKPOINTING):
                if use_vllm:  # importance sampling against vLLM's log-probs (:2642-2660)
                    batch["old_per_token_logps"] = logps(model)
                    batch["importance_sampling_ratio"] = torch.exp(batch["old_per_token_logps"])
                if self.beta != 0.0:
                    if self.reference is not None:
                        batch["ref_per_token_logps"] = logps(self.reference)
                    else:
                        with grpo_trainer.use_adapter(model, adapter_name=None):
                            batch["ref_per_token_logps"] = logps(model)
            return batch

        def loss(model: Any) -> Any:
            torch = self._torch
            micro = state["calls"] % accumulation
            state["calls"] += 1
            if micro == 0:  # a new generation batch every steps_per_generation micro-batches (:1522-1546)
                state["batch"] = generate_and_score(model)
                self.tracker.category = "activations"  # the step's inputs (token ids the embedding keeps)
            batch = state["batch"]
            part = slice(micro * rows, (micro + 1) * rows)
            prompt_ids, completion_ids = batch["prompt_ids"][part], batch["completion_ids"][part]
            inputs = {
                "prompt_ids": prompt_ids,
                "prompt_mask": torch.ones_like(prompt_ids),
                "completion_ids": completion_ids,
                "completion_mask": torch.ones_like(completion_ids),
                "advantages": torch.zeros(rows),
                "num_items_in_batch": torch.tensor(float(generation_rows * completion)),
            }
            for key in ("old_per_token_logps", "importance_sampling_ratio", "ref_per_token_logps"):
                if key in batch:
                    inputs[key] = batch[key][part]
            return run_until_metrics(lambda: GRPOTrainer._compute_loss(stub, model, inputs), method)

        return loss


def _decode(step: TrlStep, model: Any, prompt_ids: Any, completion: int) -> Any:
    """transformers 5.25's ``_sample`` (generation/utils.py:3194-3300) for exactly ``completion`` new tokens
    (no EOS: the longest completions), returning them.

    The prefill runs the prompts with ``logits_to_keep=1`` (:2955-2959); each step copies the last
    logits to fp32 (:3251), samples (softmax, multinomial, :3278-3280), appends the token (:3289), drops
    the model output and runs the token through the model with the cache; the last sampled token is
    never run. The previous step's fp32 logits and probabilities stay alive through the next forward,
    as the loop's variables do.
    """
    import torch

    cache = _tracked_cache(step)
    ids = prompt_ids
    attention = torch.ones_like(ids)

    cached = {"cache": cache, "use_cache": True, "logits_to_keep": 1}
    outputs = model(input_ids=ids, attention_mask=attention, **cached)  # the prefill
    for index in range(completion):
        logits = outputs.logits[:, -1].to(copy=True, dtype=torch.float32)
        probs = torch.nn.functional.softmax(logits, dim=-1)  # temperature 1: no logits processor
        tokens = torch.multinomial(probs, num_samples=1).squeeze(1)
        ids = torch.cat([ids, tokens[:, None]], dim=-1)
        outputs = None  # `del outputs` (:3300): the step's model output goes before the next forward
        if index < completion - 1:
            attention = torch.cat([attention, attention.new_ones((attention.shape[0], 1))], dim=-1)
            outputs = model(input_ids=tokens[:, None], attention_mask=attention, **cached)
    # The tracked update refers to the cache: break the cycle so the cache goes now, as generate's does.
    del cache.update
    del cache, cached
    return ids[:, prompt_ids.shape[1] :]


def _tracked_cache(step: TrlStep) -> Any:
    """transformers' ``DynamicCache`` of the policy's config, its keys and values counted as ``kv_cache``
    (each update concatenates the new token's keys, then values, onto a layer's: cache_utils.py:136-137)."""
    from transformers import DynamicCache

    tracker = step.tracker
    cache = DynamicCache(config=step.base.config)
    update = cache.update

    def tracked_update(key_states: Any, value_states: Any, layer_idx: int, *args: Any, **kwargs: Any) -> Any:
        previous = tracker.category
        tracker.category = "kv_cache"
        try:
            out = update(key_states, value_states, layer_idx, *args, **kwargs)
        finally:
            tracker.category = previous
        layer = cache.layers[layer_idx]
        for kept in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if kept is not None:
                tracker.retag(kept.untyped_storage(), "kv_cache")
        return out

    cache.update = tracked_update  # type: ignore[method-assign]
    return cache


@dataclass(frozen=True)
class PhasePeak:
    """The most bytes alive during one phase, and by component at that moment."""

    bytes: int
    components: dict[str, int]


@dataclass(frozen=True)
class HeadCall:
    """One call of TRL's fused log-prob head (``ChunkedLogProbFunction``): its forward or backward."""

    kind: str
    """``forward`` or ``backward``."""
    phase: str
    tokens: int
    """Scored tokens (N, the rows of ``hidden``)."""
    entry: int
    """Bytes alive when it began."""
    transient: int
    """The most bytes it held above ``entry`` while it ran."""


@dataclass(frozen=True)
class TracedPhases:
    """A traced step in detail, for comparing with the analytic estimate phase by phase."""

    peak: int
    peak_phase: str
    components: dict[str, int]
    """By component at the peak."""
    phases: dict[str, PhasePeak]
    category_peaks: dict[str, int]
    """The most each component held at any moment (not at the same moment)."""
    heads: tuple[HeadCall, ...]
    trainable_params: int


def traced_phases(model: Any, plan: TrainingPlan, *, steps: int = 1) -> TracedPhases:
    """Trace ``steps`` steps of ``plan`` on ``model`` (a fresh meta skeleton) and return, per phase, the peak
    and the components at it, the most each component held, and every call of TRL's fused head.

    A development and test aid: the run is :func:`~peftaudit.memory.tracing.run.run_trace`'s with a
    tracker that also keeps these (its class is swapped for the call).
    """
    from peftaudit.memory.tracing import run as run_module

    detail = _detail_tracker_class()
    trackers: list[Any] = []

    def make(*args: Any, **kwargs: Any) -> Any:
        tracker = detail(*args, **kwargs)
        trackers.append(tracker)
        return tracker

    saved = run_module.Tracker
    run_module.Tracker = make  # type: ignore[assignment,misc]
    try:
        with _watched_head(trackers):
            result = run_module.run_trace(model, plan, steps=steps)
    finally:
        run_module.Tracker = saved  # type: ignore[misc]
    tracker = trackers[-1]
    return TracedPhases(
        peak=result.peak_bytes,
        peak_phase=result.peak_phase,
        components={k: v for k, v in result.components.items() if v},
        phases={
            name: PhasePeak(peak, {k: v for k, v in tracker.phase_cats.get(name, {}).items() if v > 0})
            for name, peak in result.phase_peaks.items()
        },
        category_peaks={k: v for k, v in tracker.category_max.items() if v > 0},
        heads=tuple(tracker.heads),
        trainable_params=result.trainable_params,
    )


def _detail_tracker_class() -> type:
    from peftaudit.memory.tracing.tracker import Tracker

    class DetailTracker(Tracker):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.phase_cats: dict[str, dict[str, int]] = {}
            self.category_max: dict[str, int] = {}
            self.heads: list[HeadCall] = []
            self.window_max: int | None = None

        def track(
            self, storage: Any, category: str | None = None, layer: int | None = None, *, peak: bool = True
        ) -> None:
            before = self.phase_peaks.get(self.phase, 0)
            super().track(storage, category, layer, peak=peak)
            if not peak:
                return
            if self.phase_peaks.get(self.phase, 0) > before:
                self.phase_cats[self.phase] = dict(self.by_cat)
            cat = category or self.category
            self.category_max[cat] = max(self.category_max.get(cat, 0), self.by_cat[cat])
            if self.window_max is not None:
                self.window_max = max(self.window_max, self.current)

        def retag(self, storage: Any, category: str) -> None:
            super().retag(storage, category)
            self.category_max[category] = max(self.category_max.get(category, 0), self.by_cat[category])

    return DetailTracker


@contextlib.contextmanager
def _watched_head(trackers: list[Any]) -> Iterator[None]:
    """Record every forward and backward of TRL's fused head on the current detail tracker."""
    try:
        from trl.kernels import chunked_logprob as ck
    except ImportError:  # nothing to watch without TRL (an sft plan)
        yield
        return
    function = ck.ChunkedLogProbFunction
    forward, backward = function.forward, function.backward

    def window(kind: str, tokens: int, run: Callable[[], Any]) -> Any:
        tracker = trackers[-1]
        outer, entry = tracker.window_max, tracker.current
        tracker.window_max = entry
        try:
            return run()
        finally:
            tracker.heads.append(HeadCall(kind, tracker.phase, tokens, entry, tracker.window_max - entry))
            tracker.window_max = outer if outer is None else max(outer, tracker.window_max)

    def watched_forward(ctx: Any, hidden: Any, *args: Any, **kwargs: Any) -> Any:
        return window("forward", int(hidden.shape[0]), lambda: forward(ctx, hidden, *args, **kwargs))

    def watched_backward(ctx: Any, *grads: Any) -> Any:
        return window("backward", int(ctx.saved_tensors[0].shape[0]), lambda: backward(ctx, *grads))

    function.forward = staticmethod(watched_forward)  # type: ignore[method-assign]
    function.backward = staticmethod(watched_backward)  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        function.forward = staticmethod(forward)  # type: ignore[method-assign]
        function.backward = staticmethod(backward)  # type: ignore[method-assign]


def trl_step(model: Any, plan: TrainingPlan, tracker: Any, param_storages: set[int]) -> TrlStep:
    """The ``loss_fn`` of ``plan.objective`` for the prepared ``model`` (peft applied, storages fake).

    ``tracker`` is the trace's :class:`~peftaudit.memory.tracing.tracker.Tracker` (phases and categories
    are set on it); ``param_storages`` the storages whose casts count as weight copies (the reference
    copy's are added). A plan TRL cannot train (``TrainingPlan.validate``: ORPO/SimPO with virtual
    tokens, GRPO with prompt learning) is refused here too, where a caller traced it without validating.
    """
    plan.validate()
    return TrlStep(model, plan, tracker, param_storages)


__all__ = [
    "TRL_REQUIREMENT",
    "Dummy",
    "HeadCall",
    "ObjectiveTraceError",
    "PhasePeak",
    "Stub",
    "TracedPhases",
    "TrlStep",
    "require_trl",
    "reward_model",
    "run_until_metrics",
    "stop_at_metrics",
    "traced_phases",
    "trl_step",
]
