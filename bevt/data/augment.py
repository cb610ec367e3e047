"""Clip-consistent RandAugment and random erasing, on the device (official SSv2 fine-tuning augmentation).

Shape legend: B batch, T frames, C = 3 RGB channels, H/W frame height/width.

The official SSv2 pipeline (REFERENCE_BEVT.md section 4.3) is ``... -> Imgaug(RandAugment(n=4, m=7)) ->
Normalize -> RandomErasing(0.25)``:

* mmaction's ``Imgaug`` calls ``aug.to_deterministic()`` once per clip and applies it to every frame, so
  every frame of a clip gets the same operations with the same magnitudes (data-dependent operations
  such as equalize still look at each frame's own histogram);
* its RandAugment is imgaug 0.4's ``iaa.RandAugment``: an initial ``Fliplr(0.5)`` and a crop of
  ``U(0, m) / 224`` of each side resized back, then ``SomeOf(n)`` distinct operations out of 17 in random
  order, magnitudes ``m / 30`` of each operation's maximum (listed in :data:`RANDAUG_OPS`);
* BEVT's ``RandomErasing`` is timm's (``mode='const'``: the box is filled with 0 in the normalized
  space, i.e. the mean colour; area 2-33 %, aspect 0.3-3.3, one box, 10 attempts) with the RNG state
  reset before every frame, so every frame gets the same box.

Note that imgaug's RandAugment **flips half of the clips** even in the SSv2 recipe, which sets
``Flip(flip_ratio=0)`` (SSv2 has left/right classes): :class:`RandAugment` does the same by default
(``initial_flip=True``, as the published numbers were obtained that way); set it to False to keep
left/right labels intact.

Here both run inside the training step on the device, on the whole batch of uint8-valued clips, with
their random draws taken on the host from a per-sample ``numpy`` generator keyed by
``(seed, epoch, dataset index)``: the same sample gets the same augmentation whatever the batch, the
number of processes or a resume, and the step needs no host sync. Pixel arithmetic follows PIL / imgaug
(nearest-neighbour affine warps filled with imgaug's ``cval``, PIL's integer grey levels and 3x3 / 5x5
filter kernels with untouched borders, uint8 rounding after every operation); results can differ from
PIL by a grey level where PIL rounds differently.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["RANDAUG_OPS", "AugOp", "RandAugment", "ErasingBox", "RandomErasing", "sample_rng", "apply_ops"]

M_MAX = 30.0  # imgaug's magnitude scale
# imgaug 0.4 RandAugment's main operations, in its order
RANDAUG_OPS = ("identity", "autocontrast", "equalize", "invert", "rotate", "posterize", "solarize", "color",
               "contrast", "brightness", "sharpness", "shear_x", "shear_y", "translate_x", "translate_y",
               "cutout", "blur", "smooth")
_RANDAUG_SALT = 0x52A06
_ERASING_SALT = 0xE2A5E


def sample_rng(seed: int, epoch: int, index: int, salt: int) -> np.random.Generator:
    """The generator of one sample's augmentation draws (independent of the loader's own draws)."""
    return np.random.default_rng([int(seed), int(epoch), int(index), int(salt)])


@dataclass(frozen=True)
class AugOp:
    """One drawn operation: ``name`` (a :data:`RANDAUG_OPS` entry, or ``flip`` / ``crop``) and its value.

    ``value``: degrees (rotate, shear), a fraction of the side (translate, cutout size), a factor
    (colour/contrast/brightness/sharpness), bits kept (posterize), a threshold (solarize),
    ``(top, right, bottom, left)`` fractions (crop) or ``(cy, cx)`` relative centre + size (cutout).
    """

    name: str
    value: tuple = ()


class RandAugment:
    """imgaug 0.4 ``RandAugment(n, m)`` drawn per clip, applied identically to every frame.

    Args:
        n: operations applied per clip (distinct, random order).
        m: magnitude on imgaug's 0..30 scale (official SSv2: n=4, m=7).
        cval: fill value of the affine warps and the cutout (imgaug: 128; PIL fills an RGB image given
            one integer as ``(cval, 0, 0)``, which the warps reproduce).
        initial_flip / initial_crop: imgaug's always-applied ``Fliplr(0.5)`` and side crop.
    """

    def __init__(self, n: int = 4, m: float = 7, *, cval: int = 128, initial_flip: bool = True,
                 initial_crop: bool = True):
        if not 0 <= n <= len(RANDAUG_OPS):
            raise ValueError(f"RandAugment n must be in [0, {len(RANDAUG_OPS)}], got {n}")
        if not 0 <= m <= M_MAX:
            raise ValueError(f"RandAugment m must be in [0, {M_MAX:g}], got {m}")
        self.n, self.m, self.cval = int(n), float(m), int(cval)
        self.initial_flip, self.initial_crop = initial_flip, initial_crop

    # -- the draws (host) ----------------------------------------------------------------------------
    def sample(self, rng: np.random.Generator) -> list[AugOp]:
        """The operations of one clip, in the order they are applied."""
        m, level = self.m, self.m / M_MAX
        ops: list[AugOp] = []
        if self.initial_flip and rng.random() < 0.5:
            ops.append(AugOp("flip"))
        if self.initial_crop:
            fr = rng.uniform(0.0, m, size=4) / 224.0  # top, right, bottom, left
            if fr.any():
                ops.append(AugOp("crop", tuple(float(v) for v in fr)))
        chosen = rng.choice(len(RANDAUG_OPS), size=self.n, replace=False)
        for k in chosen:
            name = RANDAUG_OPS[int(k)]
            sign = 1.0 if rng.random() < 0.5 else -1.0
            if name == "rotate":
                ops.append(AugOp(name, (sign * level * 30.0,)))
            elif name in ("shear_x", "shear_y"):
                ops.append(AugOp(name, (sign * level * math.degrees(0.3),)))
            elif name in ("translate_x", "translate_y"):
                ops.append(AugOp(name, (sign * level * 0.33,)))
            elif name == "posterize":
                ops.append(AugOp(name, (8 - int(np.clip(int(level * 6), 0, 6)),)))
            elif name == "solarize":
                ops.append(AugOp(name, (int(np.clip(256 - int(level * 256), 0, 256)),)))
            elif name in ("color", "contrast", "brightness", "sharpness"):
                ops.append(AugOp(name, (float(np.clip(1.0 + sign * level * 0.9, 0.1, 1.9)),)))
            elif name == "cutout":
                size = float(np.clip(level * 20 / 32, 0, 20 / 32))
                ops.append(AugOp(name, (float(rng.random()), float(rng.random()), size)))
            else:
                ops.append(AugOp(name))
        return ops

    def __call__(self, x_BCTHW: torch.Tensor, seed: int, epoch: int, indices) -> torch.Tensor:
        """Augment a batch of uint8 clips (B, 3, T, H, W) -> uint8, same shape, each clip with its draws."""
        if x_BCTHW.dim() != 5 or x_BCTHW.shape[1] != 3:
            raise ValueError(f"expected uint8 clips (B, 3, T, H, W), got shape {tuple(x_BCTHW.shape)}")
        idx = [int(i) for i in indices]
        if len(idx) != x_BCTHW.shape[0]:
            raise ValueError(f"{len(idx)} sample indices for a batch of {x_BCTHW.shape[0]}")
        out = []
        for b, i in enumerate(idx):
            ops = self.sample(sample_rng(seed, epoch, i, _RANDAUG_SALT))
            clip_TCHW = x_BCTHW[b].transpose(0, 1)
            out.append(apply_ops(clip_TCHW, ops, cval=self.cval).transpose(0, 1))
        return torch.stack(out)


# ----------------------------------------------------------------------------------------------------
# The operations, on (T, 3, H, W) tensors of uint8 values
# ----------------------------------------------------------------------------------------------------

def _q(x: torch.Tensor) -> torch.Tensor:
    """Back to uint8 values (PIL works on uint8 between operations)."""
    return x.round().clamp_(0, 255)


def _gray(x_TCHW: torch.Tensor) -> torch.Tensor:
    """PIL ``convert("L")``: (R*19595 + G*38470 + B*7471 + 0x8000) >> 16 -> (T, 1, H, W)."""
    r, g, b = x_TCHW[:, 0:1], x_TCHW[:, 1:2], x_TCHW[:, 2:3]
    return torch.floor((r * 19595 + g * 38470 + b * 7471 + 32768) / 65536)


def _blend(degenerate: torch.Tensor, x: torch.Tensor, factor: float) -> torch.Tensor:
    """PIL ``ImageEnhance``: degenerate + factor * (image - degenerate)."""
    return _q(degenerate + factor * (x - degenerate))


def _filter(x_TCHW: torch.Tensor, kernel: list[list[float]], scale: float) -> torch.Tensor:
    """PIL ``Image.filter`` with a k x k kernel: interior pixels filtered, a (k // 2)-pixel border kept."""
    k = torch.tensor(kernel, dtype=x_TCHW.dtype, device=x_TCHW.device) / scale
    ks = k.shape[0]
    r = ks // 2
    T, C, H, W = x_TCHW.shape
    if H <= 2 * r or W <= 2 * r:
        return x_TCHW
    y = F.conv2d(x_TCHW.reshape(T * C, 1, H, W), k.view(1, 1, ks, ks)).view(T, C, H - 2 * r, W - 2 * r)
    out = x_TCHW.clone()
    out[:, :, r:H - r, r:W - r] = _q(y)
    return out


_SMOOTH = ([[1, 1, 1], [1, 5, 1], [1, 1, 1]], 13.0)
_BLUR = ([[1, 1, 1, 1, 1], [1, 0, 0, 0, 1], [1, 0, 0, 0, 1], [1, 0, 0, 0, 1], [1, 1, 1, 1, 1]], 16.0)


def _equalize(x_TCHW: torch.Tensor) -> torch.Tensor:
    """PIL ``ImageOps.equalize`` per frame and channel, batched (no host sync)."""
    T, C, H, W = x_TCHW.shape
    v = x_TCHW.reshape(T * C, H * W).long()
    hist = torch.zeros(T * C, 256, dtype=torch.long, device=x_TCHW.device).scatter_add_(1, v, torch.ones_like(v))
    # step = (number of pixels - count of the last non-empty level) // 255
    levels = torch.arange(256, device=x_TCHW.device)
    last = torch.where(hist > 0, levels, -1).amax(1, keepdim=True)
    step = (H * W - hist.gather(1, last)) // 255  # (TC, 1)
    cum_excl = torch.cumsum(hist, 1) - hist
    safe = step.clamp(min=1)
    lut = ((safe // 2 + cum_excl) // safe).clamp(max=255)
    keep = (step == 0) | ((hist > 0).sum(1, keepdim=True) <= 1)
    lut = torch.where(keep, levels.expand_as(lut), lut)
    return lut.gather(1, v).view(T, C, H, W).to(x_TCHW.dtype)


def _autocontrast(x_TCHW: torch.Tensor) -> torch.Tensor:
    """PIL ``ImageOps.autocontrast(cutoff=0)`` per frame and channel: lut = clip(int(i * s + o))."""
    lo = x_TCHW.amin(dim=(2, 3), keepdim=True)
    hi = x_TCHW.amax(dim=(2, 3), keepdim=True)
    scale = 255.0 / (hi - lo).clamp(min=1)
    y = torch.trunc((x_TCHW * scale - lo * scale).clamp(0, 255))
    return torch.where(hi > lo, y, x_TCHW)


def _warp(x_TCHW: torch.Tensor, matrix_fwd: np.ndarray, fill: tuple[float, float, float]) -> torch.Tensor:
    """PIL ``Image.transform(AFFINE)`` (nearest) with imgaug's forward matrix in pixel coordinates."""
    T, C, H, W = x_TCHW.shape
    inv = torch.tensor(np.linalg.inv(matrix_fwd), dtype=torch.float32, device=x_TCHW.device)
    ys, xs = torch.meshgrid(torch.arange(H, device=x_TCHW.device, dtype=torch.float32) + 0.5,
                            torch.arange(W, device=x_TCHW.device, dtype=torch.float32) + 0.5, indexing="ij")
    xin = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]
    yin = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
    xi, yi = torch.floor(xin).long(), torch.floor(yin).long()
    valid = (xi >= 0) & (xi < W) & (yi >= 0) & (yi < H)
    flat = (yi.clamp(0, H - 1) * W + xi.clamp(0, W - 1)).view(-1)
    y = x_TCHW.reshape(T, C, H * W)[:, :, flat].view(T, C, H, W)
    fill_t = torch.tensor(fill, dtype=x_TCHW.dtype, device=x_TCHW.device).view(1, C, 1, 1)
    return torch.where(valid, y, fill_t)


def _affine_matrix(H: int, W: int, *, rotate_deg=0.0, shear_x_deg=0.0, shear_y_deg=0.0, tx_px=0.0, ty_px=0.0,
                   center=(0.0, 0.0)) -> np.ndarray:
    """imgaug ``pillike._create_affine_matrix`` before its inversion (note: it uses tanh for the shear)."""
    cx, cy = W * center[0], H * center[1]
    rot = -math.radians(rotate_deg)
    shx, shy = math.radians(shear_x_deg), math.radians(shear_y_deg)
    centerize = np.array([[1, 0, -cx], [0, 1, -cy], [0, 0, 1]], dtype=np.float64)
    rotate = np.array([[math.cos(rot), math.sin(rot), 0], [-math.sin(rot), math.cos(rot), 0], [0, 0, 1]])
    shear = np.array([[1, math.tanh(shx), 0], [math.tanh(shy), 1, 0], [0, 0, 1]])
    translate = np.array([[1, 0, tx_px], [0, 1, ty_px], [0, 0, 1]], dtype=np.float64)
    decenterize = np.array([[1, 0, cx], [0, 1, cy], [0, 0, 1]], dtype=np.float64)
    return decenterize @ translate @ shear @ rotate @ centerize


def apply_ops(x_TCHW: torch.Tensor, ops: list[AugOp], *, cval: int = 128) -> torch.Tensor:
    """Apply drawn operations to every frame of one clip: uint8 (T, 3, H, W) -> uint8, same shape."""
    dtype = x_TCHW.dtype
    x = x_TCHW.float()
    T, C, H, W = x.shape
    pil_fill = (float(cval), 0.0, 0.0)  # PIL fills an RGB image given one integer as (cval, 0, 0)
    for op in ops:
        n, v = op.name, op.value
        if n == "identity":
            continue
        if n == "flip":
            x = x.flip(-1)
        elif n == "crop":
            top, right, bottom, left = (int(round(f * s)) for f, s in zip(v, (H, W, H, W)))
            if top + bottom < H and left + right < W:
                x = _q(F.interpolate(x[:, :, top:H - bottom, left:W - right], size=(H, W), mode="bilinear",
                                     align_corners=False))
        elif n == "autocontrast":
            x = _autocontrast(x)
        elif n == "equalize":
            x = _equalize(x)
        elif n == "invert":
            x = 255.0 - x
        elif n == "rotate":
            x = _warp(x, _affine_matrix(H, W, rotate_deg=v[0], center=(0.5, 0.5)), pil_fill)
        elif n == "shear_x":
            x = _warp(x, _affine_matrix(H, W, shear_x_deg=v[0]), pil_fill)
        elif n == "shear_y":
            x = _warp(x, _affine_matrix(H, W, shear_y_deg=v[0]), pil_fill)
        elif n == "translate_x":
            x = _warp(x, _affine_matrix(H, W, tx_px=v[0] * W), pil_fill)
        elif n == "translate_y":
            x = _warp(x, _affine_matrix(H, W, ty_px=v[0] * H), pil_fill)
        elif n == "posterize":
            shift = 8 - int(v[0])
            x = torch.floor(x / 2 ** shift) * 2 ** shift
        elif n == "solarize":
            x = torch.where(x >= v[0], 255.0 - x, x)
        elif n == "color":
            x = _blend(_gray(x).expand_as(x), x, v[0])
        elif n == "contrast":
            mean = torch.floor(_gray(x).mean(dim=(1, 2, 3), keepdim=True) + 0.5)
            x = _blend(mean.expand_as(x), x, v[0])
        elif n == "brightness":
            x = _q(x * v[0])
        elif n == "sharpness":
            x = _blend(_filter(x, *_SMOOTH), x, v[0])
        elif n == "cutout":
            cy, cx, size = v
            side = max(1, int(round(size * H)))
            top = int(round(cy * H - side / 2))
            left = int(round(cx * W - side / 2))
            t0, l0 = max(top, 0), max(left, 0)
            t1, l1 = min(top + side, H), min(left + side, W)
            if t1 > t0 and l1 > l0:
                x = x.clone()
                x[:, :, t0:t1, l0:l1] = float(cval)
        elif n == "blur":
            x = _filter(x, *_BLUR)
        elif n == "smooth":
            x = _filter(x, *_SMOOTH)
        else:
            raise ValueError(f"unknown augmentation op {n!r}")
    return x.to(dtype) if dtype != torch.float32 else x


# ----------------------------------------------------------------------------------------------------
# Random erasing (timm, mode='const'), the same box on every frame
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ErasingBox:
    top: int
    left: int
    h: int
    w: int


class RandomErasing:
    """timm ``RandomErasing(probability=p, mode='const')`` with one box per clip, shared by its frames.

    Applied to *normalized* clips (the official pipeline runs it after ``Normalize``): the box is set to 0.
    """

    def __init__(self, p: float = 0.25, *, area=(0.02, 1 / 3), min_aspect: float = 0.3, attempts: int = 10):
        if not 0 <= p <= 1:
            raise ValueError(f"random erasing probability must be in [0, 1], got {p}")
        if not 0 < area[0] <= area[1] <= 1:
            raise ValueError(f"random erasing area must satisfy 0 < lo <= hi <= 1, got {area}")
        self.p, self.area, self.attempts = float(p), (float(area[0]), float(area[1])), int(attempts)
        self.log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))

    def sample(self, rng: np.random.Generator, h: int, w: int) -> ErasingBox | None:
        """timm's draws: skip with 1 - p; else up to ``attempts`` boxes until one fits strictly inside."""
        if rng.random() > self.p:
            return None
        for _ in range(self.attempts):
            target = rng.uniform(*self.area) * h * w
            aspect = math.exp(rng.uniform(*self.log_aspect))
            bh = int(round(math.sqrt(target * aspect)))
            bw = int(round(math.sqrt(target / aspect)))
            if bw < w and bh < h:
                return ErasingBox(int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1)), bh, bw)
        return None

    def __call__(self, x_BCTHW: torch.Tensor, seed: int, epoch: int, indices) -> torch.Tensor:
        """Erase in place on normalized clips (B, 3, T, H, W); returns the same tensor."""
        if x_BCTHW.dim() != 5:
            raise ValueError(f"expected clips (B, 3, T, H, W), got shape {tuple(x_BCTHW.shape)}")
        H, W = x_BCTHW.shape[-2:]
        for b, i in enumerate(int(i) for i in indices):
            box = self.sample(sample_rng(seed, epoch, i, _ERASING_SALT), H, W)
            if box is not None:
                x_BCTHW[b, :, :, box.top:box.top + box.h, box.left:box.left + box.w] = 0
        return x_BCTHW
