"""Figures, table and checks of the VQ / residual VQ / grouped VQ comparison (README.md here).

    python docs/results/cifar10-quantizers/make_page.py RUNS_DIR --data-dir DIR [--out DIR]

RUNS_DIR holds one `python -m vqkernels.train` output folder per variant (RUNS below; the
commands are in README.md); --data-dir is the folder of CIFAR-10 JPEGs they trained on (for the
reconstruction grid). Writes into --out (default: this folder): each run's small files
(config.json, metrics.csv, eval.csv, eval.json) under <run>/, curves.png, reconstructions.png,
table.md (held-out figures and issue 15's check). Checkpoints stay in RUNS_DIR.
"""
import argparse
import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np

RUNS = [  # folder, label
    ("vq4096", "VQ, K=4096 (12 bits)"),
    ("rvq2x64", "residual VQ, 2 stages x K=64 (12 bits)"),
    ("gvq2x64", "grouped VQ, 2 groups x K=64 (12 bits)"),
]
SMALL_FILES = ("config.json", "metrics.csv", "eval.csv", "eval.json")


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def books(row_or_header, n_books):
    return [f"codes_used_{i}" for i in range(n_books)] if n_books > 1 else ["codes_used"]


def issue15_check(metrics, K, n_books):
    """Issue 15's criterion on the logged rows: after step 10 every codebook uses >= K/2 codes in
    each logged interval, and no logged reconstruction loss exceeds 3x the running median (the
    median of the rows logged so far, this one included). Returns (passed, lowest codes used per
    book after step 10, largest loss / running median after step 10)."""
    cols = books(metrics[0], n_books)
    recon = [float(r["recon_mse"]) for r in metrics]
    low, worst = [], 0.0
    for i, r in enumerate(metrics):
        if int(r["step"]) <= 10:
            continue
        low.append(min(int(r[c]) for c in cols))
        worst = max(worst, recon[i] / float(np.median(recon[:i + 1])))
    lowest = [min(int(r[c]) for r in metrics if int(r["step"]) > 10) for c in cols]
    return min(low) >= K / 2 and worst <= 3.0, lowest, worst


def main():
    p = argparse.ArgumentParser()
    p.add_argument("runs")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--out", default=str(Path(__file__).parent))
    p.add_argument("--first45", default=None,
                   help="folder of the same runs' first 45 steps logged every step (--log-every 1"
                        " --steps 45): issue 15's check per step, copied as "
                        "<run>/first45_metrics.csv")
    a = p.parse_args()
    runs_dir, out = Path(a.runs), Path(a.out)
    runs = []
    for name, label in RUNS:
        d = runs_dir / name
        if not (d / "metrics.csv").exists():
            print(f"skipping {name}: no metrics.csv in {d}", file=sys.stderr)
            continue
        cfg = json.loads((d / "config.json").read_text())["config"]
        ev_json = json.loads((d / "eval.json").read_text()) if (d / "eval.json").exists() else None
        first = Path(a.first45) / name / "metrics.csv" if a.first45 else None
        runs.append(dict(name=name, label=label, dir=d, cfg=cfg, ev_json=ev_json,
                         metrics=read_csv(d / "metrics.csv"), eval=read_csv(d / "eval.csv"),
                         n=cfg.get("stages", 1) * cfg.get("groups", 1),
                         first=read_csv(first) if first and first.exists() else None))
        (out / name).mkdir(parents=True, exist_ok=True)
        for f in SMALL_FILES:
            if (d / f).exists():
                shutil.copyfile(d / f, out / name / f)
        if runs[-1]["first"]:
            shutil.copyfile(first, out / name / "first45_metrics.csv")
    curves(runs, out / "curves.png")
    recon_grid(runs, Path(a.data_dir), out / "reconstructions.png")
    (out / "table.md").write_text(table(runs))
    print((out / "table.md").read_text())


def _smooth(v, w=8):
    v = np.asarray(v, float)
    if len(v) < w:
        return v
    return np.convolve(v, np.ones(w) / w, mode="valid")


def curves(runs, path):
    from matplotlib.figure import Figure
    fig = Figure(figsize=(15, 4.2), dpi=100)
    ax = fig.subplots(1, 3)
    for k, r in enumerate(runs):
        c = f"C{k}"
        step = [int(x["step"]) for x in r["metrics"]]
        nm = [float(x["recon_nmse"]) for x in r["metrics"]]
        sm = _smooth(nm)
        ax[0].plot(step[len(step) - len(sm):], sm, color=c, lw=0.8, alpha=0.6)
        ev = [x for x in r["eval"]]
        ax[0].plot([int(x["step"]) for x in ev], [float(x["nmse"]) for x in ev], "o-", color=c,
                   ms=3, label=r["label"])
        K = r["cfg"]["num_codes"]
        for j, col in enumerate(books(None, r["n"])):
            ax[1].plot(step, [int(x[col]) / K for x in r["metrics"]], color=c, lw=0.8,
                       ls=("-", "--", ":")[j % 3],
                       label=f"{r['name']}" + (f" book {j}" if r["n"] > 1 else ""))
        ax[2].plot(step, [int(x["codes_restarted"]) / K for x in r["metrics"]], color=c, lw=0.8,
                   label=r["name"])
    ax[0].set(title="NMSE: held-out (dots), training (line, 8-row mean)", xlabel="step",
              yscale="log")
    ax[0].legend(fontsize=8)
    ax[1].set(title="codes used per logged interval / K, each codebook", xlabel="step",
              ylim=(0, 1.05))
    ax[1].legend(fontsize=7)
    ax[2].set(title="codes restarted per logged interval / K", xlabel="step", yscale="symlog",
              )
    ax[2].set_yscale("symlog", linthresh=1e-3)
    ax[2].legend(fontsize=8)
    for x in ax:
        x.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def recon_grid(runs, data_dir, path, per_class=2):
    """Held-out originals (top row) and each run's reconstructions below, `per_class` images of
    every class, evenly spaced within the class."""
    import torch

    from vqkernels import _io, data
    from vqkernels.train import reconstruct
    ds = data.load("folder", str(data_dir), heldout_every=10)
    labels = np.asarray(ds.heldout_labels)
    pick = []
    for c in np.unique(labels):
        where = np.flatnonzero(labels == c)
        pick += list(where[np.linspace(0, len(where) - 1, per_class + 2).round().astype(int)[1:-1]])
    imgs = ds.heldout[np.array(pick)]
    rows, labels_done = [imgs], []
    torch.set_num_threads(1)
    for r in runs:
        if not (r["dir"] / "checkpoint.pt").exists():
            continue
        ck = _io.load_checkpoint(r["dir"] / "checkpoint.pt")
        model = _io.model_from_checkpoint(ck)
        rows.append(reconstruct(model, imgs, torch.device("cpu")))
        labels_done.append(f"{r['name']} (step {ck['step']})")
    from matplotlib.figure import Figure
    names = ["held-out originals"] + labels_done
    fig = Figure(figsize=(len(imgs) * 0.6 + 1.8, len(rows) * 0.72), dpi=110)
    axes = fig.subplots(len(rows), 1)
    for ax, row, name in zip(axes, rows, names):
        ax.imshow(np.concatenate(list(row), axis=1), interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    fig.subplots_adjust(left=0.14, right=0.995, top=0.98, bottom=0.02, hspace=0.08)
    fig.savefig(path)


def table(runs):
    lines = ["| run | bits / position | step | held-out NMSE | PSNR | codes used (held-out set), "
             "per codebook | perplexity (held-out set), per codebook | issue 15 check |",
             "|---|---:|---:|---:|---:|---|---|---|"]
    for r in runs:
        K, n = r["cfg"]["num_codes"], r["n"]
        ok, lowest, worst = issue15_check(r["metrics"], K, n)
        ev = r["ev_json"]
        if ev is None and not r["eval"]:
            continue
        if ev is None:  # not finished: the last periodic evaluation
            last = r["eval"][-1]
            ev = {"step": int(last["step"]), "nmse": float(last["nmse"]),
                  "psnr": float(last["psnr"]), "codes_used": float(last["codes_used"]),
                  "perplexity": float(last["perplexity"])}
            if n > 1:
                ev["codes_used_per_book"] = [float(last[f"codes_used_{i}"]) for i in range(n)]
                ev["perplexity_per_book"] = [float(last[f"perplexity_{i}"]) for i in range(n)]
        used = ev.get("codes_used_per_book", [ev["codes_used"]])
        ppl = ev.get("perplexity_per_book", [ev["perplexity"]])
        bits = n * np.log2(K)
        lines.append(
            f"| {r['label']} | {bits:g} | {ev['step']} | {ev['nmse']:.4f} | {ev['psnr']:.2f} dB | "
            f"{' / '.join(f'{round(u * K)} of {K}' for u in used)} | "
            f"{' / '.join(f'{p:.0f}' for p in ppl)} | "
            f"{'pass' if ok else 'FAIL'}: lowest codes used per logged interval after step 10 "
            f"{' / '.join(map(str, lowest))} (need >= {K // 2}); largest recon loss / running "
            f"median {worst:.2f} (need <= 3) |")
    if any(r["first"] for r in runs):
        lines += ["", "Issue 15's check per step (the first 45 steps, a metrics row per step):", "",
                  "| run | lowest codes used in a step after step 10, per codebook (need >= K/2) "
                  "| largest recon loss / running median after step 10 | check |",
                  "|---|---|---:|---|"]
        for r in runs:
            if not r["first"]:
                continue
            K = r["cfg"]["num_codes"]
            ok, lowest, worst = issue15_check(r["first"], K, r["n"])
            lines.append(f"| {r['name']} | {' / '.join(map(str, lowest))} of {K} | {worst:.2f} | "
                         f"{'pass' if ok else 'FAIL'} |")
    lines.append("")
    lines.append("Held-out NMSE at each periodic evaluation (1,024 evenly spaced held-out images; "
                 "the final row of each run: all 5,000):")
    lines.append("")
    steps = sorted({int(x["step"]) for r in runs for x in r["eval"]})
    lines.append("| step | " + " | ".join(r["name"] for r in runs) + " |")
    lines.append("|---:|" + "---:|" * len(runs))
    for s in steps:
        vals = []
        for r in runs:
            m = [float(x["nmse"]) for x in r["eval"] if int(x["step"]) == s]
            vals.append(f"{m[-1]:.4f}" if m else "")
        lines.append(f"| {s} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
