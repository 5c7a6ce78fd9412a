"""The codebook experiment: `python -m vqkernels.sweep` trains a VQ-VAE for every pair of codebook
size K and code size D (the seed's 4x4 grid of {64, 128, 256, 512} by default) and compares them.

Each run is `python -m vqkernels.train` in its own folder, in two phases: up to --early-step (its
reconstructions are kept as the "early" picture), then resumed to --steps. Resuming is exact, so
the two phases make the same run as one would. As many runs go at once as --jobs says (default:
one per core, each with one thread). The sweep is resumable: a finished run (its eval.json
written) is skipped, a killed one continues from its checkpoint, and a failed one is reported in
the summary without stopping the others.

Writes into --out:
  K{K}-D{D}-H{H}[-long][-sS]/  one training run each (see `python -m vqkernels.train --help`);
                             -sS for --seeds other than 0
  summary.csv, summary.md    K, D, hidden, seed, held-out MSE, normalized MSE, VQ loss, perplexity,
                             codes used %, seconds per step -- and failed runs with their error
  fig5_curves_by_K.png       recon and VQ loss curves, one line per K, a panel per D (Figure 5;
                             the first seed's runs)
  fig5_curves_by_D.png       the same, one line per D, a panel per K
  fig6_heatmap.png           held-out normalized MSE over (K, D), values in the cells (Figure 6);
                             with several --seeds the mean, each seed's value under it
  fig6_usage.png             codes used (%) over (K, D)
  fig7_best_early.png        the best pair's reconstructions at --early-step (Figure 7)
  fig8_best_late.png         the best pair's reconstructions at the end (Figure 8)
  hidden.png                 with several --hidden: normalized MSE against encoder/decoder width
  long.png                   with --long-steps: small-K runs trained longer against the grid's
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from . import _cli

GRID = (64, 128, 256, 512)
SUMMARY_FIELDS = ("K", "D", "hidden", "seed", "steps", "status", "mse", "nmse", "vq_loss", "perplexity",
                  "codes_used_pct", "s_per_step", "error")


@dataclass
class Run:
    K: int
    D: int
    hidden: int
    steps: int
    tag: str = ""
    seed: int = 0
    result: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return (f"K{self.K}-D{self.D}-H{self.hidden}" + (f"-{self.tag}" if self.tag else "")
                + (f"-s{self.seed}" if self.seed else ""))


def build_parser() -> argparse.ArgumentParser:
    p = _cli.ArgumentParser(prog="python -m vqkernels.sweep", description=__doc__,
                                formatter_class=_cli.DefaultsHelpFormatter)
    p.add_argument("--codes", type=int, nargs="+", default=list(GRID), help="values of K")
    p.add_argument("--dims", type=int, nargs="+", default=list(GRID), help="values of D")
    p.add_argument("--hidden", type=int, nargs="+", default=[128],
                   help="encoder/decoder widths: several make a third sweep axis")
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="training seeds: each run is made once per seed, and the tables and "
                        "heatmaps report the mean (seed spread is the yardstick for differences "
                        "between pairs) [0]")
    p.add_argument("--steps", type=int, default=2000, help="training steps per run")
    p.add_argument("--early-step", type=int, default=None,
                   help="step of the 'early' reconstructions (default: a tenth of --steps)")
    p.add_argument("--long-steps", type=int, default=0,
                   help="also train the --long-codes runs (at every D) for this many steps")
    p.add_argument("--long-codes", type=int, nargs="+", default=[64, 128],
                   help="the small K values trained longer with --long-steps")
    p.add_argument("--jobs", type=int, default=None, help="runs at once [one per core]")
    p.add_argument("--out", default="runs/sweep", help="output folder [runs/sweep]")
    p.add_argument("--python", default=sys.executable, help=argparse.SUPPRESS)
    p.add_argument("train_args", nargs=argparse.REMAINDER,
                   help="after --: more flags for every training run, e.g. -- --data folder "
                        "--data-dir DIR --batch-size 32")
    return p


def _train_cmd(a, run: Run, steps: int, resume: bool) -> list[str]:
    extra = [x for x in a.train_args if x != "--"]
    cmd = [a.python, "-m", "vqkernels.train", "--num-codes", str(run.K), "--code-dim", str(run.D),
           "--hidden", str(run.hidden), "--steps", str(steps), "--seed", str(run.seed),
           "--out", str(a.out / run.name)]
    return cmd + (["--resume"] if resume else []) + extra


def _read_csv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _run_one(a, run: Run, threads: int) -> Run:
    d = a.out / run.name
    if (d / "eval.json").exists() and (d / "early_reconstructions.png").exists():
        done = json.loads((d / "eval.json").read_text())
        if int(done.get("step", run.steps)) >= run.steps:
            run.result = _collect(d, run, "done (skipped)")
            return run
    # torch takes its thread count from OMP_NUM_THREADS: jobs x threads stays within the cores.
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    early = min(a.early_step or max(1, run.steps // 10), run.steps)
    d.mkdir(parents=True, exist_ok=True)
    log = open(d / "sweep.log", "a")
    try:
        for target, keep_early in ((early, True), (run.steps, False)):
            if keep_early and (d / "early_reconstructions.png").exists():
                continue
            if not keep_early and target == early:
                break  # the early phase was the whole run
            resume = (d / "checkpoint.pt").exists()
            t0 = time.time()
            proc = subprocess.run(_train_cmd(a, run, target, resume), env=env, stdout=log,
                                  stderr=subprocess.PIPE, text=True)
            log.write(proc.stderr[-20000:])
            if proc.returncode != 0:
                tail = " | ".join(l for l in proc.stderr.strip().splitlines()[-3:])
                run.result = {"status": "failed", "error": f"exit {proc.returncode}: {tail}"}
                return run
            if keep_early and (d / "reconstructions.png").exists():
                shutil.copyfile(d / "reconstructions.png", d / "early_reconstructions.png")
            print(f"[sweep] {run.name}: reached step {target} ({time.time() - t0:.0f}s)",
                  flush=True)
    finally:
        log.close()
    run.result = _collect(d, run, "done")
    return run


def _collect(d: Path, run: Run, status: str) -> dict:
    ev = json.loads((d / "eval.json").read_text())
    rows = _read_csv(d / "metrics.csv")
    tail = rows[-max(1, len(rows) // 10):] if rows else []
    vq = (sum(float(r["vq_loss"]) for r in tail) / len(tail)) if tail else float("nan")
    speeds = [float(r["steps_per_s"]) for r in rows if r.get("steps_per_s") not in (None, "", "nan")]
    sps = (len(speeds) / sum(1 / s for s in speeds if s > 0)) if speeds else float("nan")
    return {"status": status, "mse": ev.get("mse"), "nmse": ev.get("nmse"), "vq_loss": vq,
            "perplexity": ev.get("perplexity"), "codes_used_pct": 100 * float(ev.get("codes_used", 0)),
            "s_per_step": 1 / sps if sps == sps and sps > 0 else float("nan"), "error": ""}


def write_summary(out: Path, runs: list[Run]) -> None:
    rows = []
    for r in runs:
        row = {"K": r.K, "D": r.D, "hidden": r.hidden, "seed": r.seed, "steps": r.steps,
               **r.result}
        rows.append({k: row.get(k, "") for k in SUMMARY_FIELDS})
    tmp = out / "summary.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=SUMMARY_FIELDS)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, out / "summary.csv")

    def fmt(v, spec):
        return format(v, spec) if isinstance(v, (int, float)) and v == v else str(v or "–")

    lines = ["| K | D | hidden | seed | steps | held-out MSE | normalized MSE | VQ loss | "
             "perplexity | codes used % | s/step | status |", "|" + "---:|" * 11 + "---|"]
    for r in sorted(rows, key=lambda r: (r["hidden"], r["steps"], r["K"], r["D"], r["seed"])):
        status = r["status"] if r["status"] != "failed" else f"failed: {r['error']}"
        lines.append(f"| {r['K']} | {r['D']} | {r['hidden']} | {r['seed']} | {r['steps']} | "
                     f"{fmt(r['mse'], '.5f')} | {fmt(r['nmse'], '.4f')} | {fmt(r['vq_loss'], '.4f')} | "
                     f"{fmt(r['perplexity'], '.1f')} | {fmt(r['codes_used_pct'], '.1f')} | "
                     f"{fmt(r['s_per_step'], '.3f')} | {status} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def _ok(runs):
    return [r for r in runs if r.result.get("status", "").startswith("done")]


def _mean_by(runs, key, col="nmse"):
    """{key(run): (mean of col over the runs sharing it, [each run's value])}"""
    groups: dict = {}
    for r in runs:
        groups.setdefault(key(r), []).append(float(r.result[col]))
    return {k: (sum(v) / len(v), v) for k, v in groups.items()}


def log_limits(ax, series) -> None:
    """Log y axis with limits from the data: the top from the runs after their first 5% of steps
    (one run that blows up at the start would otherwise flatten every other line), the bottom
    from every positive value drawn. The scale is set first: limits chosen on a linear axis
    (where autoscaling pads below 0) leave a log axis empty."""
    ax.set_yscale("log")
    def positive(ys):
        return [float(y) for y in ys if math.isfinite(y) and y > 0]

    every = [y for _, ys in series for y in positive(ys)]
    tails = [y for _, ys in series for y in positive(ys[len(ys) // 20:])]
    if not every:
        return
    lo, hi = min(every), max(tails or every)
    hi = max(hi, lo)
    # A factor on each side on a log axis; equal values still get a visible band.
    ax.set_ylim(lo / 1.25, hi * 1.5)


def make_figures(a, grid: list[Run], extra: list[Run]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out = a.out
    main_h = a.hidden[0]
    every_seed = [r for r in _ok(grid) if r.hidden == main_h]
    if not every_seed:
        return
    first = min(r.seed for r in every_seed)
    ok = [r for r in every_seed if r.seed == first]  # curves and pictures: one run per pair

    def curves(run, col):
        rows = _read_csv(out / run.name / "metrics.csv")
        xs = [int(r["step"]) for r in rows]
        ys = [float(r[col]) for r in rows]
        k = max(1, len(ys) // 50)  # light smoothing: a moving mean over ~2% of the run
        ys = np.convolve(ys, np.ones(k) / k, mode="valid") if len(ys) >= k else ys
        return xs[len(xs) - len(ys):], ys

    for by, other in (("K", "D"), ("D", "K")):
        panels = sorted({getattr(r, other) for r in ok})
        fig, axes = plt.subplots(2, len(panels), figsize=(3.2 * len(panels), 5.5), squeeze=False)
        for j, pv in enumerate(panels):
            drawn = ([], [])
            for r in sorted((r for r in ok if getattr(r, other) == pv), key=lambda r: getattr(r, by)):
                for i, col in enumerate(("recon_mse", "vq_loss")):
                    xs, ys = curves(r, col)
                    axes[i, j].plot(xs, ys, label=f"{by}={getattr(r, by)}", lw=1)
                    drawn[i].append((xs, ys))
            for i in range(2):
                log_limits(axes[i, j], drawn[i])
            axes[0, j].set_title(f"{other}={pv}")
            axes[1, j].set_xlabel("step")
            for i, lab in enumerate(("recon MSE", "VQ loss")):
                axes[i, 0].set_ylabel(lab)
            axes[0, j].legend(fontsize=7)
        fig.suptitle(f"training curves, one line per {by} (hidden {main_h})")
        fig.tight_layout(rect=(0, 0, 1, 0.95))  # leave the suptitle its own band
        fig.savefig(out / f"fig5_curves_by_{by}.png", dpi=100)
        plt.close(fig)

    Ks, Ds = sorted({r.K for r in ok}), sorted({r.D for r in ok})
    seeds = sorted({r.seed for r in every_seed})
    for fname, key, title, cmap in (("fig6_heatmap.png", "nmse", "held-out normalized MSE", "viridis_r"),
                                    ("fig6_usage.png", "codes_used_pct", "codes used (%)", "viridis")):
        means = _mean_by(every_seed, lambda r: (r.K, r.D), key)
        m = np.full((len(Ks), len(Ds)), np.nan)
        for (K, D), (v, _) in means.items():
            m[Ks.index(K), Ds.index(D)] = v
        fig, ax = plt.subplots(figsize=(1.5 * len(Ds) + 2, 1.1 * len(Ks) + 1.5))
        im = ax.imshow(m, cmap=cmap)
        spec = ".3f" if key == "nmse" else ".0f"
        for (K, D), (v, each) in means.items():
            i, j = Ks.index(K), Ds.index(D)
            r_, g_, b_, _ = im.cmap(im.norm(v))
            ink = "k" if 0.299 * r_ + 0.587 * g_ + 0.114 * b_ > 0.5 else "w"  # readable on the cell
            several = len(seeds) > 1
            ax.text(j, i - (0.12 if several else 0), format(v, spec), ha="center", va="center",
                    color=ink, fontsize=9)
            if several:
                ax.text(j, i + 0.22, " / ".join(format(x, spec) for x in each), ha="center",
                        va="center", color=ink, fontsize=6)
        ax.set_xticks(range(len(Ds)), [str(d) for d in Ds])
        ax.set_yticks(range(len(Ks)), [str(k) for k in Ks])
        ax.set_xlabel("code size D")
        ax.set_ylabel("codebook size K")
        ax.set_title(f"{title}, {ok[0].steps} steps"
                     + (f", mean of seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else ""))
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=100)
        plt.close(fig)

    pair_means = _mean_by(every_seed, lambda r: (r.K, r.D))
    best_pair = min((k for k in pair_means if any((r.K, r.D) == k for r in ok)),
                    key=lambda k: pair_means[k][0])
    best = next(r for r in ok if (r.K, r.D) == best_pair)
    for src, dst in (("early_reconstructions.png", "fig7_best_early.png"),
                     ("reconstructions.png", "fig8_best_late.png")):
        if (out / best.name / src).exists():
            shutil.copyfile(out / best.name / src, out / dst)

    hid = [r for r in _ok(grid) if not r.tag]
    if len(a.hidden) > 1 and hid:
        fig, ax = plt.subplots(figsize=(6, 4))
        by_h = _mean_by(hid, lambda r: (r.K, r.D, r.hidden))
        for (K, D) in sorted({(r.K, r.D) for r in hid}):
            hs = sorted(h for (k, d, h) in by_h if (k, d) == (K, D))
            line, = ax.plot(hs, [by_h[(K, D, h)][0] for h in hs], "o-", label=f"K{K} D{D}")
            for h in hs:  # each seed's value, when there are several
                if len(by_h[(K, D, h)][1]) > 1:
                    ax.plot([h] * len(by_h[(K, D, h)][1]), by_h[(K, D, h)][1], ".",
                            color=line.get_color(), alpha=0.5)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("encoder/decoder hidden width")
        ax.set_ylabel("held-out normalized MSE")
        ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        fig.savefig(out / "hidden.png", dpi=100)
        plt.close(fig)

    long_ok = [r for r in _ok(extra) if r.seed == first]
    if long_ok:
        fig, ax = plt.subplots(figsize=(6, 4))
        drawn = []
        for r in long_ok:
            base = next((g for g in ok if (g.K, g.D) == (r.K, r.D)), None)
            xs, ys = curves(r, "recon_mse")
            line, = ax.plot(xs, ys, lw=1, label=f"K{r.K} D{r.D}, {r.steps} steps")
            drawn.append((xs, ys))
            if base:
                bx, by_ = curves(base, "recon_mse")
                ax.plot(bx, by_, lw=1, ls="--", color=line.get_color())
        log_limits(ax, drawn)
        ax.set_xlabel("step")
        ax.set_ylabel("recon MSE (dashed: the grid's budget)")
        ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out / "long.png", dpi=100)
        plt.close(fig)


def main(argv=None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    for name in ("codes", "dims", "hidden", "long_codes"):
        if any(v < 1 for v in getattr(a, name)):
            p.error(f"--{name.replace('_', '-')} values must be >= 1")
    if a.steps < 1:
        p.error("--steps must be >= 1")
    if len(set(a.seeds)) != len(a.seeds) or any(v < 0 for v in a.seeds):
        p.error("--seeds must be distinct values >= 0")
    if "--seed" in a.train_args:
        p.error("give seeds with --seeds, not as a training flag after --")
    if a.early_step is not None and not 1 <= a.early_step <= a.steps:
        p.error(f"--early-step must be in [1, --steps={a.steps}]")
    a.out = Path(a.out)
    a.out.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1
    jobs = a.jobs or cores
    threads = max(1, cores // jobs)
    grid = [Run(K, D, H, a.steps, seed=s) for s in a.seeds for H in a.hidden for K in a.codes
            for D in a.dims]
    extra = ([Run(K, D, a.hidden[0], a.long_steps, "long", seed=s) for s in a.seeds
              for K in a.long_codes for D in a.dims] if a.long_steps else [])
    print(f"[sweep] {len(grid) + len(extra)} runs, {jobs} at once with {threads} thread(s) each "
          f"-> {a.out}", flush=True)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for run in pool.map(lambda r: _run_one(a, r, threads), grid + extra):
            msg = run.result.get("status")
            if msg == "failed":
                msg += ": " + run.result["error"]
            print(f"[sweep] {run.name}: {msg}", flush=True)
            write_summary(a.out, grid + extra)
    write_summary(a.out, grid + extra)
    make_figures(a, grid, extra)
    failed = [r for r in grid + extra if r.result.get("status") == "failed"]
    print(f"[sweep] done: {len(grid) + len(extra) - len(failed)} ok, {len(failed)} failed; "
          f"see {a.out / 'summary.md'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
