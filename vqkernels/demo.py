"""`python -m vqkernels.demo`: quantize a batch on every backend that runs here and check that
they agree with the float64 reference -- the quickest way to see that an install works."""
from __future__ import annotations

import time

import torch

import vqkernels

from . import _cli


def main(argv=None) -> int:
    ap = _cli.ArgumentParser(prog="python -m vqkernels.demo", description=__doc__,
                             formatter_class=_cli.DefaultsHelpFormatter)
    ap.add_argument("--rows", type=int, default=8192, help="vectors to quantize (N)")
    ap.add_argument("--num-codes", type=int, default=512, help="codebook size (K)")
    ap.add_argument("--code-dim", type=int, default=64, help="code size (D)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    dev = torch.device(args.device)
    codebook = torch.randn(args.num_codes, args.code_dim, device=dev)
    z = codebook[torch.randint(0, args.num_codes, (args.rows,), device=dev)]
    z = (z + 0.3 * torch.randn_like(z)).requires_grad_(True)
    print(f"vqkernels {vqkernels.__version__}, torch {torch.__version__}, device {dev}")
    if dev.type == "cpu":
        from . import native
        for line in native.cpu_path_report():
            print(line)
    print(f"N={args.rows} K={args.num_codes} D={args.code_dim}  "
          f"(search: {2 * args.rows * args.num_codes * args.code_dim / 1e9:.2f} GFLOP)")
    ref = vqkernels.vq_quantize(z.double(), codebook.double(), backend="reference")
    print(f"{'backend':<10} {'status':<8} {'ms fwd+bwd':>10} {'loss':>10} {'perplexity':>10} "
          f"{'same idx':>9}")
    failures = 0
    for name, st in vqkernels.available_backends().items():
        if dev.type not in st.devices:
            print(f"{name:<10} {'skip':<8} {st.detail if not st.available else 'not for ' + dev.type}")
            continue
        z.grad = None
        t0 = time.perf_counter()
        out = vqkernels.vq_quantize(z, codebook, backend=name)
        (out.z_q.square().mean() + out.loss).backward()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        ms = 1e3 * (time.perf_counter() - t0)
        same = (out.indices == ref.indices).double().mean().item()
        ok = same > 0.999 and abs(out.loss.item() - ref.loss.item()) <= 1e-4 * ref.loss.item()
        failures += not ok
        print(f"{name:<10} {'ok' if ok else 'MISMATCH':<8} {ms:>10.1f} {out.loss.item():>10.5f} "
              f"{out.perplexity.item():>10.1f} {100 * same:>8.2f}%")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
