"""What codebook upkeep costs per training step, beside vector-quantize-pytorch doing the same.

    pytest benchmarks/test_bench_codebook.py --benchmark-only
    pytest benchmarks/test_bench_codebook.py --benchmark-only --benchmark-json=out.json

`train-step` times one training forward + backward of the quantizer alone (the search, the losses,
and the upkeep: EMA statistics, restart bookkeeping, usage counts) on a fresh batch of encoder
outputs. `init` times k-means++ seeding plus Lloyd iterations from one batch. Single process: the
one all_reduce per step of a distributed run is not included.
"""
from __future__ import annotations

import pytest
import torch

from vqkernels import VectorQuantizer
from vqkernels.codebook import kmeans_plusplus

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# CIFAR-10 VQ-VAE latents: a batch of 128 8x8 maps, K = 512 codes of D = 64 (and a wider D).
SHAPES = [(8192, 512, 64), (8192, 512, 256)]

# Spelled out in full: VectorQuantizer's defaults (EMA, restarts, k-means init) changed in issue 15,
# and each case here must keep timing the same upkeep. k-means init is timed separately below.
_OFF = dict(ema=False, restart_after=None, kmeans_init=False)
VQK = {
    "vqk-plain": dict(_OFF),
    "vqk-ema": dict(_OFF, ema=True),
    "vqk-ema-restart": dict(_OFF, ema=True, restart_after=100),
    "vqk-grad-restart": dict(_OFF, restart_after=100),
    "vqk-ema-cosine": dict(_OFF, ema=True, cosine=True),
}


def _batch(N, D, g):
    return torch.randn(N, D, generator=g).to(DEVICE)


def _vq_pytorch(K, D, kind, compat=False):
    """The peer's VectorQuantize, or (compat) vqkernels.compat's with the same arguments: the
    switch-by-import a user of the peer would make."""
    if compat:
        from vqkernels.compat import VectorQuantize
    else:
        try:
            from vector_quantize_pytorch import VectorQuantize
        except ImportError as exc:
            pytest.skip(f"vector-quantize-pytorch not installed ({exc})")
    kw = dict(dim=D, codebook_size=K, commitment_weight=0.25, decay=0.99)
    if kind == "restart":
        kw["threshold_ema_dead_code"] = 2
    if kind == "cosine":
        kw["use_cosine_sim"] = True
    return VectorQuantize(**kw).to(DEVICE).train()


@pytest.mark.parametrize("impl", list(VQK) + ["vq-pytorch-ema", "vq-pytorch-ema-restart",
                                              "vq-pytorch-ema-cosine", "vqk-compat-ema",
                                              "vqk-compat-ema-restart", "vqk-compat-ema-cosine"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{n}x{k}x{d}" for n, k, d in SHAPES])
def test_train_step(run_case, shape, impl):
    N, K, D = shape
    g = torch.Generator().manual_seed(0)
    batches = [_batch(N, D, g) for _ in range(4)]
    if impl in VQK:
        vq = VectorQuantizer(K, D, **VQK[impl]).to(DEVICE).train()
        loss_of = lambda out: out.loss  # noqa: E731
    else:
        vq = _vq_pytorch(K, D, impl.rsplit("-", 1)[-1], compat=impl.startswith("vqk-compat"))
        loss_of = lambda out: out[2]  # noqa: E731  (quantize, indices, loss)
    it = iter(range(1 << 30))

    def step():
        z = batches[next(it) % len(batches)].requires_grad_(True)
        out = vq(z)
        loss_of(out).backward()
        return out

    run_case(step, device=DEVICE, N=N, K=K, D=D, dtype=torch.float32, impl=impl, mode="train-step")


@pytest.mark.parametrize("iters", [0, 10])
@pytest.mark.parametrize("shape", SHAPES[:1], ids=[f"{n}x{k}x{d}" for n, k, d in SHAPES[:1]])
def test_kmeans_init(run_case, shape, iters):
    N, K, D = shape
    x = _batch(N, D, torch.Generator().manual_seed(0))
    run_case(lambda: kmeans_plusplus(x, K, generator=torch.Generator().manual_seed(1), iters=iters),
             device=DEVICE, N=N, K=K, D=D, dtype=torch.float32, impl=f"kmeans++ +{iters} lloyd",
             mode="init", rounds=3)
