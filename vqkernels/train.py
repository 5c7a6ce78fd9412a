"""Train the VQ-VAE: `python -m vqkernels.train [--data embedded|cifar10|folder] [--out DIR] ...`

The defaults train on crops of scikit-image's bundled photos (offline, no download) for a few
minutes on a laptop-class CPU. --out receives:

  checkpoint.pt      model, optimizer, step, every RNG state and the data sampler's position, the
                     config and a description of the data (atomic: temp file + fsync + rename)
  config.json        the run's settings, for people
  metrics.csv        training loss, recon MSE, VQ loss, perplexity, codes used, steps/s
                     (--quantizer rvq / gvq: perplexity and codes_used are the lowest over the
                     stages / groups, the health of the worst codebook; codes_used_<i> and
                     perplexity_<i> give each stage / group's (with --quantize-dropout, over
                     the images that kept stage i), codes_used_total their sum,
                     commitment_loss is the sum over stages / groups, as the loss weighs it)
  eval.csv           held-out figures every --eval-every steps
  loss_curves.png    recon and VQ loss (training and held-out) and code usage
  reconstructions.png   held-out originals (top rows) above their reconstructions
  eval.json          the final held-out evaluation (as `python -m vqkernels.eval` writes it)

A run killed at any moment (even SIGKILL) continues with `--resume` from its last checkpoint and
draws exactly the batches it would have drawn: the final step count and, on a deterministic
device, the final weights are those of an uninterrupted run. SIGINT (Ctrl-C) and SIGTERM stop
the run after the step under way and save it; a second signal stops at once without saving.

--out must be a new or empty folder, or one holding only this run's own files (the same
settings in its config.json) or a sweep's: files of another run, or anything else, are refused
rather than overwritten. Only the run's own temporary files (".NAME.XXXX.tmp") are deleted.

Distributed: `torchrun --nproc_per_node=N -m vqkernels.train ...` trains with
DistributedDataParallel (gloo on CPU, nccl on GPU), --batch-size images per process. Every rank
draws the same global batch of N x --batch-size images and takes its own slice, so a run on N
processes sees the data a single process with N times the batch would. The quantizer keeps the
ranks' codebooks identical (EMA statistics, usage and restart choices travel in one all_reduce per
step); each checkpoint first checks that every rank holds the same model, bit for bit. Rank 0
alone writes files and evaluates.
"""
from __future__ import annotations

import argparse
import csv
import io
import math
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from . import _cli, _io
from .data import DATA_KINDS, DataError, to_tensor, to_uint8

CHECKPOINT = "checkpoint.pt"
# Every file a run writes in --out: it deletes temporary files of these names only, and overwrites
# these only when they are its own.
RUN_FILES = (CHECKPOINT, "config.json", "metrics.csv", "eval.csv", "loss_curves.png",
             "reconstructions.png", "eval.json")
# Files vqkernels.sweep keeps in a run's folder beside the run's own.
SWEEP_FILES = ("sweep.log", "early_reconstructions.png")
METRICS_FIELDS = ("step", "loss", "recon_mse", "recon_nmse", "vq_loss", "commitment_loss",
                  "perplexity", "codes_used", "codes_restarted", "total_restarts", "dead_fraction",
                  "steps_per_s", "elapsed_s")
EVAL_FIELDS = ("step", "mse", "psnr", "nmse", "perplexity", "batch_perplexity", "codes_used")


def metrics_fields(num_books: int) -> tuple:
    """metrics.csv's columns for a quantizer of `num_books` codebooks (stages or groups)."""
    if num_books == 1:
        return METRICS_FIELDS
    return (METRICS_FIELDS + ("codes_used_total",)
            + tuple(f"codes_used_{i}" for i in range(num_books))
            + tuple(f"perplexity_{i}" for i in range(num_books)))


def eval_fields(num_books: int) -> tuple:
    """eval.csv's columns: codes_used (a fraction) and perplexity are the lowest over the books."""
    if num_books == 1:
        return EVAL_FIELDS
    return (EVAL_FIELDS + tuple(f"codes_used_{i}" for i in range(num_books))
            + tuple(f"perplexity_{i}" for i in range(num_books)))


# Defaults. The model sizes follow the issue (K = D = 256, hidden 128), the optimizer Sonnet's
# example (Adam 3e-4, batch 32); 1500 steps keep the default embedded run under 5 minutes on a
# 2-core CPU (see README for measurements). The codebook starts on data, follows it by EMA, and
# codes unused for 2 steps are restarted. In the first steps Adam moves the encoder's output cloud
# by more than its own spread per step; gradient-trained codes (at most ~lr per coordinate per
# step) are left behind and collapse to a handful (issue 15: 213 -> 5 codes by step 25), and
# restarts after 25 steps then hand the decoder codes ~80x the scale it learned (NMSE 0.8 -> 5000).
DEFAULTS = dict(num_codes=256, code_dim=256, hidden=128, residual_hidden=32, residual_blocks=2,
                beta=0.25, codebook_init="data", restart_after=2, dead_after=100, steps=1500,
                batch_size=32,
                lr=3e-4, data="embedded", data_dir=None, heldout_every=10, seed=0, device="auto",
                backend="auto", out="runs/vqvae", eval_every=500, save_every=250, log_every=10,
                eval_images=1024, amp=False, threads=0, ema=True, decay=0.99, decay_warmup=10,
                cosine=False, world_size=1, quantizer="vq", stages=None, groups=None,
                codebook_dim=None, quantize_dropout=False, dropout_min_stages=1)
# --stages / --groups when not given: rvq with 4 stages as the example, gvq with 4 groups
# (code_dim 256 -> 64 channels a group); vq has one of each.
DEFAULT_BOOKS = {"rvq": 4, "gvq": 4}
# What a checkpoint or config.json written before --quantizer existed was trained with.
OLD_RUN = {"quantizer": "vq", "stages": 1, "groups": 1}
# Settings a resumed run must share with the run it continues: changing any of them would make
# the continuation a different experiment.
IDENTITY = ("num_codes", "code_dim", "hidden", "residual_hidden", "residual_blocks", "beta",
            "codebook_init", "restart_after", "batch_size", "lr", "data", "data_dir",
            "heldout_every", "seed", "ema", "decay", "decay_warmup", "cosine", "world_size",
            "quantizer", "stages", "groups", "codebook_dim", "quantize_dropout",
            "dropout_min_stages")
# Settings added after runs were first written: a checkpoint or config.json without one reads as
# today's default (the EMA decay warm-up arrived in issue 15; such runs resume with it; runs from
# before --codebook-dim and --quantize-dropout had neither), and one without the quantizer's
# settings as a single-codebook run (OLD_RUN).
ADDED = ("decay_warmup", "codebook_dim", "quantize_dropout", "dropout_min_stages")


def build_parser() -> argparse.ArgumentParser:
    p = _cli.ArgumentParser(
        prog="python -m vqkernels.train",
        description="Train a VQ-VAE (van den Oord et al. 2017) on 32x32 RGB images with the "
                    "vqkernels quantizer. Defaults in [brackets]; with --resume, unset flags "
                    "keep the resumed run's values.",
        epilog="Distributed: torchrun --nproc_per_node=N -m vqkernels.train ... trains with "
               "DistributedDataParallel (gloo on CPU, nccl on GPU); --batch-size is per process.")
    D = DEFAULTS
    m = p.add_argument_group("model")
    m.add_argument("--quantizer", choices=("vq", "rvq", "gvq"),
                   help="vq: one codebook of K codes (log2 K bits a latent position); rvq: "
                        "residual VQ, --stages codebooks of K codes each quantizing what the "
                        "earlier ones left (S log2 K bits); gvq: grouped VQ, --code-dim split "
                        "into --groups groups, each with its own K codes (G log2 K bits) "
                        f"[{D['quantizer']}]")
    m.add_argument("--stages", type=int,
                   help=f"--quantizer rvq: residual stages S [{DEFAULT_BOOKS['rvq']}]")
    m.add_argument("--groups", type=int,
                   help=f"--quantizer gvq: groups G, dividing --code-dim [{DEFAULT_BOOKS['gvq']}]")
    m.add_argument("--num-codes", type=int,
                   help=f"codebook size K (of each stage / group) [{D['num_codes']}]")
    m.add_argument("--code-dim", type=int, help=f"code dimension D [{D['code_dim']}]")
    m.add_argument("--hidden", type=int, help=f"encoder/decoder width [{D['hidden']}]")
    m.add_argument("--residual-hidden", type=int,
                   help=f"residual block bottleneck width [{D['residual_hidden']}]")
    m.add_argument("--residual-blocks", type=int,
                   help=f"residual blocks in encoder and decoder [{D['residual_blocks']}]")
    m.add_argument("--beta", type=float, help=f"commitment weight [{D['beta']}]")
    m.add_argument("--codebook-init", choices=("data", "kmeans", "uniform"),
                   help="data: codes start on encoder outputs of 256 training images; kmeans: "
                        "k-means++ and 10 Lloyd iterations over those outputs; uniform: +-1/K as "
                        f"in the paper's code [{D['codebook_init']}]")
    m.add_argument("--restart-after", "--restart-every", dest="restart_after", type=int,
                   help="move codes unused for N consecutive steps onto encoder outputs sampled "
                        "from recent batches (of every rank); with more codes than vectors a step "
                        "(K > n), for max(N, ceil(N K / n)) steps; 0 = never "
                        f"[{D['restart_after']}]")
    m.add_argument("--dead-after", type=int,
                   help="a code unused for N consecutive steps counts as dead in the logged "
                        f"dead_fraction [{D['dead_after']}]")
    m.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                   help="EMA codebook updates (Sonnet's VectorQuantizerEMA); --no-ema trains the "
                        "codebook by the codebook loss's gradient, as in the paper [on]")
    m.add_argument("--decay", type=float, help=f"EMA decay, with --ema [{D['decay']}]")
    m.add_argument("--decay-warmup", type=int,
                   help="EMA decay warm-up, with --ema: update t uses min(decay, (1 + t) / "
                        "(N + t)), so codes keep up with the encoder early on; 0 = off "
                        f"[{D['decay_warmup']}]")
    m.add_argument("--cosine", action="store_true", default=None,
                   help="l2-normalised codes and latents (cosine similarity search); rvq: each "
                        "stage searches its l2-normalised (projected) residual against "
                        "normalised codes and adds the chosen unit code (projected back with "
                        "--codebook-dim); gvq: each group searches its normalised (projected) "
                        "channels")
    m.add_argument("--codebook-dim", type=int,
                   help="--quantizer rvq: each stage searches a learned linear projection of "
                        "its residual to this many channels (< --code-dim; codes of that size) "
                        "and adds back a learned projection of its code to --code-dim (DAC's "
                        "factorised codes; the VQ losses are in the projected space); "
                        "--quantizer gvq: each group does so with its --code-dim / --groups "
                        "channels (< that) [off]")
    m.add_argument("--quantize-dropout", action="store_true", default=None,
                   help="--quantizer rvq: in training each image uses only its first n stages, "
                        "n drawn uniformly from [--dropout-min-stages, --stages] per image "
                        "(SoundStream's quantizer dropout: one model for every bit rate); "
                        "evaluation and the tokenizer use every stage [off]")
    m.add_argument("--dropout-min-stages", type=int,
                   help="with --quantize-dropout: the fewest stages an image keeps, 0 to "
                        f"--stages [{D['dropout_min_stages']}]")
    o = p.add_argument_group("optimization")
    o.add_argument("--steps", type=int, help=f"total training steps [{D['steps']}]")
    o.add_argument("--batch-size", type=int, help=f"images per step [{D['batch_size']}]")
    o.add_argument("--lr", type=float, help=f"Adam learning rate [{D['lr']}]")
    o.add_argument("--seed", type=int, help=f"seed of weights and batches [{D['seed']}]")
    d = p.add_argument_group("data")
    d.add_argument("--data", choices=DATA_KINDS,
                   help="embedded: crops of scikit-image's bundled photos (offline); cifar10: "
                        "cifar-10-batches-py in --data-dir; folder: any folder of images "
                        f"[{D['data']}]")
    d.add_argument("--data-dir", help="directory for --data cifar10 or folder")
    d.add_argument("--download", action="store_true",
                   help="download CIFAR-10 into --data-dir if it is not there (MD5 checked)")
    d.add_argument("--heldout-every", type=int,
                   help=f"--data folder: hold out every Nth file [{D['heldout_every']}]")
    r = p.add_argument_group("run")
    r.add_argument("--out", help=f"output directory [{D['out']}]")
    r.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                   help="continue the run in --out from its last checkpoint (or from CHECKPOINT)")
    r.add_argument("--device", help=f"cpu, cuda, cuda:N or auto [{D['device']}]")
    r.add_argument("--backend", help="quantizer kernel: auto, cpu, cuda, triton, reference "
                                     f"[{D['backend']}]")
    r.add_argument("--amp", action="store_true", default=None,
                   help="automatic mixed precision: bf16 on CPUs and on GPUs that support it, "
                        "else fp16 with loss scaling")
    r.add_argument("--threads", type=int,
                   help="CPU threads for torch; 0 = the cores idle at start (cores minus the "
                        "1-minute load average, at least 1, at most torch's default). On a "
                        "machine shared with other jobs, too many threads can be many times "
                        "slower: OpenMP threads spin while their partners wait for a core "
                        f"[{D['threads']}]")
    r.add_argument("--eval-every", type=int,
                   help=f"held-out evaluation every N steps, 0 = only at the end [{D['eval_every']}]")
    r.add_argument("--save-every", type=int,
                   help=f"checkpoint and figures every N steps, 0 = only at the end "
                        f"[{D['save_every']}]")
    r.add_argument("--log-every", type=int, help=f"metrics.csv row every N steps [{D['log_every']}]")
    r.add_argument("--eval-images", type=int,
                   help=f"held-out images used by the periodic evaluation (the final one uses all) "
                        f"[{D['eval_images']}]")
    return p


# ---------------------------------------------------------------------------------------------
# settings
def resolve_settings(p: argparse.ArgumentParser, a: argparse.Namespace):
    given = {k: v for k, v in vars(a).items() if k not in ("resume", "download") and v is not None}
    out = Path(given.get("out", DEFAULTS["out"]))
    if out.exists() and not out.is_dir():
        p.error(f"--out {out} is a file; --out names the folder the run writes its files into")
    ckpt = None
    if a.resume is not None:
        path = out / CHECKPOINT if a.resume == "auto" else Path(a.resume)
        if a.resume == "auto" and not path.exists():
            p.error(f"--resume: --out {out} holds no {CHECKPOINT} to continue from")
        try:
            ckpt = _io.load_checkpoint(path, "--resume")
        except (FileNotFoundError, ValueError) as exc:
            p.error(str(exc))
        saved = _saved_args(ckpt["args"])
        for k in IDENTITY:
            if k in given and _norm(k, given[k]) != _norm(k, saved.get(k)):
                what = (f"; the checkpoint holds a {saved['quantizer']} quantizer's codebooks, "
                        f"which a {given[k]} one cannot take"
                        if k == "quantizer" else "")
                p.error(f"--{k.replace('_', '-')} {given[k]} differs from the run being resumed "
                        f"({saved.get(k)}){what}; start a new run with another --out instead")
        s = {**DEFAULTS, **saved, **given}
        # Artifacts go where the checkpoint is unless --out says otherwise.
        own = Path(ckpt["path"]).resolve().parent
        s["out"] = str(out if a.resume == "auto" or "out" in given else own)
        out = Path(s["out"])
        if out.is_dir() and out.resolve() != own:
            # Continuing a run into another folder (a fork): that folder must not hold another
            # run, whose checkpoint and metrics would be replaced by this one's.
            if (out / CHECKPOINT).exists():
                p.error(f"--out {out} holds another run's {CHECKPOINT}; resuming {ckpt['path']} "
                        f"there would replace it. Continue that run with --out {out} --resume, "
                        f"or give this one an empty --out")
            why = _foreign_files(out, saved)
            if why:
                p.error(why)
    else:
        if (out / CHECKPOINT).exists():
            p.error(f"--out {out} already holds {CHECKPOINT} from an earlier run: pass --resume "
                    f"to continue it, or choose another --out")
        s = {**DEFAULTS, **given}
        _resolve_books(p, s, given)
        why = _foreign_files(out, {**s, "data_dir": _norm("data_dir", s["data_dir"]),
                                   "world_size": int(os.environ.get("WORLD_SIZE", "1"))})
        if why:
            p.error(why)
    s["download"] = a.download
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if ckpt is not None and int(s.get("world_size", 1)) != world:
        p.error(f"--resume: the run was trained on {s.get('world_size', 1)} process(es) and this "
                f"is {world}; the global batch (processes x --batch-size) would change. Resume "
                f"with the same number of processes")
    s["world_size"] = world
    if ckpt is not None and "steps" in given and int(s["steps"]) < int(ckpt["step"]):
        # Nothing would train, and the checkpoint would be rewritten saying the run was shorter.
        p.error(f"--steps {s['steps']} is below the step the run being resumed has reached "
                f"({ckpt['step']}); pass --steps {ckpt['step']} or more")
    _resolve_books(p, s, given)
    # Stored absolute, so `--resume`, eval and tokenize find the data from any working directory.
    s["data_dir"] = _norm("data_dir", s["data_dir"])
    for k in ("num_codes", "code_dim", "hidden", "residual_hidden", "steps", "batch_size",
              "log_every", "eval_images", "heldout_every", "dead_after"):
        if s[k] < 1:
            p.error(f"--{k.replace('_', '-')} must be >= 1, got {s[k]}")
    if s["hidden"] < 2:
        p.error(f"--hidden must be >= 2 (the first convolution has hidden // 2 channels), got "
                f"{s['hidden']}")
    for k in ("residual_blocks", "eval_every", "save_every", "restart_after", "threads"):
        if s[k] < 0:
            p.error(f"--{k.replace('_', '-')} must be >= 0, got {s[k]}")
    if s["decay_warmup"] < 0:
        p.error(f"--decay-warmup must be >= 0, got {s['decay_warmup']}")
    if not 0 < s["decay"] < 1:
        p.error(f"--decay must be in (0, 1), got {s['decay']}")
    if not (s["lr"] > 0 and math.isfinite(s["lr"])):
        p.error(f"--lr must be a positive number, got {s['lr']}")
    if not (s["beta"] >= 0 and math.isfinite(s["beta"])):
        p.error(f"--beta must be a number >= 0, got {s['beta']}")
    if not 0 <= s["seed"] < 2 ** 32:  # what numpy's (legacy) seeding takes
        p.error(f"--seed must be from 0 to 2**32 - 1, got {s['seed']}")
    from .backends import ALL_NAMES
    if s["backend"] not in ALL_NAMES:
        p.error(f"--backend must be one of {', '.join(ALL_NAMES)}, got {s['backend']!r}")
    return s, ckpt


def _saved_args(saved: dict) -> dict:
    """A run's stored settings in today's names, with settings added since filled in."""
    saved = dict(saved)
    if "restart_every" in saved:  # runs written before the flag's rename
        saved["restart_after"] = saved.pop("restart_every")
    for k in ADDED:
        saved.setdefault(k, DEFAULTS[k])
    for k, v in OLD_RUN.items():
        saved.setdefault(k, v)
    return saved


def _resolve_books(p: argparse.ArgumentParser, s: dict, given: dict) -> None:
    """Check --stages / --groups and the rvq / gvq options against --quantizer and fill in the
    defaults of --stages / --groups (in place)."""
    for k, q in (("stages", "rvq"), ("groups", "gvq")):
        if k in given and s["quantizer"] != q:
            p.error(f"--{k} applies to --quantizer {q} only (this run's quantizer is "
                    f"{s['quantizer']})")
        if s[k] is None:
            s[k] = DEFAULT_BOOKS[q] if s["quantizer"] == q else 1
        if s[k] < 1:
            p.error(f"--{k} must be >= 1, got {s[k]}")
    if s["code_dim"] % s["groups"]:
        p.error(f"--groups {s['groups']} must divide --code-dim {s['code_dim']} (each group "
                f"quantizes code-dim / groups channels)")
    # Projections exist for the residual stages and the groups (the single quantizer has none);
    # stages to drop only in the residual quantizer.
    for k, qs in (("codebook_dim", ("rvq", "gvq")), ("quantize_dropout", ("rvq",))):
        if s[k] and s["quantizer"] not in qs:
            p.error(f"--{k.replace('_', '-')} applies to --quantizer {' or '.join(qs)} only "
                    f"(this run's quantizer is {s['quantizer']})")
    cd = s["codebook_dim"]
    # What one stage / group projects from: every channel, or a group's code-dim / groups.
    width, what = ((s["code_dim"], "--code-dim") if s["quantizer"] != "gvq" else
                   (s["code_dim"] // s["groups"], "--code-dim / --groups"))
    if cd is not None and not 1 <= cd < width:
        p.error(f"--codebook-dim must be from 1 to {what} - 1 ({width - 1}), got {cd}; leave it "
                f"out for {'groups' if s['quantizer'] == 'gvq' else 'stages'} without projections")
    if "dropout_min_stages" in given and not s["quantize_dropout"]:
        p.error("--dropout-min-stages applies with --quantize-dropout only")
    # The EMA settings act on the EMA updates only: refused, like the rest, where they do not apply.
    for k in ("decay", "decay_warmup"):
        if k in given and not s["ema"]:
            p.error(f"--{k.replace('_', '-')} applies with --ema only (this run trains its "
                    f"codebook by gradient: --no-ema)")
    if not 0 <= s["dropout_min_stages"] <= s["stages"]:
        p.error(f"--dropout-min-stages must be from 0 to --stages ({s['stages']}), got "
                f"{s['dropout_min_stages']}")


def _norm(k, v):
    if k == "data_dir" and v is not None:
        return str(Path(v).expanduser().resolve())
    return v


def _foreign_files(out: Path, settings: dict) -> str | None:
    """Why a run with `settings` must not write into the existing folder `out` (None if it may).

    The run writes RUN_FILES there, replacing files of those names, and deletes its own stale
    temporary files. It may do that in an empty folder, or in one that holds only files of this
    same run (one killed before its first checkpoint, launched again: its config.json has the same
    settings) or of the sweep that launched it. Anything else there is someone else's."""
    if not out.is_dir():
        return None
    from ._io import is_temp_of
    entries = sorted(out.iterdir())
    foreign = [e.name for e in entries if e.name not in RUN_FILES + SWEEP_FILES
               and not is_temp_of(e, RUN_FILES)]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        return (f"--out {out} is not empty and holds files that are not this run's ({shown}); "
                f"choose a new or empty --out, so that nothing there is overwritten or deleted")
    present = [e.name for e in entries if e.name in RUN_FILES]
    if not present:
        return None
    try:
        saved = _saved_args(json.loads((out / "config.json").read_text())["args"])
        same = all(_norm(k, saved.get(k)) == _norm(k, settings.get(k)) for k in IDENTITY)
    except (OSError, ValueError, KeyError, TypeError):
        same = False
    if same:
        return None
    return (f"--out {out} holds the files of another run ({', '.join(present)}) without a "
            f"{CHECKPOINT} to resume; a new run there would overwrite them. Choose another --out")


# ---------------------------------------------------------------------------------------------
# RNG state that survives torch.load(weights_only=True): tensors and plain Python values only
def rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "python": random.getstate()}
    name, keys, pos, has_gauss, cached = np.random.get_state()
    st["numpy"] = [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                   float(cached)]
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(_tuplify(st["python"]))
    name, keys, pos, has_gauss, cached = st["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in st and torch.cuda.is_available() and len(st["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(st["cuda"])


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


# ---------------------------------------------------------------------------------------------
# CSV files that stay consistent with the checkpoint across kills and resumes
def _read_rows(path: Path, fields) -> list[dict]:
    """Rows of a metrics CSV; a torn last line (a run killed mid-write) is dropped."""
    if not path.exists():
        return []
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if None in row or any(row.get(k) in (None, "") for k in fields):
                continue
            try:
                rows.append({k: float(row[k]) for k in fields})
            except ValueError:
                continue
    return rows


def _restart_csv(path: Path, fields, upto_step: int) -> None:
    """Rewrite `path` keeping the rows up to `upto_step`: rows logged after the checkpoint the run
    resumes from will be logged again."""
    keep = [r for r in _read_rows(path, fields) if r["step"] <= upto_step]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    for r in keep:
        w.writerow({k: _fmt(r[k]) for k in fields})
    _io.atomic_write_bytes(path, buf.getvalue().encode())


def _fmt(v):
    if isinstance(v, float) and v.is_integer() and abs(v) < 2**53:
        return str(int(v))
    return f"{v:.6g}" if isinstance(v, float) else str(v)


class CsvLog:
    def __init__(self, path: Path, fields):
        self.path, self.fields = path, fields
        self.f = open(path, "a", newline="")

    def write(self, row: dict) -> None:
        self.f.write(",".join(_fmt(row[k]) for k in self.fields) + "\n")
        self.f.flush()

    def close(self):
        self.f.close()


# ---------------------------------------------------------------------------------------------
# figures
def plot_losses(out: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    rows = _read_rows(out / "metrics.csv", METRICS_FIELDS)
    ev = _read_rows(out / "eval.csv", EVAL_FIELDS)
    if not rows:
        return
    step = [r["step"] for r in rows]
    fig = Figure(figsize=(12, 3.6), dpi=100)
    ax = fig.subplots(1, 3)
    ax[0].plot(step, [r["recon_nmse"] for r in rows], lw=0.8, label="train")
    if ev:
        ax[0].plot([r["step"] for r in ev], [r["nmse"] for r in ev], "o-", ms=3, label="held-out")
    ax[0].set(title="reconstruction (MSE / data variance)", xlabel="step", yscale="log")
    ax[0].legend()
    ax[1].plot(step, [r["vq_loss"] for r in rows], lw=0.8, label="VQ loss (codebook + beta commit)")
    ax[1].set(title="VQ loss", xlabel="step", yscale="log")
    ax[2].plot(step, [r["perplexity"] for r in rows], lw=0.8, label="perplexity (batch)")
    ax[2].plot(step, [r["codes_used"] for r in rows], lw=0.8, label="codes used (log interval)")
    ax[2].set(title="code usage", xlabel="step")
    ax[2].legend()
    for a in ax:
        a.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    _io.atomic_write_bytes(out / "loss_curves.png", buf.getvalue())


def save_recon_grid(path: Path, originals: np.ndarray, recons: np.ndarray, cols: int = 8,
                    scale: int = 3) -> None:
    """Originals in the top rows, their reconstructions in the same places below a white band."""
    from PIL import Image

    cols = max(1, min(cols, len(originals)))
    n = len(originals) // cols * cols
    if n == 0:
        return
    rows = n // cols
    s = originals.shape[1]

    def tile(imgs):
        return imgs[:n].reshape(rows, cols, s, s, 3).transpose(0, 2, 1, 3, 4).reshape(rows * s,
                                                                                      cols * s, 3)

    band = np.full((4, cols * s, 3), 255, np.uint8)
    grid = np.concatenate([tile(originals), band, tile(recons)])
    img = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale),
                                       Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    _io.atomic_write_bytes(path, buf.getvalue())


@torch.no_grad()
def reconstruct(model, images: np.ndarray, device) -> np.ndarray:
    was = model.training
    model.eval()
    r = model(to_tensor(images, device)).recon
    model.train(was)
    return to_uint8(r)


def amp_dtype_for(device: torch.device, amp) -> torch.dtype | None:
    """The autocast dtype of --amp on `device` (None without --amp). bf16 keeps fp32's exponent
    range, so it needs no loss scaling; GPUs before Ampere have no bf16 and get fp16 with a
    GradScaler. Eval and tokenize use it too: a model trained under autocast is evaluated so."""
    if not amp:
        return None
    return (torch.bfloat16 if device.type != "cuda" or torch.cuda.is_bf16_supported()
            else torch.float16)


def pick_threads(requested: int) -> int:
    """`requested`, or for 0 the cores no other process is using right now."""
    if requested:
        return requested
    n = torch.get_num_threads()
    try:
        idle = (os.cpu_count() or n) - os.getloadavg()[0]
    except (OSError, AttributeError):  # no load average (Windows)
        return n
    return max(1, min(n, int(idle + 0.5)))


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic (without it torch emulates bf16, slowly)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return True  # unknown (not Linux): say nothing
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _check_same_data(then: dict, now: dict) -> None:
    """Refuse to resume on data other than the run's: the batches, and for folder data the
    held-out split (every Nth file), would silently change."""
    changed = [k for k in then if k in now and k != "data_dir" and then[k] != now[k]]
    if not changed:
        return
    where = f"--data-dir {now.get('data_dir')}" if now.get("data_dir") else f"--data {now.get('kind')}"

    def show(k):
        if k == "fingerprint":
            return "the image files (names or pixels) differ"
        return f"{k}: {then[k]} then, {now[k]} now"
    raise DataError(f"{where} changed since the run started ({'; '.join(show(k) for k in changed)});"
                    f" resuming would train on other data and shift the held-out split. Restore "
                    f"the data, or start a new run with another --out")


def _spread(images: np.ndarray, n: int) -> np.ndarray:
    if n >= len(images):
        return images
    return images[np.linspace(0, len(images) - 1, n).round().astype(np.int64)]


# ---------------------------------------------------------------------------------------------
# torch.distributed (torchrun)
class Dist:
    """This process's place in a torchrun launch: world 1 (and no collectives) otherwise."""

    def __init__(self, device: torch.device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(self.world)))
        self.owned = False
        self.device = device
        if self.world == 1:
            return
        import torch.distributed as dist
        if device.type == "cuda":
            if self.local_rank >= torch.cuda.device_count():
                raise _io.UsageError(
                    f"--device {device.type}: {self.local_world} processes on this node need "
                    f"{self.local_world} GPUs, and torch sees {torch.cuda.device_count()}; start "
                    f"fewer processes or train on --device cpu")
            self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            self.owned = True

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_reduce_(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        from .quantizers.upkeep import DistContext
        return DistContext(self.world > 1).all_reduce_(t, op)

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist
            dist.barrier()

    def close(self) -> None:
        if self.owned:
            import torch.distributed as dist
            dist.destroy_process_group()
            self.owned = False


def _fingerprints(module: torch.nn.Module) -> tuple[list[str], torch.Tensor]:
    """Two float64 sums per parameter and buffer (plain and position-weighted): equal tensors give
    equal sums; a tensor changed anywhere gives different ones (short of a freak cancellation)."""
    names, fp = [], []
    for name, t in module.state_dict().items():
        x = t.detach().reshape(-1).double()
        w = torch.arange(1, x.numel() + 1, device=x.device, dtype=torch.float64).remainder_(977)
        names.append(name)
        fp.append(torch.stack([x.sum(), (x * w).sum()]))
    return names, torch.stack(fp)


def check_ranks_agree(module: torch.nn.Module, d: Dist) -> None:
    """Raise on every rank if the ranks' copies of `module` differ (one all_reduce; every rank
    reaches the same verdict, so none is left waiting in a collective)."""
    if d.world == 1:
        return
    names, fp = _fingerprints(module)
    slots = torch.zeros(d.world, *fp.shape, dtype=torch.float64, device=fp.device)
    slots[d.rank] = fp
    d.all_reduce_(slots)
    differ = [n for k, n in enumerate(names) if not bool((slots[:, k] == slots[0, k]).all())]
    if differ:
        raise RuntimeError(f"the {d.world} ranks hold different model states ({', '.join(differ)});"
                           f" a rank's update went astray")


class Stopped(KeyboardInterrupt):
    """The run stopped between steps on a signal and saved its checkpoint."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class StopRequest:
    """SIGINT (Ctrl-C) and SIGTERM ask the training loop to stop after the step under way; it then
    saves and exits. Saving in the middle of a step would mix two steps' states (sampler, model,
    optimizer, quantizer) and a resumed run would no longer be the run. A second signal aborts at
    once without saving. Handlers can only be set from the main thread; elsewhere this is inert."""

    SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM") if hasattr(signal, n))

    def __init__(self):
        self.signum = 0
        self._old: dict = {}

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old = {}

    def _handle(self, signum, frame) -> None:
        if self.signum:
            self.restore()
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this step to save it (send it again "
              f"to stop at once without saving)", file=sys.stderr)


def train(s: dict, ckpt: dict | None = None, *, progress: bool = True) -> dict:
    """Run (or continue) training with settings `s`; returns the final held-out metrics (on
    rank 0 of a distributed run; the other ranks return {})."""
    d = Dist(_io.resolve_device(s["device"]))
    out = Path(s["out"])
    created = d.main and not out.exists()
    try:
        return _train(s, ckpt, d, progress=progress)
    except BaseException:
        if created:
            # A run that failed before writing anything (no data, a failed download, a bad
            # backend) leaves no empty --out behind; a folder with anything in it is kept.
            from .data import _remove_if_empty
            _remove_if_empty(out)
        raise
    finally:
        d.close()


def _train(s: dict, ckpt: dict | None, d: Dist, *, progress: bool) -> dict:
    from tqdm.auto import tqdm

    from . import data as data_mod
    from .eval import evaluate, format_table
    from .model import VQVAE, VQVAEConfig

    out = Path(s["out"])
    device, main = d.device, d.main
    if main:
        try:
            out.mkdir(parents=True, exist_ok=True)
            # Can this process write there at all? Better to know before the data is loaded. (A
            # temporary name of the run's own: a kill right here leaves nothing foreign behind.)
            fd, probe = tempfile.mkstemp(prefix=".config.json.", suffix=_io.TMP_SUFFIX, dir=out)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise _io.UsageError(f"--out {out}: cannot write there "
                                 f"({exc.strerror or exc})") from exc
        _io.remove_stale_temps(out, RUN_FILES)
    from .backends import resolve
    try:
        backend = resolve(s["backend"], device).name
    except (RuntimeError, ValueError) as exc:
        raise _io.UsageError(f"--backend {s['backend']}: {exc}") from exc
    threads = s["threads"] or max(1, pick_threads(0) // d.local_world)
    torch.set_num_threads(threads)
    amp_dtype = amp_dtype_for(device, s["amp"])
    if amp_dtype is not None and device.type == "cpu" and main and not cpu_has_bf16():
        print("--amp: this CPU has no bf16 instructions (avx512_bf16 or amx_bf16), so bf16 "
              "autocast is emulated: measured 20x slower than fp32 on an AVX2 CPU. --amp "
              "helps on GPUs and on CPUs with those instructions; drop it here.",
              file=sys.stderr)

    if s["download"] and d.world > 1:
        # Rank 0 downloads, once; every rank learns the outcome from one all_reduce (a rank
        # waiting in a barrier for a rank that failed would hang).
        failed = None
        if main:
            try:
                data_mod.load(s["data"], s["data_dir"], download=True,
                              heldout_every=s["heldout_every"])
            except (DataError, OSError) as exc:
                failed = exc
        flag = d.all_reduce_(torch.tensor([float(failed is not None)], device=device))
        if failed is not None:
            raise failed
        if float(flag) > 0:
            raise DataError("rank 0 could not download the data (see its error)")
    ds = data_mod.load(s["data"], s["data_dir"], download=s["download"] and main,
                       heldout_every=s["heldout_every"])
    if ckpt:
        _check_same_data(ckpt.get("data") or {}, ds.description)
    var = ckpt["data_variance"] if ckpt else ds.variance()

    random.seed(s["seed"])
    np.random.seed(s["seed"])
    torch.manual_seed(s["seed"])
    config = VQVAEConfig(num_codes=s["num_codes"], code_dim=s["code_dim"], hidden=s["hidden"],
                         residual_hidden=s["residual_hidden"],
                         num_residual_blocks=s["residual_blocks"], beta=s["beta"],
                         ema=bool(s["ema"]), decay=s["decay"],
                         decay_warmup=s["decay_warmup"], cosine=bool(s["cosine"]),
                         restart_after=s["restart_after"], dead_after=s["dead_after"],
                         quantizer=s["quantizer"], stages=s["stages"], groups=s["groups"],
                         codebook_dim=s["codebook_dim"],
                         quantize_dropout=bool(s["quantize_dropout"]),
                         dropout_min_stages=s["dropout_min_stages"])
    model = VQVAE(config, backend=s["backend"]).to(device)
    model.seed_quantizer(int(s["seed"]))  # the quantizer's restart draws
    opt = torch.optim.Adam(model.parameters(), lr=s["lr"])
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    sampler = ds.sampler(s["seed"])
    step, elapsed = 0, 0.0
    K, B = config.num_codes, s["batch_size"]
    n_books = config.num_books
    m_fields, e_fields = metrics_fields(n_books), eval_fields(n_books)
    args_saved = {k: v for k, v in s.items() if k != "download"}
    if main:
        # First of the run's files: a folder holding any of them holds this, which says whose
        # they are (see _foreign_files).
        _io.atomic_write_json(out / "config.json", {"config": config.to_dict(),
                                                    "args": args_saved, "data": ds.description,
                                                    "data_variance": var})
    if ckpt:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler") and scaler.is_enabled():
            scaler.load_state_dict(ckpt["scaler"])
        sampler.load_state_dict(ckpt["sampler"])
        set_rng_state(ckpt["rng"])
        step, elapsed = int(ckpt["step"]), float(ckpt["elapsed_s"])
        if main:
            _restart_csv(out / "metrics.csv", m_fields, step)
            # A complete run's final evaluation is made again when it is resumed.
            _restart_csv(out / "eval.csv", e_fields, step - 1 if ckpt.get("complete") else step)
    else:
        if main:
            for name, fields in (("metrics.csv", m_fields), ("eval.csv", e_fields)):
                _restart_csv(out / name, fields, -1)
        if s["codebook_init"] != "uniform":
            # 256 images give 16384 latent vectors: enough distinct starting points for any K
            # up to that, drawn from a fixed sample (not from the batch stream) with a generator
            # of their own: every rank computes the same codes.
            model.init_codebook(to_tensor(ds.train_sample(256, seed=s["seed"]), device),
                                s["codebook_init"],
                                generator=torch.Generator().manual_seed(int(s["seed"])))
        else:
            for book in model.books:
                book.kmeans_init = False  # the paper's uniform start, kept as it is
    net = model
    if d.world > 1 and hasattr(model.vq, "shard_dropout"):
        # Quantizer dropout draws the global batch's stage counts on every rank and keeps this
        # rank's slice: the run draws what one process does on the concatenated batch.
        model.vq.shard_dropout(d.rank, d.world)
    if d.world > 1:
        # No buffer broadcast: the quantizer synchronises its own state (and the check at each
        # checkpoint would otherwise be checking a copy of rank 0).
        import inspect
        DDP = torch.nn.parallel.DistributedDataParallel
        # broadcast_buffers is deprecated where forward_sync_buffers exists (a warning per rank)
        no_sync = ({"forward_sync_buffers": False}
                   if "forward_sync_buffers" in inspect.signature(DDP).parameters
                   else {"broadcast_buffers": False})
        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, **no_sync)
    saved_step = [int(ckpt["step"]) if ckpt else None]

    def save(final=False):
        # Called between steps only (never from inside one), on every rank at the same step.
        check_ranks_agree(model, d)
        if d.world > 1:
            # The partial log interval travels in rank 0's checkpoint: its sum over the ranks.
            d.all_reduce_(acc)
            if not main:
                acc.zero_()
        if not main:
            return
        try:
            _io.atomic_torch_save(out / CHECKPOINT, {
                "format": _io.CHECKPOINT_FORMAT, "version": _io.CHECKPOINT_VERSION,
                "config": config.to_dict(), "args": args_saved, "data": ds.description,
                "data_variance": var, "step": step, "elapsed_s": elapsed, "complete": final,
                "model": model.state_dict(), "optimizer": opt.state_dict(),
                "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                "sampler": sampler.state_dict(), "rng": rng_state(),
                # The metrics of the log interval under way, so that its row comes out as an
                # uninterrupted run's would.
                "log": {"acc": acc.detach().cpu().clone(), "steps": n_acc,
                        "restarts_logged": restarts_logged},
                "world_size": d.world, "torch_version": str(torch.__version__)})
        except _io.DiskFullError as exc:
            before = (f"the previous checkpoint there (step {saved_step[0]}) is intact"
                      if exc.existed else "no checkpoint was written")
            raise _io.UsageError(
                f"the disk is full: no space left to save step {step} to {out / CHECKPOINT}; "
                f"{before}. Free some space and continue with --out {out} --resume") from exc
        saved_step[0] = step
        plot_losses(out)
        grid = _spread(ds.heldout, 32)
        save_recon_grid(out / "reconstructions.png", grid, reconstruct(model, grid, device))

    # Evenly spaced over the held-out split: folder data is in sorted path order, so its first
    # images would all be of one class.
    eval_set = _spread(ds.heldout, s["eval_images"])
    if main:
        procs = f" x {d.world} processes" if d.world > 1 else ""
        why = ("" if s["threads"] or device.type != "cpu" else
               f" (the cores left idle by the load average{' per process' if d.world > 1 else ''};"
               f" --threads N sets it)")
        unit = "stages" if config.quantizer == "rvq" else "groups"
        qz = "" if config.quantizer == "vq" else f", {config.quantizer} x {n_books} {unit}"
        if config.codebook_dim is not None:
            qz += f" searched at codebook dim {config.codebook_dim}"
        if config.quantize_dropout:
            qz += f", quantizer dropout to >= {config.dropout_min_stages} stages"
        print(f"training a {model.num_parameters():,}-parameter VQ-VAE (K={K}, "
              f"D={config.code_dim}{qz}, {config.bits_per_position:g} bits a position) on "
              f"{device}{procs} with {threads} torch thread(s){why}, "
              f"quantizer backend {backend!r}; data: {ds.kind}, step {step} of {s['steps']}, "
              f"out: {out}", file=sys.stderr)
        metrics_log = CsvLog(out / "metrics.csv", m_fields)
        eval_log = CsvLog(out / "eval.csv", e_fields)
    # loss, recon, vq, commit, one perplexity per book (means over this rank's steps), then each
    # book's code counts
    H = 4 + n_books
    acc = torch.zeros(H + n_books * K, dtype=torch.float64, device=device)
    n_acc = 0
    restarts_logged = model.restart_count
    if ckpt and ckpt.get("log") is not None:
        n_acc = int(ckpt["log"]["steps"])
        restarts_logged = int(ckpt["log"]["restarts_logged"])
        if main:  # rank 0 carries the ranks' sum; the others add theirs from zero
            acc.copy_(ckpt["log"]["acc"])
    t_last = time.perf_counter()
    bar = tqdm(total=s["steps"], initial=step, disable=not (progress and main),
               dynamic_ncols=True, unit="step", mininterval=0.5 if sys.stderr.isatty() else 10.0,
               file=sys.stderr)
    model.train()
    stop = StopRequest()
    try:
        stop.install()
        while step < s["steps"]:
            x = sampler.next_batch(B * d.world)[d.rank * B:(d.rank + 1) * B]
            x = to_tensor(x, device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                o = net(x)
                loss = o.recon_loss / var + o.vq.loss
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            step += 1
            with torch.no_grad():
                acc[:4] += torch.stack([loss.detach().double(), o.recon_loss.detach().double(),
                                        o.vq.loss.detach().double(),
                                        o.vq.commitment_loss.detach().double().sum()])
                acc[4:H] += o.vq.perplexity.detach().double().reshape(-1)
                acc[H:] += book_counts(o.vq.indices, n_books, K)
            n_acc += 1
            bar.update(1)

            if step % s["log_every"] == 0 or step == s["steps"]:
                # Every rank logs at the same steps: the reduction is no data-dependent branch.
                d.all_reduce_(acc)
                now = time.perf_counter()
                dt, t_last = now - t_last, now
                elapsed += dt
                a = (acc[:H] / (n_acc * d.world)).tolist()
                used = (acc[H:].view(n_books, K) > 0).sum(1).tolist()
                if not math.isfinite(a[0]):
                    last = (f"the last checkpoint in {out} (step {saved_step[0]}) is from "
                            f"before" if saved_step[0] is not None else "no checkpoint was saved")
                    raise FloatingPointError(
                        f"training diverged at step {step} (loss {a[0]}); {last}; try a lower "
                        f"--lr")
                # The quantizer's synchronised state: no collective.
                sts = model.quantizer_stats()
                st = {"total_restarts": sum(int(x["total_restarts"]) for x in sts),
                      "dead_fraction": max(x["dead_fraction"] for x in sts)}
                if main:
                    row = dict(step=step, loss=a[0], recon_mse=a[1], recon_nmse=a[1] / var,
                               vq_loss=a[2], commitment_loss=a[3], perplexity=min(a[4:H]),
                               codes_used=min(used),
                               codes_restarted=st["total_restarts"] - restarts_logged,
                               total_restarts=st["total_restarts"],
                               dead_fraction=st["dead_fraction"],
                               steps_per_s=n_acc / dt, elapsed_s=elapsed)
                    if n_books > 1:
                        row["codes_used_total"] = sum(used)
                        row.update({f"codes_used_{i}": u for i, u in enumerate(used)})
                        row.update({f"perplexity_{i}": v for i, v in enumerate(a[4:H])})
                    metrics_log.write(row)
                    bar.set_postfix_str(
                        f"loss {a[0]:.3f} recon {a[1] / var:.3f} vq {a[2]:.4f} "
                        f"ppl {row['perplexity']:.0f} "
                        f"codes {row['codes_used']}/{K} dead {st['dead_fraction']:.1%} "
                        f"{row['steps_per_s']:.1f} steps/s", refresh=False)
                restarts_logged = st["total_restarts"]
                acc.zero_()
                n_acc = 0

            t_pause = time.perf_counter()
            if main and s["eval_every"] and step % s["eval_every"] == 0 and step < s["steps"]:
                m = evaluate(model, eval_set, var, perplexity_batch=B, device=device,
                             amp_dtype=amp_dtype)
                eval_log.write(eval_row(step, m))
                bar.write(f"step {step}: held-out mse {m['mse']:.5f} nmse {m['nmse']:.4f} "
                          f"psnr {m['psnr']:.2f} dB perplexity {m['perplexity']:.1f} codes used "
                          f"{m['codes_used']:.1%}")
            if s["save_every"] and step % s["save_every"] == 0 and step < s["steps"]:
                save()
            # Time spent evaluating and saving is not training time: steps/s and elapsed_s
            # count the training steps only.
            t_last += time.perf_counter() - t_pause
            # Stop here, between steps, when asked: every rank at the same step (the ranks
            # agree by one small all_reduce), so the checkpoint holds one step's state.
            signum = stop.signum
            if d.world > 1:
                signum = int(d.all_reduce_(torch.tensor([float(signum)], device=device),
                                           "max").item())
            if signum and step < s["steps"]:
                elapsed += time.perf_counter() - t_last
                bar.close()
                save()
                if main:
                    print(f"\n{signal.Signals(signum).name}: saved step {step} to "
                          f"{out / CHECKPOINT}; continue with --out {out} --resume",
                          file=sys.stderr)
                raise Stopped(signum)
    except KeyboardInterrupt:
        # Stopped after a save, or a second signal (or a KeyboardInterrupt from elsewhere) in
        # the middle of a step: nothing of that step is saved; the last checkpoint stands.
        stop.restore()
        bar.close()
        if main:
            metrics_log.close()
            eval_log.close()
            if not isinstance(sys.exc_info()[1], Stopped):
                last = (f"the last checkpoint, {out / CHECKPOINT}, is of step {saved_step[0]}"
                        if saved_step[0] is not None else "no checkpoint was saved")
                print(f"\naborted at step {step} without saving; {last}", file=sys.stderr)
        raise
    stop.restore()
    save(final=True)
    if not main:
        d.barrier()  # wait for rank 0's evaluation, so the launch ends together
        return {}
    m = evaluate(model, ds.heldout, var, perplexity_batch=B, device=device, amp_dtype=amp_dtype)
    eval_log.write(eval_row(step, m))
    metrics_log.close()
    eval_log.close()
    # The checkpoint was saved before the evaluation; figures again with the final eval row.
    plot_losses(out)
    m.update(checkpoint=str(out / CHECKPOINT), step=step, data=ds.description,
             backend=s["backend"], device=str(device), processes=d.world,
             train_elapsed_s=elapsed)
    _io.atomic_write_json(out / "eval.json", m)
    d.barrier()
    print(format_table(m, f"final held-out evaluation (step {step}, {ds.kind} data):"))
    print(f"wrote {out}/ (checkpoint.pt, metrics.csv, eval.csv, loss_curves.png, "
          f"reconstructions.png, eval.json)")
    return m


def book_counts(indices: torch.Tensor, n_books: int, K: int) -> torch.Tensor:
    """How often each book's codes were chosen: (n_books K,), book i's in [i K, (i + 1) K), from
    indices (..., n_books) (or (...) for one book). One bincount, no host sync: an index of -1
    (a stage that quantizer dropout left out) goes to a last bin, which is dropped."""
    idx = indices.reshape(-1, n_books)
    flat = torch.where(idx >= 0, idx + torch.arange(n_books, device=idx.device) * K, n_books * K)
    return torch.bincount(flat.reshape(-1), minlength=n_books * K + 1)[:n_books * K]


def eval_row(step: int, m: dict) -> dict:
    """eval.csv's row of `vqkernels.eval.evaluate`'s figures (per-book columns for rvq / gvq)."""
    row = {"step": step, **m}
    if len(m.get("codes_used_per_book", ())) > 1:
        row.update({f"codes_used_{i}": u for i, u in enumerate(m["codes_used_per_book"])})
        row.update({f"perplexity_{i}": u for i, u in enumerate(m["perplexity_per_book"])})
    return row


def main(argv=None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    s, ckpt = resolve_settings(p, a)
    try:
        train(s, ckpt)
    except (DataError, _io.UsageError, FileNotFoundError) as exc:
        p.error(str(exc))
    except KeyboardInterrupt as exc:
        return 128 + int(getattr(exc, "signum", signal.SIGINT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
