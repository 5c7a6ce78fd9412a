"""The CPU kernel issue's table from test_bench_cpu.py's JSON: one row per shape, peers side by side.

    python benchmarks/cpu_table.py cpu.json [--cmd "the command that made it"] > benchmarks/results/cpu.md
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict

IMPLS = ["faiss", "torch-eager", "vqk-cpu", "vqk-cpu-search", "matmul"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("json")
    ap.add_argument("--cmd", default="pytest benchmarks/test_bench_cpu.py --benchmark-only "
                    "--benchmark-json=cpu.json && python benchmarks/cpu_table.py cpu.json")
    ap.add_argument("--load", default=None, help="machine load during the run (e.g. uptime output)")
    args = ap.parse_args(argv)
    with open(args.json) as f:
        data = json.load(f)
    cases = defaultdict(dict)
    first = None
    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        if "impl" not in info:
            continue
        first = first or info
        st = b["stats"]
        cases[(info["N"], info["K"], info["D"])][info["impl"]] = dict(
            info, median_ms=1e3 * st["median"], min_ms=1e3 * st["min"], rounds=st["rounds"])
    if not first:
        print("no benchmark rows")
        return
    vers = ", ".join(f"{k} {v}" for k, v in first.get("versions", {}).items())
    isa = next((r[i]["cpu_isa"] for r in cases.values() for i in r if "cpu_isa" in r[i]), "?")
    out = [f"Machine: {first['machine']}, vqkernels CPU kernels: {isa}  ",
           f"Versions: {vers}, Python {data.get('machine_info', {}).get('python_version', '?')}  ",
           f"Date: {first['date']}  "]
    if args.load:
        out.append(f"Load during the run: {args.load}  ")
    out += [f"Command: `{args.cmd}`", "",
            "Median ms of each (min in parentheses), forward, float32. vqk-cpu is the whole job "
            "(search, gather, exact errors, losses, straight-through output); vqk-cpu-search and "
            "FAISS return indices and distances only. GFLOP/s = 2·N·K·D / median time. "
            "Peak MiB: growth of the process's resident set during one call "
            "(includes memory allocated outside torch).", "",
            "| N×K×D | FAISS ms | torch eager ms | vqk-cpu ms | vqk-cpu-search ms | vqk-cpu / FAISS "
            "| vqk-cpu / eager | vqk-cpu GFLOP/s | FAISS GFLOP/s | sgemm GFLOP/s | peak MiB: vqk-cpu / eager |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def ms(r):
        return f"{r['median_ms']:.2f} ({r['min_ms']:.2f})" if r else "–"

    def ratio(a, b):
        return f"{a['median_ms'] / b['median_ms']:.2f}×" if a and b else "–"

    def mem(r):
        v = r.get("peak_rss_extra_mb") if r else None
        return "–" if v is None else f"{v:.0f}"

    for (N, K, D) in sorted(cases, key=lambda s: (s[0] * s[1] * s[2], s)):
        c = cases[(N, K, D)]
        f, e, q, s, m = (c.get(i) for i in IMPLS)
        out.append(f"| {N}×{K}×{D} | {ms(f)} | {ms(e)} | {ms(q)} | {ms(s)} | {ratio(q, f)} | "
                   f"{ratio(q, e)} | {q['gflops']:.0f} | {f['gflops'] if f else 0:.0f} | "
                   f"{m['gflops'] if m else 0:.0f} | {mem(q)} / {mem(e)} |")
    print("\n".join(out))


if __name__ == "__main__":
    main()
