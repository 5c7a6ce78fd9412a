"""Table and figure of the K=512 codebook-health runs (see README.md here).

    python docs/results/codebook-k512/make_table.py RUNS_DIR [--out DIR]

RUNS_DIR holds one `python -m vqkernels.train` output folder per variant (run.sh makes them).
"""
import argparse
import csv
import json
import shutil
from pathlib import Path

VARIANTS = [  # folder, codebook update, init, restarts
    ("grad-restart", "gradient", "data", "after 25 steps"),
    ("grad-norestart", "gradient", "data", "never"),
    ("ema-restart", "EMA 0.99", "data", "after 25 steps"),
    ("ema-norestart", "EMA 0.99", "data", "never"),
    ("grad-uniform-norestart", "gradient", "uniform ±1/K", "never"),
]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("runs")
    p.add_argument("--out", default=str(Path(__file__).parent))
    a = p.parse_args()
    runs, out = Path(a.runs), Path(a.out)
    rows = []
    for name, update, init, restarts in VARIANTS:
        d = runs / name
        if not (d / "eval.json").exists():
            continue
        ev = json.loads((d / "eval.json").read_text())
        with open(d / "metrics.csv", newline="") as f:
            m = list(csv.DictReader(f))
        last = m[-1]
        rows.append(dict(name=name, update=update, init=init, restarts=restarts,
                         steps=int(ev["step"]), nmse=ev["nmse"], psnr=ev["psnr"],
                         used=100 * ev["codes_used"], ppl=ev["perplexity"],
                         bppl=ev["batch_perplexity"], dead=100 * float(last["dead_fraction"]),
                         total_restarts=int(float(last["total_restarts"])),
                         sps=sum(float(r["steps_per_s"]) for r in m) / len(m)))
        shutil.copyfile(d / "loss_curves.png", out / f"{name}_curves.png")
        shutil.copyfile(d / "reconstructions.png", out / f"{name}_reconstructions.png")
    lines = ["| codebook update | init | dead-code restart | steps | held-out NMSE | PSNR | "
             "codes used on held-out set | dead (unused ≥ 100 steps) at the end | perplexity "
             "(held-out set / per batch of 32) | restarts |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['update']} | {r['init']} | {r['restarts']} | {r['steps']} | "
                     f"{r['nmse']:.4f} | {r['psnr']:.2f} dB | {r['used']:.1f}% | {r['dead']:.1f}% | "
                     f"{r['ppl']:.0f} / {r['bppl']:.0f} | {r['total_restarts']} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    for name, *_ in VARIANTS:
        d = runs / name
        if not (d / "metrics.csv").exists():
            continue
        with open(d / "metrics.csv", newline="") as f:
            m = list(csv.DictReader(f))
        s = [int(r["step"]) for r in m]
        ax[0].plot(s, [float(r["recon_nmse"]) for r in m], lw=0.8, label=name)
        ax[1].plot(s, [float(r["codes_used"]) for r in m], lw=0.8, label=name)
        ax[2].plot(s, [100 * float(r["dead_fraction"]) for r in m], lw=0.8, label=name)
    ax[0].set(title="training recon MSE / data variance", xlabel="step", yscale="log")
    ax[1].set(title="codes used per 10-step log interval (of 512)", xlabel="step")
    ax[2].set(title="dead codes (unused for 100 steps), %", xlabel="step")
    for x in ax:
        x.grid(alpha=0.3)
    ax[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "usage.png", dpi=100)


if __name__ == "__main__":
    main()
