"""Residual VQ, grouped VQ and codes_from_indices (issue 17).

Indices are judged exactly (tests/adversarial.py): at every stage, the chosen index must be the
exact float64 argmin for that stage's residual, rebuilt here from the indices themselves by the
definition (r_{s+1} = fl(r_s - e_s) in the accumulation dtype), and on data where every stage is
clearly separated the backends agree with the reference bit for bit.
"""
import pytest
import torch

import vqkernels
from vqkernels import native
from vqkernels.residual import (codes_from_indices, grouped_codes_from_indices, grouped_vq,
                                residual_forward, residual_vq)

from adversarial import assert_exact, close_codes, duplicated, exact_answer, large_mean
from cpu_isas import ISA_PARAMS

HAS_CPU = native.cpu_status() is None
needs_cpu = pytest.mark.skipif(not HAS_CPU, reason=str(native.cpu_status()))
BACKENDS = ["reference"] + (["cpu"] if HAS_CPU else [])


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _residuals(rows, codebooks, indices):
    """r_s for every stage from the indices (S, N), by the definition, in rows' dtype."""
    r = rows.clone()
    out = []
    for s, cb in enumerate(codebooks):
        out.append(r.clone())
        idx = indices[s]
        e = torch.where((idx >= 0)[:, None], cb.to(r.dtype)[idx.clamp(min=0)], 0)
        r = r - e
    return out


def _assert_every_stage_exact(rows, codebooks, indices, what):
    for s, (r, cb) in enumerate(zip(_residuals(rows, codebooks, indices), codebooks)):
        assert_exact(r, cb.to(r.dtype), indices[s], what=f"{what} stage {s}")


def _stagewise_data(gen, N, D, Ks, spread=4.0):
    """Codebooks of shrinking scale (a trained RVQ's shape): stage s's codes ~ spread^-s."""
    cbs = [torch.randn(K, D, generator=gen) * spread ** -s for s, K in enumerate(Ks)]
    z = torch.randn(N, D, generator=gen) * 1.2
    return z, cbs


# ------------------------------------------------------------------------------ exactness
@needs_cpu
@pytest.mark.parametrize("N,D,Ks", [(1, 1, [1]), (37, 3, [5, 2, 7]), (130, 16, [64, 64, 64, 64]),
                                    (61, 129, [3, 130]), (200, 8, [256] * 6)])
def test_cpu_fused_equals_the_reference_at_every_stage(N, D, Ks):
    gen = _gen(1000 + N + D)
    z, cbs = _stagewise_data(gen, N, D, Ks)
    q_ref, i_ref, e_ref = residual_forward(z, cbs, None, "reference")
    q, i, e = residual_forward(z, cbs, None, "cpu")
    _assert_every_stage_exact(z, cbs, i, "cpu")
    _assert_every_stage_exact(z, cbs, i_ref, "reference")
    # Clear at every stage on this data (checked above by exactness of both): then bit-identical.
    assert torch.equal(i, i_ref)
    assert torch.equal(q, q_ref)  # the same sum of the same codes in the same order
    torch.testing.assert_close(e, e_ref, rtol=1e-5, atol=1e-6)


@needs_cpu
@pytest.mark.parametrize("n_close,spacing", [(2, None), (3, 8), (5, 32), (9, 16), (3, 128)])
def test_cpu_fused_is_exact_far_from_the_origin(n_close, spacing):
    # Stage 0 on close_codes (the fp32 expansion's rounding far exceeds the gaps), then two more
    # stages whose residuals sit near the origin; each stage judged on its own residual.
    gen = _gen(7 + n_close)
    x, cb0 = close_codes(gen, N=150, K=300, D=32, n_close=n_close, spacing=spacing)
    cb1 = torch.randint(-64, 65, (40, 32), generator=gen).float() / 32
    cb2 = torch.randint(-64, 65, (33, 32), generator=gen).float() / 128
    cbs = [cb0, cb1, cb2]
    before = native.module().cpu_exact_rows()
    q, i, e = residual_forward(x, cbs, None, "cpu")
    assert native.module().cpu_exact_rows() > before  # the re-search ran (stage 0 needs it)
    _assert_every_stage_exact(x, cbs, i, "cpu far")
    q_ref, i_ref, _ = residual_forward(x, cbs, None, "reference")
    clear0 = exact_answer(x, cb0)[1]
    assert torch.equal(i[0][clear0], i_ref[0][clear0])


@needs_cpu
def test_cpu_fused_needs_its_exact_re_search(monkeypatch):
    # With the proof switched off (VQK_DEBUG_APPROX_ONLY=1) the fast pass alone picks other codes
    # on this data: the re-search is what makes the stage exact.
    gen = _gen(21)
    x, cb0 = close_codes(gen, N=150, K=300, D=32, n_close=5, spacing=4)
    cbs = [cb0, cb0 * 0 + cb0.mean(0)]
    good = residual_forward(x, cbs, None, "cpu")[1]
    monkeypatch.setenv("VQK_DEBUG_APPROX_ONLY", "1")
    bad = residual_forward(x, cbs, None, "cpu")[1]
    assert not torch.equal(good[0], bad[0])


@needs_cpu
@pytest.mark.parametrize("copies,interleave", [(3, True), (5, False)])
def test_duplicated_codes_go_to_the_lowest_index_at_every_stage(copies, interleave):
    gen = _gen(31 + copies)
    x, cb = duplicated(gen, copies=copies, interleave=interleave)
    cb1 = cb - cb.mean(0)  # stage 1 sees small residuals against a duplicated, centred book
    cbs = [cb, cb1]
    i = residual_forward(x, cbs, None, "cpu")[1]
    _assert_every_stage_exact(x, cbs, i, "duplicates")


@needs_cpu
def test_large_mean_data_matches_the_reference():
    gen = _gen(41)
    x, cb0 = large_mean(gen, N=300, K=256, D=64)
    cb1 = torch.randn(128, 64, generator=gen) * 0.5
    cbs = [cb0, cb1]
    i = residual_forward(x, cbs, None, "cpu")[1]
    i_ref = residual_forward(x, cbs, None, "reference")[1]
    _assert_every_stage_exact(x, cbs, i, "large mean")
    assert torch.equal(i, i_ref)


@needs_cpu
def test_non_finite_rows_and_codes():
    gen = _gen(51)
    z, cbs = _stagewise_data(gen, 20, 6, [9, 9])
    z[3, 2] = float("nan")
    z[5, 0] = float("inf")
    cbs[1][4, 1] = float("nan")  # never chosen for a finite row
    for backend in BACKENDS:
        q, i, e = residual_forward(z, cbs, None, backend)
        assert (i[:, [3, 5]] == 0).all(), backend
        assert torch.isnan(q[[3, 5]]).all(), backend
        ok = torch.ones(20, dtype=torch.bool)
        ok[[3, 5]] = False
        assert (i[1][ok] != 4).all() and torch.isfinite(q[ok]).all(), backend


@needs_cpu
def test_result_does_not_depend_on_thread_count(threads):
    gen = _gen(61)
    z, cbs = _stagewise_data(gen, 777, 24, [100, 50, 70])
    a = residual_forward(z, cbs, None, "cpu")
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        b = residual_forward(z, cbs, None, "cpu")
    finally:
        torch.set_num_threads(old)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("isa", ISA_PARAMS)
def test_every_isa_gives_the_same_indices(isa, monkeypatch):
    # avx512bf16 has no residual path of its own: the plain avx512 build runs it.
    gen = _gen(71)
    z, cbs = _stagewise_data(gen, 97, 19, [33, 65, 130])
    q_ref, i_ref, _ = residual_forward(z, cbs, None, "reference")
    monkeypatch.setenv("VQK_CPU_ISA", isa)
    q, i, _ = residual_forward(z, cbs, None, "cpu")
    _assert_every_stage_exact(z, cbs, i, isa)
    assert torch.equal(i, i_ref) and torch.equal(q, q_ref)


# ------------------------------------------------------------------------------ the op
@pytest.mark.parametrize("backend", BACKENDS)
def test_shapes_layouts_and_codes_from_indices(backend):
    gen = _gen(81)
    z = torch.randn(2, 6, 5, 3, generator=gen)  # channel-first: D = 6 at dim 1
    cbs = [torch.randn(11, 6, generator=gen), torch.randn(4, 6, generator=gen) * 0.3]
    out = residual_vq(z, cbs, dim=1, backend=backend)
    assert out.z_q.shape == z.shape and out.indices.shape == (2, 5, 3, 2)
    assert out.sqerr.shape == (2, 5, 3, 2) and out.codebook_loss.shape == (2,)
    back = codes_from_indices(out.indices, cbs, dim=1)
    assert torch.equal(back, out.z_q)
    # The same as flat rows.
    flat = residual_vq(z.movedim(1, -1).reshape(-1, 6), cbs, backend=backend)
    assert torch.equal(flat.indices, out.indices.reshape(-1, 2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_losses_are_the_per_stage_mean_errors(backend):
    gen = _gen(91)
    z, cbs = _stagewise_data(gen, 50, 4, [7, 7, 7])
    out = residual_vq(z, cbs, beta=0.3, backend=backend)
    rs = _residuals(z, cbs, out.indices.T)
    for s in range(3):
        e = cbs[s][out.indices[:, s]]
        want = ((rs[s].double() - e.double()) ** 2).sum() / z.numel()
        torch.testing.assert_close(out.codebook_loss[s].double(), want, rtol=1e-5, atol=0)
        torch.testing.assert_close(out.commitment_loss[s].double(), want, rtol=1e-5, atol=0)
    torch.testing.assert_close(out.loss, (out.codebook_loss + 0.3 * out.commitment_loss).sum())
    # One stage is vq_quantize.
    one = residual_vq(z, cbs[:1], beta=0.3, backend=backend)
    vq = vqkernels.vq_quantize(z, cbs[0], beta=0.3, backend=backend)
    assert torch.equal(one.indices[:, 0], vq.indices)
    torch.testing.assert_close(one.loss, vq.loss)


def _autograd_reference(z, cbs, indices, beta):
    """The vector-quantize-pytorch form in plain torch from given indices: residuals with the
    earlier codes detached, ST on the sum."""
    r = z
    q = 0
    loss = 0
    for s, cb in enumerate(cbs):
        e = cb[indices[:, s]]
        loss = loss + ((r.detach() - e) ** 2).mean() + beta * ((r - e.detach()) ** 2).mean()
        q = q + e
        r = r - e.detach()
    z_q = z + (q - z).detach()
    return z_q, loss


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shared", [False, True])
def test_gradients_match_the_plain_torch_formulation(backend, shared):
    gen = _gen(101)
    z = torch.randn(40, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    if shared:
        cb = torch.randn(9, 5, generator=gen, dtype=torch.float64, requires_grad=True)
        cbs, arg = [cb] * 3, dict(codebooks=cb, num_stages=3)
        params = [cb]
    else:
        cbs = [torch.randn(9, 5, generator=gen, dtype=torch.float64) * 0.5 ** s for s in range(3)]
        for c in cbs:
            c.requires_grad_(True)
        arg, params = dict(codebooks=cbs), cbs
    w = torch.randn(40, 5, generator=gen, dtype=torch.float64)
    out = residual_vq(z, beta=0.7, backend=backend, **arg)
    (out.loss + (out.z_q * w).sum()).backward()
    got = [z.grad.clone()] + [p.grad.clone() for p in params]
    for t in [z] + params:
        t.grad = None
    z_q, loss = _autograd_reference(z, cbs, out.indices, 0.7)
    (loss + (z_q * w).sum()).backward()
    want = [z.grad] + [p.grad for p in params]
    for g, h in zip(got, want):
        torch.testing.assert_close(g, h)


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_loss_term_reaches_only_what_it_should(backend):
    gen = _gen(111)
    z = torch.randn(30, 4, generator=gen, requires_grad=True)
    cbs = [torch.randn(6, 4, generator=gen, requires_grad=True) for _ in range(2)]
    out = residual_vq(z, cbs, backend=backend)
    g = torch.autograd.grad(out.codebook_loss[1], [z, *cbs], allow_unused=True)
    assert g[0] is None or not g[0].any()
    assert g[1] is None or not g[1].any()
    assert g[2].abs().sum() > 0
    out = residual_vq(z, cbs, backend=backend)
    g = torch.autograd.grad(out.commitment_loss.sum(), [z, *cbs], allow_unused=True)
    assert g[0].abs().sum() > 0
    assert all(x is None or not x.any() for x in g[1:])
    out = residual_vq(z, cbs, backend=backend)
    w = torch.randn(30, 4, generator=gen)
    g = torch.autograd.grad((out.z_q * w).sum(), [z, *cbs], allow_unused=True)
    torch.testing.assert_close(g[0], w)  # straight-through on the sum
    assert all(x is None or not x.any() for x in g[1:])


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_computed_codebook_gets_its_gradient_through_the_projection(backend):
    gen = _gen(121)
    C = torch.randn(50, 6, generator=gen)  # frozen
    W = (torch.eye(6) + 0.1 * torch.randn(6, 6, generator=gen)).requires_grad_(True)
    z = torch.randn(64, 6, generator=gen)
    out = residual_vq(z, [C @ W, (C @ W) * 0.3], backend=backend)
    out.loss.backward()
    assert W.grad is not None and W.grad.abs().sum() > 0
    # Against plain torch through the same indices.
    g = W.grad.clone()
    W.grad = None
    cbs = [C @ W, (C @ W) * 0.3]
    _, loss = _autograd_reference(z, cbs, out.indices, 0.25)
    loss.backward()
    torch.testing.assert_close(g, W.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_16bit_input_runs_the_fp32_residual(backend):
    gen = _gen(131)
    z32, cbs32 = _stagewise_data(gen, 64, 8, [16, 16])
    z = z32.bfloat16()
    cbs = [c.bfloat16() for c in cbs32]
    out = residual_vq(z, cbs, backend=backend)
    assert out.z_q.dtype == torch.bfloat16 and out.sqerr.dtype == torch.float32
    i_ref = residual_forward(z.float(), [c.float() for c in cbs], None, "reference")[1]
    assert torch.equal(out.indices.T, i_ref)


# ------------------------------------------------------------------------------ dropout, masks
@pytest.mark.parametrize("backend", BACKENDS)
def test_quantizer_dropout_rows_stop_after_their_active_stages(backend):
    gen = _gen(141)
    z, cbs = _stagewise_data(gen, 90, 5, [8, 8, 8, 8])
    active = torch.randint(0, 5, (90,), generator=gen)
    out = residual_vq(z, cbs, active_stages=active, backend=backend)
    full = residual_vq(z, cbs, backend=backend)
    for n in range(90):
        a = int(active[n])
        assert torch.equal(out.indices[n, :a], full.indices[n, :a])
        assert (out.indices[n, a:] == -1).all() and (out.sqerr[n, a:] == 0).all()
    assert torch.equal(codes_from_indices(out.indices, cbs), out.z_q)
    assert (out.z_q[active == 0] == 0).all()
    # Losses count only active stages: stage 3's is over the rows with active > 3.
    want = out.sqerr[:, 3].double().sum() / z.numel()
    torch.testing.assert_close(out.codebook_loss[3].double(), want, rtol=1e-5, atol=0)
    assert int(out.counts[3].sum()) == int((active > 3).sum())


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_rows_add_no_loss_no_counts_no_gradient(backend):
    gen = _gen(151)
    z = torch.randn(3, 10, 4, generator=gen, requires_grad=True)
    cbs = [torch.randn(6, 4, generator=gen, requires_grad=True) for _ in range(2)]
    mask = torch.arange(10)[None, :] < torch.tensor([10, 7, 2])[:, None]
    out = residual_vq(z, cbs, mask=mask, backend=backend)
    real = residual_vq(z[mask], cbs, backend=backend)
    torch.testing.assert_close(out.codebook_loss, real.codebook_loss)
    for s in range(2):
        assert torch.equal(out.counts[s], real.counts[s])
    out.loss.backward()
    assert not z.grad[~mask].any() and z.grad[mask].abs().sum() > 0
    with pytest.raises(ValueError, match="mask"):
        residual_vq(z, cbs, mask=torch.ones(4, dtype=torch.bool))


def test_bad_arguments_say_what_is_wrong():
    z = torch.randn(5, 4)
    cb = torch.randn(3, 4)
    with pytest.raises(ValueError, match="num_stages"):
        residual_vq(z, cb)
    with pytest.raises(ValueError, match="empty"):
        residual_vq(z, [])
    with pytest.raises(ValueError, match="D=3"):
        residual_vq(z, [cb, torch.randn(3, 3)])
    with pytest.raises(ValueError, match="active_stages"):
        residual_vq(z, [cb, cb], active_stages=torch.full((5,), 3))
    with pytest.raises(TypeError, match="active_stages"):
        residual_vq(z, [cb, cb], active_stages=torch.ones(5))
    with pytest.raises(ValueError, match="stage 1"):
        codes_from_indices(torch.tensor([[0, 3]]), [cb, cb])
    with pytest.raises(ValueError, match="beta"):
        residual_vq(z, [cb], beta=-1)


def test_n_zero_rows():
    cbs = [torch.randn(3, 4), torch.randn(3, 4)]
    for backend in BACKENDS:
        out = residual_vq(torch.randn(0, 4), cbs, backend=backend)
        assert out.indices.shape == (0, 2) and out.loss == 0


# ------------------------------------------------------------------------------ grouped
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shared", [False, True])
def test_grouped_equals_one_vq_per_group(backend, shared):
    gen = _gen(161)
    z = torch.randn(2, 12, 7, generator=gen, requires_grad=True)  # D = 12 at dim 1, G = 3
    books = [torch.randn(9, 4, generator=gen, requires_grad=True) for _ in range(3)]
    arg = dict(codebooks=books[0], groups=3) if shared else dict(codebooks=books)
    out = grouped_vq(z, dim=1, beta=0.5, backend=backend, **arg)
    assert out.z_q.shape == z.shape and out.indices.shape == (2, 7, 3)
    zr = z.detach().movedim(1, -1).reshape(-1, 12)
    for g in range(3):
        cb = books[0] if shared else books[g]
        vq = vqkernels.vq_quantize(zr[:, 4 * g:4 * g + 4], cb.detach(), beta=0.5, backend=backend)
        assert torch.equal(out.indices.reshape(-1, 3)[:, g], vq.indices)
        torch.testing.assert_close(out.codebook_loss[g], vq.codebook_loss)
        assert torch.equal(out.z_q.detach().movedim(1, -1).reshape(-1, 12)[:, 4 * g:4 * g + 4],
                           vq.z_q)
    back = grouped_codes_from_indices(out.indices, **arg, dim=1)
    assert torch.equal(back, out.z_q.detach())
    out.loss.backward()
    assert z.grad.abs().sum() > 0 and books[0].grad.abs().sum() > 0


def test_grouped_mask_and_errors():
    gen = _gen(171)
    z = torch.randn(20, 8, generator=gen)
    books = torch.randn(2, 5, 4, generator=gen)
    mask = torch.arange(20) < 13
    out = grouped_vq(z, books, mask=mask)
    real = grouped_vq(z[:13], books)
    torch.testing.assert_close(out.codebook_loss, real.codebook_loss)
    assert all(torch.equal(a, b) for a, b in zip(out.counts, real.counts))
    with pytest.raises(ValueError, match="divisible"):
        grouped_vq(torch.randn(3, 7), books)
    with pytest.raises(ValueError, match="groups"):
        grouped_vq(z, books[0])
    with pytest.raises(ValueError, match="group 1"):
        grouped_codes_from_indices(torch.tensor([[0, 5]]), books)
