"""Crash-safe files: every artifact is written to a temporary file in its own directory, flushed to
disk, then renamed over the old one (os.replace is atomic on POSIX and Windows), so a run killed at
any instant leaves either the old file or the new one, never a torn one."""
from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Callable, Optional

import torch

TMP_SUFFIX = ".tmp"


class UsageError(ValueError):
    """A bad command-line setting; the message names the flag."""


class DiskFullError(UsageError):
    """A write ran out of space; the file it was replacing is as it was."""

    def __init__(self, path: Path, existed: bool):
        self.path, self.existed = path, existed
        super().__init__(
            f"the disk is full: no space left to write {path}; "
            + (f"the previous {path.name} there is intact" if existed else
               f"{path.name} was not written"))


_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def _fsync_dir(d: Path) -> None:
    # The rename itself must reach the disk too; directories can't be opened on Windows.
    with contextlib.suppress(OSError):
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[io.BufferedWriter], None]) -> Path:
    """Call write(f) on a temporary file beside `path`, fsync it, and rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    existed = path.exists()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        # mkstemp makes the file 0600; give it the mode a plain open() would have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
            raise DiskFullError(path, existed) from exc
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_bytes(path, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_json(path, obj) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_torch_save(path, obj) -> Path:
    # Serialised in memory first: torch's zip writer reports a full disk as an opaque "unexpected
    # pos" error, a plain write as ENOSPC (DiskFullError). Checkpoints are small next to RAM.
    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getbuffer())


def is_temp_of(p: Path, names) -> bool:
    """Whether `p` is a temporary file atomic_write made for one of `names` (".NAME.XXXX.tmp")."""
    return p.name.endswith(TMP_SUFFIX) and any(p.name.startswith(f".{n}.") for n in names)


def remove_stale_temps(directory: str | os.PathLike, names) -> list[Path]:
    """Delete the temporary files a killed run left behind in `directory` for the files it writes,
    `names`: only those (".NAME.XXXX.tmp"); any other file there is someone else's."""
    d = Path(directory)
    out = []
    if d.is_dir():
        for p in d.glob(f".*{TMP_SUFFIX}"):
            if is_temp_of(p, names):
                with contextlib.suppress(OSError):
                    p.unlink()
                    out.append(p)
    return out


CHECKPOINT_FORMAT = "vqkernels.vqvae"
CHECKPOINT_VERSION = 1


def load_checkpoint(path: str | os.PathLike, arg: str = "CHECKPOINT") -> dict:
    """Load a training checkpoint onto the CPU (weights_only: a checkpoint can't run code)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{arg} {p} does not exist")
    if p.is_dir():
        cand = p / "checkpoint.pt"
        if not cand.is_file():
            raise FileNotFoundError(f"{arg} {p} is a directory without checkpoint.pt")
        p = cand
    _verify_zip(p, arg)
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        # torch's own message (for a file that is not a torch.save archive, a page about
        # weights_only) would bury what matters: what the file is not, and what was expected.
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"{arg} {p} is not a checkpoint that vqkernels.train wrote (expected "
                         f"its checkpoint.pt, or the run's --out folder); torch.load: "
                         f"{type(exc).__name__}: {first}") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{arg} {p} is not a vqkernels VQ-VAE checkpoint")
    if ckpt.get("version", 0) > CHECKPOINT_VERSION:
        raise ValueError(f"{arg} {p} has checkpoint version {ckpt.get('version')}, newer than "
                         f"this vqkernels understands ({CHECKPOINT_VERSION})")
    ckpt["path"] = str(p)
    return ckpt


def _verify_zip(p: Path, arg: str) -> None:
    """torch.load reads tensor records without checking the CRC32 that torch.save wrote for each:
    a damaged checkpoint would load as wrong weights. Check every record first (one read)."""
    try:
        with zipfile.ZipFile(p) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise ValueError(f"{arg} {p} is not a checkpoint that vqkernels.train wrote (expected "
                         f"its checkpoint.pt, or the run's --out folder): {type(exc).__name__}: "
                         f"{exc}") from exc
    if bad is not None:
        raise ValueError(f"{arg} {p} is damaged: its record {bad!r} fails its CRC check (the file "
                         f"was changed after it was written); use another checkpoint")


def model_from_checkpoint(ckpt: dict, *, device="cpu", backend: str = "auto"):
    from .model import VQVAE, VQVAEConfig
    model = VQVAE(VQVAEConfig.from_dict(ckpt["config"]), backend=backend)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval()


def resolve_device(name: Optional[str]) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise UsageError(f"--device {name!r} is not a device ({exc})") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: torch sees no CUDA device here")
    return dev
