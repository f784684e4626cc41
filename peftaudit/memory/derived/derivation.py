"""Deriving a model's step profile from traces of a depth-reduced copy.

:func:`derive` rebuilds the model from its config on the meta device, keeps
only the layers :class:`~peftaudit.memory.derived.kinds.Stack` says are needed
(the first of each stack and one later layer of each kind), traces one
training step of that copy at three batch and sequence sizes
(:data:`~peftaudit.memory.derived.fit.POINTS`) with the real transformers,
peft and torch on fake tensors, fits every allocation's size
(:mod:`~peftaudit.memory.derived.fit`) and replays the kept layers to the
model's full depth. The result is the same
:class:`~peftaudit.memory.analytic.step.StepProfile` a hand-written layer
program records, so every estimate after it is arithmetic.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from peftaudit.inventory import Inventory
from peftaudit.memory.analytic.step import Segment, StepProfile
from peftaudit.memory.analytic.tape import GRAD, TEMP
from peftaudit.memory.derived.fit import POINTS, Cut, DerivationError, Fitted, Row, cut, fit
from peftaudit.memory.derived.kinds import LAYER_INDEX_LISTS, Stack, stacks
from peftaudit.memory.derived.windows import base_length
from peftaudit.memory.images import image_tokens_of, is_vision_model
from peftaudit.memory.methods import Adaptation
from peftaudit.memory.plan import TrainingPlan
from peftaudit.memory.reached import dropped_feature_layers

if TYPE_CHECKING:  # pragma: no cover
    from peftaudit.progress import Progress


@dataclass(frozen=True)
class Derived:
    """A step profile derived from a trace, and how it was made."""

    profile: StepProfile
    kept: dict[str, tuple[int, ...]]
    """Stack path -> the layers the traced copy kept."""
    attention: str
    """The attention implementation traced (``eager`` where the model refuses SDPA)."""
    inexact_bytes: float = 0.0


def derive(
    inventory: Inventory,
    plan: TrainingPlan,
    adaptation: Adaptation,
    plan_fields: Mapping[str, Any],
    rules: tuple[str, ...] = (),
) -> Derived:
    """The step profile of ``inventory``'s model under ``plan``, from traces (module docstring).

    ``plan_fields``: the plan fields that change the step (batch size, sequence length and
    scale-out do not), which key the profile in the on-disk store
    (:mod:`~peftaudit.memory.derived.store`). Raises :class:`DerivationError` with a one-line
    reason when the model cannot be rebuilt or traced (remote code not trusted, an
    operation fake tensors cannot run). ``rules``: the plan's stack rules
    (:mod:`~peftaudit.memory.stack_rules`); ``inventory`` is then their view of the model, and
    the traced copy is rebuilt the same way.

    Deriving takes seconds (reading a stored profile does not): its progress goes to the command
    line's progress bar when one is shown (:func:`peftaudit.progress.task`; a library call shows nothing).
    """
    from peftaudit import progress
    from peftaudit.memory.derived import store
    from peftaudit.memory.stack_rules import traced

    if not inventory.config:
        raise DerivationError("the model has no config to rebuild it from")
    rules = traced(rules)  # rules that only add buffers share the profile
    key = store.key_for(inventory.config, plan_fields, rules)
    stored = store.load(key) if key is not None else None
    if stored is not None:
        return stored
    with progress.task(f"deriving the step profile of {inventory.architecture}") as report:
        derived = _derive(inventory, plan, adaptation, rules, report)
    if key is not None:
        store.store(key, derived)
    return derived


def _derive(
    inventory: Inventory,
    plan: TrainingPlan,
    adaptation: Adaptation,
    rules: tuple[str, ...] = (),
    progress: Progress | None = None,
) -> Derived:
    assert inventory.config is not None
    model_stacks = [s for s in stacks(inventory, adaptation) if s.layers]
    if not model_stacks:
        raise DerivationError("the model has no repeated layers")
    virtual = adaptation.virtual_tokens
    # Images per sample and tokens per image are fixed (they key the profile): the traced lengths
    # leave room for text after them. A vision model's images fix its sequence: fit in batch only.
    images = plan.images * image_tokens_of(inventory.config, plan)
    base = base_length(inventory.config, plan.seq_len + virtual, longer_than=max(virtual, images))
    points = POINTS[:2] if is_vision_model(inventory.config) else POINTS
    attention = plan.attention
    try:
        cuts = _traces(inventory, plan, model_stacks, [(b, base * m) for b, m in points], virtual, rules, progress)
    except DerivationError as exc:
        if attention == "eager" or "does not support" not in str(exc):
            raise
        # transformers refuses SDPA for some models (Gemma 2's logit soft-capping); they train eager.
        attention = "eager"
        plan = replace(plan, attention="eager")
        cuts = _traces(inventory, plan, model_stacks, [(b, base * m) for b, m in points], virtual, rules, progress)
    try:
        fitted = _fit(cuts, plan, base, adaptation.prefix_tokens)
    except DerivationError:
        # The first trace of some operations in a process runs them differently (fake tensors' cold
        # dispatch cache: torch's CPU LSTM, p-tuning's encoder, frees in another order); later traces
        # agree with each other. Trace the first size once more.
        first = points[0]
        cuts[0] = _trace(inventory, plan, model_stacks, first[0], base * first[1], virtual, rules)
        fitted = _fit(cuts, plan, base, adaptation.prefix_tokens)
    layers = _full_depth(model_stacks, fitted.layers, fitted.order, _dropped_layers(inventory.config, model_stacks))
    profile = StepProfile(fitted.embed, tuple(layers), fitted.head)
    kept = {s.path: s.kept for s in model_stacks}
    return Derived(profile, kept, attention, fitted.inexact_bytes)


def _fit(cuts: list[Cut], plan: TrainingPlan, base: int, offset: int) -> Fitted:
    """:func:`~peftaudit.memory.derived.fit.fit` of the traces, with gradient accumulation's in-place adds."""
    if plan.gradient_accumulation > 1:
        cuts = [_accumulating(c) for c in cuts]
    return fit(cuts, base, offset=offset)


def _full_depth(
    model_stacks: list[Stack],
    segments: dict[str, Segment],
    order: tuple[str, ...],
    dropped: frozenset[str] = frozenset(),
) -> list[Segment]:
    """Every layer of the full model, stack after stack in the order they ran, from its kept layer.

    ``dropped``: labels of layers whose output the model drops (:func:`_dropped_layers`): they keep nothing.
    """
    ran: list[str] = []
    for label in order:
        path = label.rpartition(".")[0]
        if ran and ran[-1] == path:
            continue
        if path in ran:
            raise DerivationError(f"the layers of {path} do not run one after another")
        ran.append(path)
    by_path = {s.path: s for s in model_stacks}
    layers: list[Segment] = []
    for path in ran:
        stack = by_path[path]
        for index in stack.layers:
            label = f"{path}.{stack.stand_in(index)}"
            if label in segments and f"{path}.{index}" not in dropped:
                layers.append(segments[label])
    # Stacks that never ran (a vision tower given no images) hold no activations.
    return layers


def _accumulating(c: Cut) -> Cut:
    """Gradient accumulation: parameter gradients already exist, so backward adds into them.

    The new gradient is a temporary added in place, as the tape records it with accumulation.
    """

    def convert(rows: list[Row]) -> list[Row]:
        out: list[Row] = []
        for cat, size in rows:
            if cat == GRAD and size > 0:
                out += [(TEMP, size), (TEMP, -size)]
            else:
                out.append((cat, size))
        return out

    result = Cut(order=c.order)
    result.embed = (c.embed[0], convert(c.embed[1]))
    result.head = (c.head[0], convert(c.head[1]))
    result.layers = {k: (f, convert(b)) for k, (f, b) in c.layers.items()}
    return result


def _traces(
    inventory: Inventory,
    plan: TrainingPlan,
    model_stacks: list[Stack],
    sizes: list[tuple[int, int]],
    virtual: int,
    rules: tuple[str, ...],
    progress: Progress | None,
) -> list[Cut]:
    """:func:`_trace` at each ``(batch, seq)`` of ``sizes``, telling ``progress`` how many are done."""
    cuts: list[Cut] = []
    for batch, seq in sizes:
        if progress is not None:
            progress(len(cuts), len(sizes))
        cuts.append(_trace(inventory, plan, model_stacks, batch, seq, virtual, rules))
    if progress is not None:
        progress(len(cuts), len(sizes))
    return cuts


def _trace(
    inventory: Inventory,
    plan: TrainingPlan,
    model_stacks: list[Stack],
    batch: int,
    seq: int,
    virtual: int,
    rules: tuple[str, ...] = (),
) -> Cut:
    """One traced step of the depth-reduced copy at ``batch`` x ``seq`` (prompt tokens included)."""
    from peftaudit.memory.stack_rules import tracing
    from peftaudit.memory.tracing.run import run_trace

    point = replace(
        plan,
        batch_size=batch,
        seq_len=seq - virtual,
        gradient_accumulation=1,
        gpus=1,
        sharding="none",
        offload="none",
        loss="default",
    )
    model = _reduced_model(inventory, model_stacks, rules)
    watched = []
    for stack in model_stacks:
        container = model.get_submodule(stack.path)
        for position, index in enumerate(stack.kept):
            watched.append((f"{stack.path}.{index}", container[position]))
    with _reasons(), tracing(rules):
        result = run_trace(model, point, steps=1, layers=watched)
    if result.events is None:  # pragma: no cover - run_trace logs whenever layers are given
        raise DerivationError("the trace kept no event log")
    first = {f"{s.path}.{s.layers[0]}" for s in model_stacks}
    return cut(result.events, first)


def _reduced_model(inventory: Inventory, model_stacks: list[Stack], rules: tuple[str, ...] = ()) -> Any:
    """The model rebuilt on meta with only the kept layers, under their own names (``layers.5``),
    as the stack ``rules`` build it (:func:`~peftaudit.memory.stack_rules.apply_to_model`)."""
    from peftaudit.errors import PeftauditError
    from peftaudit.memory.stack_rules import apply_to_model
    from peftaudit.sources.build import build_from_config

    config = dict(inventory.config or {})
    try:
        model = build_from_config(config, model_id=inventory.architecture)
    except PeftauditError as exc:
        raise DerivationError(str(exc)) from exc
    for stack in model_stacks:
        try:
            container = model.get_submodule(stack.path)
        except AttributeError as exc:
            raise DerivationError(f"the rebuilt model has no {stack.path}") from exc
        kept = _kept_layers(container, stack.kept)
        parent, _, name = stack.path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, name, kept)
    _feature_layer(model, model_stacks)
    _layer_positions(model, model_stacks)
    apply_to_model(model, rules, inventory.model_type)
    return model


def _dropped_layers(config: Mapping[str, Any], model_stacks: list[Stack]) -> frozenset[str]:
    """The vision layers after the one LLaVA takes its image features from (``vision_feature_layer=-2``).

    They run forward, but their output is dropped: nothing of them is kept for the backward pass.
    """
    vision = [s for s in model_stacks if "vision" in s.path]
    if not vision:
        return frozenset()
    stack = vision[0]
    return frozenset(f"{stack.path}.{index}" for index in dropped_feature_layers(config, stack.layers))


def _feature_layer(model: Any, model_stacks: list[Stack]) -> None:
    """Take a multimodal model's image features from the copy's last kept vision layer.

    LLaVA reads them from one vision layer counted from the end (``vision_feature_layer=-2``),
    resolved against the full tower's depth: in the copy that names a layer it does not have.
    From the last kept layer every kept layer runs forward and backward, as all layers up to the
    feature layer of the full tower do (the later ones are :func:`_dropped_layers`).
    """
    config = getattr(model, "config", None)
    vision = [s for s in model_stacks if "vision" in s.path]
    if config is not None and isinstance(getattr(config, "vision_feature_layer", None), int) and vision:
        # hidden_states[0] is the embedding output, so the k-th kept layer's output is index k.
        config.vision_feature_layer = len(vision[0].kept)


def _layer_positions(model: Any, model_stacks: list[Stack]) -> None:
    """Point attributes that list layers by index at the depth-reduced copy's positions.

    Mllama's text model runs a layer as a cross-attention layer when its position is in
    ``cross_attention_layers`` (and skips it without images); its vision model stacks the outputs of
    the ``transformer`` layers in ``intermediate_layers_indices``
    (:data:`~peftaudit.memory.derived.kinds.LAYER_INDEX_LISTS`). The copy's stack runs its kept
    layers by position (0, 1, 2...): layer 3 of the full model may be at position 2. Each listed
    layer becomes the position of the kept layer it is replayed from, so the kept cross-attention
    layer still runs as one, and the vision model stacks as many layer outputs (of the same size)
    as the full model does.
    """
    by_path = {s.path: s for s in model_stacks}
    for name, module in model.named_modules():
        for attribute, under in LAYER_INDEX_LISTS.items():
            indices = getattr(module, attribute, None)
            stack = by_path.get(f"{name}.{under}" if name else under)
            if stack is None or not isinstance(indices, list | tuple):
                continue
            if all(isinstance(i, int) and i in stack.layers for i in indices):
                # A new list: the config's own list stays the full model's.
                setattr(module, attribute, [stack.kept.index(stack.stand_in(i)) for i in indices])


def _kept_layers(container: Any, kept: tuple[int, ...]) -> Any:
    """A ``ModuleList`` of the kept layers that keeps their original names (peft matches names)."""
    import torch

    class KeptLayers(torch.nn.ModuleList):
        """Layers named by their index in the full model; integer indexing is by position."""

        def __getitem__(self, idx: Any) -> Any:
            if isinstance(idx, int):
                return list(self._modules.values())[idx]
            return super().__getitem__(idx)

    layers = KeptLayers()
    for index in kept:
        layers.add_module(str(index), container[index])
    return layers


@contextlib.contextmanager
def _reasons() -> Iterator[None]:
    """Any failure of the traced step as a one-line :class:`DerivationError`."""
    try:
        yield
    except DerivationError:
        raise
    except Exception as exc:  # the trace runs arbitrary model code: any failure is a reason
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise DerivationError(f"{type(exc).__name__}: {first}"[:300]) from exc
