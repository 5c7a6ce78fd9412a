"""Multi-codebook quantization on the CPU (issue 17): the fused residual_vq, a Python loop of
single-stage vq_quantize calls, grouped_vq, the modules, and (optional) vector-quantize-pytorch's
ResidualVQ / GroupedResidualVQ with the same settings, forward and forward+backward.

    python benchmarks/bench_residual.py [--quick] [--repeats 3] [--rounds 3] [--warmup 1]
        [--k-sweep] [--upstream square|grad] [--isa NAME] [--pool NAME] [--out benchmarks/results/residual-cpu]

Every (shape, implementation, mode) runs in a fresh subprocess, so its peak memory (ru_maxrss
after the runs minus the resident size after the warm-up call) is its own. The peers of one
(shape, mode) are interleaved: `rounds` rounds, each running every implementation's subprocess
once in turn (so a burst of load hits all of them alike). Each subprocess times `repeats` runs
after `warmup` untimed ones (default 1: a fresh process, as a short job or the first steps of a
run meet it; on this project's VMs a first touch of fresh memory costs ~2 us per 4 KiB page, and
glibc keeps handing out fresh mappings for the first few calls, so raise it, e.g. to 20, to see
the steady state a long training run reaches); reported: the median over all runs of wall time and of process CPU time (all
threads: on a shared machine CPU time is the steadier figure), and the load average around the
runs. --k-sweep adds the fused forward at K = 256, 1024, 4096 for the peak-memory-vs-K check.
--isa runs every subprocess under VQK_CPU_ISA=NAME (a forced path instead of auto's); --pool
under VQK_CPU_POOL=NAME (own thread pool or torch's OpenMP threads; default auto).

forward+backward: --upstream square (the default, as every earlier page) backpropagates
z_q.square().mean() + loss, so each run also times torch's own square, mean and their backward on
an N x D tensor, the same work for every peer; --upstream grad backpropagates a fixed upstream
gradient into z_q (random, made in the warm-up, as FlashAttention's benchmarks time an op's
backward) and 1 into the loss: the quantizer's own forward and backward only.
Writes <out>.json and <out>.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

SHAPES = {
    # name: (N, stages or groups, K, D, kind)
    "encodec": (16384, 8, 1024, 128, "rvq"),
    "dac": (16384, 12, 1024, 8, "rvq-cosine"),
    "grouped": (8192, 4, 1024, 256, "gvq"),
}
# Peak memory against K (--k-sweep): the EnCodec-like shape at three codebook sizes.
K_SWEEP = {f"encodec-K{k}": (16384, 8, k, 128, "rvq") for k in (256, 1024, 4096)}
QUICK = {"encodec": (2048, 4, 256, 64, "rvq"), "dac": (2048, 4, 256, 8, "rvq-cosine"),
         "grouped": (1024, 4, 256, 64, "gvq")}

IMPLS = {
    "rvq": ["vqk residual_vq (fused)", "loop of vq_quantize", "vqk ResidualVectorQuantizer (train)",
            "vqp ResidualVQ (eval)", "vqp ResidualVQ (train)"],
    "rvq-cosine": ["vqk residual_vq (fused)", "loop of vq_quantize",
                   "vqk ResidualVectorQuantizer (eval)", "vqk ResidualVectorQuantizer (train)",
                   "vqp ResidualVQ (eval)", "vqp ResidualVQ (train)"],
    "gvq": ["vqk grouped_vq", "loop of vq_quantize", "vqk GroupedVectorQuantizer (train)",
            "vqp GroupedResidualVQ (eval)", "vqp GroupedResidualVQ (train)"],
}


def _rss_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def cpu_description():
    """The CPU's model (family / model numbers on x86) and SIMD flags, and auto's path (None
    where the native module cannot say)."""
    try:
        from vqkernels import native
        model, flags = native._cpu_model_and_flags()
        path = native.module().cpu_isa() if native.cpu_status() is None else None
        return f"{model}; flags {' '.join(flags)}", path
    except Exception as e:  # noqa: BLE001 -- a description only
        return f"unknown ({e})", None


def make_data(N: int, S: int, K: int, D: int, kind: str):
    """A shape's codebooks and rows (seeded): S books of K x D (residual: scaled 0.5^s, unit rows
    for cosine) or of K x D/S (grouped), and z, N x D."""
    import torch
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(0)
    if kind == "gvq":
        books = [torch.randn(K, D // S, generator=g) for _ in range(S)]
    else:
        books = [torch.randn(K, D, generator=g) * 0.5 ** s for s in range(S)]
    if kind == "rvq-cosine":
        books = [F.normalize(b, dim=1) for b in books]
    return books, torch.randn(N, D, generator=g)


def _one(shape: str, impl: str, mode: str, repeats: int, quick: bool, warmup: int = 1,
         upstream: str = "square") -> dict:
    import resource

    import torch
    import torch.nn.functional as F

    import vqkernels
    N, S, K, D, kind = (QUICK if quick else {**SHAPES, **K_SWEEP})[shape]
    bwd = mode == "fwd+bwd"
    cosine = kind == "rvq-cosine"
    books, z = make_data(N, S, K, D, kind)
    if bwd:
        z.requires_grad_(True)
        for b in books:
            b.requires_grad_(True)

    douts = {}

    def finish(z_q, loss):
        if not bwd:
            return
        if upstream == "square":
            (z_q.square().mean() + loss).backward()
            return
        # A fixed upstream gradient per output shape, made in the first (warm-up) call.
        if z_q.shape not in douts:
            douts[z_q.shape] = torch.randn(z_q.shape, generator=torch.Generator().manual_seed(1))
        torch.autograd.backward([z_q, loss], [douts[z_q.shape], None])

    if impl == "vqk residual_vq (fused)":
        def run():
            out = vqkernels.residual_vq(z, books, backend="cpu", cosine=cosine)
            finish(out.z_q, out.loss)
    elif impl == "vqk grouped_vq":
        def run():
            out = vqkernels.grouped_vq(z, books, backend="cpu")
            finish(out.z_q, out.loss)
    elif impl == "loop of vq_quantize":
        def run():
            if kind == "gvq":
                outs = [vqkernels.vq_quantize(p, b, backend="cpu")
                        for p, b in zip(z.chunk(S, dim=1), books)]
                finish(torch.cat([o.z_q for o in outs], 1), sum(o.loss for o in outs))
                return
            r, total, loss = z, 0, 0
            for b in books:
                x = F.normalize(r, dim=1) if cosine else r
                out = vqkernels.vq_quantize(x, b, backend="cpu")
                loss = loss + out.loss
                total = total + out.z_q.detach()
                r = r - out.z_q.detach()
            finish(z + (total - z).detach(), loss)
    elif impl.startswith("vqk ResidualVectorQuantizer") or impl.startswith("vqk Grouped"):
        if kind == "gvq":
            m = vqkernels.GroupedVectorQuantizer(D, S, K, kmeans_init=False, backend="cpu")
        else:
            m = vqkernels.ResidualVectorQuantizer(D, S, K, kmeans_init=False, cosine=cosine,
                                                  backend="cpu")
        with torch.no_grad():
            for mb, b in zip(m.books, books):
                mb.set_codebook(b.detach())
        m.train("(train)" in impl)

        def run():
            out = m(z)
            finish(out.z_q, out.loss)
    elif impl.startswith("vqp"):
        try:
            from vector_quantize_pytorch import GroupedResidualVQ, ResidualVQ
        except ImportError as exc:
            return {"skipped": f"vector-quantize-pytorch not installed ({exc})"}
        kw = dict(codebook_size=K, kmeans_init=False, decay=0.99, threshold_ema_dead_code=0,
                  use_cosine_sim=cosine)
        if kind == "gvq":
            m = GroupedResidualVQ(dim=D, groups=S, num_quantizers=1, **kw)
            layers = [r.layers[0] for r in m.rvqs]
        else:
            m = ResidualVQ(dim=D, num_quantizers=S, **kw)
            layers = list(m.layers)
        with torch.no_grad():
            for layer, b in zip(layers, books):
                layer._codebook.embed.copy_(b.detach()[None])
        m.train("(train)" in impl)
        zz = z[None]

        def run():
            out = m(zz)
            zq, loss = out[0], out[2]
            finish(zq, loss.sum())
    else:
        raise ValueError(impl)

    if bwd and impl.startswith("vqp") and "(eval)" in impl:
        return {"skipped": "n/a (vector-quantize-pytorch's eval output has no gradient)"}
    for _ in range(max(1, warmup)):
        run()  # warm-up (also loads whatever a first call loads lazily)
        if bwd:
            z.grad = None
    base = _rss_kb()
    times, cpu = [], []
    load0 = os.getloadavg()[0]
    for _ in range(repeats):
        if bwd:
            z.grad = None
        c0, t0 = time.process_time(), time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"times_s": times, "cpu_s": cpu, "load": (load0 + os.getloadavg()[0]) / 2,
            "peak_extra_mb": max(0, peak - base) / 1024,
            "gflop": 2 * N * (S if kind != "gvq" else 1) * K * (D if kind != "gvq" else D) / 1e9}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes (a smoke run)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1,
                    help="untimed calls before the timed ones, in each subprocess")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of all peers")
    ap.add_argument("--k-sweep", action="store_true", help="fused forward at K = 256, 1024, 4096")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--out", default="benchmarks/results/residual-cpu")
    ap.add_argument("--impls", default=None, help="comma-separated substrings: run only these")
    ap.add_argument("--modes", default="fwd,fwd+bwd")
    ap.add_argument("--upstream", choices=("square", "grad"), default="square",
                    help="forward+backward from z_q.square().mean() + loss (square) or from a "
                         "fixed upstream gradient into z_q and 1 into the loss (grad)")
    ap.add_argument("--isa", default=None, help="run every subprocess under VQK_CPU_ISA=NAME",
                    metavar="NAME")
    ap.add_argument("--pool", default=None, choices=("auto", "openmp", "own"),
                    help="run every subprocess under VQK_CPU_POOL=NAME (default: auto)")
    ap.add_argument("--one", nargs=3, metavar=("SHAPE", "IMPL", "MODE"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.one:
        print(json.dumps(_one(*a.one, a.repeats, a.quick, a.warmup, a.upstream)))
        return
    import torch
    rows = []
    shapes = a.shapes.split(",") + (list(K_SWEEP) if a.k_sweep else [])

    def one(shape, impl, mode):
        cmd = [sys.executable, __file__, "--one", shape, impl, mode,
               "--repeats", str(a.repeats), "--warmup", str(a.warmup),
               "--upstream", a.upstream] + (["--quick"] if a.quick else [])
        env = dict(os.environ)
        if a.isa:
            env["VQK_CPU_ISA"] = a.isa
        if a.pool:
            env["VQK_CPU_POOL"] = a.pool
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if p.returncode:
            return {"error": p.stderr.strip().splitlines()[-1] if p.stderr else "failed"}
        return json.loads(p.stdout.strip().splitlines()[-1])

    def median(v):
        v = sorted(v)
        return v[len(v) // 2]

    for shape in shapes:
        kind = {**SHAPES, **K_SWEEP}[shape][4]
        sweep = shape in K_SWEEP
        for mode in (["fwd"] if sweep else a.modes.split(",")):
            impls = [i for i in IMPLS[kind] if not a.impls or any(w in i for w in
                                                                   a.impls.split(","))]
            if sweep:
                impls = [i for i in impls if "fused" in i]
            got = {i: [] for i in impls}
            for _ in range(1 if sweep else a.rounds):  # interleaved: every peer once per round
                for impl in impls:
                    got[impl].append(one(shape, impl, mode))
            for impl in impls:
                runs = [r for r in got[impl] if "times_s" in r]
                res = dict(got[impl][-1]) if not runs else {
                    "median_s": median([t for r in runs for t in r["times_s"]]),
                    "cpu_s": median([t for r in runs for t in r["cpu_s"]]),
                    "min_s": min(t for r in runs for t in r["times_s"]),
                    "load": sum(r["load"] for r in runs) / len(runs),
                    "peak_extra_mb": median([r["peak_extra_mb"] for r in runs]),
                    "gflop": runs[0]["gflop"]}
                res.update(shape=shape, impl=impl, mode=mode)
                print(res, flush=True)
                rows.append(res)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "quick": a.quick, "repeats": a.repeats,
            "rounds": a.rounds, "warmup": a.warmup, "upstream": a.upstream, "isa": a.isa,
            "cpu_pool": a.pool or os.environ.get("VQK_CPU_POOL") or "auto",
            "shapes": {k: (QUICK if a.quick else {**SHAPES, **K_SWEEP})[k] for k in shapes}}
    meta["cpu"], auto_path = cpu_description()
    meta["cpu_path"] = a.isa or auto_path
    from importlib import metadata
    try:
        meta["vector_quantize_pytorch"] = metadata.version("vector-quantize-pytorch")
    except metadata.PackageNotFoundError:
        meta["vector_quantize_pytorch"] = None
    with open(a.out + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    lines = [f"# Multi-codebook quantization, CPU ({meta['date']})", "",
             f"{meta['machine']}, {meta['cpus']} CPUs ({meta['cpu']}; "
             + (f"vqkernels' CPU path forced: VQK_CPU_ISA={a.isa}" if a.isa else
                f"vqkernels' CPU path under auto: {meta['cpu_path']}, per stage by its own K and D")
             + f"; threads: VQK_CPU_POOL={meta['cpu_pool']}), torch {meta['torch']} "
             f"({meta['torch_threads']} threads), vector-quantize-pytorch "
             f"{meta['vector_quantize_pytorch']}; {a.rounds} interleaved rounds x {a.repeats} "
             f"runs after {a.warmup} warm-up call(s), medians; CPU = process CPU time (all threads); peak "
             f"extra = max RSS minus RSS after the warm-up call (its own process); forward+backward "
             + ("from a fixed upstream gradient into z_q and 1 into the loss (--upstream grad)."
                if a.upstream == "grad" else "from z_q.square().mean() + loss."), "",
             "shapes (N, stages|groups, K, D): " + ", ".join(f"{k} {v[:4]}"
                                                               for k, v in meta["shapes"].items()),
             ""]
    for shape in shapes:
        for mode in a.modes.split(","):
            sel = [r for r in rows if r["shape"] == shape and r["mode"] == mode]
            if not sel:
                continue
            lines += [f"## {shape}, {mode}", "",
                      "| implementation | wall s | CPU s | load | peak extra MB | loop / this "
                      "(wall, CPU) |", "|---|---|---|---|---|---|"]
            loop = next((r for r in sel if r["impl"] == "loop of vq_quantize"
                         and "median_s" in r), None)
            for r in sel:
                if "median_s" not in r:
                    lines.append(f"| {r['impl']} | {r.get('skipped') or r.get('error')} | | | | |")
                    continue
                ratio = (f"{loop['median_s'] / r['median_s']:.2f}x, "
                         f"{loop['cpu_s'] / r['cpu_s']:.2f}x") if loop else ""
                lines.append(f"| {r['impl']} | {r['median_s']:.3f} | {r['cpu_s']:.3f} | "
                             f"{r['load']:.1f} | {r['peak_extra_mb']:.0f} | {ratio} |")
            lines.append("")
    with open(a.out + ".md", "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
