"""vqkernels.runcheck: issue 15's criterion (codes used >= K/2 and no reconstruction loss above 3x
its running median after the first 10 steps) on synthetic metrics."""
import csv
import json

import pytest

from vqkernels import runcheck

FIELDS = ("step", "recon_nmse", "codes_used")


def write_run(path, rows, K=100, fields=FIELDS):
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"config": {"num_codes": K}, "args": {}}))
    with open(path / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(fields)
        w.writerows(rows)
    return path


def healthy(n=40):
    # a falling loss and a full codebook: the shape of a good run
    return [(s, 1.0 / (1 + 0.1 * s), 90) for s in range(1, n + 1)]


def test_a_healthy_run_meets_it(tmp_path):
    r = runcheck.check_run(write_run(tmp_path / "ok", healthy()))
    assert r.ok and r.rows_checked == 30 and r.min_codes_used == 90 and not r.failures
    assert r.interval == 1
    assert r.max_spike_ratio < 1  # a falling loss stays below its running median


def test_a_codes_dip_fails_where_it_starts(tmp_path):
    rows = healthy()
    rows[0:5] = [(s, v, 3) for s, v, _ in rows[0:5]]  # steps 1-5: ignored, as the issue says
    for i in (20, 21, 22):  # steps 21-23
        rows[i] = (rows[i][0], rows[i][1], 49)
    r = runcheck.check_run(write_run(tmp_path / "dip", rows))
    assert not r.ok and r.min_codes_used == 49
    assert [s for s, _ in r.failures] == [21, 22, 23]
    assert "49 codes used < 0.5 x K = 50" in r.failures[0][1]
    assert "first failure at step 21" in r.summary()
    rows[20:23] = [(s, v, 50) for s, v, _ in rows[20:23]]  # exactly K/2 is enough
    assert runcheck.check_run(write_run(tmp_path / "half", rows)).ok


def test_a_spike_fails_against_the_running_median(tmp_path):
    rows = healthy()
    med = sorted(v for _, v, _ in rows[:30])[14:16]
    rows[29] = (30, 3.2 * sum(med) / 2, 90)  # step 30: > 3x the median of steps 1-30
    r = runcheck.check_run(write_run(tmp_path / "spike", rows))
    assert [s for s, _ in r.failures] == [30] and "recon_nmse" in r.failures[0][1]
    assert r.max_spike_ratio > 3
    rows[29] = (30, 2.9 * sum(med) / 2, 90)
    assert runcheck.check_run(write_run(tmp_path / "bump", rows)).ok
    # a spike within the first 10 steps is not judged; NaN later is a failure
    early = healthy()
    early[4] = (5, 1e4, 90)
    assert runcheck.check_run(write_run(tmp_path / "early", early)).ok
    early[30] = (31, float("nan"), 90)
    assert [s for s, _ in runcheck.check_run(write_run(tmp_path / "nan", early)).failures] == [31]


def test_older_metrics_and_sparse_logging(tmp_path):
    # metrics.csv written before recon_nmse existed: recon_mse; a row every 50 steps
    rows = [(s, 0.05, 400) for s in range(50, 1001, 50)]
    rows[5] = (300, 0.5, 400)
    r = runcheck.check_run(write_run(tmp_path / "old", rows, K=512,
                                     fields=("step", "recon_mse", "codes_used")))
    assert r.rows_checked == 20 and [s for s, _ in r.failures] == [300] and r.interval == 50
    assert "rows 50 step(s) apart" in r.summary()
    assert "recon_mse" in r.failures[0][1]
    # a metrics CSV named directly, beside its run's config.json
    (tmp_path / "old" / "first45.csv").write_text((tmp_path / "old" / "metrics.csv").read_text())
    assert runcheck.check_run(tmp_path / "old" / "first45.csv").failures == r.failures


def test_cli_exit_status_and_errors(tmp_path, capsys):
    good = write_run(tmp_path / "good", healthy())
    bad = write_run(tmp_path / "bad", [(s, 1.0, 10) for s in range(1, 21)])
    assert runcheck.main([str(good)]) == 0
    assert "meets the criterion" in capsys.readouterr().out
    assert runcheck.main([str(good), str(bad), "-v"]) == 1
    out = capsys.readouterr().out
    assert "FAILS" in out and "first failure at step 11" in out and "  step 20:" in out
    assert runcheck.main([str(tmp_path / "missing"), str(good)]) == 2
    assert "missing does not exist" in capsys.readouterr().err
    (good / "metrics.csv").rename(tmp_path / "m.csv")
    assert runcheck.main([str(good)]) == 2
    assert "no metrics.csv there" in capsys.readouterr().err
    (tmp_path / "m.csv").rename(good / "metrics.csv")
    (tmp_path / "nocfg").mkdir()
    (tmp_path / "nocfg" / "metrics.csv").write_text("step,recon_nmse\n1,1\n")
    (tmp_path / "nocfg" / "config.json").write_text("{}")
    assert runcheck.main([str(tmp_path / "nocfg")]) == 2
    assert "num_codes" in capsys.readouterr().err
    for flag, value in (("--min-used", "1.5"), ("--spike", "0"), ("--skip-steps", "-1")):
        with pytest.raises(SystemExit) as exc:
            runcheck.main([str(good), flag, value])
        assert exc.value.code == 2 and flag in capsys.readouterr().err
