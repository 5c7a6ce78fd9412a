"""Multi-codebook quantization (issue 17): residual VQ, grouped VQ and indices -> codes.

residual_vq(z, codebooks, ...) quantizes with S stages: stage s searches the residual left by the
stages before it, and z_q is the sum of the chosen codes.

Definitions (every backend computes exactly these; the reference below is the oracle):
  * rows are z moved to (N, D) and widened to the accumulation dtype `acc` (float32 for
    float32/float16/bfloat16 input, float64 for float64); codes are widened the same way (exact);
  * r_0 = rows, r_{s+1} = r_s - e_s in `acc` (one rounding per element), where e_s is the code
    stage s chose for the row, NaN where its exact error is not finite (the single-stage rule);
  * stage s's index is the single-stage answer for r_s (issue 13's contract: the lowest k
    minimising the float64 distance), so it is exact at every stage;
  * z_q = fl(((0 + e_0) + e_1) + ...) in `acc`, cast to z's dtype; `codes_from_indices` gives the
    same sum bit for bit;
  * a row that sits stage s out (quantizer dropout: s >= active_stages) gets index -1 there, adds
    nothing and leaves its residual as it is;
  * cosine=True: stage s searches the unit row u_s = r_s / max(fl(||r_s||), 1e-12) instead of r_s
    (`_unit_rows`: the norm from a float64 sum of squares in d order, rounded once), against
    codebooks the caller normalised; its sqerr and losses are u_s's, and r_{s+1} = r_s - e_s.

Losses, per stage s, over the rows that are not masked out and are active at stage s, divided by
(unmasked rows) x D (so with one stage and no mask they equal vq_quantize's):
  codebook_loss[s]   = sum ||sg[r_s] - e_s||^2 / (n D): its gradient reaches codebook s only;
  commitment_loss[s] = sum ||r_s - sg[e_s]||^2 / (n D): its gradient reaches z only, through
                       r_s = z - sum_{t<s} sg[e_t] (the earlier codes are constants).
This is vector-quantize-pytorch's convention (ResidualVQ subtracts `quantized.detach()`), under
which every stage's commitment term pulls the encoder. EnCodec's code subtracts the
straight-through output instead, which makes r_s for s >= 1 constant in z: only stage 0's
commitment term reaches its encoder there. z_q is straight-through on the sum: grad z = grad z_q.

Backends: "reference" is a stage loop over vqkernels.reference (float64 search, plain torch);
"cpu" is one native call that runs all stages per row tile with the residual in cache (fp32,
cosine too; 16-bit input is widened first, float64 input runs a stage loop over the exact float64
kernel; each stage takes the avx2_i16 build's int16 first pass exactly where a single-stage search
of that stage's (K_s, D) would, with bitwise the fp32 path's answer), and its backward
(cosine too) is one native pass per stage over a single residual buffer, bitwise the stage loop
of single-stage backwards in _ResidualFn.backward;
"triton" runs a fused kernel too (all stages per row block, the residual in an N x D scratch the
block owns, read in column chunks: any D; fp32 and 16-bit input widened to fp32; tested under
Triton's interpreter and AOT-compiled for sm_80/sm_90 without spills, not yet run on a GPU) and a
stage loop for float64; "cuda" runs a stage loop over its single-stage kernel, a documented choice:
  * each stage's search is the whole single-stage machinery (cp.async pipeline, split-K with its
    merge, the exact re-search launch for flagged rows, the host-side workspace sizing); fusing
    stages means carrying the residual between those launches inside one kernel, i.e. a second
    copy of that machinery, not a loop around it;
  * the loop's extra traffic is the residual written and read back once per stage (2 N D values),
    small next to the K D codebook reads per row block of every stage at the issue's shapes
    (K = 1024); and nothing of it can be measured here without a GPU;
  * every stage is then exact by construction (the single-stage kernel's contract, tested through
    the emulator in tests/test_cuda_emulated.py, residual and grouped included).
Grouped VQ with each group's own codebook is one launch on Triton (a group axis in the grid) and
one native call on the CPU ((group, row tile) pairs shared out to the threads; its backward one
call too, bitwise the per-group loop's); other backends loop over the groups. Nothing of size
N x K is ever formed.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from . import backends, native, reference
from ._layout import NULL_VIEW, RowPlan
from .quantize import _channel_axis, _check, _check_beta

__all__ = ["residual_vq", "RVQOutput", "codes_from_indices", "grouped_vq", "GVQOutput",
           "grouped_codes_from_indices", "residual_forward"]

Codebooks = Union[Tensor, Sequence[Tensor]]


class RVQOutput(NamedTuple):
    z_q: Tensor              # sum of the stages' codes, z's shape and dtype; straight-through
    indices: Tensor          # int64, z's shape without `dim` plus a last axis of S stages (-1: off)
    codebook_loss: Tensor    # (S,): stage s's mean (sg[r_s] - e_s)^2, reaches codebook s only
    commitment_loss: Tensor  # (S,): stage s's mean (r_s - sg[e_s])^2, unweighted, reaches z only
    loss: Tensor             # sum over stages of codebook_loss + beta * commitment_loss
    sqerr: Tensor            # like indices, acc dtype: each stage's exact squared error (no grad)
    perplexity: Tensor       # (S,): exp(entropy of each stage's code usage in this batch)
    counts: list             # S int64 tensors (K_s,): each stage's code usage (valid rows only)


# ------------------------------------------------------------------------------ arguments
def _stage_list(codebooks: Codebooks, num_stages: Optional[int], arg: str = "num_stages",
                unit: str = "stage") -> tuple[list[Tensor], bool]:
    """The S codebooks as a list, and whether one codebook is shared by every stage (`arg` and
    `unit` name the count in messages: num_stages/stage, or groups/group)."""
    if isinstance(codebooks, Tensor):
        if codebooks.dim() == 3:
            if num_stages is not None and num_stages != codebooks.shape[0]:
                raise ValueError(f"{arg}={num_stages} but codebooks holds "
                                 f"{codebooks.shape[0]} {unit}s (shape {tuple(codebooks.shape)})")
            return list(codebooks.unbind(0)), False
        if codebooks.dim() == 2:
            if num_stages is None:
                raise ValueError(f"one 2-D codebook is shared by every {unit}: pass {arg}= the "
                                 f"number of {unit}s (or a list of codebooks, one per {unit}, "
                                 f"or a 3-D tensor)")
            if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 1:
                raise ValueError(f"{arg} must be an int >= 1, got {num_stages!r}")
            return [codebooks] * num_stages, True
        raise ValueError(f"codebooks must be (K, D), (S, K, D) or a list of (K_s, D) tensors, "
                         f"got shape {tuple(codebooks.shape)}")
    if isinstance(codebooks, (list, tuple)):
        if len(codebooks) == 0:
            raise ValueError(f"codebooks is empty: at least one {unit} is needed")
        if num_stages is not None and num_stages != len(codebooks):
            raise ValueError(f"{arg}={num_stages} but {len(codebooks)} codebooks were given")
        return list(codebooks), False
    raise TypeError(f"codebooks must be a tensor or a list of tensors, got "
                    f"{type(codebooks).__name__}")


def _rows(z: Tensor, dim: int) -> Tensor:
    return z.movedim(dim, -1).reshape(-1, z.shape[dim])


def _per_row(name: str, t: Optional[Tensor], lead: torch.Size, device, dtype) -> Optional[Tensor]:
    if t is None:
        return None
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a tensor shaped like z without `dim`, got "
                        f"{type(t).__name__}")
    try:
        t = t.to(device).expand(lead)
    except RuntimeError:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, which does not broadcast to z's "
                         f"rows {tuple(lead)}") from None
    return t.reshape(-1).to(dtype)


def _check_index_range(indices: Tensor, Ks: list[int], unit: str, lowest: int) -> None:
    """Unit i's indices (the last axis, i) in [lowest, Ks[i]) (lowest -1: a residual stage left
    out); the first one out of range named. The caller has checked the dtype and the last axis."""
    for i, K in enumerate(Ks):
        bad = (indices[..., i] < lowest) | (indices[..., i] >= K)
        if bool(bad.any()):
            raise ValueError(f"indices of {unit} {i} must be in [{lowest}, {K}), got "
                             f"{int(indices[..., i][bad][0])}")


def _check_book(z: Tensor, cb: Tensor, dim: int, backend: str, unit: str) -> None:
    """vq_quantize's checks of z against one stage's or group's codebook, the unit named in the
    message (z's own axis is checked against the first unit, before any of these)."""
    try:
        _check(z, cb, dim, backend, "z")
    except (ValueError, TypeError) as e:
        raise type(e)(f"codebooks, {unit}: {e}") from None


def _active_per_row(active_stages: Optional[Tensor], lead: torch.Size, device,
                    S: int) -> Optional[Tensor]:
    """active_stages (an integer tensor broadcastable to z's rows, each in [0, S]) as one long
    per row; residual_vq's and ResidualVectorQuantizer's check, whichever path runs next."""
    if isinstance(active_stages, Tensor) and (active_stages.dtype.is_floating_point
                                              or active_stages.dtype.is_complex
                                              or active_stages.dtype == torch.bool):
        raise TypeError(f"active_stages must be an integer tensor (stages per row), got "
                        f"{active_stages.dtype}")
    active = _per_row("active_stages", active_stages, lead, device, torch.long)
    if active is not None and bool(((active < 0) | (active > S)).any()):
        raise ValueError(f"active_stages must be in [0, {S}]")
    return active


# ------------------------------------------------------------------------------ forward
def _row_norms(r: Tensor) -> Tensor:
    """max(||r||, 1e-12) per row of r (N, D), no autograd: the float64 sum of squares in d order
    (each square exact), square-rooted and rounded to r's dtype once, then clamped (NaN stays
    NaN). Bit for bit the native CPU kernels' norm (search_impl.h unit_tile, vq_cpu.cpp
    residual_backward)."""
    ss = torch.zeros(r.shape[0], dtype=torch.float64, device=r.device)
    for d in range(r.shape[1]):
        ss += r[:, d].double().square()
    return ss.sqrt().to(r.dtype).clamp_min(1e-12)


def _unit_rows(r: Tensor) -> Tensor:
    """The unit rows cosine residual VQ searches (no autograd): r / _row_norms(r), one division
    per element in r's dtype. Bit for bit what the native CPU kernel computes (search_impl.h,
    unit_tile); within an ulp of F.normalize."""
    return r / _row_norms(r)[:, None]


def _row_dots(a: Tensor, b: Tensor) -> Tensor:
    """sum_d a[:, d] b[:, d] per row, summed in float64 in d order and rounded to a's dtype once
    (for fp32 every product is exact in float64): the order the native backward sums in."""
    acc = torch.zeros(a.shape[0], dtype=torch.float64, device=a.device)
    for d in range(a.shape[1]):
        acc += a[:, d].double() * b[:, d].double()
    return acc.to(a.dtype)


class _SumRows(torch.autograd.Function):
    """Row sums of a 2-D tensor (A, B) -> (A,): one torch.sum per row. The same figures as
    e.sum(1), but each sum of B < 32768 elements runs on the calling thread, where e.sum(1) of
    A B >= 32768 elements is split across torch's OpenMP threads (stage/group outputs shared out):
    on a loaded machine waking them costs milliseconds, more than the sums (measured: 15 ms of a
    62 ms grouped_vq forward at N = 8192, G = 4, load ~4.5). The gradient is g broadcast along
    the row, as sum's."""

    @staticmethod
    def forward(ctx, e):
        ctx.shape = e.shape
        if e.shape[0] == 0:
            return e.sum(1)
        return torch.stack([r.sum() for r in e.unbind(0)])

    @staticmethod
    def backward(ctx, g):
        return g[:, None].expand(ctx.shape)


def residual_forward(rows: Tensor, codebooks: list[Tensor], active: Optional[Tensor],
                     backend: str = "reference",
                     cosine: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """(z_q, indices (S, N), sqerr (S, N)) for `rows` (N, D) in the accumulation dtype and codes
    widened to it, by the module docstring's definition. No autograd.

    cosine: stage s searches the unit rows `_unit_rows(r_s)` against the given codebooks (the
    caller normalises them), its sqerr is the unit row's error, and r_{s+1} = r_s - e_s
    (ResidualVectorQuantizer(cosine=True)'s definition).

    backend "reference" is the oracle: a stage loop over vqkernels.reference (float64 search).
    Other backends run their own single-stage search per stage, except "cpu" on float32, which
    runs the fused native kernel (cosine too), and "triton" on float32 (not cosine), which runs
    the fused Triton kernel (vqkernels.triton.residual); "cuda" is the stage loop the module
    docstring explains.
    """
    N, D = rows.shape
    S = len(codebooks)
    b = backends.resolve(backend, rows.device)
    if b.name == "cpu" and rows.dtype == torch.float32 and N > 0:
        return _cpu_fused(rows, codebooks, active, cosine)
    if b.name == "triton" and not cosine:
        from .triton import residual as triton_residual
        if triton_residual.supported(rows, codebooks):
            return triton_residual.residual_forward(rows, codebooks, active)
    r = rows.clone()
    q = torch.zeros_like(rows)
    indices = torch.empty(S, N, dtype=torch.long, device=rows.device)
    sqerr = torch.empty(S, N, dtype=rows.dtype, device=rows.device)
    for s, cb in enumerate(codebooks):
        x = _unit_rows(r) if cosine else r
        e, idx, err, _ = b.forward(x, 1, cb, RowPlan(x, 1))
        if active is not None:
            on = active > s
            idx = torch.where(on, idx, -1)
            err = torch.where(on, err, 0)
            e = torch.where(on[:, None], e, 0)
        indices[s], sqerr[s] = idx, err
        r.sub_(e)
        q.add_(e)
    return q, indices, sqerr


def _cpu_fused(rows: Tensor, codebooks: list[Tensor], active: Optional[Tensor],
               cosine: bool = False):
    N, D = rows.shape
    S = len(codebooks)
    x = rows.contiguous()
    cbs = [cb.contiguous() for cb in codebooks]
    act = active.contiguous() if active is not None else None
    z_q = native.fresh_output(torch.empty(N, D, dtype=torch.float32))
    indices = torch.empty(S, N, dtype=torch.long)
    sqerr = torch.empty(S, N, dtype=torch.float32)
    native.module().cpu_residual_forward(
        (x.data_ptr(), 1, N, D, 0, D, 1), [cb.data_ptr() for cb in cbs],
        [cb.shape[0] for cb in cbs], act.data_ptr() if act is not None else 0, z_q.data_ptr(),
        indices.data_ptr(), sqerr.data_ptr(), max(1, torch.get_num_threads()), cosine)
    return z_q, indices, sqerr


# ------------------------------------------------------------------------------ autograd
# The CPU backwards without per-stage (per-group) temporaries: fp32 / widened 16-bit (cosine too)
# residual VQ as one native call, grouped VQ as one native call for all groups. Both are
# bitwise the generic loops in _ResidualFn.backward / _GroupedFn.backward, which tests compare
# them with by switching this off.
_FUSED_CPU_BACKWARD = True


class _ResidualFn(torch.autograd.Function):
    """Forward: the search (no N x K tensor). Backward, stage by stage with one residual buffer:
        grad z        = grad z_q + sum_s 2 g_commit[s] (r_s - e_s)
        grad codebook_s[k] = sum over rows choosing k at stage s of 2 g_codebook[s] (e_s - r_s)
    (a shared codebook sums its stages' terms)."""

    @staticmethod
    def forward(ctx, rows, active, backend, shared, cosine, *codebooks):
        acc = reference.acc_dtype(rows.dtype)
        r = rows.detach().to(acc)
        cbs = [cb.detach().to(acc) for cb in codebooks]
        if shared:
            cbs = cbs * shared
        z_q, indices, sqerr = residual_forward(r, cbs, active, backend, cosine)
        ctx.save_for_backward(rows, indices, *codebooks)
        ctx.shared, ctx.backend, ctx.cosine = shared, backend, cosine
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(indices)
        return z_q.to(rows.dtype), indices, sqerr, sqerr.clone()

    @staticmethod
    def backward(ctx, g_zq, _g_idx, g_cb, g_cm):
        rows, indices, *codebooks = ctx.saved_tensors
        acc = reference.acc_dtype(rows.dtype)
        S, N = indices.shape
        need_z = ctx.needs_input_grad[0]
        stage_cbs = codebooks * ctx.shared if ctx.shared else codebooks
        need_cb = [ctx.needs_input_grad[5 + i] for i in range(len(codebooks))]
        stage_need = need_cb * ctx.shared if ctx.shared else need_cb
        if _FUSED_CPU_BACKWARD and (g_cb is not None or (g_cm is not None and need_z)) and \
                acc == torch.float32 and N > 0 and \
                backends.resolve(ctx.backend, rows.device).name == "cpu":
            # The stage loop below in one native pass per stage (csrc/cpu/vq_cpu.cpp,
            # residual_backward): the same gradients bit for bit, without an N x D tensor per
            # stage for the gathered codes, the new residual and the new grad_z.
            return _ResidualFn._cpu_backward(ctx, rows, indices, codebooks, stage_cbs, need_cb,
                                             stage_need, g_zq, g_cb, g_cm, need_z)
        grads = [None] * len(codebooks)
        grad_z = None
        if need_z:
            grad_z = (g_zq.to(acc) if g_zq is not None
                      else torch.zeros(rows.shape, dtype=acc, device=rows.device))
        if g_cb is not None or (g_cm is not None and need_z):
            # Each stage is the single-stage backward on its residual r_s (the backend's own
            # kernel: the native one sums the codebook gradient in a fixed order), with the rows
            # that sit the stage out weighted 0. grad_z goes in as the kernel's grad_zq, so the
            # kernel's grad_x is grad_z plus this stage's commitment term (no extra pass), and
            # the residual is updated in place: at these sizes every N x D pass counts.
            b = backends.resolve(ctx.backend, rows.device)
            r = rows.detach().to(acc, copy=True)
            e = torch.empty_like(r)  # one buffer for every stage's gathered codes
            all_on = bool((indices >= 0).all())
            for s in range(S):
                idx = indices[s]
                on = None if all_on else idx >= 0
                safe = idx if all_on else idx.clamp(min=0)
                cb = stage_cbs[s].detach().to(acc)
                w_cm = w_cb = None
                if g_cm is not None and need_z:
                    w_cm = g_cm[s].to(acc) if on is None else torch.where(on, g_cm[s].to(acc), 0)
                if g_cb is not None and stage_need[s]:
                    w_cb = g_cb[s].to(acc) if on is None else torch.where(on, g_cb[s].to(acc), 0)
                if (w_cm is not None or w_cb is not None) and ctx.cosine:
                    # Stage s saw u = r / den, den = max(||r||, eps) (the forward's _unit_rows,
                    # bit for bit): the single-stage backward on u, then the commitment term's
                    # gradient through the normalisation, d u / d r . g = (g - u (u . g)) / den
                    # (F.normalize's; no projection where the norm was clamped; rows of weight 0
                    # add nothing). u . g sums in float64 in d order (_row_dots), as the native
                    # backward does.
                    den = _row_norms(r)[:, None]
                    u = r / den
                    g_u, g_c = b.backward(u, 1, cb, safe, None, w_cb, w_cm, RowPlan(u, 1))
                    if w_cm is not None:
                        proj = torch.where(den > 1e-12, _row_dots(u, g_u)[:, None], 0)
                        term = (g_u - u * proj) / den
                        grad_z = torch.where(w_cm[:, None] != 0, grad_z + term, grad_z)
                elif w_cm is not None or w_cb is not None:
                    g_r, g_c = b.backward(r, 1, cb, safe, grad_z if w_cm is not None else None,
                                          w_cb, w_cm, RowPlan(r, 1))
                    if w_cm is not None:
                        grad_z = g_r
                if w_cm is not None or w_cb is not None:
                    if w_cb is not None:
                        i = 0 if ctx.shared else s
                        grads[i] = g_c if grads[i] is None else grads[i].add_(g_c)
                # The forward's residual update, bit for bit (fl(r - e); a stage sat out
                # subtracts 0).
                torch.index_select(cb, 0, safe, out=e)
                if on is not None:
                    e.masked_fill_(~on[:, None], 0)
                r.sub_(e)
        out_cb = [None if not need or g is None else g.to(cb.dtype)
                  for need, g, cb in zip(need_cb, grads, codebooks)]
        return (grad_z.to(rows.dtype) if need_z else None, None, None, None, None, *out_cb)

    @staticmethod
    def _cpu_backward(ctx, rows, indices, codebooks, stage_cbs, need_cb, stage_need, g_zq, g_cb,
                      g_cm, need_z):
        S, N = indices.shape
        f32 = torch.float32
        x = rows.detach().to(f32).contiguous()
        D = x.shape[1]
        cbs = [cb.detach().to(f32).contiguous() for cb in stage_cbs]
        idx = indices.contiguous()
        gzq = g_zq.to(f32).contiguous() if g_zq is not None and need_z else None
        gcb = g_cb.to(f32).contiguous() if g_cb is not None else None
        gcm = g_cm.to(f32).contiguous() if g_cm is not None and need_z else None
        grad_z = native.fresh_output(torch.empty(N, D, dtype=f32)) if need_z else None
        # One buffer per stage that wants its codebook's gradient (a shared codebook sums its
        # stages' in stage order below, as the loop does).
        stage_g = [torch.empty(cb.shape, dtype=f32) if gcb is not None and need else None
                   for cb, need in zip(cbs, stage_need)]
        native.module().cpu_residual_backward(
            N, D, x.data_ptr(), [cb.data_ptr() for cb in cbs], [cb.shape[0] for cb in cbs],
            idx.data_ptr(), gzq.data_ptr() if gzq is not None else 0,
            gcb.data_ptr() if gcb is not None else 0, gcm.data_ptr() if gcm is not None else 0,
            grad_z.data_ptr() if grad_z is not None else 0,
            [g.data_ptr() if g is not None else 0 for g in stage_g],
            max(1, torch.get_num_threads()), ctx.cosine)
        grads = [None] * len(codebooks)
        for s, g in enumerate(stage_g):
            if g is None:
                continue
            i = 0 if ctx.shared else s
            grads[i] = g if grads[i] is None else grads[i].add_(g)
        out_cb = [None if not need or g is None else g.to(cb.dtype)
                  for need, g, cb in zip(need_cb, grads, codebooks)]
        return (grad_z.to(rows.dtype) if need_z else None, None, None, None, None, *out_cb)


def residual_vq(z: Tensor, codebooks: Codebooks, *, beta: float = 0.25,
                channel_dim: Optional[int] = None, dim: Optional[int] = None,
                num_stages: Optional[int] = None, active_stages: Optional[Tensor] = None,
                mask: Optional[Tensor] = None, backend: str = "auto",
                cosine: bool = False) -> RVQOutput:
    """Residual vector quantization of `z` along `channel_dim` (default -1; `dim` is its former
    name, still accepted) (see the module docstring for the exact definitions and the loss
    convention).

    cosine: stage s searches the unit rows of its residual, u_s = r_s / max(||r_s||, 1e-12)
        (`_unit_rows`: the norm from a float64 sum of squares), against the codebooks as given
        (normalise them first: ResidualVectorQuantizer(cosine=True) does), and subtracts the
        chosen (unit) code from r_s; the losses and sqerr are u_s's errors, and the commitment
        gradient reaches z through the normalisation. One native call on the CPU.

    codebooks: a list of S codebooks (K_s, D) (sizes may differ), an (S, K, D) tensor, or one
        (K, D) codebook shared by every stage (then pass num_stages=S). Any differentiable
        tensor works (e.g. W @ C_frozen): the codebook gradient flows back through it.
    active_stages: int tensor broadcastable to z's rows (z's shape without `dim`): how many
        stages each row uses, 0..S (quantizer dropout; the rest get index -1). None: all.
    mask: bool tensor broadcastable to z's rows, True where a row is real: padding rows (False)
        are still quantized but add nothing to the losses, the perplexity or `counts`.
    Returns RVQOutput; `indices` has z's shape without `dim` plus a last axis of S.
    """
    stages, shared = _stage_list(codebooks, num_stages)
    dim = _check(z, stages[0], _channel_axis(channel_dim, dim), backend, "z")
    for s, cb in enumerate(stages[1:], 1):
        _check_book(z, cb, dim, backend, f"stage {s}")
    beta = _check_beta(beta)
    S = len(stages)
    lead = z.movedim(dim, -1).shape[:-1]
    active = _active_per_row(active_stages, lead, z.device, S)
    if not isinstance(cosine, bool):
        raise TypeError(f"cosine must be a bool, got {cosine!r}")
    valid = _per_row("mask", mask, lead, z.device, torch.bool)
    if mask is not None and mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True = a real row), got {mask.dtype}")
    rows = _rows(z, dim)
    D = rows.shape[1]
    uniq = stages[:1] if shared else stages
    z_q, indices, err_cb, err_cm = _ResidualFn.apply(rows, active, backend,
                                                     S if shared else 0, bool(cosine), *uniq)
    acc = err_cb.dtype
    w = None if valid is None else valid.to(acc)
    n = rows.shape[0] if valid is None else valid.sum()
    denom = (n * D) if valid is not None else max(rows.shape[0] * D, 1)
    if valid is not None:
        denom = torch.clamp(denom, min=1).to(acc)
        cb_loss = _SumRows.apply(err_cb * w) / denom
        cm_loss = _SumRows.apply(err_cm * w) / denom
    else:
        cb_loss, cm_loss = _SumRows.apply(err_cb) / denom, _SumRows.apply(err_cm) / denom
    loss = (cb_loss + beta * cm_loss).sum()
    Ks = [cb.shape[0] for cb in stages]
    if active is None and valid is None:
        # Every row at every stage: integer counts, no weights (no -1 index to clear).
        counts, perp = _usage(indices, Ks, None, acc)
    else:
        ok = indices >= 0 if valid is None else (indices >= 0) & valid
        counts, perp = _usage(indices.clamp(min=0), Ks, ok.to(acc), acc)
    z_q = z_q.reshape(*lead, D).movedim(-1, dim)
    # Straight-through on the sum: the op's z_q already carries grad z = grad z_q.
    return RVQOutput(z_q, indices.T.reshape(*lead, S), cb_loss, cm_loss, loss,
                     err_cb.detach().T.reshape(*lead, S), perp, counts)


# ------------------------------------------------------------------------------ decoding
def codes_from_indices(indices: Tensor, codebooks: Codebooks, *, num_stages: Optional[int] = None,
                       dim: int = -1, dtype: Optional[torch.dtype] = None) -> Tensor:
    """The summed codes of residual-VQ `indices` (..., S) (-1: a stage left out), bit for bit the
    z_q that residual_vq returned for them: fl(((0 + e_0) + e_1) + ...) in the accumulation
    dtype, cast to the codebooks' dtype (or `dtype`). The code axis is placed at `dim` of the
    output. Differentiable in the codebooks."""
    stages, _ = _stage_list(codebooks, num_stages)
    first = stages[0]
    for s, cb in enumerate(stages):
        if not isinstance(cb, Tensor) or cb.dim() != 2:
            raise ValueError(f"codebooks: stage {s}'s codebook must be a (K, D) tensor, got "
                             f"{tuple(cb.shape) if isinstance(cb, Tensor) else type(cb).__name__}")
        # The stages are summed into one code: they must agree on D, dtype and device.
        if cb.shape[1] != first.shape[1]:
            raise ValueError(f"codebooks: stage {s}'s codes have D={cb.shape[1]} but stage 0's "
                             f"have D={first.shape[1]}")
        if cb.dtype != first.dtype or cb.device != first.device:
            raise TypeError(f"codebooks: stage {s}'s codebook is {cb.dtype} on {cb.device} but "
                            f"stage 0's is {first.dtype} on {first.device}")
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating-point torch.dtype (the codes' dtype), got "
                        f"{dtype!r}")
    if not isinstance(indices, Tensor) or indices.dtype not in (torch.long, torch.int32,
                                                                 torch.int16, torch.uint8):
        raise TypeError("indices must be an integer tensor (..., S)")
    S = len(stages)
    if indices.dim() < 1 or indices.shape[-1] != S:
        raise ValueError(f"indices must end in an axis of {S} stages, got shape "
                         f"{tuple(indices.shape)}")
    if indices.device != first.device:
        raise ValueError(f"indices are on {indices.device} but the codebooks on {first.device}")
    if isinstance(dim, bool) or not isinstance(dim, int) or \
            not -indices.dim() <= dim < indices.dim():
        raise ValueError(f"dim={dim!r} is not a dimension of the output (indices' shape "
                         f"{tuple(indices.shape)}, the stage axis replaced by the code axis)")
    _check_index_range(indices, [cb.shape[0] for cb in stages], "stage", -1)
    out_dtype = dtype or first.dtype
    acc = reference.acc_dtype(first.dtype)
    q = torch.zeros(*indices.shape[:-1], stages[0].shape[1], dtype=acc, device=indices.device)
    for s, cb in enumerate(stages):
        idx = indices[..., s].long()
        e = F.embedding(idx.clamp(min=0), cb.to(acc))
        q = q + torch.where((idx >= 0)[..., None], e, 0)  # in stage order, from 0: the forward's sum
    return q.to(out_dtype).movedim(-1, dim)


# ------------------------------------------------------------------------------ grouped
class GVQOutput(NamedTuple):
    z_q: Tensor              # z's shape and dtype; straight-through
    indices: Tensor          # int64, z's shape without `dim` plus a last axis of G groups
    codebook_loss: Tensor    # (G,) per group, mean over the group's elements
    commitment_loss: Tensor  # (G,)
    loss: Tensor             # sum over groups of codebook_loss + beta * commitment_loss
    perplexity: Tensor       # (G,)
    counts: list             # G int64 tensors (K_g,)



def grouped_vq(z: Tensor, codebooks: Codebooks, *, groups: Optional[int] = None,
               beta: float = 0.25, channel_dim: Optional[int] = None,
               dim: Optional[int] = None, mask: Optional[Tensor] = None,
               backend: str = "auto") -> GVQOutput:
    """Grouped (multi-head) VQ: the D channels of `z` along `channel_dim` (default -1; `dim` is
    its former name, still accepted) split into G equal groups of
    D/G, group g quantized against its own codebook (a list of G (K_g, D/G) codebooks or a
    (G, K, D/G) tensor) or against one shared (K, D/G) codebook (then pass groups=G).

    A shared codebook is one call of the single-stage op on the (N G, D/G) rows. Own codebooks
    run as one launch on Triton (fp32/16-bit: a grid axis over the groups) and as one native call
    on the CPU (fp32/16-bit widened), each group's search exact by issue 13's contract and the
    gradients the per-group loop's; one single-stage call per group on the other backends.
    Losses are per group: the mean of
    the squared error over that group's elements of the unmasked rows, so with G = 1 they equal
    vq_quantize's. `mask` (True = a real row) as in residual_vq.
    """
    if not isinstance(z, Tensor):
        raise TypeError(f"z must be a torch.Tensor, got {type(z).__name__}")
    books, shared = _stage_list(codebooks, groups, "groups", "group")
    G = len(books)
    dim = _channel_axis(channel_dim, dim)
    if isinstance(dim, bool) or not isinstance(dim, int) or z.dim() == 0 or \
            not -z.dim() <= dim < z.dim():
        raise ValueError(f"dim={dim!r} is not a dimension of z (shape {tuple(z.shape)})")
    dim = dim % z.dim()
    if z.shape[dim] % G:
        raise ValueError(f"z has {z.shape[dim]} channels along dim={dim}, not divisible by "
                         f"{G} groups")
    d = z.shape[dim] // G
    beta = _check_beta(beta)
    zm = z.movedim(dim, -1)
    lead = zm.shape[:-1]
    N = int(torch.Size(lead).numel())
    valid = _per_row("mask", mask, lead, z.device, torch.bool)
    if mask is not None and mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True = a real row), got {mask.dtype}")
    parts = zm.reshape(N, G, d)
    counts = None
    if shared:
        rows = parts.reshape(N * G, d)
        _check(rows, books[0], -1, backend, "z")
        zq, idx, e_cb, e_cm = _vq_rows(rows, books[0], backend)
        # (G, N) views of the (N G) rows' results.
        zq, idx = zq.reshape(N, G, d), idx.reshape(N, G).T
        e_cb, e_cm = e_cb.reshape(N, G).T, e_cm.reshape(N, G).T
    else:
        for g in range(G):
            _check_book(parts[:, g, :], books[g], -1, backend, f"group {g}")
        fused = _grouped_fused(parts, books, backend)
        if fused is not None:
            zq, idx, e_cb, e_cm, counts = fused
        else:
            outs = [_vq_rows(parts[:, g, :], books[g], backend) for g in range(G)]
            zq = torch.stack([o[0] for o in outs], 1)
            idx, e_cb, e_cm = (torch.stack([o[i] for o in outs], 0) for i in (1, 2, 3))
    # idx, e_cb, e_cm: (G, N), group g in row g.
    acc = e_cb.dtype
    if valid is not None:
        w = valid.to(acc)[None, :]
        e_cb, e_cm = e_cb * w, e_cm * w
        denom = valid.sum().clamp(min=1).to(acc) * d
    else:
        denom = max(N * d, 1)
    cb_loss, cm_loss = _SumRows.apply(e_cb) / denom, _SumRows.apply(e_cm) / denom
    Ks = [books[0 if shared else g].shape[0] for g in range(G)]
    if counts is not None and counts.numel() and valid is None:
        # The native call's own counts (every row counted once): only the perplexities are left.
        counts = list(counts.split(Ks))
        perp = _perplexity(torch.stack(counts), N, acc) if len(set(Ks)) == 1 else \
            torch.stack([_perplexity(c, N, acc) for c in counts])
    else:
        counts, perp = _usage(idx, Ks, None if valid is None else valid.to(acc)[None], acc)
    zq = zq.reshape(*lead, G * d).movedim(-1, dim)
    # (N, G), contiguous: a view for the shared path; stacking the rows is the quicker transpose.
    idx = idx.T if idx.T.is_contiguous() else torch.stack(idx.unbind(0), 1)
    return GVQOutput(zq, idx.reshape(*lead, G), cb_loss, cm_loss, (cb_loss + beta * cm_loss).sum(),
                     perp, counts)


def _perplexity(counts: Tensor, n: int, acc: torch.dtype) -> Tensor:
    """exp of the entropy of the usage `counts` / n along the last axis (n rows, each counted
    once), in `acc`: the perplexity of the counts a native call wrote."""
    return torch.special.entr(counts.to(acc) / max(n, 1)).sum(-1).exp()


def _usage(idx: Tensor, Ks: list[int], weights: Optional[Tensor], acc: torch.dtype
           ) -> tuple[list[Tensor], Tensor]:
    """Per stage or group s (row s of the (S, N) indices `idx`, K_s codes): how often each code
    was chosen, weighted by `weights` ((S, N) or (1, N); None: every row once), as int64 counts,
    and the perplexity exp(entropy) of that usage, a (S,) tensor in `acc`. Equal K_s (the usual
    case) take one bincount over all stages, each stage's codes offset by s K: a bin only ever
    receives its own stage's rows, in the same order, so the counts are the per-stage ones."""
    S = idx.shape[0]
    if S > 1 and len(set(Ks)) == 1:
        K = Ks[0]
        flat = (idx + torch.arange(S, device=idx.device)[:, None] * K).reshape(-1)
        w = None if weights is None else weights.expand(S, -1).reshape(-1)
        c = torch.bincount(flat, weights=w, minlength=S * K).reshape(S, K)
        p = c.to(acc) / c.sum(1, keepdim=True).clamp(min=1).to(acc)
        counts = c.round().long() if c.is_floating_point() else c
        return list(counts.unbind(0)), torch.special.entr(p).sum(1).exp()
    counts, perp = [], []
    for s in range(S):
        w = None if weights is None else weights[min(s, weights.shape[0] - 1)]
        c = torch.bincount(idx[s], weights=w, minlength=Ks[s])
        counts.append(c.round().long() if c.is_floating_point() else c)
        p = c.to(acc) / c.sum().clamp(min=1).to(acc)
        perp.append(torch.special.entr(p).sum().exp())
    return counts, torch.stack(perp)


def grouped_codes_from_indices(indices: Tensor, codebooks: Codebooks, *,
                               groups: Optional[int] = None, dim: int = -1) -> Tensor:
    """The codes of grouped-VQ `indices` (..., G), concatenated group after group into the code
    axis (placed at `dim`): bit for bit the z_q grouped_vq returned for them."""
    books, _ = _stage_list(codebooks, groups, "groups", "group")
    G = len(books)
    if not isinstance(indices, Tensor) or indices.dtype.is_floating_point or \
            indices.dtype == torch.bool or indices.dim() < 1 or indices.shape[-1] != G:
        raise ValueError(f"indices must be an integer tensor ending in an axis of G={G} groups, "
                         f"got {getattr(indices, 'shape', type(indices))}")
    _check_index_range(indices, [cb.shape[0] for cb in books], "group", 0)
    return torch.cat([F.embedding(indices[..., g].long(), books[g]) for g in range(G)],
                     -1).movedim(-1, dim)


class _GroupedFn(torch.autograd.Function):
    """Grouped VQ with each group's own codebook as one fused Triton launch (a grid axis over the
    groups, vqkernels.triton.residual.grouped_forward) or one native CPU call. The outputs are
    the per-group loop's: z_q (N, G, d) straight-through, indices (G, N), and the squared error
    twice, (G, N) each, one per gradient path (codebook loss -> codebooks, commitment loss -> z).
    The backward is the loop's, group by group: the backend's single-stage backward on that
    group's rows (on the CPU all groups in one native call that sums in the single-stage order),
    so the gradients are the loop's bit for bit."""

    @staticmethod
    def forward(ctx, parts, backend, *codebooks):
        N, G, d = parts.shape
        # 16-bit values widen to fp32 exactly; the codes come back to parts' dtype exactly.
        x = parts.detach().reshape(N, G * d).to(torch.float32)
        cbs = [cb.detach().to(torch.float32).contiguous() for cb in codebooks]
        if backends.resolve(backend, parts.device).name == "cpu":
            # One native call: every group's codebook packed, (group, row tile) pairs shared
            # out to the threads, each searched by the single-stage kernel (csrc/cpu/vq_cpu.cpp,
            # grouped_forward).
            x = x.contiguous()
            z_q = native.fresh_output(torch.empty(N, G * d, dtype=torch.float32))
            idx = torch.empty(G, N, dtype=torch.long)
            err = torch.empty(G, N, dtype=torch.float32)
            # Each group's code counts, written by the same call (group after group).
            counts = torch.empty(sum(cb.shape[0] for cb in cbs), dtype=torch.long)
            native.module().cpu_grouped_forward(
                (x.data_ptr(), 1, N, G * d, 0, G * d, 1), [cb.data_ptr() for cb in cbs],
                [cb.shape[0] for cb in cbs], (z_q.data_ptr(), 1, N, G * d, 0, G * d, 1),
                idx.data_ptr(), err.data_ptr(), max(1, torch.get_num_threads()),
                counts.data_ptr())
        else:
            from .triton import residual as triton_residual
            z_q, idx, err = triton_residual.grouped_forward(x, cbs)
            counts = idx.new_empty(0)  # not counted here: the caller's bincount
        # (G, N), as the kernels write them: each group's indices and errors one contiguous row,
        # which the backward, the bincounts and the loss sums read (no transposes).
        idx, err = idx.contiguous(), err.contiguous()
        ctx.save_for_backward(parts, idx, *codebooks)
        ctx.backend = backend
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(idx, counts)
        return z_q.reshape(N, G, d).to(parts.dtype), idx, err, err.clone(), counts

    @staticmethod
    def backward(ctx, g_zq, _g_idx, g_cb, g_cm, _g_counts):
        parts, idx, *codebooks = ctx.saved_tensors  # idx: (G, N)
        b = backends.resolve(ctx.backend, parts.device)
        G = parts.shape[1]
        if b.name == "cpu" and _FUSED_CPU_BACKWARD:
            return _GroupedFn._cpu_backward(ctx, parts, idx, codebooks, g_zq, g_cb, g_cm)
        grad_z = torch.empty_like(parts) if ctx.needs_input_grad[0] else None
        grads = [None] * G
        for g in range(G):
            x = parts[:, g, :]
            gz, gc = b.backward(x, -1, codebooks[g], idx[g],
                                None if g_zq is None else g_zq[:, g, :],
                                None if g_cb is None else g_cb[g],
                                None if g_cm is None else g_cm[g], RowPlan(x, -1))
            if grad_z is not None:
                grad_z[:, g, :] = gz
            if ctx.needs_input_grad[2 + g]:
                grads[g] = gc
        return (grad_z, None, *grads)

    @staticmethod
    def _cpu_backward(ctx, parts, idx, codebooks, g_zq, g_cb, g_cm):
        # The loop above as one native call (csrc/cpu/vq_cpu.cpp, grouped_backward_t): every
        # group's single-stage backward on its column views, the codebook sums in the
        # single-stage order, so the same values bit for bit; grad_x written straight into
        # grad_z's columns and no codebook gradient computed for a codebook that needs none.
        # One call instead of G saves the per-group overhead (argument checks, G parallel
        # regions, G weight copies): the weights are read where autograd left them.
        N, G, d = parts.shape
        acc = reference.acc_dtype(parts.dtype)
        grad_z = native.fresh_output(torch.empty((N, G, d), dtype=parts.dtype)) \
            if ctx.needs_input_grad[0] else None
        # (N, G d) views as they are (reshape copies only where no view exists).
        x = parts.reshape(N, G * d)
        gzq = g_zq.reshape(N, G * d) if g_zq is not None and grad_z is not None else None

        def weights(w):  # (G, N): strides along n, then g
            if w is None:
                return None, 0, 0
            w = w.to(acc)
            return w, w.stride(1), w.stride(0)

        w_cb, cb_sn, cb_sg = weights(g_cb)
        w_cm, cm_sn, cm_sg = weights(g_cm if grad_z is not None else None)
        cbs = [cb.contiguous() for cb in codebooks]
        gcs = [torch.empty(cb.shape, dtype=acc) if ctx.needs_input_grad[2 + g] else None
               for g, cb in enumerate(cbs)]

        def view(t):
            return (t.data_ptr(), 1, N, G * d, 0, t.stride(0), t.stride(1))

        native.module().cpu_grouped_backward(
            native.dtype_code(parts.dtype), view(x), [cb.data_ptr() for cb in cbs],
            [cb.shape[0] for cb in cbs], idx.data_ptr(),
            view(gzq) if gzq is not None else NULL_VIEW,
            w_cb.data_ptr() if w_cb is not None else 0, cb_sn, cb_sg,
            w_cm.data_ptr() if w_cm is not None else 0, cm_sn, cm_sg,
            (grad_z.data_ptr(), 1, N, G * d, 0, G * d, 1) if grad_z is not None else NULL_VIEW,
            [gc.data_ptr() if gc is not None else 0 for gc in gcs],
            max(1, torch.get_num_threads()))
        grads = [None if gc is None else gc.to(cb.dtype) for gc, cb in zip(gcs, codebooks)]
        return (grad_z, None, *grads)


def _grouped_fused(parts: Tensor, books: list[Tensor], backend: str):
    """The one-call grouped search (own codebooks: one Triton launch, or one native CPU call)
    where it applies, else None (the caller loops over the groups)."""
    if parts.shape[0] == 0:
        return None
    b = backends.resolve(backend, parts.device)
    if b.name not in ("triton", "cpu"):
        return None
    N, G, d = parts.shape
    if parts.dtype not in (torch.float32, torch.float16, torch.bfloat16) or \
            any(cb.dtype != parts.dtype or cb.dim() != 2 for cb in books):
        return None
    if b.name == "triton":
        from .triton import residual as triton_residual
        if G > 65535 or not triton_residual.fits(N, G * d, d, [cb.shape[0] for cb in books]):
            return None
    return _GroupedFn.apply(parts, backend, *books)


def _vq_rows(rows, cb, backend):
    """The single-stage op on (n, d) rows: (z_q, indices, err_codebook, err_commit), each error
    with its own gradient path (see vqkernels.ops)."""
    from . import ops
    if ops.use_triton_ops(backend, rows.device):
        z_q, idx, e_cb, e_cm, _ = torch.ops.vqkernels.triton_vq_quantize(rows, cb, -1)
    else:
        z_q, idx, e_cb, e_cm, _ = torch.ops.vqkernels.vq_quantize(rows, cb, -1, backend)
    return z_q, idx, e_cb, e_cm
