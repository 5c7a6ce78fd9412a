"""Held-out evaluation of a VQ-VAE checkpoint: `python -m vqkernels.eval CHECKPOINT`.

Figures, all on images scaled to [-0.5, 0.5]:
  mse           mean squared error per pixel and channel
  psnr          10 log10(1 / mse): the peak-to-peak range of the data is 1
  nmse          mse / variance of the training pixels (Sonnet's data_variance; the "normalized
                MSE" that Sonnet's example and its common PyTorch port report)
  perplexity    exp(entropy) of code usage over the whole held-out set
  batch_perplexity   the same per batch of --perplexity-batch images, averaged: the figure the
                training bar shows (it depends on the batch size)
  codes_used    fraction of the K codes chosen at least once on the held-out set

A model trained with --quantizer rvq / gvq has one codebook per stage / group: perplexity,
batch_perplexity and codes_used are then the lowest over them (the worst codebook's), and
codes_used_per_book, perplexity_per_book and bits_per_position (books x log2 K) are added.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import _cli, _io
from .data import DATA_KINDS, DataError, to_tensor


@torch.no_grad()
def evaluate(model, images: np.ndarray, data_variance: float, *, batch_size: int = 250,
             perplexity_batch: int = 32, device=None, amp_dtype=None) -> dict:
    """Evaluate `model` on uint8 images (N, 32, 32, 3); returns the figures as a dict.
    `amp_dtype` (torch.bfloat16 / float16) runs the model under autocast, as it was trained."""
    if len(images) == 0:
        raise ValueError("no held-out images to evaluate on")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    K, n_books = model.config.num_codes, model.config.num_books
    was_training = model.training
    model.eval()
    counts = torch.zeros(n_books, K, dtype=torch.long, device=device)
    se = 0.0
    commit = 0.0
    batch_ppl = []
    # The perplexity batches are consecutive groups of images, so chunks must hold whole groups.
    chunk = max(perplexity_batch, batch_size // perplexity_batch * perplexity_batch)
    for lo in range(0, len(images), chunk):
        x = to_tensor(images[lo:lo + chunk], device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = model(x)
        se += float(((out.recon.float() - x) ** 2).sum(dtype=torch.float64))
        commit += float(out.vq.commitment_loss.sum()) * x.shape[0]
        # (B, h, w, books): the last axis is the stage / group of rvq / gvq
        idx = out.vq.indices.reshape(x.shape[0], -1, n_books)
        for b in range(n_books):
            counts[b] += torch.bincount(idx[..., b].reshape(-1), minlength=K)
        for g in range(0, idx.shape[0], perplexity_batch):
            batch_ppl.append([_perplexity(torch.bincount(idx[g:g + perplexity_batch, :, b]
                                                         .reshape(-1), minlength=K))
                              for b in range(n_books)])
    model.train(was_training)
    n = len(images)
    mse = se / images.size
    ppl = [_perplexity(c) for c in counts]
    used = [float((c > 0).sum()) / K for c in counts]
    m = {
        "images": n,
        "mse": mse,
        "psnr": 10.0 * math.log10(1.0 / mse) if mse > 0 else math.inf,
        "nmse": mse / data_variance,
        "data_variance": data_variance,
        "heldout_variance": float((images.astype(np.float64) / 255.0).var()),
        "commitment_loss": commit / n,
        # rvq / gvq: the lowest over the stages / groups (the worst codebook's health); each
        # one's in the *_per_book lists
        "perplexity": min(ppl),
        "batch_perplexity": float(np.mean(batch_ppl, axis=0).min()),
        "perplexity_batch": perplexity_batch,
        "codes_used": min(used),
        "num_codes": K,
    }
    if model.config.quantizer != "vq":
        c = model.config
        m.update(quantizer=c.quantizer, num_books=n_books, bits_per_position=c.bits_per_position,
                 codes_used_per_book=used, perplexity_per_book=ppl)
    return m


def _perplexity(counts: torch.Tensor) -> float:
    p = counts.double() / max(int(counts.sum()), 1)
    return float(torch.exp(-torch.special.xlogy(p, p).sum()))


ROWS = [("images", "held-out images", "{:d}"), ("mse", "MSE", "{:.6f}"), ("psnr", "PSNR (dB)", "{:.2f}"),
        ("nmse", "normalized MSE", "{:.4f}"), ("perplexity", "perplexity (whole set)", "{:.1f}"),
        ("batch_perplexity", "perplexity (per batch)", "{:.1f}"),
        ("codes_used", "codes used", "{:.1%}")]


def format_table(metrics: dict, title: str = "") -> str:
    lines = [title] if title else []
    w = max(len(label) for _, label, _ in ROWS)
    for key, label, fmt in ROWS:
        v = metrics[key]
        s = fmt.format(v)
        if key == "codes_used":
            s += f" of {metrics['num_codes']}"
        if key == "batch_perplexity":
            s += f" (batches of {metrics['perplexity_batch']})"
        if key in ("perplexity", "codes_used") and "num_books" in metrics:
            s += f" (lowest of the {metrics['num_books']} {_unit(metrics)}s)"
        lines.append(f"  {label:<{w}}  {s}")
    if "num_books" in metrics:
        lines.append(f"  {'bits a position':<{w}}  {metrics['bits_per_position']:g}")
        for i, (u, p) in enumerate(zip(metrics["codes_used_per_book"],
                                       metrics["perplexity_per_book"])):
            lines.append(f"  {_unit(metrics) + ' ' + str(i):<{w}}  codes used {u:.1%}, "
                         f"perplexity {p:.1f}")
    return "\n".join(lines)


def _unit(metrics: dict) -> str:
    return "stage" if metrics.get("quantizer") == "rvq" else "group"


def add_run_arguments(p: argparse.ArgumentParser, what: str) -> None:
    """The flags eval and tokenize share, which load_for_cli and amp_for_cli read: CHECKPOINT,
    --data, --data-dir, --download, --device, --backend, --amp. `what` completes "data set to
    ..." in --data's help."""
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="a checkpoint.pt written by vqkernels.train (or its --out directory)")
    p.add_argument("--data", choices=DATA_KINDS, default=None,
                   help=f"data set to {what} (default: the one the checkpoint was trained on)")
    p.add_argument("--data-dir", default=None,
                   help="directory of --data (default: the checkpoint's)")
    p.add_argument("--download", action="store_true", help="download CIFAR-10 if missing")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (default)")
    p.add_argument("--backend", default="auto",
                   help="quantizer backend: auto (default), cpu, cuda, triton or reference")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="run under autocast as --amp training does (default: as the checkpoint "
                        "was trained)")


def load_for_cli(p: argparse.ArgumentParser, a: argparse.Namespace):
    """(device, checkpoint, model, data set) from the flags eval and tokenize share
    (add_run_arguments: --device, CHECKPOINT, --backend, --data, --data-dir, --download); errors
    name the flag."""
    from .backends import ALL_NAMES, resolve
    try:
        device = _io.resolve_device(a.device)
        if a.backend not in ALL_NAMES:
            raise ValueError(f"--backend must be one of {', '.join(ALL_NAMES)}, got {a.backend!r}")
        try:
            resolve(a.backend, device)
        except (RuntimeError, ValueError) as exc:
            raise ValueError(f"--backend {a.backend}: {exc}") from exc
        ckpt = _io.load_checkpoint(a.checkpoint)
        model = _io.model_from_checkpoint(ckpt, device=device, backend=a.backend)
        ds = heldout_for(ckpt, a.data, a.data_dir, a.download)
    except (FileNotFoundError, ValueError) as exc:
        p.error(str(exc))
    return device, ckpt, model, ds


def amp_for_cli(a: argparse.Namespace, ckpt: dict, device) -> torch.dtype | None:
    """--amp / --no-amp, else as the checkpoint was trained: an --amp model's figures are those
    of its autocast forward."""
    from .train import amp_dtype_for
    amp = a.amp if a.amp is not None else bool(ckpt.get("args", {}).get("amp"))
    return amp_dtype_for(torch.device(device), amp)


def heldout_for(ckpt: dict, data: Optional[str], data_dir: Optional[str], download: bool):
    """The held-out images: of the checkpoint's own data set unless --data says otherwise."""
    from . import data as data_mod
    desc = ckpt.get("data", {})
    kind = data or desc.get("kind")
    if kind is None:
        raise DataError("the checkpoint does not say what it was trained on; pass --data")
    if data_dir is None and kind == desc.get("kind"):
        data_dir = desc.get("data_dir")
    heldout_every = desc.get("heldout_every", 10) if kind == "folder" else 10
    return data_mod.load(kind, data_dir, download=download, heldout_every=heldout_every)


def _is_own_record(path: Path, checkpoint) -> bool:
    """Whether `path` may be written with this checkpoint's figures: it does not exist yet, or it
    is the JSON that training or an earlier eval wrote for this very checkpoint."""
    import json
    path = Path(path)
    if not path.exists():
        return True
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    if not isinstance(old, dict) or not isinstance(old.get("checkpoint"), str):
        return False
    try:
        return Path(old["checkpoint"]).resolve() == Path(checkpoint).resolve()
    except OSError:
        return False


def merge_with_training(path: Path, metrics: dict) -> dict:
    """`metrics`, plus what the training run wrote into `path` that eval does not measure
    (train_elapsed_s, processes, ...), and the training run's own final evaluation under
    "training_eval": re-evaluating a run must not erase its record."""
    import json
    try:
        old = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return metrics
    if not isinstance(old, dict):
        return metrics
    merged = {**{k: v for k, v in old.items() if k not in metrics}, **metrics}
    if "train_elapsed_s" in old:  # written by vqkernels.train, not by an earlier eval
        merged["training_eval"] = {k: v for k, v in old.items() if k in metrics}
    return merged


def build_parser() -> argparse.ArgumentParser:
    p = _cli.ArgumentParser(
        prog="python -m vqkernels.eval",
        description="Held-out MSE, PSNR, normalized MSE, perplexity and code usage of a VQ-VAE "
                    "checkpoint. Prints a table and writes JSON.")
    add_run_arguments(p, "evaluate on")
    p.add_argument("--batch-size", type=int, default=250, help="images per forward pass")
    p.add_argument("--perplexity-batch", type=int, default=None,
                   help="images per batch for the per-batch perplexity (default: the training "
                        "batch size)")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="where to write the figures (default: eval.json beside the checkpoint)")
    return p


def main(argv=None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    if a.json is not None and Path(a.json).is_dir():
        p.error(f"--json {a.json} is a folder; name the file to write (e.g. {Path(a.json) / 'eval.json'})")
    for name in ("batch_size", "perplexity_batch"):
        v = getattr(a, name)
        if v is not None and v < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    device, ckpt, model, ds = load_for_cli(p, a)
    same_data = ds.kind == ckpt["data"].get("kind")
    var = ckpt["data_variance"] if same_data else ds.variance()
    pb = a.perplexity_batch or ckpt.get("args", {}).get("batch_size", 32)
    metrics = evaluate(model, ds.heldout, var, batch_size=a.batch_size, perplexity_batch=pb,
                       device=device, amp_dtype=amp_for_cli(a, ckpt, device))
    metrics.update(checkpoint=ckpt["path"], step=ckpt["step"], data=ds.description,
                   backend=a.backend, device=str(device))
    print(format_table(metrics, f"{ckpt['path']} (step {ckpt['step']}) on {ds.kind} held-out data"))
    out = Path(a.json) if a.json else Path(ckpt["path"]).parent / "eval.json"
    if not _is_own_record(out, ckpt["path"]):
        p.error(f"--json {out} exists and is not an evaluation of {ckpt['path']}; name another "
                f"file (it is never overwritten, and another run's record is never merged in)")
    try:
        _io.atomic_write_json(out, merge_with_training(out, metrics))
    except OSError as exc:
        p.error(f"--json {out}: could not write it ({exc.strerror or exc})")
    except _io.UsageError as exc:  # the disk is full
        p.error(f"--json {out}: {exc}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
