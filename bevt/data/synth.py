"""A synthetic video dataset whose classes only time can tell apart, written as real video files.

Shape legend: T frames, H height, W width, 3 RGB channels.

Eight classes in four pairs. The second class of each pair is the first one played backwards, frame for
frame (same random draws), so within a pair the *set* of frames is identical and only their order differs:
a single frame, or shuffled frames, cannot do better than chance within a pair (50 % on the 8-way task),
while a video model can reach 100 %. This makes the set a sanity check for the paper's
temporal-dependency analysis (single-frame and shuffled-frame tests) as well as a small training set.

=====================  ===================================================================
``move_up``             one shape travels upwards across the middle of the frame
``move_down``           ... downwards (``move_up`` reversed)
``grow``                one shape grows from small to large
``shrink``              ... shrinks (``grow`` reversed)
``square_then_circle``  a square flashes, then (elsewhere) a circle flashes
``circle_then_square``  ... the circle first (reversed)
``approach``            two shapes move towards each other until they overlap
``separate``            ... start overlapping and move apart (reversed)
=====================  ===================================================================

Every label survives a horizontal flip (no left/right or clockwise classes), so the K400 fine-tuning
recipe with ``Flip(0.5)`` is valid here too. Appearance carries no label information: per clip, a random
textured background (colour gradient, stripes, noise, blurry blobs), random shapes, colours, sizes,
positions and event times. Objects stay in the central part of the frame so random crops keep them.
The order classes need a clip that spans most of the video (events sit in the first and last ~40 %):
sample at least ~2/3 of the frames (or use uniform segments) when fine-tuning on them.

Images (for the image stream) are single frames of the same world, one shape each, labelled by shape
(``circle``, ``square``, ``diamond``).

Layout written under ``root``::

    train/<class>/train_00000.mp4 ...   val/<class>/val_00000.mp4 ...   images/<shape>/img_00000.jpg ...
    train.txt  val.txt  images.txt      (mmaction lists: "relative/path label", relative to root)
    classes.txt  image_classes.txt      (one name per line; line i is label i)
    synth.json                          (the generation settings; marks the folder as ours)

Other files in ``root`` (a tokenizer that ``bevt pretrain`` trained there, the user's notes) are never
deleted: ``overwrite`` removes only files of the layout above.

Everything is a function of the seed: sample ``i`` of a split draws from ``default_rng([seed, split, i])``,
so the rendered frames do not depend on the worker count or on the number of samples asked for.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bevt.cli import int_at_least

__all__ = [
    "CLASSES",
    "IMAGE_CLASSES",
    "SynthDataset",
    "generate",
    "load",
    "ensure",
    "render_clip",
    "render_image",
    "sample_clip_params",
    "write_video",
    "main",
]

# (forward class, its time-reversed twin)
PAIRS = (("move_up", "move_down"), ("grow", "shrink"), ("square_then_circle", "circle_then_square"),
         ("approach", "separate"))
CLASSES = tuple(name for pair in PAIRS for name in pair)
_REVERSED_OF = {b: a for a, b in PAIRS}
IMAGE_CLASSES = ("circle", "square", "diamond")
CODECS = {"h264": ("libx264", ".mp4"), "vp9": ("libvpx-vp9", ".webm")}
_SPLIT_IDS = {"train": 0, "val": 1, "images": 2}
_MARKER = "synth.json"
_LISTS = ("train.txt", "val.txt", "images.txt", "classes.txt", "image_classes.txt")
# What generate writes in each split folder: (its class folders, the names of its files there). Keep in step
# with the names _video_task and _image_task give their files.
_VIDEO_EXTENSIONS = "|".join(re.escape(ext) for _, ext in CODECS.values())
_GENERATED_IN = {
    "train": (CLASSES, re.compile(rf"train_\d{{5,}}({_VIDEO_EXTENSIONS})")),
    "val": (CLASSES, re.compile(rf"val_\d{{5,}}({_VIDEO_EXTENSIONS})")),
    "images": (IMAGE_CLASSES, re.compile(r"img_\d{5,}\.jpg")),
}
_POOL_THRESHOLD = 100  # files; below this a process pool costs about what it saves


@dataclass(frozen=True)
class SynthDataset:
    """Where a generated dataset lives, and how it was made."""

    root: Path
    train_list: Path
    val_list: Path
    images_list: Path
    classes_file: Path
    image_classes_file: Path
    classes: tuple[str, ...]
    image_classes: tuple[str, ...] = IMAGE_CLASSES
    settings: dict = field(default_factory=dict, compare=False)
    kept: tuple[str, ...] = field(default=(), compare=False)  # files of others that an overwrite left in root

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# ----------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------

def _shape_distance(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Signed distance (pixels, negative inside) to the outline of a shape of 'radius' r."""
    if shape == "circle":
        return np.sqrt(dx * dx + dy * dy) - r
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) - 0.9 * r  # 0.9: about the area of the circle
    if shape == "diamond":
        return (np.abs(dx) + np.abs(dy)) / np.sqrt(2.0) - 0.9 * r
    raise ValueError(f"unknown shape {shape!r}")


def _draw(img_HWC: np.ndarray, obj: dict, cy: float, cx: float, r: float) -> None:
    """Blend one anti-aliased shape with a contrasting outline into a float image, in place.

    Only the shape's bounding box is touched (rendering cost independent of the frame size).
    """
    h, w = img_HWC.shape[:2]
    pad = 1.5 * r + 4  # covers every shape's extent (diamond: ~1.27 r) plus the outline and blur
    y0, y1 = max(int(cy - pad), 0), min(int(cy + pad) + 1, h)
    x0, x1 = max(int(cx - pad), 0), min(int(cx + pad) + 1, w)
    if y0 >= y1 or x0 >= x1:
        return
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    d = _shape_distance(obj["shape"], xx - np.float32(cx), yy - np.float32(cy), np.float32(r))
    outline = np.clip(0.5 - (d - 1.5), 0.0, 1.0)[..., None]
    fill = np.clip(0.5 - d, 0.0, 1.0)[..., None]
    region = img_HWC[y0:y1, x0:x1]
    region *= 1.0 - outline
    region += outline * obj["outline"]
    region *= 1.0 - fill
    region += fill * obj["color"]


def _random_object(rng: np.random.Generator, shape: str | None = None) -> dict:
    color = rng.uniform(30, 225, size=3).astype(np.float32)
    # Outline dark on light objects and light on dark ones, so the shape stands out on any background.
    outline = np.full(3, 20.0 if color.mean() > 128 else 235.0, dtype=np.float32)
    return {"shape": shape or str(rng.choice(IMAGE_CLASSES)), "color": color, "outline": outline}


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A static textured background (H, W, 3) float: gradient + stripes + soft blobs + pixel noise."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    c0, c1 = rng.uniform(0, 255, size=(2, 3))
    theta = rng.uniform(0, 2 * np.pi)
    ramp = ((xx / w - 0.5) * np.cos(theta) + (yy / h - 0.5) * np.sin(theta) + 0.5).clip(0, 1)[..., None]
    img = c0 * (1 - ramp) + c1 * ramp
    for _ in range(int(rng.integers(1, 4))):  # stripes of random orientation, frequency, colour
        phi = rng.uniform(0, np.pi)
        freq = rng.uniform(2, 12) * 2 * np.pi / max(h, w)
        amp = rng.uniform(5, 30, size=3)
        img += amp * np.sin(freq * (xx * np.cos(phi) + yy * np.sin(phi)) + rng.uniform(0, 2 * np.pi))[..., None]
    for _ in range(int(rng.integers(1, 5))):  # blurry blobs: clutter that is never a labelled shape
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        sigma = rng.uniform(0.05, 0.2) * min(h, w)
        g = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma ** 2))[..., None]
        img = img * (1 - 0.6 * g) + 0.6 * g * rng.uniform(0, 255, size=3)
    img += rng.normal(0, rng.uniform(2, 10), size=img.shape)
    return img.astype(np.float32)


def sample_clip_params(rng: np.random.Generator, size: tuple[int, int]) -> dict:
    """Every random draw of one clip (shared by a class and its reversed twin). ``size`` = (W, H)."""
    w, h = size
    m = min(h, w)
    p = {"background": _background(rng, h, w)}
    p["obj"] = _random_object(rng)
    p["obj2"] = _random_object(rng)
    # Central band: random crops of the training recipes keep at least ~70 % of the short side.
    p["x"] = rng.uniform(0.35, 0.65) * w
    p["y"] = rng.uniform(0.35, 0.65) * h
    p["r"] = rng.uniform(0.08, 0.13) * m
    # move_up: from the lower to the upper part of the central band
    p["y_from"], p["y_to"] = rng.uniform(0.62, 0.72) * h, rng.uniform(0.28, 0.38) * h
    # grow: radius from small to large
    p["r_from"], p["r_to"] = rng.uniform(0.03, 0.05) * m, rng.uniform(0.16, 0.22) * m
    # square_then_circle: positions and event windows as fractions of the clip
    p["pos_a"] = (rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w)
    p["pos_b"] = (rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w)
    p["event_a"] = (rng.uniform(0.05, 0.12), rng.uniform(0.33, 0.42))
    p["event_b"] = (rng.uniform(0.58, 0.67), rng.uniform(0.88, 0.95))
    # approach: two shapes on a line of random direction through the centre, from far apart (a gap of
    # d_from between their outlines) to overlapping (d_to < 0)
    p["axis"] = rng.uniform(0, np.pi)
    p["d_from"], p["d_to"] = rng.uniform(0.30, 0.38) * m, -rng.uniform(0.5, 1.0) * p["r"]
    return p


def _render_forward(name: str, p: dict, num_frames: int) -> np.ndarray:
    bg = p["background"]
    h, w = bg.shape[:2]
    out_THWC = np.empty((num_frames, h, w, 3), dtype=np.uint8)
    for t in range(num_frames):
        u = t / max(num_frames - 1, 1)  # 0 -> 1 over the clip
        img = bg.copy()
        if name == "move_up":
            _draw(img, p["obj"], p["y_from"] + (p["y_to"] - p["y_from"]) * u, p["x"], p["r"])
        elif name == "grow":
            _draw(img, p["obj"], p["y"], p["x"], p["r_from"] + (p["r_to"] - p["r_from"]) * u)
        elif name == "square_then_circle":
            if p["event_a"][0] <= u < p["event_a"][1]:
                _draw(img, {**p["obj"], "shape": "square"}, *p["pos_a"], p["r"])
            if p["event_b"][0] <= u < p["event_b"][1]:
                _draw(img, {**p["obj2"], "shape": "circle"}, *p["pos_b"], p["r"])
        elif name == "approach":
            half = 0.5 * (p["d_from"] + (p["d_to"] - p["d_from"]) * u) + p["r"]
            dy, dx = half * np.sin(p["axis"]), half * np.cos(p["axis"])
            cy, cx = 0.5 * h + 0.4 * (p["y"] - 0.5 * h), 0.5 * w + 0.4 * (p["x"] - 0.5 * w)  # nearer the centre
            _draw(img, p["obj"], cy - dy, cx - dx, p["r"])
            _draw(img, p["obj2"], cy + dy, cx + dx, p["r"])
        else:
            raise ValueError(f"unknown class {name!r}")
        out_THWC[t] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return out_THWC


def render_clip(name: str, params: dict, num_frames: int) -> np.ndarray:
    """Frames of class ``name`` for drawn ``params`` -> uint8 (T, H, W, 3). Twins are exact reversals."""
    if name in _REVERSED_OF:
        return np.ascontiguousarray(_render_forward(_REVERSED_OF[name], params, num_frames)[::-1])
    return _render_forward(name, params, num_frames)


def render_image(rng: np.random.Generator, shape: str, size: tuple[int, int]) -> np.ndarray:
    """One still of the same world with one ``shape`` -> uint8 (H, W, 3). ``size`` = (W, H)."""
    w, h = size
    m = min(h, w)
    img = _background(rng, h, w)
    obj = _random_object(rng, shape)
    _draw(img, obj, rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w, rng.uniform(0.08, 0.2) * m)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------

def write_video(path: str | os.PathLike, frames_THWC: np.ndarray, *, fps: int = 25, codec: str = "h264") -> None:
    """Encode uint8 (T, H, W, 3) RGB frames: ``h264`` (libx264, yuv420p) or ``vp9`` (libvpx-vp9).

    One encoder thread and fixed settings, so the same frames give the same file. A keyframe every 16
    frames, so readers can seek. H and W must be even (yuv420p).
    """
    import av

    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; choose from {', '.join(CODECS)}")
    t, h, w, c = frames_THWC.shape
    if c != 3 or frames_THWC.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames_THWC.dtype} {frames_THWC.shape}")
    if h % 2 or w % 2:
        raise ValueError(f"frame size must be even for yuv420p, got {w}x{h}")
    encoder = CODECS[codec][0]
    if encoder == "libx264":
        options = {"crf": "18", "preset": "veryfast", "g": "16", "threads": "1"}
    else:  # realtime settings: VP9's default 'good' deadline is ~50x slower for no benefit here
        options = {"crf": "30", "b:v": "0", "deadline": "realtime", "cpu-used": "8", "g": "16", "threads": "1"}
    with av.open(os.fspath(path), mode="w") as container:
        stream = container.add_stream(encoder, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = options
        for frame in frames_THWC:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():  # flush
            container.mux(packet)


def _video_task(args) -> tuple[str, int]:
    root, split, index, classes, num_frames, size, fps, codec, seed = args
    label = index % len(classes)
    name = classes[label]
    rng = np.random.default_rng([seed, _SPLIT_IDS[split], index])
    frames = render_clip(name, sample_clip_params(rng, size), num_frames)
    rel = f"{split}/{name}/{split}_{index:05d}{CODECS[codec][1]}"
    os.makedirs(os.path.join(root, split, name), exist_ok=True)
    write_video(os.path.join(root, rel), frames, fps=fps, codec=codec)
    return rel, label


def _image_task(args) -> tuple[str, int]:
    from PIL import Image

    root, index, size, seed = args
    label = index % len(IMAGE_CLASSES)
    shape = IMAGE_CLASSES[label]
    rng = np.random.default_rng([seed, _SPLIT_IDS["images"], index])
    rel = f"images/{shape}/img_{index:05d}.jpg"
    os.makedirs(os.path.join(root, "images", shape), exist_ok=True)
    Image.fromarray(render_image(rng, shape, size)).save(os.path.join(root, rel), quality=90)
    return rel, label


def _task(job) -> tuple[str, int]:
    kind, args = job
    return _video_task(args) if kind == "video" else _image_task(args)


def _run(jobs: list, workers: int) -> list:
    """Run the jobs, in a process pool when there are many (each file is independent)."""
    if workers > 1 and len(jobs) > _POOL_THRESHOLD:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(_task, jobs, chunksize=max(1, len(jobs) // (8 * workers))))
    return [_task(job) for job in jobs]


def _write_list(path: Path, rows: list[tuple[str, int]]) -> None:
    path.write_text("".join(f"{rel} {label}\n" for rel, label in rows))


def _prepare_root(root: Path, overwrite: bool) -> tuple[str, ...]:
    """Make ``root`` ready to write into -> the files of others left in it (relative paths)."""
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"{root} exists and is not a directory")
    kept: tuple[str, ...] = ()
    if root.is_dir() and any(root.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{root} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
        if not (root / _MARKER).is_file():
            raise FileExistsError(f"refusing to overwrite {root}: it has no {_MARKER}, so it was not written "
                                  f"by this generator; choose an empty or new directory")
        _remove_generated(root)
        kept = tuple(sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir()))
    root.mkdir(parents=True, exist_ok=True)
    return kept


def _remove_generated(root: Path) -> None:
    """Delete the files a previous :func:`generate` wrote under ``root`` (with any settings), and the folders
    that leaves empty. Nothing else: others' files (e.g. ``bevt pretrain``'s tokenizer) stay."""
    for split, (class_names, file_name) in _GENERATED_IN.items():
        for folder in [root / split / name for name in class_names]:
            if folder.is_symlink() or not folder.is_dir():  # a link leads to files generate never wrote
                continue
            for f in folder.iterdir():
                if file_name.fullmatch(f.name) and f.is_file() and not f.is_symlink():
                    f.unlink()
            _remove_if_empty(folder)
        _remove_if_empty(root / split)
    for name in _LISTS:
        (root / name).unlink(missing_ok=True)
    (root / _MARKER).unlink()  # last: until it is gone, an interrupted clean-up can be redone with overwrite


def _remove_if_empty(folder: Path) -> None:
    if folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir()):
        folder.rmdir()


def generate(root: str | os.PathLike, *, num_train: int = 48, num_val: int = 24, num_images: int = 64,
             num_frames: int = 48, size: tuple[int, int] = (160, 128), fps: int = 25, codec: str = "h264",
             seed: int = 0, classes=None, workers: int | None = None, overwrite: bool = False) -> SynthDataset:
    """Write the synthetic dataset under ``root`` and return where everything is.

    ``size`` is (W, H), both even. ``classes``: a subset of :data:`CLASSES` (default all eight); clip
    ``i`` of a split has label ``i % len(classes)``. ``workers``: processes used when there are more than
    ~100 files (default: all cores, at most 8). A non-empty ``root`` is refused unless ``overwrite`` and
    it holds a previous ``synth.json``; ``overwrite`` then deletes only that dataset's files and keeps the
    others (listed in the result's ``kept``).
    """
    classes = tuple(CLASSES if classes is None else classes)
    unknown = [c for c in classes if c not in CLASSES]
    if unknown or not classes or len(set(classes)) != len(classes):
        raise ValueError(f"classes must be distinct names from {', '.join(CLASSES)}; got {list(classes)}")
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; choose from {', '.join(CODECS)}")
    w, h = int(size[0]), int(size[1])
    if w < 16 or h < 16 or w % 2 or h % 2:
        raise ValueError(f"size must be even and at least 16x16, got {w}x{h}")
    if num_frames < 2:
        raise ValueError(f"num_frames must be >= 2, got {num_frames}")
    for name, n in (("num_train", num_train), ("num_val", num_val), ("num_images", num_images), ("seed", seed)):
        if n < 0:
            raise ValueError(f"{name} must be >= 0, got {n}")
    if workers is None:
        workers = min(8, os.cpu_count() or 1)

    root = Path(root)
    kept = _prepare_root(root, overwrite)
    rootstr = str(root)
    jobs = [("video", (rootstr, split, i, classes, num_frames, (w, h), fps, codec, seed))
            for split, n in (("train", num_train), ("val", num_val)) for i in range(n)]
    jobs += [("image", (rootstr, i, (w, h), seed)) for i in range(num_images)]
    rows = _run(jobs, workers)
    _write_list(root / "train.txt", rows[:num_train])
    _write_list(root / "val.txt", rows[num_train:num_train + num_val])
    _write_list(root / "images.txt", rows[num_train + num_val:])
    (root / "classes.txt").write_text("".join(c + "\n" for c in classes))
    (root / "image_classes.txt").write_text("".join(c + "\n" for c in IMAGE_CLASSES))
    settings = {"num_train": num_train, "num_val": num_val, "num_images": num_images, "num_frames": num_frames,
                "size": [w, h], "fps": fps, "codec": codec, "seed": seed, "classes": list(classes), "version": 1}
    # Written last: its presence means the folder is complete.
    (root / _MARKER).write_text(json.dumps(settings, indent=1) + "\n")
    return _dataset(root, settings, kept)


def _dataset(root: Path, settings: dict, kept: tuple[str, ...] = ()) -> SynthDataset:
    return SynthDataset(root=root, train_list=root / "train.txt", val_list=root / "val.txt",
                        images_list=root / "images.txt", classes_file=root / "classes.txt",
                        image_classes_file=root / "image_classes.txt", classes=tuple(settings["classes"]),
                        settings=settings, kept=kept)


def load(root: str | os.PathLike) -> SynthDataset:
    """The dataset previously generated under ``root`` (raises FileNotFoundError if there is none)."""
    root = Path(root)
    marker = root / _MARKER
    if not marker.is_file():
        raise FileNotFoundError(f"no synthetic dataset under {root} (missing {_MARKER}); generate one first")
    return _dataset(root, json.loads(marker.read_text()))


def ensure(root: str | os.PathLike, **kwargs) -> SynthDataset:
    """:func:`load` the dataset under ``root`` if it was made with these settings, else (re)generate it."""
    root = Path(root)
    try:
        existing = load(root)
    except FileNotFoundError:
        return generate(root, **kwargs)
    wanted = dict(num_train=48, num_val=24, num_images=64, num_frames=48, size=(160, 128), fps=25,
                  codec="h264", seed=0, classes=None)
    wanted.update({k: v for k, v in kwargs.items() if k in wanted})
    wanted["size"] = [int(s) for s in wanted["size"]]
    wanted["classes"] = list(CLASSES if wanted["classes"] is None else wanted["classes"])
    if all(existing.settings.get(k) == v for k, v in wanted.items()):
        return existing
    return generate(root, **{**kwargs, "overwrite": True})


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------

def _parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like WIDTHxHEIGHT, e.g. 160x128; got {text!r}") from None
    if w < 16 or h < 16 or w % 2 or h % 2:
        raise argparse.ArgumentTypeError(f"width and height must be even and >= 16, got {w}x{h}")
    return w, h


DESCRIPTION = ("Write the synthetic temporal-class video dataset (real video files, JPEG images and mmaction "
               "annotation lists).")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="data/synth", help="output directory (default: data/synth)")
    p.add_argument("--train", type=int_at_least(0), default=48, help="training clips (default: 48)")
    p.add_argument("--val", type=int_at_least(0), default=24, help="validation clips (default: 24)")
    p.add_argument("--images", type=int_at_least(0), default=64, help="images for the image stream (default: 64)")
    p.add_argument("--frames", type=int_at_least(2), default=48, help="frames per clip (default: 48)")
    p.add_argument("--size", type=_parse_size, default=(160, 128), help="frame size WxH (default: 160x128)")
    p.add_argument("--fps", type=int_at_least(1), default=25, help="frame rate (default: 25)")
    p.add_argument("--codec", choices=sorted(CODECS), default="h264",
                   help="h264 (.mp4, libx264) or vp9 (.webm; readable by DALI's CPU decoder) (default: h264)")
    p.add_argument("--classes", default=None, help=f"comma-separated subset of: {','.join(CLASSES)}")
    p.add_argument("--seed", type=int_at_least(0), default=0, help="random seed (default: 0)")
    p.add_argument("--workers", type=int_at_least(0), default=None, help="processes (default: cores, at most 8)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a dataset previously written to --out (its files only: other files there, "
                        "such as a tokenizer trained by bevt pretrain, are kept)")


def main(argv=None) -> int:
    """Parse ``argv`` as ``bevt data synth`` does and run it. Returns the exit status."""
    p = argparse.ArgumentParser(prog="bevt data synth", description=DESCRIPTION)
    add_arguments(p)
    return run(p.parse_args(argv))


def run(args) -> int:
    """``bevt data synth``: generate, print a summary. Returns the exit status."""
    classes = None if args.classes is None else [c.strip() for c in args.classes.split(",") if c.strip()]
    t0 = time.perf_counter()
    try:
        ds = generate(args.out, num_train=args.train, num_val=args.val, num_images=args.images,
                      num_frames=args.frames, size=args.size, fps=args.fps, codec=args.codec,
                      seed=args.seed, classes=classes, workers=args.workers, overwrite=args.overwrite)
    except (FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dt = time.perf_counter() - t0
    s = ds.settings
    ext = CODECS[s["codec"]][1]
    print(f"wrote {s['num_train']} train + {s['num_val']} val clips ({s['num_frames']} frames, "
          f"{s['size'][0]}x{s['size'][1]}, {s['fps']} fps, {s['codec']} {ext}), {s['num_images']} JPEG images, "
          f"{len(ds.classes)} classes to {ds.root} in {dt:.1f} s")
    for name in ("train_list", "val_list", "images_list", "classes_file", "image_classes_file"):
        print(f"  {name:<19s} {getattr(ds, name)}")
    if ds.kept:
        more = f" and {len(ds.kept) - 5} more" if len(ds.kept) > 5 else ""
        print(f"kept {len(ds.kept)} file(s) in {ds.root} that bevt data synth did not write: "
              f"{', '.join(ds.kept[:5])}{more}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
