"""`python -m vqkernels.train --quantizer vq|rvq|gvq`: the VQ-VAE with a residual or grouped
quantizer trains, logs every codebook's usage, resumes bit for bit, round-trips through its
checkpoint into eval and the tokenizer, and refuses settings that do not fit, naming the argument.
Tiny models and a few generated images: cheap."""
import json

import numpy as np
import pytest
import torch

pytest.importorskip("PIL")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from PIL import Image  # noqa: E402

from helpers import csv_rows as rows, run_train as run_main  # noqa: E402
from vqkernels import _io, data, eval as vq_eval, tokenize as vq_tokenize, train  # noqa: E402
from vqkernels.model import VQVAE, VQVAEConfig  # noqa: E402
from vqkernels.quantize import nearest_code  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--hidden", "16", "--residual-hidden", "8", "--num-codes", "16", "--code-dim", "8",
        "--batch-size", "8", "--eval-images", "64", "--restart-after", "4"]
QUANTIZERS = {"vq": [], "rvq": ["--quantizer", "rvq", "--stages", "3"],
              "gvq": ["--quantizer", "gvq", "--groups", "2"]}
BOOKS = {"vq": 1, "rvq": 3, "gvq": 2}


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    g = np.random.default_rng(1)
    for c in ("a", "b"):
        (root / c).mkdir()
        for i in range(20):
            base = g.integers(0, 256, (4, 4, 3), dtype=np.uint8)
            Image.fromarray(base).resize((32, 32), Image.Resampling.BILINEAR).save(
                root / c / f"{i:02d}.png")
    return root


def _error(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        run_main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("q", list(QUANTIZERS))
def test_trains_resumes_bitwise_and_round_trips(tmp_path, image_dir, q, capsys):
    common = ["--data", "folder", "--data-dir", image_dir, "--eval-every", 4, "--log-every", 2,
              *TINY, *QUANTIZERS[q]]
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_main([*common, "--steps", 8, "--save-every", 0, "--out", a]) == 0
    assert run_main([*common, "--steps", 4, "--save-every", 0, "--out", b]) == 0
    # the restart window (4) straddles the checkpoint; unset flags keep the run's values
    assert run_main(["--out", b, "--resume", "--steps", 8]) == 0
    sa = _io.load_checkpoint(a / "checkpoint.pt")
    sb = _io.load_checkpoint(b / "checkpoint.pt")
    assert sa["model"].keys() == sb["model"].keys()
    for k in sa["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k]), k
    n = BOOKS[q]
    assert sa["config"]["quantizer"] == q and sa["config"]["stages"] * sa["config"]["groups"] == n
    # every book got the data start and the same upkeep (EMA state in the checkpoint)
    model = VQVAE.from_checkpoint(a)
    assert len(model.books) == n and all(bool(bk.initialised) and bk.ema for bk in model.books)
    if n > 1:  # the books do not start on the same rows (seeds offset per book)
        assert not torch.equal(model.books[0].codebook, model.books[1].codebook)

    ra, rb = rows(a / "metrics.csv"), rows(b / "metrics.csv")
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == ["2", "4", "6", "8"]
    for x, y in zip(ra, rb):
        assert float(x["loss"]) == pytest.approx(float(y["loss"]), rel=1e-6)
        if n > 1:
            per = [int(x[f"codes_used_{i}"]) for i in range(n)]
            assert int(x["codes_used"]) == min(per) and int(x["codes_used_total"]) == sum(per)
            assert float(x["perplexity"]) == min(float(x[f"perplexity_{i}"]) for i in range(n))
            assert all(1 <= u <= 16 for u in per)
        else:
            assert "codes_used_0" not in x  # a vq run's files keep their columns
    ev = rows(a / "eval.csv")
    assert [r["step"] for r in ev] == ["4", "8"]

    # the final evaluation is what vqkernels.eval computes from the checkpoint
    m = json.loads((a / "eval.json").read_text())
    capsys.readouterr()
    assert vq_eval.main([str(a), "--json", str(tmp_path / "again.json")]) == 0
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["mse"] == pytest.approx(m["mse"], rel=1e-9)
    if n > 1:
        per = m["codes_used_per_book"]
        assert len(per) == n and m["codes_used"] == min(per)
        assert m["bits_per_position"] == pytest.approx(n * 4)
        unit = "stage" if q == "rvq" else "group"
        assert f"{unit} {n - 1}" in capsys.readouterr().out
        assert float(ev[-1]["codes_used_0"]) == m["codes_used_per_book"][0]

    # tokenizer: one index per book on a trailing axis; decode(encode(x)) is the reconstruction
    ds = data.load("folder", str(image_dir), heldout_every=10)
    x = data.to_tensor(ds.heldout[:3])
    tok = model.encode(x)
    assert tok.shape == ((3, 8, 8) if n == 1 else (3, 8, 8, n))
    assert int(tok.min()) >= 0 and int(tok.max()) < 16
    with torch.no_grad():
        rec = model(x).recon
    torch.testing.assert_close(model.decode(tok), rec, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="indices must have shape"):
        model.decode(tok[..., 0] if n > 1 else tok[..., None])
    out = tmp_path / "tok.npz"
    assert vq_tokenize.main([str(a), "--out", str(out), "--split", "heldout"]) == 0
    t = np.load(out)["tokens"]
    assert t.shape[1:] == tuple(tok.shape[1:]) and t.dtype == np.uint8
    np.testing.assert_array_equal(t[:3], tok.numpy())


def test_resume_with_another_quantizer_is_refused(tmp_path, image_dir, capsys):
    out = tmp_path / "r"
    assert run_main(["--data", "folder", "--data-dir", image_dir, "--steps", 2, "--eval-every", 0,
                     "--out", out, *TINY, *QUANTIZERS["rvq"]]) == 0
    err = _error(capsys, ["--out", out, "--resume", "--quantizer", "gvq"])
    assert "--quantizer gvq differs" in err and "rvq" in err
    err = _error(capsys, ["--out", out, "--resume", "--stages", "2"])
    assert "--stages 2 differs" in err
    # the same settings are accepted
    assert run_main(["--out", out, "--resume", "--steps", 3, "--stages", 3]) == 0


@pytest.mark.parametrize("argv,named", [
    (["--stages", "2"], "--stages"),                                 # vq has no stages
    (["--quantizer", "vq", "--stages", "1"], "--stages"),
    (["--quantizer", "gvq", "--stages", "2"], "--stages"),
    (["--quantizer", "rvq", "--groups", "2"], "--groups"),
    (["--quantizer", "rvq", "--stages", "0"], "--stages"),
    (["--quantizer", "gvq", "--groups", "0"], "--groups"),
    (["--quantizer", "gvq", "--groups", "3"], "--groups"),           # 3 does not divide 8
    (["--quantizer", "pq"], "--quantizer"),
])
def test_bad_quantizer_settings_name_the_argument(tmp_path, capsys, argv, named):
    err = _error(capsys, [*TINY, *argv, "--out", tmp_path / "o"])
    assert named in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("kw,named", [
    (dict(quantizer="rq"), "quantizer"), (dict(quantizer="rvq", stages=0), "stages"),
    (dict(stages=2), "stages"), (dict(quantizer="rvq", groups=2), "groups"),
    (dict(quantizer="gvq", groups=3, code_dim=8), "groups")])
def test_config_refuses_bad_quantizer_fields(kw, named):
    with pytest.raises(ValueError, match=named):
        VQVAEConfig(**kw)


def test_default_books_and_bits():
    c = VQVAEConfig(quantizer="rvq", stages=3, num_codes=16)
    assert c.num_books == 3 and c.bits_per_position == 12
    c = VQVAEConfig(quantizer="gvq", groups=2, num_codes=64, code_dim=64)
    assert c.num_books == 2 and c.bits_per_position == 12
    p = train.build_parser()
    s, _ = train.resolve_settings(p, p.parse_args(["--quantizer", "rvq", "--out", "/no/such/x"]))
    assert (s["stages"], s["groups"]) == (train.DEFAULT_BOOKS["rvq"], 1)
    s, _ = train.resolve_settings(p, p.parse_args(["--out", "/nonexistent/x"]))
    assert (s["quantizer"], s["stages"], s["groups"]) == ("vq", 1, 1)


@pytest.mark.parametrize("q", ["rvq", "gvq", "rvq-codebook-dim", "gvq-codebook-dim"])
def test_init_codebook_starts_each_book_on_its_own_rows(q):
    # rvq: stage s starts on residuals that stages < s leave (projected by its project_in with
    # codebook_dim); gvq: group g on its channels (projected by its project_in)
    torch.manual_seed(0)
    c = VQVAEConfig(num_codes=8, code_dim=8, hidden=8, residual_hidden=4, quantizer=q[:3],
                    **({"stages": 2} if q.startswith("rvq") else {"groups": 2}),
                    codebook_dim=3 if q.endswith("codebook-dim") else None)
    model = VQVAE(c, backend="reference")
    imgs = torch.rand(4, 3, 32, 32) - 0.5
    model.init_codebook(imgs, "data", generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        rows = model._rows(model.encode_latent(imgs)).double()
    b0, b1 = (bk.codebook.double() for bk in model.books)
    if q == "gvq":
        targets = [rows[:, :4], rows[:, 4:]]
    elif q == "gvq-codebook-dim":
        assert b0.shape == b1.shape == (8, 3)
        with torch.no_grad():
            pin = [lin.double() for lin in model.vq.project_in]
            targets = [pin[0](rows[:, :4]), pin[1](rows[:, 4:])]
    elif q == "rvq":
        idx, _ = nearest_code(rows, b0, backend="reference")
        targets = [rows, rows - b0[idx]]
    else:
        assert b0.shape == b1.shape == (8, 3)
        with torch.no_grad():
            pin = [lin.double() for lin in model.vq.project_in]
            p0 = pin[0](rows)
            idx, _ = nearest_code(p0, b0, backend="reference")
            targets = [p0, pin[1](rows - model.vq.project_out[0].double()(b0[idx]))]
    for book, t in zip((b0, b1), targets):
        d = torch.cdist(book, t).min(1).values  # every code is one of its rows
        assert float(d.max()) < 1e-5, float(d.max())
    assert all(bool(bk.initialised) for bk in model.books)


def test_runs_from_before_the_option_resume_as_vq(tmp_path, image_dir, capsys):
    # A checkpoint and config.json written before --quantizer existed hold none of its fields:
    # they are single-codebook runs, which resume (and may be relaunched into their folder) as vq.
    out = tmp_path / "old"
    common = ["--data", "folder", "--data-dir", image_dir, "--eval-every", 0, *TINY]
    assert run_main([*common, "--steps", 2, "--out", out]) == 0
    ck = _io.load_checkpoint(out / "checkpoint.pt")
    del ck["path"]
    for k in ("quantizer", "stages", "groups"):
        del ck["args"][k], ck["config"][k]
    _io.atomic_torch_save(out / "checkpoint.pt", ck)
    assert "quantizer" not in _io.load_checkpoint(out / "checkpoint.pt")["args"]
    assert "--quantizer rvq differs" in _error(capsys, ["--out", out, "--resume", "--quantizer",
                                                        "rvq"])
    assert run_main(["--out", out, "--resume", "--steps", 3]) == 0
    assert _io.load_checkpoint(out / "checkpoint.pt")["config"]["quantizer"] == "vq"
    # a folder whose run left only files (no checkpoint) is still recognised as the same run
    cfg = json.loads((out / "config.json").read_text())
    for k in ("quantizer", "stages", "groups"):
        del cfg["args"][k]
    (out / "config.json").write_text(json.dumps(cfg))
    (out / "checkpoint.pt").unlink()
    assert run_main([*common, "--steps", 2, "--out", out]) == 0


# ------------------------------------------------------------- per-stage options of rvq / gvq
# (flags, what the checkpoint's config holds). Projections without --cosine run the same stage
# loop as with it, minus the normalisation: the cosine case covers both (the suite's time).
OPTIONS = {
    "rvq-cosine": (["--quantizer", "rvq", "--stages", "2", "--cosine"], dict(cosine=True)),
    "gvq-cosine": (["--quantizer", "gvq", "--groups", "2", "--cosine"], dict(cosine=True)),
    "rvq-cosine-codebook-dim": (["--quantizer", "rvq", "--stages", "2", "--codebook-dim", "3",
                                 "--cosine"], dict(codebook_dim=3, cosine=True)),
    # gvq's projections without cosine: the groups' projected rows take the one grouped call
    # (with cosine, the group loop the rvq case above runs; the module tests cover both)
    "gvq-codebook-dim": (["--quantizer", "gvq", "--groups", "2", "--codebook-dim", "3"],
                         dict(codebook_dim=3)),
    "rvq-dropout": (["--quantizer", "rvq", "--stages", "3", "--quantize-dropout",
                     "--dropout-min-stages", "1"],
                    dict(quantize_dropout=True, dropout_min_stages=1)),
}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_rvq_gvq_options_train_resume_bitwise_and_round_trip(tmp_path, image_dir, name):
    flags, want = OPTIONS[name]
    common = ["--data", "folder", "--data-dir", image_dir, "--eval-every", 0, "--log-every", 2,
              *TINY, *flags]
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_main([*common, "--steps", 6, "--save-every", 0, "--out", a]) == 0
    assert run_main([*common, "--steps", 3, "--save-every", 0, "--out", b]) == 0
    assert run_main(["--out", b, "--resume", "--steps", 6]) == 0  # unset flags keep the run's
    sa = _io.load_checkpoint(a / "checkpoint.pt")
    sb = _io.load_checkpoint(b / "checkpoint.pt")
    for k in sa["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k]), k
    for k, v in want.items():
        assert sa["config"][k] == v and sa["args"][k] == v, k
        assert json.loads((a / "config.json").read_text())["args"][k] == v
    model = VQVAE.from_checkpoint(a)
    q = model.vq
    if "codebook_dim" in want:
        assert all(bk.codebook.shape == (16, 3) for bk in model.books)
        width = 8 if name.startswith("rvq") else 4  # a stage's --code-dim, a group's half of it
        assert len(q.project_in) == 2 and q.project_in[0].weight.shape == (3, width)
        # both projections of every stage learned (the run builds its model after seeding
        # torch with --seed, 0 here: this is its start)
        torch.manual_seed(0)
        start = VQVAE(VQVAEConfig.from_dict(sa["config"])).state_dict()
        for k in (f"vq.project_{io}.{s}.weight" for io in ("in", "out") for s in range(2)):
            assert start[k].shape == sa["model"][k].shape
            assert not torch.equal(start[k], sa["model"][k]), k
    assert all(bk.cosine == want.get("cosine", False) for bk in model.books)
    if "quantize_dropout" in want:
        assert q.quantize_dropout and q.dropout_min_stages == 1
        # training forwards drop stages per image (index -1; on a copy: a training forward
        # moves the codebooks), eval forwards never do (the tokenizer's check below)
        other = VQVAE.from_checkpoint(a)
        ds = data.load("folder", str(image_dir), heldout_every=10)
        x = data.to_tensor(ds.heldout[:8])
        torch.manual_seed(0)
        other.vq.train()
        with torch.no_grad():
            idx = other.vq(other.encode_latent(x)).indices
        n_active = (idx >= 0).sum(-1)  # (B, h, w): the same within an image
        assert torch.equal(n_active, n_active[:, :1, :1].expand_as(n_active))
        assert int(n_active.min()) >= 1 and int(n_active.min()) < 3
        # every stage's codes are counted where the stage ran, and no -1 reaches the counts
        for r in rows(a / "metrics.csv"):
            assert all(1 <= int(r[f"codes_used_{i}"]) <= 16 for i in range(3))
    # eval and the tokenizer run on such a model: every stage / group's index, decode(encode)
    assert vq_eval.main([str(a), "--json", str(tmp_path / "e.json")]) == 0
    m = json.loads((tmp_path / "e.json").read_text())
    assert m["num_books"] == (3 if "quantize_dropout" in want else 2)
    out = tmp_path / "tok.npz"
    assert vq_tokenize.main([str(a), "--out", str(out), "--split", "heldout"]) == 0
    t = torch.from_numpy(np.load(out)["tokens"].astype(np.int64))
    ds = data.load("folder", str(image_dir), heldout_every=10)
    x = data.to_tensor(ds.heldout)
    assert torch.equal(model.encode(x), t) and int(t.min()) >= 0
    with torch.no_grad():
        rec = model(x).recon
    torch.testing.assert_close(model.decode(t), rec, rtol=0, atol=1e-5)


def test_rvq_option_mismatch_on_resume_is_refused(tmp_path, image_dir, capsys):
    out = tmp_path / "r"
    assert run_main(["--data", "folder", "--data-dir", image_dir, "--steps", 2, "--eval-every", 0,
                     "--out", out, *TINY, "--quantizer", "rvq", "--stages", "3",
                     "--codebook-dim", "4", "--quantize-dropout"]) == 0
    for argv, named in [(["--codebook-dim", "2"], "--codebook-dim 2 differs"),
                        (["--dropout-min-stages", "2"], "--dropout-min-stages 2 differs"),
                        (["--cosine"], "--cosine True differs")]:
        assert named in _error(capsys, ["--out", out, "--resume", *argv])
    # the same settings are accepted
    assert run_main(["--out", out, "--resume", "--steps", 3, "--codebook-dim", "4",
                     "--quantize-dropout", "--dropout-min-stages", "1"]) == 0


@pytest.mark.parametrize("argv,named", [
    (["--codebook-dim", "4"], "--codebook-dim"),                                # vq
    (["--quantizer", "gvq", "--groups", "2", "--codebook-dim", "4"], "--code-dim / --groups"),
    (["--quantizer", "gvq", "--groups", "2", "--codebook-dim", "5"], "--codebook-dim"),
    (["--quantizer", "gvq", "--codebook-dim", "0"], "--codebook-dim"),
    (["--quantizer", "rvq", "--codebook-dim", "0"], "--codebook-dim"),
    (["--quantizer", "rvq", "--codebook-dim", "8"], "--codebook-dim"),          # not < code dim
    (["--quantizer", "rvq", "--codebook-dim", "9"], "--codebook-dim"),
    (["--quantize-dropout"], "--quantize-dropout"),                            # vq
    (["--quantizer", "gvq", "--quantize-dropout"], "--quantize-dropout"),
    (["--quantizer", "rvq", "--dropout-min-stages", "1"], "--dropout-min-stages"),  # no dropout
    (["--quantizer", "rvq", "--stages", "2", "--quantize-dropout", "--dropout-min-stages", "3"],
     "--dropout-min-stages"),
    (["--quantizer", "rvq", "--quantize-dropout", "--dropout-min-stages", "-1"],
     "--dropout-min-stages"),
])
def test_bad_rvq_options_name_the_argument(tmp_path, capsys, argv, named):
    err = _error(capsys, [*TINY, *argv, "--out", tmp_path / "o"])
    assert named in err
    assert not (tmp_path / "o").exists()


def test_rvq_options_in_help(capsys):
    with pytest.raises(SystemExit):
        run_main(["--help"])
    out = capsys.readouterr().out
    for flag in ("--codebook-dim", "--quantize-dropout", "--dropout-min-stages", "--cosine"):
        assert flag in out


@pytest.mark.parametrize("kw,named", [
    (dict(codebook_dim=4), "codebook_dim"),
    (dict(quantizer="rvq", codebook_dim=256), "codebook_dim"),
    (dict(quantizer="gvq", groups=2, codebook_dim=128), "code_dim / groups"),   # 256 / 2
    (dict(quantizer="gvq", groups=2, codebook_dim=0), "codebook_dim"),
    (dict(quantize_dropout=True), "quantize_dropout"),
    (dict(quantizer="rvq", stages=2, quantize_dropout=True, dropout_min_stages=3),
     "dropout_min_stages"),
])
def test_config_refuses_bad_rvq_options(kw, named):
    with pytest.raises(ValueError, match=named):
        VQVAEConfig(**kw)


def test_gvq_codebook_dim_is_part_of_the_run(tmp_path, image_dir, capsys):
    # gvq --codebook-dim is in the resume identity: another value (or none) is refused, naming
    # it; a gvq run from before the option (no key in its checkpoint) resumes as without
    # projections and refuses them.
    common = ["--data", "folder", "--data-dir", image_dir, "--eval-every", 0, "--steps", 2,
              *TINY, "--quantizer", "gvq", "--groups", "2"]
    out = tmp_path / "p"
    assert run_main([*common, "--codebook-dim", "3", "--out", out]) == 0
    assert "--codebook-dim 2 differs" in _error(capsys, ["--out", out, "--resume",
                                                         "--codebook-dim", "2"])
    assert run_main(["--out", out, "--resume", "--steps", 3]) == 0  # unset: the run's 3
    assert VQVAE.from_checkpoint(out).vq.codebook_dim == 3
    old = tmp_path / "old"
    assert run_main([*common, "--out", old]) == 0
    ck = _io.load_checkpoint(old / "checkpoint.pt")
    del ck["path"]
    for k in ("codebook_dim", "quantize_dropout", "dropout_min_stages"):
        del ck["args"][k], ck["config"][k]
    _io.atomic_torch_save(old / "checkpoint.pt", ck)
    assert "--codebook-dim 3 differs" in _error(capsys, ["--out", old, "--resume",
                                                         "--codebook-dim", "3"])
    assert run_main(["--out", old, "--resume", "--steps", 3]) == 0
    assert _io.load_checkpoint(old / "checkpoint.pt")["config"]["codebook_dim"] is None
    assert not hasattr(VQVAE.from_checkpoint(old).vq, "project_in")


def test_runs_from_before_the_rvq_options_resume_with_their_defaults(tmp_path, image_dir, capsys):
    # A run written before --codebook-dim / --quantize-dropout existed holds none of their keys:
    # it resumes as a run without projections or dropout, and a mismatch is still refused.
    out = tmp_path / "old"
    assert run_main(["--data", "folder", "--data-dir", image_dir, "--eval-every", 0, "--steps", 2,
                     "--out", out, *TINY, "--quantizer", "rvq", "--stages", "2"]) == 0
    ck = _io.load_checkpoint(out / "checkpoint.pt")
    del ck["path"]
    for k in ("codebook_dim", "quantize_dropout", "dropout_min_stages"):
        del ck["args"][k], ck["config"][k]
    _io.atomic_torch_save(out / "checkpoint.pt", ck)
    assert "--quantize-dropout True differs" in _error(
        capsys, ["--out", out, "--resume", "--quantize-dropout"])
    assert run_main(["--out", out, "--resume", "--steps", 3]) == 0
    ck = _io.load_checkpoint(out / "checkpoint.pt")
    assert ck["config"]["codebook_dim"] is None and ck["config"]["quantize_dropout"] is False
    assert VQVAE.from_checkpoint(out).vq.codebook_dim is None


def test_book_counts_leave_out_dropped_stages():
    # -1 (a stage a row sat out) counts for no book; book i's codes land in row i
    idx = torch.tensor([[[0, -1, 2], [3, 3, -1]], [[-1, -1, -1], [1, 0, 3]]])  # (2, 2, S=3)
    got = train.book_counts(idx, 3, 4)
    want = torch.zeros(3, 4, dtype=torch.long)
    for i in idx.reshape(-1, 3):
        for b, k in enumerate(i.tolist()):
            if k >= 0:
                want[b, k] += 1
    assert torch.equal(got.reshape(3, 4).long(), want)
    assert int(got.sum()) == int((idx >= 0).sum())


def test_rvq_dropout_down_to_no_stage_trains(tmp_path, image_dir):
    # --dropout-min-stages 0: some images pass no stage at all (z_q = 0 there, no counts)
    out = tmp_path / "d0"
    assert run_main(["--data", "folder", "--data-dir", image_dir, "--eval-every", 0,
                     "--steps", 4, "--log-every", 2, "--out", out, *TINY, "--quantizer", "rvq",
                     "--stages", "2", "--quantize-dropout", "--dropout-min-stages", "0"]) == 0
    for r in rows(out / "metrics.csv"):
        assert all(0 <= int(r[f"codes_used_{i}"]) <= 16 for i in range(2))
        assert float(r["loss"]) == float(r["loss"])  # not NaN
