"""ResidualVectorQuantizer and GroupedVectorQuantizer: several codebooks, each kept healthy by the
same upkeep as `VectorQuantizer` (EMA, k-means++ init, dead-code restarts, usage statistics), with
one packed all_reduce per training step for all of them under torch.distributed.

Each codebook is a `VectorQuantizer` held in ``.books`` (stage s or group g); its buffers, its
options and its ``stats()`` are the single-codebook ones. The modules drive the search themselves
(the fused `vqkernels.residual_vq` where it applies) and then hand every codebook its own rows for
upkeep: stage s of a residual quantizer is kept up to date on the residuals it searched.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import backends, native
from ..quantize import _FLOATS, _channel_axis_override, _check, _check_beta, nearest_code
from ..residual import (GVQOutput, RVQOutput, _active_per_row, _check_index_range, _grouped_fused,
                        _per_row, _perplexity, _unit_rows, _vq_rows, codes_from_indices,
                        residual_vq)
from .upkeep import DistContext, batch_usage, book_losses, check_positive_int, upkeep_errors
from .vector import VectorQuantizer

__all__ = ["ResidualVectorQuantizer", "GroupedVectorQuantizer"]

# Stage / group s draws its restart and k-means++ streams from seed + s * _SEED_STRIDE, so that
# books initialised on similar rows do not pick the same rows.
_SEED_STRIDE = 7919

# ResidualVectorQuantizer's training statistics from one native call on the CPU (bitwise the
# stage loop in _forward_fused, which tests compare it with by switching this off).
_NATIVE_STATS = True

# The books' statistics packed and, once summed, applied by batched calls where the books are
# alike (VectorQuantizer._pack_stats_books / _upkeep_apply_books, bitwise the book-by-book loop,
# which tests compare them with by switching this off).
_BATCHED_UPKEEP = True


def _counts_list(num_codes, n: int, name: str) -> list[int]:
    if isinstance(num_codes, int) and not isinstance(num_codes, bool):
        ks = [num_codes] * n
    elif isinstance(num_codes, (list, tuple)):
        ks = list(num_codes)
        if len(ks) != n:
            raise ValueError(f"num_codes has {len(ks)} entries but there are {n} {name}s")
    else:
        raise TypeError(f"num_codes must be an int or a list of ints, got {num_codes!r}")
    for k in ks:
        check_positive_int("num_codes", k)
    return ks


def _check_indices(indices, Ks: list[int], unit: str, lowest: int) -> None:
    """The modules' codes_from_indices argument: integers (..., len(Ks)), unit i's in
    [lowest, Ks[i]) (lowest -1: a residual stage left out)."""
    n = len(Ks)
    if not isinstance(indices, Tensor) or indices.dtype.is_floating_point or \
            indices.dtype.is_complex or indices.dtype == torch.bool:
        raise TypeError(f"indices must be an integer tensor (..., {n}), got "
                        f"{getattr(indices, 'dtype', type(indices).__name__)}")
    if indices.dim() < 1 or indices.shape[-1] != n:
        raise ValueError(f"indices must end in an axis of {n} {unit}s, got shape "
                         f"{tuple(indices.shape)}")
    _check_index_range(indices, Ks, unit, lowest)


def _check_mask(mask) -> None:
    # As residual_vq and grouped_vq: a float mask is refused rather than cast (weights of 0.5
    # would become True).
    if isinstance(mask, Tensor) and mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True = a real row), got {mask.dtype}")


def _stat_tensors(books: list, Ks: list[int], D: int, sels: list) -> tuple:
    """Alike books' (VectorQuantizer._alike) statistics buffers, each book's a row: counts
    (S, K) int64, EMA sums (S, K, D) float32 (None without EMA), restart candidates (S, m, D)
    float32 (None without restarts; m the draws' common length)."""
    S, K = len(books), Ks[0]
    sums = torch.empty(S, K, D, dtype=torch.float32) if books[0].ema else None
    cand = None if sels[0] is None else torch.empty(S, sels[0].numel(), D, dtype=torch.float32)
    return torch.empty(S, K, dtype=torch.long), sums, cand


class _Books(nn.Module):
    """What both modules share: the books, their construction, the packed upkeep, stats."""

    def _make_books(self, n: int, num_codes, dim: int, beta: float, shared: bool, unit: str,
                    seed: int, **vq_kwargs) -> None:
        if vq_kwargs.get("rotation_trick") is True:  # (a non-bool: VectorQuantizer says so)
            # The books' forward is never called: z_q is one straight-through copy of the sum
            # (of the groups), so a per-book option would be silently ignored.
            raise ValueError(f"rotation_trick=True is not supported by {type(self).__name__} "
                             "(its gradient is straight-through on the whole z_q)")
        ks = _counts_list(num_codes, 1 if shared else n, unit)
        self.books = nn.ModuleList(
            VectorQuantizer(k, dim, beta, seed=seed + i * _SEED_STRIDE, **vq_kwargs)
            for i, k in enumerate(ks))
        self.shared = shared

    def _book(self, i: int) -> VectorQuantizer:
        return self.books[0 if self.shared else i]

    def _make_projections(self, n: int, dim: int, codebook_dim: Optional[int]) -> None:
        """With `codebook_dim`, unit i (stage or group) gets learned linear maps project_in[i]
        (dim -> codebook_dim, what its book searches) and project_out[i] (codebook_dim -> dim,
        what it adds back). Made after the books, every project_in before every project_out:
        the order the global RNG draws their initial weights in."""
        self.codebook_dim = codebook_dim
        if codebook_dim is not None:
            self.project_in = nn.ModuleList(nn.Linear(dim, codebook_dim) for _ in range(n))
            self.project_out = nn.ModuleList(nn.Linear(codebook_dim, dim) for _ in range(n))

    def _projected(self, i: int, x: Tensor) -> Tensor:
        """Unit i's rows in its book's space: project_in[i](x) with projections, else x."""
        return self.project_in[i](x) if self.codebook_dim is not None else x

    def _searched(self, x: Tensor) -> Tensor:
        """What the search sees of (projected) rows: l2-normalised with cosine."""
        return F.normalize(x, dim=-1) if self.cosine else x

    def _stage_input(self, i: int, r: Tensor) -> Tensor:
        """The rows unit i searches: its input projected (with codebook_dim) and normalised
        (with cosine)."""
        return self._searched(self._projected(i, r))

    def _stage_output(self, i: int, code: Tensor) -> Tensor:
        """What unit i adds back for `code`: project_out[i](code) with projections, else code."""
        return self.project_out[i](code) if self.codebook_dim is not None else code

    def _channels_last(self, z: Tensor, dim: Optional[int]) -> tuple[int, Tensor, torch.Size]:
        """Check z as vq_quantize checks its input (against a stand-in codebook of the module's
        `dim` channels: the books may be projected or grouped) and move its channel axis last:
        (the channel axis, z with it last, the shape of the rows it leaves)."""
        if not isinstance(z, Tensor):
            raise TypeError(f"z must be a torch.Tensor, got {type(z).__name__}")
        axis = self.channel_dim if dim is None else dim
        if isinstance(axis, int) and not isinstance(axis, bool) and z.dim() > 0 and \
                -z.dim() <= axis < z.dim() and z.shape[axis] != self.dim:
            # Said in the module's terms: its codes may have another size (codebook_dim, groups).
            raise ValueError(f"z has {z.shape[axis]} channels along dim={axis % z.dim()} but this "
                             f"{type(self).__name__} takes dim={self.dim}")
        stand_in = z.new_zeros((), dtype=z.dtype if z.dtype in _FLOATS else torch.float32) \
            .expand(1, self.dim)
        dim = _check(z, stand_in, axis, self.backend, "z")
        zm = z.movedim(dim, -1)
        return dim, zm, zm.shape[:-1]

    def _search_codebook(self, book: VectorQuantizer, dtype: torch.dtype, training: bool) -> Tensor:
        cb = book.codebook
        if training and (book.ema or book.restart_after is not None):
            cb = cb.clone()  # the upkeep rewrites it in place after the search (see VectorQuantizer)
        if book.cosine:
            cb = F.normalize(cb, dim=1)
        return cb.to(dtype) if cb.dtype != dtype else cb

    def _upkeep(self, per_unit: list[tuple[Tensor, Tensor, Tensor]]) -> None:
        """per_unit[i] = (rows, indices, row_err) for unit i (rows the book searched, inf error
        for rows that take no part). A shared book gets every unit's rows at once. One
        all_reduce for all books."""
        if self.shared:
            per_unit = [tuple(torch.cat(t) for t in zip(*per_unit))]
        ctx = self._dist()
        with torch.no_grad():
            self._upkeep_packed([b._upkeep_pack(r, -1, i.clamp(min=0), e, ctx)
                                 for b, (r, i, e) in zip(self.books, per_unit)], ctx)

    def _dist(self) -> DistContext:
        b = self.books[0]
        return DistContext(b.sync, b.process_group)

    def _upkeep_packed(self, bufs: Union[list, Tensor], ctx: DistContext) -> None:
        """The books' `_upkeep_pack` buffers (one per book, in order; each a tensor or the list
        of parts `_pack_stats(..., parts=True)` gives, so that they are copied once; or all of
        them already concatenated, from `_pack_stats_books`, whose books are alike: equal parts)
        summed over the ranks in one all_reduce, then applied."""
        if isinstance(bufs, Tensor):
            flat = ctx.all_reduce_(bufs)
            sizes = [flat.numel() // len(self.books)] * len(self.books)
        else:
            bufs = [b if isinstance(b, list) else [b] for b in bufs]
            flat = ctx.all_reduce_(torch.cat([p for parts in bufs for p in parts]))
            sizes = [sum(p.numel() for p in parts) for parts in bufs]
        if _BATCHED_UPKEEP and len(sizes) == len(self.books) and \
                VectorQuantizer._upkeep_apply_books(list(self.books), flat):
            return
        for b, buf in zip(self.books, flat.split(sizes)):
            b._upkeep_apply(buf)

    def _native_stats(self, r: Tensor) -> bool:
        """Whether the books' statistics come from one native call (residual_stats): own books of
        float32 codes, float32 rows r on the CPU backend."""
        if not _NATIVE_STATS or self.shared or r.dtype != torch.float32 or r.shape[0] == 0 \
                or any(b._stat_dtype() != torch.float32 for b in self.books):
            return False
        try:
            return backends.resolve(self.backend, r.device).name == "cpu"
        except (RuntimeError, ValueError):
            return False

    def _books_repr(self, count: str) -> str:
        """extra_repr's part common to both quantizers; `count` names how many books there are."""
        s = (f"dim={self.dim}, {count}, beta={self.beta}, "
             f"shared_codebook={self.shared}, backend={self.backend!r}")
        if self.codebook_dim is not None:
            s += f", codebook_dim={self.codebook_dim}"
        if self.cosine:
            s += ", cosine=True"
        return s

    def stats(self) -> list[dict[str, float]]:
        """Each book's `VectorQuantizer.stats()` (one entry when the codebook is shared)."""
        return [b.stats() for b in self.books]


class ResidualVectorQuantizer(_Books):
    """Residual VQ with `num_stages` codebooks (stage s quantizes what stages < s left), each kept
    up like a `VectorQuantizer` (EMA, k-means++ init on its own residuals, dead-code restarts,
    usage stats), with one packed all_reduce per training step for all stages.

    Arguments (the rest are VectorQuantizer's and apply to every stage's book; ``seed`` is
    offset per stage):
      dim: channels of the input along ``channel_dim``.
      num_stages: S.
      num_codes: codes per stage, an int or a list of S ints.
      beta: commitment weight. ``loss = sum_s codebook_loss[s] + beta * commitment_loss[s]`` (in
        EMA mode the codebook term is left out: the books move by EMA).
      shared_codebook: one book for every stage (its upkeep sees every stage's rows).
      codebook_dim: when set (< dim), stage s searches ``project_in[s](r_s)`` of that size and
        adds ``project_out[s](code)`` (DAC-style factorised codes); the losses are in the
        projected space, so project_in learns from the commitment term and project_out from the
        gradient of z_q (the codes themselves are constants there).
      cosine: stage s searches l2-normalised (projected) residuals against l2-normalised codes
        (the squared-L2 search on unit vectors) and adds the unit code.
      quantize_dropout: in training, each sample (index along the first dimension of the rows'
        shape, z's shape without channel_dim) uses only the first n stages, n uniform in
        [dropout_min_stages, S] (SoundStream); the rest get index -1. Under data parallelism
        call ``shard_dropout(rank, world_size)`` once: each rank then draws the counts of the
        whole global batch (world_size times its own first dimension, from the default
        generator, which data-parallel ranks seed alike) and keeps its own slice, so a
        world_size-process run draws what one process does on the concatenated batch instead
        of the same pattern on every rank.

    Without projections or cosine the search is one fused `vqkernels.residual_vq` call (all
    stages per row block, exact indices at every stage); with them, a stage loop over the
    single-stage search (the projections sit between the stages).

    forward(z, *, channel_dim=None, mask=None, active_stages=None) -> vqkernels.RVQOutput
      channel_dim: this call's channel axis instead of the module's (dim= is its former name).
      mask: bool, z's shape without the channel dim, True for real rows: padding rows get no
        loss, no usage count, no EMA update, no restart candidacy.
      active_stages: explicit per-row stage counts (overrides quantize_dropout).
    codes_from_indices(indices) -> the summed codes (the z_q of the forward that gave them, up to
    the projection's float rounding), channels last.
    """

    def __init__(self, dim: int, num_stages: int, num_codes: Union[int, Sequence[int]] = 1024,
                 beta: float = 0.25, *, shared_codebook: bool = False,
                 codebook_dim: Optional[int] = None, cosine: bool = False,
                 quantize_dropout: bool = False, dropout_min_stages: int = 1,
                 channel_dim: int = -1, backend: str = "auto", seed: int = 0, **vq_kwargs):
        super().__init__()
        check_positive_int("dim", dim)
        check_positive_int("num_stages", num_stages)
        check_positive_int("codebook_dim", codebook_dim, allow_none=True)
        check_positive_int("dropout_min_stages", dropout_min_stages, minimum=0)
        if dropout_min_stages > num_stages:
            raise ValueError(f"dropout_min_stages={dropout_min_stages} exceeds num_stages="
                             f"{num_stages}")
        if backend not in backends.ALL_NAMES:
            raise ValueError(f"backend must be one of {backends.ALL_NAMES}, got {backend!r}")
        if isinstance(channel_dim, bool) or not isinstance(channel_dim, int):
            raise TypeError(f"channel_dim must be an int, got {channel_dim!r}")
        beta = _check_beta(beta)
        self.dim, self.num_stages, self.beta = dim, num_stages, float(beta)
        self.cosine = bool(cosine)
        self.quantize_dropout, self.dropout_min_stages = bool(quantize_dropout), dropout_min_stages
        self.dropout_shard = (0, 1)  # (rank, world_size): see shard_dropout
        self.channel_dim, self.backend = channel_dim, backend
        cd = codebook_dim or dim
        self._make_books(num_stages, num_codes, cd, beta, shared_codebook, "stage", seed,
                         backend=backend, cosine=cosine, **vq_kwargs)
        self.ema = self.books[0].ema
        self._make_projections(num_stages, dim, codebook_dim)

    def shard_dropout(self, rank: int, world_size: int) -> None:
        """Make quantizer dropout draw as one process would on the global batch: this module
        sits on rank `rank` of `world_size` data-parallel ranks, each with its own equal share
        of the batch, in rank order (see the class docstring)."""
        check_positive_int("world_size", world_size)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")
        self.dropout_shard = (rank, world_size)

    @property
    def fused(self) -> bool:
        """Whether forward runs the fused residual op (no projection, no cosine; the cosine
        search without projection is one native call too on the CPU, see _cosine_native)."""
        return self.codebook_dim is None and not self.cosine

    def codebooks(self) -> list[Tensor]:
        """The S stage codebooks as searched (normalised when cosine), in stage order."""
        return [self._search_codebook(self._book(s), self._book(s).codebook.dtype, False)
                for s in range(self.num_stages)]

    # ------------------------------------------------------------------------------ forward
    def forward(self, z: Tensor, *, channel_dim: Optional[int] = None, dim: Optional[int] = None,
                mask: Optional[Tensor] = None,
                active_stages: Optional[Tensor] = None) -> RVQOutput:
        dim, zm, lead = self._channels_last(z, _channel_axis_override(channel_dim, dim))
        rows = zm.reshape(-1, self.dim)
        S = self.num_stages
        training = self.training
        if active_stages is None and training and self.quantize_dropout and len(lead) > 0:
            rank, world = getattr(self, "dropout_shard", (0, 1))
            per_sample = torch.randint(self.dropout_min_stages, S + 1, (lead[0] * world,),
                                       device=z.device)[rank * lead[0]:(rank + 1) * lead[0]]
            active_stages = per_sample.view(-1, *([1] * (len(lead) - 1)))
        _check_mask(mask)
        active = _active_per_row(active_stages, lead, z.device, S)
        valid = _per_row("mask", mask, lead, z.device, torch.bool)
        if training and any(b.kmeans_init and not b._init_done for b in self.books):
            self._kmeans_initialise(rows, valid)
        if self.fused or self._cosine_native(rows):
            out = self._forward_fused(rows, active, valid, training)
        else:
            out = self._forward_loop(rows, active, valid, training)
        z_q, idx, cb_loss, cm_loss, loss, sqerr, perp, counts = out
        return RVQOutput(z_q.reshape(*lead, self.dim).movedim(-1, dim), idx.reshape(*lead, S),
                         cb_loss, cm_loss, loss, sqerr.reshape(*lead, S), perp, counts)

    def _forward_fused(self, rows, active, valid, training):
        cbs = [self._search_codebook(self._book(s), rows.dtype, training)
               for s in range(self.num_stages)]
        if self.shared:
            cbs = cbs[:1]
        out = residual_vq(rows, cbs[0] if self.shared else cbs, beta=self.beta,
                          num_stages=self.num_stages if self.shared else None,
                          active_stages=active, mask=valid, backend=self.backend,
                          cosine=self.cosine)
        if self.ema:
            cb_loss, loss = book_losses(out.codebook_loss, out.commitment_loss, self.beta, True)
            out = out._replace(codebook_loss=cb_loss, loss=loss)
        if training:
            with torch.no_grad():
                # Each stage's residual again (the kernel keeps them on chip), stage by stage:
                # own books take their statistics from it at once, so one residual buffer is
                # updated in place (a shared book needs every stage's rows together).
                r = rows.detach().to(out.sqerr.dtype)
                S, per, bufs, ctx = self.num_stages, [], [], self._dist()
                if self._native_stats(r):
                    self._upkeep_packed(self._native_upkeep(r, cbs, out, valid, ctx), ctx)
                    return out
                for s in range(S):
                    idx = out.indices[:, s]
                    # A cosine stage's book is kept up on the unit rows it searched.
                    x = _unit_rows(r) if self.cosine else r
                    err = upkeep_errors(out.sqerr[:, s], idx, valid)
                    if self.shared:
                        per.append((x, idx, err))
                    else:
                        bufs.append(self.books[s]._upkeep_pack(x, -1, idx.clamp(min=0), err, ctx))
                    if s + 1 == S:
                        break
                    e = cbs[0 if self.shared else s].detach().to(r.dtype) \
                        .index_select(0, idx.clamp(min=0))
                    if active is not None:  # rows that sat this stage out (index -1) keep r
                        e.masked_fill_((idx < 0)[:, None], 0)
                    # r may still be the caller's rows (s = 0) or a shared book's stage input.
                    r = r - e if s == 0 or self.shared else r.sub_(e)
                if self.shared:
                    self._upkeep(per)
                else:
                    self._upkeep_packed(bufs, ctx)
        return out

    def _native_upkeep(self, r: Tensor, cbs: list[Tensor], out: RVQOutput,
                       valid: Optional[Tensor], ctx: DistContext) -> Union[list, Tensor]:
        """The stage loop's `_upkeep_pack` buffers, bit for bit, from one native call
        (csrc/cpu/vq_cpu.cpp, residual_stats): each stage's counts and index_add_-ordered sums of
        the residuals (unit rows when cosine) it searched, and its restart candidates' rows (the
        same residuals at the rows drawn), with one residual buffer and no N x D temporaries."""
        N, D = r.shape
        x = r.contiguous()
        cb32 = [cb.detach().to(torch.float32).contiguous() for cb in cbs]
        idx = out.indices.t().contiguous()  # (S, N)
        # The rows each stage's book keeps up on, every stage at once ((S, N), valid broadcast).
        take = torch.isfinite(upkeep_errors(out.sqerr.t(), idx, valid)).contiguous()
        Ks = [cb.shape[0] for cb in cb32]
        books = list(self.books)
        sels = [b._restart_draw(N, ctx, x.device) for b in books]  # 1-D, contiguous
        # Alike books: their counts, sums and candidates are the rows of one tensor each, packed
        # for all books at once (bitwise the parts book by book).
        stacked = _stat_tensors(books, Ks, D, sels) if _BATCHED_UPKEEP and \
            VectorQuantizer._alike(books) else None
        if stacked is not None:
            counts, sums, cand = (list(t) if t is not None else [None] * len(books)
                                  for t in stacked)
        else:
            counts = [torch.empty(K, dtype=torch.long) for K in Ks]
            sums = [torch.empty(K, D, dtype=torch.float32) if b.ema else None
                    for b, K in zip(books, Ks)]
            cand = [None if sel is None else torch.empty(sel.numel(), D, dtype=torch.float32)
                    for sel in sels]
        native.module().cpu_residual_stats(
            N, D, x.data_ptr(), [cb.data_ptr() for cb in cb32], Ks, idx.data_ptr(),
            take.data_ptr(), self.cosine, [t.data_ptr() if t is not None else 0 for t in sums],
            [t.data_ptr() for t in counts], max(1, torch.get_num_threads()), False,
            [0 if t is None else t.data_ptr() for t in sels],
            [0 if t is None else t.numel() for t in sels],
            [0 if t is None else t.data_ptr() for t in cand])
        if stacked is not None:
            return VectorQuantizer._pack_stats_books(books, stacked[0], stacked[1], N, take, ctx,
                                                     sels, stacked[2])
        return [b._pack_stats(counts[s], sums[s], N, None, take[s], ctx, parts=True,
                              sel=sels[s], cand=cand[s])
                for s, b in enumerate(books)]

    def _cosine_native(self, rows: Tensor) -> bool:
        """Whether the cosine search without projections runs the fused op (one native CPU
        call for every stage, the residual normalised inside the kernel)."""
        if not self.cosine or self.codebook_dim is not None or rows.dtype != torch.float32 \
                or rows.shape[0] == 0:
            return False
        try:
            return backends.resolve(self.backend, rows.device).name == "cpu"
        except (RuntimeError, ValueError):
            return False

    def _forward_loop(self, rows, active, valid, training):
        N, S = rows.shape[0], self.num_stages
        acc = torch.float64 if rows.dtype == torch.float64 else torch.float32
        w_valid = None if valid is None else valid.to(acc)
        # N = 0: the losses are 0 (an empty sum), not NaN, as residual_vq's
        n = max(rows.shape[0], 1) if valid is None else valid.sum().clamp(min=1).to(acc)
        r = rows
        total = None
        idxs, errs, cb_l, cm_l, per, perp, counts = [], [], [], [], [], [], []
        for s in range(S):
            book = self._book(s)
            x = self._stage_input(s, r)
            cb = self._search_codebook(book, x.dtype, training)
            z_q, idx, e_cb, e_cm = _vq_rows(x, cb, self.backend)
            on = torch.ones(N, dtype=torch.bool, device=rows.device) if active is None \
                else active > s
            w = on.to(acc) if w_valid is None else on.to(acc) * w_valid
            d = x.shape[1]
            cb_l.append((e_cb * w).sum() / (n * d))
            cm_l.append((e_cm * w).sum() / (n * d))
            idx = torch.where(on, idx, -1)
            idxs.append(idx)
            errs.append(torch.where(on, e_cb.detach(), 0))
            c = self._stage_output(s, z_q.detach())  # gradient only to project_out's weights
            c = torch.where(on[:, None], c, 0)
            total = c if total is None else total + c
            r = r - c.detach()
            used = on if valid is None else on & valid
            cnt, pp = batch_usage(idx, used.to(acc), book.num_codes, acc)
            counts.append(cnt)
            perp.append(pp)
            per.append((x.detach(), idx, upkeep_errors(e_cb.detach(), idx, valid)))
        cm_loss = torch.stack(cm_l)
        cb_loss, loss = book_losses(torch.stack(cb_l), cm_loss, self.beta, self.ema)
        # Straight-through on the sum (grad z = grad z_q), plus the sum's own path to project_out.
        # The value is the sum itself: rows + (total - rows).detach() would round the codes to the
        # ulp of |rows| (large cosine inputs in 16 bits lost most of the code).
        total = total.to(rows.dtype)
        z_q = total.detach() + (rows - rows.detach()) + (total - total.detach())
        if training:
            with torch.no_grad():
                self._upkeep(per)
        return (z_q, torch.stack(idxs, 1), cb_loss, cm_loss, loss, torch.stack(errs, 1),
                torch.stack(perp), counts)

    # ------------------------------------------------------------------------------ init
    @torch.no_grad()
    def _kmeans_initialise(self, rows: Tensor, valid: Optional[Tensor]) -> None:
        """k-means++ for each stage in turn, on the residuals the initialised earlier stages
        leave (a shared book is initialised once, on the first stage's rows)."""
        r = rows.detach()
        if valid is not None:
            r = r[valid]
        for s in range(self.num_stages):
            book = self._book(s)
            x = self._stage_input(s, r)
            if book.kmeans_init and not book._init_done:
                book._kmeans_initialise(x, -1)
            cb = self._search_codebook(book, x.dtype, False)
            if not book._init_done or x.shape[0] == 0:
                return  # nothing to seed from this step (the same on every rank): try again
            idx, _ = nearest_code(x, cb, backend=self.backend)
            r = r - self._stage_output(s, cb[idx])

    # ------------------------------------------------------------------------------ decoding
    def codes_from_indices(self, indices: Tensor) -> Tensor:
        """The summed codes of `indices` (..., S) (-1: a stage left out), channels last. Without
        projections this is bit for bit the forward's z_q (vqkernels.codes_from_indices)."""
        if self.fused:
            return codes_from_indices(indices, self.codebooks())  # which checks them itself
        _check_indices(indices, [self._book(s).num_codes for s in range(self.num_stages)],
                       "stage", -1)
        total = None
        for s in range(self.num_stages):
            idx = indices[..., s]
            cb = self.codebooks()[s]
            c = self._stage_output(s, cb[idx.clamp(min=0)])
            c = torch.where((idx >= 0)[..., None], c, 0)
            total = c if total is None else total + c
        return total

    def extra_repr(self) -> str:
        s = self._books_repr(f"num_stages={self.num_stages}")
        if self.quantize_dropout:
            s += f", quantize_dropout=True, dropout_min_stages={self.dropout_min_stages}"
        return s


class GroupedVectorQuantizer(_Books):
    """Grouped (multi-head) VQ: the `dim` channels split into `groups` equal groups, each
    quantized by its own book (or one shared book) of `num_codes` codes, each kept up like a
    `VectorQuantizer`, one packed all_reduce per training step for all of them.

    Arguments (the rest are VectorQuantizer's and apply to every group's book; ``seed`` is
    offset per group):
      codebook_dim: when set, group g searches ``project_in[g](z_g)`` of that size (z_g its
        dim / groups channels; codes of that size) and its output is ``project_out[g](code)``,
        the learned in/out projections of ResidualVectorQuantizer's stages (the same code),
        with the same gradients: the losses are in the projected space, so project_in learns
        from the commitment term, project_out from the gradient of z_q, and z_g gets z_q's
        gradient straight through.
      cosine: group g searches its l2-normalised (projected) channels against l2-normalised
        codes and outputs the (projected) unit code.
    Without cosine, every group's search is one call (one native CPU call, or one Triton launch
    on the triton backend) where vqkernels.grouped_vq's fused path applies, projected or not,
    else a loop over the groups.
    forward(z, *, channel_dim=None, mask=None) -> vqkernels.GVQOutput (indices: z's shape without
    the channel dim plus a last axis of G; channel_dim: this call's channel axis instead of the
    module's, dim= its former name). In EMA mode ``loss = beta * sum_g commitment_loss[g]``.
    """

    def __init__(self, dim: int, groups: int, num_codes: Union[int, Sequence[int]] = 1024,
                 beta: float = 0.25, *, shared_codebook: bool = False,
                 codebook_dim: Optional[int] = None, cosine: bool = False, channel_dim: int = -1,
                 backend: str = "auto", seed: int = 0, **vq_kwargs):
        super().__init__()
        check_positive_int("dim", dim)
        check_positive_int("groups", groups)
        check_positive_int("codebook_dim", codebook_dim, allow_none=True)
        if dim % groups:
            raise ValueError(f"dim={dim} is not divisible by groups={groups}")
        if backend not in backends.ALL_NAMES:
            raise ValueError(f"backend must be one of {backends.ALL_NAMES}, got {backend!r}")
        if isinstance(channel_dim, bool) or not isinstance(channel_dim, int):
            raise TypeError(f"channel_dim must be an int, got {channel_dim!r}")
        beta = _check_beta(beta)
        self.dim, self.groups, self.beta = dim, groups, float(beta)
        self.cosine = bool(cosine)
        self.channel_dim, self.backend = channel_dim, backend
        d = dim // groups
        self._make_books(groups, num_codes, codebook_dim or d, beta, shared_codebook, "group",
                         seed, backend=backend, cosine=cosine, **vq_kwargs)
        self.ema = self.books[0].ema
        self._make_projections(groups, d, codebook_dim)

    def forward(self, z: Tensor, *, channel_dim: Optional[int] = None, dim: Optional[int] = None,
                mask: Optional[Tensor] = None) -> GVQOutput:
        dim, zm, lead = self._channels_last(z, _channel_axis_override(channel_dim, dim))
        G, d = self.groups, self.dim // self.groups
        parts = zm.reshape(-1, G, d)
        N = parts.shape[0]
        _check_mask(mask)
        valid = _per_row("mask", mask, lead, z.device, torch.bool)
        training = self.training
        proj = self.codebook_dim is not None
        # Each group's rows in its book's space (before the cosine normalisation, which the
        # books' own k-means applies): the channels themselves, or their projections.
        xs = torch.stack([self._projected(g, parts[:, g, :]) for g in range(G)], 1) if proj \
            else parts
        c = xs.shape[-1]
        if training:
            for g in range(G):
                book = self._book(g)
                if book.kmeans_init and not book._init_done:
                    x = xs[:, g:, :].reshape(-1, c) if self.shared else xs[:, g, :]
                    if valid is not None:
                        x = (xs[valid][:, g:, :].reshape(-1, c) if self.shared
                             else xs[valid][:, g, :])
                    book._kmeans_initialise(x.detach(), -1)
        acc = torch.float64 if z.dtype == torch.float64 else torch.float32
        # N = 0: the losses are 0 (an empty sum), not NaN, as grouped_vq's
        n = max(N, 1) if valid is None else valid.sum().clamp(min=1).to(acc)
        outs, cb_l, cm_l, per, perp, counts = [], [], [], [], [], []
        fused = None
        if not self.cosine and N > 0 and \
                backends.resolve(self.backend, z.device).name in ("cpu", "triton"):
            # All groups' searches in one native call or one Triton launch (vqkernels.grouped_vq's
            # path; _grouped_fused gives None where it does not apply, e.g. float64 or shapes
            # past the Triton kernel's limits, and the loop below runs instead).
            cbs = [self._search_codebook(self._book(g), xs.dtype, training) for g in range(G)]
            fused = _grouped_fused(xs, cbs, self.backend)
        for g in range(G):
            book = self._book(g)
            x = xs[:, g, :]
            if fused is not None:
                z_q = fused[0][:, g, :]
                idx, e_cb, e_cm = fused[1][g], fused[2][g], fused[3][g]  # (G, N) rows
            else:
                x = self._searched(x)
                cb = self._search_codebook(book, x.dtype, training)
                z_q, idx, e_cb, e_cm = _vq_rows(x, cb, self.backend)
            if proj:
                # As a residual stage's: z_g's gradient is z_q's (straight through), and the
                # output's own path reaches project_out's weights (the code is a constant).
                z_g = parts[:, g, :]
                out = self._stage_output(g, z_q.detach()).to(z_g.dtype)  # autocast: z's dtype
                z_q = out.detach() + (z_g - z_g.detach()) + (out - out.detach())  # value: out
            w = None if valid is None else valid.to(acc)
            cb_l.append((e_cb if w is None else e_cb * w).sum() / (n * c))
            cm_l.append((e_cm if w is None else e_cm * w).sum() / (n * c))
            outs.append((z_q, idx))
            if fused is not None and fused[4].numel() and w is None:
                # The native call's own counts (group after group; every row counted once).
                lo = sum(self._book(h).num_codes for h in range(g))
                cnt = fused[4][lo:lo + book.num_codes]
                pp = _perplexity(cnt, N, acc)
            else:
                cnt, pp = batch_usage(idx, w, book.num_codes, acc)
            counts.append(cnt)
            perp.append(pp)
            per.append((x.detach(), idx, upkeep_errors(e_cb.detach(), idx, valid)))
        cm_loss = torch.stack(cm_l)
        cb_loss, loss = book_losses(torch.stack(cb_l), cm_loss, self.beta, self.ema)
        if training:
            with torch.no_grad():
                if fused is not None and self._native_stats(xs):
                    ctx = self._dist()
                    self._upkeep_packed(self._native_group_upkeep(xs, per, ctx), ctx)
                else:
                    self._upkeep(per)
        # The one-call search's z_q is already (N, G, d): no copy of it group by group.
        z_q = fused[0] if fused is not None and not proj else torch.stack([o[0] for o in outs], 1)
        z_q = z_q.reshape(*lead, self.dim).movedim(-1, dim)
        idx = torch.stack([o[1] for o in outs], 1).reshape(*lead, G)
        return GVQOutput(z_q, idx, cb_loss, cm_loss, loss, torch.stack(perp), counts)

    def _native_group_upkeep(self, xs: Tensor, per: list,
                             ctx: DistContext) -> Union[list, Tensor]:
        """`_upkeep`'s buffers, bit for bit, from one native call (residual_stats, grouped): every
        group's counts and index_add_-ordered sums of its rows xs[:, g] (N, G, c), no per-group
        copies; the restart candidates' rows taken at the drawn rows only."""
        x = xs.detach().contiguous()
        N, G, c = x.shape
        idx = torch.stack([p[1] for p in per]).contiguous()  # (G, N)
        take = torch.stack([torch.isfinite(p[2]) for p in per]).contiguous()
        Ks = [b.num_codes for b in self.books]
        books = list(self.books)
        if _BATCHED_UPKEEP and VectorQuantizer._alike(books):
            # As the residual quantizer's: one tensor each, packed for all groups at once; the
            # candidates are the rows at each group's draw, taken for all groups in one gather.
            sels = [b._restart_draw(N, ctx, take.device) for b in books]
            counts, sums, _ = _stat_tensors(books, Ks, c, [None])
            native.module().cpu_residual_stats(
                N, c, x.data_ptr(), [0] * G, Ks, idx.data_ptr(), take.data_ptr(), False,
                [0] * G if sums is None else [t.data_ptr() for t in sums],
                [t.data_ptr() for t in counts], max(1, torch.get_num_threads()), True)
            cand = None if sels[0] is None else \
                x[torch.stack(sels), torch.arange(G, device=x.device)[:, None]]
            return VectorQuantizer._pack_stats_books(books, counts, sums, N, take, ctx, sels,
                                                     cand)
        counts = [torch.empty(K, dtype=torch.long) for K in Ks]
        sums = [torch.empty(K, c, dtype=torch.float32) if b.ema else None
                for b, K in zip(self.books, Ks)]
        native.module().cpu_residual_stats(
            N, c, x.data_ptr(), [0] * G, Ks, idx.data_ptr(), take.data_ptr(), False,
            [t.data_ptr() if t is not None else 0 for t in sums], [t.data_ptr() for t in counts],
            max(1, torch.get_num_threads()), True)
        return [b._pack_stats(counts[g], sums[g], N,
                              lambda sel, g=g: x[:, g, :].index_select(0, sel), take[g], ctx,
                              parts=True)
                for g, b in enumerate(self.books)]

    def codes_from_indices(self, indices: Tensor) -> Tensor:
        """The codes of grouped `indices` (..., G) (projected back with codebook_dim),
        concatenated along a last axis of `dim`."""
        _check_indices(indices, [self._book(g).num_codes for g in range(self.groups)], "group", 0)
        cbs = [self._search_codebook(self._book(g), self._book(g).codebook.dtype, False)
               for g in range(self.groups)]
        return torch.cat([self._stage_output(g, F.embedding(indices[..., g], cbs[g]))
                          for g in range(self.groups)], -1)

    def extra_repr(self) -> str:
        return self._books_repr(f"groups={self.groups}")
