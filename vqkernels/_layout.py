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


def _split(moved: torch.Tensor):
    """(B, S, sb, ss, sd) for the first split of the leading dims into two strided runs, or None."""
    lead, strides = moved.shape[:-1], moved.stride()[:-1]
    for split in range(len(lead) + 1):
        sb = _collapse(lead[:split], strides[:split])
        ss = _collapse(lead[split:], strides[split:])
        if sb is not None and ss is not None:
            return math.prod(lead[:split]), math.prod(lead[split:]), sb, ss, moved.stride(-1)
    return None


def output_like(z: torch.Tensor, dim: int, dtype=None) -> torch.Tensor:
    """An uninitialised tensor shaped like `z` that a kernel can write as rows: z's own layout
    where that has a (B, S) view (any dense z does, contiguous or channels-last), else row-major
    along z.movedim(dim, -1). Shared by the real and the fake (meta) implementations, so both
    agree on strides."""
    if z.is_contiguous():  # the common case: any row-major tensor has a view
        return torch.empty(z.shape, dtype=dtype or z.dtype, device=z.device)
    out = torch.empty_like(z, dtype=dtype)
    if _split(out.movedim(dim, -1)) is None:
        moved_shape = z.movedim(dim, -1).shape
        out = torch.empty(moved_shape, dtype=out.dtype, device=z.device).movedim(-1, dim)
    return out


class RowPlan:
    """Rows of tensors shaped like `z`, quantized along `dim`. Each tensor gets its own (B, S)
    split (a kernel computes every view's offsets from its own S), so z, grad_z_q and the outputs
    may all have different layouts."""

    def __init__(self, z: torch.Tensor, dim: int):
        self.dim = dim
        moved_shape = z.movedim(dim, -1).shape
        self.lead = tuple(moved_shape[:-1])
        self.D = moved_shape[-1]
        self.N = math.prod(self.lead)

    def view(self, t: torch.Tensor) -> RowView:
        """Rows of `t` (shaped like the planned tensor) for a kernel to read; copied (row-major)
        only if no (B, S) split describes t's layout."""
        moved = t if self.dim in (-1, t.dim() - 1) else t.movedim(self.dim, -1)
        if moved.is_contiguous():  # row-major rows: no split to search for
            return RowView(moved, 1, self.N, self.D, 0, self.D, 1)
        sp = _split(moved)
        if sp is None:
            moved = moved.contiguous()
            sp = _split(moved)
        return RowView(moved, sp[0], sp[1], self.D, *sp[2:])

    def empty_like(self, z: torch.Tensor, dtype=None) -> tuple[torch.Tensor, RowView]:
        """A new tensor shaped like `z` (see `output_like`) and its rows, for a kernel to write."""
        out = output_like(z, self.dim, dtype)
        return out, self.view(out)
