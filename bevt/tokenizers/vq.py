"""bevt's built-in VQ tokenizer: a small VQ-VAE trained on the user's own frames.

For users without the DALL-E weights, and for the embedded CPU default. Same interface as the DALL-E
tokenizer: uint8 (N, 3, H, W) -> ids (N, H/8, W/8).

Model (:class:`VQVAE`)::

    encoder   3 x [Conv 4x4 stride 2, ReLU] (widths 32, 64, 128), residual block, Conv 1x1 -> code_dim,
              then L2-normalised (unit vectors: the nearest code is the one of largest cosine)
    codebook  K x code_dim unit vectors; EMA updates (no gradient), dead-code restarts
    decoder   Conv 3x3, residual block, 3 x ConvTranspose 4x4 stride 2 -> 3 channels (training only)

Training (:func:`train_vq_tokenizer`) minimises ``mse(decoder(q), x) + commitment * mse(z, sg(q))`` with
the straight-through estimator; the codebook follows the encoder outputs by exponential moving averages
(Laplace-smoothed counts). The codebook starts from random encoder outputs of the first batch, and a code
no vector chose for ``restart_every`` steps is restarted at a random encoder output of the current
batch. Pixels are mapped to [-1, 1].

Files: one safetensors file, the weights plus the config in its metadata (``format: bevt-vq-tokenizer``).

Shape legend: N images, H, W pixels, h, w token grid, D code dim, K codebook size, M = N*h*w vectors.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from bevt.tokenizers.base import VQ_HOWTO, Tokenizer, check_images, read_safetensors_metadata

SAFETENSORS_FORMAT = "bevt-vq-tokenizer"
FORMAT_VERSION = "1"


@dataclass(frozen=True)
class VQConfig:
    """Size and training constants of the VQ-VAE (saved in the tokenizer file)."""

    vocab_size: int = 512
    """Codebook size K (8192 to match DALL-E's; 512 for the embedded tiny run)."""
    widths: tuple[int, int, int] = (32, 64, 128)
    """Channels of the three stride-2 stages (8x downsampling in all)."""
    code_dim: int = 32
    """Dimension D of a code vector (codes and encoder outputs are unit length: cosine distance)."""
    commitment: float = 0.25
    """Weight of the commitment loss mse(z, sg(q))."""
    decay: float = 0.95
    """EMA decay of the codebook statistics (lower moves faster; 0.99 is usual for long runs)."""
    restart_every: int = 5
    """A code chosen by no vector for this many steps in a row is restarted at a random encoder output."""
    input_channels: int = 3

    def __post_init__(self):
        if self.vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {self.vocab_size}")
        if len(self.widths) != 3 or min(self.widths) < 1:
            raise ValueError(f"widths must be three positive channel counts, got {self.widths}")
        if self.code_dim < 1:
            raise ValueError(f"code_dim must be >= 1, got {self.code_dim}")
        if not 0 <= self.decay < 1:
            raise ValueError(f"decay must be in [0, 1), got {self.decay}")
        if self.restart_every < 1:
            raise ValueError(f"restart_every must be >= 1, got {self.restart_every}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "VQConfig":
        d = json.loads(text)
        d["widths"] = tuple(d["widths"])
        return cls(**d)


# ------------------------------------------------------------------------------------ the model
class _ResBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.conv2 = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


def to_unit_range(x_NCHW: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float in [-1, 1] (the VQ tokenizer's pixel mapping)."""
    return x_NCHW.float() / 127.5 - 1.0


class VQVAE(nn.Module):
    """Encoder, EMA codebook, decoder. ``forward`` is the training pass; tokenizing is :meth:`encode_ids`."""

    def __init__(self, config: VQConfig = VQConfig()):
        super().__init__()
        self.config = config
        c0, c1, c2 = config.widths
        cin, d, k = config.input_channels, config.code_dim, config.vocab_size
        self.encoder = nn.Sequential(
            nn.Conv2d(cin, c0, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(c0, c1, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(c1, c2, 4, stride=2, padding=1),
            _ResBlock(c2), nn.ReLU(),
            nn.Conv2d(c2, d, 1),
        )
        self.decoder = nn.Sequential(
            nn.Conv2d(d, c2, 3, padding=1),
            _ResBlock(c2), nn.ReLU(),
            nn.ConvTranspose2d(c2, c1, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(c1, c0, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(c0, cin, 4, stride=2, padding=1),
        )
        # The codebook is a buffer: it moves by EMA, never by the optimizer.
        self.register_buffer("codebook", F.normalize(torch.randn(k, d), dim=1))
        self.register_buffer("ema_count", torch.ones(k))
        self.register_buffer("ema_sum", self.codebook.clone())

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def encode_vectors(self, x_NCHW: torch.Tensor) -> torch.Tensor:
        """uint8 images -> unit-length encoder outputs z (N, D, h, w)."""
        return F.normalize(self.encoder(to_unit_range(x_NCHW)).float(), dim=1)

    def nearest(self, z_MD: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code of each vector (L2), computed in fp32: (M, D) -> (M,)."""
        z_MD = z_MD.float()
        e_KD = self.codebook.float()
        dist_MK = (z_MD.pow(2).sum(1, keepdim=True) - 2 * z_MD @ e_KD.t() + e_KD.pow(2).sum(1)[None])
        return dist_MK.argmin(dim=1)

    def encode_ids(self, x_NCHW: torch.Tensor) -> torch.Tensor:
        z_NDhw = self.encode_vectors(x_NCHW)
        n, d, h, w = z_NDhw.shape
        with torch.autocast(z_NDhw.device.type, enabled=False):
            ids_M = self.nearest(z_NDhw.permute(0, 2, 3, 1).reshape(-1, d))
        return ids_M.view(n, h, w)

    def decode_ids(self, ids_Nhw: torch.Tensor) -> torch.Tensor:
        """ids (N, h, w) -> reconstructed images in [-1, 1], (N, 3, 8h, 8w)."""
        q_NDhw = self.codebook[ids_Nhw].permute(0, 3, 1, 2)
        return self.decoder(q_NDhw)

    def forward(self, x_NCHW: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training pass on uint8 images: losses, the ids and the encoder outputs (for the EMA update)."""
        target = to_unit_range(x_NCHW)
        z_NDhw = F.normalize(self.encoder(target), dim=1)
        n, d, h, w = z_NDhw.shape
        z_MD = z_NDhw.permute(0, 2, 3, 1).reshape(-1, d)
        ids_M = self.nearest(z_MD.detach())
        q_MD = self.codebook[ids_M]
        commit = F.mse_loss(z_MD, q_MD)
        q_st_MD = z_MD + (q_MD - z_MD).detach()  # straight-through: decoder grads flow into the encoder
        recon = F.mse_loss(self.decoder(q_st_MD.view(n, h, w, d).permute(0, 3, 1, 2)), target)
        loss = recon + self.config.commitment * commit
        return {"loss": loss, "recon": recon, "commit": commit, "ids": ids_M, "z": z_MD.detach()}

    @torch.no_grad()
    def init_codebook(self, z_MD: torch.Tensor, generator: torch.Generator) -> None:
        """Start every code at a random encoder output (plus a little noise): no code starts dead."""
        k = self.vocab_size
        pick = torch.randint(0, z_MD.shape[0], (k,), generator=generator).to(z_MD.device)
        noise = torch.randn(k, z_MD.shape[1], generator=generator).to(z_MD.device)
        codes = F.normalize(z_MD[pick] + 0.01 * noise / math.sqrt(z_MD.shape[1]), dim=1)
        self.codebook.copy_(codes)
        self.ema_count.fill_(z_MD.shape[0] / k)
        self.ema_sum.copy_(codes * self.ema_count[:, None])

    @torch.no_grad()
    def ema_update(self, z_MD: torch.Tensor, ids_M: torch.Tensor) -> None:
        """codebook = EMA(sum of assigned vectors) / EMA(count), counts Laplace-smoothed."""
        k, decay = self.vocab_size, self.config.decay
        onehot_MK = F.one_hot(ids_M, k).to(z_MD.dtype)
        self.ema_count.mul_(decay).add_(onehot_MK.sum(0), alpha=1 - decay)
        self.ema_sum.mul_(decay).add_(onehot_MK.t() @ z_MD, alpha=1 - decay)
        total = self.ema_count.sum()
        smoothed = (self.ema_count + 1e-5) / (total + k * 1e-5) * total
        self.codebook.copy_(F.normalize(self.ema_sum / smoothed[:, None], dim=1))

    @torch.no_grad()
    def restart_codes(self, dead_K: torch.Tensor, z_MD: torch.Tensor, generator: torch.Generator) -> int:
        """Move the codes flagged in ``dead_K`` (bool) to random encoder outputs of this batch."""
        dead = dead_K.nonzero().flatten()
        if dead.numel() == 0:
            return 0
        pick = torch.randint(0, z_MD.shape[0], (dead.numel(),), generator=generator).to(z_MD.device)
        noise = torch.randn(dead.numel(), z_MD.shape[1], generator=generator).to(z_MD.device)
        codes = F.normalize(z_MD[pick] + 0.01 * noise / math.sqrt(z_MD.shape[1]), dim=1)
        count = self.ema_count.mean().clamp_min(1e-3)
        self.codebook[dead] = codes
        self.ema_count[dead] = count
        self.ema_sum[dead] = codes * count
        return int(dead.numel())


# ------------------------------------------------------------------------------------ the tokenizer
def is_vq_tokenizer_file(path: str | os.PathLike) -> bool:
    """True if ``path`` is a safetensors file written by :meth:`VQTokenizer.save`."""
    try:
        return read_safetensors_metadata(os.fspath(path), VQ_HOWTO).get("format") == SAFETENSORS_FORMAT
    except ValueError:
        return False


class VQTokenizer(Tokenizer):
    """Frozen VQ-VAE encoder + codebook: uint8 (N, 3, H, W) -> nearest-code ids (N, H/8, W/8).

    On CUDA the convs run under bf16 autocast by default, the distances to the codebook in fp32.
    """

    default_cuda_dtype = torch.bfloat16

    def __init__(self, vqvae: VQVAE, compute_dtype: torch.dtype | str | None = None,
                 chunk_size: int | None = None, compile: bool = False):
        super().__init__(compute_dtype=compute_dtype, chunk_size=chunk_size, compile=compile)
        self.vqvae = vqvae
        self.input_channels = vqvae.config.input_channels
        self.freeze()

    @property
    def config(self) -> VQConfig:
        return self.vqvae.config

    @property
    def vocab_size(self) -> int:
        return self.vqvae.vocab_size

    def _encode_chunk(self, x_NCHW: torch.Tensor) -> torch.Tensor:
        return self.vqvae.encode_ids(x_NCHW)

    @torch.no_grad()
    def decode(self, ids_Nhw: torch.Tensor) -> torch.Tensor:
        """ids (N, h, w) -> uint8 reconstructions (N, 3, 8h, 8w), to look at what the codes hold."""
        if ids_Nhw.dim() != 3 or ids_Nhw.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"ids must be integer (N, h, w), got {ids_Nhw.dtype} {tuple(ids_Nhw.shape)}")
        x = self.vqvae.decode_ids(ids_Nhw.to(self.device).long())
        return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)

    def save(self, path: str | os.PathLike) -> None:
        """One safetensors file: every weight and codebook buffer, the config in the metadata."""
        from safetensors.torch import save_file

        state = {k: v.detach().contiguous().cpu() for k, v in self.vqvae.state_dict().items()}
        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        save_file(state, path, metadata={"format": SAFETENSORS_FORMAT, "version": FORMAT_VERSION,
                                         "config": self.config.to_json()})

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str | None = None,
             compute_dtype: torch.dtype | str | None = None) -> "VQTokenizer":
        """Read a file written by :meth:`save`; a file of another kind is refused with the reason."""
        from safetensors.torch import load_file

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"VQ tokenizer file not found: {path!r}; {VQ_HOWTO}")
        meta = read_safetensors_metadata(path, VQ_HOWTO)
        if meta.get("format") != SAFETENSORS_FORMAT:
            raise ValueError(f"{path!r} is not a bevt VQ tokenizer file (its safetensors metadata has format="
                             f"{meta.get('format')!r}, expected {SAFETENSORS_FORMAT!r})")
        if meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path!r}: VQ tokenizer file version {meta.get('version')!r}; this bevt reads "
                             f"version {FORMAT_VERSION}")
        vqvae = VQVAE(VQConfig.from_json(meta["config"]))
        vqvae.load_state_dict(load_file(path))
        tok = cls(vqvae, compute_dtype=compute_dtype)
        return tok if device is None else tok.to(device)


# ------------------------------------------------------------------------------------ training
def _frame_batches(frames, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Batches of ``batch_size`` uint8 frames: random draws (without replacement per pass) from a tensor,
    or the concatenated stream of an iterable of batches (re-iterated while it can be)."""
    if isinstance(frames, torch.Tensor):
        check_images(frames)
        n = frames.shape[0]
        while True:
            order = torch.randperm(n, generator=generator)
            for start in range(0, n - batch_size + 1, batch_size) if n >= batch_size else [0]:
                yield frames[order[start:start + batch_size]]
    pending: list[torch.Tensor] = []
    held = 0
    while True:
        any_item = False
        for item in frames:
            check_images(item)
            any_item = True
            pending.append(item)
            held += item.shape[0]
            while held >= batch_size:
                flat = torch.cat(pending)
                yield flat[:batch_size]
                pending, held = [flat[batch_size:]], flat.shape[0] - batch_size
        if not any_item or iter(frames) is frames:  # an exhausted iterator cannot start again
            if held:
                yield torch.cat(pending)
            return


def train_vq_tokenizer(frames: torch.Tensor | Iterable[torch.Tensor], *, vocab_size: int = 512, steps: int = 300,
                       batch_size: int = 32, lr: float = 2e-3, seed: int = 0,
                       device: torch.device | str | None = None, log_every: int = 10, progress: bool = True,
                       config: VQConfig | None = None) -> tuple[VQTokenizer, list[dict]]:
    """Fit a VQ tokenizer on uint8 frames; return it (frozen, on ``device``) and the training history.

    Args:
        frames: uint8 (N, 3, H, W) with H, W multiples of 8 (drawn at random, seeded), or an iterable of
            such batches (consumed in order, re-iterated if it can be).
        vocab_size: codebook size K (overrides ``config.vocab_size``).
        device: None picks CUDA when available, else the CPU.
        config: the rest of the model's settings (:class:`VQConfig`).
    Returns:
        (tokenizer, history): one dict per ``log_every`` steps (and the last) with step, loss, recon,
        commit, perplexity (exp of the code-usage entropy over those steps), usage (fraction of the K codes
        chosen over those steps) and restarts (codes restarted over those steps).
    """
    if steps < 1 or batch_size < 1 or log_every < 1:
        raise ValueError(f"steps, batch_size and log_every must be >= 1, got {steps}, {batch_size}, {log_every}")
    config = dataclasses.replace(config or VQConfig(), vocab_size=vocab_size)
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # seeded init, without touching the caller's RNG
        torch.manual_seed(seed)
        model = VQVAE(config).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    k = config.vocab_size

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="vq tokenizer", unit="step")
    history: list[dict] = []
    window_counts = torch.zeros(k, device=device)  # code choices since the last log
    idle_steps = torch.zeros(k, dtype=torch.long, device=device)  # steps since each code was last chosen
    sums = {"loss": 0.0, "recon": 0.0, "commit": 0.0}
    window = {"steps": 0, "restarts": 0}

    def log(step: int) -> None:
        p = window_counts / window_counts.sum()
        entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
        record = {"step": step, **{key: v / window["steps"] for key, v in sums.items()},
                  "perplexity": math.exp(entropy), "usage": (window_counts > 0).float().mean().item(),
                  "restarts": window["restarts"]}
        history.append(record)
        if bar is not None:
            bar.set_postfix(loss=f"{record['loss']:.4f}", ppl=f"{record['perplexity']:.0f}",
                            usage=f"{record['usage']:.2f}")
        window_counts.zero_()
        sums.update(dict.fromkeys(sums, 0.0))
        window.update(steps=0, restarts=0)

    step = 0
    for step, x in enumerate(_frame_batches(frames, batch_size, gen), start=1):
        x = x.to(device, non_blocking=True)
        if step == 1:
            with torch.no_grad():
                z = model.encode_vectors(x)
                model.init_codebook(z.permute(0, 2, 3, 1).reshape(-1, config.code_dim), gen)
        out = model(x)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        model.ema_update(out["z"], out["ids"])

        # Dead codes: chosen by no vector for restart_every steps in a row. With K above the vectors of a
        # batch this also recycles rare codes; that churn keeps the codebook on the data and helped usage
        # and reconstruction in every run we tried.
        counts = torch.bincount(out["ids"], minlength=k)
        window_counts += counts
        idle_steps = torch.where(counts > 0, torch.zeros_like(idle_steps), idle_steps + 1)
        dead = idle_steps >= config.restart_every
        window["restarts"] += model.restart_codes(dead, out["z"], gen)
        idle_steps[dead] = 0
        window["steps"] += 1
        for key in sums:
            sums[key] += out[key].item()  # a host sync per step: fine for a model this small
        if step % log_every == 0 or step == steps:
            log(step)
        if bar is not None:
            bar.update(1)
        if step == steps:
            break
    if bar is not None:
        bar.close()
    if step == 0:
        raise ValueError("train_vq_tokenizer got no frames")
    if step < steps:
        warnings.warn(f"the frame iterable ran out after {step} of {steps} steps", stacklevel=2)
        if window["steps"]:
            log(step)
    return VQTokenizer(model), history
