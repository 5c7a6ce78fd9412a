"""vqkernels.compat.VectorQuantize on its own (no vector-quantize-pytorch needed): the peer's
argument names, defaults and return structure, the rules of its codebook upkeep recomputed here in
plain torch, and a clear error for every argument it cannot honour. Parity with the peer itself is
tested in tests/compat/ (skipped when the peer is not installed)."""
import inspect
import random

import pytest
import torch
import torch.nn.functional as F

from vqkernels.compat import GroupedResidualVQ, LossBreakdown, ResidualVQ, VectorQuantize


def _nearest(rows, codes):
    d = ((rows.double()[:, None] - codes.double()[None]) ** 2).sum(-1)
    return d.argmin(1)


def test_defaults_are_the_peers():
    sig = inspect.signature(VectorQuantize.__init__).parameters
    expect = dict(codebook_dim=None, heads=1, separate_codebook_per_head=False, decay=0.8,
                  eps=1e-5, freeze_codebook=False, kmeans_init=False, kmeans_iters=10,
                  use_cosine_sim=False, threshold_ema_dead_code=0, channel_last=True,
                  accept_image_fmap=False, accept_3d_fmap=False, commitment_weight=1.0,
                  rotation_trick=None, sync_codebook=None, ema_update=None,
                  learnable_codebook=None)
    for k, v in expect.items():
        assert sig[k].default == v, k
    vq = VectorQuantize(dim=8, codebook_size=16)
    assert vq.rotation_trick and vq.ema_update and not vq.learnable_codebook
    assert not VectorQuantize(dim=1, codebook_size=4).rotation_trick  # the peer: only for dim > 1


@pytest.mark.parametrize("training", [True, False])
def test_returns_quantized_indices_loss(training):
    vq = VectorQuantize(dim=16, codebook_size=32, decay=1.0)
    vq.train(training)
    x = torch.randn(3, 50, 16)
    cb = vq.codebook.clone()
    q, idx, loss = vq(x)
    assert q.shape == x.shape and idx.shape == (3, 50) and idx.dtype == torch.int64
    assert torch.equal(idx.view(-1), _nearest(x.view(-1, 16), cb))
    assert torch.equal(q, cb[idx])
    if training:
        assert torch.allclose(loss, F.mse_loss(cb[idx], x), rtol=1e-5)
        assert loss.requires_grad
    else:
        assert loss.item() == 0.0  # the peer's eval loss
    assert torch.equal(vq.get_output_from_indices(idx), q)


@pytest.mark.parametrize("name,value", [
    ("stochastic_sample_codes", True), ("commitment_use_cross_entropy_loss", True),
    ("codebook_diversity_loss_weight", 0.1), ("straight_through", True),
    ("directional_reparam", True), ("affine_param", True), ("orthogonal_reg_weight", 1.0),
    ("in_place_codebook_optimizer", lambda p: torch.optim.SGD(p, lr=1e-3)),
    ("vq_bridge", torch.nn.Identity()), ("sync_update_v", 0.5)])
def test_unsupported_arguments_raise_naming_them(name, value):
    with pytest.raises(TypeError, match=name):
        VectorQuantize(dim=8, codebook_size=4, **{name: value})
    if name in ("in_place_codebook_optimizer", "vq_bridge"):
        default = None
    else:
        default = False if isinstance(value, bool) else type(value)(0)
    VectorQuantize(dim=8, codebook_size=4, **{name: default})  # the peer's default is accepted


def test_unknown_and_forward_only_arguments_raise():
    with pytest.raises(TypeError, match="no_such_thing"):
        VectorQuantize(dim=8, codebook_size=4, no_such_thing=1)
    vq = VectorQuantize(dim=8, codebook_size=4)
    x = torch.randn(2, 5, 8)
    for kw, name in ((dict(indices=torch.zeros(2, 5).long()), "indices"),
                     (dict(codebook_transform_fn=lambda e: e), "codebook_transform_fn")):
        with pytest.raises(TypeError, match=name):
            vq(x, **kw)
    with pytest.raises(ValueError, match="dim=8"):
        vq(torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match="topk"):
        VectorQuantize(dim=8, codebook_size=4, heads=2)(x, topk=2)
    for name, bad in (("threshold_ema_dead_code", -1), ("decay", 1.5), ("codebook_dim", 0),
                      ("heads", 0)):
        with pytest.raises(ValueError, match=name):
            VectorQuantize(dim=8, codebook_size=4, **{name: bad})
    with pytest.raises(ValueError, match="learnable_codebook"):
        VectorQuantize(dim=8, codebook_size=4, learnable_codebook=True)  # EMA on by default


def test_ema_update_follows_the_peers_rule():
    torch.manual_seed(1)
    K, D, decay, eps = 8, 4, 0.7, 1e-5
    vq = VectorQuantize(dim=D, codebook_size=K, decay=decay, eps=eps)
    x = torch.randn(2, 40, D)
    e0 = vq.codebook.clone()
    avg0, cs0 = vq._codebook.embed_avg[0].clone(), vq._codebook.cluster_size[0].clone()
    _, idx, _ = vq(x)
    rows = x.reshape(-1, D)
    onehot = F.one_hot(_nearest(rows, e0), K).float()  # the test may form it: tiny
    cs = cs0 * decay + onehot.sum(0) * (1 - decay)
    avg = avg0 * decay + (onehot.T @ rows) * (1 - decay)
    n = cs.sum()
    expect = avg / ((cs + eps) / (n + K * eps) * n)[:, None]
    assert torch.equal(idx.view(-1), _nearest(rows, e0))
    torch.testing.assert_close(vq.codebook, expect, rtol=1e-5, atol=1e-6)


def test_mask_and_lens():
    vq = VectorQuantize(dim=8, codebook_size=16, decay=1.0)
    x = torch.randn(2, 20, 8)
    lens = torch.tensor([20, 7])
    q, idx, loss = vq(x, lens=lens)
    mask = torch.arange(20)[None] < lens[:, None]
    assert (idx[~mask] == -1).all() and (q[~mask] == 0).all()
    cb = vq.codebook
    assert torch.equal(idx[mask], _nearest(x[mask], cb))
    assert torch.allclose(loss, F.mse_loss(cb[idx[mask]], x[mask]), rtol=1e-5)
    vq2 = VectorQuantize(dim=8, codebook_size=16, decay=1.0, return_zeros_for_masked_padding=False)
    vq2.load_state_dict(vq.state_dict())
    q2, _, _ = vq2(x, mask=mask)
    assert torch.equal(q2[~mask], x[~mask]) and torch.equal(q2[mask], q[mask])


def test_mask_rows_do_not_reach_the_ema():
    vq = VectorQuantize(dim=4, codebook_size=8, decay=0.5)
    x = torch.randn(1, 30, 4)
    mask = torch.zeros(1, 30, dtype=torch.bool)
    mask[0, :10] = True
    ref = VectorQuantize(dim=4, codebook_size=8, decay=0.5)
    ref.load_state_dict(vq.state_dict())
    vq(x, mask=mask)
    ref(x[:, :10])
    assert torch.equal(vq.codebook, ref.codebook)


@pytest.mark.parametrize("separate", [False, True])
def test_heads_image_fmap_and_channel_first(separate):
    vq = VectorQuantize(dim=12, codebook_size=10, codebook_dim=3, heads=4,
                        separate_codebook_per_head=separate, accept_image_fmap=True)
    vq.eval()
    img = torch.randn(2, 12, 5, 6)
    q, idx, _ = vq(img)
    assert q.shape == img.shape and idx.shape == (2, 5, 6, 4)
    torch.testing.assert_close(vq.get_output_from_indices(idx), q)
    z = vq.project_in(img.movedim(1, -1)).reshape(-1, 4, 3)
    cb = vq.codebook
    for h in range(4):
        codes = cb[h] if separate else cb
        assert torch.equal(idx.reshape(-1, 4)[:, h], _nearest(z[:, h], codes))
    seq = VectorQuantize(dim=6, codebook_size=5, channel_last=False).eval()
    xs = torch.randn(2, 6, 9)  # (batch, dim, seq)
    q, idx, _ = seq(xs)
    assert q.shape == xs.shape and idx.shape == (2, 9)
    assert torch.equal(seq.get_output_from_indices(idx), q)
    one = VectorQuantize(dim=6, codebook_size=5).eval()
    q, idx, _ = one(torch.randn(3, 6))
    assert q.shape == (3, 6) and idx.shape == (3,)
    v3 = VectorQuantize(dim=4, codebook_size=5, accept_3d_fmap=True).eval()
    q, idx, _ = v3(torch.randn(1, 4, 2, 3, 5))
    assert q.shape == (1, 4, 2, 3, 5) and idx.shape == (1, 2, 3, 5)
    assert torch.equal(v3.get_output_from_indices(idx), q)


def test_learnable_codebook_gets_the_commitment_gradient():
    vq = VectorQuantize(dim=6, codebook_size=8, learnable_codebook=True, ema_update=False,
                        rotation_trick=False, commitment_weight=0.5)
    x = torch.randn(4, 10, 6, requires_grad=True)
    q, idx, loss = vq(x)
    e = vq._codebook.embed
    ref = 0.5 * F.mse_loss(e[0][idx], x)
    gx, ge = torch.autograd.grad(loss + q.sum(), (x, e))
    rx, re = torch.autograd.grad(ref + x.sum(), (x, e))  # straight-through: d q / d x = I
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(ge, re)
    # frozen: no gradient to the codebook
    _, _, loss = vq(x, freeze_codebook=True)
    assert torch.autograd.grad(loss, e, allow_unused=True)[0] is None
    # without a straight-through copy (eval, or an input without gradient) the output is the
    # code itself, and the codebook gets its gradient through it (the peer's one-hot product)
    vq.eval()
    q, idx, _ = vq(x.detach())
    (ge,) = torch.autograd.grad(q.sum(), e)
    assert torch.equal(ge[0], torch.bincount(idx.view(-1), minlength=8)[:, None].float()
                       .expand(8, 6))


def test_rotation_trick_gradient_is_the_papers():
    """The gradient through the quantized output is R^T g * |e|/|x| with R the rotation taking
    x/|x| to e/|e| (Householder form of Fifty et al. 2024, eq. 4.2), built here as a D x D matrix
    in float64."""
    torch.manual_seed(3)
    D = 5
    vq = VectorQuantize(dim=D, codebook_size=7, decay=1.0).double()
    x = torch.randn(1, 6, D, dtype=torch.float64, requires_grad=True)
    q, idx, _ = vq(x)
    g = torch.randn_like(q)
    (gx,) = torch.autograd.grad(q, x, g)
    e = vq.codebook[idx[0]]
    for r in range(6):
        xr, er = x[0, r].detach(), e[r]
        u, v = xr / xr.norm(), er / er.norm()
        w = (u + v) / (u + v).norm()
        R = torch.eye(D, dtype=torch.float64) - 2 * torch.outer(w, w) + 2 * torch.outer(v, u)
        torch.testing.assert_close(R @ u, v)  # it is the rotation taking u to v
        expect = (er.norm() / xr.norm()) * (R.T @ g[0, r])
        torch.testing.assert_close(gx[0, r], expect)


def test_expire_codes_moves_dead_codes_onto_batch_rows():
    torch.manual_seed(5)
    vq = VectorQuantize(dim=4, codebook_size=16, threshold_ema_dead_code=2, decay=0.5)
    x = torch.randn(1, 64, 4) + 50.0  # far from every code: a few codes take every row
    vq(x)
    cs = vq._codebook.cluster_size[0]
    rows = x.reshape(-1, 4)
    for k in range(16):
        on_a_row = (rows == vq.codebook[k]).all(1).any()
        assert on_a_row or cs[k] >= 2  # every code below the threshold now sits on a batch row
    assert (cs >= 2).all()


def test_accum_ema_update_and_weights():
    vq = VectorQuantize(dim=4, codebook_size=6, decay=0.8)
    x = torch.randn(3, 20, 4)
    before = vq.codebook.clone()
    vq(x, accum_ema_update=True)
    vq(x, accum_ema_update=True)
    assert torch.equal(before, vq.codebook)
    vq(x)
    assert not torch.equal(before, vq.codebook)
    w = torch.tensor([1.0, 0, 1, 0, 1, 0])
    before = vq.codebook.clone()
    vq(x, ema_update_weight=lambda s, c: w)
    # unweighted codes keep their statistics; only the smoothing's total moves them (~eps)
    torch.testing.assert_close(before[w == 0], vq.codebook[w == 0], rtol=0, atol=1e-5)
    assert (before[w == 1] != vq.codebook[w == 1]).all()
    with pytest.raises(ValueError, match="ema_update_weight"):
        vq(x, ema_update_weight=torch.ones(5))


def test_kmeans_init_and_breakdown():
    vq = VectorQuantize(dim=4, codebook_size=8, kmeans_init=True, kmeans_iters=3)
    assert not bool(vq._codebook.initted)
    x = torch.randn(2, 40, 4)
    q, idx, loss, br = vq(x, return_loss_breakdown=True)
    assert isinstance(br, LossBreakdown) and bool(vq._codebook.initted)
    assert torch.isfinite(vq.codebook).all() and vq.codebook.abs().sum() > 0
    assert torch.equal(loss, br.commitment)


def test_commitment_gradient_uses_the_codes_of_this_step():
    """The EMA step rewrites the codebook in place after the search: the loss's backward must
    still see the codes the rows were quantized to."""
    vq = VectorQuantize(dim=8, codebook_size=16, decay=0.5)
    x = torch.randn(2, 30, 8, requires_grad=True)
    cb = vq.codebook.clone()
    _, idx, loss = vq(x)
    assert not torch.equal(cb, vq.codebook)  # the step moved the codes
    (g,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(g, 2 * (x.detach() - cb[idx]) / x.numel())


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("training", [True, False])
def test_topk_and_update_indices(training, k):
    """forward(topk=k): the k nearest codes (nearest first), per-token losses, no codebook
    update; update_indices then applies the update a plain forward would have."""
    vq = VectorQuantize(dim=6, codebook_size=12, decay=0.6).train(training)
    ref = VectorQuantize(dim=6, codebook_size=12, decay=0.6).train(training)
    ref.load_state_dict(vq.state_dict())
    x = torch.randn(2, 15, 6)
    mask = torch.rand(2, 15) > 0.3
    cb = vq.codebook.clone()
    q, idx, loss = vq(x, topk=k, mask=mask)
    assert q.shape == (2, 15, k, 6) and idx.shape == (2, 15, k) and loss.shape == (2, 15, k)
    assert torch.equal(vq.codebook, cb)  # no update with topk
    d = ((x[mask][:, None].double() - cb.double()[None]) ** 2).sum(-1)
    assert torch.equal(idx[mask], d.argsort(dim=1, stable=True)[:, :k])
    assert (idx[~mask] == -1).all() and (q[~mask] == 0).all() and (loss[~mask] == 0).all()
    torch.testing.assert_close(q[mask], cb[idx[mask]])
    torch.testing.assert_close(loss[mask], ((cb[idx[mask]] - x[mask][:, None]) ** 2).mean(-1))
    *_, br = vq(x, topk=k, mask=mask, return_loss_breakdown=True)
    assert isinstance(br, LossBreakdown) and torch.equal(br.commitment, loss)
    q1, i1, l1 = ref(x, mask=mask)
    assert torch.equal(i1, idx[..., 0])
    if training:
        torch.testing.assert_close(l1, loss[..., 0].sum() / mask.sum())
        vq.update_indices(x, idx[..., 0], mask=mask)
        torch.testing.assert_close(vq.codebook, ref.codebook)


# ---------------------------------------------------------------------------- distributed
_DDP_CFGS = {
    # no random draws: two ranks must equal one process on the concatenated batches
    "ema": dict(dim=6, codebook_size=16, decay=0.7),
    # k-means init and dead-code expiry draw rows per rank: the ranks must still stay identical
    "kmeans_expire": dict(dim=6, codebook_size=32, decay=0.7, kmeans_init=True, kmeans_iters=2,
                          threshold_ema_dead_code=2),
}


def _ddp_batches(step, rank, n):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(1, n, 6, generator=g) * (1 + rank)


def _compat_ddp_run(cfg, rank, world, ddp):
    torch.manual_seed(5)  # the same initial codebook on every rank
    vq = VectorQuantize(**cfg)
    assert vq._codebook.sync == ddp  # sync_codebook=None: on when torch.distributed is running
    torch.manual_seed(100 + rank)  # different random draws per rank
    for step in range(4):
        ranks = [rank] if ddp else range(world)
        x = torch.cat([_ddp_batches(step, r, 50 + 30 * r) for r in ranks], dim=1)
        vq(x)
    return {k: v.clone() for k, v in vq.state_dict().items()}


def _compat_ddp_worker(rank, world, init_file, out_dir):
    import datetime
    import os

    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        for name, cfg in _DDP_CFGS.items():
            torch.save(_compat_ddp_run(cfg, rank, world, True),
                       os.path.join(out_dir, f"{name}_{rank}.pt"))
    finally:
        dist.destroy_process_group()
    from helpers import end_spawned_worker
    end_spawned_worker()


def test_sync_codebook_keeps_two_gloo_ranks_identical(tmp_path):
    import torch.multiprocessing as mp
    world = 2
    mp.spawn(_compat_ddp_worker, args=(world, str(tmp_path / "pg"), str(tmp_path)),
             nprocs=world, join=True)
    for name in _DDP_CFGS:
        r0, r1 = (torch.load(tmp_path / f"{name}_{r}.pt") for r in range(world))
        for k in r0:
            assert torch.equal(r0[k], r1[k]), (name, k)
    single = _compat_ddp_run(_DDP_CFGS["ema"], 0, world, False)
    r0 = torch.load(tmp_path / "ema_0.pt")
    for k in single:
        torch.testing.assert_close(r0[k], single[k], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- ResidualVQ
def test_residual_vq_defaults_are_the_peers():
    sig = inspect.signature(ResidualVQ.__init__).parameters
    expect = dict(num_quantizers=None, codebook_dim=None, shared_codebook=False, heads=1,
                  quantize_dropout=False, quantize_dropout_cutoff_index=0,
                  quantize_dropout_multiple_of=1, accept_image_fmap=False, beam_size=None,
                  eval_beam_size=None, quant_grad_frac=0.0, return_zeros_for_masked_padding=True)
    for k, v in expect.items():
        assert sig[k].default == v, k
    rvq = ResidualVQ(dim=8, num_quantizers=3, codebook_size=16)
    assert all(vq.rotation_trick and vq.ema_update for vq in rvq.layers)
    assert rvq.codebooks.shape == (3, 16, 8)
    assert set(rvq.state_dict()) >= {"layers.2._codebook.embed", "layers.0._codebook.cluster_size"}


@pytest.mark.parametrize("training", [False, True])
def test_residual_vq_stages_are_exact_on_the_running_residual(training):
    """Every stage's index is the float64 nearest code of the fp32 residual the earlier stages
    left, the output is the fp32 sum of the chosen codes (eval: exactly; training: the rotation
    trick's value, the codes to rounding), losses are per stage, and the indices decode back."""
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=8, codebook_size=(16, 8, 32), decay=1.0).train(training)
    x = torch.randn(3, 10, 8)
    books = [b.clone() for b in rvq.codebooks]
    q, idx, losses = rvq(x.clone().requires_grad_())
    assert idx.shape == (3, 10, 3) and losses.shape == (3,)
    r, total, expect_losses = x.reshape(-1, 8), torch.zeros(30, 8), []
    for s, cb in enumerate(books):
        k = _nearest(r, cb)
        assert torch.equal(idx[..., s].reshape(-1), k)
        expect_losses.append(((r - cb[k]) ** 2).mean())
        r = r - cb[k]
        total = total + cb[k]
    if training:
        torch.testing.assert_close(q.reshape(-1, 8), total, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(losses, torch.stack(expect_losses).detach(), rtol=1e-5,
                                   atol=1e-7)
    else:
        assert torch.equal(q.reshape(-1, 8), total)
        assert torch.equal(losses, torch.zeros(3))
        assert torch.equal(rvq.get_output_from_indices(idx), q)
    codes = rvq.get_codes_from_indices(idx)
    assert codes.shape == (3, 3, 10, 8)
    torch.testing.assert_close(codes.sum(0), total.view(3, 10, 8))


def test_residual_vq_quantizer_dropout():
    torch.manual_seed(1)
    rvq = ResidualVQ(dim=6, num_quantizers=5, codebook_size=8, quantize_dropout=True,
                     quantize_dropout_cutoff_index=1, quantize_dropout_multiple_of=2)
    x = torch.randn(2, 7, 6)
    kept = set()
    for seed in range(12):
        q, idx, losses = rvq(x, rand_quantize_dropout_fixed_seed=seed, freeze_codebook=True)
        last = random.Random(seed).randrange(1, 5)
        last = -(-(last + 1) // 2) * 2 - 1  # rounded up to a multiple of 2 stages, minus one
        last = min(last, 4)
        kept.add(last)
        assert (idx[..., :last + 1] >= 0).all() and (idx[..., last + 1:] == -1).all()
        assert (losses[last + 1:] == 0).all() and (losses[:last + 1] > 0).all()
        rvq.eval()
        # What the kept stages decode to is what training returned (rotation value: to rounding).
        torch.testing.assert_close(rvq.get_output_from_indices(idx[..., :last + 1]), q,
                                   rtol=1e-5, atol=1e-5)
        rvq.train()
    assert len(kept) > 1
    rvq.eval()
    assert (rvq(x)[1] >= 0).all()  # no dropout in eval


def test_residual_vq_shared_codebook_is_one_module_updated_once_per_step():
    torch.manual_seed(2)
    rvq = ResidualVQ(dim=4, num_quantizers=3, codebook_size=8, shared_codebook=True, decay=0.5)
    assert all(vq._codebook is rvq.layers[0]._codebook for vq in rvq.layers)
    x = torch.randn(2, 9, 4)
    cb = rvq.layers[0]._codebook
    size0 = cb.cluster_size.clone()
    _, idx, _ = rvq(x)
    # cluster_size took three EMA steps (one per stage, decay 0.5 each), with the stage's counts.
    expect = size0.clone()
    for s in range(3):
        expect = expect * 0.5 + 0.5 * torch.bincount(idx[..., s].reshape(-1), minlength=8)
    torch.testing.assert_close(cb.cluster_size[0], expect[0])
    torch.testing.assert_close(cb.embed, cb.embed_avg / (
        (cb.cluster_size + cb.eps) / (cb.cluster_size.sum() + 8 * cb.eps)
        * cb.cluster_size.sum())[..., None])


def test_residual_vq_mask_and_grouped():
    torch.manual_seed(3)
    rvq = ResidualVQ(dim=6, num_quantizers=2, codebook_size=8).eval()
    x = torch.randn(2, 5, 6)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    q, idx, _ = rvq(x, mask=mask)
    assert (idx[~mask] == -1).all() and (q[~mask] == 0).all()
    assert torch.equal(idx[mask], rvq(x)[1][mask])
    g = GroupedResidualVQ(dim=12, groups=2, num_quantizers=2, codebook_size=8).eval()
    x = torch.randn(2, 5, 12)
    q, idx, losses = g(x)
    assert q.shape == x.shape and idx.shape == (2, 2, 5, 2) and losses.shape == (2, 2)
    for i, (rv, chunk) in enumerate(zip(g.rvqs, x.chunk(2, dim=-1))):
        qi, ii, _ = rv(chunk)
        assert torch.equal(ii, idx[i]) and torch.equal(qi, q[..., 6 * i:6 * (i + 1)])
    assert torch.equal(g.get_output_from_indices(idx), q)


@pytest.mark.parametrize("kw,name,err", [
    (dict(implicit_neural_codebook=True), "implicit_neural_codebook", TypeError),
    (dict(diveq=True), "diveq", TypeError),
    (dict(stochastic_sample_codes=True), "stochastic_sample_codes", TypeError),
    (dict(heads=2), "heads", ValueError),
    (dict(quantize_dropout_cutoff_index=-1), "quantize_dropout_cutoff_index", ValueError),
    (dict(eval_beam_size=2), "eval_beam_size", ValueError),
    (dict(beam_score_quantizer_weights=[1.0]), "beam_score_quantizer_weights", ValueError),
])
def test_residual_vq_refuses_what_it_cannot_honour(kw, name, err):
    with pytest.raises(err, match=name):
        ResidualVQ(dim=8, num_quantizers=2, codebook_size=4, **kw)


def test_residual_vq_forward_refusals():
    rvq = ResidualVQ(dim=8, num_quantizers=2, codebook_size=4)
    with pytest.raises(TypeError, match="indices="):
        rvq(torch.randn(1, 3, 8), indices=torch.zeros(1, 3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="quantize_dropout"):
        rvq.get_codes_from_indices(torch.zeros(1, 3, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="num_quantizers"):
        ResidualVQ(dim=8, codebook_size=4)
    with pytest.raises(ValueError, match="divisible"):
        GroupedResidualVQ(dim=9, groups=2, num_quantizers=2, codebook_size=4)
    with pytest.raises(TypeError, match="indices="):
        GroupedResidualVQ(dim=8, groups=2, num_quantizers=2, codebook_size=4)(
            torch.randn(1, 3, 8), indices=[torch.zeros(1, 3, 2, dtype=torch.long)] * 2)


@pytest.mark.parametrize("case", ["random", "ties-and-offset", "sizes-projection-2d",
                                  "shared"])
def test_residual_vq_fused_eval_is_the_stage_loop_bit_for_bit(case):
    """Eval-mode ResidualVQ runs vqkernels' fused residual search; it must give exactly what
    the stage loop of compat.VectorQuantize gives (indices, output, losses, all codes)."""
    torch.manual_seed(7)
    kw = dict(dim=12, num_quantizers=4, codebook_size=16)
    if case == "sizes-projection-2d":
        kw = dict(dim=12, codebook_size=(3, 16, 40), codebook_dim=6)
    if case == "shared":
        kw.update(shared_codebook=True)
    rvq = ResidualVQ(**kw).eval()
    x = torch.randn(3, 17, 12)
    if case == "ties-and-offset":
        with torch.no_grad():
            for vq in rvq.layers:
                cb = vq._codebook.embed[0]
                cb[5] = cb[2]          # duplicate codes: the lower index must win
                cb.add_(100.0)         # far from the origin: fp32 cancellation
        x = x + 100.0
        x[0, :4] = rvq.layers[0]._codebook.embed[0, 2]       # rows exactly on a duplicated code
    if case == "sizes-projection-2d":
        x = x[:, 0]
    assert rvq._can_fuse(x, None)
    fused = rvq(x, return_all_codes=True)
    rvq._fused_eval = False
    loop = rvq(x, return_all_codes=True)
    for a, b in zip(fused, loop):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)
    if case == "ties-and-offset":
        assert (fused[1][0, :4, 0] == 2).all()
    rvq.train()
    assert not rvq._can_fuse(x, None)


@pytest.mark.parametrize("make", [
    lambda: VectorQuantize(dim=8, codebook_size=4),
    lambda: ResidualVQ(dim=8, num_quantizers=2, codebook_size=4),
    lambda: GroupedResidualVQ(dim=8, groups=2, num_quantizers=2, codebook_size=4),
], ids=["vq", "rvq", "grvq"])
def test_integer_input_is_refused_naming_x(make):
    # An integer x was cast on its way through project_in and came back as integer codes
    # (zeros) with a loss: nothing said the input was not features.
    m = make()
    with pytest.raises(TypeError, match="x must be a floating-point tensor.*int64"):
        m(torch.ones(2, 5, 8, dtype=torch.long))
