"""Layer kinds: which repeated layers of a model are alike, and which few a depth-reduced copy keeps.

Two layers of a stack are of one kind when a step runs them the same way:
the same parameters (local names, shapes, dtypes), the same treatment by the
method (adapters and their ranks, what trains), and the same per-layer config
values (``layer_types``: sliding or global attention; ``no_rope_layers``; any
config list with one scalar per layer). A depth-reduced copy keeps the first
layer of each stack (its input arrives from the embedding, so it is recorded on
its own) and the first later layer of every kind; every other layer is replayed
from the kept layer of its kind.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from peftaudit.inventory import Inventory
from peftaudit.memory.methods import Adaptation


@dataclass(frozen=True)
class Stack:
    """One container of repeated layers (``model.layers``, ``encoder.block``) and its layers' kinds."""

    path: str
    layers: tuple[int, ...]
    """Layer indices, in order."""
    kinds: tuple[Hashable, ...]
    """The kind of each layer, aligned with ``layers``."""

    @property
    def kept(self) -> tuple[int, ...]:
        """The layers a depth-reduced copy keeps: the first, then the first later layer of each kind."""
        kept = [self.layers[0]]
        seen: set[Hashable] = set()
        for index, kind in zip(self.layers[1:], self.kinds[1:], strict=True):
            if kind not in seen:
                seen.add(kind)
                kept.append(index)
        return tuple(kept)

    def stand_in(self, index: int) -> int:
        """The kept layer that layer ``index`` is replayed from."""
        if index == self.layers[0]:
            return index
        kind = self.kinds[self.layers.index(index)]
        for kept in self.kept[1:]:
            if self.kinds[self.layers.index(kept)] == kind:
                return kept
        raise KeyError(index)  # pragma: no cover - every later kind has a kept layer


def stacks(inventory: Inventory, adaptation: Adaptation) -> list[Stack]:
    """Every stack of repeated layers in the model, largest first is not implied: in inventory order."""
    by_stack: dict[str, dict[int, list[Hashable]]] = {}
    for p in inventory.parameters:
        if p.block is None or p.layer is None:
            continue
        local = p.name[len(p.block) + 1 :].split(".", 1)[1] if p.name.startswith(p.block + ".") else p.name
        trains = p.name in adaptation.trainable
        by_stack.setdefault(p.block, {}).setdefault(p.layer, []).append((local, p.shape, p.dtype, trains))
    adapters: dict[tuple[str, int], list[Hashable]] = {}
    for a in adaptation.adapters:
        for stack in by_stack:
            index = _layer_of(a.path, stack)
            if index is not None:
                local = a.path[len(stack) + 1 :].split(".", 1)[1] if "." in a.path[len(stack) + 1 :] else ""
                adapters.setdefault((stack, index), []).append(
                    (local, a.kind, a.rank, a.parameter, a.feedforward, a.dora, a.num_experts)
                )
    for s in adaptation.saved:
        for stack in by_stack:
            index = _layer_of(s.path, stack)
            if index is not None:
                adapters.setdefault((stack, index), []).append(("saved", s.path[len(stack) + 1 :]))
    result = []
    for path, layers in by_stack.items():
        if path.rpartition(".")[2] in PICKED_BY_INDEX:
            continue
        indices = tuple(sorted(layers))
        per_layer = _per_layer_config(inventory.config or {}, len(indices))
        deepstack = _deepstack(inventory.config or {}, path, indices)
        kinds = tuple(
            (
                tuple(sorted(layers[i], key=repr)),
                tuple(sorted(adapters.get((path, i), []), key=repr)),
                tuple(values[n] for values in per_layer) + deepstack[n],
            )
            for n, i in enumerate(indices)
        )
        result.append(Stack(path, indices, kinds))
    return result


def _layer_of(path: str, stack: str) -> int | None:
    if not path.startswith(stack + "."):
        return None
    head = path[len(stack) + 1 :].split(".", 1)[0]
    return int(head) if head.isdigit() else None


#: Config lists of layer indices, not of one value per layer (Mllama's ``cross_attention_layers``
#: names 8 of 40 text layers; as long as its 8 global vision layers, it would split them into kinds).
#: Key -> the stack it indexes, under the module holding the attribute of that name (derivation
#: points them at the depth-reduced copy's positions).
LAYER_INDEX_LISTS: dict[str, str] = {
    "cross_attention_layers": "layers",
    "intermediate_layers_indices": "transformer.layers",
    "deepstack_visual_indexes": "blocks",
}


#: Module lists a model picks single entries from by index between the layers of another stack,
#: not a stack of layers run one after another: Qwen3-VL's DeepStack mergers (the k-th runs after
#: the k-th vision block of ``deepstack_visual_indexes``). The copy keeps them whole; what each keeps
#: is counted with the layer that runs after it (the fit's segments).
PICKED_BY_INDEX = frozenset({"deepstack_merger_list"})


def _deepstack(config: Mapping[str, Any], path: str, indices: tuple[int, ...]) -> list[tuple[Any, ...]]:
    """Qwen3-VL's DeepStack layers, each a kind of its own (an empty tuple per layer elsewhere).

    The vision blocks in ``deepstack_visual_indexes`` (8, 16 and 24 of 27) each feed a merger of
    their own, whose outputs the first as many decoder layers add to the image tokens' hidden
    states. The copy keeps every one of them, in the vision tower and the language model, so it
    runs every merger and every addition once, where the model does.
    """
    listed = next((values for key, values in _lists(config) if key == "deepstack_visual_indexes"), None)
    if not listed:
        return [()] * len(indices)
    if path.endswith(".blocks") and "visual" in path:
        return [(("deepstack", listed.index(i)),) if i in listed else () for i in indices]
    if "language_model" in path:
        return [(("deepstack", n),) if n < len(listed) else () for n in range(len(indices))]
    return [()] * len(indices)


def _per_layer_config(config: Mapping[str, Any], layers: int) -> list[list[Any]]:
    """Config lists with one scalar per layer (``layer_types``...), at any depth of the config."""
    return [values for key, values in _lists(config) if len(values) == layers and key not in LAYER_INDEX_LISTS]


def _lists(config: Mapping[str, Any]) -> Iterator[tuple[str, list[Any]]]:
    for key, value in sorted(config.items()):
        if isinstance(value, Mapping):
            yield from _lists(value)
        elif isinstance(value, list) and value and all(isinstance(v, str | int | float | bool) for v in value):
            yield key, value
