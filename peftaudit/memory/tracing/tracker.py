"""Storage tracking: live bytes by category, the global peak and what was alive at it.

With ``log=True`` the tracker also keeps every allocation and free in order, with
marks where layers begin and end (:class:`EventLog`): what a derived layer profile
is fitted from (:mod:`peftaudit.memory.derived`).
"""

from __future__ import annotations

import itertools
import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass
class EventLog:
    """Every allocation (``+bytes``) and free (``-bytes``) of a traced step, in order, with marks.

    ``rows`` holds ``(serial, bytes)`` for a storage's allocation or free and ``(label, 0)`` for
    a mark (a string: where a layer starts or ends, or a phase). ``categories`` maps a storage's
    serial to its final category (gradients are re-tagged after their allocation).
    ``in_place`` lists ``(new, a, b)``: an out-of-place gradient accumulation (fake tensors add a
    second gradient out of place, real tensors in place) whose new buffer stands for ``a`` or ``b``.
    """

    rows: list[tuple[int | str, int]] = field(default_factory=list)
    categories: dict[int, str] = field(default_factory=dict)
    in_place: list[tuple[int, int, int]] = field(default_factory=list)


class Tracker:
    """Live bytes by category, the global peak and what was alive at it.

    Storages are watched through weak references (fake storages keep their
    Python object alive as long as any tensor uses them), so a free is seen the
    moment the last tensor goes.
    """

    def __init__(self, *, log: bool = False) -> None:
        self.live: dict[int, tuple[Any, int, str, int | None, int]] = {}
        self.by_cat: Counter[str] = Counter()
        self.by_layer: Counter[int] = Counter()
        self.current = 0
        self.peak = 0
        self.peak_cats: dict[str, int] = {}
        self.peak_phase = "forward"
        self.phase = "setup"
        self.category = "activations"
        self.layer: int | None = None
        self.phase_peaks: dict[str, int] = {}
        self.ops = 0
        self.log: EventLog | None = EventLog() if log else None
        self._serials = itertools.count()

    def mark(self, label: str) -> None:
        """Note a point in the step (a layer starts or ends) in the event log, if one is kept."""
        if self.log is not None:
            self.log.rows.append((label, 0))

    def serial(self, storage: Any) -> int | None:
        """The serial of a live tracked storage."""
        entry = self.live.get(id(storage))
        return entry[4] if entry is not None else None

    def track(self, storage: Any, category: str | None = None, layer: int | None = None, *, peak: bool = True) -> None:
        key = id(storage)
        if key in self.live:
            return
        nbytes = int(storage.nbytes())
        cat = category or self.category
        lay = layer if layer is not None else self.layer
        serial = next(self._serials)
        log = self.log

        def gone(_ref: Any, key: int = key) -> None:
            entry = self.live.pop(key, None)
            if entry is not None:
                self.current -= entry[1]
                self.by_cat[entry[2]] -= entry[1]
                if entry[3] is not None:
                    self.by_layer[entry[3]] -= entry[1]
                if log is not None:
                    log.rows.append((entry[4], -entry[1]))

        self.live[key] = (weakref.ref(storage, gone), nbytes, cat, lay, serial)
        if log is not None:
            log.rows.append((serial, nbytes))
            log.categories[serial] = cat
        self.current += nbytes
        self.by_cat[cat] += nbytes
        if lay is not None:
            self.by_layer[lay] += nbytes
        if not peak:
            return
        if self.current >= self.peak:
            self.peak = self.current
            self.peak_cats = dict(self.by_cat)
            self.peak_phase = self.phase
        if self.current > self.phase_peaks.get(self.phase, 0):
            self.phase_peaks[self.phase] = self.current

    def retag(self, storage: Any, category: str) -> None:
        key = id(storage)
        entry = self.live.get(key)
        if entry is None or entry[2] == category:
            return
        self.by_cat[entry[2]] -= entry[1]
        self.by_cat[category] += entry[1]
        self.live[key] = (entry[0], entry[1], category, None, entry[4])
        if self.log is not None:
            self.log.categories[entry[4]] = category
        if entry[3] is not None:
            self.by_layer[entry[3]] -= entry[1]


def dispatch_mode(tracker: Tracker, param_storages: set[int]) -> Any:
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    to_copy = torch.ops.aten._to_copy.default
    add = torch.ops.aten.add.Tensor

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            tracker.ops += 1
            out = func(*args, **(kwargs or {}))
            category = None
            if (
                func is to_copy
                and args
                and isinstance(args[0], torch.Tensor)
                and id(args[0].untyped_storage()) in param_storages
            ):
                category = "weight_copies"
            # Autograd adds a second gradient into the first in place on real tensors, but out of
            # place on tensor subclasses such as fake tensors: that extra buffer is not a peak.
            accumulating = (
                func is add
                and tracker.phase == "backward"
                and len(args) == 2
                and not kwargs
                and all(isinstance(a, torch.Tensor) for a in args)
                and args[0].shape == args[1].shape
                and args[0].dtype == args[1].dtype
                and torch._C._current_autograd_node() is not None
            )
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    tracker.track(t.untyped_storage(), category, peak=not accumulating)
            if accumulating and tracker.log is not None:
                new, a, b = (tracker.serial(t.untyped_storage()) for t in (out, *args))
                if new is not None and a is not None and b is not None:
                    tracker.log.in_place.append((new, a, b))
            return out

    return Watch()
