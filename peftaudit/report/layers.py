"""The per-layer table and the module tree of a report, built from an inventory.

Rows sum to the report's totals: a run of identical repeated blocks is one row
(``model.layers.0-31``), a module whose only tensor is tied to another's is a
zero row that says so. The tree collapses identical numbered siblings the same
way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from peftaudit.report.model import LayerRow, TreeNode

if TYPE_CHECKING:  # pragma: no cover
    from peftaudit.inventory import Inventory, ParameterRecord


def layer_rows(inventory: Inventory) -> list[LayerRow]:
    """Per-layer rows: one per non-repeated module, one per run of identical blocks."""
    order = {m.path: i for i, m in enumerate(inventory.modules)}
    types = {m.path: m.type for m in inventory.modules}

    # Group parameters: by (container, layer) inside repeated blocks, else by owning module.
    groups: dict[tuple[str, int | None], list[ParameterRecord]] = {}
    for p in inventory.parameters:
        key = (p.block, p.layer) if p.block is not None and p.layer is not None else (p.module, None)
        groups.setdefault(key, []).append(p)

    rows: list[tuple[int, LayerRow]] = []
    run: list[tuple[str, int, list[ParameterRecord]]] = []

    def flush() -> None:
        if not run:
            return
        container, first, _ = run[0]
        last = run[-1][1]
        block_path = f"{container}.{first}" if container else str(first)
        name = f"{container}.{first}-{last}" if last != first else block_path
        all_params = [p for _, _, ps in run for p in ps]
        rows.append((order.get(block_path, 0), _row(name, types.get(block_path, "?"), all_params, len(run))))
        run.clear()

    for (path, layer), members in groups.items():
        if layer is None:
            flush()
            rows.append((order.get(path, 0), _row(path or "(root)", types.get(path, "?"), members, 1)))
            continue
        current = (path, layer, members)
        if run and (run[0][0] != path or run[-1][1] != layer - 1 or _signature(run[0]) != _signature(current)):
            flush()
        run.append(current)
    flush()

    # Modules whose only tensor is tied to another's: a zero row that says so.
    owned = {p.module for p in inventory.parameters}
    blocks = {p.block for p in inventory.parameters if p.block}
    for group in inventory.tied_groups:
        for alias in group.names[1:]:
            module = alias.rpartition(".")[0]
            if module in owned or any(module.startswith(b + ".") for b in blocks):
                continue
            rows.append(
                (
                    order.get(module, len(order)),
                    LayerRow(
                        name=module,
                        type=types.get(module, "?"),
                        weights=0,
                        biases=0,
                        trainable=0,
                        tied_to=group.names[0],
                    ),
                )
            )
            owned.add(module)
    rows.sort(key=lambda item: item[0])
    return [row for _, row in rows]


def _signature(member: tuple[str, int, list[ParameterRecord]]) -> tuple[Any, ...]:
    """What makes two blocks identical: relative names, shapes, dtypes, trainability, kinds."""
    path, layer, params = member
    prefix = f"{path}.{layer}."
    return tuple((p.name.removeprefix(prefix), p.shape, p.dtype, p.trainable, p.kind) for p in params)


def _row(name: str, type_: str, params: Sequence[ParameterRecord], repeat: int) -> LayerRow:
    return LayerRow(
        name=name,
        type=type_,
        weights=sum(p.numel for p in params if not p.is_bias),
        biases=sum(p.numel for p in params if p.is_bias),
        trainable=sum(p.numel for p in params if p.trainable),
        repeat=repeat,
    )


def module_tree(inventory: Inventory) -> TreeNode:
    """The module tree with subtree parameter counts, identical siblings collapsed."""
    children: dict[str, list[str]] = {}
    types: dict[str, str] = {}
    own: dict[str, int] = {}
    for m in inventory.modules:
        types[m.path] = m.type
        own[m.path] = m.own_params
        if m.path:
            parent = m.path.rpartition(".")[0]
            children.setdefault(parent, []).append(m.path)

    def build(path: str) -> TreeNode:
        kids = [build(c) for c in children.get(path, [])]
        total = own.get(path, 0) + sum(k.params * k.repeat for k in kids)
        return TreeNode(
            name=path.rpartition(".")[2] or "(root)",
            type=types.get(path, "?"),
            params=total,
            children=tuple(_collapse(kids)),
        )

    return build("")


def _collapse(nodes: list[TreeNode]) -> list[TreeNode]:
    """Merge runs of numbered siblings with identical subtrees: ``0-31 (x32)``."""
    out: list[TreeNode] = []
    run: list[TreeNode] = []

    def shape(n: TreeNode) -> tuple[Any, ...]:
        return (n.type, n.params, tuple((*shape(c), c.name, c.repeat) for c in n.children))

    def flush() -> None:
        if not run:
            return
        if len(run) == 1:
            out.append(run[0])
        else:
            first = run[0]
            out.append(
                TreeNode(
                    name=f"{first.name}-{run[-1].name}",
                    type=first.type,
                    params=first.params,
                    repeat=len(run),
                    children=first.children,
                )
            )
        run.clear()

    for node in nodes:
        if node.name.isdigit() and run and int(node.name) == int(run[-1].name) + 1 and shape(node) == shape(run[0]):
            run.append(node)
            continue
        flush()
        if node.name.isdigit():
            run.append(node)
        else:
            out.append(node)
    flush()
    return out
