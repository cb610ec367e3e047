"""Video-clip and image datasets for pretraining, fine-tuning and testing (CPU decoding).

Shape legend: B batch, V views (clips x crops), T frames, S crop size, s tokenizer-copy size, 3 channels.

A sample is addressed by a key ``(epoch, index)``; **all** its randomness comes from
``np.random.default_rng([seed, epoch, index])``, so a sample is the same whatever the number of loader
workers, the batch it lands in, or whether the run was resumed.

Sample dicts (uint8 pixels in 0..255; normalisation happens on the device, see
:func:`bevt.data.transforms.normalize`):

=============  ==============================  ========================================================
mode           video (:class:`VideoClipDataset`)  images (:class:`ImageDataset`)
=============  ==============================  ========================================================
``pretrain``   ``video`` (3, T, S, S),            ``images`` (3, S, S), ``images_tok`` (3, s, s)
               ``video_tok`` (T, 3, s, s)
``finetune``   ``video`` (3, T, S, S)             ``images`` (3, S, S)
``test``       ``video`` (V, 3, T, S, S)          ``images`` (3, S, S)
=============  ==============================  ========================================================

and in every mode ``label`` (int64), ``index`` (int64, the index asked for), ``skipped`` (a list of
the paths that could not be read while producing this sample) and ``skip_reasons`` (why, one string per
path); the loader removes the two lists from the batch and aggregates them.

A missing, empty, truncated or corrupt file never stops a run: a :class:`SkippedFileWarning` names the
file and the reason, once per file, and the dataset returns the next index that reads instead,
deterministically, so the batch keeps its size. Used directly, the dataset warns itself; in the worker
processes of a :class:`~bevt.data.loader.TorchLoader` it stays silent and the loader warns from the main
process, so a file is reported once per run, not once per worker.
"""
from __future__ import annotations

import codecs
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bevt.data import sampling
from bevt.data import transforms as T
from bevt.data.video_io import MediaReadError, VideoReader, read_image

__all__ = [
    "Sample",
    "AnnotationError",
    "SkippedFileWarning",
    "BrokenDatasetError",
    "read_annotation_list",
    "scan_folder",
    "read_class_names",
    "VideoClipDataset",
    "ImageDataset",
    "VIDEO_EXTENSIONS",
    "IMAGE_EXTENSIONS",
]

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
MODES = ("pretrain", "finetune", "test")


class AnnotationError(ValueError):
    """An annotation list or folder that cannot be used (says which file and line)."""


class SkippedFileWarning(UserWarning):
    """A file could not be read and was replaced by another sample."""


class BrokenDatasetError(ValueError):
    """More files in a row could not be read than a dataset tolerates (``max_skips``): bad input, not a bug.

    torch's DataLoader re-raises a worker's exception as ``type(e)(text)`` with the worker's traceback in the
    text; the constructor keeps only the original message, so the user reads one line, not a traceback."""

    def __init__(self, message: str):
        marker = f"{type(self).__name__}: "
        if message.startswith("Caught ") and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)


@dataclass(frozen=True)
class Sample:
    """One entry of a dataset: the full path and the integer label."""

    path: str
    label: int


# ----------------------------------------------------------------------------------------------------
# Annotation lists and folders
# ----------------------------------------------------------------------------------------------------

def _text_lines(path: Path, what: str) -> list[str]:
    """The lines of a UTF-8 text file. A byte-order mark (Windows editors write one) is dropped: kept, it would
    become part of the first path, and that sample would be skipped as missing. Another encoding is an
    AnnotationError naming the file and line, not a bare UnicodeDecodeError."""
    data = path.read_bytes()
    data = data[len(codecs.BOM_UTF8):] if data.startswith(codecs.BOM_UTF8) else data
    try:
        return data.decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        lineno = data[:e.start].count(b"\n") + 1
        raise AnnotationError(f"{path}:{lineno}: the {what} is not UTF-8 text ({e.reason}); save it as UTF-8") from None


def read_annotation_list(path: str | os.PathLike, data_prefix: str | os.PathLike | None = None) -> list[Sample]:
    """Read an mmaction list: one ``relative/path label`` per line -> samples with joined paths.

    ``data_prefix`` is joined in front of every path (default: the list's own directory). Blank lines and
    lines starting with ``#`` are skipped; the label is the last whitespace-separated field, so paths may
    contain spaces. Raises :class:`AnnotationError` for a missing, empty or non-UTF-8 list, a line without
    a label, or a label that is not a non-negative integer (with the file and line number).
    """
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"annotation list not found: {path}")
    prefix = Path(data_prefix) if data_prefix is not None else path.parent
    items: list[Sample] = []
    for lineno, line in enumerate(_text_lines(path, "annotation list"), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2:
            raise AnnotationError(f"{path}:{lineno}: expected 'relative/path label', got {line!r} (no label)")
        rel, label = parts
        try:
            label_i = int(label)
        except ValueError:
            raise AnnotationError(f"{path}:{lineno}: the label must be an integer, got {label!r}") from None
        if label_i < 0:
            raise AnnotationError(f"{path}:{lineno}: the label must be >= 0, got {label_i}")
        items.append(Sample(str(prefix / rel), label_i))
    if not items:
        raise AnnotationError(f"annotation list {path} has no entries")
    return items


def scan_folder(root: str | os.PathLike, extensions=VIDEO_EXTENSIONS) -> tuple[list[Sample], list[str]]:
    """Folder-tree mode: ``root/<class_name>/<file>`` -> (samples, class names).

    Labels index the class-folder names sorted alphabetically (torchvision ``ImageFolder``); files are
    found recursively under each class folder and sorted, so the order is stable. Only files with one of
    ``extensions`` (case-insensitive) count.
    """
    root = Path(root)
    if not root.is_dir():
        raise AnnotationError(f"dataset folder not found: {root}")
    exts = tuple(e.lower() for e in extensions)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise AnnotationError(f"{root} has no class folders (expected root/<class_name>/<file>)")
    items = []
    for label, name in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(root / name):
            dirnames.sort()
            for fn in sorted(filenames):
                if fn.lower().endswith(exts):
                    items.append(Sample(os.path.join(dirpath, fn), label))
    if not items:
        raise AnnotationError(f"no files with extensions {', '.join(exts)} under {root}/<class_name>/")
    return items, classes


def list_source(path: str, prefix: str = "") -> str | list[Sample]:
    """What a dataset reads for the annotation list or class folder at ``path``: the path itself, or, with a
    ``prefix`` (mmaction's ``data_prefix``, e.g. ``videos_train`` for Kinetics' official lists), the list's
    samples with their relative paths joined to that folder instead of the list's own."""
    if not prefix:
        return path
    if os.path.isdir(path):
        raise AnnotationError(f"{path} is a folder of class folders; a data prefix ({prefix}) applies to annotation "
                              f"lists only")
    if not os.path.isdir(prefix):
        raise AnnotationError(f"the data prefix {prefix} (the folder the paths of {path} start from) is not a folder")
    return read_annotation_list(path, prefix)


def read_class_names(path: str | os.PathLike) -> list[str]:
    """One class name per line (line i is label i), blank lines ignored."""
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"class-name file not found: {path}")
    names = [line.strip() for line in _text_lines(path, "class-name file") if line.strip()]
    if not names:
        raise AnnotationError(f"class-name file {path} is empty")
    return names


def _as_items(items, extensions) -> list[Sample]:
    if isinstance(items, (str, os.PathLike)):
        p = Path(items)
        return scan_folder(p, extensions)[0] if p.is_dir() else read_annotation_list(p)
    items = [it if isinstance(it, Sample) else Sample(str(it[0]), int(it[1])) for it in items]
    if not items:
        raise AnnotationError("the dataset has no samples")
    return items


# ----------------------------------------------------------------------------------------------------
# Shared machinery: per-sample RNG, skipping unreadable files
# ----------------------------------------------------------------------------------------------------

def warn_skipped(path: str, reason: str, stacklevel: int = 2) -> None:
    """The one warning for an unreadable file (by the dataset itself, or by the loader for its workers)."""
    warnings.warn(f"skipping unreadable file {path}" + (f": {reason}" if reason else ""), SkippedFileWarning,
                  stacklevel=stacklevel)


class _SkippingDataset(torch.utils.data.Dataset):
    """Keys, per-sample RNG and the skip-and-substitute logic shared by the video and image datasets."""

    extensions: tuple[str, ...] = ()  # the files that count in folder mode

    def __init__(self, items, *, mode: str, seed: int, max_skips: int):
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
        self.items = _as_items(items, self.extensions)
        self.mode = mode
        self.seed = int(seed)
        self.max_skips = int(max_skips)
        self._warned: set[str] = set()  # per process: warn once per file
        self.warn_skips = True  # False in a loader's workers: the loader reports skips from the main process

    def __len__(self) -> int:
        return len(self.items)

    @staticmethod
    def _split_key(key) -> tuple[int, int]:
        if isinstance(key, (tuple, list)):
            epoch, index = key
        else:
            epoch, index = 0, key
        return int(epoch), int(index)

    def rng(self, epoch: int, index: int) -> np.random.Generator:
        """The generator of every random draw of sample ``index`` in ``epoch``."""
        return np.random.default_rng([self.seed, epoch, index])

    def __getitem__(self, key) -> dict:
        epoch, index = self._split_key(key)
        n = len(self.items)
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n}")
        skipped: list[str] = []
        reasons: list[str] = []
        # Try the index asked for, then the next ones (wrapping): a pure function of the key, so every
        # worker substitutes the same sample. Failures are re-detected each time rather than remembered,
        # which keeps the result independent of what this worker happened to read before.
        for j in range(min(self.max_skips + 1, n)):
            k = (index + j) % n
            item = self.items[k]
            try:
                out = self._load(item, self.rng(epoch, k))
            except MediaReadError as e:
                self._warn(item.path, e.reason)
                skipped.append(item.path)
                reasons.append(e.reason)
                continue
            out["label"] = torch.tensor(item.label, dtype=torch.int64)
            out["index"] = torch.tensor(index, dtype=torch.int64)
            out["skipped"] = skipped
            out["skip_reasons"] = reasons
            return out
        shown = "; ".join(f"{p}: {r}" for p, r in list(zip(skipped, reasons))[:3])
        more = f"; and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        raise BrokenDatasetError(f"{len(skipped)} files in a row could not be read, starting at index {index} "
                                 f"({shown}{more}); the dataset looks broken")

    def _warn(self, path: str, reason: str) -> None:
        if self.warn_skips and path not in self._warned:
            self._warned.add(path)
            warn_skipped(path, reason, stacklevel=4)

    def _load(self, item: Sample, rng: np.random.Generator) -> dict:
        raise NotImplementedError


def _video_layout(x_THWC: np.ndarray) -> torch.Tensor:
    """(T, H, W, 3) -> (3, T, H, W) contiguous uint8 tensor."""
    return torch.from_numpy(np.ascontiguousarray(x_THWC.transpose(3, 0, 1, 2)))


def _frames_layout(x_THWC: np.ndarray) -> torch.Tensor:
    """(T, H, W, 3) -> (T, 3, H, W) contiguous uint8 tensor."""
    return torch.from_numpy(np.ascontiguousarray(x_THWC.transpose(0, 3, 1, 2)))


# ----------------------------------------------------------------------------------------------------
# Video clips
# ----------------------------------------------------------------------------------------------------

class VideoClipDataset(_SkippingDataset):
    """Clips of videos, augmented for BEVT pretraining, fine-tuning or testing.

    Args:
        items: samples, ``(path, label)`` pairs, an annotation-list path, or a class-folder root.
        mode: ``pretrain`` (random clip, RandomRescale/RandomCrop/Flip + tokenizer copy),
            ``finetune`` (random clip, resize short side, RandomResizedCrop, resize, flip) or ``test``
            (``num_clips`` evenly spaced clips x ``num_crops`` crops, resize short side).
        clip_len, interval: frames per clip and the step between them (pretraining 16 x 8).
        num_segments: SSv2-style uniform sampling of this many frames instead (``clip_len``/``interval``
            are then unused).
        num_clips: clips per video in test mode (K400: 4).
        scale: pretraining short-side range (inclusive). crop: output size S. tok_size: s.
        short_side: the fixed short side of fine-tuning and testing (256; the 3-crop test uses 224).
        num_crops: test-mode crops, 1 (centre) or 3 (``ThreeCrop``).
        flip_p: flip probability (SSv2 recipes use 0).
        area_range, aspect_ratio_range: fine-tuning ``RandomResizedCrop``.
        seed: the dataset seed (see the module docstring).
        max_skips: how many unreadable files in a row are tolerated before giving up.
    """

    extensions = VIDEO_EXTENSIONS

    def __init__(self, items, mode: str = "pretrain", *, clip_len: int = 16, interval: int = 8,
                 num_segments: int | None = None, num_clips: int = 1, scale: tuple[int, int] = (256, 320),
                 crop: int = 224, tok_size: int = 112, short_side: int = 256, num_crops: int = 1,
                 flip_p: float = 0.5, area_range=(0.08, 1.0), aspect_ratio_range=(3 / 4, 4 / 3),
                 seed: int = 0, max_skips: int = 16):
        super().__init__(items, mode=mode, seed=seed, max_skips=max_skips)
        if num_crops not in (1, 3):
            raise ValueError(f"num_crops must be 1 (centre crop) or 3 (ThreeCrop), got {num_crops}")
        if num_segments is None and (clip_len < 1 or interval < 1):
            raise ValueError(f"clip_len and interval must be >= 1, got {clip_len}, {interval}")
        if num_segments is not None and num_segments < 1:
            raise ValueError(f"num_segments must be >= 1, got {num_segments}")
        if mode == "test" and num_crops == 3 and short_side != crop:
            raise ValueError(f"ThreeCrop needs short_side == crop (official: 224 and 224), got {short_side}, {crop}")
        self.clip_len, self.interval, self.num_segments = clip_len, interval, num_segments
        self.num_clips, self.scale, self.crop, self.tok_size = num_clips, tuple(scale), crop, tok_size
        self.short_side, self.num_crops, self.flip_p = short_side, num_crops, flip_p
        self.area_range, self.aspect_ratio_range = tuple(area_range), tuple(aspect_ratio_range)

    @property
    def frames_per_clip(self) -> int:
        return self.num_segments if self.num_segments is not None else self.clip_len

    def frame_indices(self, num_frames: int, rng: np.random.Generator) -> np.ndarray:
        """Frame indices for a video of ``num_frames`` -> int64 (T,) (train) or (N, T) (test)."""
        test = self.mode == "test"
        if self.num_segments is not None:
            inds = sampling.uniform_segment_indices(num_frames, self.num_segments, None if test else rng)
            return inds[None] if test else inds
        if test:
            return sampling.test_clip_indices(num_frames, self.clip_len, self.interval, self.num_clips)
        return sampling.train_clip_indices(num_frames, self.clip_len, self.interval, rng)

    def plan(self, rng: np.random.Generator, num_frames: int, height: int, width: int):
        """Every random draw of one sample, before decoding -> (frame indices, augmentation params).

        Indices: int64 (T,), or (N, T) in test mode. Params: :class:`~bevt.data.transforms.ClipAugParams`
        (pretrain), :class:`~bevt.data.transforms.FinetuneAugParams` (finetune, in the frame resized to
        ``short_side``) or None (test). Another decoder (the GPU loader) reproduces this dataset's samples
        exactly by calling it with ``self.rng(epoch, index)`` and the video's probed size.
        """
        inds = self.frame_indices(num_frames, rng)
        return inds, self.aug_params(rng, height, width)

    def aug_params(self, rng: np.random.Generator, height: int, width: int):
        """The augmentation draws for frames of (height, width); called after :meth:`frame_indices`."""
        if self.mode == "pretrain":
            return T.sample_params(rng, height, width, scale=self.scale, crop=self.crop, flip_p=self.flip_p)
        if self.mode == "finetune":
            h, w = T.rescaled_size(height, width, self.short_side)
            return T.sample_finetune_params(rng, h, w, area_range=self.area_range,
                                            aspect_ratio_range=self.aspect_ratio_range, flip_p=self.flip_p)
        return None

    def _load(self, item: Sample, rng: np.random.Generator) -> dict:
        # Same draws, in the same order, as plan(); the size is taken from the decoded frames.
        with VideoReader(item.path) as reader:
            inds = self.frame_indices(reader.num_frames, rng)
            frames = reader.get(inds.reshape(-1))  # (N*T, H, W, 3); one decode pass for all test clips
        params = self.aug_params(rng, frames.shape[1], frames.shape[2])
        if self.mode == "pretrain":
            x_TSSC, tok_TssC = T.apply_params(frames, params, crop=self.crop, tok_size=self.tok_size)
            return {"video": _video_layout(x_TSSC), "video_tok": _frames_layout(tok_TssC)}
        x_THWC = T.resize_short(frames, self.short_side, "bilinear")
        if self.mode == "finetune":
            return {"video": _video_layout(T.apply_finetune_params(x_THWC, params, size=self.crop))}
        # test: (N*T) frames -> views = clips x crops, clip-major as mmaction (all crops of clip 0 first)
        n_clips, t = inds.shape
        x_NTHWC = x_THWC.reshape(n_clips, t, *x_THWC.shape[1:])
        views = []
        for clip_THWC in x_NTHWC:
            if self.num_crops == 3:
                views.extend(T.three_crop(clip_THWC, self.crop))
            else:
                views.append(T.center_crop(clip_THWC, self.crop))
        return {"video": torch.stack([_video_layout(v) for v in views])}


# ----------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------

class ImageDataset(_SkippingDataset):
    """Images for the image stream (pretraining) or for image fine-tuning / testing.

    Pretraining: RandomRescale (bicubic) -> ColorJitter -> RandomCrop -> Flip -> tokenizer copy. The
    jitter order (a permutation of brightness, contrast, saturation, hue) is drawn once from ``seed``.
    Fine-tuning: RandomResizedCrop -> resize -> flip. Test: resize short side -> centre crop.
    ``jitter=None`` disables colour jitter.
    """

    extensions = IMAGE_EXTENSIONS  # a folder of images (ImageNet's train/<class>/*.JPEG layout)

    def __init__(self, items, mode: str = "pretrain", *, scale: tuple[int, int] = (256, 320), crop: int = 224,
                 tok_size: int = 112, jitter: tuple[float, float, float, float] | None = (0.4, 0.4, 0.4, 0.0),
                 short_side: int = 256, flip_p: float = 0.5, area_range=(0.08, 1.0),
                 aspect_ratio_range=(3 / 4, 4 / 3), seed: int = 0, max_skips: int = 16):
        super().__init__(items, mode=mode, seed=seed, max_skips=max_skips)
        self.scale, self.crop, self.tok_size = tuple(scale), crop, tok_size
        self.short_side, self.flip_p = short_side, flip_p
        self.area_range, self.aspect_ratio_range = tuple(area_range), tuple(aspect_ratio_range)
        if jitter is None:
            self.jitter = None
        else:
            # Official: np.random.permutation(4) at construction, i.e. fixed per worker process; here
            # fixed per dataset seed so that every worker (and a resumed run) uses the same order.
            order = tuple(int(i) for i in np.random.default_rng([self.seed, 0x6A177E5]).permutation(4))
            self.jitter = T.ColorJitter(*jitter, order=order)

    def _load(self, item: Sample, rng: np.random.Generator) -> dict:
        img_HWC = read_image(item.path)
        H, W = img_HWC.shape[:2]
        if self.mode == "pretrain":
            params = T.sample_params(rng, H, W, scale=self.scale, crop=self.crop, flip_p=self.flip_p,
                                     jitter=self.jitter)
            x_SSC, tok_ssC = T.apply_params(img_HWC, params, crop=self.crop, tok_size=self.tok_size)
            return {"images": torch.from_numpy(np.ascontiguousarray(x_SSC.transpose(2, 0, 1))),
                    "images_tok": torch.from_numpy(np.ascontiguousarray(tok_ssC.transpose(2, 0, 1)))}
        if self.mode == "finetune":
            params = T.sample_finetune_params(rng, H, W, area_range=self.area_range,
                                              aspect_ratio_range=self.aspect_ratio_range, flip_p=self.flip_p)
            x_SSC = T.apply_finetune_params(img_HWC, params, size=self.crop)
        else:
            x_SSC = T.center_crop(T.resize_short(img_HWC, self.short_side, "bilinear"), self.crop)
        return {"images": torch.from_numpy(np.ascontiguousarray(x_SSC.transpose(2, 0, 1)))}
