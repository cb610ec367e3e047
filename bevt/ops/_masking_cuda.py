"""CUDA backend of :mod:`bevt.ops.masking`: one kernel launch (``csrc/masking.cu``) per batch.

Shape legend: B samples, S temporal slots, T = S * temporal_scale target slots, H x W the patch grid.

Each sample is one warp running the reference algorithm (see ``bevt.ops.masking``) with Philox4x32-10
draws keyed by ``seed`` and counted by (draw, stream, index_offset + i, step): a sample's mask does not
depend on the batch size, on how the batch is split, or on the launch it shares with other masks. The
outputs are written in their final layout, every byte of them. Same distribution as the numpy reference,
not the same bits (the reference draws from PCG64).

Limits (``CAPABILITIES["cuda"]`` in bevt.ops.masking): grid sides up to 32, up to 64 slots, seed in
[0, 2^64), step in [0, 2^32), sample indices below 2^32.
"""
from __future__ import annotations

import torch

from bevt.ops import backend as _be
from bevt.ops.masking import _STREAM_BLOCK, _STREAM_TUBE, BlockMaskSpec, TubeSpec

_NO_JOB = [0] * 9


def _op():
    ok, why = _be.cuda_extension_status()
    if not ok:
        raise _be.BackendUnavailable(f"masking: backend 'cuda' cannot run: {why}")
    return torch.ops.bevt.masks_


def _device(device) -> torch.device:
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type != "cuda":
        raise ValueError(f"CUDA masks must be made on a CUDA device, got {dev}")
    return dev if dev.index is not None else torch.device("cuda", torch.cuda.current_device())


def _check_int(name: str, value, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not 0 <= value < hi:
        raise ValueError(f"{name} must be in [0, 2^{hi.bit_length() - 1}) for the CUDA masks, got {value}")
    return value


def _check_key(seed, step, index_offset, batch_size) -> int:
    """Validate the Philox key and counter fields; return the seed as a signed 64-bit int (same bits)."""
    _check_int("seed", seed, 2 ** 64)
    _check_int("step", step, 2 ** 32)
    _check_int("index_offset", index_offset, 2 ** 32)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 0:
        raise ValueError(f"batch_size must be a non-negative int, got {batch_size!r}")
    if index_offset + batch_size > 2 ** 32:
        raise ValueError(f"sample indices index_offset + i must stay below 2^32, got up to {index_offset + batch_size - 1}")
    return seed - 2 ** 64 if seed >= 2 ** 63 else seed


def _check_spec(spec: BlockMaskSpec) -> None:
    if not isinstance(spec, BlockMaskSpec):
        raise TypeError(f"spec must be a BlockMaskSpec, got {type(spec).__name__}")
    h, w = spec.grid
    if h > 32 or w > 32:
        raise ValueError(f"CUDA masks support grid sides up to 32, got {spec.grid}")
    if spec.max_patches < 1:
        raise ValueError(f"max_num_patches must be >= 1, got {spec.max_num_patches}")
    lo, hi = spec.log_aspect
    if lo > hi:
        raise ValueError(f"the aspect range is empty: min_aspect {spec.min_aspect} > max_aspect {spec.max_aspect}")


def _check_tube(tube: TubeSpec) -> tuple[int, int]:
    if not isinstance(tube, TubeSpec):
        raise TypeError(f"tube must be a TubeSpec, got {type(tube).__name__}")
    if tube.slots > 64:
        raise ValueError(f"CUDA tube masks support at most 64 temporal slots, got {tube.slots}")
    lmin, lmax = tube.length_range
    if lmax < lmin:
        raise ValueError(f"tube_range {tube.tube_range} over {tube.slots} slots gives no tube length "
                         f"(min {lmin} > max {lmax})")
    return lmin, lmax


def _block_job(spec: BlockMaskSpec, index_offset: int, stream: int, tube: int = 0, lmin: int = 1, lmax: int = 1):
    return [index_offset, stream, spec.num_masking_patches, spec.min_num_patches, spec.max_patches,
            int(spec.exact), tube, lmin, lmax]


def _trace(batch_size: int, spec: BlockMaskSpec, dev: torch.device, on: bool) -> torch.Tensor | None:
    # each accepted block adds >= 1 cell, so a mask has at most num_masking_patches blocks
    return torch.zeros((batch_size, spec.num_masking_patches, 3), dtype=torch.int32, device=dev) if on else None


def block_masks(batch_size: int, spec: BlockMaskSpec, *, seed: int, step: int, index_offset: int,
                device, return_trace: bool = False):
    """(B, H, W) bool block masks; with ``return_trace`` also the int32 (B, num_masking_patches, 3) trace
    of accepted blocks, (h, w, new cells) in order, zero rows after the last (for the statistical tests)."""
    seed64 = _check_key(seed, step, index_offset, batch_size)
    _check_spec(spec)
    dev = _device(device)
    H, W = spec.grid
    out_BHW = torch.empty((batch_size, H, W), dtype=torch.bool, device=dev)
    trace = _trace(batch_size, spec, dev, return_trace)
    if batch_size:
        lo, hi = spec.log_aspect
        _op()(out_BHW.view(batch_size, 1, H, W), None, trace, _block_job(spec, index_offset, _STREAM_BLOCK),
              None, None, None, _NO_JOB, [lo, hi, 0.0, 0.0], seed64, step)
    return (out_BHW, trace) if return_trace else out_BHW


def tube_masks(batch_size: int, spec: BlockMaskSpec, tube: TubeSpec, *, seed: int, step: int, index_offset: int,
               device, return_trace: bool = False):
    """Input (B, S, H, W) and target (B, T, H, W) bool tube masks (plus the trace, as block_masks)."""
    seed64 = _check_key(seed, step, index_offset, batch_size)
    _check_spec(spec)
    lmin, lmax = _check_tube(tube)
    dev = _device(device)
    H, W = spec.grid
    inp_BSHW = torch.empty((batch_size, tube.slots, H, W), dtype=torch.bool, device=dev)
    tgt_BTHW = torch.empty((batch_size, tube.slots * tube.temporal_scale, H, W), dtype=torch.bool, device=dev)
    trace = _trace(batch_size, spec, dev, return_trace)
    if batch_size:
        lo, hi = spec.log_aspect
        _op()(inp_BSHW, tgt_BTHW, trace, _block_job(spec, index_offset, _STREAM_TUBE, 1, lmin, lmax),
              None, None, None, _NO_JOB, [lo, hi, 0.0, 0.0], seed64, step)
    return (inp_BSHW, tgt_BTHW, trace) if return_trace else (inp_BSHW, tgt_BTHW)


def tube_and_block_masks(num_clips: int, num_images: int, clip_spec: BlockMaskSpec = BlockMaskSpec(),
                         tube: TubeSpec = TubeSpec(), image_spec: BlockMaskSpec = BlockMaskSpec(), *,
                         seed: int = 0, step: int = 0, clip_offset: int = 0, image_offset: int = 0,
                         device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A joint step's masks in one launch: (clip input (B1, S, H, W), clip target (B1, T, H, W), image (B2, H, W)).

    Bit for bit the same as ``tube_masks(num_clips, ..., index_offset=clip_offset)`` and
    ``block_masks(num_images, ..., index_offset=image_offset)`` called separately.
    """
    seed64 = _check_key(seed, step, clip_offset, num_clips)
    _check_key(seed, step, image_offset, num_images)
    _check_spec(clip_spec)
    _check_spec(image_spec)
    lmin, lmax = _check_tube(tube)
    dev = _device(device)
    (H1, W1), (H2, W2) = clip_spec.grid, image_spec.grid
    inp = torch.empty((num_clips, tube.slots, H1, W1), dtype=torch.bool, device=dev)
    tgt = torch.empty((num_clips, tube.slots * tube.temporal_scale, H1, W1), dtype=torch.bool, device=dev)
    img = torch.empty((num_images, H2, W2), dtype=torch.bool, device=dev)
    if num_clips or num_images:
        lo1, hi1 = clip_spec.log_aspect
        lo2, hi2 = image_spec.log_aspect
        _op()(inp, tgt, None, _block_job(clip_spec, clip_offset, _STREAM_TUBE, 1, lmin, lmax),
              img.view(num_images, 1, H2, W2), None, None, _block_job(image_spec, image_offset, _STREAM_BLOCK),
              [lo1, hi1, lo2, hi2], seed64, step)
    return inp, tgt, img
