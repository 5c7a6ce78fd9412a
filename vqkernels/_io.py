"""Crash-safe files: every artifact is written to a temporary file in its own directory, flushed to
disk, then renamed over the old one (os.replace is atomic on POSIX and Windows), so a run killed at
any instant leaves either the old file or the new one, never a torn one."""
from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Optional

import torch

TMP_SUFFIX = ".tmp"


class UsageError(ValueError):
    """A bad command-line setting; the message names the flag."""


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
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_bytes(path, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_json(path, obj) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_torch_save(path, obj) -> Path:
    return atomic_write(path, lambda f: torch.save(obj, f))


def remove_stale_temps(directory: str | os.PathLike) -> list[Path]:
    """Delete temporary files a killed run left behind in `directory`."""
    d = Path(directory)
    out = []
    if d.is_dir():
        for p in d.glob(f".*{TMP_SUFFIX}"):
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
