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
from vqkernels.residual import (_unit_rows, codes_from_indices, grouped_codes_from_indices,
                                grouped_vq, residual_forward, residual_vq)

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
    # The cosine stages and the grouped call on the same build.
    ucbs = [_unit(cb) for cb in cbs]
    qc, ic, _ = residual_forward(z, ucbs, None, "cpu", cosine=True)
    _assert_every_cosine_stage_exact(z, ucbs, ic, f"{isa} cosine")
    monkeypatch.delenv("VQK_CPU_ISA")
    assert torch.equal(ic, residual_forward(z, ucbs, None, "reference", cosine=True)[1])
    books = [cb[:, :6] for cb in cbs]
    ref = grouped_vq(z[:, :18], books, backend="reference").indices
    monkeypatch.setenv("VQK_CPU_ISA", isa)
    assert torch.equal(grouped_vq(z[:, :18], books, backend="cpu").indices, ref)


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
    with pytest.raises(TypeError, match="active_stages"):  # True would mean one stage
        residual_vq(z, [cb, cb], active_stages=torch.ones(5, dtype=torch.bool))
    with pytest.raises(TypeError, match="cosine"):  # "no" used to turn cosine on
        residual_vq(z, [cb, cb], cosine="no")
    with pytest.raises(ValueError, match="integer tensor"):  # bool indices read as codes 0/1
        grouped_codes_from_indices(torch.ones(5, 2, dtype=torch.bool), [cb, cb])
    with pytest.raises(ValueError, match="stage 1"):
        codes_from_indices(torch.tensor([[0, 3]]), [cb, cb])
    with pytest.raises(ValueError, match="beta"):
        residual_vq(z, [cb], beta=-1)


def test_codes_from_indices_refuses_what_it_cannot_decode():
    # Each used to end in torch's own message (or, for an integer dtype, in silently truncated
    # codes) instead of naming the argument.
    cb = torch.randn(3, 4)
    idx = torch.tensor([[0, 2], [1, -1]])
    with pytest.raises(TypeError, match="dtype"):
        codes_from_indices(idx, [cb, cb], dtype=torch.int64)
    with pytest.raises(ValueError, match="codebooks.*stage 1.*D=5"):
        codes_from_indices(idx, [cb, torch.randn(3, 5)])
    with pytest.raises(TypeError, match="codebooks.*stage 1.*float64"):
        codes_from_indices(idx, [cb, cb.double()])
    with pytest.raises(ValueError, match="dim=2"):
        codes_from_indices(idx, [cb, cb], dim=2)
    with pytest.raises(ValueError, match="indices are on cpu but the codebooks on meta"):
        codes_from_indices(idx, [cb.to("meta"), cb.to("meta")])
    # what is accepted still decodes: a float dtype, any dim of the output
    out = codes_from_indices(idx, [cb, cb], dtype=torch.float64, dim=0)
    assert out.dtype == torch.float64 and out.shape == (4, 2)


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


# ------------------------------------------------------------------------------ cosine, fused
def _unit(cb):
    return torch.nn.functional.normalize(cb.double(), dim=1).float()


def _assert_every_cosine_stage_exact(rows, codebooks, indices, what):
    # Stage s is judged on the unit rows of its residual, rebuilt from the indices by the
    # definition (r_{s+1} = fl32(r_s - e_s), u_s = _unit_rows(r_s)).
    for s, (r, cb) in enumerate(zip(_residuals(rows, codebooks, indices), codebooks)):
        assert_exact(_unit_rows(r), cb, indices[s], what=f"{what} stage {s}")


def test_unit_rows_is_within_an_ulp_of_normalize():
    gen = _gen(201)
    r = torch.randn(500, 9, generator=gen) * torch.logspace(-15, 15, 500)[:, None]
    u = _unit_rows(r)
    torch.testing.assert_close(u, torch.nn.functional.normalize(r, dim=1), rtol=3e-7, atol=0)
    assert torch.equal(_unit_rows(torch.zeros(2, 3)), torch.zeros(2, 3))
    # Where fp32 squares overflow (F.normalize then gives zeros) the float64 sum still gives
    # unit rows.
    big = torch.randn(50, 9, generator=gen) * torch.logspace(10, 36, 50)[:, None]
    norms = _unit_rows(big).double().norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(50, dtype=torch.float64), rtol=1e-6, atol=0)


@needs_cpu
@pytest.mark.parametrize("N,D,Ks", [(1, 1, [1]), (37, 3, [5, 2, 7]), (200, 8, [256] * 6),
                                    (61, 129, [3, 130])])
def test_cpu_fused_cosine_equals_the_reference_at_every_stage(N, D, Ks):
    gen = _gen(2000 + N + D)
    z, cbs = _stagewise_data(gen, N, D, Ks)
    cbs = [_unit(cb) for cb in cbs]
    q_ref, i_ref, e_ref = residual_forward(z, cbs, None, "reference", cosine=True)
    q, i, e = residual_forward(z, cbs, None, "cpu", cosine=True)
    _assert_every_cosine_stage_exact(z, cbs, i, "cpu cosine")
    _assert_every_cosine_stage_exact(z, cbs, i_ref, "reference cosine")
    assert torch.equal(i, i_ref)
    assert torch.equal(q, q_ref)
    torch.testing.assert_close(e, e_ref, rtol=1e-5, atol=1e-6)


@needs_cpu
@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize("D", [1, 3, 8, 32, 77])
def test_cpu_fused_cosine_unit_rows_are_unit_rows_bit_for_bit(D, isa, monkeypatch):
    # The kernel's unit rows (search_impl.h, unit_tile) are _unit_rows' bit for bit: a one-stage
    # cosine call on z searches, measures and writes exactly what the plain call on _unit_rows(z)
    # does (the same tile code after the normalisation), so the errors agree to the last bit,
    # which an ulp off in any element of a unit row would spoil. Rows from 1e-20 (below the
    # 1e-12 clamp) to 1e30 (fp32 squares overflow), zero rows, and a shape with a tail tile; on
    # every build this CPU runs (each has its own tile height).
    monkeypatch.setenv("VQK_CPU_ISA", isa)
    gen = _gen(251 + D)
    N = 301
    z = torch.randn(N, D, generator=gen) * torch.logspace(-20, 30, N)[torch.randperm(N, generator=gen)][:, None]
    z[::37] = 0.0
    cb = _unit(torch.randn(64, D, generator=gen))
    q, i, e = residual_forward(z, [cb], None, "cpu", cosine=True)
    q2, i2, e2 = residual_forward(_unit_rows(z), [cb], None, "cpu", cosine=False)
    assert torch.equal(i, i2)
    assert torch.equal(e.view(torch.int32), e2.view(torch.int32))
    assert torch.equal(q, q2)


@needs_cpu
@pytest.mark.parametrize("n_close,spacing", [(2, None), (3, 8), (5, 32), (9, 16)])
def test_cpu_fused_cosine_is_exact_on_nearly_parallel_codes(n_close, spacing):
    # close_codes far from the origin, normalised: the unit codes differ by ~2^-12 in direction,
    # so the fp32 expansion cannot separate them and the exact re-search decides, every stage.
    gen = _gen(211 + n_close)
    x, cb0 = close_codes(gen, N=150, K=300, D=32, n_close=n_close, spacing=spacing)
    cb1 = _unit(torch.randn(40, 32, generator=gen))
    cbs = [_unit(cb0), cb1, _unit(cb0)]
    before = native.module().cpu_exact_rows()
    q, i, e = residual_forward(x, cbs, None, "cpu", cosine=True)
    assert native.module().cpu_exact_rows() > before  # the re-search ran
    _assert_every_cosine_stage_exact(x, cbs, i, "cpu cosine close")
    monkey = residual_forward(x, cbs, None, "reference", cosine=True)[1]
    clear0 = exact_answer(_unit_rows(x), cbs[0])[1]
    assert torch.equal(i[0][clear0], monkey[0][clear0])


@needs_cpu
def test_cpu_fused_cosine_duplicates_zero_and_non_finite_rows():
    gen = _gen(221)
    x, cb = duplicated(gen, copies=3, interleave=True)
    cbs = [_unit(cb), _unit(cb.flip(0))]
    x[0] = 0.0  # a zero row: its unit row is 0, the nearest code the one of least fp32 norm
    x[1, 3] = float("nan")
    x[2, 0] = float("inf")
    q, i, e = residual_forward(x, cbs, None, "cpu", cosine=True)
    keep = torch.ones(x.shape[0], dtype=torch.bool)
    keep[1:3] = False
    _assert_every_cosine_stage_exact(x[keep], cbs, i[:, keep], "cosine duplicates")
    assert int(i[0, 1]) == 0 and int(i[0, 2]) == 0  # non-finite rows: index 0, NaN codes
    assert torch.isnan(q[1]).all() and torch.isnan(q[2]).all()
    q_ref, i_ref, _ = residual_forward(x, cbs, None, "reference", cosine=True)
    assert torch.equal(i, i_ref)


@needs_cpu
def test_cpu_fused_cosine_dropout_rows_stop():
    gen = _gen(231)
    z, cbs = _stagewise_data(gen, 90, 8, [64, 64, 64])
    cbs = [_unit(cb) for cb in cbs]
    active = torch.randint(0, 4, (90,), generator=gen)
    q, i, e = residual_forward(z, cbs, active, "cpu", cosine=True)
    q_ref, i_ref, e_ref = residual_forward(z, cbs, active, "reference", cosine=True)
    assert torch.equal(i, i_ref) and torch.equal(q, q_ref)
    s = torch.arange(3)[:, None]
    assert ((i == -1) == (s >= active[None])).all()
    assert (e[s.expand(3, 90) >= active[None]] == 0).all()


@needs_cpu
@pytest.mark.parametrize("training,masked", [(False, False), (True, False), (True, True)])
def test_cosine_module_on_cpu_is_one_call_with_the_loops_gradients(training, masked,
                                                                   monkeypatch):
    # ResidualVectorQuantizer(cosine=True) without projection: one native call for the search
    # (counted), and the same indices, losses and gradients as its stage loop on the reference
    # backend (autograd through F.normalize there), with padding masks and per-row stage counts.
    from vqkernels import residual as residual_mod
    gen = _gen(241)
    z = torch.randn(120, 8, generator=gen)
    kw = {}
    if masked:
        kw = dict(mask=torch.rand(120, generator=gen) < 0.8,
                  active_stages=torch.randint(0, 4, (120,), generator=gen))
    mods, outs, grads = [], [], []
    for backend in ("cpu", "reference"):
        m = vqkernels.ResidualVectorQuantizer(8, 3, 32, cosine=True, kmeans_init=False,
                                              backend=backend, seed=3)
        m.train(training)
        mods.append(m)
    mods[1].load_state_dict(mods[0].state_dict())
    calls = []
    real = residual_mod._cpu_fused
    monkeypatch.setattr(residual_mod, "_cpu_fused",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    for m in mods:
        zz = z.clone().requires_grad_(True)
        out = m(zz, **kw)
        (out.z_q.square().mean() + out.loss).backward()
        outs.append(out)
        grads.append((zz.grad, [p.grad for p in m.parameters() if p.grad is not None]))
    assert len(calls) == 1
    assert torch.equal(outs[0].indices, outs[1].indices)
    torch.testing.assert_close(outs[0].codebook_loss, outs[1].codebook_loss)
    torch.testing.assert_close(outs[0].commitment_loss, outs[1].commitment_loss)
    torch.testing.assert_close(outs[0].z_q, outs[1].z_q)
    torch.testing.assert_close(grads[0][0], grads[1][0])
    assert len(grads[0][1]) == len(grads[1][1])
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------ grouped, fused
@needs_cpu
@pytest.mark.parametrize("G,d,Ks", [(4, 64, [256, 256, 256, 256]), (3, 5, [7, 1, 300]),
                                    (2, 33, [64, 65])])
def test_cpu_grouped_is_one_call_and_exact_per_group(G, d, Ks, monkeypatch):
    from vqkernels import residual as residual_mod
    gen = _gen(251 + G * d)
    z = torch.randn(150, G * d, generator=gen)
    books = [torch.randn(K, d, generator=gen) for K in Ks]
    calls = []
    real = residual_mod._GroupedFn.forward
    monkeypatch.setattr(residual_mod._GroupedFn, "forward",
                        staticmethod(lambda *a: calls.append(1) or real(*a)))
    out = grouped_vq(z, books, backend="cpu")
    assert len(calls) == 1
    ref = grouped_vq(z, books, backend="reference")
    for g in range(G):
        assert_exact(z[:, g * d:(g + 1) * d], books[g], out.indices[:, g], what=f"group {g}")
    assert torch.equal(out.indices, ref.indices)
    assert torch.equal(out.z_q, ref.z_q)
    torch.testing.assert_close(out.codebook_loss, ref.codebook_loss)
    # The counts come from the native call itself (unequal K included): each group's bincount.
    assert len(out.counts) == G
    for g in range(G):
        assert out.counts[g].dtype == torch.long and out.counts[g].shape == (Ks[g],)
        assert torch.equal(out.counts[g], torch.bincount(out.indices[:, g], minlength=Ks[g]))
    assert torch.equal(out.perplexity, ref.perplexity)


@needs_cpu
def test_cpu_grouped_is_exact_on_adversarial_groups():
    # Group 0: codes close to each other far from the origin (the re-search decides); group 1:
    # every code duplicated (lowest index); group 2: large-mean data. One call for all three.
    gen = _gen(261)
    x0, cb0 = close_codes(gen, N=120, K=300, D=16, n_close=5, spacing=32)
    x1, cb1 = duplicated(gen, N=120, K0=40, D=16, copies=3)
    x2, cb2 = large_mean(gen, N=120, K=256, D=16)
    z = torch.cat([x0, x1, x2], 1)
    before = native.module().cpu_exact_rows()
    out = grouped_vq(z, [cb0, cb1, cb2], backend="cpu")
    assert native.module().cpu_exact_rows() > before
    for g, (x, cb) in enumerate([(x0, cb0), (x1, cb1), (x2, cb2)]):
        assert_exact(x, cb, out.indices[:, g], what=f"group {g}")
        assert torch.equal(out.counts[g], torch.bincount(out.indices[:, g], minlength=len(cb)))
    # Duplicated codes (3 consecutive copies): only the first copy is ever chosen (lowest index).
    copies = out.counts[1].reshape(40, 3)
    assert int(copies[:, 1:].sum()) == 0 and int(copies[:, 0].sum()) == 120


@needs_cpu
@pytest.mark.parametrize("isa", ISA_PARAMS)
def test_cpu_grouped_set_aside_rows_meet_their_own_codebook(isa, monkeypatch):
    # Three groups of near ties far from the origin, each around its own centre, and a group of
    # rows close to their codes, over many row tiles: a thread searches one row tile against every group in turn, so
    # the rows a reduced-precision pass sets aside for one group wait while it searches the
    # others, and must be finished against their own group's codebook (a row searched against
    # another group's codes lands far from its exact answer).
    monkeypatch.setenv("VQK_CPU_ISA", isa)
    gen = _gen(291)
    pairs = [close_codes(gen, N=600, K=200, D=16, n_close=4, spacing=16, offset=2.0 ** (10 + g))
             for g in range(3)]
    cb = torch.randn(96, 16, generator=gen)  # rows near their codes: int8 proves whole tiles
    pairs.append((cb[torch.randint(0, 96, (600,), generator=gen)]
                  + 0.01 * torch.randn(600, 16, generator=gen), cb))
    z = torch.cat([x for x, _ in pairs], 1)
    books = [cb for _, cb in pairs]
    aside, int8 = native.module().cpu_set_aside_rows(), native.module().cpu_int8_rows()
    out = grouped_vq(z, books, backend="cpu")
    if any(tag in isa for tag in ("i16", "i8", "bf16")):
        assert native.module().cpu_set_aside_rows() > aside
    # The int8 tiers run on groups too, settling the last group's rows.
    if isa in ("avx2_i8", "avx512_vnni_i8"):
        assert native.module().cpu_int8_rows() > int8
    for g, (x, cb) in enumerate(pairs):
        assert_exact(x, cb, out.indices[:, g], what=f"{isa} group {g}")
        single = vqkernels.vq_quantize(x, cb, backend="cpu")
        assert torch.equal(out.indices[:, g], single.indices), f"{isa} group {g}"
        assert torch.equal(out.z_q[:, 16 * g:16 * (g + 1)], single.z_q), f"{isa} group {g}"


@needs_cpu
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_cpu_grouped_does_not_depend_on_thread_count(threads):
    gen = _gen(271)
    x0, cb0 = close_codes(gen, N=300, K=300, D=16, n_close=3, spacing=8)
    z = torch.cat([x0, torch.randn(300, 16, generator=gen)], 1)
    books = [cb0, torch.randn(100, 16, generator=gen)]
    old = torch.get_num_threads()
    try:
        base = grouped_vq(z, books, backend="cpu")
        torch.set_num_threads(threads)
        out = grouped_vq(z, books, backend="cpu")
    finally:
        torch.set_num_threads(old)
    assert torch.equal(out.indices, base.indices) and torch.equal(out.z_q, base.z_q)


@needs_cpu
def test_cpu_grouped_gradients_and_mask_match_the_loop():
    gen = _gen(281)
    z0 = torch.randn(3, 40, 12, generator=gen)
    books0 = [torch.randn(16, 4, generator=gen) for _ in range(3)]
    mask = torch.rand(3, 40, generator=gen) < 0.7
    res = []
    for backend in ("cpu", "reference"):
        z = z0.clone().requires_grad_(True)
        books = [b.clone().requires_grad_(True) for b in books0]
        out = grouped_vq(z, books, beta=0.3, mask=mask, backend=backend)
        (out.z_q.square().mean() + out.loss).backward()
        res.append((out, z.grad, [b.grad for b in books]))
    (a, gza, gba), (b, gzb, gbb) = res
    assert torch.equal(a.indices, b.indices)
    assert all(torch.equal(x, y) for x, y in zip(a.counts, b.counts))
    torch.testing.assert_close(a.loss, b.loss)
    torch.testing.assert_close(gza, gzb)
    for x, y in zip(gba, gbb):
        torch.testing.assert_close(x, y)
    # Padding rows get only the straight-through gradient of z_q, no loss gradient.
    zq_only = 2 * a.z_q.detach() / a.z_q.numel()
    torch.testing.assert_close(gza[~mask], zq_only[~mask])


# ------------------------------------------------------------------------------ int16 residual
# The x86 int16 builds' residual path (search_i16_residual.h, residual_tiles_i16: avx2_i16 on
# 256-bit tiles, avx512_i16 and avx512_vnni_i16 on 512-bit ones): each stage's search first on
# int16 pairs, then the fp32 search's own decision for the rows it cannot prove. Its indices,
# errors and z_q must be bitwise the fp32 build of the same width's residual path's.
# The int8 tiers (avx2_i8, avx512_vnni_i8) have no residual path: residual calls forced to one run
# the int16 build it stands in front of (avx2_i16, avx512_vnni_i16; vq_cpu.cpp, residual_forward),
# so they too must set rows aside (the int16 pass ran, not the scalar fallback) and never count an
# int8 row.
from adversarial import reflections, magnitudes  # noqa: E402
from cpu_isas import SKIP_REASONS  # noqa: E402

I16_PAIRS = [("avx2", "avx2_i16"), ("avx512", "avx512_i16"), ("avx512", "avx512_vnni_i16"),
             ("avx2", "avx2_i8"), ("avx512", "avx512_vnni_i8")]


def _i16_pair(pair):
    fp32, i16 = pair
    why = SKIP_REASONS[i16] or SKIP_REASONS[fp32]
    return pytest.param(pair, id=i16, marks=pytest.mark.skipif(
        why is not None, reason=f"needs the {fp32} and {i16} kernels: {why}"))


i16_pairs = pytest.mark.parametrize("pair", [_i16_pair(p) for p in I16_PAIRS])

def _bits(t):
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def _i16_vs_fp32(monkeypatch, pair, z, cbs, active=None, cosine=False):
    """(fp32 result, int16 result, rows the int16 pass set aside) under the forced ISAs of
    `pair` (fp32 build, int16 build of the same width)."""
    out = {}
    for isa in pair:
        monkeypatch.setenv("VQK_CPU_ISA", isa)
        before, int8 = native.module().cpu_set_aside_rows(), native.module().cpu_int8_rows()
        out[isa] = residual_forward(z, cbs, active, "cpu", cosine=cosine)
        aside = native.module().cpu_set_aside_rows() - before
        assert native.module().cpu_int8_rows() == int8, isa  # residual VQ never runs an int8 tier
        if isa == pair[0]:
            assert aside == 0  # the fp32 path never sets rows aside
    monkeypatch.delenv("VQK_CPU_ISA")
    for a, b, name in zip(out[pair[0]], out[pair[1]], ("z_q", "indices", "sqerr")):
        assert torch.equal(_bits(a), _bits(b)), f"{name} differs between {pair[0]} and {pair[1]}"
    return out[pair[0]], out[pair[1]], aside


def _i16_families(gen):
    """(name, z, codebooks): random stages, odd D, and the adversarial families as stage 0
    followed by stages near the origin."""
    out = []
    for D in (32, 33, 17, 6, 5):
        z, cbs = _stagewise_data(gen, 300, D, [128, 100, 64, 129])
        out.append((f"random D={D}", z, cbs))
    def tail(D):
        return [torch.randint(-64, 65, (40, D), generator=gen).float() / 32,
                torch.randn(70, D, generator=gen) * 0.05]
    x, cb = close_codes(gen, N=150, K=300, D=32, n_close=5, spacing=32)
    out.append(("close codes far out", x, [cb] + tail(32)))
    # Odd pair counts (D2 = 17, 19: the candidate pass's last single pair step and odd tail).
    for D in (34, 37):
        x, cb = close_codes(gen, N=150, K=300, D=D, n_close=5, spacing=32)
        out.append((f"close codes far out, D={D}", x, [cb] + tail(D)))
    x, cb = duplicated(gen, N=150, K0=40, D=16, copies=3, offset=0.0)  # ties near the origin
    out.append(("duplicates", x, [cb, cb - cb.mean(0)] + tail(16)))
    x, cb = duplicated(gen, N=150, K0=40, D=16, copies=4, interleave=False)
    out.append(("duplicates far out", x, [cb] + tail(16)))
    x, cb = reflections(gen, N=100, D=16, offset=0.0)
    out.append(("reflections", x, [cb] + tail(16)))
    x, cb = large_mean(gen, N=200, K=256, D=32)
    out.append(("large mean", x, [cb] + tail(32)))
    # From D = 64 the tile pass keeps the best three (search_i16_residual.h, "Top three"): lanes
    # whose candidates are the best two alone skip the candidate pass. Random stages (about a
    # tenth of the rows miss the direct proof at D = 128), near ties far out (odd D too), exact
    # pairs of ties (two copies of each code; mirror images), a large mean.
    for D in (64, 128):
        z, cbs = _stagewise_data(gen, 300, D, [256, 100, 129])
        out.append((f"random D={D}", z, cbs))
    for D in (64, 65):
        x, cb = close_codes(gen, N=150, K=300, D=D, n_close=5, spacing=32)
        out.append((f"close codes far out, D={D}", x, [cb] + tail(D)))
    x, cb = duplicated(gen, N=150, K0=60, D=64, copies=2, offset=0.0)
    out.append(("duplicate pairs, D=64", x, [cb, cb - cb.mean(0)] + tail(64)))
    x, cb = reflections(gen, N=100, D=64, offset=0.0)
    out.append(("reflections, D=64", x, [cb] + tail(64)))
    x, cb = large_mean(gen, N=200, K=256, D=64)
    out.append(("large mean, D=64", x, [cb] + tail(64)))
    for scale in (1e19, 1e-25):
        x, cb = magnitudes(gen, scale, N=150, K=64, D=16)
        out.append((f"magnitudes {scale:g}", x, [cb, cb * 0.1, cb * 0.01]))
    z, cbs = _stagewise_data(gen, 100, 24, [80, 80])
    z[3, 2], z[5, 0] = float("nan"), float("inf")
    cbs[1][4, 1] = float("nan")
    out.append(("non-finite", z, cbs))
    return out


@i16_pairs
def test_i16_residual_is_bitwise_the_fp32_residual(pair, monkeypatch):
    gen = _gen(301)
    aside = 0
    for name, z, cbs in _i16_families(gen):
        _, (q, i, e), n = _i16_vs_fp32(monkeypatch, pair, z, cbs)
        aside += n
        ok = torch.isfinite(z).all(1)
        _assert_every_stage_exact(z[ok], cbs, i[:, ok], f"{pair[1]} {name}")
    # The int16 pass ran (a build without an int16 residual search runs the fp32 one and sets
    # nothing aside).
    assert aside > 0


@i16_pairs
def test_i16_residual_cosine_and_dropout_are_bitwise_the_fp32_path(pair, monkeypatch):
    gen = _gen(311)
    z, cbs = _stagewise_data(gen, 400, 32, [128, 128, 96])
    ucbs = [_unit(cb) for cb in cbs]
    _, (q, i, e), aside = _i16_vs_fp32(monkeypatch, pair, z, ucbs, cosine=True)
    _assert_every_cosine_stage_exact(z, ucbs, i, f"{pair[1]} cosine")
    active = torch.randint(0, 4, (400,), generator=gen)
    _, (q2, i2, e2), aside2 = _i16_vs_fp32(monkeypatch, pair, z, cbs, active=active)
    assert ((i2 == -1) == (torch.arange(3)[:, None] >= active[None])).all()
    assert aside + aside2 > 0


@needs_cpu
def test_i16_residual_is_taken_per_stage_where_the_single_stage_rule_takes_it(monkeypatch):
    # Under `auto` on a CPU where the single-stage search picks an int16 build (avx2_i16, or the
    # int8 tier in front of it, avx2_i8: K >= 64, D >= 16; residual calls take avx2_i16 for both;
    # avx512_vnni_i16: K >= 32, D >= 8; avx512_vnni_i8, which auto does not pick yet, would take
    # avx512_vnni_i16 under the same rule), a stage takes the int16 pass exactly when its own (K_s, D)
    # would: smaller stages never set rows aside; forced to the int16 build, they do (on data the
    # int16 pass cannot settle).
    monkeypatch.delenv("VQK_CPU_ISA", raising=False)
    auto = native.module().cpu_isa()
    min_k = {"avx2_i16": 64, "avx2_i8": 64, "avx512_vnni_i16": 32, "avx512_vnni_i8": 32}.get(auto)
    if min_k is None:
        pytest.skip(f"auto picks {auto} here, not an int16 build")
    forced = {"avx2_i8": "avx2_i16", "avx512_vnni_i8": "avx512_vnni_i16"}.get(auto, auto)
    gen = _gen(321)
    x, cb = close_codes(gen, N=200, K=min_k // 2, D=32, n_close=3, spacing=min_k // 8)
    small = [cb, cb - cb.mean(0)]
    m = native.module()
    before = m.cpu_set_aside_rows()
    residual_forward(x, small, None, "cpu")
    assert m.cpu_set_aside_rows() == before  # K below the rule: the fp32 search, as single-stage
    big = [torch.cat([cb, cb + 0.5]), cb - cb.mean(0)]  # stage 0 now has K = min_k
    before = m.cpu_set_aside_rows()
    residual_forward(x, big, None, "cpu")
    assert m.cpu_set_aside_rows() > before
    monkeypatch.setenv("VQK_CPU_ISA", forced)
    before = m.cpu_set_aside_rows()
    residual_forward(x, small, None, "cpu")
    assert m.cpu_set_aside_rows() > before


# ------------------------------------------------------------------------------ fused backward
def _grads(z0, books0, fused, monkeypatch, shared=False, upstream=1.0, **kw):
    # upstream: the weight of z_q's random upstream gradient (small: the loss terms' gradients are
    # not swamped in grad z, so their last bits count).
    from vqkernels import residual as residual_mod
    monkeypatch.setattr(residual_mod, "_FUSED_CPU_BACKWARD", fused)
    z = z0.clone().requires_grad_(True)
    books = [b.clone().requires_grad_(True) for b in books0]
    arg = dict(codebooks=books[0], num_stages=len(books0)) if shared else dict(codebooks=books)
    out = residual_vq(z, backend="cpu", beta=0.4, **arg, **kw)
    w = torch.randn(out.z_q.shape, generator=_gen(7)).to(out.z_q.dtype) * upstream
    (out.loss + (out.z_q * w).sum()).backward()
    return [z.grad] + [b.grad for b in (books[:1] if shared else books)]


@needs_cpu
@pytest.mark.parametrize("case", ["plain", "dropout+mask", "shared", "bf16", "channel-first"])
def test_fused_cpu_backward_is_bitwise_the_stage_loop(case, monkeypatch):
    # The native backward (one pass per stage) against _ResidualFn's stage loop of single-stage
    # backwards on rebuilt residuals: the same gradients, bit for bit.
    gen = _gen(331)
    z, cbs = _stagewise_data(gen, 700, 12, [40, 33, 40])
    kw, shared = {}, False
    if case == "dropout+mask":
        kw = dict(active_stages=torch.randint(0, 4, (700,), generator=gen),
                  mask=torch.rand(700, generator=gen) < 0.8)
    elif case == "shared":
        cbs, shared = [cbs[0]] * 3, True
    elif case == "bf16":
        z, cbs = z.bfloat16(), [c.bfloat16() for c in cbs]
    elif case == "channel-first":
        z, kw = z.reshape(7, 100, 12).transpose(1, 2), dict(dim=1)
    got = _grads(z, cbs, True, monkeypatch, shared, **kw)
    want = _grads(z, cbs, False, monkeypatch, shared, **kw)
    for g, h in zip(got, want):
        assert g is not None and torch.equal(g, h)


@needs_cpu
@pytest.mark.parametrize("case", ["plain", "dropout+mask", "shared", "bf16", "adversarial",
                                  "mask, no upstream"])
def test_fused_cpu_cosine_backward_is_bitwise_the_stage_loop(case, monkeypatch):
    # Cosine stages: the native backward takes each stage's unit rows (the forward's norm, bit for
    # bit) and the commitment term through the normalisation; the stage loop computes the same
    # with torch ops (float64 dots in d order). Same gradients, bit for bit, at D = 8 (DAC-like),
    # and with rows far from the origin, rows that are zero (norm clamped: no projection), rows
    # equal to a code (zero error at stage 0) and duplicated codes.
    gen = _gen(337)
    N, D = 600, 8
    z, cbs = _stagewise_data(gen, N, D, [48, 40, 48, 33])
    cbs = [_unit(c) for c in cbs]
    kw, shared = {}, False
    upstream = 1e-7
    if case in ("dropout+mask", "mask, no upstream"):
        kw = dict(active_stages=torch.randint(0, 5, (N,), generator=gen),
                  mask=torch.rand(N, generator=gen) < 0.8)
        if case == "mask, no upstream":
            upstream = 0.0  # grad z_q is +-0: the rows that add nothing keep its sign of zero
    elif case == "shared":
        cbs, shared = [cbs[0]] * 4, True
    elif case == "bf16":
        z, cbs = z.bfloat16(), [c.bfloat16() for c in cbs]
    elif case == "adversarial":
        z[:100] = z[:100] * 1e6 + 3e6
        z[100:110] = 0.0
        z[110:130] = cbs[0][:20] * 5.0
        cbs[1][1::2] = cbs[1][0::2]
    got = _grads(z, cbs, True, monkeypatch, shared, upstream=upstream, cosine=True, **kw)
    want = _grads(z, cbs, False, monkeypatch, shared, upstream=upstream, cosine=True, **kw)
    for g, h in zip(got, want):
        bits = torch.int16 if g.dtype == torch.bfloat16 else torch.int32
        assert g is not None and g.abs().sum() > 0 and torch.equal(g.view(bits), h.view(bits))


@needs_cpu
def test_fused_cpu_cosine_backward_is_normalize_autograd():
    # Independent of both implementations: float64 autograd through F.normalize on the residuals
    # rebuilt from the indices (stage s's codes are constants in r_s, as the definition says).
    gen = _gen(339)
    z0, cbs0 = _stagewise_data(gen, 400, 8, [64, 64, 64])
    cbs0 = [_unit(c) for c in cbs0]
    z = z0.clone().requires_grad_(True)
    cbs = [c.clone().requires_grad_(True) for c in cbs0]
    out = residual_vq(z, cbs, backend="cpu", beta=0.3, cosine=True)
    w = torch.randn(out.z_q.shape, generator=_gen(8))
    (out.loss + (out.z_q * w).sum()).backward()
    zd = z0.double().requires_grad_(True)
    cd = [c.double().requires_grad_(True) for c in cbs0]
    r, loss = zd, 0
    for s, c in enumerate(cd):
        u = torch.nn.functional.normalize(r, dim=1)
        e = c[out.indices[:, s]]
        n = u.numel()
        loss = loss + ((u.detach() - e) ** 2).sum() / n + 0.3 * ((u - e.detach()) ** 2).sum() / n
        r = r - e.detach()
    (loss + (zd * w.double()).sum()).backward()  # z_q's gradient is straight-through
    torch.testing.assert_close(z.grad.double(), zd.grad, rtol=1e-4, atol=1e-6)
    for a, b in zip(cbs, cd):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-4, atol=1e-6)


@needs_cpu
def test_fused_cpu_backward_each_term_alone(monkeypatch):
    # Only the codebook loss (no z gradient), only the commitment loss (codebooks frozen), and a
    # codebook that needs no gradient: each the loop's, bit for bit.
    gen = _gen(341)
    z0, cbs0 = _stagewise_data(gen, 300, 8, [30, 30, 30])
    from vqkernels import residual as residual_mod
    res = []
    for fused in (True, False):
        monkeypatch.setattr(residual_mod, "_FUSED_CPU_BACKWARD", fused)
        cbs = [c.clone().requires_grad_(s != 1) for s, c in enumerate(cbs0)]
        out = residual_vq(z0, cbs, backend="cpu")
        g1 = torch.autograd.grad(out.codebook_loss.sum(), [cbs[0], cbs[2]])
        z = z0.clone().requires_grad_(True)
        out = residual_vq(z, [c.detach() for c in cbs0], backend="cpu")
        g2 = torch.autograd.grad(out.commitment_loss.sum(), [z])
        res.append(list(g1) + list(g2))
    for a, b in zip(*res):
        assert torch.equal(a, b)


@needs_cpu
@pytest.mark.parametrize("dtype,frozen", [(torch.float32, False), (torch.bfloat16, False),
                                          (torch.float32, True)])
def test_fused_cpu_grouped_backward_is_bitwise_the_group_loop(dtype, frozen, monkeypatch):
    # Each group's gradient written straight into grad_z's columns (and no codebook gradient for
    # a frozen codebook): the generic per-group loop's values, bit for bit, with a padding mask.
    from vqkernels import residual as residual_mod
    gen = _gen(351)
    z0 = torch.randn(2, 12, 150, generator=gen).to(dtype)  # channel-first: D = 12 at dim 1
    books0 = [torch.randn(20, 4, generator=gen).to(dtype) for _ in range(3)]
    mask = torch.rand(2, 150, generator=gen) < 0.8
    res = []
    for fused in (True, False):
        monkeypatch.setattr(residual_mod, "_FUSED_CPU_BACKWARD", fused)
        z = z0.clone().requires_grad_(True)
        books = [b.clone().requires_grad_(not (frozen and g == 1)) for g, b in enumerate(books0)]
        out = grouped_vq(z, books, dim=1, beta=0.3, mask=mask, backend="cpu")
        (out.z_q.float().square().mean() + out.loss).backward()
        res.append([z.grad] + [b.grad for b in books])
    for a, b in zip(*res):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b))
    assert res[0][0].abs().sum() > 0 and (res[0][2] is None) == frozen


class _CallCounter:
    """native.module() with its calls counted by name."""

    def __init__(self, real):
        self.real, self.calls = real, []

    def __getattr__(self, name):
        fn = getattr(self.real, name)
        if not callable(fn):
            return fn

        def counted(*a, **kw):
            self.calls.append(name)
            return fn(*a, **kw)
        return counted


@needs_cpu
@pytest.mark.parametrize("threads", [1, 3])
def test_fused_cpu_grouped_backward_is_one_call_and_bitwise_vq_quantize(threads, monkeypatch):
    # The whole grouped backward is one native call, and its gradients are bit for bit those of a
    # loop of single-stage vq_quantize calls on the groups' columns (what a user would write). At
    # 1 thread each group walks its rows in row order; at 3 threads (2 groups) the groups' chunks
    # of sorted rows are shared out: two routes to the same sums. 20 used codes over 4000 rows
    # span several 256-row chunks each (head/tail pieces); codes 20..39 are never chosen (zero).
    from vqkernels import residual as residual_mod
    gen = _gen(361)
    G, d, N = 2, 64, 4000
    books0 = [torch.cat([torch.randn(20, d, generator=gen), 50 + torch.randn(20, d, generator=gen)])
              for _ in range(G)]
    z0 = torch.randn(N, G * d, generator=gen)
    w = torch.randn(N, G * d, generator=gen)
    counter = _CallCounter(native.module())
    monkeypatch.setattr(residual_mod.native, "module", lambda: counter)
    old = torch.get_num_threads()
    res = []
    try:
        torch.set_num_threads(threads)
        for fused in (True, False):
            z = z0.clone().requires_grad_(True)
            books = [b.clone().requires_grad_(True) for b in books0]
            if fused:
                out = grouped_vq(z, books, beta=0.3, backend="cpu")
                zq, loss = out.z_q, out.loss
                del counter.calls[:]
            else:
                outs = [vqkernels.vq_quantize(p, b, beta=0.3, backend="cpu")
                        for p, b in zip(z.chunk(G, dim=1), books)]
                zq, loss = torch.cat([o.z_q for o in outs], 1), sum(o.loss for o in outs)
            (loss + (zq * w).sum()).backward()
            if fused:
                assert counter.calls == ["cpu_grouped_backward"]
            res.append([z.grad] + [b.grad for b in books])
    finally:
        torch.set_num_threads(old)
    for a, b in zip(*res):
        assert torch.equal(a, b)
    assert all(bool((g[20:] == 0).all()) and bool((g[:20] != 0).any()) for g in res[0][1:])


@pytest.mark.parametrize("Ks", [[16, 16, 16], [16, 7, 30], [5]])
@pytest.mark.parametrize("weights", ["none", "rows", "per-stage"])
def test_usage_counts_and_perplexity_per_stage(Ks, weights):
    # The one-bincount form for equal K_s against each stage counted on its own.
    from vqkernels.residual import _usage
    gen = _gen(331)
    S, N = len(Ks), 500
    idx = torch.stack([torch.randint(0, K, (N,), generator=gen) for K in Ks])
    idx[:, :40] = 0  # a popular code in every stage
    w = {"none": None, "rows": (torch.rand(1, N, generator=gen) < 0.7).double(),
         "per-stage": (torch.rand(S, N, generator=gen) < 0.6).double()}[weights]
    counts, perp = _usage(idx, Ks, w, torch.float64)
    assert perp.shape == (S,) and perp.dtype == torch.float64
    for s, K in enumerate(Ks):
        ws = torch.ones(N, dtype=torch.float64) if w is None else w[min(s, w.shape[0] - 1)]
        want = torch.zeros(K, dtype=torch.float64).index_add_(0, idx[s], ws)
        assert counts[s].dtype == torch.int64 and torch.equal(counts[s], want.long())
        p = want / want.sum()
        ent = -(p[p > 0] * p[p > 0].log()).sum()
        torch.testing.assert_close(perp[s], ent.exp(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("cosine", [False, True])
def test_usage_without_mask_or_dropout_is_the_masked_form_with_every_row(cosine):
    # residual_vq counts with no mask and no active_stages by an unweighted bincount; the same
    # call with an all-True mask and every stage active takes the weighted form: equal counts
    # (int64, each stage's bincount of its indices) and bitwise equal perplexity.
    gen = _gen(337)
    N, D, S = 300, 6, 3
    z = torch.randn(N, D, generator=gen)
    books = [torch.randn(K, D, generator=gen) for K in (9, 9, 9)]
    books[1][4] = books[1][2]  # a duplicated code: only the lower index is ever counted
    plain = vqkernels.residual_vq(z, books, cosine=cosine, backend="cpu")
    full = vqkernels.residual_vq(z, books, cosine=cosine, backend="cpu",
                                 mask=torch.ones(N, dtype=torch.bool),
                                 active_stages=torch.full((N,), S))
    assert torch.equal(plain.indices, full.indices)
    for s in range(S):
        assert plain.counts[s].dtype == torch.int64
        assert torch.equal(plain.counts[s], full.counts[s])
        assert torch.equal(plain.counts[s], torch.bincount(plain.indices[:, s], minlength=9))
    assert int(plain.counts[1][4]) == 0
    assert plain.perplexity.dtype == full.perplexity.dtype
    assert torch.equal(plain.perplexity, full.perplexity)


def test_a_bad_codebook_is_named_by_its_stage_or_group():
    z = torch.randn(3, 4)
    with pytest.raises(ValueError, match="^codebooks, stage 1: z has 4 channels"):
        residual_vq(z, [torch.randn(8, 4), torch.randn(8, 3)])
    with pytest.raises(TypeError, match="^codebooks, stage 2: codebook dtype torch.float64"):
        residual_vq(z, [torch.randn(8, 4), torch.randn(8, 4), torch.randn(8, 4).double()])
    with pytest.raises(ValueError, match="^codebooks, group 1: z has 2 channels"):
        grouped_vq(z, [torch.randn(8, 2), torch.randn(8, 3)])
