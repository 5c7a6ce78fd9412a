"""A/B of two checkouts of the whole package on grouped VQ (issue 17's grouped shape), fresh
processes alternating between the trees.

    git worktree add /tmp/base <commit> && (cd /tmp/base && VQK_CUDA=OFF python setup.py build_ext --inplace)
    python benchmarks/ab_trees.py /tmp/base . [--processes 8] [--rounds 3] [--out PAGE.md]

Unlike ab_native.py (one process, only the compiled module swapped), each tree's Python wrappers
run too, so a change in the Python around the kernels counts. Each process imports one tree
(PYTHONPATH and cwd set to it), times `grouped_vq` (fused) and a loop of `vq_quantize` over the
groups, forward (no_grad) and forward+backward (a fixed upstream gradient into z_q, 1 into the
loss), interleaved for --rounds rounds of 5 calls after one warm-up, and prints its medians. The
trees take turns (ABBA order); the page gives the medians over processes and the per-process
ratios, loop / fused within a tree and base / candidate for the fused call.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics as st
import subprocess
import sys

CHILD = r'''
import json, statistics as st, sys, time, torch
import vqkernels
N, G, K, d = 8192, 4, 1024, 64
g = torch.Generator().manual_seed(0)
z0 = torch.randn(N, G * d, generator=g)
books0 = [torch.randn(K, d, generator=g) for _ in range(G)]
dz = torch.randn(N, G * d, generator=g)

def fused(z, books):
    o = vqkernels.grouped_vq(z, books, backend="cpu")
    return o.z_q, o.loss

def loop(z, books):
    outs = [vqkernels.vq_quantize(p, b, backend="cpu") for p, b in zip(z.chunk(G, 1), books)]
    return torch.cat([o.z_q for o in outs], 1), sum(o.loss for o in outs)

res = {}
for r in range(int(sys.argv[1])):
    for mode in ("fwd", "fwd+bwd"):
        for name, f in (("fused", fused), ("loop", loop)):
            if mode == "fwd":
                z, books = z0, books0
            else:
                z = z0.clone().requires_grad_(True)
                books = [b.clone().requires_grad_(True) for b in books0]

            def run():
                if mode == "fwd":
                    with torch.no_grad():
                        f(z, books)
                else:
                    zq, loss = f(z, books)
                    torch.autograd.backward([zq, loss], [dz, None])
            run()
            t = time.perf_counter()
            for _ in range(5):
                run()
            res.setdefault(f"{name} {mode}", []).append((time.perf_counter() - t) / 5)
print(json.dumps({"file": vqkernels.__file__, **{k: st.median(v) for k, v in res.items()}}))
'''


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("base")
    ap.add_argument("candidate")
    ap.add_argument("--processes", type=int, default=8, help="processes per tree")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds in each process")
    ap.add_argument("--out", help="write a markdown page here")
    args = ap.parse_args()
    trees = {"base": os.path.abspath(args.base), "candidate": os.path.abspath(args.candidate)}
    runs = {t: [] for t in trees}
    for p in range(args.processes):
        order = list(trees) if p % 2 == 0 else list(trees)[::-1]
        for t in order:
            env = dict(os.environ, PYTHONPATH=trees[t])
            out = subprocess.run([sys.executable, "-c", CHILD, str(args.rounds)], env=env,
                                 cwd=trees[t], capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            if not r.pop("file").startswith(trees[t]):
                raise SystemExit(f"the {t} process did not import the package from {trees[t]}")
            runs[t].append(r)
        print(f"process {p + 1}/{args.processes} done", file=sys.stderr)
    from vqkernels import native
    model, flags = native._cpu_model_and_flags()
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = ["# grouped_vq: two trees A/B (benchmarks/ab_trees.py)", "",
             f"{when}; {model}; flags {' '.join(flags)}; {os.cpu_count()} CPUs; Python "
             f"{platform.python_version()}; base {trees['base']}, candidate {trees['candidate']}; "
             f"N 8192, G 4, K 1024, d 64 (D 256), fp32; {args.processes} processes per tree x "
             f"{args.rounds} rounds x 5 calls; ms are medians over the processes.", "",
             "| tree | fused fwd | loop fwd | fused fwd+bwd | loop fwd+bwd |", "|---|---|---|---|---|"]
    for t in trees:
        med = {k: 1e3 * st.median(r[k] for r in runs[t]) for k in runs[t][0]}
        lines.append(f"| {t} | {med['fused fwd']:.2f} | {med['loop fwd']:.2f} | "
                     f"{med['fused fwd+bwd']:.2f} | {med['loop fwd+bwd']:.2f} |")
    lines += ["", "| ratio, per process | fwd | median | fwd+bwd | median |", "|---|---|---|---|---|"]

    def row(label, rs):
        return [" ".join(f"{v:.2f}" for v in rs), f"{st.median(rs):.2f}x"]
    for t in trees:
        cells = []
        for mode in ("fwd", "fwd+bwd"):
            cells += row(t, [r[f"loop {mode}"] / r[f"fused {mode}"] for r in runs[t]])
        lines.append(f"| loop / fused, {t} | " + " | ".join(cells) + " |")
    cells = []
    for mode in ("fwd", "fwd+bwd"):
        cells += row("", [b[f"fused {mode}"] / c[f"fused {mode}"]
                          for b, c in zip(runs["base"], runs["candidate"])])
    lines.append("| fused, base / candidate | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
