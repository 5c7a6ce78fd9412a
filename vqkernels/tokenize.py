"""Token grids of a data set: `python -m vqkernels.tokenize CHECKPOINT --data ... --out tokens.npz`.

The VQ-VAE as an image tokenizer (the way DALL-E uses its discrete VAE): each 32x32 image becomes
an 8x8 grid of code indices. The .npz holds

  tokens        (N, h, w) code indices: uint8 for K <= 256, uint16 for K <= 65536, else int32;
                a model trained with --quantizer rvq / gvq gives (N, h, w, S or G): one index per
                stage / group on the last axis, each in [0, K)
  split         (N,) 0 = training split, 1 = held-out split
  labels        (N,) class index, where the data set has classes (-1 where an image has none)
  class_names   the class names, where there are classes
  paths         (N,) file paths relative to --data-dir (folder data only)
  num_codes, code_dim, config (JSON), checkpoint, step, data (JSON)

`model.decode(torch.from_numpy(tokens).long())` turns the grids back into images.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np
import torch

from . import _cli, _io
from .data import to_tensor


@torch.no_grad()
def tokenize(model, images: np.ndarray, *, batch_size: int = 500, device=None,
             amp_dtype=None) -> np.ndarray:
    """Token grids (N, h, w) int64 of uint8 images (N, 32, 32, 3); `amp_dtype` runs the encoder
    under autocast, as --amp training did."""
    device = torch.device(device or next(model.parameters()).device)
    was = model.training
    model.eval()
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        out = [model.encode(to_tensor(images[i:i + batch_size], device)).cpu()
               for i in range(0, len(images), batch_size)]
    model.train(was)
    if not out:
        return np.zeros(_token_shape(model.config, 0), dtype=np.int64)
    return torch.cat(out).numpy()


def _token_shape(config, n: int) -> tuple:
    s = config.latent_size
    return (n, s, s) if config.quantizer == "vq" else (n, s, s, config.num_books)


def token_dtype(num_codes: int):
    return np.uint8 if num_codes <= 256 else np.uint16 if num_codes <= 65536 else np.int32


def build_parser() -> argparse.ArgumentParser:
    from .eval import add_run_arguments

    p = _cli.ArgumentParser(
        prog="python -m vqkernels.tokenize",
        description="Encode a data set into VQ-VAE token grids, written to one .npz file.")
    add_run_arguments(p, "tokenize")
    p.add_argument("--split", choices=("all", "train", "heldout"), default="all",
                   help="which split to tokenize")
    p.add_argument("--num-crops", type=int, default=10000,
                   help="--data embedded: how many (seeded) training crops to tokenize; the "
                        "held-out split is its fixed crops")
    p.add_argument("--seed", type=int, default=0, help="--data embedded: seed of the crops")
    p.add_argument("--out", required=True, help="the .npz file to write")
    p.add_argument("--batch-size", type=int, default=500, help="images per forward pass")
    return p


def _is_token_file(path: Path) -> bool:
    """Whether `path` is an .npz this command wrote (tokens, the checkpoint's path, its step): such a
    file may be replaced by a new tokenization; anything else a user keeps there may not."""
    try:
        with np.load(path, allow_pickle=False) as f:
            return {"tokens", "checkpoint", "step", "num_codes"} <= set(f.files)
    except (OSError, ValueError, EOFError):
        return False


def main(argv=None) -> int:
    from .eval import amp_for_cli, load_for_cli

    p = build_parser()
    a = p.parse_args(argv)
    if a.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {a.batch_size}")
    if a.num_crops < 0:
        p.error(f"--num-crops must be >= 0, got {a.num_crops}")
    if a.seed < 0:  # numpy's generators take seeds >= 0 only
        p.error(f"--seed must be >= 0, got {a.seed}")
    out = Path(a.out)
    if out.is_dir():
        p.error(f"--out {out} is a folder; name the .npz file to write (e.g. {out / 'tokens.npz'})")
    if out.suffix != ".npz":
        p.error(f"--out must name a .npz file, got {out}")
    if out.exists() and not _is_token_file(out):
        p.error(f"--out {out} exists and is not a token file this command wrote; name another "
                f"file (it is never overwritten)")
    device, ckpt, model, ds = load_for_cli(p, a)

    parts = []  # (images, split code, labels, paths)
    if a.split in ("all", "train"):
        if ds.train is not None:
            parts.append((ds.train, 0, ds.train_labels, ds.train_paths))
        elif a.num_crops:
            parts.append((ds.train_sample(a.num_crops, seed=a.seed), 0, None, None))
    if a.split in ("all", "heldout"):
        parts.append((ds.heldout, 1, ds.heldout_labels, ds.heldout_paths))
    amp = amp_for_cli(a, ckpt, device)
    tokens = [tokenize(model, imgs, batch_size=a.batch_size, device=device, amp_dtype=amp)
              for imgs, *_ in parts]
    K = model.config.num_codes
    arrays = {
        "tokens": np.concatenate(tokens).astype(token_dtype(K)) if tokens else
        np.zeros(_token_shape(model.config, 0), token_dtype(K)),
        "split": np.concatenate([np.full(len(imgs), code, np.uint8) for imgs, code, *_ in parts])
        if parts else np.zeros(0, np.uint8),
        "num_codes": np.int64(K),
        "code_dim": np.int64(model.config.code_dim),
        "config": np.array(json.dumps(model.config.to_dict())),
        "checkpoint": np.array(ckpt["path"]),
        "step": np.int64(ckpt["step"]),
        "data": np.array(json.dumps(ds.description)),
    }
    if ds.class_names or any(lab is not None for _, _, lab, _ in parts):
        arrays["labels"] = np.concatenate([
            lab if lab is not None else np.full(len(imgs), -1, np.int64)
            for imgs, _, lab, _ in parts])
        if ds.class_names:
            arrays["class_names"] = np.array(ds.class_names)
    if any(pth is not None for *_, pth in parts):
        arrays["paths"] = np.array(sum((list(pth) if pth is not None else [""] * len(imgs)
                                        for imgs, _, _, pth in parts), []))
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    try:
        _io.atomic_write_bytes(out, buf.getbuffer())
    except OSError as exc:
        p.error(f"--out {out}: could not write it ({exc.strerror or exc})")
    except _io.UsageError as exc:  # the disk is full
        p.error(f"--out {out}: {exc}")
    t = arrays["tokens"]
    c = model.config
    if c.quantizer == "vq":
        used = f"{len(np.unique(t)) if t.size else 0} of {K} codes used"
    else:
        per = [len(np.unique(t[..., b])) if t.size else 0 for b in range(c.num_books)]
        unit = "stage" if c.quantizer == "rvq" else "group"
        used = (f"{c.num_books} indices a position ({c.quantizer}), codes used per {unit} "
                f"{', '.join(map(str, per))} of {K}")
    print(f"wrote {out}: {t.shape[0]} token grids of {t.shape[1]}x{t.shape[2]} ({t.dtype}), "
          f"{used}, from {ds.kind} data ({a.split})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
