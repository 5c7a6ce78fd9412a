"""The implementations a user might pick instead of vqkernels, doing the same job: nearest code,
gather, the two VQ losses and the straight-through output. Each `make_*` takes (z, codebook, mode)
and returns a zero-argument callable, or raises `Unavailable` saying why."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import vqkernels


class Unavailable(Exception):
    pass


def _finish(z, cb, idx, mode):
    """Gather, losses and straight-through output from the chosen indices (plain torch)."""
    zq = cb[idx]
    loss = F.mse_loss(zq, z.detach()) + 0.25 * F.mse_loss(z, zq.detach())
    out = z + (zq - z).detach()
    if mode == "fwd+bwd":
        (out.float().square().mean() + loss).backward()
    return out, loss


def eager_expansion(z, cb, mode):
    """||e||^2 - 2 z.e, argmin, gather: what most VQ-VAE code does (an N x K matrix)."""
    d = (cb * cb).sum(1) - 2.0 * (z @ cb.t())
    return _finish(z, cb, d.argmin(1), mode)


def eager_cdist(z, cb, mode):
    return _finish(z, cb, torch.cdist(z, cb).argmin(1), mode)


_compiled = {}


def make_vqkernels(backend):
    def make(z, cb, mode):
        st = vqkernels.available_backends()[backend]
        if not st.available:
            raise Unavailable(st.detail)
        if z.device.type not in st.devices:
            raise Unavailable(f"{backend} does not run on {z.device.type} tensors here")

        def run():
            out = vqkernels.vq_quantize(z, cb, backend=backend)
            if mode == "fwd+bwd":
                (out.z_q.float().square().mean() + out.loss).backward()
            return out
        return run
    return make


def make_eager(z, cb, mode):
    return lambda: eager_expansion(z, cb, mode)


def make_cdist(z, cb, mode):
    return lambda: eager_cdist(z, cb, mode)


def make_compiled(z, cb, mode):
    if "fn" not in _compiled:
        _compiled["fn"] = torch.compile(eager_expansion, dynamic=False)
    fn = _compiled["fn"]
    return lambda: fn(z, cb, mode)


def make_faiss(z, cb, mode):
    if mode != "fwd":
        raise Unavailable("faiss has no backward")
    if z.device.type != "cpu" or z.dtype != torch.float32:
        raise Unavailable("faiss-cpu takes float32 CPU arrays")
    try:
        import faiss
    except ImportError as exc:
        raise Unavailable(f"faiss-cpu not installed ({exc})") from None
    faiss.omp_set_num_threads(torch.get_num_threads())
    index = faiss.IndexFlatL2(cb.shape[1])
    index.add(cb.detach().numpy())
    zn = z.detach().numpy()
    return lambda: index.search(zn, 1)


def make_vq_pytorch(z, cb, mode):
    try:
        from vector_quantize_pytorch import VectorQuantize
    except ImportError as exc:
        raise Unavailable(f"vector-quantize-pytorch not installed ({exc})") from None
    # Its default: EMA codebook, Euclidean distance, commitment weight 1 (set to the paper's 0.25).
    vq = VectorQuantize(dim=cb.shape[1], codebook_size=cb.shape[0], commitment_weight=0.25)
    vq = vq.to(device=z.device, dtype=z.dtype)
    zz = z[None]

    def run():
        out, idx, loss = vq(zz)
        if mode == "fwd+bwd":
            (out.float().square().mean() + loss.sum()).backward()
        return out
    return run


PEERS = {
    "vqk-triton": make_vqkernels("triton"),
    "vqk-cuda": make_vqkernels("cuda"),
    "vqk-cpu": make_vqkernels("cpu"),
    "vqk-reference": make_vqkernels("reference"),
    "torch-eager": make_eager,
    "torch-cdist": make_cdist,
    "torch-compile": make_compiled,
    "faiss": make_faiss,
    "vq-pytorch": make_vq_pytorch,
}
