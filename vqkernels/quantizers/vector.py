"""VectorQuantizer: one codebook, quantizing with `vqkernels.vq_quantize`, with its codebook upkeep."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import backends
from ..quantize import (_FLOATS, VQOutput, _channel_axis_override, _check, _check_beta,
                        _vq_quantize)
from .upkeep import (DistContext, ceil_div, check_positive_int, check_unit_interval,
                     kmeans_plusplus, laplace_smoothed, pick_rows, seeded_generator, usage_stats)

__all__ = ["VectorQuantizer"]


class VectorQuantizer(nn.Module):
    """A codebook of `num_codes` vectors of size `dim`, quantizing with `vq_quantize`.

    The defaults are a recipe that trains as it is: k-means++ init on the first training batch,
    EMA codebook updates and restarts of codes unused for 2 steps. The paper's plain recipe
    (``ema=False, restart_after=None, kmeans_init=False``: a codebook uniform in +-1/num_codes,
    trained by the codebook loss's gradient) collapses to a few codes in the first dozen steps of
    a VQ-VAE: early on the encoder's outputs move as a cloud by more than the cloud's own spread
    per step (Adam moves every weight by ~lr), while gradient-trained codes move by at most ~lr
    per coordinate, so all codes but those at the cloud's leading edge go unused and stay where
    they were; restarts that then land on the moved cloud hand the decoder codes of a scale it
    has never seen. EMA codes follow their rows at any speed and scale, and short-notice restarts
    re-seed the codes the cloud leaves behind (measured in README, "Codebook health").
    Under mixed precision the codebook is cast to the input's dtype for the search; in gradient
    mode its gradient flows back to the full-precision parameter.

    Codebook upkeep (every update happens in training mode only, once per forward, so call
    ``.eval()`` for evaluation passes):

    ema: the codebook is a buffer moved by exponential moving averages instead of by gradient
        (van den Oord et al. 2017, appendix; Sonnet's VectorQuantizerEMA). Per step, with this
        step's per-code counts c_k (the kernel's bincount) and sums s_k (a scatter-add of the rows
        over their indices): N_k <- decay N_k + (1-decay) c_k, S_k <- decay S_k + (1-decay) s_k,
        e_k = S_k / Ñ_k with Ñ_k = (N_k + eps) / (n + K eps) n the Laplace-smoothed size
        (n = sum N_k). The state starts as a pseudo-count N_k = 1 with S_k = e_k, so a code
        unused since the start stays put while decay^t >> eps (S_k and N_k decay alike) and only
        then is pulled towards the origin by the smoothing, where Sonnet v1 (N starting at 0)
        would blow it up by ~1/eps and a zero-debiased start would move it to 0 at once. Restarts
        are the cure for such codes. In this mode the codebook gets no gradient:
        ``codebook_loss`` still reports the quantization error (its value equals
        ``commitment_loss``) but is detached and left out of ``loss = beta * commitment_loss``.
    decay_warmup: the decay of update t (0, 1, ...) is min(decay, (1 + t) / (decay_warmup + t)):
        0.1 at first, 0.55 at t = 10, ``decay`` from t = 890 on (with the defaults), so the codes
        keep up with the encoder while its outputs move fast; None: ``decay`` from the start.
    restart_after: a code unused (globally, across ranks) for this many consecutive training steps
        (for a codebook larger than a step's rows, K > n: for max(restart_after,
        ceil(restart_after * K / n)) steps, the steps that bring restart_after * K rows, since a
        step uses at most n codes; n = this step's rows)
        is replaced by an encoder output drawn from a pool of rows sampled from the latest batch
        (``restart_pool`` rows, refilled every step), without reuse of a pool row. If the pool
        holds fewer rows than there are dead codes, the longest-unused codes go first (ties to
        the lowest index) and the rest wait. A restarted code gets EMA state N_k = 1, S_k = the
        row. Restarts are counted (``restart_count`` buffer, ``stats()``). In gradient mode the
        optimizer's state for a restarted row (e.g. Adam moments, decayed over the unused steps)
        is left as is.
    kmeans_init: at the first training forward the codebook is set by k-means++ on that batch's
        rows (at most ``kmeans_samples``, default 32 K, spread over the ranks), followed by
        ``kmeans_iters`` Lloyd iterations with the fused search. Seeding is sequential in K: meant
        for codebooks up to a few thousand codes.
    cosine: inputs and codes are l2-normalised along the code dimension before the same squared-L2
        search, which then ranks codes by angle. ``z_q`` is the unit code (straight-through to the
        normalised input) and each row's squared error is ||ẑ - ê||² = 2 - 2 cos(z, e), so
        ``codebook_loss``/``commitment_loss`` are mean(2 - 2 cos) / D (the mean is over elements,
        as always). EMA sums, restarts and k-means work on the normalised rows; the stored
        codebook is normalised on use.
    rotation_trick: z_q's gradient reaches z_e through the rotation and rescaling that maps each
        vector onto its code (Fifty et al. 2024; ``vq_quantize(rotation_trick=True)``, O(N D), no
        D x D matrix) instead of the straight-through identity. Losses and codebook upkeep are
        unchanged.

    Distributed: when torch.distributed is initialised (and ``sync``), each training step makes
    exactly one all_reduce over ``process_group`` (default: the world), a packed buffer of this
    step's per-code counts, EMA sums and restart-pool candidates (each rank fills its own slot), so
    every rank applies the same update and keeps an identical codebook. Restart choices come from a
    generator seeded by (seed, step), the same on every rank. The k-means init step adds two
    all_reduces and a broadcast, once. No collective depends on the data, only on the step: every
    rank must run the same number of training forwards (as DistributedDataParallel already needs).
    The module keeps its buffers identical itself, so DDP may be built without per-forward buffer
    broadcasts (``forward_sync_buffers=False``, or ``broadcast_buffers=False`` on a torch that
    lacks it). ``seed`` seeds the restart and k-means++ draws: keep it equal on every rank;
    ``sync=False`` keeps each rank's upkeep local.

    ``stats()`` gives the last training step's global usage: perplexity, codes_used,
    used_fraction, dead_fraction (codes unused for ``dead_after`` steps, default 100), restarts (this step), total_restarts, steps.
    """

    def __init__(self, num_codes: int, dim: int, beta: float = 0.25, *, channel_dim: int = -1,
                 backend: str = "auto", ema: bool = True, decay: float = 0.99, eps: float = 1e-5,
                 decay_warmup: int | None = 10,
                 restart_after: int | None = 2, restart_pool: int | None = None,
                 dead_after: int | None = None, kmeans_init: bool = True, kmeans_iters: int = 10,
                 kmeans_samples: int | None = None, cosine: bool = False, sync: bool = True,
                 process_group=None, seed: int = 0, rotation_trick: bool = False):
        super().__init__()
        if isinstance(num_codes, bool) or not isinstance(num_codes, int) or num_codes < 1:
            raise ValueError(f"num_codes must be >= 1, got {num_codes}")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if backend not in backends.ALL_NAMES:
            raise ValueError(f"backend must be one of {backends.ALL_NAMES}, got {backend!r}")
        beta = _check_beta(beta)
        check_unit_interval("decay", decay, closed_low=True, closed_high=False)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0 \
                or not math.isfinite(eps):
            raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
        check_positive_int("decay_warmup", decay_warmup, allow_none=True)
        check_positive_int("restart_after", restart_after, allow_none=True)
        check_positive_int("restart_pool", restart_pool, allow_none=True)
        check_positive_int("dead_after", dead_after, allow_none=True)
        check_positive_int("kmeans_iters", kmeans_iters, minimum=0)
        check_positive_int("kmeans_samples", kmeans_samples, allow_none=True)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        if isinstance(channel_dim, bool) or not isinstance(channel_dim, int):
            raise TypeError(f"channel_dim must be an int, got {channel_dim!r}")
        self.num_codes, self.dim, self.beta = num_codes, dim, float(beta)
        self.channel_dim, self.backend = channel_dim, backend
        self.ema, self.decay, self.eps = bool(ema), float(decay), float(eps)
        self.decay_warmup = decay_warmup
        self.restart_after = restart_after
        self.restart_pool = restart_pool if restart_pool is not None else min(num_codes, 1024)
        self.dead_after = dead_after if dead_after is not None else 100
        self.kmeans_init, self.kmeans_iters = bool(kmeans_init), kmeans_iters
        self.kmeans_samples = kmeans_samples if kmeans_samples is not None else 32 * num_codes
        self.cosine, self.sync, self.seed = bool(cosine), bool(sync), seed
        if not isinstance(rotation_trick, bool):
            raise TypeError(f"rotation_trick must be a bool, got {rotation_trick!r}")
        self.rotation_trick = rotation_trick
        self.process_group = process_group

        if self.ema:
            self.register_buffer("codebook", torch.empty(num_codes, dim))
            self.register_buffer("ema_count", torch.ones(num_codes))
            self.register_buffer("ema_sum", torch.empty(num_codes, dim))
        else:
            self.codebook = nn.Parameter(torch.empty(num_codes, dim))
        self.register_buffer("steps_unused", torch.zeros(num_codes, dtype=torch.long))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("restart_count", torch.zeros((), dtype=torch.long))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))
        # Host-side mirrors of `step` and `initialised`: reading the buffers every step would be a
        # device sync; they are refreshed whenever a state dict is loaded.
        self._steps_done, self._init_done = 0, False
        if restart_after is not None:
            # Restart candidates from recent batches: state, so a resumed run restarts the codes
            # an uninterrupted one would.
            self.register_buffer("pool_rows", torch.zeros(self.restart_pool, dim))
            self.register_buffer("pool_valid", torch.zeros(self.restart_pool, dtype=torch.bool))
            self.register_buffer("pool_ptr", torch.zeros((), dtype=torch.long))
        self._pool_ptr = 0  # host mirror of pool_ptr
        self._last_counts = self._last_restarts = None
        self.register_load_state_dict_post_hook(VectorQuantizer._after_load)
        self.reset_parameters()

    @staticmethod
    def _after_load(module, _incompatible):
        module._steps_done = int(module.step)
        module._init_done = bool(module.initialised)
        module._pool_ptr = int(module.pool_ptr) if module.restart_after is not None else 0

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The pool grows past restart_pool when the ranks' samples outnumber it: take the saved
        # shape rather than report a mismatch.
        for name in ("pool_rows", "pool_valid"):
            t = state_dict.get(prefix + name)
            if self.restart_after is not None and isinstance(t, Tensor) and \
                    t.shape != getattr(self, name).shape:
                setattr(self, name, getattr(self, name).new_zeros(t.shape))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.codebook.uniform_(-1.0 / self.num_codes, 1.0 / self.num_codes)
            if self.ema:
                self.ema_sum.copy_(self.codebook)
                self.ema_count.fill_(1.0)
            self.steps_unused.zero_()
            self.step.zero_()
            self.restart_count.zero_()
            self.initialised.fill_(False)
            if self.restart_after is not None:
                self.pool_rows.zero_()
                self.pool_valid.fill_(False)
                self.pool_ptr.zero_()
        self._after_load(self, None)
        self._last_counts = self._last_restarts = None

    @torch.no_grad()
    def set_codebook(self, codes: Tensor) -> None:
        """Replace every code (e.g. by encoder outputs of training data) and mark the codebook as
        initialised (k-means init will not run). In EMA mode this also restarts the EMA state at
        N_k = 1, S_k = code: writing ``codebook`` alone would be undone by the next update, which
        recomputes the codes from S_k / N_k. Under DDP pass the same codes on every rank (or call
        it before wrapping the model: DDP copies rank 0's parameters and buffers at construction).
        """
        if not isinstance(codes, Tensor) or codes.shape != (self.num_codes, self.dim):
            raise ValueError(f"codes must be a tensor of shape ({self.num_codes}, {self.dim}), got "
                             f"{tuple(codes.shape) if isinstance(codes, Tensor) else type(codes)}")
        self.codebook.copy_(codes)
        if self.ema:
            self.ema_sum.copy_(codes)
            self.ema_count.fill_(1.0)
        self.steps_unused.zero_()
        self.initialised.fill_(True)
        self._init_done = True

    # -------------------------------------------------------------------------------- forward
    def forward(self, z_e: Tensor, *, channel_dim: int | None = None,
                dim: int | None = None) -> VQOutput:
        """channel_dim: this call's channel axis instead of the module's (dim= is its former
        name, still accepted)."""
        if not isinstance(z_e, Tensor):
            raise TypeError(f"z_e must be a torch.Tensor, got {type(z_e).__name__}")
        dim = _channel_axis_override(channel_dim, dim)
        # A zero-storage stand-in with the search codebook's shape, dtype and device: the checks
        # need no copy of the codebook.
        stand_in = self.codebook.new_zeros(
            (), dtype=z_e.dtype if z_e.dtype in _FLOATS else self.codebook.dtype
        ).expand(self.num_codes, self.dim)
        dim = _check(z_e, stand_in, self.channel_dim if dim is None else dim, self.backend)
        training = self.training
        if training and self.kmeans_init and not self._init_done:
            self._kmeans_initialise(z_e, dim)

        cb = self.codebook
        if training and (self.ema or self.restart_after is not None):
            # The step below rewrites the codebook in place, and the search's backward (or
            # normalize's) must see this step's codes: search a snapshot. clone is differentiable,
            # so in gradient mode the gradient still reaches the parameter.
            cb = cb.clone()
        z = F.normalize(z_e, dim=dim) if self.cosine else z_e
        if self.cosine:
            cb = F.normalize(cb, dim=1)
        if cb.dtype != z.dtype:
            cb = cb.to(z.dtype)
        out, counts, row_err = _vq_quantize(z, cb, beta=self.beta, dim=dim, backend=self.backend)
        if self.rotation_trick and z.requires_grad:
            from ..rotation import rotate_to
            out = out._replace(z_q=rotate_to(z, out.z_q.detach(), dim))
        if self.ema:
            # The op's error output is tied to z_e in the graph (with a zero gradient); detach it
            # so nothing can mistake it for a trainable term.
            out = out._replace(codebook_loss=out.codebook_loss.detach(),
                               loss=self.beta * out.commitment_loss)
        if training:
            with torch.no_grad():
                self._update(z.detach(), dim, out.indices, counts, row_err)
        return out

    # -------------------------------------------------------------------------------- upkeep
    def _stat_dtype(self) -> torch.dtype:
        return torch.float64 if self.codebook.dtype == torch.float64 else torch.float32

    def _samples_per_rank(self, world: int) -> int:
        # Each step refills the whole pool: restarts land on this step's encoder outputs. Early in
        # training the outputs' cloud grows by ~25% a step (issue 15), and rows a few steps old
        # put restarted codes where the data no longer is (a quarter of the pool per step, as
        # before, left the default VQ-VAE at 112 of 256 codes at step 11).
        return max(1, ceil_div(self.restart_pool, world))

    def _decay_now(self) -> float:
        # Warm-up (the num_updates form of tf.train.ExponentialMovingAverage): at update t the
        # decay is min(decay, (1 + t) / (decay_warmup + t)), a memory of ~t / (decay_warmup - 1)
        # steps. A fixed 0.99 moves a code ~1-8% of the way to its rows per step, while early in
        # training the encoder's outputs move by more than that: codes fell behind the cloud and
        # went unused (issue 15). The host-side step count keeps it free of device syncs and the
        # same on every rank and after a resume.
        if not self.decay_warmup:
            return self.decay
        t = self._steps_done
        return min(self.decay, (1 + t) / (self.decay_warmup + t))

    def _update(self, z: Tensor, dim: int, indices: Tensor, counts: Tensor,
                row_err: Tensor) -> None:
        ctx = DistContext(self.sync, self.process_group)
        self._upkeep_apply(ctx.all_reduce_(self._upkeep_pack(z, dim, indices, row_err, ctx)))

    def _upkeep_pack(self, z: Tensor, dim: int, indices: Tensor, row_err: Tensor,
                     ctx: DistContext) -> Tensor:
        """This step's local statistics as one flat buffer (stat dtype) to be summed over the
        ranks; `_upkeep_apply` takes the sum. Split in two so that several quantizers (the
        stages of a residual quantizer) can share one all_reduce. Rows whose `row_err` is not
        finite take no part (NaN/inf rows; callers pass inf for padding or sat-out rows)."""
        K, D = self.num_codes, self.dim
        sd = self._stat_dtype()
        rows = z.movedim(dim, -1).reshape(-1, D)
        idx = indices.reshape(-1)
        # A row with NaN or inf (its exact error is not finite) must not reach the usage counts,
        # the EMA sums or the restart pool: one such row would make a code NaN for good. Masks,
        # not indexing: no host sync, and every rank sends buffers of the same size.
        ok = torch.isfinite(row_err.reshape(-1))

        # Such rows are counted into an extra code K that is then dropped: the same counts and
        # sums as zero-weighting them, without a masked copy of the N x D rows.
        idx_ok = torch.where(ok, idx, K)

        counts = torch.bincount(idx_ok, minlength=K + 1)[:K]
        sums = None
        if self.ema:
            # A strided source (a group's columns) runs index_add_ 3-6x slower than copying it
            # contiguous first (1.8 against 0.5 ms at 8192 x 64 on an
            # Ice Lake Xeon, family 6 model 106, 2 threads); the sums are the same.
            sums = torch.zeros(K + 1, D, dtype=sd, device=z.device) \
                .index_add_(0, idx_ok, rows.to(sd).contiguous())[:K]
        return self._pack_stats(counts, sums, rows.shape[0],
                                lambda sel: rows.index_select(0, sel), ok, ctx)

    def _restart_draw(self, n_rows: int, ctx: DistContext, device) -> Optional[Tensor]:
        """The rows (indices into this step's n_rows) whose values become this rank's restart
        candidates (None without restarts): seeded per book, rank and step."""
        if self.restart_after is None:
            return None
        m = self._samples_per_rank(ctx.world)
        return pick_rows(n_rows, m, seeded_generator(self.seed, 1, ctx.rank, self._steps_done),
                         device)

    def _pack_stats(self, counts: Tensor, sums: Optional[Tensor], n_rows: int, rows_at,
                    ok: Tensor, ctx: DistContext, parts: bool = False,
                    sel: Optional[Tensor] = None, cand: Optional[Tensor] = None):
        """`_upkeep_pack`'s buffer from statistics already taken: counts (K,) of the rows that take
        part, sums (K, D) of those rows in the stat dtype (None without EMA), and for the restart
        candidates `rows_at(sel)`, the rows (all n_rows of them, in order) at indices sel, with
        ok (n_rows,) marking the ones that take part. sel: `_restart_draw`'s draw when the caller
        made it already; cand: those rows themselves when the caller has them too (rows_at is
        then not called). parts=True: the buffer's pieces as a list, in order (for a caller that
        concatenates several books' at once)."""
        D = self.dim
        sd = self._stat_dtype()
        # One flat buffer, one all_reduce: [counts K | EMA sums K*D | restart candidates].
        # Counts travel as floats: exact up to 2^24 rows per code per step in float32.
        out = [counts.to(sd)]
        if self.ema:
            out.append(sums.reshape(-1))
        if self.restart_after is not None:
            m = self._samples_per_rank(ctx.world)
            if sel is None:
                sel = self._restart_draw(n_rows, ctx, ok.device)
            # An all_gather as a sum of disjoint slots, so it rides in the same all_reduce; the
            # last column marks the slots a rank with fewer than m rows left empty.
            slot = torch.zeros(ctx.world, m, D + 1, dtype=sd, device=ok.device)
            sel_ok = ok.index_select(0, sel)
            rows = cand if cand is not None else rows_at(sel)
            slot[ctx.rank, :sel.numel(), :D] = torch.where(sel_ok[:, None], rows.to(sd), 0)
            slot[ctx.rank, :sel.numel(), D] = sel_ok.to(sd)
            out.append(slot.view(-1))
        return out if parts else torch.cat(out)

    def _upkeep_apply(self, buf: Tensor) -> None:
        """Apply the summed buffer of `_upkeep_pack`: step counters, EMA, restart pool, restarts."""
        K, D = self.num_codes, self.dim
        restart = self.restart_after is not None
        counts_g = buf[:K]
        decay = self._decay_now()
        self._steps_done += 1
        self.step.add_(1)
        self.steps_unused.add_(1).masked_fill_(counts_g > 0, 0)
        if self.ema:
            sums_g = buf[K:K + K * D].view(K, D)
            self.ema_count.mul_(decay).add_(counts_g, alpha=1 - decay)
            self.ema_sum.mul_(decay).add_(sums_g, alpha=1 - decay)
            self.codebook.copy_(self.ema_sum / laplace_smoothed(self.ema_count, self.eps)[:, None])
        restarts = None
        if restart:
            cand = buf[K + (K * D if self.ema else 0):].view(-1, D + 1)
            self._push_pool(cand[:, :D], cand[:, D] > 0)
            restarts = self._restart(self._dead_window(counts_g))
        self._last_counts, self._last_restarts = counts_g, restarts

    @staticmethod
    def _alike(books: list[VectorQuantizer]) -> bool:
        """Whether the books (two or more) can share the batched upkeep: plain VectorQuantizers
        on the CPU that agree in every setting a step's statistics and their application read,
        with the codebook and EMA state in the statistics' own dtype (float32 or float64). Not
        fp16/bf16 books: torch's foreach ops round a Python scalar to the tensors' dtype before
        multiplying (`_foreach_mul_(half_list, decay)`), where `Tensor.mul_(decay)`, the book
        loop's, multiplies in float and rounds once, so their EMA would differ in the last bit."""
        b0 = books[0]
        sd = b0._stat_dtype()
        same = ("num_codes", "dim", "ema", "decay", "decay_warmup", "eps", "restart_after",
                "restart_pool", "_steps_done")
        return len(books) >= 2 and all(
            type(b) is VectorQuantizer and b.codebook.device.type == "cpu"
            and b._stat_dtype() == sd and b.codebook.dtype == sd
            and (not b.ema or (b.ema_count.dtype == sd and b.ema_sum.dtype == sd))
            and all(getattr(b, a) == getattr(b0, a) for a in same) for b in books)

    @staticmethod
    def _pack_stats_books(books: list[VectorQuantizer], counts: Tensor, sums: Optional[Tensor],
                          n_rows: int, ok: Tensor, ctx: DistContext,
                          sels: Optional[list[Tensor]], cand: Optional[Tensor]) -> Tensor:
        """Every book's `_pack_stats(..., parts=True)` parts, concatenated in book order (the
        buffer `_Books._upkeep_packed` sums), bit for bit, for books `_alike` gives True for, in
        a handful of ops: counts (S, K), sums (S, K, D) in the stat dtype or None without EMA,
        ok (S, n_rows), sels each book's `_restart_draw` (None without restarts) and cand
        (S, m, D) the rows at them."""
        b0, S = books[0], len(books)
        D, sd = b0.dim, b0._stat_dtype()
        cols = [counts.to(sd)]
        if b0.ema:
            cols.append(sums.reshape(S, -1))
        if b0.restart_after is not None:
            m = b0._samples_per_rank(ctx.world)
            sel = torch.stack(sels)
            j = sel.shape[1]
            slot = torch.zeros(S, ctx.world, m, D + 1, dtype=sd, device=ok.device)
            sel_ok = ok.gather(1, sel)
            slot[:, ctx.rank, :j, :D] = torch.where(sel_ok[..., None], cand.to(sd), 0)
            slot[:, ctx.rank, :j, D] = sel_ok.to(sd)
            cols.append(slot.view(S, -1))
        return torch.cat(cols, 1).view(-1)

    @staticmethod
    def _upkeep_apply_books(books: list[VectorQuantizer], flat: Tensor) -> bool:
        """Every book's `_upkeep_apply`, bit for bit, from `flat`: the books' summed buffers one
        after another (the same length each). One foreach call per op for all the books instead
        of a dozen small ops per book: 6.2-6.3 -> 2.7 ms for 12 books of 1024 x 8 on a Zen 3 EPYC
        (family 25 model 1, 2 threads; a step whose buffers restart codes, medians of 41). Only for CPU books that agree in every setting the
        step reads (the same op order on every book gives the same bits; on a GPU the foreach
        kernels are not checked against the single ones here): returns False, having changed
        nothing, for anything else (the caller then applies book by book)."""
        b0, S = books[0], len(books)
        if not VectorQuantizer._alike(books) or flat.device.type != "cpu" or flat.numel() % S \
                or b0._stat_dtype() != flat.dtype:
            return False
        K, D = b0.num_codes, b0.dim
        mat = flat.view(S, -1)
        counts = list(mat[:, :K].unbind(0))
        decay = b0._decay_now()
        for b in books:
            b._steps_done += 1
        torch._foreach_add_([b.step for b in books], 1)
        unused = [b.steps_unused for b in books]
        torch._foreach_add_(unused, 1)
        # masked_fill_(counts > 0, 0) as a product with 0 / 1 (integers: the same values).
        torch._foreach_mul_(unused, list((~(mat[:, :K] > 0)).long().unbind(0)))
        if b0.ema:
            ec, es = [b.ema_count for b in books], [b.ema_sum for b in books]
            torch._foreach_mul_(ec, decay)
            torch._foreach_add_(ec, counts, alpha=1 - decay)
            torch._foreach_mul_(es, decay)
            torch._foreach_add_(es, [m[K:K + K * D].view(K, D) for m in mat.unbind(0)],
                                alpha=1 - decay)
            n = [c.sum() for c in ec]  # laplace_smoothed, op for op
            lap = torch._foreach_mul(torch._foreach_div(torch._foreach_add(ec, b0.eps),
                                                        torch._foreach_add(n, K * b0.eps)), n)
            torch._foreach_copy_([b.codebook for b in books],
                                 torch._foreach_div(es, [x[:, None] for x in lap]))
        if b0.restart_after is None:
            for b, c in zip(books, counts):
                b._last_counts, b._last_restarts = c, None
            return True
        cand = mat[:, K + (K * D if b0.ema else 0):].reshape(S, -1, D + 1)
        G = cand.shape[1]
        if all(b._pool_ptr == 0 and G >= b.restart_pool and b.pool_rows.shape[0] == G
               and b.pool_rows.dtype == flat.dtype for b in books):
            # _push_pool when the step's rows fill the pool from slot 0: its positions are
            # 0 .. G - 1 and the pointer stays at 0.
            torch._foreach_copy_([b.pool_rows for b in books], list(cand[:, :, :D].unbind(0)))
            torch._foreach_copy_([b.pool_valid for b in books],
                                 list((cand[:, :, D] > 0).unbind(0)))
        else:
            for b, c in zip(books, cand.unbind(0)):
                b._push_pool(c[:, :D], c[:, D] > 0)
        # Every book's _dead_window (each count summed on its own, as there), then _restart only
        # where a code is dead (the check _restart itself makes first on the CPU).
        window = b0._dead_window(None, rows=torch.stack([c.sum() for c in counts]))
        dead = (torch.stack(unused) >= window[:, None]).any(1).tolist()
        for s, b in enumerate(books):
            b._last_counts = counts[s]
            b._last_restarts = b._restart(window[s]) if dead[s] else \
                torch.zeros((), dtype=torch.long)
        return True

    def _push_pool(self, rows: Tensor, valid: Tensor) -> None:
        G = rows.shape[0]
        P = max(self.restart_pool, G)
        if self.pool_rows.shape[0] != P:
            self.pool_rows = rows.new_zeros(P, self.dim)
            self.pool_valid = torch.zeros(P, dtype=torch.bool, device=rows.device)
            self._pool_ptr = 0
        if self.pool_rows.dtype != rows.dtype:
            self.pool_rows = self.pool_rows.to(rows.dtype)
        pos = ((self._pool_ptr + torch.arange(G)) % P).to(rows.device)
        self.pool_rows.index_copy_(0, pos, rows)
        self.pool_valid.index_copy_(0, pos, valid)
        self._pool_ptr = (self._pool_ptr + G) % P
        self.pool_ptr.fill_(self._pool_ptr)

    def _dead_window(self, counts: Optional[Tensor], rows: Optional[Tensor] = None) -> Tensor:
        """The steps a code must go unused to count as dead, given this step's global per-code
        counts: max(restart_after, ceil(restart_after * K / n)) for the n rows counted this step
        (a 0-d long tensor: no host sync). rows: n itself instead (counts.sum(), or one such sum
        per book for alike books: a window each).

        Why scaled: a step of n rows can use at most n codes, so with K > n most codes go unused
        in any one step however healthy the codebook is. With a window of restart_after steps
        regardless of K, K = 4096 codes fed 2,048 rows a step had ~half the codebook counted dead
        every step and ~1,024 codes restarted per step (review finding; README, "Codebook
        health"). Counting restart_after in expected rows per code instead (a code is dead when it
        went unused while restart_after * K rows were quantized, at least restart_after steps: a
        code as useful as the average one expects restart_after rows in that time and misses them
        all with probability ~e^-restart_after) puts a codebook of any size under the test that
        K = n has today; for K <= n the window is
        restart_after steps exactly, so runs with no more codes than rows per step restart the
        same codes as before. An EMA of usage against a threshold would need new state (and a
        checkpoint format change) and would change those runs too. n is this step's count, not
        a running figure: steps of fewer rows (padding masks, dropped residual stages, a short
        last batch) get a longer window for that step only (a step with none counts n as 1)."""
        K, ra = self.num_codes, self.restart_after
        n = (counts.sum() if rows is None else rows).round().long().clamp(min=1)
        return torch.clamp(torch.div(ra * K + n - 1, n, rounding_mode="floor"), min=ra)

    def _restart(self, window) -> Tensor:
        """Replace codes unused for `window` steps (see _dead_window) by unused pool rows; no host
        sync and no data-dependent branch: masks decide what changes."""
        pool, valid = self.pool_rows, self.pool_valid
        P = pool.shape[0]
        dead = self.steps_unused >= window
        if dead.device.type == "cpu" and not bool(dead.any()):
            # Nothing to restart: on the CPU asking costs no device sync, and skipping the rest
            # (a dozen small ops, ~0.7 ms a step at K = 512 on an Ice Lake Xeon) changes
            # nothing: its generator is seeded per step, and with no code taken every update
            # below is a no-op.
            return torch.zeros((), dtype=torch.long)
        g = seeded_generator(self.seed, 2, self._steps_done)
        keys = torch.rand(P, generator=g, dtype=torch.float64).to(pool.device)
        order = torch.argsort(torch.where(valid, keys, 2.0))  # valid rows first, in random order
        # Longest-unused first (ties to the lowest index), so a code that dies again right after
        # its restart cannot starve the others when the pool is short.
        prio = torch.argsort(torch.where(dead, -self.steps_unused, 1), stable=True)
        rank_among_dead = torch.empty_like(prio)
        rank_among_dead[prio] = torch.arange(prio.numel(), device=prio.device)
        take = dead & (rank_among_dead < valid.sum())
        slot = order[rank_among_dead.clamp(0, P - 1)]
        src = pool.index_select(0, slot)
        self.codebook.copy_(torch.where(take[:, None], src.to(self.codebook.dtype), self.codebook))
        if self.ema:
            self.ema_sum.copy_(torch.where(take[:, None], src.to(self.ema_sum.dtype), self.ema_sum))
            self.ema_count.masked_fill_(take, 1.0)
        self.steps_unused.masked_fill_(take, 0)
        used = torch.zeros(P, dtype=torch.long, device=pool.device).index_add_(0, slot, take.long())
        valid &= used == 0
        n = take.sum()
        self.restart_count.add_(n)
        return n

    def _kmeans_initialise(self, z_e: Tensor, dim: int) -> None:
        with torch.no_grad():
            z = z_e.detach()
            if self.cosine:
                z = F.normalize(z, dim=dim)
            sd = self._stat_dtype()
            rows = z.movedim(dim, -1).reshape(-1, self.dim).to(sd)
            rows = rows[torch.isfinite(rows).all(1)]  # NaN or inf rows seed no code
            ctx = DistContext(self.sync, self.process_group)
            m = min(rows.shape[0], ceil_div(self.kmeans_samples, ctx.world))
            if ctx.active:
                # Every rank must contribute the same number of rows to the gather.
                n = torch.tensor([m], dtype=torch.long, device=rows.device)
                m = int(ctx.all_reduce_(n, "min"))
            local = rows.index_select(0, pick_rows(
                rows.shape[0], m, seeded_generator(self.seed, 3, ctx.rank), rows.device))
            x = ctx.gather_rows(local, m)[0] if ctx.active else local
            if x.shape[0] == 0:  # nothing to seed from (the same on every rank): try next step
                return
            centres = kmeans_plusplus(x, self.num_codes, generator=seeded_generator(self.seed, 4),
                                      iters=self.kmeans_iters, backend=self.backend,
                                      cosine=self.cosine)
            # The same data and generator give the same centres, but scatter-adds on a GPU may
            # round differently from run to run: rank 0's copy makes the ranks bitwise equal.
            ctx.broadcast_from_first_(centres)
            self.codebook.copy_(centres)
            if self.ema:
                self.ema_sum.copy_(centres)
                self.ema_count.fill_(1.0)
            # Steps before this one (all rows masked) saw no codes: none is unused yet, and the
            # EMA's warm-up counts updates of these codes (a no-op where no step came first).
            self.steps_unused.zero_()
            self.step.zero_()
            self._steps_done = 0
            self.initialised.fill_(True)
            self._init_done = True

    # -------------------------------------------------------------------------------- stats
    def stats(self) -> dict[str, float]:
        """Usage of the last training step, over all ranks (a device sync: call it when logging).

        perplexity, codes_used and used_fraction describe that step's batch; dead_fraction is the
        share of codes unused for `dead_after` consecutive steps (after that step's restarts);
        restarts is that step's count, total_restarts the count since initialisation.
        """
        out: dict[str, float] = {"steps": self._steps_done,
                                 "total_restarts": int(self.restart_count),
                                 "dead_fraction": float((self.steps_unused >= self.dead_after)
                                                        .double().mean())}
        if self._last_counts is not None:
            out.update(usage_stats(self._last_counts))
            out["restarts"] = int(self._last_restarts) if self._last_restarts is not None else 0
        return out

    def extra_repr(self) -> str:
        s = (f"num_codes={self.num_codes}, dim={self.dim}, beta={self.beta}, "
             f"channel_dim={self.channel_dim}, backend={self.backend!r}")
        if self.ema:
            s += f", ema=True, decay={self.decay}, decay_warmup={self.decay_warmup}, eps={self.eps}"
        if self.restart_after is not None:
            s += f", restart_after={self.restart_after}, restart_pool={self.restart_pool}"
        if self.kmeans_init:
            s += f", kmeans_init=True, kmeans_iters={self.kmeans_iters}"
        if self.cosine:
            s += ", cosine=True"
        if self.rotation_trick:
            s += ", rotation_trick=True"
        return s
