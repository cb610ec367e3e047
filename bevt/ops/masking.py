"""BEiT blockwise 2D masks (images) and BEVT tube masks (clips).

The reference generators restate the official algorithms (REFERENCE_BEVT.md section 3, docs/ARCHITECTURE.md):

* **Block mask** (BEiT ``MaskingGenerator``): while fewer than ``num_masking_patches`` cells are masked,
  up to 10 attempts: area ~ U(min_num_patches, remaining), log-aspect ~ U(log a, -log a), h/w =
  round(sqrt(area * aspect)) / round(sqrt(area / aspect)), both < the grid; a random top-left corner;
  accept if it adds between 1 and ``remaining`` new cells. Stop when an iteration adds nothing.
  Defaults 98 of 14x14, min block 16, aspect 0.3..3.33. ``exact=True`` tops a short mask up with random
  single cells to exactly ``num_masking_patches`` (the official count is 90..98).
* **Tube mask** (BEVT ``MaskedPositionGenerate``): one block mask per clip, repeated over a tube of
  ``len`` of the ``slots`` temporal slots, len uniform on [max(int(lo*slots), 1), min(int(hi*slots), slots)]
  (4..8 of 8 for the (0.5, 1.0) range), start uniform on [0, slots), wrapping cyclically past the end.
  The target mask is the input mask repeated ``temporal_scale`` (2) times in time (nearest upsampling).

Randomness is keyed by (seed, step, sample index): sample ``i`` of a batch with ``index_offset=o`` is
the same whatever the batch size, the split of the batch, or the data-worker count. The reference uses
numpy's PCG64 seeded by ``SeedSequence([seed, step, index, stream])``; the CUDA backend uses Philox keyed
by the same numbers, so the two agree in distribution, not bit for bit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from bevt.ops import backend as _be

OP = "masking"
_STREAM_BLOCK, _STREAM_TUBE = 0, 1  # separate streams: an image mask never equals its clip twin


@dataclass(frozen=True)
class BlockMaskSpec:
    """Parameters of the BEiT blockwise generator (official values for a 14x14 grid)."""

    grid: tuple[int, int] = (14, 14)
    num_masking_patches: int = 98
    min_num_patches: int = 16
    max_num_patches: int | None = None
    min_aspect: float = 0.3
    max_aspect: float | None = None
    exact: bool = False

    def __post_init__(self):
        h, w = self.grid
        if h < 2 or w < 2:
            raise ValueError(f"mask grid must be at least 2x2, got {self.grid}")
        if not 0 < self.num_masking_patches <= h * w:
            raise ValueError(f"num_masking_patches must be in 1..{h * w} for grid {self.grid}, got {self.num_masking_patches}")
        if self.min_num_patches < 1:
            raise ValueError(f"min_num_patches must be >= 1, got {self.min_num_patches}")
        if not 0 < self.min_aspect <= 1:
            raise ValueError(f"min_aspect must be in (0, 1], got {self.min_aspect}")

    @property
    def max_patches(self) -> int:
        return self.num_masking_patches if self.max_num_patches is None else self.max_num_patches

    @property
    def max_masked(self) -> int:
        """Upper bound on the masked cells of one mask: blocks are only added while fewer than
        ``num_masking_patches`` cells are masked, each at most the cells still missing (``exact``: equal)."""
        return self.num_masking_patches

    @property
    def log_aspect(self) -> tuple[float, float]:
        hi = self.max_aspect or 1.0 / self.min_aspect
        return math.log(self.min_aspect), math.log(hi)

    @classmethod
    def for_grid(cls, grid: tuple[int, int], ratio: float = 0.5, min_fraction: float = 16 / 196,
                 exact: bool = False) -> "BlockMaskSpec":
        """Scale the official 98-of-196, min-16 setting to another grid (e.g. the tiny default's 6x6)."""
        n = grid[0] * grid[1]
        return cls(grid=tuple(grid), num_masking_patches=max(1, round(ratio * n)),
                   min_num_patches=max(1, round(min_fraction * n)), exact=exact)


@dataclass(frozen=True)
class TubeSpec:
    """Temporal extent of BEVT tubes: ``slots`` tubelet slots, tube length range as fractions of it."""

    slots: int = 8
    tube_range: tuple[float, float] = (0.5, 1.0)
    temporal_scale: int = 2

    def __post_init__(self):
        lo, hi = self.tube_range
        if self.slots < 1:
            raise ValueError(f"slots must be >= 1, got {self.slots}")
        if not 0 <= lo <= hi <= 1:
            raise ValueError(f"tube_range must satisfy 0 <= lo <= hi <= 1, got {self.tube_range}")
        if self.temporal_scale < 1:
            raise ValueError(f"temporal_scale must be >= 1, got {self.temporal_scale}")

    def max_masked_target(self, spec: BlockMaskSpec) -> int:
        """Upper bound on the masked cells of one clip's target mask: the 2D mask on at most the longest tube's
        slots, each repeated ``temporal_scale`` times."""
        return spec.max_masked * self.length_range[1] * self.temporal_scale

    @property
    def length_range(self) -> tuple[int, int]:
        """Inclusive (min, max) tube length in slots, as the official generator computes it."""
        lo, hi = self.tube_range
        return max(int(lo * self.slots), 1), min(int(hi * self.slots), self.slots)


# ----------------------------------------------------------------------------- reference generators
def _rng(seed: int, step: int, index: int, stream: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, step, index, stream])))


def _block_mask_np(spec: BlockMaskSpec, rng: np.random.Generator) -> np.ndarray:
    H, W = spec.grid
    mask = np.zeros((H, W), dtype=bool)
    count = 0
    lo_a, hi_a = spec.log_aspect
    while count < spec.num_masking_patches:
        max_mask = min(spec.num_masking_patches - count, spec.max_patches)
        delta = 0
        for _ in range(10):
            # as Python's random.uniform(a, b): a + (b - a) * u, also when b < a (few cells left)
            area = spec.min_num_patches + (max_mask - spec.min_num_patches) * rng.random()
            aspect = math.exp(lo_a + (hi_a - lo_a) * rng.random())
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if w < W and h < H:
                top = int(rng.integers(0, H - h + 1))
                left = int(rng.integers(0, W - w + 1))
                window = mask[top:top + h, left:left + w]
                new = h * w - int(window.sum())
                if 0 < new <= max_mask:
                    window[...] = True
                    delta += new
                if delta > 0:
                    break
        if delta == 0:
            break
        count += delta
    if spec.exact and count < spec.num_masking_patches:
        free = np.flatnonzero(~mask.reshape(-1))
        pick = rng.choice(free, size=spec.num_masking_patches - count, replace=False)
        mask.reshape(-1)[pick] = True
    return mask


def block_masks_ref(batch_size: int, spec: BlockMaskSpec = BlockMaskSpec(), *, seed: int = 0, step: int = 0,
                    index_offset: int = 0, device: torch.device | str | None = None) -> torch.Tensor:
    """(B, H, W) bool block masks; sample i uses the key (seed, step, index_offset + i)."""
    out = np.stack([_block_mask_np(spec, _rng(seed, step, index_offset + i, _STREAM_BLOCK))
                    for i in range(batch_size)]) if batch_size else np.zeros((0, *spec.grid), dtype=bool)
    return torch.from_numpy(out).to(device)


def tube_masks_ref(batch_size: int, spec: BlockMaskSpec = BlockMaskSpec(), tube: TubeSpec = TubeSpec(), *,
                   seed: int = 0, step: int = 0, index_offset: int = 0,
                   device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Tube masks: input (B, slots, H, W) and target (B, slots * temporal_scale, H, W), both bool."""
    lmin, lmax = tube.length_range
    inp = np.zeros((batch_size, tube.slots, *spec.grid), dtype=bool)
    for i in range(batch_size):
        rng = _rng(seed, step, index_offset + i, _STREAM_TUBE)
        m2d = _block_mask_np(spec, rng)
        start = int(rng.integers(0, tube.slots))
        length = int(rng.integers(lmin, lmax + 1))
        slots = [(start + t) % tube.slots for t in range(length)]
        inp[i, slots] = m2d
    inp_t = torch.from_numpy(inp).to(device)
    return inp_t, inp_t.repeat_interleave(tube.temporal_scale, dim=1)


# ----------------------------------------------------------------------------- backend choice
CAPABILITIES = {
    "ref": _be.Capabilities(devices=("cpu", "cuda"), dtypes=(torch.bool,), notes=("numpy, per sample on the host",)),
    "cuda": _be.Capabilities(devices=("cuda",), dtypes=(torch.bool,), min_compute_capability=(7, 0),
                             notes=("one launch per batch (a warp per sample), Philox4x32-10 keyed by "
                                    "(seed, step, index); seed < 2^64, step and index < 2^32",),
                             extra={"max_grid_side": 32, "max_slots": 64}),
}


def can_run_ref(*_, raise_error: bool = False, **__) -> bool:
    return True


def can_run_cuda(device: torch.device | str | None, spec: BlockMaskSpec, tube: TubeSpec | None = None, *,
                 raise_error: bool = False) -> bool:
    caps = CAPABILITIES["cuda"]
    reasons = []
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type != "cuda":
        reasons.append(f"masks must be made on a CUDA device, asked for {dev}")
    else:
        ok, why = _be.cuda_extension_status()
        reasons += [why] if not ok else _be.compute_capability_reasons(caps, dev)
    side = caps.extra["max_grid_side"]
    if spec.grid[0] > side or spec.grid[1] > side:
        reasons.append(f"grid sides must be <= {side}, got {spec.grid}")
    if tube is not None and tube.slots > caps.extra["max_slots"]:
        reasons.append(f"at most {caps.extra['max_slots']} temporal slots, got {tube.slots}")
    return _be.verdict(OP, "cuda", reasons, raise_error)


def _check_batch(batch_size: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 0:
        raise ValueError(f"batch_size must be a non-negative int, got {batch_size!r}")


def block_masks(batch_size: int, spec: BlockMaskSpec = BlockMaskSpec(), *, seed: int = 0, step: int = 0,
                index_offset: int = 0, device: torch.device | str | None = None,
                backend: str | None = None) -> torch.Tensor:
    """BEiT blockwise masks for a batch of images: (B, H, W) bool on ``device``."""
    _check_batch(batch_size)
    name = _be.choose(OP, backend, {"cuda": lambda r: can_run_cuda(device, spec, raise_error=r), "ref": lambda r: True})
    if name == "cuda":
        from bevt.ops import _masking_cuda

        return _masking_cuda.block_masks(batch_size, spec, seed=seed, step=step, index_offset=index_offset,
                                         device=device)
    return block_masks_ref(batch_size, spec, seed=seed, step=step, index_offset=index_offset, device=device)


def tube_masks(batch_size: int, spec: BlockMaskSpec = BlockMaskSpec(), tube: TubeSpec = TubeSpec(), *,
               seed: int = 0, step: int = 0, index_offset: int = 0, device: torch.device | str | None = None,
               backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BEVT tube masks for a batch of clips: input (B, slots, H, W) and target (B, slots*scale, H, W), bool."""
    _check_batch(batch_size)
    name = _be.choose(OP, backend, {"cuda": lambda r: can_run_cuda(device, spec, tube, raise_error=r),
                                    "ref": lambda r: True})
    if name == "cuda":
        from bevt.ops import _masking_cuda

        return _masking_cuda.tube_masks(batch_size, spec, tube, seed=seed, step=step, index_offset=index_offset,
                                        device=device)
    return tube_masks_ref(batch_size, spec, tube, seed=seed, step=step, index_offset=index_offset, device=device)


def backend_status() -> dict[str, tuple[bool, str]]:
    return {"cuda": _be.cuda_extension_status(), "ref": (True, "")}


def step_masks(num_clips: int, num_images: int, spec: BlockMaskSpec = BlockMaskSpec(), tube: TubeSpec = TubeSpec(), *,
               seed: int = 0, step: int = 0, device: torch.device | str | None = None, backend: str | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All masks of a joint BEVT step: (clip input, clip target, image masks), one launch on CUDA.

    The same bits as ``tube_masks(num_clips, ...)`` and ``block_masks(num_images, ...)`` called separately
    with ``index_offset=0`` (clips and images draw from separate streams).
    """
    _check_batch(num_clips)
    _check_batch(num_images)
    name = _be.choose(OP, backend, {"cuda": lambda r: can_run_cuda(device, spec, tube, raise_error=r),
                                    "ref": lambda r: True})
    if name == "cuda":
        from bevt.ops import _masking_cuda

        return _masking_cuda.tube_and_block_masks(num_clips, num_images, spec, tube, spec, seed=seed, step=step,
                                                  device=device)
    inp, tgt = tube_masks_ref(num_clips, spec, tube, seed=seed, step=step, device=device)
    return inp, tgt, block_masks_ref(num_images, spec, seed=seed, step=step, device=device)
