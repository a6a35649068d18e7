"""Record the shape of every tensor an operation produces, to prove memory-bounded paths never
allocate an n x n tensor (an assertion on shapes, not on timings)."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class ShapeProbe(TorchDispatchMode):
    """Within ``with ShapeProbe() as probe:``, ``probe.largest`` is the largest numel of any op output."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
                self.largest = max(self.largest, t.numel())
        return out

    def has_square(self, n: int) -> bool:
        """True when some output has two axes of length >= n (an n x n score matrix or mask)."""
        return any(sum(d >= n for d in shape) >= 2 for shape in self.shapes)
