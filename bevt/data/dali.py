"""Decoding and augmentation with NVIDIA DALI (videos through NVDEC, JPEGs through nvJPEG), as a :class:`Loader`.

Shape legend: B batch, V views (clips x crops), N clips, C crops, T frames, H/W frame height/width,
S crop size (224), s tokenizer-copy size (112), 3 RGB channels.

The GPU loader gives the same batches as the CPU one (:class:`bevt.data.loader.TorchLoader` over the
same dataset), up to decoder and resampling differences of a few pixel levels:

* **Same samples.** Keys ``(epoch, index)`` come from the same batch sampler (permutation from
  ``(seed, epoch)``, rank r takes every ``world_size``-th sample), so DDP ranks, ``drop_last`` padding and
  resume positions are identical.
* **Same draws.** For every key the host calls the dataset's own :meth:`VideoClipDataset.plan` (frame
  indices, rescale, crop, flip) with ``dataset.rng(epoch, index)`` and the size found by the up-front
  probe, and feeds the result to DALI through ``fn.external_source``: the encoded file bytes, the frame
  list and the crop window of each sample. DALI decodes exactly those frames and resamples exactly that
  window; nothing random happens inside the pipeline.
* **Same skipping.** Every file is probed once when the loader is built (PyAV demuxing for videos, a
  reduced-size JPEG decode for images). Unreadable files are reported in :attr:`skipped_files` and
  replaced as the CPU dataset replaces them: key ``(epoch, i)`` of a bad file takes the next good index
  ``k`` (wrapping) with ``k``'s label and ``k``'s own augmentation; ``index`` stays ``i``.

Pipeline per sample (all on the GPU when a device is used; DALI's CPU operators otherwise)::

    pretrain video: bytes -> decoders.video(frames=plan) -> resize(roi = crop window of the rescaled
        frame, swapped for a flip; bicubic, antialiased) -> 224 clip -> resize(112, Lanczos-3,
        antialiased) -> tokenizer copy
    finetune video: decode -> resize short side (bilinear) -> slice RandomResizedCrop box -> resize 224
        (bilinear) -> flip            test: decode -> resize short side -> 1 or 3 crops per clip
    pretrain image: decoders.image -> resize (bicubic) -> ColorJitter in float32 in the dataset's order
        (truncated to uint8 as the CPU path) -> slice crop -> flip -> resize 112 (Lanczos-3)

Resizing the crop window of the source frame (``roi_start``/``roi_end``) maps every output pixel to the
same source coordinate as "rescale the whole frame, then crop" and skips the pixels the crop throws away.

**Failures mid-run.** The probe catches missing, empty, garbage and truncated files. If DALI still
raises (a file changed after probing, a stream the hardware decoder refuses) or hands back a sample of
the wrong shape, the loader decodes every sample that pipeline holds alone in a fresh pipeline, marks
the ones that fail as skipped, rebuilds the pipelines and re-plans from the failed batch, so a run never
dies on one file (DALI leaves a pipeline unusable after some errors).

**Pipelines.** ``pipelines`` DALI pipelines run side by side, batch k of an epoch going to pipeline
k % pipelines, each ``prefetch`` batches ahead; batches are handed out in order.

**Resume.** ``state_dict``/``load_state_dict`` as the CPU loader (same keys, same checks; a state saved
by either loader resumes the other). Batches that DALI prefetched but the caller never received are
not counted: the next batch after a resume is the one after the saved position.

Outputs are torch uint8 tensors on the loader's CUDA device (the current device by default), copied
on the current stream, or CPU tensors when DALI runs on the CPU (``device_id=None``); ``label`` and
``index`` are int64 on the same device.
"""
from __future__ import annotations

import ctypes
import json
import os
import warnings
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from bevt.data import transforms as T
from bevt.data.datasets import ImageDataset, SkippedFileWarning, VideoClipDataset
from bevt.data.loader import Loader, _EpochBatchSampler
from bevt.data.video_io import ImageReadError, MediaReadError, probe

__all__ = ["DaliLoader", "dali_status", "install_command", "require_dali", "probe_files"]

_DALI_WHEELS = {11: "nvidia-dali-cuda110", 12: "nvidia-dali-cuda120", 13: "nvidia-dali-cuda130"}


# ----------------------------------------------------------------------------------------------------
# Availability
# ----------------------------------------------------------------------------------------------------

def install_command() -> str:
    """The pip command that installs the DALI wheel matching this torch's CUDA (CUDA 13 when torch has none)."""
    major = 13
    if torch.version.cuda:
        major = int(torch.version.cuda.split(".")[0])
    return f"pip install {_DALI_WHEELS.get(major, _DALI_WHEELS[13])}"


def _dali_version() -> str | None:
    try:
        import nvidia.dali as dali
    except ImportError:
        return None
    return getattr(dali, "__version__", "unknown version")


def require_dali() -> None:
    """Raise ImportError with the install command when DALI is not importable."""
    if _dali_version() is None:
        raise ImportError(f"decoder 'dali' needs NVIDIA DALI, which is not installed; install it with "
                          f"`{install_command()}` (or `pip install -e .[dali]`), or use decoder='pyav'")


def _nvdec_available() -> bool:
    try:
        ctypes.CDLL("libnvcuvid.so.1")
    except OSError:
        return False
    return True


def dali_status(kind: str = "video") -> tuple[bool, str]:
    """Whether the DALI loader can run on the GPU here -> (ok, reason).

    ``kind="video"`` also needs NVDEC (the driver's ``libnvcuvid``); ``"image"`` only DALI and a GPU. The
    reason says what is missing (with the install command), or what was found.
    """
    version = _dali_version()
    if version is None:
        return False, f"DALI is not installed ({install_command()})"
    if not torch.cuda.is_available():
        return False, f"DALI {version} is installed but no CUDA GPU is visible (its CPU operators decode VP9/VP8/MJPEG only)"
    if kind == "video" and not _nvdec_available():
        return False, (f"DALI {version} and a GPU are present but NVDEC is not (libnvcuvid.so.1 not found; in a "
                       f"container the driver capabilities must include 'video')")
    name = torch.cuda.get_device_name(torch.cuda.current_device())
    return True, f"DALI {version} on {name}" + (" with NVDEC" if kind == "video" else "")


# ----------------------------------------------------------------------------------------------------
# Up-front validation
# ----------------------------------------------------------------------------------------------------

def _probe_image(path: str) -> tuple[int, int]:
    """(height, width) of an image, after checking that its whole stream decodes.

    JPEGs are decoded at 1/8 scale (``draft``: the DCT is cut short but every entropy-coded byte is
    read), so truncated and corrupt files are caught at a fraction of a full decode; other formats are
    decoded fully. Raises :class:`ImageReadError`.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        if os.path.getsize(path) == 0:
            raise ImageReadError(path, "empty file (0 bytes)")
        with Image.open(path) as img:
            w, h = img.size
            if img.format == "JPEG":
                img.draft("RGB", (max(1, w // 8), max(1, h // 8)))
            img.load()
    except ImageReadError:
        raise
    except FileNotFoundError:
        raise ImageReadError(path, "file not found") from None
    except UnidentifiedImageError:
        raise ImageReadError(path, "not a recognised image format") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageReadError(path, f"{type(e).__name__}: {e}") from None
    return int(h), int(w)


def _probe_one(job: tuple[str, str]):
    """(kind, path) -> (num_frames, height, width, codec) for videos, (height, width) for images, or the
    error reason."""
    kind, path = job
    try:
        if kind == "video":
            info = probe(path)
            return (info.num_frames, info.height, info.width, info.codec)
        return _probe_image(path)
    except MediaReadError as e:
        return e.reason


def _stat(path: str):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def probe_files(paths: list[str], kind: str, *, workers: int | None = None, cache: str | None = None) -> dict:
    """Probe every distinct path once -> {path: tuple of sizes, or the reason it cannot be read}.

    ``kind``: ``video`` (frame count, height, width, codec) or ``image`` (height, width). More than 64 files are
    probed in ``workers`` processes (default: cores, at most 8). ``cache``: a JSON file of earlier
    results, keyed by path, size and mtime (read if present, rewritten after probing).
    """
    if kind not in ("video", "image"):
        raise ValueError(f"kind must be 'video' or 'image', got {kind!r}")
    unique = list(dict.fromkeys(os.fspath(p) for p in paths))
    stats = {p: _stat(p) for p in unique}
    known: dict = {}
    if cache and os.path.isfile(cache):
        try:
            with open(cache) as f:
                saved = json.load(f)
        except (OSError, ValueError) as e:
            warnings.warn(f"ignoring the unreadable probe cache {cache}: {e}")
            saved = {}
        if saved.get("kind") == kind:
            for p, (st, res) in saved.get("files", {}).items():
                if p in stats and stats[p] is not None and stats[p] == st:
                    known[p] = tuple(res) if isinstance(res, list) else res
    todo = [p for p in unique if p not in known]
    if workers is None:
        workers = min(8, os.cpu_count() or 1)
    jobs = [(kind, p) for p in todo]
    if workers > 1 and len(jobs) > 64:
        import multiprocessing as mp

        # spawn: the caller may hold CUDA contexts and DALI threads that a fork would copy
        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
            results = list(pool.map(_probe_one, jobs, chunksize=max(1, len(jobs) // (16 * workers))))
    else:
        results = [_probe_one(j) for j in jobs]
    known.update(zip(todo, results))
    if cache and todo:
        files = {p: [stats[p], list(r) if isinstance(r, tuple) else r] for p, r in known.items() if stats[p] is not None}
        tmp = f"{cache}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump({"kind": kind, "files": files}, f)
        os.replace(tmp, cache)
    return {p: known[p] for p in unique}


# ----------------------------------------------------------------------------------------------------
# Planning: the dataset's draws -> the pipeline's per-sample inputs
# ----------------------------------------------------------------------------------------------------

@dataclass
class _Spec:
    """One pipeline variant: its external inputs after the encoded bytes, and its outputs."""

    inputs: tuple[tuple[str, str, int], ...]  # (name, dtype name, ndim)
    outputs: tuple[tuple[str, tuple[int, ...]], ...]  # (batch key, per-sample shape)


@dataclass
class _Planned:
    index: int  # the dataset index asked for
    item: int  # the index actually used (differs after a skip)
    path: str
    label: int
    args: tuple  # numpy arrays, in _Spec.inputs order


@dataclass
class _Batch:
    epoch: int
    position: int
    samples: list[_Planned]
    encoded: list[np.ndarray] = field(default_factory=list)

    def columns(self) -> tuple:
        """What the pipeline's external source returns: one list per input, the encoded bytes first."""
        n = len(self.samples[0].args)
        return (self.encoded,) + tuple([s.args[j] for s in self.samples] for j in range(n))


def _f32(*v) -> np.ndarray:
    return np.asarray(v, dtype=np.float32)


def _i32(*v) -> np.ndarray:
    return np.asarray(v, dtype=np.int32)


def _crop_starts(h: int, w: int, size: int, num_crops: int) -> list[tuple[int, int]]:
    """Top-left corners of the test crops (as :func:`transforms.center_crop` / :func:`transforms.three_crop`)."""
    if num_crops == 1:
        return [((h - size) // 2, (w - size) // 2)]
    if h == size:
        step = (w - size) // 2
        return [(0, 0), (0, 2 * step), (0, step)]
    if w == size:
        step = (h - size) // 2
        return [(0, 0), (2 * step, 0), (step, 0)]
    raise ValueError(f"three_crop needs the short side resized to the crop size {size}, got {h}x{w}")


def _video_spec(ds: VideoClipDataset) -> _Spec:
    S, s, t = ds.crop, ds.tok_size, ds.frames_per_clip
    frames = ("frames", "int32", 1)
    if ds.mode == "pretrain":
        return _Spec((frames, ("roi_start", "float", 1), ("roi_end", "float", 1)),
                     (("video", (3, t, S, S)), ("video_tok", (t, 3, s, s))))
    if ds.mode == "finetune":
        return _Spec((frames, ("size", "float", 1), ("box_start", "int32", 1), ("box_shape", "int32", 1),
                      ("flip", "int32", 0)), (("video", (3, t, S, S)),))
    views = ds.num_clips * ds.num_crops if ds.num_segments is None else ds.num_crops
    crops = tuple((f"crop{j}", "int32", 1) for j in range(ds.num_crops))
    return _Spec((frames, ("size", "float", 1)) + crops, (("video", (views, 3, t, S, S)),))


def _image_spec(ds: ImageDataset) -> _Spec:
    S, s = ds.crop, ds.tok_size
    if ds.mode == "pretrain":
        jit = (("brightness", "float", 0), ("contrast", "float", 0), ("saturation", "float", 0))
        return _Spec((("size", "float", 1), ("crop", "int32", 1), ("flip", "int32", 0)) + (jit if ds.jitter else ()),
                     (("images", (3, S, S)), ("images_tok", (3, s, s))))
    if ds.mode == "finetune":
        return _Spec((("box_start", "int32", 1), ("box_shape", "int32", 1), ("flip", "int32", 0)),
                     (("images", (3, S, S)),))
    return _Spec((("size", "float", 1), ("crop", "int32", 1)), (("images", (3, S, S)),))


def _plan_video(ds: VideoClipDataset, rng: np.random.Generator, info: tuple[int, int, int]) -> tuple:
    """The dataset's draws for one clip -> the pipeline arguments of :func:`_video_spec`."""
    num_frames, H, W = info[:3]
    inds, params = ds.plan(rng, num_frames, H, W)
    frames = np.ascontiguousarray(inds.reshape(-1), dtype=np.int32)
    S = ds.crop
    if ds.mode == "pretrain":
        # The crop window of the rescaled frame, in source pixels: resampling it alone gives the same
        # pixels as rescaling the whole frame and cropping (same scale, same sample positions).
        h2, w2 = T.rescaled_size(H, W, params.scale_short)
        sy, sx = H / h2, W / w2
        y0, y1 = params.crop_top * sy, (params.crop_top + S) * sy
        x0, x1 = params.crop_left * sx, (params.crop_left + S) * sx
        if params.flip:  # DALI flips a window whose start lies past its end
            x0, x1 = x1, x0
        return frames, _f32(y0, x0), _f32(y1, x1)
    h1, w1 = T.rescaled_size(H, W, ds.short_side)
    if ds.mode == "finetune":
        return (frames, _f32(h1, w1), _i32(params.crop_top, params.crop_left), _i32(params.crop_h, params.crop_w),
                np.int32(params.flip))
    return (frames, _f32(h1, w1)) + tuple(_i32(*c) for c in _crop_starts(h1, w1, S, ds.num_crops))


def _plan_image(ds: ImageDataset, rng: np.random.Generator, info: tuple[int, int]) -> tuple:
    """The dataset's draws for one image (same order as :meth:`ImageDataset._load`) -> pipeline arguments."""
    H, W = info
    if ds.mode == "pretrain":
        p = T.sample_params(rng, H, W, scale=ds.scale, crop=ds.crop, flip_p=ds.flip_p, jitter=ds.jitter)
        args = (_f32(*T.rescaled_size(H, W, p.scale_short)), _i32(p.crop_top, p.crop_left), np.int32(p.flip))
        if ds.jitter is not None:
            args += (np.float32(p.color.brightness), np.float32(p.color.contrast), np.float32(p.color.saturation))
        return args
    if ds.mode == "finetune":
        p = T.sample_finetune_params(rng, H, W, area_range=ds.area_range, aspect_ratio_range=ds.aspect_ratio_range,
                                     flip_p=ds.flip_p)
        return _i32(p.crop_top, p.crop_left), _i32(p.crop_h, p.crop_w), np.int32(p.flip)
    h1, w1 = T.rescaled_size(H, W, ds.short_side)
    return _f32(h1, w1), _i32(*_crop_starts(h1, w1, ds.crop, 1)[0])


# ----------------------------------------------------------------------------------------------------
# Pipeline graphs
# ----------------------------------------------------------------------------------------------------

def _video_graph(ds: VideoClipDataset, x: dict, device: str) -> list:
    from nvidia.dali import fn, types

    S, s = ds.crop, ds.tok_size
    # affine=False: several pipelines' decoder threads would otherwise be pinned to the same cores
    extra = {"affine": False} if device == "mixed" else {}
    v_FHWC = fn.decoders.video(x["encoded"], frames=x["frames"], device=device, **extra)
    if ds.mode == "pretrain":
        clip = fn.resize(v_FHWC, size=[S, S], roi_start=x["roi_start"], roi_end=x["roi_end"],
                         interp_type=types.INTERP_CUBIC, antialias=True)
        tok = fn.resize(clip, size=[s, s], interp_type=types.INTERP_LANCZOS3, antialias=True)
        return [fn.transpose(clip, perm=[3, 0, 1, 2]), fn.transpose(tok, perm=[0, 3, 1, 2])]
    r = fn.resize(v_FHWC, size=x["size"], interp_type=types.INTERP_LINEAR, antialias=True)
    if ds.mode == "finetune":
        c = fn.slice(r, start=x["box_start"], shape=x["box_shape"], axis_names="HW")
        c = fn.resize(c, size=[S, S], interp_type=types.INTERP_LINEAR, antialias=True)
        c = fn.flip(c, horizontal=x["flip"])
        return [fn.transpose(c, perm=[3, 0, 1, 2])]
    # test: crops (C, N*T, S, S, 3) -> views (N*C, 3, T, S, S), clip-major as the CPU dataset
    n = 1 if ds.num_segments is not None else ds.num_clips
    t, C = ds.frames_per_clip, ds.num_crops
    crops = [fn.slice(r, start=x[f"crop{j}"], shape=[S, S], axis_names="HW") for j in range(C)]
    st = fn.reshape(fn.stack(*crops, axis=0), shape=[C, n, t, S, S, 3], layout="")
    st = fn.transpose(st, perm=[1, 0, 5, 2, 3, 4])
    return [fn.reshape(st, shape=[n * C, 3, t, S, S], layout="")]


def _jitter(img_HWC, x: dict, order: tuple[int, ...], gpu: bool):
    """BEVT ColorJitter in float32, adjustments in the dataset's order; clip and truncate to uint8."""
    import nvidia.dali as dali
    from nvidia.dali import fn, types

    def gray(f):
        return f[:, :, 0] * 0.2989 + f[:, :, 1] * 0.587 + f[:, :, 2] * 0.114

    def factor(name):  # per-sample scalars, on the device of the image
        return x[name].gpu() if gpu else x[name]

    f = fn.cast(img_HWC, dtype=types.FLOAT)
    for op in order:
        if op == 0:
            f = f * factor("brightness")
        elif op == 1:
            c = factor("contrast")
            f = f * c + (1.0 - c) * fn.reductions.mean(gray(f))
        elif op == 2:
            sat = factor("saturation")
            f = f * sat + (1.0 - sat) * gray(f)[:, :, dali.newaxis]
        # op 3 (hue) is 0 in every supported configuration (ColorJitter refuses hue != 0)
    return fn.cast(dali.math.floor(dali.math.clamp(f, 0.0, 255.0)), dtype=types.UINT8)


def _image_graph(ds: ImageDataset, x: dict, device: str) -> list:
    from nvidia.dali import fn, types

    S, s = ds.crop, ds.tok_size
    # adjust_orientation=False: PIL (the CPU path) ignores EXIF rotation too
    img = fn.decoders.image(x["encoded"], device=device, output_type=types.RGB, adjust_orientation=False,
                            jpeg_fancy_upsampling=True)
    if ds.mode == "pretrain":
        r = fn.resize(img, size=x["size"], interp_type=types.INTERP_CUBIC, antialias=True)
        if ds.jitter is not None:
            r = _jitter(r, x, ds.jitter.order, gpu=device != "cpu")
        c = fn.flip(fn.slice(r, start=x["crop"], shape=[S, S], axis_names="HW"), horizontal=x["flip"])
        tok = fn.resize(c, size=[s, s], interp_type=types.INTERP_LANCZOS3, antialias=True)
        return [fn.transpose(c, perm=[2, 0, 1]), fn.transpose(tok, perm=[2, 0, 1])]
    if ds.mode == "finetune":
        c = fn.slice(img, start=x["box_start"], shape=x["box_shape"], axis_names="HW")
        c = fn.resize(c, size=[S, S], interp_type=types.INTERP_LINEAR, antialias=True)
        return [fn.transpose(fn.flip(c, horizontal=x["flip"]), perm=[2, 0, 1])]
    r = fn.resize(img, size=x["size"], interp_type=types.INTERP_LINEAR, antialias=True)
    return [fn.transpose(fn.slice(r, start=x["crop"], shape=[S, S], axis_names="HW"), perm=[2, 0, 1])]


def _build_pipeline(ds, spec: _Spec, source, *, batch_size: int, num_threads: int, device_id: int | None,
                    prefetch: int):
    from nvidia.dali import fn, types
    from nvidia.dali.pipeline import Pipeline

    dtypes = {"uint8": types.UINT8, "int32": types.INT32, "float": types.FLOAT}
    names = ("encoded",) + tuple(n for n, _, _ in spec.inputs)
    pipe = Pipeline(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                    prefetch_queue_depth=prefetch, exec_async=True, exec_pipelined=True)
    with pipe:
        nodes = fn.external_source(source=source, num_outputs=len(names), batch=True,
                                   dtype=[types.UINT8] + [dtypes[d] for _, d, _ in spec.inputs],
                                   ndim=[1] + [n for _, _, n in spec.inputs])
        x = dict(zip(names, nodes))
        device = "mixed" if device_id is not None else "cpu"
        graph = _video_graph if isinstance(ds, VideoClipDataset) else _image_graph
        pipe.set_outputs(*graph(ds, x, device))
    pipe.build()
    return pipe


# ----------------------------------------------------------------------------------------------------
# The loader
# ----------------------------------------------------------------------------------------------------

def _read_bytes(path: str) -> np.ndarray | str:
    """The file's bytes as uint8 (N,), or the reason they cannot be read."""
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except FileNotFoundError:
        return "file not found"
    except OSError as e:
        return f"cannot read: {e.strerror or e}"
    return data if data.size else "empty file (0 bytes)"


class DaliLoader(Loader):
    """Batches decoded and augmented by DALI, sample for sample those of the CPU loader on ``dataset``.

    Args:
        dataset: a :class:`VideoClipDataset` or :class:`ImageDataset` (any mode); it supplies the files,
            the labels and every random draw (its ``plan`` / ``rng``), and is never asked to decode.
        batch_size: samples per batch on this rank.
        seed: the permutation seed (default: the dataset's seed; the CPU loader uses the same).
        rank, world_size, shuffle, drop_last: as :class:`~bevt.data.loader.TorchLoader`.
        device_id: CUDA device to decode on; ``"auto"`` (default) takes the current device when a GPU is
            visible, else ``None``: DALI's CPU operators (VP9/VP8/MJPEG videos only), CPU tensors.
        num_threads: DALI CPU threads per pipeline (and threads reading files).
        prefetch: batches each pipeline prepares ahead.
        pipelines: DALI pipelines working side by side, batch k going to pipeline k % pipelines. Several
            were meant to overlap the latency of per-sample video decoding; on an H100, 1, 2, 4 and 8
            pipelines all gave 10.6-11.6 clips/s (docs/dali.md), so the default is one.
        probe_workers: processes probing the file list up front (default: cores, at most 8).
        probe_cache: optional JSON file that keeps probe results between runs (keyed by size and mtime).
    """

    def __init__(self, dataset, batch_size: int, *, seed: int | None = None, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, drop_last: bool = True, device_id: int | str | None = "auto",
                 num_threads: int = 4, prefetch: int = 2, pipelines: int = 1,
                 probe_workers: int | None = None, probe_cache: str | None = None):
        require_dali()
        if not isinstance(dataset, (VideoClipDataset, ImageDataset)):
            raise TypeError(f"dataset must be a VideoClipDataset or ImageDataset, got {type(dataset).__name__}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if num_threads < 1 or prefetch < 1 or pipelines < 1:
            raise ValueError(f"num_threads, prefetch and pipelines must be >= 1, got {num_threads}, {prefetch}, "
                             f"{pipelines}")
        if device_id == "auto":
            device_id = torch.cuda.current_device() if torch.cuda.is_available() else None
        elif device_id is not None:
            if not torch.cuda.is_available() or not 0 <= int(device_id) < torch.cuda.device_count():
                raise ValueError(f"device_id {device_id} is not a visible CUDA device "
                                 f"({torch.cuda.device_count()} visible); use None for DALI's CPU operators")
            device_id = int(device_id)
        self.dataset = dataset
        self.kind = "video" if isinstance(dataset, VideoClipDataset) else "image"
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed = int(dataset.seed if seed is None else seed)
        self.shuffle, self.drop_last = shuffle, drop_last
        self.device_id, self.num_threads, self.prefetch = device_id, num_threads, prefetch
        self.pipelines = int(pipelines)
        self.device = torch.device("cuda", device_id) if device_id is not None else torch.device("cpu")
        self._sampler = _EpochBatchSampler(len(dataset), batch_size, self.seed, rank, world_size, shuffle, drop_last)
        self._spec = _video_spec(dataset) if self.kind == "video" else _image_spec(dataset)
        self._plan_fn = _plan_video if self.kind == "video" else _plan_image

        items = dataset.items
        results = probe_files([it.path for it in items], self.kind, workers=probe_workers, cache=probe_cache)
        self._info: list = [None] * len(items)
        self._bad: dict[str, str] = {}
        for i, it in enumerate(items):
            r = results[it.path]
            if isinstance(r, str):
                self._mark_bad(it.path, r)
            else:
                self._info[i] = r
        if self.kind == "video" and device_id is None:
            cpu_codecs = ("vp8", "vp9", "mjpeg")
            other = sorted({r[3] for r in self._info if r is not None and r[3] not in cpu_codecs})
            if other:
                raise ValueError(f"DALI's CPU operators decode only {', '.join(cpu_codecs)} videos, and this list "
                                 f"has {', '.join(other)}: use a CUDA GPU (NVDEC), decoder='pyav', or re-encode "
                                 f"(bevt data synth --codec vp9 writes VP9)")
        self._last_good: _Planned | None = None  # a sample that decoded (tells file faults from pipeline faults)
        self.recoveries = 0  # pipeline rebuilds after a failure mid-run (files skipped then)

        self._epoch = 0
        self._position = 0
        self._generation = 0
        self._pool = ThreadPoolExecutor(max_workers=num_threads)
        self._slots: list[_Slot] = []  # the pipelines; batch k of an epoch goes to slot k % pipelines
        self._feed_epoch, self._feed_pos = 0, 0  # the next batch to plan
        self._shard: tuple[int | None, np.ndarray | None] = (None, None)
        self._closed = False

    # -- bookkeeping -------------------------------------------------------------------------------------
    def _mark_bad(self, path: str, reason: str) -> None:
        if path not in self._bad:
            self._bad[path] = reason
            warnings.warn(f"skipping unreadable file {path}: {reason}", SkippedFileWarning, stacklevel=3)

    def _plan_sample(self, epoch: int, index: int, preread: dict) -> tuple[_Planned, np.ndarray]:
        """Key -> the sample the CPU dataset would return (same substitution of unreadable files)."""
        ds, n = self.dataset, len(self.dataset)
        for j in range(min(ds.max_skips + 1, n)):
            k = (index + j) % n
            item = ds.items[k]
            if item.path in self._bad:
                continue
            data = preread[item.path] if item.path in preread else _read_bytes(item.path)
            if isinstance(data, str):
                self._mark_bad(item.path, data)
                continue
            args = self._plan_fn(ds, ds.rng(epoch, k), self._info[k])
            return _Planned(index=index, item=k, path=item.path, label=item.label, args=args), data
        raise RuntimeError(f"{ds.max_skips + 1} files in a row could not be read, starting at index {index} "
                           f"({ds.items[index].path}); the dataset looks broken (see the warnings above)")

    def _plan_batch(self, epoch: int, position: int) -> _Batch:
        if self._shard[0] != epoch:  # this rank's sample order, computed once per epoch
            self._shard = (epoch, self._sampler.indices(epoch))
        shard = self._shard[1]
        b = self.batch_size
        keys = [int(i) for i in shard[position * b:(position + 1) * b]]
        # the files asked for, read in parallel (substitutes for unreadable ones are read when needed)
        paths = list(dict.fromkeys(self.dataset.items[i].path for i in keys))
        paths = [p for p in paths if p not in self._bad]
        preread = dict(zip(paths, self._pool.map(_read_bytes, paths)))
        samples, encoded = [], []
        for i in keys:
            s, data = self._plan_sample(epoch, i, preread)
            samples.append(s)
            encoded.append(data)
        return _Batch(epoch, position, samples, encoded)

    def _plan_next(self) -> _Batch | None:
        if self._feed_pos >= len(self):
            return None
        batch = self._plan_batch(self._feed_epoch, self._feed_pos)
        self._feed_pos += 1
        return batch

    # -- the DALI side -------------------------------------------------------------------------------------
    def _new_pipeline(self, source, batch_size: int | None = None):
        return _build_pipeline(self.dataset, self._spec, source, batch_size=batch_size or self.batch_size,
                               num_threads=self.num_threads, device_id=self.device_id, prefetch=self.prefetch)

    def _drop_pipelines(self) -> None:
        self._slots = []  # DALI frees each pipeline (and its threads) when the last reference goes

    def _slot(self, position: int) -> "_Slot":
        return self._slots[position % len(self._slots)]

    def _feed(self, n: int) -> None:
        """Plan up to ``n`` more batches at the feed cursor, each to its pipeline, and start DALI on them."""
        touched = []
        for _ in range(n):
            batch = self._plan_next()
            if batch is None:
                break
            slot = self._slot(batch.position)
            slot.rearm()
            slot.pending.append(batch)
            touched.append(slot)
        for slot in dict.fromkeys(touched):
            slot.run()

    def _start(self) -> None:
        """Make the next output the batch at (epoch, position): keep what is in flight if it is exactly that."""
        if self._slots:
            slot = self._slot(self._position)
            head = slot.inflight[0] if slot.inflight else None
            if head is not None and (head.epoch, head.position) == (self._epoch, self._position):
                return
            if not any(sl.inflight or sl.pending for sl in self._slots):
                self._feed_epoch, self._feed_pos = self._epoch, self._position
                self._feed(self.prefetch * len(self._slots))
                return
        # nothing built yet, or batches of another place in flight: start afresh
        self._drop_pipelines()
        self._slots = [_Slot(self) for _ in range(self.pipelines)]
        self._feed_epoch, self._feed_pos = self._epoch, self._position
        self._feed(self.prefetch * self.pipelines)

    def _fetch(self, pipe, batch: _Batch) -> dict[str, torch.Tensor]:
        """The pipeline's next outputs as torch tensors, checked against the expected shapes.

        Raises ``_BadSamples`` when samples came back with the wrong shape.
        """
        from nvidia.dali.plugin.pytorch import feed_ndarray
        from nvidia.dali.tensors import TensorListGPU

        on_gpu = self.device.type == "cuda"
        stream = torch.cuda.current_stream(self.device) if on_gpu else None
        outs = pipe.share_outputs(stream) if on_gpu else pipe.share_outputs()
        try:
            out: dict[str, torch.Tensor] = {}
            for (key, shape), tl in zip(self._spec.outputs, outs):
                wrong = [i for i, sh in enumerate(tl.shape()) if tuple(sh) != shape]
                if wrong or len(tl) != len(batch.samples):
                    raise _BadSamples([batch.samples[i] for i in wrong],
                                      f"{key}: expected {shape} per sample, got {[tuple(tl.shape()[i]) for i in wrong]}")
                t = torch.empty((len(tl),) + shape, dtype=torch.uint8, device=self.device)
                if isinstance(tl, TensorListGPU):
                    feed_ndarray(tl.as_tensor(), t, cuda_stream=stream)
                else:
                    feed_ndarray(tl.as_tensor(), t)
                out[key] = t
        finally:
            pipe.release_outputs()
        labels = torch.tensor([s.label for s in batch.samples], dtype=torch.int64)
        index = torch.tensor([s.index for s in batch.samples], dtype=torch.int64)
        if on_gpu:  # pinned, so the copies do not wait for the step running on the stream
            labels = labels.pin_memory().to(self.device, non_blocking=True)
            index = index.pin_memory().to(self.device, non_blocking=True)
        out["label"], out["index"] = labels, index
        return out

    def _check_sample(self, sample: _Planned) -> str | None:
        """Decode one sample alone in a fresh pipeline -> why it fails, or None if it decodes."""
        data = _read_bytes(sample.path)
        if isinstance(data, str):
            return data
        cols = ([data],) + tuple([a] for a in sample.args)
        fed = [False]

        def source():
            if fed[0]:
                raise StopIteration
            fed[0] = True
            return cols

        try:
            pipe = _build_pipeline(self.dataset, self._spec, source, batch_size=1, num_threads=1,
                                   device_id=self.device_id, prefetch=1)
            outs = pipe.run()
            for (key, shape), tl in zip(self._spec.outputs, outs):
                if tuple(tl.shape()[0]) != shape:
                    return f"DALI decoded {key} of shape {tuple(tl.shape()[0])}, expected {shape}"
        except Exception as e:  # DALI raises RuntimeError; anything else is as fatal for this file
            msg = " ".join(str(e).split())
            return f"DALI failed on it ({type(e).__name__}: {msg[:300]})"
        return None

    def _recover(self, error: Exception, suspects: list[_Planned]) -> None:
        """A batch failed: find the files that fail alone, skip them, rebuild, re-plan from this batch.

        Raises when the failure is not a file's: no suspect fails alone, or a sample that decoded before
        fails too (a broken pipeline or device would otherwise mark every file as bad).
        """
        self._drop_pipelines()
        if self._last_good is not None:
            reason = self._check_sample(self._last_good)
            if reason is not None:
                raise RuntimeError(f"the DALI pipeline fails even on {self._last_good.path}, which it decoded "
                                   f"before ({reason}); not a file problem: {error}") from error
        failed = {}
        for s in dict((s.path, s) for s in suspects).values():
            reason = self._check_sample(s)
            if reason is not None:
                failed[s.path] = reason
        if not failed:
            raise RuntimeError(f"the DALI pipeline failed and no single file of the batch fails alone, so the "
                               f"failure cannot be skipped: {error}") from error
        if self._last_good is None and len(failed) > 1 and len(failed) == len({s.path for s in suspects}):
            raise RuntimeError(f"every file of the first batch fails in DALI alone ({len(failed)} files, e.g. "
                               f"{next(iter(failed.values()))}); that looks like a pipeline or device problem, "
                               f"not bad files: {error}") from error
        for path, reason in failed.items():
            self._mark_bad(path, reason)
        self.recoveries += 1
        self._start()  # rebuilt, re-planned from the failed batch (its files now skipped)

    def _next_batch(self) -> dict[str, torch.Tensor]:
        for attempt in range(self.dataset.max_skips + 2):
            slot = self._slot(self._position)
            batch = slot.inflight[0] if slot.inflight else None
            if batch is None or (batch.epoch, batch.position) != (self._epoch, self._position):
                raise RuntimeError(f"internal error: the DALI pipeline does not hold batch {self._position} of "
                                   f"epoch {self._epoch}")
            try:
                out = self._fetch(slot.pipe, batch)
            except _BadSamples as e:
                self._recover(e, e.samples)
                continue
            except StopIteration as e:
                raise RuntimeError("internal error: the DALI pipeline ran out of batches inside an epoch") from e
            except RuntimeError as e:
                # DALI may report the failure of any batch this pipeline holds: suspect all of them
                self._recover(e, [s for b in slot.inflight for s in b.samples])
                continue
            slot.inflight.popleft()
            self._last_good = batch.samples[0]
            self._feed(1)  # the batch `prefetch * pipelines` ahead, to the pipeline just emptied
            return out
        raise RuntimeError(f"the DALI pipeline kept failing on batch {self._position} of epoch {self._epoch}")

    # -- the Loader interface -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._sampler.num_batches

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def position(self) -> int:
        return self._position

    @property
    def skipped_files(self) -> list[str]:
        return sorted(self._bad)

    @property
    def skipped_reasons(self) -> dict[str, str]:
        """Why each skipped file was skipped."""
        return dict(sorted(self._bad.items()))

    def set_epoch(self, epoch: int) -> None:
        self._epoch, self._position = int(epoch), 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self._closed:
            raise RuntimeError("this loader was closed")
        self._generation += 1
        return self._iterate(self._generation)

    def _iterate(self, generation: int) -> Iterator[dict[str, torch.Tensor]]:
        while self._position < len(self):
            if generation != self._generation:
                raise RuntimeError("this DALI loader was iterated again (or resumed) while an older iterator "
                                   "was open; only the newest iterator can continue")
            if self._closed:
                raise RuntimeError("this loader was closed")
            self._start()
            batch = self._next_batch()
            # Counted before handing it out: a state_dict taken while the caller holds batch k resumes at k + 1.
            self._position += 1
            yield batch
        if generation == self._generation:
            self._epoch += 1
            self._position = 0

    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "position": self._position, "seed": self.seed,
                "batch_size": self.batch_size, "world_size": self.world_size, "rank": self.rank,
                "num_samples": len(self.dataset), "shuffle": self.shuffle, "drop_last": self.drop_last,
                "skipped_files": self.skipped_files, "decoder": "dali"}

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Continue from ``state`` (saved by this loader or by the CPU one); checks as the CPU loader."""
        mine = self.state_dict()
        diffs = [f"{k}: saved {state[k]!r}, now {mine[k]!r}"
                 for k in ("seed", "batch_size", "world_size", "num_samples", "shuffle", "drop_last")
                 if k in state and state[k] != mine[k]]
        if diffs:
            msg = "the loader state does not match this loader, so the resumed order would differ: " + "; ".join(diffs)
            if strict:
                raise ValueError(msg)
            warnings.warn(msg)
        position = int(state["position"])
        if not 0 <= position <= len(self):
            raise ValueError(f"saved position {position} is outside this epoch's {len(self)} batches")
        self._epoch, self._position = int(state["epoch"]), position
        known = {it.path for it in self.dataset.items}
        for path in state.get("skipped_files", ()):
            if path in known and path not in self._bad:
                self._bad[path] = "skipped by the run that saved this state"

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._drop_pipelines()
        self._pool.shutdown(wait=False)


class _BadSamples(RuntimeError):
    def __init__(self, samples: list[_Planned], reason: str):
        super().__init__(reason)
        self.samples = samples


class _Slot:
    """One DALI pipeline and the batches it holds (planned, then in flight), oldest first.

    DALI's first ``schedule_run`` after building (or ``reset``) runs ``prefetch`` iterations at once, each
    pulling one batch from :meth:`source`; later calls run one each. When the source has nothing (the
    epoch ends inside that prefetch) it raises StopIteration, and the pipeline needs ``reset`` before it
    takes more.
    """

    def __init__(self, loader: DaliLoader):
        self.pending: deque[_Batch] = deque()
        self.inflight: deque[_Batch] = deque()
        self.primed = False
        self.ended = False
        self.pipe = loader._new_pipeline(self.source)

    def source(self):
        # called by DALI in the loader's thread, inside schedule_run
        if not self.pending:
            self.ended = True
            raise StopIteration
        batch = self.pending.popleft()
        self.inflight.append(batch)
        return batch.columns()

    def rearm(self) -> None:
        if self.ended and not self.inflight:
            self.pipe.reset()
            self.primed = self.ended = False

    def run(self) -> None:
        """Start DALI on every pending batch."""
        if not self.pending:
            return
        if not self.primed:
            self.primed = True
            self.pipe.schedule_run()
        else:
            for _ in range(len(self.pending)):
                self.pipe.schedule_run()
