"""Data loaders on generated images: folders, CIFAR-10 python batches (local and over HTTP from a
server on 127.0.0.1), the embedded photos, and the samplers' resumable state."""
import hashlib
import http.server
import io
import pickle
import tarfile
import threading

import numpy as np
import pytest
import torch

from vqkernels import data
from vqkernels.data import DataError

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


def rng(seed=0):
    return np.random.default_rng(seed)


def write_image(path, arr, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, **kw)


# ---------------------------------------------------------------------------------------------
def test_to_tensor_range_and_round_trip():
    x = rng().integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    t = data.to_tensor(x)
    assert t.shape == (3, 3, 32, 32) and t.dtype == torch.float32
    # Plain NCHW strides: a channels-last batch gives the convolutions' weights gradients of
    # other strides than the weights (DDP warned about it on every rank, issue 15).
    assert t.stride() == (3 * 32 * 32, 32 * 32, 32, 1)
    assert float(t.min()) >= -0.5 and float(t.max()) <= 0.5
    assert np.array_equal(data.to_uint8(t), x)
    assert float(data.to_tensor(np.zeros((1, 2, 2, 3), np.uint8)).max()) == -0.5
    assert float(data.to_tensor(np.full((1, 2, 2, 3), 255, np.uint8)).min()) == 0.5
    assert np.array_equal(data.to_uint8(torch.full((1, 3, 2, 2), 9.0)),
                          np.full((1, 2, 2, 3), 255))  # clipped


# ---------------------------------------------------------------------------------------------
# folders
def make_class_folder(root, n_per_class=6, classes=("cat", "dog", "fish")):
    g = rng(1)
    for c in classes:
        for i in range(n_per_class):
            ext = ".png" if i % 2 else ".jpg"
            size = (32, 32) if i % 3 == 0 else (40 + 8 * i, 48)
            write_image(root / c / f"{i:03d}{ext}", g.integers(0, 256, size + (3,), dtype=np.uint8))
    return root


def test_folder_with_class_subfolders(tmp_path):
    root = make_class_folder(tmp_path / "imgs")
    d = data.load("folder", str(root))
    assert d.class_names == ["cat", "dog", "fish"]
    n = 18
    assert len(d.train) + len(d.heldout) == n
    assert len(d.heldout) == 1  # every 10th of 18 sorted files
    assert d.train.shape[1:] == (32, 32, 3) and d.train.dtype == np.uint8
    assert len(d.train_labels) == len(d.train) and set(d.train_labels.tolist()) == {0, 1, 2}
    assert d.train_paths[0] == "cat/000.jpg"
    for p, lab in zip(d.train_paths + d.heldout_paths,
                      np.concatenate([d.train_labels, d.heldout_labels])):
        assert p.split("/")[0] == d.class_names[lab]
    assert d.description["images"] == n and d.description["skipped"] == 0
    d5 = data.load("folder", str(root), heldout_every=5)
    assert len(d5.heldout) == 3
    # a shared top folder (an extracted archive's "train/") is not a class
    make_class_folder(tmp_path / "wrapped" / "train", n_per_class=2)
    assert data.load("folder", str(tmp_path / "wrapped")).class_names == ["cat", "dog", "fish"]


def test_flat_folder_modes_and_centre_crop(tmp_path):
    root = tmp_path / "flat"
    # a wide image: centre 80 of 128 columns green, the sides red -> the centre crop is green
    wide = np.zeros((64, 128, 3), np.uint8)
    wide[:, :] = (255, 0, 0)
    wide[:, 24:104] = (0, 255, 0)
    write_image(root / "a_wide.png", wide)
    # a large gradient image, downscaled: the mean colour survives
    grad = np.zeros((256, 256, 3), np.uint8)
    grad[..., 2] = np.linspace(0, 255, 256).astype(np.uint8)[None, :]
    write_image(root / "b_grad.png", grad)
    write_image(root / "c_gray.png", np.full((32, 32), 77, np.uint8))          # mode L
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    write_image(root / "d_rgba.png", rgba)                                      # mode RGBA
    d = data.load_folder(root, heldout_every=2)
    assert d.class_names is None and d.train_labels is None
    imgs = {p: im for p, im in zip(d.train_paths + d.heldout_paths,
                                   np.concatenate([d.train, d.heldout]))}
    w = imgs["a_wide.png"].astype(int)
    assert (w[..., 1] > 250).all() and (w[..., 0] < 5).all()
    g = imgs["b_grad.png"].astype(float)
    assert abs(g[..., 2].mean() - 127.5) < 3 and g[..., 2][:, 0].mean() < g[..., 2][:, -1].mean()
    assert (imgs["c_gray.png"] == 77).all()
    assert (imgs["d_rgba.png"][..., 0] == 200).all()


def test_unreadable_files_are_skipped_and_counted(tmp_path):
    root = make_class_folder(tmp_path / "imgs", n_per_class=3)
    (root / "cat" / "garbage.jpg").write_bytes(b"this is not a jpeg")
    good = io.BytesIO()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(good, format="PNG")
    (root / "dog" / "truncated.png").write_bytes(good.getvalue()[:60])
    (root / "notes.txt").write_text("ignored: not an image extension")
    with pytest.warns(UserWarning, match=r"skipped 2 unreadable image file\(s\) of 11") as rec:
        d = data.load("folder", str(root))
    assert "garbage.jpg" in str(rec[0].message)
    assert len(d.train) + len(d.heldout) == 9 and d.description["skipped"] == 2


def test_folder_errors_name_the_argument(tmp_path):
    with pytest.raises(DataError, match=r"--data-dir .*does not exist"):
        data.load("folder", str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"--data-dir .*contains no image files"):
        data.load("folder", str(tmp_path / "empty"))
    bad = tmp_path / "allbad"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"nope")
    with pytest.warns(UserWarning), pytest.raises(DataError, match=r"--data-dir .*0 readable"):
        data.load("folder", str(bad))
    f = tmp_path / "file.tar.gz"
    f.write_bytes(b"x")
    with pytest.raises(DataError, match="not a directory"):
        data.load("folder", str(f))
    with pytest.raises(DataError, match="--data folder needs --data-dir"):
        data.load("folder", None)
    with pytest.raises(DataError, match="--download only applies"):
        data.load("folder", str(tmp_path), download=True)
    with pytest.raises(DataError, match="--data must be one of"):
        data.load("imagenet", None)
    with pytest.raises(DataError, match="--data-dir is not used with --data embedded"):
        data.load("embedded", str(tmp_path))


# ---------------------------------------------------------------------------------------------
# CIFAR-10 python format
def cifar_batch(n, seed):
    g = rng(seed)
    x = g.integers(0, 256, (n, 3072), dtype=np.uint8)
    y = g.integers(0, 10, n).tolist()
    return {b"data": x, b"labels": y, b"batch_label": b"fake"}


def make_cifar_dir(root, n=4):
    d = root / data.CIFAR10_DIRNAME
    d.mkdir(parents=True)
    batches = {}
    for i, name in enumerate(data.CIFAR10_TRAIN + (data.CIFAR10_TEST,)):
        batches[name] = cifar_batch(n, i)
        with open(d / name, "wb") as f:
            pickle.dump(batches[name], f)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f)
    return d, batches


def test_cifar10_from_local_dir(tmp_path):
    d, batches = make_cifar_dir(tmp_path)
    for where in (tmp_path, d):  # the parent or the batches directory itself
        ds = data.load("cifar10", str(where))
        assert ds.train.shape == (20, 32, 32, 3) and ds.heldout.shape == (4, 32, 32, 3)
        assert ds.class_names == [f"c{i}" for i in range(10)]
    # CIFAR rows are the red plane, then green, then blue, each row-major
    row = batches["data_batch_2"][b"data"][1]
    img = ds.train[4 + 1]
    assert img[0, 0, 0] == row[0] and img[0, 0, 1] == row[1024] and img[0, 0, 2] == row[2048]
    assert img[3, 5, 1] == row[1024 + 3 * 32 + 5]
    assert ds.train_labels[5] == batches["data_batch_2"][b"labels"][1]
    assert np.array_equal(ds.heldout_labels, batches["test_batch"][b"labels"])


def test_cifar10_errors(tmp_path):
    with pytest.raises(DataError, match=r"--data-dir .*does not exist.*--download"):
        data.load("cifar10", str(tmp_path / "nope"))
    with pytest.raises(DataError, match=r"--data-dir .*holds no cifar-10-batches-py"):
        data.load("cifar10", str(tmp_path))
    with pytest.raises(DataError, match="--data cifar10 needs --data-dir"):
        data.load("cifar10", None)
    d, _ = make_cifar_dir(tmp_path / "c")
    (d / "data_batch_3").write_bytes(b"\x80\x04truncated")
    with pytest.raises(DataError, match=r"--data-dir: .*data_batch_3 is not a readable"):
        data.load("cifar10", str(d))


class _Server:
    """A local HTTP server for a CIFAR-like archive: /good, /truncated (says the full length but
    closes early), counting requests."""

    def __init__(self, payload: bytes):
        self.payload, self.hits = payload, 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.hits += 1
                body = outer.payload
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.path == "/truncated":
                    self.wfile.write(body[:len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def cifar_server(tmp_path):
    src, _ = make_cifar_dir(tmp_path / "src", n=3)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(src, arcname=data.CIFAR10_DIRNAME)
    payload = buf.getvalue()
    srv = _Server(payload)
    srv.md5 = hashlib.md5(payload).hexdigest()
    yield srv
    srv.close()


def test_cifar10_download_and_checksum(tmp_path, monkeypatch, cifar_server):
    monkeypatch.setattr(data, "CIFAR10_URL", cifar_server.url + "/good")
    monkeypatch.setattr(data, "CIFAR10_MD5", cifar_server.md5)
    root = tmp_path / "dl"
    ds = data.load("cifar10", str(root), download=True)
    assert ds.train.shape == (15, 32, 32, 3) and cifar_server.hits == 1
    assert (root / data.CIFAR10_ARCHIVE).is_file()
    assert not list(root.glob("*.part"))
    # already there: no second download
    data.load("cifar10", str(root), download=True)
    assert cifar_server.hits == 1


@pytest.mark.parametrize("path,md5,message", [
    ("/good", "0" * 32, r"--download: checksum mismatch .*expected 0{32}.*removed"),
    ("/truncated", None, r"--download: .*(incomplete|could not fetch).*removed"),
], ids=["checksum-mismatch", "truncated"])
def test_cifar10_bad_download_is_detected_and_removed(tmp_path, monkeypatch, cifar_server,
                                                      path, md5, message):
    monkeypatch.setattr(data, "CIFAR10_URL", cifar_server.url + path)
    monkeypatch.setattr(data, "CIFAR10_MD5", md5 or cifar_server.md5)
    root = tmp_path / "dl"
    with pytest.raises(DataError, match=message):
        data.load("cifar10", str(root), download=True)
    assert not root.exists()  # the folder it made for the download is not left behind, empty
    root.mkdir()  # a folder that was there stays, as it was
    with pytest.raises(DataError, match=message):
        data.load("cifar10", str(root), download=True)
    assert list(root.iterdir()) == []


def test_cifar10_half_downloaded_archive_is_replaced(tmp_path, monkeypatch, cifar_server):
    monkeypatch.setattr(data, "CIFAR10_URL", cifar_server.url + "/good")
    monkeypatch.setattr(data, "CIFAR10_MD5", cifar_server.md5)
    root = tmp_path / "dl"
    root.mkdir()
    (root / data.CIFAR10_ARCHIVE).write_bytes(cifar_server.payload[:100])   # a killed copy
    (root / (data.CIFAR10_ARCHIVE + ".abc.part")).write_bytes(b"partial")   # a killed download
    log = []
    d = data.download_cifar10(root, log=log.append)
    text = "\n".join(log)
    assert "corrupt or incomplete" in text and "removing an interrupted download" in text
    assert cifar_server.hits == 1 and (d / "test_batch").is_file()
    assert hashlib.md5((root / data.CIFAR10_ARCHIVE).read_bytes()).hexdigest() == cifar_server.md5


def test_cifar10_download_unreachable(tmp_path, monkeypatch):
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    monkeypatch.setattr(data, "CIFAR10_URL", f"http://127.0.0.1:{port}/x.tar.gz")
    with pytest.raises(DataError, match="--download: could not fetch"):
        data.load("cifar10", str(tmp_path / "dl"), download=True)
    assert not (tmp_path / "dl").exists()
    # nor does train leave the --out it made, empty
    from vqkernels import train
    with pytest.raises(SystemExit):
        train.main(["--data", "cifar10", "--data-dir", str(tmp_path / "dl"), "--download",
                    "--out", str(tmp_path / "run"), "--steps", "1"])
    assert not (tmp_path / "dl").exists() and not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# embedded photos and samplers
@pytest.fixture(scope="module")
def embedded():
    pytest.importorskip("skimage")
    return data.load("embedded")


def test_embedded_photos(embedded):
    assert set(data.EMBEDDED_TRAIN).isdisjoint(data.EMBEDDED_HELDOUT)
    assert embedded.heldout.shape == (data.EMBEDDED_HELDOUT_CROPS, 32, 32, 3)
    assert embedded.heldout.dtype == np.uint8
    assert len(embedded.photos) == len(data.EMBEDDED_TRAIN)
    # the held-out crops are fixed: loading again gives the same ones
    assert np.array_equal(data.load_embedded().heldout, embedded.heldout)
    b = embedded.sampler(0).next_batch(64)
    assert b.shape == (64, 32, 32, 3)
    assert len({x.tobytes() for x in b}) == 64           # distinct crops
    assert b.reshape(64, -1).std(1).mean() > 10           # not flat patches
    assert 0.01 < embedded.variance() < 0.2


def test_crop_sampler_state_resumes_the_same_batches(embedded):
    s = embedded.sampler(3)
    for _ in range(3):
        s.next_batch(8)
    st = s.state_dict()
    want = [s.next_batch(8) for _ in range(2)]
    t = embedded.sampler(3)
    t.load_state_dict(st)
    assert all(np.array_equal(a, b) for a, b in zip(want, [t.next_batch(8) for _ in range(2)]))
    assert not np.array_equal(embedded.sampler(4).next_batch(8), embedded.sampler(3).next_batch(8))


def test_array_sampler_epochs_and_state():
    imgs = np.arange(10, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
    s = data.ArraySampler(imgs, seed=5)
    seen = np.concatenate([s.next_batch(4)[:, 0, 0, 0] for _ in range(5)])  # 20 = two epochs
    assert sorted(seen[:10].tolist()) == list(range(10))
    assert sorted(seen[10:].tolist()) == list(range(10))
    assert not np.array_equal(seen[:10], seen[10:])  # a new permutation each epoch
    st = s.state_dict()
    want = s.next_batch(7)
    t = data.ArraySampler(imgs, seed=5)
    t.load_state_dict(st)
    assert np.array_equal(t.next_batch(7), want)
    with pytest.raises(ValueError, match="sampler state"):
        t.load_state_dict({"kind": "crops", "seed": 0, "batches": 0})
    with pytest.raises(DataError, match="empty"):
        data.ArraySampler(imgs[:0], seed=0)


def test_high_bit_depth_and_float_images_keep_their_range(tmp_path):
    """A 16-bit grayscale PNG and a float TIFF in [0, 1] are scaled from their own range (PIL's
    convert would clip them: nearly all white, all black); a float image of an unknown range is
    skipped with a warning that says why."""
    ramp = np.linspace(0, 1, 32 * 32).reshape(32, 32)
    Image.fromarray((ramp * 65535).round().astype(np.uint16)).save(tmp_path / "a16.png")
    Image.fromarray(ramp.astype(np.float32)).save(tmp_path / "b_float.tiff")
    Image.fromarray((ramp * 255).round().astype(np.uint8)).save(tmp_path / "c8.png")
    Image.fromarray((ramp * 1000).astype(np.float32)).save(tmp_path / "d_kelvin.tiff")
    with pytest.warns(UserWarning, match=r"skipped 1 .*d_kelvin.tiff.*\[0, 1000\]"):
        ds = data.load_folder(tmp_path, heldout_every=10)
    imgs = np.concatenate([ds.train, ds.heldout])
    assert imgs.shape == (3, 32, 32, 3)
    want = np.round(ramp * 255)
    for img in imgs:  # every one the same ramp, within one 8-bit step
        assert np.abs(img[..., 0].astype(float) - want).max() <= 1
        assert (img[..., 0] == img[..., 2]).all()
