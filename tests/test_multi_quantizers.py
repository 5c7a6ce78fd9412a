"""ResidualVectorQuantizer and GroupedVectorQuantizer (issue 17): per-book upkeep, projections,
cosine search, dropout and masks in the modules."""
import pytest
import torch

import vqkernels
from vqkernels import GroupedVectorQuantizer, ResidualVectorQuantizer, VectorQuantizer
from vqkernels import native
from vqkernels.quantizers import upkeep

needs_cpu = pytest.mark.skipif(native.cpu_status() is not None, reason=str(native.cpu_status()))


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _clustered(gen, n, d, centres=6, scale=3.0):
    c = torch.randn(centres, d, generator=gen) * scale
    return c[torch.randint(0, centres, (n,), generator=gen)] + 0.3 * torch.randn(n, d, generator=gen)


def test_each_stage_is_a_vector_quantizer_kept_on_its_own_residuals():
    gen = _gen(1)
    torch.manual_seed(1)
    m = ResidualVectorQuantizer(6, 3, [8, 16, 4], restart_after=None)
    assert [b.num_codes for b in m.books] == [8, 16, 4]
    assert all(isinstance(b, VectorQuantizer) for b in m.books)
    z = _clustered(gen, 300, 6)
    out = m(z)
    # k-means init ran per stage; stage 1's codes live at the scale of stage 0's residuals.
    assert all(bool(b.initialised) for b in m.books)
    r0 = z - m.books[0].codebook[out.indices[:, 0]]
    assert m.books[1].codebook.norm(dim=1).mean() < 2 * r0.norm(dim=1).mean()
    # EMA: stage 1's codebook is the decayed average of the residual rows that chose each code.
    before = m.books[1].codebook.clone()
    book0, book1 = m.books[0].codebook.clone(), m.books[1].codebook.clone()
    ema_sum, ema_count = m.books[1].ema_sum.clone(), m.books[1].ema_count.clone()
    ema_sum2, d2 = m.books[2].ema_sum.clone(), m.books[2]._decay_now()
    d = m.books[1]._decay_now()  # this update's decay (warmed up: below `decay` early on)
    assert d < m.books[1].decay
    out = m(z)
    idx1 = out.indices[:, 1]
    counts = torch.bincount(idx1, minlength=16).float()
    assert torch.equal(out.counts[1], counts.long())
    torch.testing.assert_close(m.books[1].ema_count, d * ema_count + (1 - d) * counts)
    # Its sums take stage 1's input: the residual of stage 0's codes as they were searched.
    r1 = z - book0[out.indices[:, 0]]
    sums = torch.zeros(16, 6).index_add_(0, idx1, r1)
    torch.testing.assert_close(m.books[1].ema_sum, d * ema_sum + (1 - d) * sums)
    # And stage 2's the residual of both (the module updates one residual buffer in place).
    r2 = r1 - book1[idx1]
    sums2 = torch.zeros(4, 6).index_add_(0, out.indices[:, 2], r2)
    torch.testing.assert_close(m.books[2].ema_sum, d2 * ema_sum2 + (1 - d2) * sums2)
    assert m.stats()[1]["steps"] == 2
    assert not torch.equal(before, m.books[1].codebook)


def test_one_packed_all_reduce_per_step_for_all_stages(monkeypatch):
    calls = []

    def fake_all_reduce(self, buf, op="sum"):
        calls.append(buf.numel())
        return buf

    monkeypatch.setattr(upkeep.DistContext, "all_reduce_", fake_all_reduce)
    torch.manual_seed(2)
    m = ResidualVectorQuantizer(4, 3, 8, kmeans_init=False)
    m(torch.randn(50, 4))
    assert len(calls) == 1
    calls.clear()
    g = GroupedVectorQuantizer(8, 4, 8, kmeans_init=False)
    g(torch.randn(50, 8))
    assert len(calls) == 1


def test_dead_codes_of_a_later_stage_are_restarted_from_its_residuals():
    gen = _gen(3)
    torch.manual_seed(3)
    m = ResidualVectorQuantizer(4, 2, 8, kmeans_init=False, restart_after=1)
    with torch.no_grad():
        for b in m.books:
            b.set_codebook(torch.randn(8, 4, generator=gen) * 100)  # all far: most unused
    z = torch.randn(200, 4, generator=gen)
    for _ in range(3):
        m(z)
    assert m.stats()[1]["total_restarts"] > 0


def test_padding_rows_do_not_touch_the_books():
    gen = _gen(4)
    torch.manual_seed(4)
    z = _clustered(gen, 120, 4)
    mask = torch.arange(120) < 80
    a = ResidualVectorQuantizer(4, 2, 8, seed=5, restart_after=None)
    b = ResidualVectorQuantizer(4, 2, 8, seed=5, restart_after=None)
    zb = z.clone()
    zb[~mask] = 1e3  # garbage in the padding
    oa = a(z[mask])
    ob = b(zb, mask=mask)
    for x, y in zip(a.books, b.books):
        torch.testing.assert_close(x.codebook, y.codebook)
    torch.testing.assert_close(oa.loss, ob.loss)
    assert torch.equal(oa.indices, ob.indices[mask])


def test_quantize_dropout_in_training_only():
    torch.manual_seed(6)
    m = ResidualVectorQuantizer(4, 4, 8, quantize_dropout=True, kmeans_init=False)
    z = torch.randn(64, 10, 4)
    out = m(z)
    n_active = (out.indices >= 0).sum(-1)  # (64, 10)
    assert (n_active == n_active[:, :1]).all()  # one count per sample (first dim)
    assert n_active.min() >= 1 and len(n_active[:, 0].unique()) > 1
    assert ((out.indices >= 0).int().diff(dim=-1) <= 0).all()  # a prefix of the stages
    m.eval()
    assert (m(z).indices >= 0).all()


def test_sharded_dropout_draws_each_ranks_slice_of_the_global_batch():
    # Three "ranks" of 5 samples, seeded alike (as data-parallel ranks are), draw the stage counts
    # one process draws for the 15 concatenated samples; unsharded ranks would all draw the
    # first slice.
    z = torch.randn(15, 3, 4, generator=_gen(9))
    whole = ResidualVectorQuantizer(4, 6, 8, quantize_dropout=True, kmeans_init=False)
    torch.manual_seed(11)
    ref = (whole(z).indices >= 0).sum(-1)[:, 0]
    assert len(ref.unique()) > 2  # a pattern that tells slices apart
    for rank in range(3):
        m = ResidualVectorQuantizer(4, 6, 8, quantize_dropout=True, kmeans_init=False)
        m.load_state_dict(whole.state_dict())
        m.shard_dropout(rank, 3)
        torch.manual_seed(11)
        got = (m(z[rank * 5:(rank + 1) * 5]).indices >= 0).sum(-1)[:, 0]
        assert torch.equal(got, ref[rank * 5:(rank + 1) * 5]), rank
    for bad in [(3, 3), (-1, 2), (True, 2), (0.5, 2)]:
        with pytest.raises(ValueError, match="rank"):
            whole.shard_dropout(*bad)
    with pytest.raises(ValueError, match="world_size"):
        whole.shard_dropout(0, 0)


@pytest.mark.parametrize("ema", [True, False])
def test_fused_module_equals_the_functional_op(ema):
    torch.manual_seed(7)
    m = ResidualVectorQuantizer(5, 3, 8, ema=ema, kmeans_init=False).eval()
    z = torch.randn(40, 5, requires_grad=True)
    out = m(z)
    ref = vqkernels.residual_vq(z, [b.codebook for b in m.books], beta=m.beta)
    assert torch.equal(out.indices, ref.indices) and torch.equal(out.z_q, ref.z_q)
    if ema:
        torch.testing.assert_close(out.loss, m.beta * ref.commitment_loss.sum())
    else:
        torch.testing.assert_close(out.loss, ref.loss)
        out.loss.backward()
        assert all(b.codebook.grad is not None and b.codebook.grad.abs().sum() > 0
                   for b in m.books)
    assert torch.equal(m.codes_from_indices(out.indices), out.z_q.detach())


def _native_stats_on_off(monkeypatch, cls, hook, make, steps, outputs):
    # Trains a fresh module (make()) over `steps` with the native statistics on, then off (the
    # Python loop), checking that the native hook ran on every step only when on; the two runs
    # must restart the same codes and end in the same state and outputs, bit for bit.
    from vqkernels.quantizers import multi
    states, outs, restarts = [], [], []
    for native_stats in (True, False):
        monkeypatch.setattr(multi, "_NATIVE_STATS", native_stats)
        calls = []
        real = getattr(cls, hook)
        monkeypatch.setattr(cls, hook, lambda self, *a, real=real: calls.append(1) or real(self, *a))
        m = make()
        m.train()
        got = []
        for z, a in steps:
            got += outputs(m(z, **a))
        assert len(calls) == (len(steps) if native_stats else 0)
        states.append(m.state_dict())
        outs.append(got)
        restarts.append(sum(b.restart_count for b in m.books))
    assert restarts[0] == restarts[1] and restarts[0] > 0
    for k in states[1]:  # NaN rows never reach the state: plain equality
        assert torch.equal(states[0][k], states[1][k]), k
    for a, b in zip(*outs):  # z_q of the NaN row is NaN on both sides
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@needs_cpu
@pytest.mark.parametrize("case", ["plain", "dropout+mask", "cosine", "no-ema", "bf16"])
def test_native_training_statistics_are_the_stage_loops(case, monkeypatch):
    # ResidualVectorQuantizer (CPU, fused) takes every stage's counts and EMA sums from one native
    # call (residual_stats) and rebuilds only the restart candidates' rows; the stage loop it
    # replaces takes them with bincount / index_add_ on each stage's residual. Same buffers, same
    # restarts, bit for bit, over steps with NaN rows, padding, dropout and dead codes.
    gen = _gen(71)
    D = 37 if case != "cosine" else 8  # not a multiple of a 16-float line
    kw = dict(cosine=case == "cosine", ema=case != "no-ema")
    steps = []
    for t in range(6):
        z = _clustered(gen, 400, D) * (1 + t)
        if t % 3 == 1:
            z[:200] = 0.01 * torch.randn(200, D, generator=gen) + 4.0  # most codes go dead
        z[5] = float("nan")
        a = {}
        if case == "dropout+mask":
            a = dict(mask=torch.rand(400, generator=gen) < 0.85,
                     active_stages=torch.randint(0, 4, (400,), generator=gen))
        steps.append((z.bfloat16() if case == "bf16" else z, a))

    def make():
        torch.manual_seed(5)
        return ResidualVectorQuantizer(D, 3, [24, 16, 20], restart_after=1, restart_pool=64,
                                       kmeans_init=False, backend="cpu", seed=9, **kw)

    _native_stats_on_off(
        monkeypatch, ResidualVectorQuantizer, "_native_upkeep", make, steps,
        lambda o: [o.indices, o.z_q.float(), torch.stack([o.perplexity.float().sum()])])


@needs_cpu
@pytest.mark.parametrize("case", ["plain", "mask", "projected", "channel-first", "no-ema"])
def test_native_grouped_training_statistics_are_the_group_loops(case, monkeypatch):
    # GroupedVectorQuantizer (CPU, one grouped call) takes every group's counts and EMA sums from
    # one native call (residual_stats, grouped: straight from the groups' columns); the loop it
    # replaces runs bincount / index_add_ per group. Same states and outputs, bit for bit.
    gen = _gen(75)
    G, d = 3, 12
    kw = dict(ema=case != "no-ema", codebook_dim=5 if case == "projected" else None)
    steps = []
    for t in range(6):
        z = _clustered(gen, 300, G * d) * (1 + t)
        if t % 3 == 1:
            z[:150] = 0.01 * torch.randn(150, G * d, generator=gen) + 4.0
        z[3] = float("nan")
        a = dict(mask=torch.rand(300, generator=gen) < 0.85) if case == "mask" else {}
        if case == "channel-first":
            z, a = z.reshape(3, 100, G * d).transpose(1, 2), dict(dim=1)
        steps.append((z, a))

    def make():
        torch.manual_seed(6)
        return GroupedVectorQuantizer(G * d, G, [24, 16, 20], restart_after=1, restart_pool=64,
                                      kmeans_init=False, backend="cpu", seed=4, **kw)

    _native_stats_on_off(monkeypatch, GroupedVectorQuantizer, "_native_group_upkeep", make, steps,
                         lambda o: [o.indices, o.z_q.detach(), o.perplexity])


@needs_cpu
@pytest.mark.parametrize("case", ["rvq", "rvq-cosine", "rvq-dropout+mask", "rvq-no-ema",
                                  "rvq-no-restarts", "rvq-long-window", "rvq-more-codes",
                                  "rvq-pool-offset", "rvq-mixed", "rvq-shared",
                                  "gvq", "gvq-projected", "float64", "rvq-bf16", "gvq-half"])
def test_batched_upkeep_is_the_book_loop(case, monkeypatch):
    # The books' statistics packed (_pack_stats_books, after the native statistics call) and,
    # summed, applied (_upkeep_apply_books: foreach ops) by batched calls over books that agree in
    # every setting, against book by book (_pack_stats, _upkeep_apply): the same
    # states, restarts and outputs, bit for bit, over steps with dead codes, NaN rows, padding
    # and dropout (and with no code dead for long enough, the step that restarts nothing). Where
    # the books differ (a decay, a shared book) or are fp16/bf16 (foreach ops round the decay to
    # the books' dtype first) the batched call declines and the loop runs; the test checks which
    # of the two ran.
    from vqkernels.quantizers import multi
    gen = _gen(77)
    low = {"rvq-bf16": torch.bfloat16, "gvq-half": torch.float16}
    # rvq-more-codes: K > rows per step, so the dead window is longer than restart_after.
    D, S, K = (8 if "cosine" in case else 12), 3, (1024 if case == "rvq-more-codes" else 24)
    kw = dict(cosine="cosine" in case, ema="no-ema" not in case,
              restart_after={"rvq-no-restarts": None, "rvq-long-window": 50}.get(case, 1))
    steps = []
    for t in range(6):
        z = _clustered(gen, 300, D) * (1 + t)
        if t % 3 == 1:
            z[:150] = 0.01 * torch.randn(150, D, generator=gen) + 4.0  # most codes go dead
        z[7] = float("nan")
        a = {}
        if "dropout+mask" in case:
            a = dict(mask=torch.rand(300, generator=gen) < 0.85,
                     active_stages=torch.randint(0, S + 1, (300,), generator=gen))
        steps.append((z.to(low.get(case, torch.float64 if case == "float64" else z.dtype)), a))

    def make():
        torch.manual_seed(8)
        if case.startswith("gvq"):
            m = GroupedVectorQuantizer(D, 2, K, restart_pool=32, kmeans_init=False, seed=3,
                                       codebook_dim=5 if "projected" in case else None,
                                       backend="cpu", **kw)
        else:
            m = ResidualVectorQuantizer(D, S, K, restart_pool=32, kmeans_init=False, seed=3,
                                        shared_codebook=case == "rvq-shared", backend="cpu", **kw)
        if case == "float64":
            m = m.double()
        if case in low:
            m = m.to(low[case])
        if case == "rvq-mixed":
            m.books[1].decay = 0.9
        if case == "rvq-pool-offset":  # the pool is not refilled from slot 0: _push_pool per book
            for b in m.books:
                b._pool_ptr = 5
                b.pool_ptr.fill_(5)
        return m

    real, real_pack = VectorQuantizer._upkeep_apply_books, VectorQuantizer._pack_stats_books
    states, outs, restarts = [], [], []
    for batched in (True, False):
        monkeypatch.setattr(multi, "_BATCHED_UPKEEP", batched)
        ran, packed = [], []
        monkeypatch.setattr(VectorQuantizer, "_upkeep_apply_books",
                            staticmethod(lambda books, flat: ran.append(real(books, flat))
                                         or ran[-1]))
        monkeypatch.setattr(VectorQuantizer, "_pack_stats_books",
                            staticmethod(lambda *a: packed.append(1) or real_pack(*a)))
        m = make().train()
        got = []
        for z, a in steps:
            o = m(z, **a)
            got += [o.indices, o.z_q.detach(), o.perplexity]
            got += [torch.tensor(list(st.values()), dtype=torch.float64) for st in m.stats()]
        batches = case not in ("rvq-mixed", "rvq-shared", *low)
        assert ran == ([batches] * len(steps) if batched else []), ran
        # The native statistics (float32 on the CPU) of alike books are packed batched too.
        assert len(packed) == (len(steps) if batched and batches and case != "float64" else 0)
        states.append(m.state_dict())
        outs.append(got)
        restarts.append(sum(int(b.restart_count) for b in m.books))
    assert restarts[0] == restarts[1]
    assert (restarts[0] > 0) == (case not in ("rvq-no-restarts", "rvq-long-window"))
    for k in states[1]:
        assert torch.equal(states[0][k], states[1][k]), k
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@needs_cpu
@pytest.mark.parametrize("D", [1, 8, 37, 64])
def test_native_residual_stats_are_index_add_on_each_residual(D):
    # The native call against its definition: r_0 = x, r_{s+1} = r_s - e_s where the index is
    # >= 0; counts = bincount of the taken rows, sums = index_add_ of their rows (ascending n).
    # One and two threads alike; a stage that wants nothing gets nothing written.
    gen = _gen(73 + D)
    N, Ks = 3000, [40, 7, 300, 5]
    x = torch.randn(N, D, generator=gen) * 50
    cbs = [torch.randn(K, D, generator=gen) * 50 * 0.5 ** s for s, K in enumerate(Ks)]
    idx = torch.stack([torch.randint(-1, K, (N,), generator=gen) for K in Ks]).contiguous()
    take = ((torch.rand(len(Ks), N, generator=gen) < 0.9) & (idx >= 0)).contiguous()
    res = []
    for threads in (1, 2):
        counts = [torch.full((K,), -7, dtype=torch.long) for K in Ks]
        sums = [torch.full((K, D), 3.0) for K in Ks]
        want = [True, False, True, False]  # stage 3 wants nothing: the buffers stay as they were
        native.module().cpu_residual_stats(
            N, D, x.data_ptr(), [c.data_ptr() for c in cbs], Ks, idx.data_ptr(), take.data_ptr(),
            False, [s.data_ptr() if w else 0 for s, w in zip(sums, want)],
            [c.data_ptr() if s < 3 else 0 for s, c in enumerate(counts)], threads)
        res.append((counts, sums))
    r = x.clone()
    for s, (K, cb) in enumerate(zip(Ks, cbs)):
        i = idx[s]
        k = torch.where(take[s], i, K)
        if s < 3:
            assert torch.equal(res[0][0][s], torch.bincount(k, minlength=K + 1)[:K])
        else:
            assert (res[0][0][s] == -7).all()
        if s in (0, 2):
            want = torch.zeros(K + 1, D).index_add_(0, k, r)[:K]
            assert torch.equal(res[0][1][s], want) and want.abs().sum() > 0
        else:
            assert (res[0][1][s] == 3.0).all()
        r = r - torch.where((i >= 0)[:, None], cb[i.clamp(min=0)], 0)
    for a, b in zip(res[0][0] + res[0][1], res[1][0] + res[1][1]):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="no code"):
        bad = take.clone()
        bad[0, int((idx[0] < 0).nonzero()[0])] = True
        native.module().cpu_residual_stats(
            N, D, x.data_ptr(), [c.data_ptr() for c in cbs], Ks, idx.data_ptr(), bad.data_ptr(),
            False, [0] * 4, [c.data_ptr() for c in res[0][0]], 1)


@needs_cpu
@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize("D", [1, 8, 37])
def test_native_residual_stats_restart_candidates_are_each_stages_rows(D, cosine):
    # The restart candidates the native call writes against their definition: stage s's input
    # r_s (its unit row _unit_rows(r_s) when cosine, the bits the sums add) at the drawn rows,
    # 0 where the row is not taken; stages that want only candidates (no sums, no counts), one
    # past the last stage with sums, a stage with none, rows drawn twice; one and two threads.
    from vqkernels.residual import _unit_rows
    gen = _gen(81 + D + cosine)
    N, Ks = 2500, [40, 7, 300, 5]
    S = len(Ks)
    x = torch.randn(N, D, generator=gen) * 50
    x[7] = float("nan")  # a NaN row's candidates are NaN where taken
    cbs = [torch.randn(K, D, generator=gen) * 50 * 0.5 ** s for s, K in enumerate(Ks)]
    idx = torch.stack([torch.randint(-1, K, (N,), generator=gen) for K in Ks]).contiguous()
    take = ((torch.rand(S, N, generator=gen) < 0.9) & (idx >= 0)).contiguous()
    take[:, 7] = idx[:, 7] >= 0
    sels = [torch.randint(0, N, (m,), generator=gen) for m in (64, 0, 200, 33)]
    sels[0][:3] = torch.tensor([7, 7, N - 1])
    want_sums = [True, False, False, False]  # stages 2 and 3: candidates only
    res = []
    for threads in (1, 2):
        cand = [torch.full((t.numel(), D), 5.0) for t in sels]
        sums = [torch.empty(K, D) for K in Ks]
        native.module().cpu_residual_stats(
            N, D, x.data_ptr(), [c.data_ptr() for c in cbs], Ks, idx.data_ptr(), take.data_ptr(),
            cosine, [t.data_ptr() if w else 0 for t, w in zip(sums, want_sums)], [0] * S,
            threads, False, [t.data_ptr() for t in sels], [t.numel() for t in sels],
            [t.data_ptr() for t in cand])
        res.append(cand)
    r = x.clone()
    for s, (K, cb) in enumerate(zip(Ks, cbs)):
        rows = (_unit_rows(r) if cosine else r)[sels[s]]
        want = torch.where(take[s][sels[s]][:, None], rows, 0)
        torch.testing.assert_close(res[0][s], want, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(res[1][s], want, rtol=0, atol=0, equal_nan=True)
        i = idx[s]
        r = r - torch.where((i >= 0)[:, None], cb[i.clamp(min=0)], 0)
    assert res[0][0][0].isnan().all() == bool(take[0, 7]) and (res[0][2] != 0).any()
    with pytest.raises(ValueError, match="candidate row out of range"):
        bad = sels[2].clone()
        bad[5] = N
        native.module().cpu_residual_stats(
            N, D, x.data_ptr(), [c.data_ptr() for c in cbs], Ks, idx.data_ptr(), take.data_ptr(),
            cosine, [0] * S, [0] * S, 1, False, [t.data_ptr() for t in sels[:2]] + [bad.data_ptr(), 0],
            [64, 0, 200, 0], [t.data_ptr() for t in res[0][:3]] + [0])
    with pytest.raises(ValueError, match="one per codebook"):
        native.module().cpu_residual_stats(
            N, D, x.data_ptr(), [c.data_ptr() for c in cbs], Ks, idx.data_ptr(), take.data_ptr(),
            cosine, [0] * S, [0] * S, 1, False, [t.data_ptr() for t in sels[:3]],
            [t.numel() for t in sels[:3]], [t.data_ptr() for t in res[0][:3]])


@needs_cpu
@pytest.mark.parametrize("d", [1, 12, 40])
def test_native_grouped_stats_are_index_add_on_each_groups_columns(d):
    gen = _gen(77 + d)
    N, Ks = 2000, [30, 9, 200]
    G = len(Ks)
    x = torch.randn(N, G * d, generator=gen) * 20
    idx = torch.stack([torch.randint(0, K, (N,), generator=gen) for K in Ks]).contiguous()
    take = (torch.rand(G, N, generator=gen) < 0.9).contiguous()
    res = []
    for threads in (1, 2):
        counts = [torch.empty(K, dtype=torch.long) for K in Ks]
        sums = [torch.empty(K, d) for K in Ks]
        native.module().cpu_residual_stats(
            N, d, x.data_ptr(), [0] * G, Ks, idx.data_ptr(), take.data_ptr(), False,
            [t.data_ptr() for t in sums], [t.data_ptr() for t in counts], threads, True)
        res.append(counts + sums)
    for g, K in enumerate(Ks):
        k = torch.where(take[g], idx[g], K)
        assert torch.equal(res[0][g], torch.bincount(k, minlength=K + 1)[:K])
        want = torch.zeros(K + 1, d).index_add_(0, k, x[:, g * d:(g + 1) * d].contiguous())[:K]
        assert torch.equal(res[0][G + g], want)
    for a, b in zip(*res):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="not cosine"):
        native.module().cpu_residual_stats(
            N, d, x.data_ptr(), [0] * G, Ks, idx.data_ptr(), take.data_ptr(), True,
            [0] * G, [t.data_ptr() for t in res[0][:G]], 1, True)


def test_shared_codebook_one_book_for_all_stages():
    torch.manual_seed(8)
    m = ResidualVectorQuantizer(4, 3, 8, shared_codebook=True, kmeans_init=False)
    assert len(m.books) == 1
    out = m(torch.randn(30, 4))
    assert int(m.books[0]._last_counts.sum()) == 90  # every stage's rows counted in one book
    assert out.indices.shape == (30, 3)


def test_projected_and_cosine_stages():
    gen = _gen(9)
    torch.manual_seed(9)
    m = ResidualVectorQuantizer(16, 3, 32, codebook_dim=4, cosine=True, ema=False,
                                kmeans_init=False)
    z = torch.randn(2, 16, 25, generator=gen, requires_grad=True)  # channel-first
    out = m(z, dim=1)
    assert out.z_q.shape == z.shape and out.indices.shape == (2, 25, 3)
    # Stage 0 searched the l2-normalised projection against normalised codes.
    x = torch.nn.functional.normalize(m.project_in[0](z.detach().movedim(1, -1).reshape(-1, 16)),
                                      dim=-1)
    cb = torch.nn.functional.normalize(m.books[0].codebook.detach(), dim=1)
    idx, _ = vqkernels.nearest_code(x, cb)
    assert torch.equal(out.indices.reshape(-1, 3)[:, 0], idx)
    # The value is the sum of projected unit codes: codes_from_indices rebuilds it.
    torch.testing.assert_close(m.codes_from_indices(out.indices).movedim(-1, 1), out.z_q,
                               rtol=1e-5, atol=1e-6)
    (out.loss + (out.z_q * torch.randn_like(out.z_q)).sum()).backward()
    assert m.project_in[1].weight.grad.abs().sum() > 0  # commitment, projected space
    assert m.project_out[2].weight.grad.abs().sum() > 0  # the output gradient
    assert m.books[0].codebook.grad.abs().sum() > 0      # codebook loss (gradient mode)
    assert z.grad.abs().sum() > 0


def test_grouped_module_and_its_codes():
    gen = _gen(10)
    torch.manual_seed(10)
    g = GroupedVectorQuantizer(12, 3, 16, restart_after=None)
    z = torch.randn(2, 9, 12, generator=gen)
    out = g(z)
    assert out.indices.shape == (2, 9, 3) and out.z_q.shape == z.shape
    assert all(bool(b.initialised) for b in g.books)
    g.eval()
    out = g(z)
    assert torch.equal(g.codes_from_indices(out.indices), out.z_q)
    # Counts (on the CPU from the one-call search itself) and perplexities are each group's.
    for h in range(3):
        c = torch.bincount(out.indices[..., h].reshape(-1), minlength=16)
        assert torch.equal(out.counts[h], c)
        p = c.double() / c.sum()
        torch.testing.assert_close(out.perplexity[h].double(),
                                   torch.special.entr(p).sum().exp(), rtol=1e-6, atol=0)
    gs = GroupedVectorQuantizer(12, 3, 16, shared_codebook=True, kmeans_init=False).eval()
    o = gs(z)
    assert len(gs.books) == 1 and torch.equal(gs.codes_from_indices(o.indices), o.z_q)


@pytest.mark.parametrize("cosine", [False, True])
def test_grouped_projected_codes(cosine):
    # codebook_dim: group g searches project_in[g] of its 4 channels (normalised with cosine:
    # the residual module's per-stage code), outputs project_out[g](code); the books are kept up
    # in the projected space, and gradients reach both projections.
    gen = _gen(12)
    torch.manual_seed(12)
    kw = dict(codebook_dim=2, cosine=cosine, ema=False, restart_after=None, kmeans_iters=0)
    g = GroupedVectorQuantizer(12, 3, 16, **kw)
    assert [b.codebook.shape for b in g.books] == [(16, 2)] * 3
    assert [tuple(p.weight.shape) for p in g.project_in] == [(2, 4)] * 3
    assert [tuple(p.weight.shape) for p in g.project_out] == [(4, 2)] * 3
    z = torch.randn(2, 12, 30, generator=gen)  # channel-first
    g(z, dim=1)
    zr = z.movedim(1, -1).reshape(-1, 3, 4)
    with torch.no_grad():
        xs = [g.project_in[i](zr[:, i]) for i in range(3)]
        if cosine:
            xs = [torch.nn.functional.normalize(x, dim=-1) for x in xs]
    for b, x in zip(g.books, xs):  # k-means++ (no Lloyd) on the projected rows: each code one
        assert bool(b.initialised)
        d = torch.cdist(b.codebook.detach(), x, compute_mode="donot_use_mm_for_euclid_dist")
        assert float(d.min(1).values.max()) < 1e-6
    g.eval()
    zg = z.clone().requires_grad_(True)
    out = g(zg, dim=1)
    assert out.z_q.shape == z.shape and out.indices.shape == (2, 30, 3)
    for i, (b, x) in enumerate(zip(g.books, xs)):
        cb = torch.nn.functional.normalize(b.codebook, dim=1) if cosine else b.codebook
        idx, _ = vqkernels.nearest_code(x, cb)
        assert torch.equal(out.indices.reshape(-1, 3)[:, i], idx)
    # z_q is every group's projected-back code: codes_from_indices rebuilds it (a decoder's way)
    torch.testing.assert_close(g.codes_from_indices(out.indices).movedim(-1, 1), out.z_q,
                               rtol=1e-5, atol=1e-6)
    # Gradients: z_q straight through to z; the commitment term to every project_in; z_q's own
    # gradient to every project_out.
    w = torch.randn_like(out.z_q)
    (out.z_q * w).sum().backward(retain_graph=True)
    assert torch.equal(zg.grad, w)
    assert all(p.weight.grad is None or float(p.weight.grad.abs().sum()) == 0
               for p in g.project_in)
    assert all(float(p.weight.grad.abs().sum()) > 0 for p in g.project_out)
    g.zero_grad()
    out.loss.backward()  # codebook terms (to the books) + beta * commitment terms (to project_in)
    assert all(float(p.weight.grad.abs().sum()) > 0 for p in g.project_in)
    assert all(float(b.codebook.grad.abs().sum()) > 0 for b in g.books)
    # the losses are in the books' space: group 1's commitment term is the mean squared error
    # of its (normalised) projected rows to their codes
    x1 = xs[1]
    code = (torch.nn.functional.normalize(g.books[1].codebook, dim=1) if cosine
            else g.books[1].codebook)[out.indices.reshape(-1, 3)[:, 1]]
    torch.testing.assert_close(out.commitment_loss[1], ((x1 - code) ** 2).mean(),
                               rtol=1e-5, atol=1e-7)


def test_grouped_projections_run_the_one_call_search_and_train_the_codebooks():
    # Not cosine: the groups' projected rows go through the one grouped call (native CPU) and
    # give the group loop's result (the reference backend); in gradient mode the codebook loss
    # reaches every book and the commitment term every project_in, through the fused backward.
    gen = _gen(13)
    torch.manual_seed(13)
    a = GroupedVectorQuantizer(8, 2, 8, codebook_dim=3, ema=False, kmeans_init=False)
    b = GroupedVectorQuantizer(8, 2, 8, codebook_dim=3, ema=False, kmeans_init=False,
                               backend="reference")
    b.load_state_dict(a.state_dict())
    z = torch.randn(50, 8, generator=gen)
    za, zb = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    oa, ob = a.eval()(za), b.eval()(zb)
    assert torch.equal(oa.indices, ob.indices)
    torch.testing.assert_close(oa.z_q, ob.z_q)
    torch.testing.assert_close(oa.loss, ob.loss)
    oa.loss.backward()
    ob.loss.backward()
    for m in (a, b):
        assert all(float(bk.codebook.grad.abs().sum()) > 0 for bk in m.books)
        assert all(float(p.weight.grad.abs().sum()) > 0 for p in m.project_in)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad)
    # a shared book: one codebook of codebook_dim, a projection pair per group
    s = GroupedVectorQuantizer(8, 2, 8, codebook_dim=3, shared_codebook=True)
    out = s(z)
    assert len(s.books) == 1 and s.books[0].codebook.shape == (8, 3) and len(s.project_in) == 2
    assert int(s.books[0]._last_counts.sum()) == 100  # both groups' rows, projected
    assert out.indices.shape == (50, 2)


def test_the_shared_per_book_upkeep_helpers():
    # quantizers/upkeep.py: what both multi-book modules do for each book after the search.
    idx = torch.tensor([2, -1, 2, 0, 3, 2])
    valid = torch.tensor([True, True, False, True, True, True])
    w = ((idx >= 0) & valid).double()
    counts, perp = upkeep.batch_usage(idx, w, 5, torch.float64)
    assert counts.tolist() == [1, 0, 2, 1, 0]
    p = torch.tensor([0.25, 0.5, 0.25], dtype=torch.float64)
    torch.testing.assert_close(perp, torch.exp(-(p * p.log()).sum()))
    counts, _ = upkeep.batch_usage(idx.clamp(min=0), None, 5, torch.float32)
    assert counts.dtype == torch.long and counts.tolist() == [2, 0, 3, 1, 0]
    err = torch.arange(6.0)
    assert upkeep.upkeep_errors(err, idx, valid).tolist() == [0, float("inf"), float("inf"), 3, 4,
                                                              5]
    assert upkeep.upkeep_errors(err, idx, None)[1] == float("inf")
    cb = torch.tensor([1.0, 2.0], requires_grad=True)
    cm = torch.tensor([3.0, 5.0], requires_grad=True)
    c, loss = upkeep.book_losses(cb, cm, 0.5, ema=False)
    assert c.requires_grad and float(loss.detach()) == 3.0 + 0.5 * 8
    c, loss = upkeep.book_losses(cb, cm, 0.5, ema=True)
    assert not c.requires_grad and float(loss.detach()) == 4.0
    loss.backward()
    assert cb.grad is None and cm.grad.tolist() == [0.5, 0.5]


def test_module_state_dict_round_trip():
    torch.manual_seed(11)
    m = ResidualVectorQuantizer(4, 2, 8, codebook_dim=3)
    m(torch.randn(40, 4))
    m2 = ResidualVectorQuantizer(4, 2, 8, codebook_dim=3)
    m2.load_state_dict(m.state_dict())
    m.eval(), m2.eval()
    z = torch.randn(10, 4)
    assert torch.equal(m(z).indices, m2(z).indices)
    assert m2.books[1]._init_done


@pytest.mark.parametrize("make", [
    lambda: ResidualVectorQuantizer(4, 2, 8),
    lambda: ResidualVectorQuantizer(4, 2, 8, codebook_dim=2),
    lambda: ResidualVectorQuantizer(4, 2, 8, cosine=True),
    lambda: GroupedVectorQuantizer(4, 2, 8),
    lambda: GroupedVectorQuantizer(4, 2, 8, shared_codebook=True),
    lambda: GroupedVectorQuantizer(4, 2, 8, codebook_dim=3),
], ids=["rvq", "rvq-projected", "rvq-cosine", "gvq", "gvq-shared", "gvq-projected"])
def test_an_empty_batch_has_zero_losses_and_gradients(make):
    # As vq_quantize and residual_vq promise for N = 0 (an empty sum): the stage loop and the
    # grouped module divided by N = 0 and returned NaN, whose gradient is NaN in every weight.
    torch.manual_seed(0)
    m = make()
    for train in (True, False):
        m.train(train)
        z = torch.randn(0, 4, requires_grad=True)
        out = m(z)
        assert torch.equal(out.loss.detach(), torch.zeros(()))
        assert not out.commitment_loss.isnan().any() and not out.codebook_loss.isnan().any()
        params = [p for p in m.parameters() if p.requires_grad]
        if out.loss.requires_grad and params:
            grads = torch.autograd.grad(out.loss, params, allow_unused=True)
            assert all(g is None or torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("m", [ResidualVectorQuantizer(4, 2, 8), GroupedVectorQuantizer(4, 2, 8)],
                         ids=["rvq", "gvq"])
def test_module_mask_and_active_stages_dtypes_are_checked(m):
    # The functional ops refuse a non-bool mask and float active_stages; the modules cast them
    # (a float mask of weights 0.5 became True), so the same call meant two things.
    z = torch.randn(5, 4)
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        m(z, mask=torch.ones(5))
    if isinstance(m, ResidualVectorQuantizer):
        with pytest.raises(TypeError, match="active_stages must be an integer tensor"):
            m(z, active_stages=torch.full((5,), 1.5))
    assert m(z, mask=torch.ones(5, dtype=torch.bool)).indices.shape[0] == 5


def test_bad_module_arguments():
    with pytest.raises(ValueError, match="num_codes"):
        ResidualVectorQuantizer(4, 2, [8])
    with pytest.raises(ValueError, match="dropout_min_stages"):
        ResidualVectorQuantizer(4, 2, 8, dropout_min_stages=3)
    with pytest.raises(ValueError, match="divisible"):
        GroupedVectorQuantizer(10, 3)
    with pytest.raises(ValueError, match="codebook_dim"):
        GroupedVectorQuantizer(12, 3, codebook_dim=0)
    with pytest.raises(ValueError, match="channels"):
        ResidualVectorQuantizer(4, 2, 8)(torch.randn(3, 5))
    # forward's argument is z: the messages name it so (they said z_e, vq_quantize's name)
    for m in (ResidualVectorQuantizer(4, 2, 8), GroupedVectorQuantizer(4, 2, 8)):
        with pytest.raises(ValueError, match="^z has 5 channels"):
            m(torch.randn(3, 5))
        with pytest.raises(TypeError, match="^z must be float32"):
            m(torch.ones(3, 4, dtype=torch.long))
    # with projections the codes have codebook_dim channels: the message names the module's dim
    m = ResidualVectorQuantizer(8, 2, 8, codebook_dim=4, kmeans_init=False)
    with pytest.raises(ValueError, match="takes dim=8$"):
        m(torch.randn(3, 5))
    with pytest.raises(ValueError, match="takes dim=8$"):
        m(torch.randn(5, 3, 2), dim=1)
    with pytest.raises(ValueError, match="dim"):
        m(torch.randn(3, 8), dim=5)  # an axis z does not have


# ---------------------------------------------------------------------------- two gloo ranks
def _rvq_run(rank, world, ddp):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(123)
    books = [torch.randn(8, 4, generator=g) * 0.5 ** s for s in range(3)]
    batches = [torch.randn(2 * 48, 4, generator=g) for _ in range(3)]
    m = ResidualVectorQuantizer(4, 3, 8, kmeans_init=False, restart_after=None, decay=0.8)
    with torch.no_grad():
        for b, c in zip(m.books, books):
            b.set_codebook(c)
    calls = []
    for z in batches:
        part = z[rank * 48:(rank + 1) * 48] if ddp else z
        before = _RCALLS["all_reduce"]
        m(part)
        calls.append(_RCALLS["all_reduce"] - before)
    return {"books": [b.codebook.clone() for b in m.books], "calls": calls,
            "counts": [b.ema_count.clone() for b in m.books]}


_RCALLS = {"all_reduce": 0}


def _rvq_worker(rank, world, init_file, out_dir):
    import datetime
    import os

    import torch.distributed as dist
    torch.set_num_threads(1)
    inner = dist.all_reduce

    def counting(*a, **k):
        _RCALLS["all_reduce"] += 1
        return inner(*a, **k)

    dist.all_reduce = counting
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        torch.save(_rvq_run(rank, world, True), os.path.join(out_dir, f"rvq_{rank}.pt"))
    finally:
        dist.destroy_process_group()
    from helpers import end_spawned_worker
    end_spawned_worker()


def test_two_gloo_ranks_keep_every_stage_identical_with_one_all_reduce(tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_rvq_worker, args=(2, str(tmp_path / "pg"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rvq_{r}.pt") for r in range(2))
    for a, b in zip(r0["books"], r1["books"]):
        assert torch.equal(a, b)  # bitwise: every rank applied the same update
    assert r0["calls"] == [1, 1, 1]  # one packed all_reduce per step for the three stages
    single = _rvq_run(0, 1, False)  # one process on both ranks' rows
    for a, b in zip(r0["books"], single["books"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(r0["counts"], single["counts"]):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------ z_q's value
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale", [1.0, 300.0])
def test_stage_loop_z_q_is_the_sum_of_codes_at_any_input_scale(dtype, scale):
    # The stage loop (here: cosine on 16-bit input) returns the sum of the codes, rounded to the
    # input dtype; it must not carry the input's magnitude (the straight-through copy once added
    # (total - rows) to rows, leaving the codes at the ulp of |rows|: 1.13 off at scale 300 in
    # bf16 for codes of norm ~1). Cosine ignores the input's scale, so every scale is fair.
    torch.manual_seed(0)
    m = ResidualVectorQuantizer(8, 2, 16, cosine=True, kmeans_init=False, backend="cpu").eval()
    z = (torch.randn(64, 8, generator=_gen(7)) * scale).to(dtype)
    out = m(z)
    codes = m.codes_from_indices(out.indices)  # float32 sums of the float32 unit codes
    tol = 4 * torch.finfo(dtype).eps * 2 * float(codes.abs().max())
    assert float((out.z_q.float() - codes).abs().max()) <= tol


@pytest.mark.parametrize("scale", [1.0, 1000.0])
def test_grouped_projected_z_q_is_the_projected_code_at_any_input_scale(scale):
    # The projected grouped path's straight-through copy: its value is project_out(code), not
    # z_g + (out - z_g) rounded at |z_g|'s ulp (bf16 module and input).
    torch.manual_seed(0)
    m = GroupedVectorQuantizer(16, 2, 32, codebook_dim=3, kmeans_init=False,
                               backend="cpu").to(torch.bfloat16).eval()
    z = (torch.randn(64, 16, generator=_gen(8)) * scale).to(torch.bfloat16)
    out = m(z)
    assert torch.equal(out.z_q, m.codes_from_indices(out.indices))


def test_argument_checks_hold_on_every_path():
    # The same checks whichever path runs (fused, the stage loop under codebook_dim or the
    # reference backend), and options the modules cannot honour refused rather than ignored.
    for kw in ({}, {"codebook_dim": 3}, {"cosine": True, "backend": "reference"}):
        m = ResidualVectorQuantizer(4, 3, 8, kmeans_init=False, **kw)
        z = torch.randn(4, 4)
        with pytest.raises(ValueError, match=r"active_stages must be in \[0, 3\]"):
            m(z, active_stages=torch.tensor([0, 1, 2, 9]))
        with pytest.raises(ValueError, match=r"active_stages must be in \[0, 3\]"):
            m(z, active_stages=torch.tensor([-5, 1, 2, 3]))
        with pytest.raises(TypeError, match="active_stages must be an integer tensor"):
            m(z, active_stages=torch.tensor([True, False, True, True]))
        with pytest.raises(ValueError, match="end in an axis of 3 stages"):
            m.codes_from_indices(torch.zeros(2, 4, dtype=torch.long))
        with pytest.raises(ValueError, match=r"stage 1 must be in \[-1, 8\), got -2"):
            m.codes_from_indices(torch.tensor([[0, -2, 0]]))
        with pytest.raises(TypeError, match="indices must be an integer tensor"):
            m.codes_from_indices(torch.zeros(2, 3))
    for kw in ({}, {"codebook_dim": 3}):
        g = GroupedVectorQuantizer(6, 3, 8, kmeans_init=False, **kw)
        with pytest.raises(ValueError, match=r"group 2 must be in \[0, 8\), got -1"):
            g.codes_from_indices(torch.tensor([[0, 1, -1]]))
        with pytest.raises(ValueError, match="end in an axis of 3 groups"):
            g.codes_from_indices(torch.zeros(2, 4, dtype=torch.long))
    for cls, args in ((ResidualVectorQuantizer, (4, 2, 8)), (GroupedVectorQuantizer, (4, 2, 8))):
        with pytest.raises(ValueError, match=f"rotation_trick=True is not supported by {cls.__name__}"):
            cls(*args, rotation_trick=True)
        with pytest.raises(TypeError, match="channel_dim must be an int"):
            cls(*args, channel_dim="x")


def test_a_step_before_kmeans_init_leaves_no_dead_codes():
    # A training step whose rows are all padding runs before k-means init; it must not count
    # the codes the init then makes as unused (they would be restarted at once): the module's
    # next step is that of a fresh module, state and outputs.
    z = torch.randn(6, 4, generator=_gen(17))  # 6 rows, 8 codes: some codes go unused
    runs = []
    for pre in (False, True):
        torch.manual_seed(0)
        m = ResidualVectorQuantizer(4, 2, 8, restart_after=1)
        if pre:
            m(torch.randn(5, 4), mask=torch.zeros(5, dtype=torch.bool))
            assert not any(b._init_done for b in m.books)
        out = m(z)
        runs.append((out.indices, [b.steps_unused.clone() for b in m.books],
                     [int(b.restart_count) for b in m.books], [b.codebook.clone() for b in m.books]))
    (i0, u0, r0, c0), (i1, u1, r1, c1) = runs
    assert torch.equal(i0, i1) and r0 == r1
    assert all(torch.equal(a, b) for a, b in zip(u0 + c0, u1 + c1))
