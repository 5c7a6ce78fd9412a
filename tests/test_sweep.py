"""The K x D sweep end to end on a tiny budget, with the real training CLI."""
import csv
import subprocess
import sys

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("skimage")

FIGS = ["fig5_curves_by_K.png", "fig5_curves_by_D.png", "fig6_heatmap.png", "fig6_usage.png",
        "fig7_best_early.png", "fig8_best_late.png"]
RUN_FILES = ["checkpoint.pt", "metrics.csv", "eval.json", "reconstructions.png",
             "early_reconstructions.png", "loss_curves.png"]


def _sweep(out, *extra):
    cmd = [sys.executable, "-m", "vqkernels.sweep", "--codes", "8", "16", "--dims", "4", "8",
           "--steps", "4", "--early-step", "2", "--jobs", "2", "--out", str(out), *extra,
           "--", "--eval-every", "0", "--save-every", "2", "--batch-size", "8", "--log-every", "1",
           "--eval-images", "32"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900)


def _summary(out):
    with open(out / "summary.csv") as f:
        return {(int(r["K"]), int(r["D"])): r for r in csv.DictReader(f)}


def test_grid_resume_and_failure(tmp_path):
    out = tmp_path / "sweep"
    p = _sweep(out)
    assert p.returncode == 0, p.stdout + p.stderr
    for f in FIGS + ["summary.csv", "summary.md"]:
        assert (out / f).stat().st_size > 0, f
    rows = _summary(out)
    assert set(rows) == {(8, 4), (8, 8), (16, 4), (16, 8)}
    for (K, D), r in rows.items():
        assert r["status"] == "done"
        assert 0 < float(r["nmse"]) < 10 and 0 < float(r["codes_used_pct"]) <= 100
        assert 1 <= float(r["perplexity"]) <= K
        for f in RUN_FILES:
            assert (out / f"K{K}-D{D}-H128" / f).exists(), (K, D, f)
    md = (out / "summary.md").read_text()
    assert md.count("| done |") == 4

    # Resume: finished runs are skipped. A run whose checkpoint is corrupt and whose result is gone
    # fails alone, is reported, and does not stop the others.
    bad = out / "K16-D8-H128"
    (bad / "eval.json").unlink()
    (bad / "checkpoint.pt").write_bytes(b"not a checkpoint")
    p = _sweep(out)
    assert p.returncode == 1
    rows = _summary(out)
    assert rows[(16, 8)]["status"] == "failed" and rows[(16, 8)]["error"]
    for key in [(8, 4), (8, 8), (16, 4)]:
        assert rows[key]["status"] == "done (skipped)"
    assert "K16-D8-H128: failed" in p.stdout
    assert "failed: exit" in (out / "summary.md").read_text()


def test_seeds_axis(tmp_path):
    """--seeds trains each pair once per seed (the seed reaches the run), the summary lists every
    seed, and the figures use their mean; a --seed among the training flags is refused."""
    out = tmp_path / "seeds"
    cmd = [sys.executable, "-m", "vqkernels.sweep", "--codes", "8", "--dims", "4", "--seeds", "0",
           "3", "--steps", "3", "--early-step", "1", "--jobs", "2", "--out", str(out), "--",
           "--eval-every", "0", "--batch-size", "8", "--log-every", "1", "--eval-images", "32"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout + p.stderr
    with open(out / "summary.csv") as f:
        rows = {int(r["seed"]): r for r in csv.DictReader(f)}
    assert set(rows) == {0, 3} and all(r["status"] == "done" for r in rows.values())
    import json
    for seed, name in ((0, "K8-D4-H128"), (3, "K8-D4-H128-s3")):
        cfg = json.loads((out / name / "config.json").read_text())
        assert cfg["args"]["seed"] == seed
    assert rows[0]["nmse"] != rows[3]["nmse"]  # different seeds, different runs
    for f in FIGS:
        assert (out / f).stat().st_size > 0, f
    bad = subprocess.run(cmd[:cmd.index("--")] + ["--", "--seed", "2"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "--seeds" in bad.stderr


@pytest.mark.parametrize("blowup", [False, True])
def test_curve_axes_hold_data_spanning_decades(blowup):
    # Curves from 1e3 down to 1e-3 (a VQ loss that starts large and settles): the log axis must
    # show them, its limits positive and around the lines (issue 15: limits set while the axis was
    # still linear left panels empty).
    from matplotlib.figure import Figure

    from vqkernels.sweep import log_limits
    xs = list(range(200))
    series = [(xs, [1e3 * 0.93 ** i + 1e-3 for i in xs]), (xs, [5.0 / (1 + i) for i in xs])]
    if blowup:  # one run that spikes in its first steps must not flatten the others
        series.append((xs, [1e9 if i < 3 else 0.5 for i in xs]))
    ax = Figure().subplots()
    for x, y in series:
        ax.plot(x, y)
    log_limits(ax, series)
    lo, hi = ax.get_ylim()
    assert ax.get_yscale() == "log"
    assert 0 < lo < hi
    tails = [y for _, ys in series for y in ys[10:]]
    assert lo <= min(tails) and max(tails) <= hi
    assert hi < 1e5  # the spike is clipped, the settled values are not squashed
    assert hi / lo < 1e9


def test_help_shows_defaults_and_module_names():
    from vqkernels import sweep
    h = sweep.build_parser().format_help()
    assert "[2000]" in h and "[64 128 256 512]" in h and "[runs/sweep]" in h
    r = subprocess.run([sys.executable, "-m", "vqkernels.demo", "--help"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("usage: python -m vqkernels.demo")
    assert "[512]" in r.stdout  # --num-codes's default
