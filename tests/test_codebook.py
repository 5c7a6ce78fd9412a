"""Codebook upkeep: EMA updates, Laplace smoothing, dead-code restarts, k-means++ init, cosine
codes, usage statistics, gradient routing, and synchronisation across 2 gloo processes."""
import datetime
import math
import os

import pytest
import torch
import torch.nn.functional as F

from vqkernels import VectorQuantizer, nearest_code
from vqkernels.codebook import kmeans_plusplus, laplace_smoothed, usage_stats
from helpers import assert_search_ok, end_spawned_worker, exact_sqdist


def _clustered(n, centres, noise, gen=None):
    pick = torch.randint(0, centres.shape[0], (n,), generator=gen)
    return centres[pick] + noise * torch.randn(n, centres.shape[1], generator=gen)


def _rows(z, dim):
    return z.movedim(dim, -1).reshape(-1, z.shape[dim])


# ---------------------------------------------------------------------------- EMA
def _hand_ema_step(N, S, rows, idx, decay, eps):
    """Sonnet's VectorQuantizerEMA update written out per code, in float64."""
    K = N.shape[0]
    N, S = N.clone(), S.clone()
    for k in range(K):
        mine = rows[idx == k]
        N[k] = decay * N[k] + (1 - decay) * mine.shape[0]
        S[k] = decay * S[k] + (1 - decay) * mine.sum(0)
    n = float(N.sum())
    e = torch.stack([S[k] / ((float(N[k]) + eps) / (n + K * eps) * n) for k in range(K)])
    return N, S, e


def test_ema_update_matches_float64_hand_computation():
    K, D, decay, eps = 7, 3, 0.9, 1e-2  # a large eps so the smoothing visibly matters
    # decay_warmup=None: the fixed-decay update (the warm-up has its own test below)
    vq = VectorQuantizer(K, D, ema=True, decay=decay, eps=eps, channel_dim=1, restart_after=None,
                         kmeans_init=False, decay_warmup=None)
    centres = 2 * torch.randn(4, D)  # data near 4 clusters: some codes stay unused
    vq.set_codebook(torch.cat([centres, 5 + torch.randn(K - 4, D)]))
    N = torch.ones(K, dtype=torch.float64)
    S = vq.codebook.double().clone()
    used_any = torch.zeros(K, dtype=torch.bool)
    for step in range(5):
        # channel-first (B, D, H, W) input on some steps: rows are taken along channel_dim
        if step % 2:
            z = _clustered(2 * 5 * 4, centres, 0.3).reshape(2, 5, 4, D).permute(0, 3, 1, 2)
        else:
            z = _clustered(37, centres, 0.3)[:, :, None]  # (N, D, 1)
        before = vq.codebook.clone()
        out = vq(z)
        rows = _rows(z, 1).double()
        idx = out.indices.reshape(-1)
        assert_search_ok(rows.float(), before, idx)  # searched against the pre-step codebook
        used_any |= torch.bincount(idx, minlength=K) > 0
        N, S, e = _hand_ema_step(N, S, rows, idx, decay, eps)
        torch.testing.assert_close(vq.ema_count.double(), N, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(vq.ema_sum.double(), S, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(vq.codebook.double(), e, rtol=1e-5, atol=1e-6)
    assert not used_any.all() and used_any.any()  # both branches of the update were exercised


def test_laplace_smoothing():
    counts = torch.tensor([0.0, 5.0, 0.0, 3.0], dtype=torch.float64)
    eps = 0.1
    got = laplace_smoothed(counts, eps)
    want = torch.tensor([(c + eps) / (8 + 4 * eps) * 8 for c in [0.0, 5.0, 0.0, 3.0]],
                        dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-15, atol=0)
    assert float(got.min()) > 0
    torch.testing.assert_close(got.sum(), counts.sum(), rtol=1e-15, atol=0)  # total kept

    # In the module: an unused code keeps S_k = decay^t e0 and N_k = decay^t (the pseudo-count
    # start), so e_k = e0 decay^t / smoothed(decay^t): it stays put while decay^t >> eps, then
    # the smoothing pulls it towards the origin (as in Sonnet); it never blows up.
    eps = 1e-3
    vq = VectorQuantizer(4, 2, ema=True, decay=0.5, eps=eps, restart_after=None, kmeans_init=False,
                         decay_warmup=None)  # a fixed decay^t
    with torch.no_grad():
        vq.codebook.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [50.0, 50.0], [-50.0, 50.0]]))
        vq.ema_sum.copy_(vq.codebook)
    far = vq.codebook[2:].clone().double()
    for t in range(1, 9):
        out = vq(0.1 * torch.randn(64, 2) + torch.tensor([0.5, 0.5]))
        assert int(torch.bincount(out.indices, minlength=4)[2:].sum()) == 0
        N = vq.ema_count.double()
        assert float(N[2]) == 0.5 ** t
        smoothed = (N + eps) / (N.sum() + 4 * eps) * N.sum()
        torch.testing.assert_close(vq.codebook[2:].double(), far * 0.5 ** t / smoothed[2:, None],
                                   rtol=1e-5, atol=1e-5)
    assert torch.isfinite(vq.codebook).all()
    shrink = float(vq.codebook[2, 0]) / 50
    assert 0.5 < shrink < 0.9  # decay^8 = 0.0039 vs eps = 0.001: visibly pulled in, not gone


def test_set_codebook_keeps_the_ema_state_consistent():
    codes = 3 * torch.randn(5, 2)
    vq = VectorQuantizer(5, 2, ema=True, decay=0.9, kmeans_init=True, restart_after=None)
    vq.set_codebook(codes)
    assert torch.equal(vq.codebook, codes) and bool(vq.initialised)
    z = codes[:1] + 0.01 * torch.randn(16, 2)  # only code 0 is used
    out = vq(z)
    assert torch.bincount(out.indices, minlength=5).tolist() == [16, 0, 0, 0, 0]
    # No k-means overwrite, and the unused codes stay (up to the 1e-5 smoothing), rather than
    # being recomputed from a stale EMA sum.
    torch.testing.assert_close(vq.codebook[1:], codes[1:], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="codes must be a tensor of shape"):
        vq.set_codebook(torch.zeros(4, 2))


def test_ema_codebook_gets_no_gradient_and_moves_only_in_training():
    enc = torch.nn.Linear(5, 4)
    vq = VectorQuantizer(6, 4, beta=0.5, ema=True, restart_after=None, kmeans_init=False)
    assert [n for n, _ in vq.named_parameters()] == []  # the codebook is a buffer
    assert "codebook" in dict(vq.named_buffers())
    x = torch.randn(20, 5)
    out = vq(enc(x))
    assert not out.codebook_loss.requires_grad
    torch.testing.assert_close(out.codebook_loss, out.commitment_loss)  # the same error, reported
    torch.testing.assert_close(out.loss, 0.5 * out.commitment_loss)
    out.loss.backward()
    assert enc.weight.grad is not None and float(enc.weight.grad.abs().sum()) > 0
    vq.eval()
    frozen = vq.codebook.clone()
    vq(enc(x))
    assert torch.equal(vq.codebook, frozen)
    vq.train()
    vq(enc(x))
    assert not torch.equal(vq.codebook, frozen)


def test_commitment_gradient_uses_the_pre_update_codebook():
    # The EMA update rewrites the codebook inside forward; backward must still see the codes the
    # forward chose (the module searches a snapshot).
    z = torch.randn(30, 4, dtype=torch.float64, requires_grad=True)
    vq = VectorQuantizer(5, 4, ema=True, decay=0.5, restart_after=None, kmeans_init=False).double()
    before = vq.codebook.clone()
    out = vq(z)
    assert not torch.equal(vq.codebook, before)
    out.commitment_loss.backward()
    idx = out.indices
    expect = 2 * (z.detach() - before[idx]) / z.numel()
    torch.testing.assert_close(z.grad, expect, rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------------------- restarts
def _far_codebook(vq, near, n_far):
    with torch.no_grad():
        far = 1000 + torch.randn(n_far, vq.dim)  # never the nearest code of any row
        vq.codebook.copy_(torch.cat([near, far]))
        if vq.ema:
            vq.ema_sum.copy_(vq.codebook)


@pytest.mark.parametrize("ema", [False, True])
def test_restart_replaces_exactly_the_dead_codes(ema):
    K, D = 8, 4
    vq = VectorQuantizer(K, D, restart_after=2, restart_pool=32, ema=ema, kmeans_init=False)
    centres = 3 * torch.randn(4, D)
    _far_codebook(vq, centres, 4)
    seen = []
    b1 = _clustered(50, centres, 0.2)
    seen.append(b1)
    vq(b1)
    assert vq.stats()["restarts"] == 0 and int(vq.restart_count) == 0  # unused 1 step < 2
    assert vq.steps_unused.tolist() == [0] * 4 + [1] * 4
    before = vq.codebook.clone()
    b2 = _clustered(50, centres, 0.2)
    seen.append(b2)
    out = vq(b2)
    assert torch.bincount(out.indices, minlength=K)[4:].sum() == 0
    after = vq.codebook.detach()
    changed = (after != before).any(1)
    if ema:  # EMA moves the used codes too; the dead ones jump to data rows
        assert changed[4:].all()
    else:
        assert changed.tolist() == [False] * 4 + [True] * 4
    pool_rows = torch.cat(seen)
    d = exact_sqdist(after[4:], pool_rows)
    assert float(d.min(1).values.max()) == 0.0  # each new code is an encoder output
    assert len(set(d.argmin(1).tolist())) == 4  # no pool row used twice
    assert float(after[4:].abs().max()) < 100  # they left the far region
    assert vq.stats()["restarts"] == 4 and vq.stats()["total_restarts"] == 4
    assert int(vq.restart_count) == 4
    assert vq.steps_unused[4:].tolist() == [0] * 4
    if ema:
        assert vq.ema_count[4:].tolist() == [1.0] * 4
        assert torch.equal(vq.ema_sum[4:], after[4:])


def test_restart_with_a_short_pool_goes_longest_unused_first():
    K, D = 8, 3
    vq = VectorQuantizer(K, D, restart_after=1, restart_pool=1, ema=False,
                         kmeans_init=False)  # 1 candidate row per step
    centres = 3 * torch.randn(2, D)
    _far_codebook(vq, centres, 6)
    restarted = []
    for _ in range(3):
        far_before = (vq.codebook.abs() > 100).all(1)
        vq(_clustered(20, centres, 0.2))
        far_after = (vq.codebook.abs() > 100).all(1)
        restarted.append((far_before & ~far_after).nonzero().flatten().tolist())
        assert vq.stats()["restarts"] == 1
    assert restarted == [[2], [3], [4]]
    assert int(vq.restart_count) == 3
    # a pool row restarts at most one code: three distinct encoder outputs
    assert len({tuple(r) for r in vq.codebook[2:5].tolist()}) == 3


@pytest.mark.parametrize("ema", [False, True])
def test_restarts_land_on_the_latest_batch(ema):
    # Issue 15: early in training the encoder's outputs move by more than their spread per step,
    # and restarts onto rows a few steps old put codes where the data no longer is.
    K, D = 8, 4
    vq = VectorQuantizer(K, D, restart_after=2, restart_pool=16, ema=ema, kmeans_init=False)
    old, new = 3 * torch.randn(4, D), 3 * torch.randn(4, D) + 20
    _far_codebook(vq, old, 4)
    vq(_clustered(64, old, 0.2))  # codes 4..7 unused once: no restart yet
    before = vq.codebook.clone()
    b2 = _clustered(64, new, 0.2)
    vq(b2)
    assert vq.stats()["restarts"] == 4
    moved = vq.codebook.detach()[4:]
    assert not torch.equal(moved, before[4:])
    d = exact_sqdist(moved, b2)
    assert float(d.min(1).values.max()) == 0.0  # every restarted code is a row of this batch


def _grid(side, lo, hi):
    """side x side cell centres of the square [lo, hi)^2: each code of a uniform input's
    equal-area Voronoi cell, so every code is as useful as every other."""
    c = (torch.arange(side, dtype=torch.float32) + 0.5) / side * (hi - lo) + lo
    return torch.cartesian_prod(c, c)


@pytest.mark.parametrize("kind", ["vq", "rvq", "gvq"])
def test_codebooks_larger_than_a_step_are_not_churned_by_restarts(kind):
    # Review finding: a step of n rows uses at most n codes, so with K = 256 codes and n = 32
    # rows a step (K/n = 8, as K = 4096 with 2,048-row batches is 2) most codes go unused in any
    # one step of a perfectly healthy codebook. With a window of restart_after = 2 steps every
    # such code counted as dead: each step restarted as many codes as the pool had rows (32 here,
    # ~1,024 a step at K = 4096). Uniform data on a grid codebook (every code equally likely,
    # p = 1 - (1 - 1/K)^n ~ 0.12 a step): once usage has settled, restarts must be rare, in
    # every book of the multi-codebook modules too (stage 1 of rvq quantizes the uniform residual
    # in stage 0's cell with its own grid; each gvq group its own two channels).
    from vqkernels import GroupedVectorQuantizer, ResidualVectorQuantizer
    K, n, steps = 256, 32, 60
    kw = dict(restart_after=2, kmeans_init=False)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    if kind == "vq":
        m, books, dim = VectorQuantizer(K, 2, **kw), None, 2
        starts = [_grid(16, 0, 1)]
    elif kind == "rvq":
        m, dim = ResidualVectorQuantizer(2, 2, K, **kw), 2
        starts = [_grid(16, 0, 1), _grid(16, -1 / 32, 1 / 32)]
    else:
        m, dim = GroupedVectorQuantizer(4, 2, K, **kw), 4
        starts = [_grid(16, 0, 1), _grid(16, 0, 1)]
    books = [m] if kind == "vq" else list(m.books)
    far = torch.tensor([100.0, 100.0])
    for b, c in zip(books, starts):
        c = c.clone()
        c[5] = far  # one truly dead code per book: restarts must still find it
        b.set_codebook(c)
    per_step = []
    for _ in range(steps):
        m(torch.rand(n, dim, generator=gen))
        st = [m.stats()] if kind == "vq" else m.stats()
        per_step.append([s["restarts"] for s in st])
    for i, b in enumerate(books):
        r = [s[i] for s in per_step]
        settled = sum(r[steps // 3:]) / (steps - steps // 3)
        # A healthy code is unused over the scaled window of W = 2 K / n = 16 steps with
        # probability (1 - p)^W ~ e^-2: ~K p e^-2 ~ 4 restarts a step (measured 4.9 for vq);
        # before the fix every one of the 32 rows a step became a code.
        assert settled < 0.05 * K, (kind, i, r)
        assert bool((b.codebook[5] - far).abs().max() > 50), (kind, i)  # the dead one restarted


def test_restart_window_scales_with_codes_per_row():
    # max(restart_after, ceil(restart_after * K / n)): restart_after steps for K <= n (the
    # behaviour runs with no more codes than rows a step always had), and as many steps as bring
    # restart_after * K rows beyond that; n is this step's global count of rows.
    vq = VectorQuantizer(100, 2, restart_after=3, kmeans_init=False)
    for n, w in [(100, 3), (1000, 3), (60, 5), (99, 4), (1, 300), (0, 300)]:
        counts = torch.zeros(100)
        counts[: min(n, 100)] = 1
        counts[0] += max(n - 100, 0)
        assert int(vq._dead_window(counts)) == w, n


def test_ema_decay_warms_up():
    # Issue 15: a fixed decay of 0.99 moves a code a few % of the way to its rows per step, too
    # slow while the encoder's outputs move fast; the decay of update t is
    # min(decay, (1 + t) / (decay_warmup + t)).
    K, D = 4, 2
    codes = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [9.0, 0.0]])  # two rows to code 0, one to code 1
    for warmup, decays in ((10, [0.1, 2 / 11, 0.99]), (None, [0.99] * 3), (3, [1 / 3, 0.5, 0.99])):
        vq = VectorQuantizer(K, D, decay=0.99, decay_warmup=warmup, restart_after=None,
                             kmeans_init=False).double()
        vq.set_codebook(codes.double())
        n = torch.ones(K, dtype=torch.float64)
        for t, dec in enumerate(decays):
            if t == 2:  # jump ahead: t = 1000 is past any warm-up here
                vq._steps_done = 1000
            vq(x.double())
            n = dec * n + (1 - dec) * torch.tensor([2.0, 1.0, 0.0, 0.0], dtype=torch.float64)
            torch.testing.assert_close(vq.ema_count, n, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="decay_warmup"):
        VectorQuantizer(K, D, decay_warmup=0)


def test_restart_in_gradient_mode_keeps_backward_valid():
    # The restart writes the codebook parameter in place during forward; backward must run and
    # give the gradient of the codes this step used.
    K, D = 6, 3
    vq = VectorQuantizer(K, D, restart_after=1, restart_pool=16, ema=False, kmeans_init=False)
    centres = 3 * torch.randn(3, D)
    _far_codebook(vq, centres, 3)
    z = _clustered(40, centres, 0.2).requires_grad_(True)
    before = vq.codebook.detach().clone()
    out = vq(z)
    assert vq.stats()["restarts"] == 3
    out.loss.backward()
    cb = before.clone().requires_grad_(True)
    z2 = z.detach().clone().requires_grad_(True)
    from vqkernels import vq_quantize
    ref = vq_quantize(z2, cb)
    ref.loss.backward()
    torch.testing.assert_close(vq.codebook.grad, cb.grad)
    torch.testing.assert_close(z.grad, z2.grad)
    assert float(vq.codebook.grad[3:].abs().sum()) == 0.0


# ---------------------------------------------------------------------------- k-means++
def test_kmeans_pp_beats_random_init_on_clustered_data():
    D, C = 8, 24
    centres = 10 * torch.randn(C, D)
    x = _clustered(3000, centres, 0.5)

    def distortion(cb):
        return float(nearest_code(x, cb)[1].double().mean())

    pp, rnd = [], []
    for s in range(3):
        g = torch.Generator().manual_seed(s)
        pp.append(distortion(kmeans_plusplus(x, C, generator=g)))
        rnd.append(distortion(x[torch.randperm(x.shape[0], generator=g)[:C]]))
    # Random rows miss whole clusters (distortion ~ inter-cluster distance); k-means++ seeding
    # is O(log k)-competitive in expectation and here lands one centre per cluster.
    assert max(pp) < 0.5 * min(rnd), (pp, rnd)
    noise_floor = 0.5 ** 2 * D
    assert min(pp) < 4 * noise_floor
    g = torch.Generator().manual_seed(0)
    refined = distortion(kmeans_plusplus(x, C, generator=g, iters=5))
    assert refined <= pp[0] * (1 + 1e-6)


def test_kmeans_pp_draws_proportional_to_squared_distance():
    # 1-D rows 0, 1, 3. Whatever the first centre, the second is drawn with probability
    # d^2 / sum d^2 among the others:
    # first=0 -> (1, 9)/10; first=1 -> (1, 4)/5; first=3 -> (9, 4)/13.
    x = torch.tensor([[0.0], [1.0], [3.0]])
    trials = 3000
    pair_counts = {}
    for s in range(trials):
        c = kmeans_plusplus(x, 2, generator=torch.Generator().manual_seed(s))[:, 0].tolist()
        pair_counts[tuple(c)] = pair_counts.get(tuple(c), 0) + 1
    want = {(0.0, 1.0): 1 / 3 * 1 / 10, (0.0, 3.0): 1 / 3 * 9 / 10, (1.0, 0.0): 1 / 3 * 1 / 5,
            (1.0, 3.0): 1 / 3 * 4 / 5, (3.0, 0.0): 1 / 3 * 9 / 13, (3.0, 1.0): 1 / 3 * 4 / 13}
    assert set(pair_counts) <= set(want)  # never the same row twice
    for pair, p in want.items():
        got = pair_counts.get(pair, 0)
        sigma = math.sqrt(trials * p * (1 - p))
        assert abs(got - trials * p) < 5 * sigma, (pair, got, trials * p)


def test_kmeans_pp_with_fewer_rows_than_codes_covers_every_row():
    x = torch.randn(5, 3, requires_grad=True)  # an encoder output: detached, not an error
    c = kmeans_plusplus(x, 9, generator=torch.Generator().manual_seed(1), iters=2)
    assert c.shape == (9, 3) and torch.isfinite(c).all() and not c.requires_grad
    x = x.detach()
    assert float(exact_sqdist(x, c).min(1).values.max()) == 0.0  # every row is some centre
    with pytest.raises(ValueError, match="at least one row"):
        kmeans_plusplus(x[:0], 3)


def test_module_kmeans_init_on_first_training_batch():
    D, C = 6, 16
    centres = 10 * torch.randn(C, D)
    first = _clustered(800, centres, 0.3)
    held = _clustered(800, centres, 0.3)
    plain = VectorQuantizer(C, D, ema=False, restart_after=None, kmeans_init=False)
    vq = VectorQuantizer(C, D, kmeans_init=True, kmeans_iters=3, ema=False, restart_after=None)
    vq.eval()
    vq(first)
    assert not bool(vq.initialised)  # eval passes never initialise
    vq.train()
    vq(first)
    assert bool(vq.initialised)
    cb = vq.codebook.detach().clone()
    vq(held)  # initialises only once
    assert torch.equal(vq.codebook.detach(), cb)
    d_init = float(nearest_code(held, cb)[1].mean())
    d_plain = float(nearest_code(held, plain.codebook.detach())[1].mean())
    assert d_init < 0.05 * d_plain
    sd = vq.state_dict()
    vq2 = VectorQuantizer(C, D, kmeans_init=True, ema=False, restart_after=None)
    vq2.load_state_dict(sd)
    vq2(held)  # a loaded, initialised quantizer does not re-initialise
    assert torch.equal(vq2.codebook.detach(), cb)


# ---------------------------------------------------------------------------- cosine
def test_cosine_mode_searches_by_angle():
    D = 5
    # Codes of very different norms: the L2-nearest code is often not the closest in angle.
    norms = torch.logspace(-1, 1, 12, dtype=torch.float64)[:, None]
    cb = torch.randn(12, D, dtype=torch.float64) * norms
    vq = VectorQuantizer(12, D, cosine=True, ema=False, restart_after=None,
                         kmeans_init=False).double().eval()
    with torch.no_grad():
        vq.codebook.copy_(cb)
    z = 3 * torch.randn(200, D, dtype=torch.float64)
    out = vq(z)
    cos = F.normalize(z, dim=1) @ F.normalize(cb, dim=1).T  # small test shapes only
    chosen = cos.gather(1, out.indices[:, None])[:, 0]
    assert float((cos.max(1).values - chosen).max()) < 1e-12
    l2_idx = exact_sqdist(z, cb).argmin(1)
    assert (l2_idx != out.indices).sum() > 20  # angle and distance really disagree here
    torch.testing.assert_close(out.z_q.norm(dim=1), torch.ones(200, dtype=torch.float64))
    torch.testing.assert_close(out.commitment_loss, (2 - 2 * chosen).mean() / D)
    # Gradients go through the normalisation on both sides.
    assert torch.autograd.gradcheck(lambda x: vq(x).commitment_loss,
                                    (z[:6].clone().requires_grad_(True),), eps=1e-6, atol=1e-8)
    assert torch.autograd.gradcheck(
        lambda c: __import__("vqkernels").vq_quantize(F.normalize(z[:6], dim=1),
                                                      F.normalize(c, dim=1)).codebook_loss,
        (cb.clone().requires_grad_(True),), eps=1e-6, atol=1e-8)


def test_cosine_ema_keeps_unit_codes_in_use():
    vq = VectorQuantizer(8, 3, cosine=True, ema=True, channel_dim=1, restart_after=None,
                         kmeans_init=False)
    z = torch.randn(4, 3, 5, 5) * 7
    out = vq(z)
    torch.testing.assert_close(out.z_q.norm(dim=1), torch.ones(4, 5, 5))
    # EMA sums accumulate normalised rows, so the stored codes stay within the unit ball.
    assert float(vq.codebook.norm(dim=1).max()) <= 1 + 1e-5


# ---------------------------------------------------------------------------- stats
def test_stats_match_hand_counts():
    K, D = 6, 2
    vq = VectorQuantizer(K, D, dead_after=2, ema=False, restart_after=None, kmeans_init=False)
    with torch.no_grad():
        vq.codebook.copy_(torch.tensor([[0., 0.], [10., 0.], [0., 10.], [10., 10.], [50., 50.],
                                        [-50., -50.]]))
    # Step 1 uses codes 0, 1, 2 (3, 1, 2 rows); step 2 uses 0 and 3 (2, 2 rows).
    vq(torch.tensor([[0., 0.]] * 3 + [[10., 0.]] + [[0., 10.]] * 2))
    s = vq.stats()
    p = torch.tensor([3, 1, 2], dtype=torch.float64) / 6
    assert s["codes_used"] == 3 and s["used_fraction"] == 0.5 and s["steps"] == 1
    assert abs(s["perplexity"] - math.exp(float(-(p * p.log()).sum()))) < 1e-12
    assert s["dead_fraction"] == 0.0  # nothing unused for 2 steps yet
    vq(torch.tensor([[0., 0.]] * 2 + [[10., 10.]] * 2))
    s = vq.stats()
    assert s["codes_used"] == 2 and abs(s["perplexity"] - 2.0) < 1e-12 and s["steps"] == 2
    assert s["dead_fraction"] == 2 / 6  # codes 4 and 5: unused both steps
    assert s["restarts"] == 0 and s["total_restarts"] == 0
    assert vq.steps_unused.tolist() == [0, 1, 1, 0, 2, 2]
    u = usage_stats(torch.tensor([4, 0, 4, 0]))
    assert u == {"perplexity": pytest.approx(2.0, abs=1e-12), "codes_used": 2, "used_fraction": 0.5}


@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
def test_non_finite_rows_stay_out_of_every_codebook_statistic(bad):
    """A batch with a NaN (or inf) row: k-means init, EMA, usage counts and the restart pool see
    only the finite rows, so every code stays finite and the bad row counts as no code's use."""
    K, D = 6, 3
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(K, D, generator=g) * 4
    vq = VectorQuantizer(K, D, ema=True, restart_after=1, restart_pool=64, kmeans_init=True,
                         kmeans_iters=3)
    vq.train()
    for step in range(6):
        x = _clustered(40, centres, 0.1, g)
        x[step % 40] = bad
        x[(step * 7 + 3) % 40, 1] = bad
        vq(x)
        for name in ("codebook", "ema_sum", "ema_count", "pool_rows"):
            assert torch.isfinite(getattr(vq, name)).all(), (step, name)
        ok = torch.isfinite(x).all(1)
        with torch.no_grad():
            idx = vq.eval()(x).indices
        vq.train()
        # the codes used this step are those of the finite rows only (the codebook moved after
        # the search, so judge the counts the module kept)
        assert float(vq._last_counts.sum()) == float(ok.sum())
        assert not vq.pool_valid[~torch.isfinite(vq.pool_rows).all(1)].any()
        del idx


def test_kmeans_pp_ignores_non_finite_rows():
    x = torch.randn(50, 4)
    x[3] = math.nan
    x[7, 2] = -math.inf
    c = kmeans_plusplus(x, 8, generator=torch.Generator().manual_seed(0), iters=2)
    assert torch.isfinite(c).all()
    with pytest.raises(ValueError, match="finite"):
        kmeans_plusplus(torch.full((3, 4), math.nan), 2)


def test_bad_options_name_the_argument():
    for kw, match in [(dict(decay=1.0), "decay"), (dict(decay=-0.1), "decay"), (dict(eps=0), "eps"),
                      (dict(restart_after=0), "restart_after"),
                      (dict(restart_pool=0), "restart_pool"),
                      (dict(kmeans_iters=-1), "kmeans_iters"), (dict(dead_after=1.5), "dead_after"),
                      (dict(beta=-1), "beta")]:
        with pytest.raises(ValueError, match=match):
            VectorQuantizer(4, 2, **kw)
    with pytest.raises(TypeError, match="z_e must be a torch.Tensor"):
        VectorQuantizer(4, 2, ema=False, restart_after=None, kmeans_init=False)([1.0, 2.0])
    with pytest.raises(ValueError, match="D=2"):
        VectorQuantizer(4, 2, ema=False, restart_after=None, kmeans_init=False)(torch.randn(3, 5))


# ---------------------------------------------------------------------------- distributed
_STEPS = 5


def _batch(step, rank, n, centres):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return _clustered(n, centres, 0.3, gen=g) @ torch.eye(centres.shape[1], 6)  # rows in 6-D


def _run(cfg, rank, world, ddp):
    """Train a tiny encoder + quantizer for a few steps; in the single-process run (ddp=False)
    every step's batch is the ranks' batches concatenated."""
    torch.manual_seed(123)  # identical initial weights everywhere
    centres = 4 * torch.randn(cfg["clusters"], 6, generator=torch.Generator().manual_seed(7))
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), VectorQuantizer(cfg["K"], 4, **cfg["vq"]))
    net = model
    if ddp:
        # No buffer sync in forward: otherwise DDP copies rank 0's buffers (the EMA codebook) to the
        # other ranks before every forward and would hide a missing synchronisation.
        import inspect
        DDP = torch.nn.parallel.DistributedDataParallel
        no_sync = ({"forward_sync_buffers": False}
                   if "forward_sync_buffers" in inspect.signature(DDP).parameters
                   else {"broadcast_buffers": False})
        net = DDP(model, **no_sync)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    stats, calls = [], []
    for step in range(_STEPS):
        ranks = [rank] if ddp else range(world)
        x = torch.cat([_batch(step, r, cfg["n"][r], centres) for r in ranks])
        before = dict(_CALLS)
        out = net(x)
        calls.append({k: _CALLS[k] - before[k] for k in _CALLS})
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        stats.append(model[1].stats())
    vq = model[1]
    return {"codebook": vq.codebook.detach().clone(), "enc": model[0].weight.detach().clone(),
            "stats": stats, "steps_unused": vq.steps_unused.clone(), "calls": calls}


_CFGS = {
    # Equal batches, no restarts: must equal one process on the concatenated batches.
    "ema_kmeans": dict(K=16, clusters=6, n=[96, 96],
                       vq=dict(ema=True, decay=0.8, kmeans_init=True, kmeans_iters=2,
                               restart_after=None)),
    "grad": dict(K=16, clusters=6, n=[96, 96],
                 vq=dict(ema=False, restart_after=None, kmeans_init=False)),
    # Uneven batches, restarts: ranks must stay identical and actually restart.
    "ema_restart": dict(K=32, clusters=4, n=[96, 40],
                        vq=dict(ema=True, restart_after=1, restart_pool=64, kmeans_init=True)),
    "grad_restart": dict(K=32, clusters=4, n=[96, 40],
                         vq=dict(restart_after=1, restart_pool=64, cosine=True, ema=False,
                                 kmeans_init=False)),
}


_CALLS = {"all_reduce": 0, "broadcast": 0}


def _counting(name, fn):
    def wrapped(*a, **k):
        _CALLS[name] += 1
        return fn(*a, **k)
    return wrapped


def _ddp_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist
    torch.set_num_threads(1)
    # DDP reduces gradients in C++ (its reducer), so these count the quantizer's own collectives.
    dist.all_reduce = _counting("all_reduce", dist.all_reduce)
    dist.broadcast = _counting("broadcast", dist.broadcast)
    # A short timeout: a mismatched collective (the hang this design rules out) fails the test
    # in a minute instead of blocking for gloo's default half hour.
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        for name, cfg in _CFGS.items():
            torch.save(_run(cfg, rank, world, ddp=True), os.path.join(out_dir, f"{name}_{rank}.pt"))
    finally:
        dist.destroy_process_group()
    end_spawned_worker()


def test_two_gloo_ranks_stay_identical_and_match_one_process(tmp_path):
    import torch.multiprocessing as mp
    world = 2
    mp.spawn(_ddp_worker, args=(world, str(tmp_path / "pg_init"), str(tmp_path)), nprocs=world,
             join=True)
    res = {name: [torch.load(tmp_path / f"{name}_{r}.pt") for r in range(world)] for name in _CFGS}
    for name, (r0, r1) in res.items():
        # Every rank applied the same updates: bitwise equal, not merely close.
        assert torch.equal(r0["codebook"], r1["codebook"]), name
        assert torch.equal(r0["enc"], r1["enc"]), name
        assert torch.equal(r0["steps_unused"], r1["steps_unused"]), name
        assert r0["stats"] == r1["stats"], name
    for name, (r0, _) in res.items():
        # One all_reduce per training step; the k-means init step adds one all_reduce (the row
        # count) and one gather (an all_reduce), then one broadcast, once.
        init = _CFGS[name]["vq"].get("kmeans_init", False)
        assert r0["calls"][0] == {"all_reduce": 3 if init else 1, "broadcast": int(init)}, name
        assert all(c == {"all_reduce": 1, "broadcast": 0} for c in r0["calls"][1:]), name
    for name in ("ema_kmeans", "grad"):
        single = _run(_CFGS[name], 0, world, ddp=False)
        got = res[name][0]
        torch.testing.assert_close(got["codebook"], single["codebook"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["enc"], single["enc"], rtol=1e-5, atol=1e-6)
        for a, b in zip(got["stats"], single["stats"]):  # usage counted over both ranks' rows
            assert a["codes_used"] == b["codes_used"], name
            assert a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-9), name
    for name in ("ema_restart", "grad_restart"):
        assert res[name][0]["stats"][-1]["total_restarts"] > 0, name


# ---------------------------------------------------------------------------- default recipe
def _health(used, recon, K):
    """Issue 15's target after the first 10 steps: never fewer than K/2 codes in use, and no
    reconstruction loss above 3x its running median."""
    late = range(10, len(used))
    low = [(i + 1, used[i]) for i in late if used[i] < K / 2]
    spikes = [(i + 1, recon[i]) for i in late
              if recon[i] > 3 * float(torch.tensor(recon[:i + 1]).median())]
    return low, spikes


def _train_autoencoder(vq, steps=40, seed=0):
    # A small autoencoder on a mixture of 64 clusters in 16-d: Adam moves the encoder's outputs
    # by more than their spread in the first steps, as in the VQ-VAE (issue 15).
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    D = vq.dim
    centres = torch.randn(64, 16, generator=g)
    enc = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, D))
    dec = torch.nn.Sequential(torch.nn.Linear(D, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))
    opt = torch.optim.Adam([*enc.parameters(), *dec.parameters(), *vq.parameters()], lr=3e-3)
    used, recon = [], []
    for _ in range(steps):
        x = _clustered(512, centres, 0.2, g)
        out = vq(enc(x))
        rec = F.mse_loss(dec(out.z_q), x)
        opt.zero_grad()
        (rec + out.loss).backward()
        opt.step()
        used.append(int(vq.stats()["codes_used"]))
        recon.append(float(rec.detach()))
    return used, recon


@pytest.mark.parametrize("seed", [0, 1])
def test_default_quantizer_is_a_recipe_that_trains(seed):
    K = 64
    vq = VectorQuantizer(K, 8)
    used, recon = _train_autoencoder(vq, seed=seed)
    low, spikes = _health(used, recon, K)
    assert not low, f"codes used fell below K/2 at (step, codes) {low}"
    assert not spikes, f"reconstruction spiked at (step, loss) {spikes}"
    assert sum(recon[-5:]) < 0.9 * sum(recon[:5])  # and it learns
