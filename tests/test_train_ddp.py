"""`torchrun --nproc_per_node=2 -m vqkernels.train` on CPU (gloo): the ranks stay identical, a
2-process run equals one process on the concatenated batches, and a rank that drifts is caught."""
import datetime
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("PIL")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available in this build", allow_module_level=True)

from PIL import Image  # noqa: E402

from vqkernels import _io, train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# --device cpu: gloo on CPU tensors even where a GPU is present (one GPU can't host two ranks).
TINY = ["--device", "cpu", "--hidden", "16", "--residual-hidden", "8", "--num-codes", "16", "--code-dim", "8",
        "--eval-images", "32", "--eval-every", "0", "--log-every", "2"]


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    g = np.random.default_rng(1)
    for i in range(40):
        base = g.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(base).resize((32, 32), Image.Resampling.BILINEAR).save(root / f"{i:02d}.png")
    return root


def _env():
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def torchrun(*args, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "vqkernels.train", *map(str, args)]
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    return p


def single(*args):
    p = subprocess.run([sys.executable, "-m", "vqkernels.train", *map(str, args)], env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    return p


def ckpt(out):
    return _io.load_checkpoint(Path(out) / "checkpoint.pt")


def test_no_warnings_under_torchrun(tmp_path, image_dir):
    # Issue 15: every rank printed "Grad strides do not match bucket view strides" (a
    # channels-last input batch gave the conv weights' gradients other strides than the
    # weights') and, on torch versions that deprecate it, a FutureWarning for broadcast_buffers.
    if not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed has no gloo backend here: torchrun on CPU needs it")
    # Batches of 16: at 4 images a rank, the convolutions happened to give plain strides anyway.
    p = torchrun("--data", "folder", "--data-dir", image_dir, *TINY, "--steps", 2,
                 "--batch-size", 16, "--out", tmp_path / "run")
    for text in ("Grad strides do not match", "broadcast_buffers", "Warning"):
        assert text not in p.stderr, p.stderr[-4000:]


@pytest.mark.parametrize("quantizer", [[], ["--quantizer", "rvq", "--stages", 3, "--quantize-dropout"]],
                         ids=["vq", "rvq-dropout"])
def test_two_processes_equal_one_process_with_the_concatenated_batch(tmp_path, image_dir,
                                                                     quantizer):
    # rvq-dropout: each rank draws its slice of the global batch's stage counts (shard_dropout),
    # as one process draws them for the concatenated batch; the same pattern on both ranks
    # would leave half the images with other stages and the weights ~1e-4 apart.
    common = ["--data", "folder", "--data-dir", image_dir, *TINY, "--steps", 6,
              "--restart-after", 0, "--save-every", 2, *quantizer]
    torchrun(*common, "--batch-size", 4, "--out", tmp_path / "ddp")
    single(*common, "--batch-size", 8, "--out", tmp_path / "one")
    a, b = ckpt(tmp_path / "ddp"), ckpt(tmp_path / "one")
    assert a["world_size"] == 2 and a["args"]["world_size"] == 2 and b["world_size"] == 1
    from vqkernels.model import VQVAE, VQVAEConfig
    torch.manual_seed(0)
    init = VQVAE(VQVAEConfig.from_dict(b["config"])).state_dict()  # the seed-0 start
    moved = 0.0
    for k, v in b["model"].items():
        if not v.is_floating_point():
            assert torch.equal(a["model"][k], v), k
            continue
        # Gradients summed in another order differ in the last bits; six Adam steps of lr 3e-4
        # move each weight by up to ~2e-3, so a bound of 1e-5 still catches a wrong batch or a
        # missing average (those differ by ~1e-4 and more). EMA sums reach ~40 here: their
        # rounding is relative (~3e-7 measured), so rtol 1e-6 on top (a wrong dropout pattern
        # moved them by 1e-2 relative, and the weights by 1e-4 to 1.5e-3).
        torch.testing.assert_close(a["model"][k], v, rtol=1e-6, atol=1e-5, msg=k)
        if k in init and "codebook" not in k:
            moved = max(moved, float((v - init[k]).abs().max()))
    assert moved > 1e-4  # the runs did train: the bound above is not vacuous
    # The logged means are over both ranks' images, as in the single process.
    la = train._read_rows(tmp_path / "ddp" / "metrics.csv", train.METRICS_FIELDS)
    lb = train._read_rows(tmp_path / "one" / "metrics.csv", train.METRICS_FIELDS)
    assert [r["step"] for r in la] == [r["step"] for r in lb] == [2, 4, 6]
    for x, y in zip(la, lb):
        assert x["recon_mse"] == pytest.approx(y["recon_mse"], rel=1e-4)
        assert x["codes_used"] == y["codes_used"]


def test_ema_restarts_kmeans_across_ranks_then_resume(tmp_path, image_dir):
    """Every checkpoint checks that both ranks hold bitwise the same model (EMA buffers,
    restart pool, usage counters included); the run restarts codes; a resumed 2-process run ends
    where an uninterrupted one does."""
    common = ["--data", "folder", "--data-dir", image_dir, *TINY, "--batch-size", 4, "--ema",
              "--codebook-init", "kmeans", "--restart-after", 2, "--dead-after", 2,
              "--save-every", 2]
    torchrun(*common, "--steps", 8, "--out", tmp_path / "a")
    torchrun(*common, "--steps", 4, "--out", tmp_path / "b")
    torchrun("--out", tmp_path / "b", "--resume", "--steps", 8)
    a, b = ckpt(tmp_path / "a"), ckpt(tmp_path / "b")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert int(a["model"]["vq.restart_count"]) > 0
    rows = train._read_rows(tmp_path / "a" / "metrics.csv", train.METRICS_FIELDS)
    assert rows[-1]["total_restarts"] == int(a["model"]["vq.restart_count"])
    assert sum(r["codes_restarted"] for r in rows) == rows[-1]["total_restarts"]
    assert all(0 <= r["dead_fraction"] <= 1 for r in rows)


def test_resume_with_another_process_count_is_refused(tmp_path, image_dir, monkeypatch, capsys):
    out = tmp_path / "r"
    single("--data", "folder", "--data-dir", image_dir, *TINY, "--batch-size", 4, "--steps", 2,
           "--out", out)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit):
        train.main(["--out", str(out), "--resume"])
    assert "1 process(es) and this is 2" in capsys.readouterr().err


def _drift_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        from vqkernels.model import VQVAE, VQVAEConfig
        torch.manual_seed(0)
        m = VQVAE(VQVAEConfig(num_codes=8, code_dim=4, hidden=8, residual_hidden=4))
        d = train.Dist(torch.device("cpu"))
        train.check_ranks_agree(m, d)  # identical copies pass
        if rank == 1:
            with torch.no_grad():
                m.vq.codebook[3, 2] = torch.nextafter(m.vq.codebook[3, 2], torch.tensor(1.0))
        try:
            train.check_ranks_agree(m, d)
            verdict = "passed"
        except RuntimeError as exc:
            verdict = str(exc)
        Path(out_dir, f"verdict{rank}").write_text(verdict)
    finally:
        dist.destroy_process_group()
    from helpers import end_spawned_worker
    end_spawned_worker()


def test_a_rank_that_drifts_by_one_ulp_is_caught_on_every_rank(tmp_path, monkeypatch):
    import torch.multiprocessing as mp
    for k, v in (("WORLD_SIZE", "2"), ("LOCAL_WORLD_SIZE", "2")):
        monkeypatch.setenv(k, v)
    # RANK is read by Dist from the environment: the spawned workers set their own.
    monkeypatch.delenv("RANK", raising=False)
    mp.spawn(_drift_worker_env, args=(2, str(tmp_path / "pg"), str(tmp_path)), nprocs=2, join=True)
    for r in range(2):
        v = (tmp_path / f"verdict{r}").read_text()
        assert "different model states" in v and "vq.codebook" in v, v


def _drift_worker_env(rank, world, init_file, out_dir):
    os.environ["RANK"] = str(rank)
    _drift_worker(rank, world, init_file, out_dir)


def test_a_failed_download_stops_every_rank_promptly(tmp_path):
    """Rank 0 downloads; when that fails, rank 1 must not wait for it (in a barrier, say) until a
    timeout: both ranks stop, each with a clear error, within seconds."""
    import socket
    with socket.socket() as s:  # a port with nothing listening: the connection is refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(_env(), VQK_CIFAR10_URL=f"http://127.0.0.1:{port}/cifar-10-python.tar.gz")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "vqkernels.train", "--data", "cifar10", "--download", "--data-dir",
           str(tmp_path / "c10"), "--out", str(tmp_path / "o"), *map(str, TINY)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    err = p.stderr
    assert f"--download: could not fetch http://127.0.0.1:{port}/" in err, err[-3000:]  # rank 0
    assert "rank 0 could not download the data" in err, err[-3000:]
    assert not (tmp_path / "o" / "checkpoint.pt").exists()


@pytest.mark.parametrize("quantizer", [["--quantizer", "rvq", "--stages", 2],
                                       ["--quantizer", "gvq", "--groups", 2]], ids=["rvq", "gvq"])
def test_multi_codebook_quantizers_keep_the_ranks_identical(tmp_path, image_dir, quantizer):
    """rvq / gvq under torchrun: every checkpoint checks that the ranks hold bitwise the same
    model (each book's EMA state, restart pool and counters); the books do restart codes."""
    torchrun("--data", "folder", "--data-dir", image_dir, *TINY, "--batch-size", 4,
             "--codebook-init", "kmeans", "--restart-after", 1, "--save-every", 2, "--steps", 4,
             *quantizer, "--out", tmp_path / "a")
    a = ckpt(tmp_path / "a")
    assert a["world_size"] == 2 and a["config"]["quantizer"] == quantizer[1]
    restarts = [int(v) for k, v in a["model"].items() if k.endswith("restart_count")]
    assert len(restarts) == 2 and sum(restarts) > 0
    rows = train._read_rows(tmp_path / "a" / "metrics.csv", train.metrics_fields(2))
    assert rows[-1]["total_restarts"] == sum(restarts)
    assert all(r["codes_used"] == min(r["codes_used_0"], r["codes_used_1"]) for r in rows)
