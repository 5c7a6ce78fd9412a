"""The VQ-VAE of van den Oord et al. 2017 ("Neural Discrete Representation Learning", section 4.1)
for 32x32 RGB images, laid out as in Sonnet's vqvae_example and its common PyTorch port.

  encoder: conv 4x4/2 (3 -> hidden/2), ReLU, conv 4x4/2 (-> hidden), ReLU, conv 3x3,
           residual stack (num_residual_blocks x [ReLU, conv 3x3 -> residual_hidden, ReLU,
           conv 1x1 -> hidden]), ReLU, then a 1x1 conv to code_dim channels
  quantizer: on the (B, code_dim, 8, 8) latent, channel-first (the kernels read it in place, no
           permute copy), one of (config.quantizer)
             vq   VectorQuantizer(num_codes, code_dim, beta): one codebook, log2 K bits a position
             rvq  ResidualVectorQuantizer: `stages` codebooks of num_codes codes each, stage s
                  quantizing what stages < s left; S log2 K bits a position
             gvq  GroupedVectorQuantizer: code_dim split into `groups` groups of code_dim / G
                  channels, each with its own codebook of num_codes codes; G log2 K bits
           Every codebook gets the same upkeep (EMA, restarts, usage statistics).
  decoder: conv 3x3 (code_dim -> hidden), residual stack, ReLU, transposed conv 4x4/2 (-> hidden/2),
           ReLU, transposed conv 4x4/2 (-> 3)

Images are float tensors (B, 3, H, W) in [-0.5, 0.5] (`vqkernels.data.to_tensor`), Sonnet's range.
The decoder output is not squashed: the MSE reconstruction loss alone keeps it in range.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .quantizers.upkeep import check_positive_int
from .quantize import VQOutput
from .quantizers import GroupedVectorQuantizer, ResidualVectorQuantizer, VectorQuantizer

QUANTIZERS = ("vq", "rvq", "gvq")


@dataclass(frozen=True)
class VQVAEConfig:
    """Every size of the model. K and D default to the paper's CIFAR-10 best (256 x 256)."""
    num_codes: int = 256            # K (of each stage / group's codebook)
    code_dim: int = 256             # D
    hidden: int = 128               # channels of the 8x8 trunk (the first conv uses hidden // 2)
    residual_hidden: int = 32       # bottleneck width inside each residual block (Sonnet: 32)
    num_residual_blocks: int = 2
    beta: float = 0.25              # commitment weight
    in_channels: int = 3
    image_size: int = 32            # must be divisible by 4: two stride-2 stages
    # The codebook's upkeep defaults to a recipe that does not collapse (see VectorQuantizer):
    # EMA updates and restarts of codes unused for 2 steps.
    ema: bool = True                # EMA codebook updates instead of the codebook loss's gradient
    decay: float = 0.99             # EMA decay
    decay_warmup: int = 10          # EMA decay warm-up (VectorQuantizer's decay_warmup); 0 = off
    cosine: bool = False            # l2-normalised codes and latents
    restart_after: int = 2          # replace codes unused this many training steps (more when
    #                                 K > rows a step: VectorQuantizer's restart_after); 0 = never
    dead_after: int = 100           # a code unused this many steps counts as dead in vq.stats()
    quantizer: str = "vq"           # vq, rvq (residual) or gvq (grouped); see the module docstring
    stages: int = 1                 # rvq: codebooks applied in turn to the residual
    groups: int = 1                 # gvq: code_dim splits into this many equal groups
    # rvq: stage s searches project_in[s](residual) of codebook_dim channels and adds
    # project_out[s](code); gvq: group g searches project_in[g](its code_dim / groups channels)
    # and outputs project_out[g](code) (learned linear maps); None = no projections
    codebook_dim: Optional[int] = None
    quantize_dropout: bool = False  # rvq: each image keeps its first n stages in training, n
    dropout_min_stages: int = 1     # uniform in [dropout_min_stages, stages] (SoundStream)

    def __post_init__(self):
        for name in ("num_codes", "code_dim", "hidden", "residual_hidden", "in_channels",
                     "image_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.hidden < 2:
            raise ValueError(f"hidden must be >= 2 (the first conv has hidden // 2 channels), "
                             f"got {self.hidden}")
        if not isinstance(self.num_residual_blocks, int) or self.num_residual_blocks < 0:
            raise ValueError(f"num_residual_blocks must be an int >= 0, got "
                             f"{self.num_residual_blocks!r}")
        if not (isinstance(self.beta, (int, float)) and self.beta >= 0):
            raise ValueError(f"beta must be a number >= 0, got {self.beta!r}")
        check_positive_int("restart_after", self.restart_after, minimum=0)
        check_positive_int("decay_warmup", self.decay_warmup, minimum=0)
        check_positive_int("dead_after", self.dead_after)
        if self.image_size % 4:
            raise ValueError(f"image_size must be divisible by 4, got {self.image_size}")
        if self.quantizer not in QUANTIZERS:
            raise ValueError(f"quantizer must be one of {', '.join(QUANTIZERS)}, got "
                             f"{self.quantizer!r}")
        check_positive_int("stages", self.stages)
        check_positive_int("groups", self.groups)
        if self.stages != 1 and self.quantizer != "rvq":
            raise ValueError(f"stages={self.stages} needs quantizer='rvq' (quantizer is "
                             f"{self.quantizer!r})")
        if self.groups != 1 and self.quantizer != "gvq":
            raise ValueError(f"groups={self.groups} needs quantizer='gvq' (quantizer is "
                             f"{self.quantizer!r})")
        if self.code_dim % self.groups:
            raise ValueError(f"groups={self.groups} must divide code_dim={self.code_dim}")
        if self.codebook_dim is not None:
            if self.quantizer not in ("rvq", "gvq"):
                raise ValueError(f"codebook_dim={self.codebook_dim} needs quantizer='rvq' or "
                                 f"'gvq' (quantizer is {self.quantizer!r})")
            check_positive_int("codebook_dim", self.codebook_dim)
            # The channels one stage / group projects from: code_dim, or code_dim / groups.
            width, what = ((self.code_dim, f"code_dim={self.code_dim}") if self.quantizer == "rvq"
                           else (self.code_dim // self.groups,
                                 f"code_dim / groups = {self.code_dim // self.groups}"))
            if self.codebook_dim >= width:
                raise ValueError(f"codebook_dim={self.codebook_dim} must be smaller than "
                                 f"{what} (None: no projections)")
        if not isinstance(self.quantize_dropout, bool):
            raise ValueError(f"quantize_dropout must be a bool, got {self.quantize_dropout!r}")
        if self.quantize_dropout and self.quantizer != "rvq":
            raise ValueError(f"quantize_dropout needs quantizer='rvq' (quantizer is "
                             f"{self.quantizer!r})")
        check_positive_int("dropout_min_stages", self.dropout_min_stages, minimum=0)
        if self.dropout_min_stages > self.stages:
            raise ValueError(f"dropout_min_stages={self.dropout_min_stages} exceeds "
                             f"stages={self.stages}")

    @property
    def latent_size(self) -> int:
        return self.image_size // 4

    @property
    def num_books(self) -> int:
        """Codebooks: stages of rvq, groups of gvq, 1 for vq."""
        return self.stages * self.groups

    @property
    def bits_per_position(self) -> float:
        """Bits of the indices of one latent position: num_books x log2 K."""
        import math
        return self.num_books * math.log2(self.num_codes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "VQVAEConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown VQVAEConfig fields {sorted(unknown)}")
        return cls(**d)


class VQVAEOutput(NamedTuple):
    recon: Tensor        # (B, C, H, W) reconstruction
    z_e: Tensor          # (B, D, h, w) encoder output
    vq: VQOutput         # quantizer output (z_q, indices (B, h, w), losses, perplexity); for
                         # rvq / gvq a RVQOutput / GVQOutput: indices (B, h, w, S or G), losses
                         # and perplexity per stage / group, `loss` their weighted sum
    recon_loss: Tensor   # mean squared error of recon against the input


class ResidualStack(nn.Module):
    def __init__(self, channels: int, residual_hidden: int, num_blocks: int):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.ReLU(), nn.Conv2d(channels, residual_hidden, 3, padding=1),
                          nn.ReLU(), nn.Conv2d(residual_hidden, channels, 1))
            for _ in range(num_blocks))

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = x + block(x)
        # The stack ends in a ReLU (as in Sonnet): the blocks themselves start with one, so the
        # skip path carries pre-activation values.
        return F.relu(x)


class Encoder(nn.Module):
    def __init__(self, c: VQVAEConfig):
        super().__init__()
        h = c.hidden
        self.net = nn.Sequential(
            nn.Conv2d(c.in_channels, h // 2, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(h // 2, h, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(h, h, 3, padding=1),
            ResidualStack(h, c.residual_hidden, c.num_residual_blocks))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Decoder(nn.Module):
    def __init__(self, c: VQVAEConfig):
        super().__init__()
        h = c.hidden
        self.net = nn.Sequential(
            nn.Conv2d(c.code_dim, h, 3, padding=1),
            ResidualStack(h, c.residual_hidden, c.num_residual_blocks),
            nn.ConvTranspose2d(h, h // 2, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(h // 2, c.in_channels, 4, stride=2, padding=1))

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)


class VQVAE(nn.Module):
    """VQ-VAE with a tokenizer interface: `encode(images) -> LongTensor[B, h, w]`,
    `decode(indices) -> images`, and `forward(images) -> VQVAEOutput` for training.

    `backend` picks the quantizer's kernel ("auto": the fastest one that runs here); it is a runtime
    choice, not part of the config, so a checkpoint trained on a GPU loads on a CPU.
    """

    def __init__(self, config: VQVAEConfig | None = None, *, backend: str = "auto"):
        super().__init__()
        self.config = c = config or VQVAEConfig()
        self.encoder = Encoder(c)
        self.pre_vq = nn.Conv2d(c.hidden, c.code_dim, 1)
        kw = dict(channel_dim=1, backend=backend, ema=c.ema, decay=c.decay, cosine=c.cosine,
                  decay_warmup=c.decay_warmup or None,
                  restart_after=c.restart_after or None, dead_after=c.dead_after,
                  kmeans_init=True)  # unless init_codebook runs first
        if c.quantizer == "rvq":
            self.vq = ResidualVectorQuantizer(c.code_dim, c.stages, c.num_codes, c.beta,
                                              codebook_dim=c.codebook_dim,
                                              quantize_dropout=c.quantize_dropout,
                                              dropout_min_stages=c.dropout_min_stages, **kw)
        elif c.quantizer == "gvq":
            self.vq = GroupedVectorQuantizer(c.code_dim, c.groups, c.num_codes, c.beta,
                                             codebook_dim=c.codebook_dim, **kw)
        else:
            self.vq = VectorQuantizer(c.num_codes, c.code_dim, c.beta, **kw)
        self.decoder = Decoder(c)

    @classmethod
    def from_checkpoint(cls, path, *, device="cpu", backend: str = "auto") -> "VQVAE":
        """The trained model of a `python -m vqkernels.train` run, in eval mode: `path` is its
        checkpoint.pt or its --out folder. The documented way to load a model (and the tokenizer:
        `model.encode(images)` gives the token grids, `model.decode(tokens)` the images).

        Loads with weights_only (a checkpoint cannot run code) after checking the CRC of every
        record; a missing, damaged or foreign file raises FileNotFoundError / ValueError saying
        which. `backend` picks the quantizer's kernel, as in the constructor; `device` where the
        weights go."""
        from . import _io
        model = _io.model_from_checkpoint(_io.load_checkpoint(path, arg="path"), device=device,
                                          backend=backend)
        if not isinstance(model, cls):
            raise TypeError(f"{path} holds a {type(model).__name__}, not a {cls.__name__}")
        return model

    @property
    def backend(self) -> str:
        return self.vq.backend

    @backend.setter
    def backend(self, name: str) -> None:
        from .backends import ALL_NAMES
        if name not in ALL_NAMES:
            raise ValueError(f"backend must be one of {ALL_NAMES}, got {name!r}")
        self.vq.backend = name
        for b in self.books:
            b.backend = name

    # -- the codebooks, whatever the quantizer: one VectorQuantizer per stage / group
    @property
    def books(self) -> list:
        """The quantizer's codebooks as VectorQuantizers, in stage / group order (one for vq)."""
        return [self.vq] if isinstance(self.vq, VectorQuantizer) else list(self.vq.books)

    def seed_quantizer(self, seed: int) -> None:
        """Seed the codebooks' restart and k-means++ draws (book i: seed + 7919 i, as the
        multi-codebook modules offset them, so that books do not pick the same rows)."""
        for i, b in enumerate(self.books):
            b.seed = int(seed) + i * 7919

    def quantizer_stats(self) -> list[dict]:
        """Each codebook's `VectorQuantizer.stats()` (a list of one for vq)."""
        return [b.stats() for b in self.books]

    @property
    def restart_count(self) -> int:
        """Dead-code restarts since initialisation, summed over the codebooks."""
        return sum(int(b.restart_count) for b in self.books)

    def _check_images(self, images: Tensor) -> None:
        c = self.config
        if not isinstance(images, Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if images.dim() != 4 or images.shape[1] != c.in_channels:
            raise ValueError(f"images must have shape (B, {c.in_channels}, H, W), got "
                             f"{tuple(images.shape)}")
        if images.shape[2] % 4 or images.shape[3] % 4:
            raise ValueError(f"images' height and width must be divisible by 4, got "
                             f"{tuple(images.shape[2:])}")
        if not images.is_floating_point():
            raise TypeError(f"images must be floating point (scaled to [-0.5, 0.5]; see "
                            f"vqkernels.data.to_tensor), got {images.dtype}")

    def encode_latent(self, images: Tensor) -> Tensor:
        """The continuous latent z_e, (B, D, H/4, W/4)."""
        self._check_images(images)
        return self.pre_vq(self.encoder(images))

    def forward(self, images: Tensor) -> VQVAEOutput:
        z_e = self.encode_latent(images)
        vq = self.vq(z_e)
        recon = self.decoder(vq.z_q)
        recon_loss = F.mse_loss(recon.float(), images.float())
        return VQVAEOutput(recon, z_e, vq, recon_loss)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Token grid of each image: LongTensor (B, H/4, W/4) of code indices in [0, K); with
        rvq / gvq (B, H/4, W/4, S or G), one index per stage / group on the last axis.
        Encoding changes nothing, in training mode too: the quantizer's upkeep (step count,
        EMA, restarts, k-means init) runs only in training forwards, not here."""
        z_e = self.encode_latent(images)
        was = self.vq.training
        self.vq.eval()
        try:
            return self.vq(z_e).indices
        finally:
            self.vq.train(was)

    @property
    def token_shape(self) -> str:
        c = self.config
        return "(B, h, w)" if c.quantizer == "vq" else f"(B, h, w, {c.num_books})"

    def embed(self, indices: Tensor) -> Tensor:
        """Codes of a token grid, channel-first: (B, h, w) -> (B, D, h, w) (rvq / gvq:
        (B, h, w, S or G) -> (B, D, h, w), the summed / concatenated codes). A gather, no
        one-hot."""
        want = self.token_shape
        if not isinstance(indices, Tensor) or indices.dtype not in (torch.int64, torch.int32,
                                                                    torch.int16, torch.uint8):
            raise TypeError(f"indices must be an integer torch.Tensor {want}")
        multi = self.config.quantizer != "vq"
        if indices.dim() != (4 if multi else 3) or (multi and
                                                    indices.shape[-1] != self.config.num_books):
            raise ValueError(f"indices must have shape {want}, got {tuple(indices.shape)}")
        K = self.config.num_codes
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= K):
            raise ValueError(f"indices must lie in [0, {K}), got values in "
                             f"[{int(indices.min())}, {int(indices.max())}]")
        if multi:
            return self.vq.codes_from_indices(indices.long()).permute(0, 3, 1, 2)
        return F.embedding(indices.long(), self.vq.codebook).permute(0, 3, 1, 2)

    @torch.no_grad()
    def decode(self, indices: Tensor) -> Tensor:
        """Images (B, C, 4h, 4w) in the data range from a token grid (B, h, w) (rvq / gvq:
        (B, h, w, S or G))."""
        return self.decoder(self.embed(indices))

    # -- codebook initialisation (used by vqkernels.train). Dead-code restarts live in the
    # quantizer (config.restart_after), which keeps the ranks of a DDP run in step.
    @staticmethod
    def _rows(z_e: Tensor) -> Tensor:
        return z_e.detach().movedim(1, -1).reshape(-1, z_e.shape[1])

    @torch.no_grad()
    def init_codebook(self, images: Tensor, method: str = "data", *,
                      generator: torch.Generator | None = None, kmeans_iters: int = 10) -> None:
        """Start the codes on encoder outputs of `images`. The uniform +-1/K start sits far from
        where the encoder's outputs land, so at first one code wins every vector and the rest never
        get a gradient; starting on the data avoids that collapse (as Jukebox and SoundStream do).

        method "data": K encoder outputs drawn at random (with replacement when there are fewer
        than K); "kmeans": k-means++ seeding plus `kmeans_iters` Lloyd iterations over all of them
        (vqkernels.quantizers.upkeep.kmeans_plusplus, through the quantizer's own search backend).
        Draws come from `generator` (torch's global RNG when None): the same images and generator
        give the same codes on every rank of a distributed run.
        """
        if method not in ("data", "kmeans"):
            raise ValueError(f"method must be 'data' or 'kmeans', got {method!r}")
        rows = self._rows(self.encode_latent(images)).float()  # no quantizer pass, no upkeep
        rows = rows[torch.isfinite(rows).all(1)]  # a NaN or inf row would make a NaN code
        if rows.shape[0] == 0:
            raise ValueError("init_codebook: the encoder gave no finite output for these images")
        c = self.config
        if generator is None:
            generator = torch.Generator().manual_seed(int(torch.randint(2**62, (1,))))
        if c.quantizer == "gvq":
            # Group g's book starts on group g's channels of the same rows (projected by the
            # group's project_in with codebook_dim).
            d = c.code_dim // c.groups
            for g, book in enumerate(self.books):
                self._init_book(book, self.vq._projected(g, rows[:, g * d:(g + 1) * d]), method,
                                generator, kmeans_iters)
        else:
            # Stage s's book starts on the residuals that the (initialised) stages < s leave, the
            # rows it will search (projected by the stage's project_in with codebook_dim); vq is
            # the one-stage case.
            r = rows
            proj = c.codebook_dim is not None
            for s, book in enumerate(self.books):
                codes = self._init_book(book, self.vq._projected(s, r) if proj else r, method,
                                        generator, kmeans_iters)
                if book is not self.books[-1]:  # rvq: the stage's own search
                    from .quantize import nearest_code
                    x = self.vq._stage_input(s, r)  # (projected and) normalised with cosine
                    cb = F.normalize(codes, dim=1) if c.cosine else codes
                    idx, _ = nearest_code(x, cb, backend=book.backend)
                    r = r - (self.vq._stage_output(s, cb[idx]) if proj else cb[idx])

    @staticmethod
    def _init_book(book, rows: Tensor, method: str, generator: torch.Generator,
                   kmeans_iters: int) -> Tensor:
        K = book.num_codes
        if method == "kmeans":
            from .quantizers.upkeep import kmeans_plusplus
            x = F.normalize(rows, dim=1) if book.cosine else rows
            codes = kmeans_plusplus(x, K, generator=generator, iters=kmeans_iters,
                                    backend=book.backend, cosine=book.cosine)
        else:
            pick = (torch.randperm(rows.shape[0], generator=generator)[:K] if rows.shape[0] >= K
                    else torch.randint(rows.shape[0], (K,), generator=generator)).to(rows.device)
            codes = rows[pick]
        # set_codebook also restarts the EMA statistics, which a plain write would leave behind.
        book.set_codebook(codes.to(book.codebook.dtype))
        return codes

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
