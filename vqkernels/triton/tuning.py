"""Autotune results that outlive the process, and tuning that is safe under threads.

Review F13: a new autotune key (K, D, bucket of N, fused or split, dtype) compiles and times every
config of the search kernel, about 0.7 s on an H100 plus compiles, and the timing (do_bench:
synchronising, allocating) cannot run inside CUDA graph capture. Review F14: one Triton Autotuner
object keeps per-call state (`nargs`), so two threads tuning at once can trample each other.

So the launcher (launch.forward) asks this module first. A key already tuned, in this process or
in an earlier one (the JSON file below), launches its config directly: no timing, no autotuner,
capturable in a CUDA graph. A new key is tuned by the autotuner of its device under a per-device
lock, once, and the winner is recorded in memory and on disk.

The key holds everything the choice depends on: the device's name and compute capability, the
Triton / torch / CUDA versions, a hash of the kernel sources (a changed kernel re-tunes), the
dtype, D, K, the N bucket and the split mode. Timings are noisy, so two machines with the same
key may pick different configs; every config gives the same indices (the exactness contract), so
a shared or stale file costs speed at worst, never correctness.

Warm-up: run one forward per shape you will use (each N bucket: powers of two up to 2^16 rows)
before capturing a CUDA graph, or ship the cache file. Where:
    VQK_AUTOTUNE_CACHE=<dir>   the file is <dir>/autotune.json (default: $XDG_CACHE_HOME or
                               ~/.cache, then vqkernels/); "0" or "off" keeps results in memory only.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Callable, Optional

FILE_NAME = "autotune.json"
_FORMAT = 1


def cache_path() -> Optional[Path]:
    """The JSON file, or None when persistence is off."""
    env = os.environ.get("VQK_AUTOTUNE_CACHE")
    if env is not None and env.strip().lower() in ("0", "off", "none", ""):
        return None
    if env:
        return Path(env).expanduser() / FILE_NAME
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vqkernels" / FILE_NAME


def source_hash() -> str:
    """A short hash of the kernel sources and config rules: results tuned for another version of
    the kernels do not apply."""
    h = hashlib.sha256()
    here = Path(__file__).resolve().parent
    for name in ("kernels.py", "configs.py"):
        h.update((here / name).read_bytes())
    return h.hexdigest()[:16]


def make_key(device: str, versions: dict, shape: dict) -> str:
    """One string key: device name, versions, shape key (all sorted, so order never matters)."""
    parts = [device] + [f"{k}={versions[k]}" for k in sorted(versions)] + [
        f"{k}={shape[k]}" for k in sorted(shape)]
    return "|".join(parts)


class TuneCache:
    """Tuned configs by key, in memory and in a JSON file. Thread-safe; the file is read once,
    rewritten atomically (a temporary file renamed over it) with the union of what is on disk and
    what this process tuned, so two processes tuning different keys keep both. A file that cannot
    be read or parsed is left as it is (never overwritten), with a warning, and results then stay
    in memory."""

    def __init__(self, path: Optional[Path]):
        self.path = path
        self._lock = threading.Lock()
        self._tune_locks: dict = {}
        self._mem: Optional[dict] = None
        self._writable = path is not None

    def _load(self) -> dict:
        if self._mem is not None:
            return self._mem
        self._mem = {}
        if self.path is not None and self.path.exists():
            data = self._read()
            if data is None:
                self._writable = False
            else:
                self._mem.update(data)
        return self._mem

    def _read(self) -> Optional[dict]:
        try:
            data = json.loads(self.path.read_text())
            if not isinstance(data, dict) or data.get("format") != _FORMAT or not isinstance(
                    data.get("configs"), dict):
                raise ValueError("not a vqkernels autotune file of this format")
            return data["configs"]
        except (OSError, ValueError) as e:
            warnings.warn(f"vqkernels: ignoring the autotune cache {self.path} ({e}); tuned "
                          "configs stay in memory and the file is left untouched", stacklevel=3)
            return None

    def get(self, key: str) -> Optional[dict]:
        with self._lock:
            c = self._load().get(key)
            return dict(c) if c is not None else None

    def put(self, key: str, config: dict) -> None:
        with self._lock:
            self._load()[key] = dict(config)
            if not self._writable:
                return
            try:
                on_disk = self._read() if self.path.exists() else {}
                if on_disk is None:
                    self._writable = False
                    return
                merged = {**on_disk, **self._mem}
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".autotune-",
                                           suffix=".json")
                with os.fdopen(fd, "w") as f:
                    json.dump({"format": _FORMAT, "configs": merged}, f, indent=1,
                              sort_keys=True)
                os.replace(tmp, self.path)
            except OSError as e:
                self._writable = False
                warnings.warn(f"vqkernels: cannot write the autotune cache {self.path} ({e}); "
                              "tuned configs stay in memory", stacklevel=3)

    def tune_lock(self, device: str) -> threading.Lock:
        """The lock under which `device`'s autotuner runs (one tuning at a time per device)."""
        with self._lock:
            return self._tune_locks.setdefault(device, threading.Lock())

    def get_or_tune(self, device: str, key: str, tune: Callable[[], dict]) -> tuple[dict, bool]:
        """(config, tuned_now): the cached config of `key`, or `tune()`'s (run once, under the
        device's lock, and recorded)."""
        c = self.get(key)
        if c is not None:
            return c, False
        with self.tune_lock(device):
            c = self.get(key)  # another thread may have tuned it meanwhile
            if c is not None:
                return c, False
            c = tune()
            self.put(key, c)
            return c, True


_CACHE: Optional[TuneCache] = None
_CACHE_LOCK = threading.Lock()


def cache() -> TuneCache:
    """The process-wide cache (its file chosen from the environment at first use)."""
    global _CACHE
    with _CACHE_LOCK:
        if _CACHE is None:
            _CACHE = TuneCache(cache_path())
        return _CACHE


def reset_cache() -> None:
    """Forget the process-wide cache (tests; a changed VQK_AUTOTUNE_CACHE)."""
    global _CACHE
    with _CACHE_LOCK:
        _CACHE = None


def config_dict(config) -> dict:
    """A triton.Config as plain JSON data."""
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}
