"""Drop-in names of vector-quantize-pytorch (1.32), on vqkernels' exact fused search.

``from vqkernels.compat import VectorQuantize`` in place of
``from vector_quantize_pytorch import VectorQuantize``: the same constructor and forward arguments
with the same defaults, the same ``(quantized, indices, loss)`` return, the same state-dict keys (a
checkpoint of either loads into the other), ``get_codes_from_indices`` and
``get_output_from_indices``. The search, the gather and the per-row error are vqkernels'
(``vq_quantize``: the exact nearest code, never an N x K distance matrix or one-hot); the codebook
upkeep (EMA, k-means init, dead-code expiry, masking) follows the peer's rules in plain torch with
bincounts and scatter-adds.

An argument that needs what this package does not do (an N x K distance or probability matrix:
stochastic/Gumbel sampling, cross-entropy commitment, the diversity loss; codebook transforms;
the affine and in-place-optimizer variants) raises ``TypeError`` naming it and what to do instead
when it is given a value other than the peer's default; nothing is silently ignored. Known
differences are listed in tests/compat/README.md.

``ResidualVQ`` and ``GroupedResidualVQ`` (the same names, arguments and returns as the peer's)
stack this module's ``VectorQuantize`` per stage, as the peer stacks its own, so every stage keeps
the peer's upkeep rules and state-dict names; beam search runs on ``forward(topk=)``.
"""
from __future__ import annotations

import math
import random
from collections import namedtuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import nearest_code, vq_quantize

__all__ = ["VectorQuantize", "ResidualVQ", "GroupedResidualVQ", "LossBreakdown"]

LossBreakdown = namedtuple("LossBreakdown", ["commitment", "codebook_diversity", "orthogonal_reg",
                                             "inplace_optimize"])

# Constructor arguments the peer accepts that vqkernels cannot honour: name -> (peer default, what
# to do). Passing the default is accepted (code written for the peer often spells defaults out).
_UNSUPPORTED_INIT = {
    "commitment_use_cross_entropy_loss": (
        False, "it needs the full N x K distance matrix, which vqkernels never forms; use the "
        "default mse commitment loss"),
    "codebook_diversity_loss_weight": (
        0.0, "the diversity loss needs N x K softmax probabilities, which vqkernels never forms"),
    "stochastic_sample_codes": (
        False, "Gumbel sampling needs N x K logits; vqkernels returns the exact nearest code only"),
    "straight_through": (
        False, "the Gumbel straight-through estimator needs N x K probabilities; the default "
        "straight-through copy (or rotation_trick=True) is what vqkernels provides"),
    "directional_reparam": (False, "DiVeQ is not implemented in vqkernels.compat"),
    "vq_bridge": (None, "codebook transforms (FVQ) are not implemented in vqkernels.compat"),
    "in_place_codebook_optimizer": (
        None, "use learnable_codebook=True, ema_update=False and put the codebook in your own "
        "optimizer"),
    "affine_param": (False, "affine codebook parameters are not implemented in vqkernels.compat"),
    "sync_update_v": (0.0, "the synchronous update rule is not implemented in vqkernels.compat"),
    "orthogonal_reg_weight": (
        0.0, "the orthogonal regulariser is not implemented in vqkernels.compat"),
}
# Arguments whose value only matters together with an unsupported one: any value is accepted.
_INERT_INIT = ("sample_codebook_temp", "directional_reparam_variance", "sync_affine_param",
               "affine_param_batch_decay", "affine_param_codebook_decay",
               "manual_in_place_optimizer_update", "orthogonal_reg_active_codes_only",
               "orthogonal_reg_max_codes", "codebook_diversity_temperature")


def _l2norm(t: Tensor) -> Tensor:
    return F.normalize(t, p=2, dim=-1, eps=1e-6)  # the peer's eps, so zero rows match


def _laplace_scaled(cluster_size: Tensor, eps: float) -> Tensor:
    """(N_k + eps) / (n + K eps) * n, n = sum N_k, per codebook (the peer's smoothed size)."""
    n = cluster_size.sum(dim=-1, keepdim=True)
    return (cluster_size + eps) / (n + cluster_size.shape[-1] * eps) * n


def _sample_rows(rows: Tensor, num: int) -> Tensor:
    """`num` rows of `rows` (M, D): without replacement when there are enough, else with."""
    m = rows.shape[0]
    if m >= num:
        pick = torch.randperm(m, device=rows.device)[:num]
    else:
        pick = torch.randint(0, m, (num,), device=rows.device)
    return rows[pick]


class _DistSync:
    """all_reduce / broadcast when the codebook is synchronised across ranks, no-ops otherwise."""

    def __init__(self, active: bool):
        self.active = bool(active) and torch.distributed.is_available() and \
            torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1

    def all_reduce_(self, t: Tensor) -> Tensor:
        if self.active:
            torch.distributed.all_reduce(t)
        return t

    def broadcast_(self, *ts: Tensor) -> None:
        if self.active:
            for t in ts:
                torch.distributed.broadcast(t, src=0)


class _Codebook(nn.Module):
    """The peer's codebook state under the peer's names (`embed`, `embed_avg`, `cluster_size`,
    `initted`), so state dicts load both ways; one codebook per head when separate."""

    def __init__(self, dim, codebook_size, num_codebooks, kmeans_init, kmeans_iters, decay, eps,
                 threshold_ema_dead_code, reset_cluster_size, learnable_codebook, ema_update,
                 manual_ema_update, use_cosine_sim, sync):
        super().__init__()
        self.codebook_size, self.num_codebooks = codebook_size, num_codebooks
        self.kmeans_iters, self.decay, self.eps = kmeans_iters, decay, eps
        self.threshold_ema_dead_code = threshold_ema_dead_code
        self.reset_cluster_size = threshold_ema_dead_code if reset_cluster_size is None \
            else reset_cluster_size
        self.ema_update, self.manual_ema_update = ema_update, manual_ema_update
        self.use_cosine_sim, self.learnable_codebook, self.sync = use_cosine_sim, \
            learnable_codebook, sync
        if kmeans_init:
            embed = torch.zeros(num_codebooks, codebook_size, dim)
        else:
            # The peer's start: kaiming-uniform over the (H, K, D) tensor (bound sqrt(6 / (K D))).
            embed = torch.empty(num_codebooks, codebook_size, dim)
            nn.init.kaiming_uniform_(embed)
            if use_cosine_sim:
                embed = _l2norm(embed)
        self.register_buffer("initted", torch.tensor(not kmeans_init))
        self.register_buffer("cluster_size", torch.ones(num_codebooks, codebook_size))
        self.register_buffer("embed_avg", embed.clone())
        if learnable_codebook:
            self.embed = nn.Parameter(embed)
        else:
            self.register_buffer("embed", embed)
        # accum_ema_update=True adds a step's statistics here instead of applying them; the next
        # applied update folds them in (the peer keeps them in the buffers' .grad).
        self._accum: tuple[Tensor, Tensor] | None = None

    # ----------------------------------------------------------------------------- k-means
    @torch.no_grad()
    def init_embed_(self, rows: list[Tensor]) -> None:
        """The peer's k-means: K rows drawn at random, `kmeans_iters` Lloyd steps (assignments by
        vqkernels' exact search; an empty cluster keeps its centre), then embed_avg = means x
        counts, cluster_size = counts and the EMA codebook recomputed from them."""
        if bool(self.initted):
            return
        sync = _DistSync(self.sync)
        K = self.codebook_size
        for h, x in enumerate(rows):
            x = x.detach().float()
            if x.shape[0] == 0:
                return  # nothing to start from: try again at the next batch
            means = _sample_rows(x, K)
            bins = torch.zeros(K, device=x.device)
            for _ in range(self.kmeans_iters):
                idx, _ = nearest_code(x, means)
                bins = sync.all_reduce_(torch.bincount(idx, minlength=K).float())
                sums = sync.all_reduce_(torch.zeros_like(means).index_add_(0, idx, x))
                new = sums / bins.clamp(min=1)[:, None]
                if self.use_cosine_sim:
                    new = _l2norm(new)
                means = torch.where((bins == 0)[:, None], means, new)
            sync.broadcast_(means, bins)  # the ranks drew different samples: take rank 0's
            self.embed_avg[h] = means * bins[:, None]
            self.cluster_size[h] = bins
        self.update_ema()
        self.initted.fill_(True)

    # ----------------------------------------------------------------------------- EMA
    @torch.no_grad()
    def update_ema(self) -> None:
        e = self.embed_avg / _laplace_scaled(self.cluster_size, self.eps)[..., None]
        if self.use_cosine_sim:
            e = _l2norm(e)
        self.embed.data.copy_(e)

    @torch.no_grad()
    def update(self, rows: list[Tensor], indices: list[Tensor], *, weight=None, accum=False,
               ema_update=None) -> None:
        """One training step's upkeep from each codebook's rows (M_h, D) and their indices."""
        ema_update = self.ema_update if ema_update is None else ema_update
        if not ema_update and self.threshold_ema_dead_code <= 0:
            return
        H, K = self.num_codebooks, self.codebook_size
        counts = torch.stack([torch.bincount(i, minlength=K) for i in indices]) \
            .to(self.cluster_size.dtype)
        zero = torch.zeros_like(self.embed_avg[0])
        sums = torch.stack([zero.clone().index_add_(0, i, r.to(zero.dtype))
                            for r, i in zip(rows, indices)])
        sync = _DistSync(self.sync)
        if sync.active:  # one collective for both statistics
            flat = sync.all_reduce_(torch.cat([counts.view(-1), sums.view(-1)]))
            counts, sums = flat[:H * K].view(H, K), flat[H * K:].view_as(sums)
        if callable(weight):
            weight = weight(sums, counts)
        if accum:
            if self._accum is None:
                self._accum = (counts, sums)
            else:
                self._accum = (self._accum[0] + counts, self._accum[1] + sums)
            return
        if self._accum is not None:
            counts, sums = counts + self._accum[0], sums + self._accum[1]
            self._accum = None
        rate = 1.0 - self.decay
        if weight is not None:
            w = torch.as_tensor(weight, dtype=counts.dtype, device=counts.device)
            if w.dim() == 1:
                w = w[None]
            if w.shape != (H, K):
                raise ValueError(f"ema_update_weight must have shape ({K},) or ({H}, {K}), got "
                                 f"{tuple(w.shape)}")
            self.cluster_size.lerp_(counts, rate * w)
            self.embed_avg.lerp_(sums, rate * w[..., None])
        else:
            self.cluster_size.lerp_(counts, rate)
            self.embed_avg.lerp_(sums, rate)
        if ema_update and not self.manual_ema_update:
            self.update_ema()
        self.expire_codes_(rows)

    @torch.no_grad()
    def expire_codes_(self, rows: list[Tensor]) -> None:
        """Codes whose EMA cluster size fell below `threshold_ema_dead_code` move onto rows of this
        batch (a random subset of them when there are more dead codes than rows)."""
        if self.threshold_ema_dead_code <= 0 or not self.training:
            return
        expired = self.cluster_size < self.threshold_ema_dead_code
        if not bool(expired.any()):  # the same on every rank: cluster_size is synchronised
            return
        for h, samples in enumerate(rows):
            mask = expired[h]
            if samples.shape[0] == 0:
                continue
            samples = samples.detach().float()
            if self.use_cosine_sim:
                samples = _l2norm(samples)
            dead = mask.nonzero(as_tuple=True)[0]
            if dead.numel() > samples.shape[0]:
                dead = dead[torch.randperm(dead.numel(), device=dead.device)[:samples.shape[0]]]
            new = _sample_rows(samples, dead.numel()).to(self.embed.dtype)
            self.embed.data[h, dead] = new
            self.cluster_size[h, dead] = float(self.reset_cluster_size)
            self.embed_avg[h, dead] = new * self.reset_cluster_size
        _DistSync(self.sync).broadcast_(self.embed.data, self.cluster_size, self.embed_avg)


def _check_input(x) -> None:
    """x must be a tensor of features: an integer or bool x was cast on its way through the search
    and came back as integer codes, with a loss and no error."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must be a floating-point tensor (float32, float64, float16 or "
                        f"bfloat16), got {x.dtype}")


def _rotate_to(src: Tensor, tgt: Tensor) -> Tensor:
    """The rotation trick (Fifty et al. 2024, sec. 4.2) as the peer computes it: the value is
    `tgt`; the gradient to `src` goes through the rotation-and-rescaling that maps src onto tgt,
    treated as a constant. O(N D): R e = e - 2 (e.w) w + 2 (e.u) q with u = src/|src|,
    q = tgt/|tgt|, w = (u + q)/|u + q|, no D x D matrix."""
    eps = 1e-6
    ns = src.norm(dim=-1, keepdim=True)
    nt = tgt.norm(dim=-1, keepdim=True)
    u = (src / ns.clamp(min=eps)).detach()
    q = (tgt / nt.clamp(min=eps)).detach()
    w = _l2norm(u + q).detach()
    rotated = src - 2 * (src * w).sum(-1, keepdim=True) * w \
        + 2 * (src * u).sum(-1, keepdim=True) * q
    return rotated * (nt / ns.clamp(min=eps)).detach()


class VectorQuantize(nn.Module):
    """vector-quantize-pytorch 1.32's ``VectorQuantize`` on vqkernels' fused exact search.

    The arguments and defaults are the peer's (see its README); what differs:
    the nearest code is exact (the lowest index minimising the float64 squared distance; cosine
    similarity ranks by the same search on l2-normalised vectors), k-means assigns with that
    search too, and with ``mask``/``lens`` the commitment loss compares the quantized vectors
    with the projected, normalised input (the peer compares them with the raw input there, which
    differs only with projections or cosine similarity). Arguments listed in
    ``_UNSUPPORTED_INIT`` raise ``TypeError`` unless given their default.
    """

    def __init__(self, dim, codebook_size, codebook_dim=None, heads=1,
                 separate_codebook_per_head=False, decay=0.8, eps=1e-5, freeze_codebook=False,
                 kmeans_init=False, kmeans_iters=10, sync_kmeans=True, use_cosine_sim=False,
                 layernorm_after_project_in=False, threshold_ema_dead_code=0, channel_last=True,
                 accept_image_fmap=False, accept_3d_fmap=False, commitment_weight=1.0,
                 rotation_trick=None, sync_codebook=None, ema_update=None,
                 manual_ema_update=False, learnable_codebook=None,
                 return_zeros_for_masked_padding=True, route_gradients_to_input=True,
                 reset_cluster_size=None, **peer_only):
        super().__init__()
        for name, value in peer_only.items():
            if name in _INERT_INIT:
                continue
            if name not in _UNSUPPORTED_INIT:
                raise TypeError(f"VectorQuantize() got an unexpected keyword argument {name!r} "
                                f"(neither vqkernels.compat nor vector-quantize-pytorch 1.32 "
                                f"has it)")
            default, what = _UNSUPPORTED_INIT[name]
            if value is default or (default is not None and isinstance(value, (bool, int, float))
                                    and value == default):
                continue
            raise TypeError(f"VectorQuantize: {name}={value!r} is not supported by "
                            f"vqkernels.compat: {what}. Leave it at its default ({default!r}), "
                            f"or use vector_quantize_pytorch for it.")
        for name, v in (("dim", dim), ("codebook_size", codebook_size), ("heads", heads),
                        ("kmeans_iters", kmeans_iters)):
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "kmeans_iters"
                                                                      else 1):
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if codebook_dim is not None and (isinstance(codebook_dim, bool) or
                                         not isinstance(codebook_dim, int) or codebook_dim < 1):
            raise ValueError(f"codebook_dim must be a positive int or None, got {codebook_dim!r}")
        if not 0.0 <= float(decay) <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay!r}")
        if not float(eps) > 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        if isinstance(threshold_ema_dead_code, bool) or \
                not isinstance(threshold_ema_dead_code, (int, float)) or threshold_ema_dead_code < 0:
            raise ValueError(f"threshold_ema_dead_code must be a number >= 0 (0: no expiry), got "
                             f"{threshold_ema_dead_code!r}")
        if accept_image_fmap and accept_3d_fmap:
            raise ValueError("accept_image_fmap and accept_3d_fmap cannot both be True")

        # The peer's derived defaults (without directional_reparam / vq_bridge, which are refused).
        ema_update = True if ema_update is None else bool(ema_update)
        learnable_codebook = False if learnable_codebook is None else bool(learnable_codebook)
        rotation_trick = dim > 1 if rotation_trick is None else bool(rotation_trick)
        if use_cosine_sim and learnable_codebook:
            raise ValueError("use_cosine_sim=True and learnable_codebook=True cannot be combined "
                             "(as in vector-quantize-pytorch): the cosine codebook is kept "
                             "normalised by its EMA update")
        if ema_update and learnable_codebook:
            raise ValueError("learnable_codebook=True needs ema_update=False (the codebook is "
                             "either trained by gradient or moved by EMA, not both)")
        if sync_codebook is None:
            sync_codebook = _DistSync(True).active

        self.dim, self.heads = dim, heads
        self.separate_codebook_per_head = bool(separate_codebook_per_head)
        codebook_dim = dim if codebook_dim is None else codebook_dim
        self.codebook_dim = codebook_dim
        inner = codebook_dim * heads
        self.has_projections = inner != dim
        if self.has_projections:
            lin = nn.Linear(dim, inner)
            self.project_in = nn.Sequential(lin, nn.LayerNorm(inner)) \
                if layernorm_after_project_in else lin
            self.project_out = nn.Linear(inner, dim)
        else:
            self.project_in = self.project_out = nn.Identity()
        self.eps = eps
        self.commitment_weight = float(commitment_weight)
        self.has_commitment_loss = self.commitment_weight > 0
        self.learnable_codebook = learnable_codebook
        self.rotation_trick = rotation_trick
        self.route_gradients_to_input = bool(route_gradients_to_input)
        self.use_cosine_sim = bool(use_cosine_sim)
        self.codebook_size = codebook_size
        self.accept_image_fmap, self.accept_3d_fmap = bool(accept_image_fmap), bool(accept_3d_fmap)
        self.channel_last = bool(channel_last)
        self.freeze_codebook = bool(freeze_codebook)
        self.return_zeros_for_masked_padding = bool(return_zeros_for_masked_padding)
        self._codebook = _Codebook(
            codebook_dim, codebook_size, heads if self.separate_codebook_per_head else 1,
            bool(kmeans_init), kmeans_iters, float(decay), float(eps),
            threshold_ema_dead_code, reset_cluster_size, learnable_codebook, ema_update,
            bool(manual_ema_update), self.use_cosine_sim, bool(sync_codebook))
        self.register_buffer("zero", torch.tensor(0.0), persistent=False)

    # ----------------------------------------------------------------------------- codebook
    @property
    def ema_update(self) -> bool:
        return self._codebook.ema_update

    @property
    def codebook(self) -> Tensor:
        e = self._codebook.embed
        return e if self.separate_codebook_per_head else e[0]

    @codebook.setter
    def codebook(self, codes: Tensor) -> None:
        with torch.no_grad():
            self._codebook.embed.copy_(codes if self.separate_codebook_per_head else codes[None])

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """The codes of `indices` (as the forward returned them), in the forward's input layout
        before project_out."""
        cb = self.codebook
        if cb.dim() == 2:
            codes = cb[indices]  # -1 (masked padding) reads the last code, as in the peer
        else:  # (..., heads) indices into one codebook per head
            H = cb.shape[0]
            if indices.shape[-1] != H:
                raise ValueError(f"indices must end with the {H} heads, got shape "
                                 f"{tuple(indices.shape)}")
            codes = torch.stack([cb[h][indices[..., h]] for h in range(H)], dim=-2)
            codes = codes.flatten(-2)
        if self.heads > 1 and cb.dim() == 2:
            codes = codes.flatten(-2)  # (..., heads, d) of the shared codebook -> (..., heads d)
        if not self.channel_last or self.accept_image_fmap or self.accept_3d_fmap:
            codes = codes.movedim(-1, 1)
        return codes

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        """What the forward returned as `quantized` for these indices (eval mode: no STE)."""
        codes = self.get_codes_from_indices(indices)
        if not self.has_projections:
            return codes
        channel_first = not self.channel_last or self.accept_image_fmap or self.accept_3d_fmap
        if channel_first:
            return self.project_out(codes.movedim(1, -1)).movedim(-1, 1)
        return self.project_out(codes)

    # ----------------------------------------------------------------------------- forward
    def _layout_in(self, x: Tensor, mask, lens):
        """x in any accepted layout -> (x as (B, N, dim), the input in that layout, mask, how to
        lay the outputs back out)."""
        _check_input(x)
        if mask is not None and lens is not None:
            raise ValueError("pass mask= or lens=, not both")
        orig_input = x
        only_one = x.dim() == 2
        if only_one:
            if mask is not None or lens is not None:
                raise ValueError("mask/lens cannot be used with a single token per batch (2-D x)")
            x = x[:, None]
        fmap = self.accept_image_fmap or self.accept_3d_fmap
        spatial = None
        if fmap:
            want = 4 if self.accept_image_fmap else 5
            if x.dim() != want:
                raise ValueError(f"x must be {want}-D (batch, channels, "
                                 f"{'height, width' if want == 4 else 'depth, height, width'}), "
                                 f"got shape {tuple(x.shape)}")
            if mask is not None or lens is not None:
                raise ValueError("mask/lens cannot be used with accept_image_fmap/accept_3d_fmap")
            spatial = x.shape[2:]
            x = x.flatten(2).transpose(1, 2)
        need_transpose = not self.channel_last and not fmap and not only_one
        if need_transpose:
            x = x.transpose(1, 2)
            orig_input = orig_input.transpose(1, 2)
        if x.dim() != 3:
            raise ValueError(f"x must be (batch, seq, dim) here, got shape {tuple(x.shape)}")
        if x.shape[-1] != self.dim:
            raise ValueError(f"x has {x.shape[-1]} features but VectorQuantize was built with "
                             f"dim={self.dim}")
        if lens is not None:
            mask = torch.arange(x.shape[1], device=lens.device) < lens[:, None]
        if mask is not None and (mask.shape != x.shape[:2] or mask.dtype != torch.bool):
            raise ValueError(f"mask must be a bool tensor of shape {tuple(x.shape[:2])}, got "
                             f"{mask.dtype} {tuple(mask.shape)}")
        return x, orig_input, mask, (only_one, need_transpose, spatial)

    def _project(self, x: Tensor) -> Tensor:
        """(B, N, dim) -> (B, N, heads, codebook_dim) in the search dtype, normalised for cosine."""
        B, N = x.shape[:2]
        # The peer searches in float32 whatever the input; a float64 module or input stays float64.
        work = torch.float64 if torch.float64 in (x.dtype, self._codebook.embed.dtype) \
            else torch.float32
        z = self.project_in(x).to(work).view(B, N, self.heads, self.codebook_dim)
        return _l2norm(z) if self.use_cosine_sim else z

    def _groups(self, z: Tensor, mask):
        """Per codebook: its rows' view and the mask over them (None: every row)."""
        if self.separate_codebook_per_head:
            return [(z[:, :, h], mask) for h in range(self.heads)]
        return [(z, None if mask is None else mask[:, :, None].expand(z.shape[:3]))]

    def forward(self, x: Tensor, indices=None, mask: Tensor | None = None,
                lens: Tensor | None = None, topk=None, sample_codebook_temp=None,
                freeze_codebook=None, return_loss_breakdown=False, codebook_transform_fn=None,
                ema_update_weight=None, accum_ema_update=False, ema_update=None):
        if indices is not None:
            raise TypeError("VectorQuantize.forward: indices= (cross-entropy loss against given "
                            "codes) needs the N x K distance matrix, which vqkernels never forms; "
                            "compute that loss yourself or use vector_quantize_pytorch for it")
        if codebook_transform_fn is not None:
            raise TypeError("VectorQuantize.forward: codebook_transform_fn= (implicit neural "
                            "codebooks) is not supported by vqkernels.compat")
        if topk is not None:
            if isinstance(topk, bool) or int(topk) < 1 or self.heads != 1:
                raise ValueError(f"topk must be a positive int, with heads=1 (as in "
                                 f"vector-quantize-pytorch), got topk={topk!r}, heads={self.heads}")
            topk = min(int(topk), self.codebook_size)
        # sample_codebook_temp only matters with stochastic sampling, which is refused at init.
        freeze_codebook = self.freeze_codebook if freeze_codebook is None else freeze_codebook
        input_requires_grad = x.requires_grad if isinstance(x, Tensor) else False
        x, orig_input, mask, layout = self._layout_in(x, mask, lens)
        dtype = x.dtype
        B, N = x.shape[:2]
        H, d = self.heads, self.codebook_dim
        z = self._project(x)
        groups = self._groups(z, mask)

        cb = self._codebook
        training = self.training
        if training and not bool(cb.initted):
            cb.init_embed_([(g if m is None else g[m]).reshape(-1, d) for g, m in groups])
        learn = self.learnable_codebook and not freeze_codebook
        embed = (cb.embed if learn else cb.embed.detach()).to(z.dtype)
        updates = training and not freeze_codebook and topk is None
        if updates and embed.data_ptr() == cb.embed.data_ptr():
            # The upkeep below rewrites the codebook in place, and the search's backward must
            # see this step's codes: search a copy (clone is differentiable, so a learnable
            # codebook still gets its gradient).
            embed = embed.clone()
        ste = training and input_requires_grad and self.route_gradients_to_input

        if topk is not None:
            q, i, loss = self._forward_topk(groups[0][0], embed[0], topk, learn, ste, dtype,
                                            orig_input, mask, layout)
            if not return_loss_breakdown:
                return q, i, loss
            return q, i, loss, LossBreakdown(loss, self.zero, self.zero, self.zero)

        q_parts, idx_parts, rows_used, idx_used = [], [], [], []
        err_sum = z.new_zeros(())
        cb_sum = z.new_zeros(())
        n_used = 0
        for g, (group, gmask) in enumerate(groups):
            rows = group.reshape(-1, d) if gmask is None else group[gmask]
            out = vq_quantize(rows, embed[g], beta=1.0)
            n = rows.numel()
            err_sum = err_sum + out.commitment_loss * n
            cb_sum = cb_sum + out.codebook_loss * n
            n_used += n
            quant = out.z_q
            if not ste:
                # The plain code; a learnable codebook gets the gradient through it, as the
                # peer's one-hot product gives it.
                quant = embed[g][out.indices] if learn else quant.detach()
            elif self.rotation_trick:
                quant = _rotate_to(rows, quant.detach())
            q_parts.append(self._scatter(quant, group.shape, gmask, 0))
            idx_parts.append(self._scatter(out.indices, group.shape[:-1], gmask, -1))
            rows_used.append(rows.detach())
            idx_used.append(out.indices)

        if updates:
            cb.update(rows_used, idx_used, weight=ema_update_weight, accum=accum_ema_update,
                      ema_update=ema_update)

        if self.separate_codebook_per_head:
            quantize = torch.stack(q_parts, dim=2)              # (B, N, H, d)
            embed_ind = torch.stack(idx_parts, dim=2)           # (B, N, H)
        else:
            quantize, embed_ind = q_parts[0], idx_parts[0]      # (B, N, H, d), (B, N, H)
        if H == 1:
            embed_ind = embed_ind[..., 0]
        quantize = quantize.reshape(B, N, H * d).to(dtype)

        commit_loss = self.zero
        loss = self.zero
        if training:
            loss = self.zero.clone().requires_grad_()
            if self.has_commitment_loss:
                commit = err_sum / max(n_used, 1)
                if learn:
                    # The peer's mse(quantize, x) with the codebook not detached: its gradient
                    # reaches x and the codebook alike; its value is the one error.
                    cbl = cb_sum / max(n_used, 1)
                    commit = commit + (cbl - cbl.detach())
                commit_loss = commit
                loss = loss + commit * self.commitment_weight
        quantize, embed_ind, _ = self._layout_out(quantize, embed_ind, None, orig_input, mask,
                                                  layout)
        if not return_loss_breakdown:
            return quantize, embed_ind, loss
        return quantize, embed_ind, loss, LossBreakdown(commit_loss, self.zero, self.zero,
                                                         self.zero)

    @staticmethod
    def _scatter(values: Tensor, shape, mask, fill) -> Tensor:
        """Rows of the masked positions back into `shape`, `fill` elsewhere (differentiable)."""
        if mask is None:
            return values.view(shape)
        full = torch.full(shape, fill, dtype=values.dtype, device=values.device)
        return full.index_put((mask,), values)

    def _layout_out(self, quantize, embed_ind, per_token_loss, orig_input, mask, layout):
        """(B, N, [k,] dim) outputs -> the input's layout; masked positions get -1 / 0 (or the
        input, with return_zeros_for_masked_padding=False)."""
        only_one, need_transpose, spatial = layout
        B = quantize.shape[0]
        quantize = self.project_out(quantize)
        if mask is not None:
            fill = torch.zeros_like(orig_input) if self.return_zeros_for_masked_padding \
                else orig_input
            mq = mask.view(*mask.shape, *([1] * (quantize.dim() - 2)))
            if quantize.dim() == 4:  # top-k: (B, N, k, dim)
                fill = fill[:, :, None]
            quantize = torch.where(mq, quantize, fill.to(quantize.dtype))
            embed_ind = embed_ind.masked_fill(~mask.view(*mask.shape,
                                                         *([1] * (embed_ind.dim() - 2))), -1)
        if need_transpose:
            quantize = quantize.movedim(-1, 1)
        if spatial is not None:
            quantize = quantize.movedim(-1, 1)
            quantize = quantize.reshape(B, quantize.shape[1], *spatial, *quantize.shape[3:])
            embed_ind = embed_ind.reshape(B, *spatial, *embed_ind.shape[2:])
            if per_token_loss is not None:
                per_token_loss = per_token_loss.reshape(B, *spatial, *per_token_loss.shape[2:])
        if only_one:
            embed_ind = embed_ind[:, 0]
            quantize = quantize[:, 0]
            if per_token_loss is not None:
                per_token_loss = per_token_loss[:, 0]
        return quantize, embed_ind, per_token_loss

    def _forward_topk(self, group, embed, k, learn, ste, dtype, orig_input, mask, layout):
        """forward(topk=k): the k nearest codes of every vector (vqkernels.nearest_code, nearest
        first, ties to the lower index), their straight-through (or rotated) copies and a
        per-token, per-candidate commitment loss; no codebook update, as in the peer."""
        gmask = None if mask is None else mask[:, :, None].expand(group.shape[:3])
        rows = group.reshape(-1, group.shape[-1]) if gmask is None else group[gmask]
        idx, _ = nearest_code(rows.detach(), embed.detach(), k=k)
        idx = idx.view(rows.shape[0], k)                                  # (M, k), also k = 1
        codes = embed[idx]                                                # (M, k, d)
        xr = rows[:, None, :].expand_as(codes)
        quant = codes
        if ste:
            quant = _rotate_to(xr, codes.detach()) if self.rotation_trick else \
                xr + (codes - xr).detach()
        commit_q = codes if (learn and self.training) else codes.detach()
        per_token = ((commit_q - xr) ** 2).mean(-1)                       # (M, k)
        B, N = group.shape[:2]
        quant = self._scatter(quant, (B, N, 1, k, group.shape[-1]), gmask, 0)[:, :, 0]
        embed_ind = self._scatter(idx, (B, N, 1, k), gmask, -1)[:, :, 0]
        per_token = self._scatter(per_token, (B, N, 1, k), gmask, 0)[:, :, 0]
        if self.has_commitment_loss:
            loss = per_token * self.commitment_weight
        else:
            loss = per_token if not self.training else self.zero.clone().requires_grad_()
        quant, embed_ind, loss_out = self._layout_out(quant.to(dtype), embed_ind,
                                                      loss if loss.dim() else None, orig_input,
                                                      mask, layout)
        return quant, embed_ind, (loss_out if loss.dim() else loss)

    def update_indices(self, x: Tensor, indices: Tensor, mask: Tensor | None = None) -> None:
        """The codebook upkeep of a training step, from indices chosen elsewhere (e.g. the first
        of forward(topk=...)'s candidates): EMA statistics, EMA codebook, dead-code expiry.
        Masked-out positions take no part; an index of -1 counts as code 0 (as in the peer)."""
        x, _, mask, layout = self._layout_in(x, mask, None)
        if layout[2] is not None and indices.dim() >= 3:
            indices = indices.flatten(1, len(layout[2]))
        if layout[0]:
            indices = indices[:, None]
        z = self._project(x).detach()
        if self.heads == 1:
            indices = indices[..., None]
        indices = indices.masked_fill(indices == -1, 0)
        rows, idx = [], []
        for g, (group, gmask) in enumerate(self._groups(z, mask)):
            ig = indices[:, :, g] if self.separate_codebook_per_head else indices
            if gmask is None:
                rows.append(group.reshape(-1, self.codebook_dim))
                idx.append(ig.reshape(-1))
            else:
                rows.append(group[gmask])
                idx.append(ig[gmask])
        self._codebook.update(rows, idx)

    update_ema_indices = update_indices  # the peer's older name


# ================================================================================ residual VQ
def _frac_gradient(t: Tensor, frac: float) -> Tensor:
    """The value of `t`; a fraction `frac` of its gradient (the peer's quant_grad_frac)."""
    if frac <= 0:
        return t.detach()
    return frac * t + (1.0 - frac) * t.detach()


def _maybe_sync_seed(device, max_size: int = 10_000) -> int:
    """The peer's quantizer-dropout seed: one torch draw (summed over the ranks, so they agree).
    Drawn exactly where the peer draws it, so a seeded run drops the same stages as the peer's."""
    seed = torch.randint(0, max_size, (), device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized() and \
            torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(seed)
    return int(seed.item())


# ResidualVQ arguments it cannot honour: name -> (peer default, why / what to do).
_UNSUPPORTED_RVQ = {
    "implicit_neural_codebook": (
        False, "QINCo's implicit codebooks transform the codebook per input (an N x K x D "
        "tensor); vqkernels searches fixed codebooks"),
    "diveq": (False, "DiVeQ (directional reparametrisation) is not implemented in "
              "vqkernels.compat"),
}


class ResidualVQ(nn.Module):
    """vector-quantize-pytorch 1.32's ``ResidualVQ``: ``num_quantizers`` compat ``VectorQuantize``
    stages, each quantizing what the previous ones left (Zeghidour et al. 2021, algorithm 1).

    The same arguments, defaults, submodule and state-dict names (``layers.{i}._codebook.*``,
    ``project_in``/``project_out``) and returns as the peer: ``(quantized, indices (..., Q),
    losses (Q,))`` and, with ``return_all_codes=True``, the codes ``(Q, ..., codebook_dim)``.
    Every stage is this module's ``VectorQuantize`` (exact search, the peer's upkeep rules), so
    each stage's index, loss and codebook update matches the peer's as ``VectorQuantize`` does.
    Refused with ``TypeError`` unless left at the default: ``implicit_neural_codebook``,
    ``diveq``, forward ``indices=``, and every ``VectorQuantize`` argument that class refuses.
    """

    def __init__(self, *, dim, num_quantizers=None, codebook_size, codebook_dim=None,
                 shared_codebook=False, diveq=False, heads=1, quantize_dropout=False,
                 quantize_dropout_cutoff_index=0, quantize_dropout_multiple_of=1,
                 accept_image_fmap=False, implicit_neural_codebook=False, mlp_kwargs=None,
                 beam_size=None, eval_beam_size=None, beam_score_quantizer_weights=None,
                 quant_grad_frac=0.0, return_zeros_for_masked_padding=True, **vq_kwargs):
        super().__init__()
        given = dict(implicit_neural_codebook=implicit_neural_codebook, diveq=diveq)
        for name, (default, what) in _UNSUPPORTED_RVQ.items():
            if given[name] != default:
                raise TypeError(f"ResidualVQ: {name}={given[name]!r} is not supported by "
                                f"vqkernels.compat: {what}. Leave it at its default "
                                f"({default!r}), or use vector_quantize_pytorch for it.")
        # mlp_kwargs only configures the implicit codebooks refused above.
        if heads != 1:
            raise ValueError(f"ResidualVQ: heads={heads!r}: residual VQ is not compatible with "
                             f"multi-headed codes (as in vector-quantize-pytorch); use heads=1")
        if isinstance(codebook_size, (tuple, list)):
            codebook_sizes = tuple(codebook_size)
            if num_quantizers is not None and num_quantizers != len(codebook_sizes):
                raise ValueError(f"ResidualVQ: num_quantizers={num_quantizers!r} but "
                                 f"codebook_size lists {len(codebook_sizes)} sizes")
        else:
            if isinstance(num_quantizers, bool) or not isinstance(num_quantizers, int) or \
                    num_quantizers < 1:
                raise ValueError(f"ResidualVQ: num_quantizers must be a positive int (or give "
                                 f"codebook_size as a tuple of per-stage sizes), got "
                                 f"{num_quantizers!r}")
            codebook_sizes = (codebook_size,) * num_quantizers
        num_quantizers = len(codebook_sizes)
        if isinstance(quantize_dropout_cutoff_index, bool) or \
                not isinstance(quantize_dropout_cutoff_index, int) or \
                quantize_dropout_cutoff_index < 0:
            raise ValueError(f"ResidualVQ: quantize_dropout_cutoff_index must be an int >= 0, "
                             f"got {quantize_dropout_cutoff_index!r}")
        if quantize_dropout and quantize_dropout_cutoff_index >= num_quantizers:
            raise ValueError(f"ResidualVQ: quantize_dropout_cutoff_index="
                             f"{quantize_dropout_cutoff_index} leaves no stage to drop from with "
                             f"num_quantizers={num_quantizers}")
        m = quantize_dropout_multiple_of
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"ResidualVQ: quantize_dropout_multiple_of must be a positive int, "
                             f"got {quantize_dropout_multiple_of!r}")
        if eval_beam_size is not None and beam_size is None:
            raise ValueError("ResidualVQ: eval_beam_size needs beam_size too")
        for name, b in (("beam_size", beam_size), ("eval_beam_size", eval_beam_size)):
            if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b < 1):
                raise ValueError(f"ResidualVQ: {name} must be a positive int or None, got {b!r}")
        weights = [1.0] * num_quantizers if beam_score_quantizer_weights is None \
            else list(beam_score_quantizer_weights)
        if len(weights) != num_quantizers:
            raise ValueError(f"ResidualVQ: beam_score_quantizer_weights has {len(weights)} "
                             f"entries for {num_quantizers} quantizers")
        if not 0.0 <= float(quant_grad_frac) <= 1.0:
            raise ValueError(f"ResidualVQ: quant_grad_frac must be in [0, 1], got "
                             f"{quant_grad_frac!r}")

        codebook_dim = dim if codebook_dim is None else codebook_dim
        self.dim, self.codebook_dim = dim, codebook_dim
        self.has_projections = codebook_dim != dim
        self.project_in = nn.Linear(dim, codebook_dim) if self.has_projections else nn.Identity()
        self.project_out = nn.Linear(codebook_dim, dim) if self.has_projections else nn.Identity()
        self.accept_image_fmap = bool(accept_image_fmap)
        self.return_zeros_for_masked_padding = bool(return_zeros_for_masked_padding)
        vq_kwargs.update(return_zeros_for_masked_padding=return_zeros_for_masked_padding)
        if shared_codebook:
            # One codebook for all stages: each stage gathers EMA statistics, the codebook is
            # recomputed once at the end of the forward (as the peer does).
            vq_kwargs.update(manual_ema_update=True)
        self.num_quantizers = num_quantizers
        self.codebook_sizes = codebook_sizes
        self.uniform_codebook_size = len(set(codebook_sizes)) == 1
        self.layers = nn.ModuleList([
            VectorQuantize(dim=codebook_dim, codebook_size=k, codebook_dim=codebook_dim,
                           accept_image_fmap=accept_image_fmap, **vq_kwargs)
            for k in codebook_sizes])
        self.quantize_dropout = bool(quantize_dropout) and num_quantizers > 1
        self.quantize_dropout_cutoff_index = quantize_dropout_cutoff_index
        self.quantize_dropout_multiple_of = quantize_dropout_multiple_of
        self.vq_is_ema_updating = self.layers[0].ema_update
        self.quant_grad_frac = float(quant_grad_frac)
        self.beam_size = beam_size
        self.eval_beam_size = beam_size if eval_beam_size is None else eval_beam_size
        self.register_buffer("beam_score_weights", torch.tensor(weights), persistent=False)
        self.shared_codebook = bool(shared_codebook)
        if self.shared_codebook:
            if not self.uniform_codebook_size:
                raise ValueError("ResidualVQ: shared_codebook=True needs one codebook_size for "
                                 "every stage")
            for vq in self.layers[1:]:
                vq._codebook = self.layers[0]._codebook

    # ----------------------------------------------------------------------------- codebooks
    @property
    def codebook_size(self):
        return self.layers[0].codebook_size

    @property
    def codebooks(self):
        books = tuple(vq.codebook for vq in self.layers)
        return torch.stack(books) if self.uniform_codebook_size else books

    def _channel_first(self) -> bool:
        vq = self.layers[0]
        return self.accept_image_fmap or not vq.channel_last or vq.accept_3d_fmap

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """Per stage, the codes of `indices` (..., q): (Q, ..., codebook_dim), zero where an index
        is -1 (a stage dropped by quantizer dropout). Fewer than Q stages are padded with -1
        (needs quantize_dropout, as in the peer)."""
        if not isinstance(indices, Tensor) or indices.dim() < 2:
            raise ValueError("indices must be a tensor (batch, ..., num_quantizers)")
        q = indices.shape[-1]
        if q > self.num_quantizers:
            raise ValueError(f"indices have {q} stages, ResidualVQ has {self.num_quantizers}")
        if q < self.num_quantizers:
            if not self.quantize_dropout:
                raise ValueError(f"indices have {q} < {self.num_quantizers} stages: only a "
                                 f"ResidualVQ built with quantize_dropout=True decodes from "
                                 f"fewer stages")
            indices = F.pad(indices, (0, self.num_quantizers - q), value=-1)
        dropped = indices == -1
        indices = indices.masked_fill(dropped, 0)
        codes = torch.stack([vq.codebook[indices[..., s]] for s, vq in enumerate(self.layers)])
        return codes.masked_fill(dropped.movedim(-1, 0)[..., None], 0.0)

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        """What the forward returned as `quantized` for these indices (eval mode)."""
        return self.project_out(self.get_codes_from_indices(indices).sum(dim=0))

    # ----------------------------------------------------------------------------- forward
    def forward(self, x: Tensor, mask: Tensor | None = None, indices=None,
                return_all_codes=False, sample_codebook_temp=None, freeze_codebook=False,
                beam_size=None, rand_quantize_dropout_fixed_seed=None):
        if indices is not None:
            raise TypeError("ResidualVQ.forward: indices= (cross-entropy loss against given "
                            "codes) needs the N x K distance matrix, which vqkernels never "
                            "forms; compute that loss yourself or use vector_quantize_pytorch")
        _check_input(x)
        beam_size = beam_size if beam_size is not None else \
            (self.beam_size if self.training else self.eval_beam_size)
        if beam_size is not None and beam_size > 1:
            return self._forward_beam(x, mask, int(beam_size), return_all_codes,
                                      freeze_codebook, rand_quantize_dropout_fixed_seed)
        if self._can_fuse(x, mask):
            return self._forward_fused(x, return_all_codes)
        orig_input = x
        x = self.project_in(x)
        quantized_out = torch.zeros_like(x)
        residual = x
        drop_from = self._dropout_index(x.device, rand_quantize_dropout_fixed_seed)
        all_indices, all_losses, residuals = [], [], []
        for s, vq in enumerate(self.layers):
            if drop_from is not None and s > drop_from:
                all_indices.append(torch.full_like(all_indices[-1], -1))
                all_losses.append(torch.zeros_like(all_losses[-1]))
                continue
            residuals.append(residual)
            quantized, embed_ind, loss = vq(residual, mask=mask,
                                            freeze_codebook=freeze_codebook)
            residual = residual - _frac_gradient(quantized, self.quant_grad_frac)
            quantized_out = quantized_out + quantized
            all_indices.append(embed_ind)
            all_losses.append(loss)
        self._shared_upkeep(residuals)
        return self._finish(quantized_out, orig_input, mask, torch.stack(all_indices, dim=-1),
                            torch.stack(all_losses).float(), return_all_codes)

    # Eval-mode inference through vqkernels' fused residual search (one call for all stages; on
    # the CPU every row tile runs through every stage with its residual in cache). Its definition
    # is the stage loop's, bit for bit: stage s searches the fp32 residual fl(r - e) exactly and
    # the output is fl(((0 + e_0) + e_1) + ...). Only where the stage loop does nothing else:
    # eval (no upkeep, no straight-through), fp32, no cosine normalisation per stage, no
    # learnable codebook (whose gradient the gather carries), channel-last, no mask.
    _fused_eval = True

    def _can_fuse(self, x: Tensor, mask) -> bool:
        vq = self.layers[0]
        return (self._fused_eval and not self.training and mask is None
                and x.dtype == torch.float32 and x.dim() in (2, 3) and x.shape[-1] == self.dim
                and x.numel() > 0 and not self._channel_first() and not vq.use_cosine_sim
                and not vq.learnable_codebook
                and (not self.has_projections or self.project_in.weight.dtype == torch.float32)
                and all(v.codebook.dtype == torch.float32 for v in self.layers))

    def _forward_fused(self, x: Tensor, return_all_codes):
        from .residual import residual_forward
        z = self.project_in(x)
        with torch.no_grad():
            rows = z.detach().reshape(-1, self.codebook_dim)
            q, idx, _ = residual_forward(rows, [vq.codebook.detach() for vq in self.layers],
                                         None, "auto")
        quantized_out = q.view(z.shape)
        all_indices = idx.t().reshape(*z.shape[:-1], self.num_quantizers)
        all_losses = torch.stack([vq.zero for vq in self.layers]).float()
        return self._finish(quantized_out, x, None, all_indices, all_losses, return_all_codes)

    def _dropout_index(self, device, seed) -> int | None:
        """The last stage kept by quantizer dropout this step (the peer's draw), or None."""
        if not (self.training and self.quantize_dropout):
            return None
        if seed is None:
            seed = _maybe_sync_seed(device)
        last = random.Random(seed).randrange(self.quantize_dropout_cutoff_index,
                                             self.num_quantizers)
        m = self.quantize_dropout_multiple_of
        if m != 1:
            last = math.ceil((last + 1) / m) * m - 1
        return last

    def _rows(self, t: Tensor) -> Tensor:
        """A stage's input in its layout -> (M, codebook_dim) rows."""
        if self._channel_first() and t.dim() > 2:
            t = t.movedim(1, -1)
        return t.reshape(-1, self.codebook_dim)

    def _shared_upkeep(self, residuals: list[Tensor]) -> None:
        """A shared codebook: the EMA codebook recomputed once from the statistics every stage
        added, then dead codes replaced from every stage's input (the peer's end-of-forward)."""
        if not (self.training and self.shared_codebook):
            return
        cb = self.layers[0]._codebook
        with torch.no_grad():
            if self.vq_is_ema_updating:
                cb.update_ema()
            # (expire_codes_ l2-normalises the rows itself under cosine similarity)
            cb.expire_codes_([torch.cat([self._rows(r.detach()) for r in residuals])])

    def _finish(self, quantized_out, orig_input, mask, all_indices, all_losses,
                return_all_codes):
        quantized_out = self.project_out(quantized_out)
        if mask is not None:
            fill = torch.zeros_like(quantized_out) if self.return_zeros_for_masked_padding \
                else orig_input
            quantized_out = torch.where(mask[..., None], quantized_out, fill)
        if not return_all_codes:
            return quantized_out, all_indices, all_losses
        return quantized_out, all_indices, all_losses, self.get_codes_from_indices(all_indices)

    def _forward_beam(self, x, mask, beam, return_all_codes, freeze_codebook, seed):
        """The peer's beam search over the stages' top-`beam` codes: every stage extends each
        kept path by its `beam` nearest codes (vqkernels.nearest_code, exact, ties to the lower
        index), paths are scored by minus the weighted sum of their per-token commitment losses,
        the best `beam` kept (one after the last stage); in training the codebooks are then
        updated from the chosen path (update_indices)."""
        vq0 = self.layers[0]
        if self._channel_first() or x.dim() != 3:
            raise ValueError(f"ResidualVQ beam search takes (batch, seq, dim) channel-last input "
                             f"here, got shape {tuple(x.shape)} (accept_image_fmap="
                             f"{self.accept_image_fmap}, channel_last={vq0.channel_last})")
        orig_input = x
        x = self.project_in(x)
        B, N, d = x.shape
        drop_from = self._dropout_index(x.device, seed)
        last_stage = self.num_quantizers - 1 if drop_from is None else drop_from
        scores = x.new_zeros(B, N, 1)
        residual = x[:, :, None]                                   # (B, N, j, d)
        quantized_out = torch.zeros_like(residual)
        all_residuals = x.new_zeros(B, N, 1, 0, d)                 # (B, N, j, l, d)
        all_indices = torch.zeros(B, N, 1, 0, dtype=torch.long, device=x.device)
        all_losses = x.new_zeros(B, N, 1, 0, dtype=torch.float32)
        for s, vq in enumerate(self.layers):
            if drop_from is not None and s > drop_from:
                all_indices = F.pad(all_indices, (0, 1), value=-1)
                all_losses = F.pad(all_losses, (0, 1), value=0.0)
                continue
            j = residual.shape[2]
            all_residuals = torch.cat((all_residuals, residual[:, :, :, None]), dim=-2)
            flat_mask = None if mask is None else mask[:, :, None].expand(B, N, j).reshape(B, -1)
            quantized, embed_ind, loss = vq(residual.reshape(B, N * j, d), mask=flat_mask,
                                            topk=beam, freeze_codebook=freeze_codebook)
            k = quantized.shape[2]
            quantized = quantized.view(B, N, j, k, d)
            embed_ind = embed_ind.view(B, N, j, k)
            loss = loss.view(B, N, j, k) if loss.dim() else loss.expand(B, N, j, k)
            scores = (scores[..., None] - loss * self.beam_score_weights[s]).flatten(-2)
            residual = (residual[:, :, :, None] -
                        _frac_gradient(quantized, self.quant_grad_frac)).flatten(2, 3)
            quantized_out = (quantized_out[:, :, :, None] + quantized).flatten(2, 3)
            all_residuals = all_residuals.repeat_interleave(k, dim=2)
            all_indices = torch.cat((all_indices[:, :, :, None].expand(-1, -1, -1, k, -1),
                                     embed_ind[..., None]), dim=-1).flatten(2, 3)
            all_losses = torch.cat((all_losses[:, :, :, None].expand(-1, -1, -1, k, -1),
                                    loss[..., None].float()), dim=-1).flatten(2, 3)
            keep = beam if s != last_stage else 1
            if scores.shape[-1] > keep:
                scores, sel = scores.topk(keep, dim=-1)

                def pick(t, sel=sel):
                    idx = sel.view(*sel.shape, *([1] * (t.dim() - 3)))
                    return t.gather(2, idx.expand(*sel.shape, *t.shape[3:]))
                residual, quantized_out = pick(residual), pick(quantized_out)
                all_indices, all_losses = pick(all_indices), pick(all_losses)
                all_residuals = pick(all_residuals)
        quantized_out, all_indices, all_losses, all_residuals = (
            t[:, :, 0] for t in (quantized_out, all_indices, all_losses, all_residuals))
        if mask is not None:
            all_losses = torch.where(mask[..., None], all_losses, 0.0)
            all_losses = all_losses.sum(dim=(0, 1)) / mask.sum().clamp_min(1e-4)
        else:
            all_losses = all_losses.mean(dim=(0, 1))
        if self.training:
            # With quantizer dropout, all_residuals holds only the stages that ran: zip stops.
            for vq, layer_input, idx in zip(self.layers, all_residuals.unbind(dim=-2),
                                            all_indices.unbind(dim=-1)):
                vq.update_indices(layer_input, idx, mask=mask)
        self._shared_upkeep(list(all_residuals.unbind(dim=-2)))
        return self._finish(quantized_out, orig_input, mask, all_indices, all_losses,
                            return_all_codes)


class GroupedResidualVQ(nn.Module):
    """vector-quantize-pytorch 1.32's ``GroupedResidualVQ``: the features split into ``groups``
    equal chunks, each through its own ``ResidualVQ`` (all constructor arguments but ``dim`` and
    ``groups`` go to every one). Returns ``(quantized, indices (G, ..., Q), losses (G, Q))`` and,
    with ``return_all_codes=True``, each group's codes. In training one dropout seed is drawn for
    all groups (so they drop the same stages), as in the peer."""

    def __init__(self, *, dim, groups=1, accept_image_fmap=False, **kwargs):
        super().__init__()
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise ValueError(f"GroupedResidualVQ: groups must be a positive int, got {groups!r}")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim % groups:
            raise ValueError(f"GroupedResidualVQ: dim={dim!r} must be an int divisible by "
                             f"groups={groups}")
        self.dim, self.groups = dim, groups
        self.accept_image_fmap = bool(accept_image_fmap)
        self.rvqs = nn.ModuleList([
            ResidualVQ(dim=dim // groups, accept_image_fmap=accept_image_fmap, **kwargs)
            for _ in range(groups)])

    @property
    def codebooks(self):
        return torch.stack(tuple(rvq.codebooks for rvq in self.rvqs))

    @property
    def split_dim(self):
        return 1 if self.accept_image_fmap or not self.rvqs[0].layers[0].channel_last else -1

    def get_codes_from_indices(self, indices):
        return torch.stack(tuple(rvq.get_codes_from_indices(i)
                                 for rvq, i in zip(self.rvqs, indices)))

    def get_output_from_indices(self, indices):
        return torch.cat(tuple(rvq.get_output_from_indices(i)
                               for rvq, i in zip(self.rvqs, indices)), dim=self.split_dim)

    def forward(self, x, indices=None, return_all_codes=False, sample_codebook_temp=None,
                freeze_codebook=False, mask=None):
        if indices is not None and len(indices) > 0:
            raise TypeError("GroupedResidualVQ.forward: indices= (cross-entropy loss against "
                            "given codes) needs the N x K distance matrix, which vqkernels never "
                            "forms; compute that loss yourself or use vector_quantize_pytorch")
        _check_input(x)
        if x.shape[self.split_dim] != self.dim:
            raise ValueError(f"x has {x.shape[self.split_dim]} features on axis {self.split_dim} "
                             f"but GroupedResidualVQ was built with dim={self.dim}")
        seed = _maybe_sync_seed(x.device) if self.training else None
        out = [rvq(chunk, mask=mask, return_all_codes=return_all_codes,
                   freeze_codebook=freeze_codebook, rand_quantize_dropout_fixed_seed=seed)
               for rvq, chunk in zip(self.rvqs, x.chunk(self.groups, dim=self.split_dim))]
        quantized, all_indices, losses, *all_codes = zip(*out)
        return (torch.cat(quantized, dim=self.split_dim), torch.stack(all_indices),
                torch.stack(losses), *all_codes)
