"""`python -m vqkernels`: the commands this package has, and what this install can run."""
from __future__ import annotations

import platform
import sys

COMMANDS = [
    ("python -m vqkernels.demo", "quantize one batch on every backend here, checked against the "
     "float64 reference (the quickest install check)"),
    ("python -m vqkernels.train --out runs/vqvae", "train the VQ-VAE (offline default data; "
     "--data cifar10|folder)"),
    ("python -m vqkernels.eval runs/vqvae", "held-out figures of a trained run"),
    ("python -m vqkernels.tokenize runs/vqvae --out tokens.npz", "token grids of a data set"),
    ("python -m vqkernels.sweep --out runs/sweep", "the K x D codebook experiment"),
    ("python -m vqkernels.runcheck runs/vqvae", "does a run keep half its codes and train without "
     "loss spikes (issue 15's criterion, from metrics.csv)"),
    ("python -m vqkernels.triton.aot", "compile every Triton config for sm_80/sm_90 and report "
     "registers and spills (needs triton)"),
]

PYTHON_API = [
    "vqkernels.vq_quantize(z_e, codebook)          fused straight-through VQ and its losses",
    "vqkernels.nearest_code(x, codebook, k=1, metric='l2'|'cosine'|'ip')",
    "vqkernels.VectorQuantizer(num_codes, dim)     the module: EMA, k-means++, restarts",
    "vqkernels.VQVAE.from_checkpoint('runs/vqvae')  a trained model / tokenizer (encode, decode)",
    "vqkernels.compat.VectorQuantize(...)          drop-in for vector_quantize_pytorch's",
]


def report() -> str:
    import torch

    import vqkernels
    from vqkernels import native
    lines = [f"vqkernels {vqkernels.__version__} ({vqkernels.__file__.rsplit('/', 1)[0]}), "
             f"torch {torch.__version__}, Python {platform.python_version()}, "
             f"{platform.machine()}", "", "Commands:"]
    w = max(len(c) for c, _ in COMMANDS)
    lines += [f"  {c:<{w}}  {what}" for c, what in COMMANDS]
    lines += ["", "Python:"] + [f"  {s}" for s in PYTHON_API]
    lines += ["", "Backends here (vqkernels.available_backends()):"]
    for name, st in vqkernels.available_backends().items():
        lines.append(f"  {name:<10} {'yes' if st.available else 'no '}  {st.detail}")
    why = native.cpu_status()
    if why is None:
        mod = native.module()
        lines += [f"  {line}" for line in native.cpu_path_report()]
        if getattr(mod, "has_cuda", False):
            lines.append(f"  CUDA kernels built for: {getattr(mod, 'cuda_archs', '?')}")
    else:
        lines.append(f"  CPU kernel: not available ({why})")
    lines.append(f"  CUDA device: {torch.cuda.get_device_name(0)}" if torch.cuda.is_available()
                 else "  CUDA device: none visible to torch")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if argv:
        print(f"python -m vqkernels takes no arguments (got {' '.join(argv)}); the commands are:",
              file=sys.stderr)
        print(report(), file=sys.stderr)
        return 2
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
