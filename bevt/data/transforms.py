"""Clip and image augmentation on uint8 frames, as the official BEVT / mmaction pipelines.

Shape legend: T frames, H/W frame height/width, S crop size (224), s tokenizer-copy size (112),
3 RGB channels. Frames are numpy uint8 (T, H, W, 3) (an image is (H, W, 3)); :func:`normalize` works on
torch tensors on the device.

Pretraining (REFERENCE_BEVT.md section 4.1)::

    RandomRescale(short side ~ U{256..320}, bicubic) -> [images: ColorJitter(0.4, 0.4, 0.4, 0)]
    -> RandomCrop(224) -> Flip(0.5) -> CopyResize(112, lanczos) of the cropped, flipped frames

Crop and flip are drawn once per clip and shared by its frames. The random draws are explicit
(:class:`ClipAugParams`, from :func:`sample_params`) and applied by :func:`apply_params`, so another
implementation (the GPU loader) can be checked frame by frame with the same parameters.

Fine-tuning and testing (sections 4.2, 4.3): :func:`resize_short` (256, bilinear), the
``RandomResizedCrop`` box (:func:`sample_finetune_params`), resize to 224, flip; :func:`center_crop`
and :func:`three_crop` for testing.

Differences from the official code, on purpose:

* Resizing uses PIL (bicubic a=-0.5, Lanczos-3, both antialiased when shrinking); the official code uses
  OpenCV through mmcv (bicubic a=-0.75, Lanczos-4, no antialiasing). Pixel values differ by a few
  levels; sizes, crop boxes and the order of operations are the official ones.
* Kept as official: ``RandomCrop`` draws its offset with ``randint(0, H - S)`` (the last offset is
  never drawn); ``ColorJitter`` truncates (not rounds) back to uint8 and applies its four adjustments in
  one order fixed per dataset (official: per worker process, ``np.random.permutation(4)`` at
  construction).
"""
from __future__ import annotations

import functools

from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ColorJitter",
    "ColorJitterParams",
    "ClipAugParams",
    "FinetuneAugParams",
    "rescaled_size",
    "resize",
    "resize_short",
    "sample_params",
    "apply_params",
    "color_jitter",
    "flip",
    "crop",
    "center_crop",
    "three_crop",
    "random_resized_crop_box",
    "sample_finetune_params",
    "apply_finetune_params",
    "normalize",
]

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)

_PIL_FILTERS = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3}  # PIL.Image.Resampling values


# ----------------------------------------------------------------------------------------------------
# Geometry helpers
# ----------------------------------------------------------------------------------------------------

def _as_clip(frames: np.ndarray) -> tuple[np.ndarray, bool]:
    """(H, W, 3) or (T, H, W, 3) uint8 -> (T, H, W, 3) and whether the input was a single image."""
    if frames.dtype != np.uint8:
        raise TypeError(f"frames must be uint8, got {frames.dtype}")
    if frames.ndim == 3:
        return frames[None], True
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be (T, H, W, 3) or (H, W, 3), got shape {frames.shape}")
    return frames, False


def rescaled_size(h: int, w: int, short: int) -> tuple[int, int]:
    """(new_h, new_w) with the short side resized to ``short``, aspect kept (mmcv ``rescale_size``).

    mmcv: ``scale = short / min(h, w)``; each side becomes ``int(side * scale + 0.5)``.
    """
    scale = short / min(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def resize(frames: np.ndarray, size_hw: tuple[int, int], interpolation: str = "bilinear") -> np.ndarray:
    """Resize every frame to ``size_hw`` = (h, w): (T, H, W, 3) -> (T, h, w, 3) (or one image).

    ``interpolation``: nearest | bilinear | bicubic | lanczos (PIL filters).
    """
    from PIL import Image

    clip_THWC, single = _as_clip(frames)
    h, w = int(size_hw[0]), int(size_hw[1])
    if h < 1 or w < 1:
        raise ValueError(f"resize target must be positive, got {size_hw}")
    try:
        resample = _PIL_FILTERS[interpolation]
    except KeyError:
        raise ValueError(f"unknown interpolation {interpolation!r}; choose from {', '.join(_PIL_FILTERS)}") from None
    if clip_THWC.shape[1:3] == (h, w):
        out_THWC = clip_THWC.copy()
    else:
        out_THWC = np.empty((clip_THWC.shape[0], h, w, 3), dtype=np.uint8)
        for t, frame in enumerate(clip_THWC):
            out_THWC[t] = np.asarray(Image.fromarray(frame).resize((w, h), resample=resample))
    return out_THWC[0] if single else out_THWC


def resize_short(frames: np.ndarray, short: int, interpolation: str = "bilinear") -> np.ndarray:
    """Resize so the short side is ``short``, keeping the aspect (mmcv ``Resize(scale=(-1, short))``)."""
    clip_THWC, _ = _as_clip(frames)
    return resize(frames, rescaled_size(clip_THWC.shape[1], clip_THWC.shape[2], short), interpolation)


def crop(frames: np.ndarray, top: int, left: int, h: int, w: int) -> np.ndarray:
    """The same box of every frame: (T, H, W, 3) -> (T, h, w, 3) (a view)."""
    clip_THWC, single = _as_clip(frames)
    H, W = clip_THWC.shape[1:3]
    if top < 0 or left < 0 or top + h > H or left + w > W:
        raise ValueError(f"crop box (top={top}, left={left}, h={h}, w={w}) exceeds the {H}x{W} frame")
    out = clip_THWC[:, top:top + h, left:left + w]
    return out[0] if single else out


_crop = crop  # for functions whose ``crop`` argument (the crop size) shadows this one


def flip(frames: np.ndarray) -> np.ndarray:
    """Horizontal flip of every frame (a view)."""
    return frames[..., ::-1, :]


def center_crop(frames: np.ndarray, size: int) -> np.ndarray:
    """mmaction ``CenterCrop``: ``left = (W - S) // 2``, ``top = (H - S) // 2`` -> (T, S, S, 3)."""
    clip_THWC, _ = _as_clip(frames)
    H, W = clip_THWC.shape[1:3]
    return crop(frames, (H - size) // 2, (W - size) // 2, size, size)


def three_crop(frames: np.ndarray, size: int) -> np.ndarray:
    """mmaction ``ThreeCrop``: three S x S crops along the long side -> (3, T, S, S, 3).

    The short side must already equal ``size`` (resize first). Order as official: left/top, right/bottom,
    middle, at offsets 0, 2 * step, step with ``step = (long - S) // 2``.
    """
    clip_THWC, single = _as_clip(frames)
    H, W = clip_THWC.shape[1:3]
    if H == size:
        step = (W - size) // 2
        boxes = [(0, 0), (0, 2 * step), (0, step)]
    elif W == size:
        step = (H - size) // 2
        boxes = [(0, 0), (2 * step, 0), (step, 0)]
    else:
        raise ValueError(f"three_crop needs the short side resized to the crop size {size}, got {H}x{W}")
    out_VTSSC = np.stack([crop(clip_THWC, top, left, size, size) for top, left in boxes])
    return out_VTSSC[:, 0] if single else out_VTSSC


# ----------------------------------------------------------------------------------------------------
# Colour jitter (images in pretraining)
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ColorJitterParams:
    """Drawn jitter factors and the order of the adjustments (0 brightness, 1 contrast, 2 saturation, 3 hue)."""

    brightness: float
    contrast: float
    saturation: float
    hue: float
    order: tuple[int, int, int, int]


@dataclass(frozen=True)
class ColorJitter:
    """BEVT's ``ColorJitter``: factors uniform on [1 - x, 1 + x] (hue on [-x, x]).

    ``order`` is the fixed permutation of the four adjustments (official: drawn once per process with
    ``np.random.permutation(4)``; here drawn once per dataset from its seed).
    """

    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.0
    order: tuple[int, int, int, int] = (0, 1, 2, 3)

    def __post_init__(self):
        for name in ("brightness", "contrast", "saturation"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"ColorJitter {name} must be in [0, 1], got {getattr(self, name)}")
        if self.hue != 0:
            raise ValueError(f"hue jitter is not implemented (the BEVT recipe uses hue=0), got hue={self.hue}")
        if sorted(self.order) != [0, 1, 2, 3]:
            raise ValueError(f"ColorJitter order must be a permutation of 0..3, got {self.order}")

    def sample(self, rng: np.random.Generator) -> ColorJitterParams:
        """Draw the factors in the official order: brightness, contrast, saturation, hue."""
        b = rng.uniform(1 - self.brightness, 1 + self.brightness)
        c = rng.uniform(1 - self.contrast, 1 + self.contrast)
        s = rng.uniform(1 - self.saturation, 1 + self.saturation)
        h = rng.uniform(-self.hue, self.hue)
        return ColorJitterParams(float(b), float(c), float(s), float(h), tuple(int(i) for i in self.order))


def _gray(img: np.ndarray) -> np.ndarray:
    return 0.2989 * img[..., 0] + 0.587 * img[..., 1] + 0.114 * img[..., 2]


def color_jitter(frames: np.ndarray, params: ColorJitterParams) -> np.ndarray:
    """Apply drawn jitter to every frame, in float32 as the official code; uint8 in and out.

    brightness ``img * b``; contrast ``c * img + (1 - c) * mean(gray(img))`` (mean over the frame);
    saturation ``s * img + (1 - s) * gray(img)``; values are clipped to [0, 255] and truncated to uint8
    only at the end.
    """
    clip_THWC, single = _as_clip(frames)
    out = np.empty_like(clip_THWC)
    for t, frame in enumerate(clip_THWC):
        img = frame.astype(np.float32)
        for fn_id in params.order:
            if fn_id == 0 and params.brightness != 1:
                img *= np.float32(params.brightness)
            elif fn_id == 1 and params.contrast != 1:
                c = np.float32(params.contrast)
                img = c * img + (1 - c) * np.mean(_gray(img))
            elif fn_id == 2 and params.saturation != 1:
                s = np.float32(params.saturation)
                img = s * img + (1 - s) * _gray(img)[..., None]
            elif fn_id == 3 and params.hue != 0:
                raise ValueError("hue jitter is not implemented")
        out[t] = np.clip(img, 0, 255).astype(np.uint8)
    return out[0] if single else out


# ----------------------------------------------------------------------------------------------------
# Pretraining: rescale -> (jitter) -> crop -> flip -> tokenizer copy
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ClipAugParams:
    """The random draws of one pretraining sample (shared by all frames of a clip).

    ``scale_short``: short side after ``RandomRescale``; ``crop_top``/``crop_left``: the crop box in the
    rescaled frame; ``flip``: horizontal flip; ``color``: jitter (images only; None for clips).
    """

    scale_short: int
    crop_top: int
    crop_left: int
    flip: bool
    color: ColorJitterParams | None = None


def sample_params(rng: np.random.Generator, h: int, w: int, *, scale: tuple[int, int] = (256, 320),
                  crop: int = 224, flip_p: float = 0.5, jitter: ColorJitter | None = None) -> ClipAugParams:
    """Draw the pretraining augmentation of an (h, w) clip or image, in the official order.

    1. ``RandomRescale``: short side uniform on the integers [scale[0], scale[1]].
    2. ``ColorJitter`` factors (only when ``jitter`` is given: images).
    3. ``RandomCrop``: ``top = randint(0, H' - S)`` if H' > S else 0, then the same for ``left``
       (upper bound exclusive, as mmaction).
    4. ``Flip``: ``rand() < flip_p``.
    """
    lo, hi = int(scale[0]), int(scale[1])
    if not 0 < lo <= hi:
        raise ValueError(f"scale must be a range 0 < lo <= hi of short-side lengths, got {scale}")
    short = int(rng.integers(lo, hi + 1))
    color = jitter.sample(rng) if jitter is not None else None
    new_h, new_w = rescaled_size(h, w, short)
    if crop > new_h or crop > new_w:
        raise ValueError(f"crop {crop} does not fit a {h}x{w} frame rescaled to {new_h}x{new_w} "
                         f"(short side {short}); use a larger scale range")
    top = int(rng.integers(0, new_h - crop)) if new_h > crop else 0
    left = int(rng.integers(0, new_w - crop)) if new_w > crop else 0
    flipped = bool(rng.random() < flip_p)
    return ClipAugParams(scale_short=short, crop_top=top, crop_left=left, flip=flipped, color=color)


def apply_params(frames: np.ndarray, params: ClipAugParams, *, crop: int = 224, tok_size: int | None = 112,
                 interpolation: str = "bicubic", tok_interpolation: str = "lanczos"
                 ) -> tuple[np.ndarray, np.ndarray | None]:
    """Apply drawn pretraining augmentation -> (frames (T, S, S, 3), tokenizer copy (T, s, s, 3) or None).

    The tokenizer copy is a ``tok_interpolation`` resize of the cropped and flipped frames, raw 0..255
    (``CopyResize`` runs before ``Normalize`` in the official pipeline). An (H, W, 3) image gives
    (S, S, 3) and (s, s, 3).
    """
    clip_THWC, single = _as_clip(frames)
    H, W = clip_THWC.shape[1:3]
    x_THWC = resize(clip_THWC, rescaled_size(H, W, params.scale_short), interpolation)
    if params.color is not None:
        x_THWC = color_jitter(x_THWC, params.color)
    x_TSSC = _crop(x_THWC, params.crop_top, params.crop_left, crop, crop)
    if params.flip:
        x_TSSC = flip(x_TSSC)
    x_TSSC = np.ascontiguousarray(x_TSSC)
    tok_TssC = resize(x_TSSC, (tok_size, tok_size), tok_interpolation) if tok_size else None
    if single:
        return x_TSSC[0], (tok_TssC[0] if tok_TssC is not None else None)
    return x_TSSC, tok_TssC


# ----------------------------------------------------------------------------------------------------
# Fine-tuning: resize short side -> RandomResizedCrop -> resize to S x S -> flip
# ----------------------------------------------------------------------------------------------------

def random_resized_crop_box(rng: np.random.Generator, h: int, w: int, area_range=(0.08, 1.0),
                            aspect_ratio_range=(3 / 4, 4 / 3), max_attempts: int = 10) -> tuple[int, int, int, int]:
    """mmaction ``RandomResizedCrop.get_crop_bbox`` -> (top, left, crop_h, crop_w).

    Draws ``max_attempts`` log-uniform aspect ratios and uniform area fractions at once, takes the first
    candidate (rounded) that fits, with a uniform offset (both ends included); if none fits, the centred
    square of the short side.
    """
    if not 0 < area_range[0] <= area_range[1] <= 1:
        raise ValueError(f"area_range must satisfy 0 < lo <= hi <= 1, got {area_range}")
    if not 0 < aspect_ratio_range[0] <= aspect_ratio_range[1]:
        raise ValueError(f"aspect_ratio_range must satisfy 0 < lo <= hi, got {aspect_ratio_range}")
    area = h * w
    aspect = np.exp(rng.uniform(np.log(aspect_ratio_range[0]), np.log(aspect_ratio_range[1]), size=max_attempts))
    target_area = rng.uniform(area_range[0], area_range[1], size=max_attempts) * area
    cand_w = np.round(np.sqrt(target_area * aspect)).astype(np.int64)
    cand_h = np.round(np.sqrt(target_area / aspect)).astype(np.int64)
    for ch, cw in zip(cand_h.tolist(), cand_w.tolist()):
        if ch <= h and cw <= w:
            left = int(rng.integers(0, w - cw + 1))
            top = int(rng.integers(0, h - ch + 1))
            return top, left, ch, cw
    side = min(h, w)
    return (h - side) // 2, (w - side) // 2, side, side


@dataclass(frozen=True)
class FinetuneAugParams:
    """The random draws of one fine-tuning sample: the crop box (in the short-side-resized frame), flip."""

    crop_top: int
    crop_left: int
    crop_h: int
    crop_w: int
    flip: bool


def sample_finetune_params(rng: np.random.Generator, h: int, w: int, *, area_range=(0.08, 1.0),
                           aspect_ratio_range=(3 / 4, 4 / 3), flip_p: float = 0.5) -> FinetuneAugParams:
    """Draw ``RandomResizedCrop`` and ``Flip`` for a frame of (h, w) (after :func:`resize_short`)."""
    top, left, ch, cw = random_resized_crop_box(rng, h, w, area_range, aspect_ratio_range)
    return FinetuneAugParams(top, left, ch, cw, bool(rng.random() < flip_p))


def apply_finetune_params(frames: np.ndarray, params: FinetuneAugParams, *, size: int = 224,
                          interpolation: str = "bilinear") -> np.ndarray:
    """Crop the box, resize it to (size, size) (mmcv ``Resize(keep_ratio=False)``), flip -> (T, S, S, 3)."""
    x = crop(frames, params.crop_top, params.crop_left, params.crop_h, params.crop_w)
    x = resize(np.ascontiguousarray(x), (size, size), interpolation)
    return np.ascontiguousarray(flip(x)) if params.flip else x


# ----------------------------------------------------------------------------------------------------
# Normalisation (on the device, inside the training step)
# ----------------------------------------------------------------------------------------------------

def normalize(x: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD, *, channel_dim: int = 1,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(x - mean) / std`` per channel, for uint8 (or float) pixels in 0..255 -> ``dtype``.

    ``x`` has any shape with the channels at ``channel_dim``: a clip batch (B, 3, T, S, S) uses 1, the
    tokenizer copies (B, T, 3, s, s) use 2 (or -3). The arithmetic is in float32 whatever ``dtype``.
    """
    dim = channel_dim % x.ndim
    c = x.shape[dim]
    if len(mean) != c or len(std) != c:
        raise ValueError(f"mean/std have {len(mean)}/{len(std)} values, the tensor has {c} channels at dim {dim}")
    view = [1] * x.ndim
    view[dim] = c
    mean_t, inv_std_t = _norm_constants(tuple(mean), tuple(std), x.device)
    return ((x.to(torch.float32) - mean_t.view(view)) * inv_std_t.view(view)).to(dtype)


@functools.lru_cache(maxsize=16)
def _norm_constants(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # made once per device: a fresh host-to-device copy in every training step would be a sync point
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device)
    return mean_t, 1.0 / torch.tensor(std, dtype=torch.float32, device=device)
