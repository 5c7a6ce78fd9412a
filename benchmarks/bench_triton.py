"""The Triton VQ forward (and backward) against its peers, in one run, on one GPU.

Peers: the bare N x K x D matmul (the FLOP-rate ceiling), torch eager (|z|^2 - 2 z.e + |e|^2,
argmin, gather), torch.compile of the same, and vector-quantize-pytorch's VectorQuantize (eval,
no grad). Reported per case: median time, the search's work rate 2 N K D / t, its share of the
matmul's rate, speedups, and the peak memory each allocates beyond its inputs.

    python benchmarks/bench_triton.py                    # the full set (H100-sized)
    python benchmarks/bench_triton.py --quick            # a few small cases
    python benchmarks/bench_triton.py --out benchmarks/results/h100.md

Inputs rotate among several sets larger than L2 so no peer times a cache; time is the median of
triton.testing.do_bench (CUDA events, warm-up first). Needs a CUDA device.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import sys

import torch

import vqkernels

# (N, K, D, dtype, with_backward). The first is the issue's target: N=65536, K=16384, D=256 bf16.
CASES = [
    (65536, 16384, 256, torch.bfloat16, True),
    (65536, 16384, 256, torch.float16, False),
    (65536, 16384, 256, torch.float32, True),
    (65536, 1024, 64, torch.bfloat16, True),
    (65536, 4096, 128, torch.bfloat16, False),
    (16384, 1 << 18, 256, torch.bfloat16, False),   # large K: eager's N x K matrix is 8 GiB+
    (256, 1 << 18, 256, torch.bfloat16, False),     # few rows: split-K
]
QUICK = [(8192, 2048, 128, torch.bfloat16, True), (8192, 2048, 128, torch.float32, False)]
K_SWEEP = [1 << 12, 1 << 14, 1 << 16, 1 << 18]  # extra memory vs K at N=16384, D=256, bf16


def eager_vq(z, cb):
    d = (z * z).sum(1, keepdim=True) - 2 * (z @ cb.T) + (cb * cb).sum(1)
    idx = d.argmin(1)
    return cb[idx], idx


compiled_vq = torch.compile(eager_vq, dynamic=False)


def _median_ms(fn, sets):
    import triton.testing
    state = {"i": 0}

    def step():
        z, cb = sets[state["i"] % len(sets)]
        state["i"] += 1
        return fn(z, cb)

    return triton.testing.do_bench(step, warmup=50, rep=300, return_mode="median")


def _peak_extra_mb(fn, z, cb):
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn(z, cb)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak / 2**20


def _try(fn, *a):
    try:
        return fn(*a)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None


def _inputs(N, K, D, dtype, n_sets):
    """Codes and rows drawn near them (the argmin has work to do), `n_sets` independent sets."""
    out = []
    for _ in range(n_sets):
        cb = torch.randn(K, D, device="cuda", dtype=dtype)
        z = cb[torch.randint(0, K, (N,), device="cuda")] + 0.5 * torch.randn(
            N, D, device="cuda", dtype=dtype)
        out.append((z, cb))
    return out


def _sets_for(N, K, D, dtype):
    # Enough sets to exceed the L2 twice over (H100: 50 MB), at most 4.
    bytes_one = (N + K) * D * dtype.itemsize
    return max(2, min(4, int(100e6 // max(bytes_one, 1)) + 1))


def run_case(N, K, D, dtype, with_backward, peers):
    from vector_quantize_pytorch import VectorQuantize

    sets = _inputs(N, K, D, dtype, _sets_for(N, K, D, dtype))
    flop = 2.0 * N * K * D
    row = {"N": N, "K": K, "D": D, "dtype": str(dtype).replace("torch.", "")}

    def ours(z, cb):
        return vqkernels.vq_quantize(z, cb, backend="triton")

    def matmul(z, cb):
        return z @ cb.T

    # vector-quantize-pytorch keeps its codebook in fp32 and tells users to stay in fp32: it gets
    # the same codes, and the rows cast to fp32 (the cast is part of its time).
    vqp = VectorQuantize(dim=D, codebook_size=K).to("cuda").eval()
    with torch.no_grad():
        vqp._codebook.embed.copy_(sets[0][1].float()[None])

    def vqp_fwd(z, cb):
        with torch.no_grad():
            return vqp(z.float()[None])

    fns = {"triton": ours, "matmul": matmul, "eager": eager_vq, "compile": compiled_vq,
           "vqp": vqp_fwd}
    for name, fn in fns.items():
        if name not in peers:
            continue
        ms = _try(_median_ms, fn, sets)
        row[f"{name}_ms"] = ms
        row[f"{name}_tflops"] = None if ms is None else flop / ms / 1e9
        row[f"{name}_mem_mb"] = _try(_peak_extra_mb, fn, *sets[0])
    if with_backward:
        def ours_fb(z, cb):
            z = z.detach().requires_grad_(True)
            c = cb.detach().requires_grad_(True)
            out = vqkernels.vq_quantize(z, c, backend="triton")
            (out.loss + out.z_q.float().sum()).backward()
            return z.grad

        def eager_fb(z, cb):
            z = z.detach().requires_grad_(True)
            c = cb.detach().requires_grad_(True)
            with torch.no_grad():
                _, idx = eager_vq(z, c)
            e = c[idx]
            loss = ((z.detach() - e) ** 2).mean() + 0.25 * ((z - e.detach()) ** 2).mean()
            z_q = z + (e - z).detach()
            (loss + z_q.float().sum()).backward()
            return z.grad

        row["triton_fwdbwd_ms"] = _try(_median_ms, ours_fb, sets)
        row["eager_fwdbwd_ms"] = _try(_median_ms, eager_fb, sets)
    del sets
    torch.cuda.empty_cache()
    return row


def k_sweep(peers):
    rows = []
    for K in K_SWEEP:
        z, cb = _inputs(16384, K, 256, torch.bfloat16, 1)[0]
        r = {"K": K,
             "triton_mem_mb": _try(_peak_extra_mb, lambda a, b: vqkernels.vq_quantize(
                 a, b, backend="triton"), z, cb)}
        if "eager" in peers:
            r["eager_mem_mb"] = _try(_peak_extra_mb, eager_vq, z, cb)
        rows.append(r)
        del z, cb
        torch.cuda.empty_cache()
    return rows


def _fmt(v, spec=".3g"):
    return "OOM/-" if v is None else format(v, spec)


def report(rows, sweep) -> str:
    dev = torch.cuda.get_device_name()
    import triton
    lines = ["# Triton VQ forward benchmark", "",
             f"{dev}; torch {torch.__version__}; triton {triton.__version__}; "
             f"python {platform.python_version()}; {datetime.date.today().isoformat()}", "",
             "| N | K | D | dtype | triton ms | TFLOP/s | % of matmul | x eager | x compile | "
             "x vqp | fwd+bwd ms (eager) | extra MB (eager) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r.get("triton_ms")

        def ratio(peer):
            p = r.get(f"{peer}_ms")
            return None if (p is None or t is None) else p / t

        frac = None if (t is None or r.get("matmul_ms") is None) else r["matmul_ms"] / t * 100
        lines.append(
            f"| {r['N']} | {r['K']} | {r['D']} | {r['dtype']} | {_fmt(t)} | "
            f"{_fmt(r.get('triton_tflops'), '.1f')} | {_fmt(frac, '.0f')} | "
            f"{_fmt(ratio('eager'))} | {_fmt(ratio('compile'))} | {_fmt(ratio('vqp'))} | "
            f"{_fmt(r.get('triton_fwdbwd_ms'))} "
            f"({_fmt(r.get('eager_fwdbwd_ms'))}) | {_fmt(r.get('triton_mem_mb'), '.0f')} "
            f"({_fmt(r.get('eager_mem_mb'), '.0f')}) |")
    lines += ["", "Extra memory vs K (N=16384, D=256, bf16):", "",
              "| K | triton MB | eager MB |", "|---|---|---|"]
    for r in sweep:
        lines.append(f"| {r['K']} | {_fmt(r['triton_mem_mb'], '.0f')} | "
                     f"{_fmt(r.get('eager_mem_mb'), '.0f')} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None, help="write the markdown table here too")
    ap.add_argument("--peers", default="triton,matmul,eager,compile,vqp")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_triton needs a CUDA device (the kernels' correctness is tested on CPU "
                 "through TRITON_INTERPRET=1; their speed can only be measured on a GPU)")
    peers = set(args.peers.split(","))
    rows = []
    for case in (QUICK if args.quick else CASES):
        rows.append(run_case(*case, peers))
        print(rows[-1], flush=True)
    sweep = k_sweep(peers) if not args.quick else []
    text = report(rows, sweep)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
