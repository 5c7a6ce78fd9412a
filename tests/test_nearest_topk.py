"""nearest_code(k=..., metric=...): the k nearest codes, sorted, ties to the lower index, judged
against float64 direct differences (tests/adversarial.py) on random and adversarial families."""
import pytest
import torch
import torch.nn.functional as F

import adversarial as adv
from vqkernels import nearest_code
from vqkernels import search


def _oracle(values):
    """(order, sorted values) of an (N, K) float64 table by (value, index)."""
    order = torch.argsort(values, dim=1, stable=True)  # stable: ties keep the lower index first
    return order, values.gather(1, order)


def _judge(idx, dist, values, k):
    """idx/dist (N, k) against the exact table: the same sorted values, each index's own exact
    value, exact ties in increasing index order, and the same k codes where the k-th and the
    next are clearly apart."""
    order, sv = _oracle(values)
    N, K = values.shape
    idx, dist = idx.reshape(N, k).cpu(), dist.reshape(N, k).double().cpu()
    own = values.gather(1, idx)
    torch.testing.assert_close(own, sv[:, :k], rtol=1e-12, atol=0)  # right values, in order
    tie = own[:, 1:] == own[:, :-1]
    assert (idx[:, 1:] > idx[:, :-1])[tie].all(), "exact ties not in increasing index order"
    exact_tie_rows = (own == sv[:, :k]).all(1)
    assert torch.equal(idx[exact_tie_rows], order[exact_tie_rows, :k])
    if K > k:
        gap = (sv[:, k] - sv[:, k - 1]) > adv.CLEAR_REL * sv[:, k].abs()
        a = idx[gap].sort(1).values
        b = order[gap, :k].sort(1).values
        assert torch.equal(a, b)
    fin = torch.isfinite(sv[:, :k])
    torch.testing.assert_close(dist[fin], own[fin], rtol=2e-7, atol=1e-30)


@pytest.mark.parametrize("k", [1, 2, 5, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_random_l2(k, dtype):
    x = torch.randn(300, 7).to(dtype)
    cb = torch.randn(40, 7).to(dtype)
    idx, dist = nearest_code(x, cb, k=k)
    shape = (300,) if k == 1 else (300, k)
    assert idx.shape == shape and dist.shape == shape and idx.dtype == torch.int64
    assert dist.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    _judge(idx, dist, adv.exact_distances(x, cb), k)
    if k == 1:  # the fused kernel's path
        adv.assert_exact(x, cb, idx)


def test_topk_first_is_the_fused_search():
    x, cb = torch.randn(500, 16), torch.randn(64, 16)
    idx1, d1 = nearest_code(x, cb)
    idx4, d4 = nearest_code(x, cb, k=4)
    assert torch.equal(idx4[:, 0], idx1)
    torch.testing.assert_close(d4[:, 0], d1)


@pytest.mark.parametrize("family", ["close", "close-f64-far", "duplicated", "reflections",
                                    "large_mean"])
def test_adversarial_families(family):
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    if family == "close":
        x, cb = adv.close_codes(g, N=80, K=140, D=16, n_close=5)
    elif family == "close-f64-far":
        # 2^24 from the origin: the float64 expansion's rounding (~1) exceeds the gaps (~2^-12),
        # so only the exact re-measurement orders these codes.
        x, cb = adv.close_codes(g, N=80, K=140, D=16, n_close=9, offset=2.0 ** 24,
                                dtype=torch.float64)
    elif family == "duplicated":
        x, cb = adv.duplicated(g, N=60, K0=20, D=8, copies=5)
    elif family == "reflections":
        x, cb = adv.reflections(g, N=50, D=8)
    else:
        x, cb = adv.large_mean(g, N=100, K=64, D=32)
    _judge(*nearest_code(x, cb, k=6), adv.exact_distances(x, cb), 6)


def test_chunks_and_non_finite(monkeypatch):
    monkeypatch.setattr(search, "_CHUNK_ELEMENTS", 64)  # many chunks and candidate blocks
    x = torch.randn(37, 5)
    cb = torch.randn(9, 5)
    cb = torch.cat([cb, cb[:3]])  # duplicates: ties across the whole table
    x[3, 1] = float("nan")
    x[4, 0] = float("inf")
    cb[5, 2] = float("nan")
    idx, dist = nearest_code(x, cb, k=4)
    vals = adv.exact_distances(x, cb)
    _judge(idx, dist, vals, 4)
    assert torch.equal(idx[3], torch.arange(4)) and torch.equal(idx[4], torch.arange(4))
    assert not (idx[torch.arange(37) > 4] == 5).any()  # the NaN code is never chosen
    idx_all, _ = nearest_code(x, cb, k=cb.shape[0])  # k = K: a full ordering
    assert (idx_all.sort(1).values == torch.arange(cb.shape[0])).all()


def test_cosine_and_ip():
    x = torch.randn(200, 6)
    cb = torch.randn(30, 6) * torch.rand(30, 1) * 3
    x64, e64 = x.double(), cb.double()
    cos = F.normalize(x64, dim=1) @ F.normalize(e64, dim=1).T
    idx, dist = nearest_code(x, cb, k=3, metric="cosine")
    _judge(idx, dist, 1.0 - cos, 3)
    idx, dist = nearest_code(x, cb, k=3, metric="ip")
    _judge(idx, dist, -(x64 @ e64.T), 3)
    i1, _ = nearest_code(x, cb, metric="ip")
    assert torch.equal(i1, (x64 @ e64.T).argmax(1))
    # a zero vector has cosine 0 with every code: exact ties, in index order, distance 1
    idx, dist = nearest_code(torch.zeros(2, 6), cb, k=3, metric="cosine")
    assert torch.equal(idx, torch.arange(3).expand(2, 3)) and (dist == 1).all()


def test_dim_and_errors():
    x = torch.randn(2, 6, 3, 4)  # channels on dim 1
    cb = torch.randn(10, 6)
    idx, dist = nearest_code(x, cb, k=2, dim=1)
    assert idx.shape == (2, 3, 4, 2)
    flat_i, _ = nearest_code(x.movedim(1, -1).reshape(-1, 6), cb, k=2)
    assert torch.equal(idx.reshape(-1, 2), flat_i)
    for bad in (0, 11, 2.0, True):
        with pytest.raises(ValueError, match="k must"):
            nearest_code(x, cb, k=bad, dim=1)
    with pytest.raises(ValueError, match="metric"):
        nearest_code(x, cb, metric="l1", dim=1)


def test_candidate_slack_is_needed(monkeypatch):
    """Without the slack the float64 GEMM's rounding decides which codes are re-measured, and
    codes of the true top k are lost (so the family above tests something)."""
    monkeypatch.setattr(search, "_SLACK_REL", 0.0)
    wrong = 0
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        x, cb = adv.close_codes(g, N=80, K=140, D=16, n_close=9, offset=2.0 ** 24,
                                dtype=torch.float64)
        order, _ = _oracle(adv.exact_distances(x, cb))
        idx, _ = nearest_code(x, cb, k=6)
        wrong += int((idx.sort(1).values != order[:, :6].sort(1).values).any(1).sum())
    assert wrong > 0
