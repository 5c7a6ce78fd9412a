"""`python -m vqkernels.runcheck RUN...`: does a training run keep its codes, without loss spikes?

Issue 15's criterion for a run of `python -m vqkernels.train`, read from its metrics.csv: after
the first --skip-steps steps (10), every logged row has

  codes_used >= --min-used x K            (half of the codebook; K from the run's config.json)
  recon_nmse <= --spike x median(recon_nmse of every logged row up to and including this one)

(recon_mse where an older metrics.csv has no recon_nmse column; the ratio is the same). The
trainer logs both over each --log-every interval (codes used in any step of it, the mean loss), so
the check is only as fine as the run's logging: a dip or a spike inside a 50-step interval is
invisible, and the summary says how far apart the rows are. For the criterion itself, log every
step (`--log-every 1`) or every few. A RUN is
the run's --out folder or a metrics CSV file beside its config.json. Prints one line per run and
where the criterion first fails; exit status 0 when every run meets it, 1 when one does not, 2 on
a run that cannot be read.
"""
from __future__ import annotations

import argparse
import bisect
import csv
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from . import _cli


@dataclass
class RunCheck:
    """The criterion's outcome for one run. `failures` lists (step, what) for every failing row."""
    run: str
    num_codes: int
    rows_checked: int
    min_codes_used: int | None = None     # over the rows checked
    max_spike_ratio: float | None = None  # recon / running median, over the rows checked
    failures: list[tuple[int, str]] = field(default_factory=list)
    interval: int | None = None           # steps between logged rows (the largest gap)

    @property
    def ok(self) -> bool:
        return self.rows_checked > 0 and not self.failures

    def summary(self) -> str:
        if self.rows_checked == 0:
            return f"{self.run}: NO ROWS after the skipped steps (nothing to judge)"
        head = (f"{self.run}: {'meets' if self.ok else 'FAILS'} the criterion over "
                f"{self.rows_checked} logged rows (K={self.num_codes}; fewest codes used "
                f"{self.min_codes_used}, worst reconstruction {self.max_spike_ratio:.2f}x its "
                f"running median; rows {self.interval} step(s) apart)")
        if self.ok:
            return head
        step, what = self.failures[0]
        return f"{head}; first failure at step {step}: {what}; {len(self.failures)} failing rows"


def _num_codes(config: dict, where: Path) -> int:
    for part in ("config", "args"):
        k = (config.get(part) or {}).get("num_codes")
        if isinstance(k, int) and not isinstance(k, bool) and k >= 1:
            return k
    raise ValueError(f"{where} names no num_codes (expected the config.json of a "
                     f"vqkernels.train run)")


def _paths(run: Path) -> tuple[Path, Path]:
    if run.is_dir():
        return run / "metrics.csv", run / "config.json"
    return run, run.parent / "config.json"


def check_rows(rows: list[dict], num_codes: int, *, run: str = "run", skip_steps: int = 10,
               min_used: float = 0.5, spike: float = 3.0) -> RunCheck:
    """The criterion over metrics rows (dicts of strings or numbers, as csv.DictReader gives)."""
    if not rows:
        return RunCheck(run, num_codes, 0)
    col = "recon_nmse" if "recon_nmse" in rows[0] else "recon_mse"
    for need in ("step", "codes_used", col):
        if need not in rows[0]:
            raise ValueError(f"{run}: metrics have no {need!r} column (columns: "
                             f"{', '.join(rows[0])})")
    res = RunCheck(run, num_codes, 0)
    seen: list[float] = []  # sorted recon values so far: the running median
    last = 0
    for r in rows:
        step, used, recon = int(r["step"]), int(float(r["codes_used"])), float(r[col])
        res.interval = max(res.interval or 0, step - last)
        last = step
        bisect.insort(seen, recon)
        n = len(seen)
        median = seen[n // 2] if n % 2 else (seen[n // 2 - 1] + seen[n // 2]) / 2
        if step <= skip_steps:
            continue
        res.rows_checked += 1
        ratio = recon / median if median > 0 else (0.0 if recon == 0 else float("inf"))
        res.min_codes_used = used if res.min_codes_used is None else min(res.min_codes_used, used)
        res.max_spike_ratio = ratio if res.max_spike_ratio is None else max(res.max_spike_ratio,
                                                                            ratio)
        whats = []
        if used < min_used * num_codes:
            whats.append(f"{used} codes used < {min_used:g} x K = {min_used * num_codes:g}")
        if not ratio <= spike:  # NaN fails too
            whats.append(f"{col} {recon:.4g} = {ratio:.2f}x its running median {median:.4g}")
        if whats:
            res.failures.append((step, "; ".join(whats)))
    return res


def check_run(run, *, skip_steps: int = 10, min_used: float = 0.5,
              spike: float = 3.0) -> RunCheck:
    """The criterion for a run folder (or a metrics CSV beside its config.json)."""
    run = Path(run)
    if not run.exists():
        raise FileNotFoundError(f"{run} does not exist")
    metrics, config = _paths(run)
    for p in (metrics, config):
        if not p.is_file():
            raise FileNotFoundError(f"{run}: no {p.name} there (expected a vqkernels.train --out "
                                    f"folder or a metrics CSV beside its config.json)")
    try:
        K = _num_codes(json.loads(config.read_text()), config)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config} is not JSON: {exc}") from exc
    with open(metrics, newline="") as f:
        rows = list(csv.DictReader(f))
    return check_rows(rows, K, run=str(run), skip_steps=skip_steps, min_used=min_used,
                      spike=spike)


def build_parser() -> argparse.ArgumentParser:
    p = _cli.ArgumentParser(prog="python -m vqkernels.runcheck",
                            description="Check issue 15's criterion on training runs: after the "
                            "first steps, codes used never below half of K and no logged "
                            "reconstruction loss above 3x its running median.")
    p.add_argument("runs", nargs="+", metavar="RUN",
                   help="a vqkernels.train --out folder, or a metrics CSV beside its config.json")
    p.add_argument("--skip-steps", type=int, default=10,
                   help="rows at or before this step are not judged (they still count in the "
                        "running median) [10]")
    p.add_argument("--min-used", type=float, default=0.5,
                   help="fewest codes used per logged row, as a fraction of K [0.5]")
    p.add_argument("--spike", type=float, default=3.0,
                   help="largest reconstruction loss, as a multiple of its running median [3]")
    p.add_argument("-v", "--verbose", action="store_true", help="list every failing row")
    return p


def main(argv=None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    if a.skip_steps < 0:
        p.error(f"--skip-steps must be >= 0, got {a.skip_steps}")
    if not 0 <= a.min_used <= 1:
        p.error(f"--min-used must be a fraction in [0, 1], got {a.min_used}")
    if not a.spike > 0:
        p.error(f"--spike must be > 0, got {a.spike}")
    status = 0
    for run in a.runs:
        try:
            res = check_run(run, skip_steps=a.skip_steps, min_used=a.min_used, spike=a.spike)
        except (OSError, ValueError) as exc:
            print(f"{run}: cannot check: {exc}", file=sys.stderr)
            status = 2
            continue
        print(res.summary())
        if a.verbose:
            for step, what in res.failures:
                print(f"  step {step}: {what}")
        if not res.ok:
            status = max(status, 1)
    return status


if __name__ == "__main__":
    sys.exit(main())
