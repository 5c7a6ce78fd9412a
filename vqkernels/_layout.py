"""How a tensor's rows are handed to a kernel without copying.

A kernel sees the rows of ``z.movedim(dim, -1)`` as a (B, S, D) array with element strides
(sb, ss, sd): row ``n = b * S + s`` in the row-major order of the leading dims. That covers a
row-major (..., D) tensor (B = 1) and a channel-first (B, D, H, W) map (S = H * W, ss = 1,
sd = H * W) as they are. Only a layout that no (B, S) split describes (a tensor sliced in two
leading dims at once, say) is copied, into the row-major order of the moved view.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch


class RowView(NamedTuple):
    tensor: torch.Tensor  # the tensor whose data_ptr the kernel reads (z itself, or a copy)
    B: int
    S: int
    D: int
    sb: int
    ss: int
    sd: int

    def as_args(self) -> tuple:
        """(ptr, B, S, D, sb, ss, sd): the tuple the native module takes."""
        return (self.tensor.data_ptr(), self.B, self.S, self.D, self.sb, self.ss, self.sd)


NULL_VIEW = (0, 0, 0, 0, 0, 0, 0)


def _collapse(sizes, strides) -> Optional[int]:
    """Stride of the flattened group of dims, or None if the group is not one strided run."""
    group_stride, expected = None, None
    for size, stride in zip(reversed(sizes), reversed(strides)):
        if size == 1:
            continue
        if group_stride is None:
            group_stride = stride
        elif stride != expected:
            return None
        expected = stride * size
    return 0 if group_stride is None else group_stride


class RowPlan:
    """The (B, S) split chosen for one tensor, applied to every tensor of the same shape."""

    def __init__(self, z: torch.Tensor, dim: int):
        self.dim = dim
        moved = z.movedim(dim, -1)
        self.lead = tuple(moved.shape[:-1])
        self.D = moved.shape[-1]
        self.N = math.prod(self.lead)
        self.split = 0
        for split in range(len(self.lead) + 1):
            if self._strides(moved, split) is not None:
                self.split = split
                break

    def _strides(self, moved: torch.Tensor, split: int):
        sizes, strides = moved.shape[:-1], moved.stride()[:-1]
        sb = _collapse(sizes[:split], strides[:split])
        ss = _collapse(sizes[split:], strides[split:])
        if sb is None or ss is None:
            return None
        return sb, ss, moved.stride(-1)

    def view(self, t: torch.Tensor) -> RowView:
        """Rows of `t` (same shape as the planned tensor) for a kernel to read; copies only if the
        layout fits no split (the copy is row-major, which fits every split)."""
        moved = t.movedim(self.dim, -1)
        st = self._strides(moved, self.split)
        if st is None:
            moved = moved.contiguous()
            st = self._strides(moved, self.split)
        B = math.prod(self.lead[: self.split])
        S = math.prod(self.lead[self.split:])
        return RowView(moved, B, S, self.D, *st)

    def empty_like(self, z: torch.Tensor, dtype=None) -> tuple[torch.Tensor, RowView]:
        """A new tensor shaped like `z` (its layout where possible) that a kernel writes in place."""
        out = torch.empty_like(z, dtype=dtype)
        moved = out.movedim(self.dim, -1)
        if self._strides(moved, self.split) is None:  # z was not dense: fall back to row-major
            moved = torch.empty(moved.shape, dtype=out.dtype, device=out.device)
            out = moved.movedim(-1, self.dim)
        return out, self.view(out)
