"""Turn pytest-benchmark JSON into a markdown table and a PNG (GFLOP/s per shape, one bar per
implementation), with the machine, versions and date.

    python benchmarks/report.py out.json [--out benchmarks/results/NAME]   # writes NAME.md, NAME.png
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict


def load(path):
    with open(path) as f:
        data = json.load(f)
    rows = []
    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        if "impl" not in info:
            continue
        rows.append(dict(info, median_ms=1e3 * b["stats"]["median"],
                         min_ms=1e3 * b["stats"]["min"], rounds=b["stats"]["rounds"]))
    return data, rows


def markdown(data, rows, cmd) -> str:
    if not rows:
        return "no benchmark rows\n"
    first = rows[0]
    vers = ", ".join(f"{k} {v}" for k, v in first.get("versions", {}).items())
    out = [f"Machine: {first['machine']}  ", f"Versions: {vers}, Python "
           f"{data.get('machine_info', {}).get('python_version', '?')}  ",
           f"Date: {first['date']}  ", f"Command: `{cmd}`", ""]
    ceiling = {r["device"]: r["gflops"] for r in rows if r["impl"] == "matmul"}
    if ceiling:
        out += ["Bare GEMM rate measured in the same run: " + ", ".join(
            f"{d}: {g:.0f} GFLOP/s" for d, g in ceiling.items()), ""]
    out += ["| shape N×K×D | dtype | mode | impl | median ms | GFLOP/s | vs best peer | peak extra MiB |",
            "|---|---|---|---|---:|---:|---:|---:|"]
    groups = defaultdict(list)
    for r in rows:
        if r["impl"] != "matmul":
            groups[(r["N"], r["K"], r["D"], r["dtype"], r["mode"])].append(r)
    for key in sorted(groups):
        rs = sorted(groups[key], key=lambda r: r["median_ms"])
        peers = [r["median_ms"] for r in rs if not r["impl"].startswith("vqk-")]
        best_peer = min(peers) if peers else None
        for r in rs:
            rel = f"{best_peer / r['median_ms']:.2f}×" if best_peer else "–"
            mem = r.get("peak_extra_mb")
            out.append(f"| {key[0]}×{key[1]}×{key[2]} | {key[3]} | {key[4]} | {r['impl']} | "
                       f"{r['median_ms']:.2f} | {r['gflops']:.1f} | {rel} | "
                       f"{'n/a' if mem is None else f'{mem:.1f}'} |")
    out += ["", "'vs best peer': the fastest non-vqkernels implementation's median time divided by "
            "this one's (above 1 is faster than every peer). Peak extra memory is what torch "
            "allocated during one call (memory allocated outside torch, e.g. by FAISS, shows n/a)."]
    return "\n".join(out) + "\n"


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fwd = [r for r in rows if r["mode"] == "fwd" and r["impl"] != "matmul"]
    shapes = sorted({(r["N"], r["K"], r["D"], r["dtype"]) for r in fwd})
    impls = sorted({r["impl"] for r in fwd})
    if not shapes:
        return
    fig, ax = plt.subplots(figsize=(max(8, 1.4 * len(shapes)), 4.5))
    w = 0.8 / max(len(impls), 1)
    for i, impl in enumerate(impls):
        vals = []
        for s in shapes:
            m = [r["gflops"] for r in fwd if (r["N"], r["K"], r["D"], r["dtype"]) == s and r["impl"] == impl]
            vals.append(m[0] if m else 0)
        ax.bar([j + i * w for j in range(len(shapes))], vals, w, label=impl)
    ax.set_xticks([j + 0.4 - w / 2 for j in range(len(shapes))])
    ax.set_xticklabels([f"{n}×{k}×{d}\n{t}" for n, k, d, t in shapes], fontsize=8)
    ax.set_ylabel("search GFLOP/s (2NKD / time), forward")
    ax.set_title(rows[0]["machine"], fontsize=9)
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("json")
    ap.add_argument("--out", help="output path without extension (default: next to the JSON)")
    ap.add_argument("--cmd", default="pytest benchmarks/ --benchmark-only", help="command to record")
    args = ap.parse_args(argv)
    data, rows = load(args.json)
    base = args.out or os.path.splitext(args.json)[0]
    with open(base + ".md", "w") as f:
        f.write(markdown(data, rows, args.cmd))
    try:
        plot(rows, base + ".png")
    except ImportError as exc:
        print(f"no PNG: {exc}", file=sys.stderr)
    print(f"wrote {base}.md" + (f" and {base}.png" if os.path.exists(base + '.png') else ""))


if __name__ == "__main__":
    main()
