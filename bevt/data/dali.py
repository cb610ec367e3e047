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

**Pipelines.** Training clips of evenly spaced frames (the pretraining recipe; clip sampling for
fine-tuning) are read by DALI's file-list video reader, which keeps its NVDEC decoder from clip to clip
(35 clips/s per pipeline on an H100, against 11 for per-sample decoding that opens a decoder per clip):
for each epoch the loader writes every reader pipeline's list of ``file row start end`` lines from the
plans (rows number the lines; the reader hands them back as labels and the loader checks them). Other
clips (looping past the end of a short video, SSv2 segments, test views) and images go through
per-sample pipelines fed the file bytes. ``pipelines`` pipelines run side by side, the batches dealt to
them in turn, each ``prefetch`` batches ahead; batches are handed out in order. Per-sample pipelines run
on across epochs; the next epoch's readers are built as soon as this epoch's last batch is with DALI, so
no epoch starts with an empty queue.

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
import tempfile
import threading
import warnings
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from bevt.data import transforms as T
from bevt.data.datasets import BrokenDatasetError, ImageDataset, SkippedFileWarning, VideoClipDataset
from bevt.data.loader import Loader, _EpochBatchSampler
from bevt.data.video_io import ImageReadError, MediaReadError, probe

__all__ = ["DaliLoader", "dali_status", "install_command", "require_dali", "probe_files"]

_PLANNER = "bevt-dali-planner"
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
    except Image.DecompressionBombError as e:  # not an OSError: as read_image, a skip rather than a crash
        raise ImageReadError(path, f"too large to decode: {e}") from None
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
    encoded: list[np.ndarray] = field(default_factory=list)  # empty when a file-list reader reads the files
    rows: list[int] = field(default_factory=list)  # the samples' lines in that reader's list

    def columns(self) -> tuple:
        """What the pipeline's external source returns: one list per input, the encoded bytes first; for
        a reader, the arguments after the frame list (the list gives the frames)."""
        n = len(self.samples[0].args)
        first = 1 if self.rows else 0
        cols = tuple([s.args[j] for s in self.samples] for j in range(first, n))
        return cols if self.rows else (self.encoded,) + cols


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

def _reader_op(ds: VideoClipDataset, list_path: str, device_id: int | None):
    """The clips of a file list (``path row start end`` per line) -> (frames FHWC, row).

    Every line yields exactly one clip: frames ``start, start + interval, ...`` (``clip_len`` of them), the
    range ``[start, end)`` being exactly ``clip_len * interval`` frames and ``step`` that long too. The
    row number comes back as the label, so the loader can check that the reader kept the list's order.
    On the GPU this is DALI's NVDEC reader, which keeps its decoder from clip to clip (the per-sample
    decoder does not: 38 vs 10 clips/s on an H100); without a GPU, the FFmpeg reader with the same
    file-list semantics (VP9/VP8/MJPEG), which is how CPU CI exercises this path.
    """
    from nvidia.dali import fn

    span = ds.clip_len * ds.interval
    common = dict(file_list=list_path, sequence_length=ds.clip_len, stride=ds.interval, step=span,
                  random_shuffle=False, name="reader")
    if device_id is None:
        video, row = fn.experimental.readers.video(device="cpu", file_list_format="frames",
                                                   file_list_include_end=False, **common)
    else:
        video, row = fn.readers.video(device="gpu", file_list_frame_num=True,
                                      file_list_include_preceding_frame=False, **common)
    return video, row


def _video_graph(ds: VideoClipDataset, x: dict, device: str) -> list:
    from nvidia.dali import fn, types

    S, s = ds.crop, ds.tok_size
    if "decoded" in x:  # read by the file-list reader
        v_FHWC = x["decoded"]
    else:
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
                    prefetch: int, reader_list: str | None = None):
    """A built pipeline fed by ``source`` (see :meth:`_Batch.columns`).

    Without ``reader_list`` the source gives each sample's encoded bytes and every planned argument; with
    it (videos whose clip is one run of evenly spaced frames) the clips come from :func:`_reader_op` over
    that list and the source gives the arguments after the frame list; the reader's row numbers are an
    extra last output.
    """
    from nvidia.dali import fn, types
    from nvidia.dali.pipeline import Pipeline

    dtypes = {"uint8": types.UINT8, "int32": types.INT32, "float": types.FLOAT}
    inputs = spec.inputs if reader_list is None else spec.inputs[1:]  # the reader replaces "frames"
    encoded = () if reader_list is not None else (("encoded", "uint8", 1),)
    columns = encoded + tuple(inputs)
    pipe = Pipeline(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                    prefetch_queue_depth=prefetch, exec_async=True, exec_pipelined=True)
    with pipe:
        nodes = fn.external_source(source=source, num_outputs=len(columns), batch=True,
                                   dtype=[dtypes[d] for _, d, _ in columns], ndim=[n for _, _, n in columns])
        x = dict(zip((n for n, _, _ in columns), nodes))
        extra = []
        if reader_list is not None:
            x["decoded"], row = _reader_op(ds, reader_list, device_id)
            extra = [row]
        device = "mixed" if device_id is not None else "cpu"
        graph = _video_graph if isinstance(ds, VideoClipDataset) else _image_graph
        pipe.set_outputs(*graph(ds, x, device), *extra)
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
        pipelines: DALI pipelines working side by side (each with its own reader and NVDEC decoder), the
            batches dealt to them in turn. Default: 2 for training videos (one reader pipeline delivers
            ~35 clips/s on an H100, about the Swin-B step's need), else 1.
        file_lists: read training clips of evenly spaced frames (the pretraining recipe, clip sampling for
            fine-tuning) with DALI's file-list video reader, which keeps its decoder open from clip to clip;
            the loader writes each pipeline's list of (file, first frame) for the rest of the epoch. Clips
            it cannot hold (looping past the end of a short video, SSv2 segments, test views) are decoded
            one by one from the file bytes. ``False`` decodes every clip that way (slower; for comparison).
        probe_workers: processes probing the file list up front (default: cores, at most 8).
        probe_cache: optional JSON file that keeps probe results between runs (keyed by size and mtime).
    """

    def __init__(self, dataset, batch_size: int, *, seed: int | None = None, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, drop_last: bool = True, device_id: int | str | None = "auto",
                 num_threads: int = 4, prefetch: int = 2, pipelines: int | None = None, file_lists: bool = True,
                 probe_workers: int | None = None, probe_cache: str | None = None):
        require_dali()
        if not isinstance(dataset, (VideoClipDataset, ImageDataset)):
            raise TypeError(f"dataset must be a VideoClipDataset or ImageDataset, got {type(dataset).__name__}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        use_reader = (file_lists and isinstance(dataset, VideoClipDataset) and dataset.mode != "test"
                      and dataset.num_segments is None)
        if pipelines is None:
            pipelines = 2 if use_reader else 1
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
        self._pool = ThreadPoolExecutor(max_workers=num_threads)  # reads files
        # plans per-sample batches ahead, in order; its warnings wait for the caller's thread
        self._planner = ThreadPoolExecutor(max_workers=1, thread_name_prefix=_PLANNER)
        self._held_warnings: list[str] = []
        self._slots: list[_Slot] = []  # the pipelines of the rest of this epoch
        self._route: dict[tuple[int, int], _Slot] = {}  # (epoch, position) -> its reader pipeline
        self._stream: tuple[int, int] | None = None  # per-sample pipelines: where their stream starts
        self._built_epoch: int | None = None  # the newest epoch with reader pipelines
        # training clips of evenly spaced frames come from file-list readers (decoders kept open)
        self._use_reader = use_reader
        self._list_tmp = tempfile.TemporaryDirectory(prefix="bevt-dali-")  # the readers' file lists
        self._list_dir, self._lists = self._list_tmp.name, 0
        self._shard: tuple[int | None, np.ndarray | None] = (None, None)
        self._closed = False

    # -- bookkeeping -------------------------------------------------------------------------------------
    def _mark_bad(self, path: str, reason: str) -> None:
        if path not in self._bad:
            self._bad[path] = reason
            message = f"skipping unreadable file {path}: {reason}"
            if threading.current_thread().name.startswith(_PLANNER):
                self._held_warnings.append(message)  # warned by the caller's thread with its next batch
            else:
                warnings.warn(message, SkippedFileWarning, stacklevel=3)

    def _plan_sample(self, epoch: int, index: int, preread: dict | None) -> tuple[_Planned, np.ndarray | None]:
        """Key -> the sample the CPU dataset would return (same substitution of unreadable files).

        ``preread`` holds the files' bytes (read again if missing); ``None``: a reader will read the file,
        so only check that it is still there and not empty.
        """
        ds, n = self.dataset, len(self.dataset)
        for j in range(min(ds.max_skips + 1, n)):
            k = (index + j) % n
            item = ds.items[k]
            if item.path in self._bad:
                continue
            if preread is None:
                st = _stat(item.path)
                data = "file not found" if st is None else "empty file (0 bytes)" if st[0] == 0 else None
            else:
                data = preread[item.path] if item.path in preread else _read_bytes(item.path)
            if isinstance(data, str):
                self._mark_bad(item.path, data)
                continue
            args = self._plan_fn(ds, ds.rng(epoch, k), self._info[k])
            return _Planned(index=index, item=k, path=item.path, label=item.label, args=args), data
        raise BrokenDatasetError(f"{ds.max_skips + 1} files in a row could not be read, starting at index {index} "
                                 f"({ds.items[index].path}); the dataset looks broken (see the warnings above)")

    def _plan_batch(self, epoch: int, position: int, read: bool = True) -> _Batch:
        """The batch at (epoch, position), its files' bytes read unless ``read=False``."""
        cached = self._shard  # (read once: the background planner uses it too)
        if cached[0] != epoch:  # this rank's sample order, computed once per epoch
            cached = self._shard = (epoch, self._sampler.indices(epoch))
        shard = cached[1]
        b = self.batch_size
        keys = [int(i) for i in shard[position * b:(position + 1) * b]]
        preread = None
        if read:  # the files asked for, read in parallel (substitutes for unreadable ones when needed)
            paths = list(dict.fromkeys(self.dataset.items[i].path for i in keys))
            paths = [p for p in paths if p not in self._bad]
            preread = dict(zip(paths, self._pool.map(_read_bytes, paths)))
        samples, encoded = [], []
        for i in keys:
            s, data = self._plan_sample(epoch, i, preread)
            samples.append(s)
            encoded.append(data)
        return _Batch(epoch, position, samples, encoded if read else [])

    def _fits_reader(self, sample: _Planned) -> bool:
        """Whether the file-list reader can produce this clip: one run of evenly spaced frames (no loop
        past the end) of a path a whitespace-separated list can hold."""
        frames = sample.args[0]
        ds = self.dataset
        return (len(frames) == ds.clip_len and bool(np.all(np.diff(frames) == ds.interval))
                and not any(c.isspace() for c in sample.path))

    # -- the DALI side -------------------------------------------------------------------------------------
    def _new_pipeline(self, source, reader_list: str | None = None):
        return _build_pipeline(self.dataset, self._spec, source, batch_size=self.batch_size,
                               num_threads=self.num_threads, device_id=self.device_id, prefetch=self.prefetch,
                               reader_list=reader_list)

    def _drop_pipelines(self) -> None:
        # DALI frees each pipeline (and its threads) with its last reference
        self._slots, self._route, self._stream = [], {}, None

    def _write_list(self, batches: list[_Batch]) -> str:
        """A reader's file list for ``batches`` (numbering their rows) -> its path."""
        span = self.dataset.clip_len * self.dataset.interval
        lines = []
        for b in batches:
            b.rows = list(range(len(lines), len(lines) + len(b.samples)))
            for s, row in zip(b.samples, b.rows):
                start = int(s.args[0][0])
                lines.append(f"{s.path} {row} {start} {start + span}\n")
        self._lists += 1
        path = os.path.join(self._list_dir, f"list{self._lists}.txt")
        with open(path, "w") as f:
            f.writelines(lines)
        return path

    def _slot_for(self, epoch: int, position: int) -> "_Slot | None":
        """The pipeline that produces batch (epoch, position), if one is built for it."""
        if self._stream is not None:  # per-sample pipelines: batch g of the stream goes to pipeline g % P
            e0, p0 = self._stream
            g = (epoch - e0) * len(self) + position - p0
            return self._slots[g % len(self._slots)] if g >= 0 else None
        return self._route.get((epoch, position))

    def _stream_of(self, first: int, step: int) -> Iterator[tuple[int, int]]:
        """(epoch, position) of batches first, first + step, ... of the endless stream from ``_stream``."""
        e0, p0 = self._stream
        n, g = len(self), first
        while True:
            yield e0 + (p0 + g) // n, (p0 + g) % n
            g += step

    def _start(self) -> None:
        """Make the next output the batch at (epoch, position): keep what is in flight if it is exactly that,
        else build the pipelines from there."""
        slot = self._slot_for(self._epoch, self._position)
        head = slot.inflight[0] if slot is not None and slot.inflight else None
        if head is not None and (head.epoch, head.position) == (self._epoch, self._position):
            return
        self._drop_pipelines()
        if self._use_reader:
            self._build_epoch(self._epoch, self._position)
            return
        # per-sample decoding: the pipelines run on across epochs (batches of the next epoch are prepared
        # while the last ones of this epoch are used), until a failure or a jump rebuilds them
        self._stream = (self._epoch, self._position)
        self._slots = [_Slot(self, self._stream_of(j, self.pipelines)) for j in range(self.pipelines)]
        for s in self._slots:
            s.start()

    def _build_epoch(self, epoch: int, position: int) -> None:
        """Reader pipelines (and a per-sample one if needed) for batches ``position..`` of ``epoch``.

        Readers need their whole list when they are built, so the rest of the epoch is planned here; the
        next epoch's pipelines are built as soon as this epoch's last batch is handed to DALI (see
        :meth:`_next_batch`), so they decode while the last batches of this one are used.
        """
        planned = [self._plan_batch(epoch, p, read=False) for p in range(position, len(self))]
        fits = [all(self._fits_reader(s) for s in b.samples) for b in planned]
        reader_batches = [b for b, f in zip(planned, fits) if f]
        # clips the reader cannot produce (looped past the end of a short video, ...) are decoded one by one
        decode = deque((b.epoch, b.position) for b, f in zip(planned, fits) if not f)
        groups = [g for g in (reader_batches[j::self.pipelines] for j in range(self.pipelines)) if g]
        new = []
        try:
            for group in groups:
                new.append(_Slot(self, deque(group), reader_list=self._write_list(group)))
        except Exception as e:  # DALI may open the listed files while building the reader
            self._recover(e, [], [s for g in groups for b in g for s in b.samples])
            return
        if decode:
            new.append(_Slot(self, decode))
        for slot in new:
            for item in slot.todo:
                self._route[(item.epoch, item.position) if isinstance(item, _Batch) else item] = slot
            self._slots.append(slot)
            slot.start()
        self._built_epoch = epoch

    def _build_ahead(self) -> None:
        """Once every batch of the newest epoch is with DALI, build the next epoch's readers."""
        if not self._use_reader or any(s.has_more() for s in self._slots) or len(self) == 0:
            return
        if self._built_epoch is not None and (self._built_epoch, len(self) - 1) in self._route:
            self._build_epoch(self._built_epoch + 1, 0)

    def _fetch(self, slot: "_Slot", batch: _Batch) -> dict[str, torch.Tensor]:
        """The pipeline's next outputs as torch tensors, checked against the expected shapes (and, for a
        reader, the expected rows of its list).

        Raises ``_BadSamples`` when samples came back with the wrong shape or a reader skipped them.
        """
        from nvidia.dali.plugin.pytorch import feed_ndarray
        from nvidia.dali.tensors import TensorListGPU

        pipe = slot.pipe
        on_gpu = self.device.type == "cuda"
        stream = torch.cuda.current_stream(self.device) if on_gpu else None
        outs = pipe.share_outputs(stream) if on_gpu else pipe.share_outputs()
        try:
            if batch.rows:
                rows = outs[len(self._spec.outputs)]
                rows = rows.as_cpu() if isinstance(rows, TensorListGPU) else rows
                got = np.asarray(rows.as_tensor()).reshape(-1).tolist()
                if got != batch.rows:
                    # the reader drops files it cannot open when it is built: those rows never come
                    missing = [s for s, r in zip(batch.samples, batch.rows) if r not in got]
                    if not missing:
                        raise RuntimeError(f"internal error: the DALI reader returned rows {got}, expected "
                                           f"{batch.rows}")
                    raise _BadSamples(missing, f"the DALI reader skipped rows {sorted(set(batch.rows) - set(got))}")
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
        """Decode one sample alone in a fresh pipeline (the reader when it would read it) -> why it fails,
        or None if it decodes."""
        data = _read_bytes(sample.path)
        if isinstance(data, str):
            return data
        batch = _Batch(0, 0, [sample], [data])
        reader_list = None
        if self._use_reader and self._fits_reader(sample):
            reader_list = self._write_list([batch])
        fed = [False]

        def source():
            if fed[0]:
                raise StopIteration
            fed[0] = True
            return batch.columns()

        try:
            pipe = _build_pipeline(self.dataset, self._spec, source, batch_size=1, num_threads=1,
                                   device_id=self.device_id, prefetch=1, reader_list=reader_list)
            outs = pipe.run()
            for (key, shape), tl in zip(self._spec.outputs, outs):
                if tuple(tl.shape()[0]) != shape:
                    return f"DALI decoded {key} of shape {tuple(tl.shape()[0])}, expected {shape}"
        except Exception as e:  # DALI raises RuntimeError; anything else is as fatal for this file
            msg = " ".join(str(e).split())
            return f"DALI failed on it ({type(e).__name__}: {msg[:300]})"
        return None

    def _recover(self, error: Exception, suspects: list[_Planned], listed: list[_Planned] = ()) -> None:
        """A batch failed: find the files that fail alone, skip them, rebuild, re-plan from this batch.

        ``suspects``: the samples the failing pipeline held; ``listed``: every sample of its reader list,
        of which those named in the error are suspects too (a reader may fail on any file of its list).
        When no file fails alone but a reader was involved, the loader goes on without readers (a warning
        says why). Raises when the failure is not a file's: no suspect fails alone, or a sample that
        decoded before fails too (a broken pipeline or device would otherwise mark every file as bad).
        """
        self._drop_pipelines()
        message = str(error)
        suspects = list(suspects) + [s for s in listed if s.path in message]
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
        if not failed and self._use_reader:
            self._use_reader = False
            warnings.warn(f"the DALI file-list reader failed and no single file fails alone; decoding every "
                          f"clip on its own from here (slower): {' '.join(message.split())[:300]}", stacklevel=3)
        elif not failed:
            raise RuntimeError(f"the DALI pipeline failed and no single file of the batch fails alone, so the "
                               f"failure cannot be skipped: {error}") from error
        elif self._last_good is None and len(failed) > 1 and len(failed) == len({s.path for s in suspects}):
            raise RuntimeError(f"every file of the first batch fails in DALI alone ({len(failed)} files, e.g. "
                               f"{next(iter(failed.values()))}); that looks like a pipeline or device problem, "
                               f"not bad files: {error}") from error
        for path, reason in failed.items():
            self._mark_bad(path, reason)
        self.recoveries += 1
        self._start()  # rebuilt, re-planned from the failed batch (its files now skipped)

    def _next_batch(self) -> dict[str, torch.Tensor]:
        for attempt in range(self.dataset.max_skips + 3):
            slot = self._slot_for(self._epoch, self._position)
            batch = slot.inflight[0] if slot is not None and slot.inflight else None
            if batch is None or (batch.epoch, batch.position) != (self._epoch, self._position):
                raise RuntimeError(f"internal error: the DALI pipeline does not hold batch {self._position} of "
                                   f"epoch {self._epoch}")
            try:
                out = self._fetch(slot, batch)
            except _BadSamples as e:
                self._recover(e, e.samples)
                continue
            except StopIteration as e:
                raise RuntimeError("internal error: the DALI pipeline ran out of batches inside an epoch") from e
            except RuntimeError as e:
                # DALI may report the failure of any batch this pipeline holds: suspect all of them
                self._recover(e, [s for b in slot.inflight for s in b.samples], slot.listed)
                continue
            slot.inflight.popleft()
            self._last_good = batch.samples[0]
            while self._held_warnings:
                warnings.warn(self._held_warnings.pop(0), SkippedFileWarning, stacklevel=4)
            slot.top_up()  # the pipeline just emptied starts its next batch
            if self._stream is None:  # reader pipelines: forget what is used up, prepare the next epoch
                self._route.pop((batch.epoch, batch.position), None)
                self._slots = [s for s in self._slots if s.has_more() or s.inflight]
                self._build_ahead()
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
        self._planner.shutdown(wait=False, cancel_futures=True)
        self._pool.shutdown(wait=False)
        self._list_tmp.cleanup()


class _BadSamples(RuntimeError):
    def __init__(self, samples: list[_Planned], reason: str):
        super().__init__(reason)
        self.samples = samples


class _Slot:
    """One DALI pipeline and the batches it produces, in order: ``todo`` (not yet handed to DALI: planned
    batches for a reader, whose list is written from them, or (epoch, position) keys, planned when DALI
    asks for them) and ``inflight`` (handed to DALI, outputs not yet taken).

    DALI's first ``schedule_run`` after building runs ``prefetch`` iterations at once, each pulling one
    batch from :meth:`source`; later calls run one each, so the loader keeps ``prefetch`` batches in flight
    by calling :meth:`top_up` after taking an output. When ``todo`` runs out inside that first prefetch,
    the source raises StopIteration, which ends this pipeline's work (it is not used again).
    """

    def __init__(self, loader: DaliLoader, todo, reader_list: str | None = None):
        self.loader = loader
        self.todo = todo if isinstance(todo, deque) else _Endless(todo)
        self.inflight: deque[_Batch] = deque()
        self.listed = [s for b in todo for s in b.samples] if reader_list is not None else []
        # per-sample pipelines: the next batch is planned (and its files read) in the background
        self.plans_ahead, self.planning = reader_list is None, None
        self.pipe = loader._new_pipeline(self.source, reader_list)

    def _next(self) -> _Batch:
        if self.planning is not None:
            batch, self.planning = self.planning.result(), None
        else:
            item = self.todo.popleft()
            batch = item if isinstance(item, _Batch) else self.loader._plan_batch(*item)
        if self.plans_ahead and self.todo:
            # plan the following one while the training step runs (its host thread mostly waits on the GPU)
            self.planning = self.loader._planner.submit(self.loader._plan_batch, *self.todo.popleft())
        return batch

    def has_more(self) -> bool:
        return bool(self.todo) or self.planning is not None

    def source(self):
        # called by DALI in the loader's thread, inside schedule_run
        if not self.has_more():
            raise StopIteration
        batch = self._next()
        self.inflight.append(batch)
        return batch.columns()

    def start(self) -> None:
        self.pipe.schedule_run()

    def top_up(self) -> None:
        if self.has_more():
            self.pipe.schedule_run()


class _Endless:
    """An endless iterator of keys with the deque methods :class:`_Slot` uses."""

    def __init__(self, keys: Iterator):
        self._keys = keys

    def __bool__(self) -> bool:
        return True

    def popleft(self):
        return next(self._keys)
