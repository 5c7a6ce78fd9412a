"""A small forward+backward on every GPU backend at several shapes, for compute-sanitizer."""
import torch

import vqkernels

SHAPES = [(1, 1, 1), (37, 5, 3), (1000, 257, 129), (4096, 1024, 64), (333, 4096, 256)]

for name, st in vqkernels.available_backends().items():
    if name == "reference" or "cuda" not in st.devices:
        continue
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for N, K, D in SHAPES:
            z = torch.randn(N, D, device="cuda", dtype=dtype, requires_grad=True)
            cb = torch.randn(K, D, device="cuda", dtype=dtype, requires_grad=True)
            out = vqkernels.vq_quantize(z, cb, backend=name)
            (out.z_q.float().sum() + out.loss).backward()
            zc = torch.randn(2, D, 5, 7, device="cuda", dtype=dtype)
            vqkernels.vq_quantize(zc, cb.detach(), dim=1, backend=name)
    torch.cuda.synchronize()
    print(f"{name}: ok")
