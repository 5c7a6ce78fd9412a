"""Image data for the VQ-VAE, without torchvision.

Three sources, all giving 32x32 RGB images as uint8 arrays (N, 32, 32, 3) and, for the model,
float tensors (B, 3, 32, 32) scaled to [-0.5, 0.5] (x / 255 - 0.5, Sonnet's range; `to_tensor`):

  embedded  crops of the colour photos scikit-image ships inside its wheel (works offline on a
            fresh machine): random position, scale jitter, horizontal and vertical flips.
            Training photos and held-out photos are disjoint (EMBEDDED_TRAIN / EMBEDDED_HELDOUT).
  cifar10   CIFAR-10's python format (cifar-10-batches-py): data_batch_1..5 train, test_batch
            held out. From a local directory, or downloaded with `download=True` (MD5 checked).
  folder    any folder of images, flat or in class subfolders; each image is resized (shorter
            side to 32, antialiased) and centre-cropped. Unreadable files are skipped and counted
            in one warning. Every `heldout_every`-th file in sorted path order is held out, so
            every class is represented in both splits.

Training batches come from a sampler whose whole state is a few integers (`state_dict`), so a
resumed run draws exactly the batches an uninterrupted run would have drawn.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

IMAGE_SIZE = 32
DATA_KINDS = ("embedded", "cifar10", "folder")

EMBEDDED_TRAIN = ("astronaut", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
                  "colorwheel")
EMBEDDED_HELDOUT = ("coffee", "chelsea")
EMBEDDED_HELDOUT_CROPS = 1024  # fixed crops of the held-out photos (seeded): the validation set

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"  # as published on the CIFAR page
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_DIRNAME = "cifar-10-batches-py"
CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST = "test_batch"

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm",
                    ".pgm")


class DataError(ValueError):
    """Bad or missing data; the message names the argument to fix."""


# ---------------------------------------------------------------------------------------------
# scaling
def to_tensor(images: np.ndarray, device=None) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W) in [-0.5, 0.5], contiguous."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device)
    # Contiguous, not the permuted (channels-last) view: the convolutions pass an input's memory
    # format on to their weights' gradients, which then disagree with the weights' own strides,
    # and DistributedDataParallel warned "Grad strides do not match bucket view strides" on every
    # rank (and copies such gradients). Measured no slower on CPU.
    return x.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format) \
        .div_(255.0).sub_(0.5)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float (N, 3, H, W) in [-0.5, 0.5] -> uint8 (N, H, W, 3), clipped."""
    y = ((x.detach().float() + 0.5) * 255.0).round_().clamp_(0, 255).to(torch.uint8)
    return y.permute(0, 2, 3, 1).cpu().numpy()


# ---------------------------------------------------------------------------------------------
# samplers: their state is a few ints, so resuming reproduces the exact batch sequence
class ArraySampler:
    """Epochs over a fixed array, each in its own permutation drawn from (seed, epoch)."""

    def __init__(self, images: np.ndarray, seed: int):
        if len(images) == 0:
            raise DataError("the training split is empty")
        self.images, self.seed = images, int(seed)
        self.epoch, self.pos = 0, 0
        self._perm_epoch, self._perm = -1, None

    def _permutation(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            self._perm, self._perm_epoch = rng.permutation(len(self.images)), self.epoch
        return self._perm

    def next_batch(self, batch_size: int) -> np.ndarray:
        idx = []
        while len(idx) < batch_size:
            perm = self._permutation()
            take = perm[self.pos:self.pos + batch_size - len(idx)]
            idx.extend(take.tolist())
            self.pos += len(take)
            if self.pos >= len(perm):
                self.epoch, self.pos = self.epoch + 1, 0
        return self.images[np.asarray(idx)]

    def state_dict(self) -> dict:
        return {"kind": "array", "seed": self.seed, "epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "array":
            raise ValueError(f"sampler state is for {state.get('kind')!r}, not 'array'")
        self.seed, self.epoch, self.pos = int(state["seed"]), int(state["epoch"]), int(state["pos"])


class CropSampler:
    """Random 32x32 crops of a few large photos. Batch i is drawn from a generator seeded with
    (seed, i), so the state is just the batch counter."""

    # Each photo is kept at 7 scales, shorter side from 64 px geometrically up to its native size
    # (at most 512 px): a 32 px crop then spans between half and a sixteenth of the photo's
    # height. Picking a random scale per crop is the scale jitter; resampling once up front keeps
    # a batch of crops to array slicing.
    MIN_SIDE, MAX_SIDE, LEVELS = 64, 512, 7

    def __init__(self, photos: list[np.ndarray], seed: int):
        self.seed, self.batches = int(seed), 0
        self.pyramids = [_pyramid(p, self.MIN_SIDE, self.MAX_SIDE, self.LEVELS) for p in photos]
        # Draw photos in proportion to sqrt(area): big photos (retina, hubble) give more distinct
        # crops, but not so many more that the small ones vanish.
        area = np.array([p.shape[0] * p.shape[1] for p in photos], dtype=np.float64)
        self.weights = np.sqrt(area) / np.sqrt(area).sum()

    def _crops(self, rng: np.random.Generator, n: int) -> np.ndarray:
        out = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
        photo = rng.choice(len(self.pyramids), size=n, p=self.weights)
        for i in range(n):
            levels = self.pyramids[photo[i]]
            img = levels[rng.integers(len(levels))]
            y = rng.integers(img.shape[0] - IMAGE_SIZE + 1)
            x = rng.integers(img.shape[1] - IMAGE_SIZE + 1)
            crop = img[y:y + IMAGE_SIZE, x:x + IMAGE_SIZE]
            if rng.random() < 0.5:
                crop = crop[:, ::-1]
            if rng.random() < 0.5:
                crop = crop[::-1]
            out[i] = crop
        return out

    def next_batch(self, batch_size: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.batches])
        self.batches += 1
        return self._crops(rng, batch_size)

    def fixed(self, n: int, seed: int) -> np.ndarray:
        """n crops that depend only on `seed` (not on the sampler's position)."""
        return self._crops(np.random.default_rng([seed, 2**31]), n)

    def state_dict(self) -> dict:
        return {"kind": "crops", "seed": self.seed, "batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "crops":
            raise ValueError(f"sampler state is for {state.get('kind')!r}, not 'crops'")
        self.seed, self.batches = int(state["seed"]), int(state["batches"])


def _resize(img: np.ndarray, h: int, w: int) -> np.ndarray:
    from PIL import Image
    return np.asarray(Image.fromarray(img).resize((w, h), Image.Resampling.LANCZOS))


def _pyramid(img: np.ndarray, min_side: int, max_side: int, levels: int) -> list[np.ndarray]:
    short = min(img.shape[:2])
    top = min(short, max_side)
    out = []
    for side in np.geomspace(min(min_side, top), top, levels):
        s = side / short
        h, w = max(IMAGE_SIZE, round(img.shape[0] * s)), max(IMAGE_SIZE, round(img.shape[1] * s))
        out.append(img if (h, w) == img.shape[:2] else _resize(img, h, w))
    return out


# ---------------------------------------------------------------------------------------------
@dataclass
class ImageData:
    """A data set: a training sampler, a fixed held-out split and what they are."""
    kind: str
    description: dict                      # JSON-able; stored in checkpoints
    heldout: np.ndarray                    # uint8 (M, 32, 32, 3)
    train: Optional[np.ndarray] = None     # uint8 (N, 32, 32, 3); None for the embedded crops
    train_labels: Optional[np.ndarray] = None
    heldout_labels: Optional[np.ndarray] = None
    train_paths: Optional[list] = None
    heldout_paths: Optional[list] = None
    class_names: Optional[list] = None
    photos: Optional[list] = field(default=None, repr=False)  # embedded training photos

    def sampler(self, seed: int):
        if self.train is not None:
            return ArraySampler(self.train, seed)
        return CropSampler(self.photos, seed)

    def train_sample(self, n: int, seed: int = 0) -> np.ndarray:
        """A fixed sample of n training images (all of them for array data when n >= N)."""
        if self.train is not None:
            if n >= len(self.train):
                return self.train
            idx = np.sort(np.random.default_rng([seed, 7]).choice(len(self.train), n, replace=False))
            return self.train[idx]
        return CropSampler(self.photos, seed).fixed(n, seed)

    def variance(self) -> float:
        """Pixel variance of the training data in the model's scale (Sonnet's `data_variance`,
        which normalizes the reconstruction loss and the reported MSE)."""
        x = self.train_sample(20000, seed=0).astype(np.float64) / 255.0
        return float(x.var())


def load(kind: str, data_dir: Optional[str] = None, *, download: bool = False,
         heldout_every: int = 10) -> ImageData:
    """Load a data set by kind ("embedded", "cifar10", "folder")."""
    if kind not in DATA_KINDS:
        raise DataError(f"--data must be one of {DATA_KINDS}, got {kind!r}")
    if kind == "embedded":
        if data_dir is not None:
            raise DataError("--data-dir is not used with --data embedded (the photos ship with "
                            "scikit-image); pass --data cifar10 or --data folder to use a directory")
        return load_embedded()
    if data_dir is None:
        raise DataError(f"--data {kind} needs --data-dir")
    if kind == "cifar10":
        return load_cifar10(data_dir, download=download)
    if download:
        raise DataError("--download only applies to --data cifar10")
    return load_folder(data_dir, heldout_every=heldout_every)


# ---------------------------------------------------------------------------------------------
# embedded photos
def _skimage_photo(name: str) -> np.ndarray:
    try:
        import skimage.data
    except ImportError as exc:
        raise DataError("--data embedded needs scikit-image (pip install 'vqkernels[train]')") from exc
    img = np.asarray(getattr(skimage.data, name)())
    if img.ndim != 3 or img.shape[2] < 3:
        raise DataError(f"scikit-image photo {name!r} is not a colour image")
    return np.ascontiguousarray(img[..., :3].astype(np.uint8))


def load_embedded() -> ImageData:
    train = [_skimage_photo(n) for n in EMBEDDED_TRAIN]
    held = [_skimage_photo(n) for n in EMBEDDED_HELDOUT]
    heldout = CropSampler(held, seed=0).fixed(EMBEDDED_HELDOUT_CROPS, seed=12345)
    desc = {"kind": "embedded", "train_photos": list(EMBEDDED_TRAIN),
            "heldout_photos": list(EMBEDDED_HELDOUT), "heldout_crops": EMBEDDED_HELDOUT_CROPS,
            "range": [-0.5, 0.5]}
    return ImageData("embedded", desc, heldout, photos=train)


# ---------------------------------------------------------------------------------------------
# CIFAR-10, python format
def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _find_cifar_dir(root: Path) -> Optional[Path]:
    for cand in (root, root / CIFAR10_DIRNAME):
        if all((cand / n).is_file() for n in CIFAR10_TRAIN + (CIFAR10_TEST,)):
            return cand
    return None


def download_cifar10(root: str | os.PathLike, *, url: Optional[str] = None,
                     md5: Optional[str] = None, log=print) -> Path:
    """Download and extract CIFAR-10 into `root`; returns the cifar-10-batches-py directory.

    The archive is fetched into a temporary '.part' file and renamed only after its MD5 matches,
    so a killed download never looks complete. An archive already in `root` whose MD5 does not
    match (a half-finished copy, a corrupt file) is reported, removed and fetched again.
    """
    url = url or os.environ.get("VQK_CIFAR10_URL") or CIFAR10_URL  # e.g. a local mirror
    md5 = md5 or CIFAR10_MD5
    root = Path(root)
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    try:
        return _download_cifar10_into(root, url, md5, log)
    except BaseException:
        if created:  # a failed first download leaves no empty --data-dir behind
            _remove_if_empty(root)
        raise


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()  # only ever an empty folder: anything in it keeps it
    except OSError:
        pass


def _download_cifar10_into(root: Path, url: str, md5: str, log) -> Path:
    archive = root / CIFAR10_ARCHIVE
    for stale in root.glob(CIFAR10_ARCHIVE + ".*.part"):
        log(f"removing an interrupted download: {stale}")
        stale.unlink()
    if archive.exists():
        got = _md5(archive)
        if got != md5:
            log(f"{archive} is corrupt or incomplete (md5 {got}, expected {md5}); removing it "
                f"and downloading again")
            archive.unlink()
    if not archive.exists():
        log(f"downloading {url} -> {archive}")
        fd, tmp = tempfile.mkstemp(prefix=CIFAR10_ARCHIVE + ".", suffix=".part", dir=root)
        try:
            with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=60) as r:
                expected = r.headers.get("Content-Length")
                shutil.copyfileobj(r, f, 1 << 20)
                f.flush()
                os.fsync(f.fileno())
                size = f.tell()
            if expected is not None and size != int(expected):
                raise DataError(f"--download: incomplete download of {url}: got {size} of "
                                f"{expected} bytes; the partial file was removed, run again")
            got = _md5(Path(tmp))
            if got != md5:
                raise DataError(f"--download: checksum mismatch for {url}: md5 {got}, expected "
                                f"{md5}; the downloaded file was removed")
            os.replace(tmp, archive)
        except DataError:
            Path(tmp).unlink(missing_ok=True)
            raise
        except (OSError, http.client.HTTPException) as exc:  # URLError is an OSError; a
            # connection closed before Content-Length bytes is an http.client.IncompleteRead
            Path(tmp).unlink(missing_ok=True)
            raise DataError(f"--download: could not fetch {url} ({exc}); the partial file was "
                            f"removed. Without internet, put {CIFAR10_DIRNAME} in --data-dir "
                            f"yourself") from exc
    log(f"extracting {archive}")
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = [m for m in tar.getmembers()
                       if m.name.startswith(CIFAR10_DIRNAME + "/") and m.isfile()]
            _safe_extract(tar, members, root)
    except (tarfile.TarError, EOFError, OSError) as exc:
        archive.unlink(missing_ok=True)
        raise DataError(f"--download: {archive} could not be extracted ({exc}); it was removed, "
                        f"run again") from exc
    found = _find_cifar_dir(root)
    if found is None:
        raise DataError(f"--download: {archive} did not contain {CIFAR10_DIRNAME} with "
                        f"{', '.join(CIFAR10_TRAIN)} and {CIFAR10_TEST}")
    return found


def _safe_extract(tar: tarfile.TarFile, members: list, root: Path) -> None:
    if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4: refuses links, abs paths
        tar.extractall(root, members=members, filter="data")
        return
    base = root.resolve()
    for m in members:
        if not (base / m.name).resolve().is_relative_to(base):
            raise tarfile.TarError(f"member {m.name!r} would extract outside {root}")
    tar.extractall(root, members=members)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
        data = np.asarray(d[b"data"], dtype=np.uint8)
        labels = np.asarray(d[b"labels"], dtype=np.int64)
        images = data.reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE).transpose(0, 2, 3, 1)
    except Exception as exc:  # a truncated pickle raises anything from EOFError to KeyError
        raise DataError(f"--data-dir: {path} is not a readable CIFAR-10 python batch ({exc})") from exc
    if len(images) != len(labels):
        raise DataError(f"--data-dir: {path} has {len(images)} images but {len(labels)} labels")
    return np.ascontiguousarray(images), labels


def load_cifar10(data_dir: str | os.PathLike, *, download: bool = False) -> ImageData:
    root = Path(data_dir).expanduser()
    found = _find_cifar_dir(root) if root.is_dir() else None
    if found is None:
        if not download:
            if not root.exists():
                raise DataError(f"--data-dir {root} does not exist (pass --download to fetch "
                                f"CIFAR-10 into it)")
            raise DataError(f"--data-dir {root} holds no {CIFAR10_DIRNAME} (expected "
                            f"{', '.join(CIFAR10_TRAIN)}, {CIFAR10_TEST} in it or in "
                            f"{CIFAR10_DIRNAME}/); pass --download to fetch it")
        found = download_cifar10(root)
    tr = [_read_cifar_batch(found / n) for n in CIFAR10_TRAIN]
    te_x, te_y = _read_cifar_batch(found / CIFAR10_TEST)
    names = None
    meta = found / "batches.meta"
    if meta.is_file():
        try:
            with open(meta, "rb") as f:
                names = [n.decode() for n in pickle.load(f, encoding="bytes")[b"label_names"]]
        except Exception:
            names = None
    desc = {"kind": "cifar10", "data_dir": str(found.resolve()), "train": "data_batch_1..5",
            "heldout": "test_batch", "range": [-0.5, 0.5]}
    return ImageData("cifar10", desc, te_x, train=np.concatenate([x for x, _ in tr]),
                     train_labels=np.concatenate([y for _, y in tr]), heldout_labels=te_y,
                     class_names=names)


# ---------------------------------------------------------------------------------------------
# any folder of images
def _to_8bit(im):
    """One-channel images of more than 8 bits (16-bit PNG or TIFF: modes I;16*, I) or of floats
    (TIFF: mode F), scaled from their own range to 8 bits. PIL's convert("RGB") would clip them to
    255 instead: a 16-bit image comes out nearly white, a float one in [0, 1] black."""
    from PIL import Image
    a = np.asarray(im)
    if im.mode.startswith("I;16") or (im.mode == "I" and a.size and 0 <= a.min()
                                      and a.max() <= 65535):
        scaled = a.astype(np.float64) / 65535.0
    elif im.mode == "F" and a.size and np.isfinite(a).all() and 0 <= a.min() and a.max() <= 1:
        scaled = a.astype(np.float64)
    else:
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        raise ValueError(f"{im.mode} pixels in [{lo:g}, {hi:g}]: not a range this loader knows "
                         f"(16-bit integers, or floats in [0, 1])")
    return Image.fromarray(np.round(scaled * 255.0).astype(np.uint8), "L")


def _load_image(path: Path) -> np.ndarray:
    from PIL import Image
    with Image.open(path) as im:
        if im.mode in ("I", "F") or im.mode.startswith("I;16"):
            im = _to_8bit(im)
        im = im.convert("RGB")
        w, h = im.size
        if (w, h) != (IMAGE_SIZE, IMAGE_SIZE):
            # Shorter side to 32 (antialiased), then the centre 32x32.
            s = IMAGE_SIZE / min(w, h)
            nw, nh = max(IMAGE_SIZE, round(w * s)), max(IMAGE_SIZE, round(h * s))
            im = im.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=3.0)
            left, top = (nw - IMAGE_SIZE) // 2, (nh - IMAGE_SIZE) // 2
            im = im.crop((left, top, left + IMAGE_SIZE, top + IMAGE_SIZE))
        return np.asarray(im, dtype=np.uint8)


def list_images(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*")
                  if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def load_folder(data_dir: str | os.PathLike, *, heldout_every: int = 10) -> ImageData:
    root = Path(data_dir).expanduser()
    if not root.exists():
        raise DataError(f"--data-dir {root} does not exist")
    if not root.is_dir():
        raise DataError(f"--data-dir {root} is not a directory (extract archives first)")
    if heldout_every < 2:
        raise DataError(f"heldout_every must be >= 2, got {heldout_every}")
    files = list_images(root)
    if not files:
        raise DataError(f"--data-dir {root} contains no image files ({', '.join(IMAGE_EXTENSIONS)})")
    images, paths, bad = [], [], []
    for p in files:
        try:
            images.append(_load_image(p))
            paths.append(p)
        except Exception as exc:  # PIL raises many types for truncated or mislabeled files
            bad.append((p, exc))
    if bad:
        first = "; ".join(f"{p.relative_to(root)}: {type(e).__name__}"
                          + (f" ({e})" if isinstance(e, ValueError) else "") for p, e in bad[:3])
        warnings.warn(f"--data-dir {root}: skipped {len(bad)} unreadable image file(s) of "
                      f"{len(files)} (first: {first})", stacklevel=2)
    if len(images) < 2:
        raise DataError(f"--data-dir {root} has {len(images)} readable image(s); at least 2 are "
                        f"needed (one for training, one held out)")
    rel = [p.relative_to(root) for p in paths]
    # Folders every image shares (e.g. "train/" of an extracted archive) are not classes.
    common = 0
    while all(len(r.parts) > common + 2 for r in rel) and len({r.parts[common] for r in rel}) == 1:
        common += 1
    rel = [Path(*r.parts[common:]) for r in rel]
    # Class subfolders: the first path component; a flat folder has no labels.
    class_names = sorted({r.parts[0] for r in rel if len(r.parts) > 1}) or None
    labels = None
    if class_names:
        ix = {c: i for i, c in enumerate(class_names)}
        labels = np.array([ix[r.parts[0]] if len(r.parts) > 1 else -1 for r in rel], dtype=np.int64)
    arr = np.stack(images)
    held = np.zeros(len(arr), dtype=bool)
    held[heldout_every - 1::heldout_every] = True
    if not held.any():
        held[-1] = True
    tr = ~held
    relstr = [str(p.relative_to(root)) for p in paths]
    # Names and pixels of every image, in order: a resumed run checks that its data is the same.
    h = hashlib.sha256()
    for name, img in zip(relstr, images):
        h.update(name.encode() + b"\0")
        h.update(img.tobytes())
    desc = {"kind": "folder", "data_dir": str(root.resolve()), "images": len(arr),
            "skipped": len(bad), "heldout_every": heldout_every, "fingerprint": h.hexdigest(),
            "heldout": f"every {heldout_every}th file in sorted path order",
            "range": [-0.5, 0.5]}
    return ImageData("folder", desc, arr[held], train=arr[tr],
                     train_labels=None if labels is None else labels[tr],
                     heldout_labels=None if labels is None else labels[held],
                     train_paths=[relstr[i] for i in np.flatnonzero(tr)],
                     heldout_paths=[relstr[i] for i in np.flatnonzero(held)],
                     class_names=class_names)
