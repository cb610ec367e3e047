"""``bevt finetune``: parse -> build -> train a Video Swin classifier (docs/finetune.md).

One step (per micro-batch): uint8 clips from the fine-tuning loader (RandomResizedCrop, resize, flip) ->
on the device: clip-consistent RandAugment (optional) -> normalize -> random erasing (optional) -> Video
Swin + head (average pool, dropout, linear) -> cross-entropy with label smoothing. The loop
(:mod:`bevt.train.loop`) does accumulation, AMP, clipping, the schedule, DDP, checkpoints and exact resume;
an EMA of the weights (:mod:`bevt.train.ema`) and a single-view validation after every epoch plug into it.

The model starts from ``model.init_from``: a bevt pretraining checkpoint (BEVT or BEVT-V: the 3D backbone
is loaded, the pretraining heads dropped), an image-stream checkpoint (bevt's BEVT-I, or an official /
2D Swin image checkpoint: inflated to 3D, the relative position tables tiled over every temporal offset,
as the official ``inflate_weights``), an official BEVT / Video Swin checkpoint, or nothing (from scratch).
"""
from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from bevt.config import (MAX_SHORT_SIDE, MAX_WORKERS, ConfigError, KernelsConfig, OptimConfig, Recipes, RunConfig,
                         _check, save_json, to_dict)
from bevt.data.transforms import normalize
from bevt.models import inflate as _inflate
from bevt.train import checkpoint as ckpt
from bevt.train.job import (add_job_arguments, closing_rows, data_path, ensure_lists, list_items, preflight, run_job,
                            setup_runtime, summary_title, wrap_model)
from bevt.train.loop import AMP_DTYPES, StepContext

# ----------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------

@dataclass
class FTModelConfig:
    name: str = "videoswin_nano_patch244_window877"
    """Backbone from the registry (``bevt info --models``); window1677 for SSv2-style recipes."""
    num_classes: int = 0
    """Classes of the head; 0 takes them from the dataset (``data.class_names``, else the largest label + 1).
    A non-zero value is checked against the dataset."""
    init_from: str = ""
    """Checkpoint to start from: a bevt checkpoint or run folder (BEVT / BEVT-V / BEVT-I pretraining, or a
    fine-tuned classifier), a ``.safetensors`` file, or an official ``.pth`` (BEVT, Video Swin, 2D Swin image
    checkpoint, inflated). Empty: from scratch."""
    init_optional: bool = False
    """If ``init_from`` does not exist, start from scratch with a message instead of failing (the embedded
    default, which starts from ``runs/default`` when ``bevt pretrain`` has been run)."""
    pretrained_window: tuple[int, int, int] = (0, 0, 0)
    """3D window of the checkpoint's relative position tables when it differs from the model's only in a way
    that cannot be inferred; (0, 0, 0) infers it (8x7x7 -> 16x7x7 is inferred, as official SSv2)."""
    drop_path_rate: float = 0.1
    """Stochastic depth (official fine-tuning: K400 0.3, SSv2 0.4)."""
    head_dropout: float = 0.5
    """Dropout before the linear head (official I3DHead: 0.5)."""
    grad_checkpointing: bool = False
    """Recompute each Swin block in the backward pass."""

    def __post_init__(self):
        from bevt.models.registry import list_models

        _check(self.name in list_models(), f"model.name {self.name!r} is not a registered model; "
                                           f"choose from {', '.join(list_models())}")
        _check(self.num_classes >= 0, f"model.num_classes must be >= 0 (0: from the dataset), got {self.num_classes}")
        _check(0 <= self.drop_path_rate < 1, f"model.drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        _check(0 <= self.head_dropout < 1, f"model.head_dropout must be in [0, 1), got {self.head_dropout}")
        pw = tuple(self.pretrained_window)
        _check(all(v == 0 for v in pw) or all(v > 0 for v in pw),
               f"model.pretrained_window must be all 0 (infer) or all positive, got {pw}")


@dataclass
class FTDataConfig:
    root: str = "data/synth"
    """Dataset folder; the lists and their relative paths are resolved against it."""
    train_list: str = "train.txt"
    """Training annotation list (``relative/path label`` per line) or a folder of class sub-folders."""
    val_list: str = "val.txt"
    """Validation list: single-view top-1 after every epoch (``eval.val_every``)."""
    test_list: str = ""
    """List ``bevt eval`` / ``bevt analyze`` use by default (empty: ``val_list``)."""
    train_prefix: str = ""
    """Folder the training list's relative paths start from (mmaction's ``data_prefix``, relative to ``root``,
    e.g. ``videos_train``); empty: the list's own folder. ``val_prefix`` and ``test_prefix`` likewise."""
    val_prefix: str = ""
    test_prefix: str = ""
    class_names: str = "classes.txt"
    """File with one class name per line; its length must equal model.num_classes. Optional under this default
    name (a dataset without it uses the label numbers); another name must exist."""
    synthesize_if_missing: bool = False
    """Generate the built-in synthetic dataset at ``root`` when its lists are missing (the embedded default).
    Overriding ``data.root`` without also setting this field turns it off: the path then holds your data."""
    clip_len: int = 32
    """Frames per clip (official K400: 32)."""
    frame_interval: int = 2
    """Distance between sampled frames (official K400: 2)."""
    num_segments: int = 0
    """> 0: SSv2-style uniform sampling of this many segments instead of clip_len x frame_interval
    (official SSv2: 32; a random frame per segment in training, the middle one in testing)."""
    crop_size: int = 224
    """Side of the RandomResizedCrop output and of the test crops."""
    short_side: int = 256
    """Short side the frames are resized to before the training crop and the validation centre crop."""
    area_range: tuple[float, float] = (0.08, 1.0)
    """RandomResizedCrop area fraction range (mmaction default)."""
    aspect_ratio_range: tuple[float, float] = (3 / 4, 4 / 3)
    """RandomResizedCrop aspect ratio range (mmaction default)."""
    flip: bool = True
    """Horizontal flip with p = 0.5 (official SSv2: off)."""
    batch_size: int = 8
    """Clips per process per optimizer step (divided by optim.accum_steps into micro-batches)."""
    num_workers: int = 4
    """Decoding worker processes per loader."""
    decoder: str = "auto"
    """``auto`` or ``pyav`` (CPU workers)."""

    def __post_init__(self):
        _check(self.clip_len >= 1 and self.frame_interval >= 1, "data.clip_len and data.frame_interval must be >= 1")
        _check(self.num_segments >= 0, f"data.num_segments must be >= 0, got {self.num_segments}")
        frames = self.num_segments or self.clip_len
        _check(frames % 2 == 0, f"clips need an even number of frames (temporal patch 2), got {frames}")
        _check(self.crop_size >= 32 and self.crop_size % 32 == 0,
               f"data.crop_size must be a positive multiple of 32, got {self.crop_size}")
        _check(self.short_side >= self.crop_size,
               f"data.short_side ({self.short_side}) must be >= data.crop_size ({self.crop_size})")
        _check(self.short_side <= MAX_SHORT_SIDE, f"data.short_side must be <= {MAX_SHORT_SIDE}, got "
                                                  f"{self.short_side} (frames are resized to it before cropping)")
        lo, hi = self.area_range
        _check(0 < lo <= hi <= 1, f"data.area_range must satisfy 0 < lo <= hi <= 1, got {self.area_range}")
        lo, hi = self.aspect_ratio_range
        _check(0 < lo <= hi, f"data.aspect_ratio_range must satisfy 0 < lo <= hi, got {self.aspect_ratio_range}")
        _check(self.batch_size >= 1, f"data.batch_size must be >= 1, got {self.batch_size}")
        _check(0 <= self.num_workers <= MAX_WORKERS,
               f"data.num_workers must be in [0, {MAX_WORKERS}], got {self.num_workers}")
        _check(self.decoder in ("auto", "pyav"), f"data.decoder must be auto or pyav, got {self.decoder!r}")


@dataclass
class AugConfig:
    """Augmentation applied on the device inside the step (official SSv2: RandAugment(4, 7), erasing 0.25)."""

    randaugment: bool = False
    randaugment_n: int = 4
    """Operations per clip (imgaug RandAugment ``n``)."""
    randaugment_m: float = 7
    """Magnitude on imgaug's 0..30 scale."""
    randaugment_flip: bool = True
    """imgaug's RandAugment always starts with Fliplr(0.5), even in the official no-flip SSv2 recipe; false
    keeps left/right labels intact."""
    erasing_p: float = 0.0
    """Random erasing probability (timm, const mode, one box shared by the clip's frames)."""

    def __post_init__(self):
        _check(0 <= self.randaugment_n <= 17, f"aug.randaugment_n must be in [0, 17], got {self.randaugment_n}")
        _check(0 <= self.randaugment_m <= 30, f"aug.randaugment_m must be in [0, 30], got {self.randaugment_m}")
        _check(0 <= self.erasing_p <= 1, f"aug.erasing_p must be in [0, 1], got {self.erasing_p}")


@dataclass
class EMAConfig:
    """EMA of the weights, mmcv ``EMAHook`` semantics (official SSv2: on, momentum 0.0002, warm-up 100)."""

    enabled: bool = False
    momentum: float = 0.0002
    """Weight of the new parameters per iteration (mmcv); a horizon of 1 / momentum iterations."""
    warm_up: int = 100
    """mmcv's warm-up: m = min(momentum, (1 + it) / (warm_up + it)) (never binds with the defaults); 0: none."""
    interval: int = 1
    evaluate: bool = True
    """Validate and test with the averaged weights (mmcv swaps them in after every epoch)."""

    def __post_init__(self):
        _check(0 < self.momentum < 1, f"ema.momentum must be in (0, 1), got {self.momentum}")
        _check(self.warm_up >= 0 and self.interval >= 1, "ema.warm_up must be >= 0 and ema.interval >= 1")


@dataclass
class EvalConfig:
    val_every: int = 1
    """Validate (single view: 1 clip, centre crop after data.short_side) every this many epochs; 0: never."""
    val_batch_size: int = 8
    test_clips: int = 4
    """Clips per video in testing (mmaction ``_get_test_clips``; official K400: 4; uniform segments: 1)."""
    test_crops: int = 3
    """1 (centre) or 3 (``ThreeCrop``) crops per clip."""
    test_short_side: int = 224
    """Short side before the test crops (official: 224, = crop size for ThreeCrop)."""
    test_batch_size: int = 1
    """Videos per test batch (each has test_clips x test_crops views)."""
    max_views: int = 0
    """Views per forward pass in testing (official max_testing_views); 0: all views of a batch at once."""

    def __post_init__(self):
        _check(self.val_every >= 0, f"eval.val_every must be >= 0, got {self.val_every}")
        _check(self.val_batch_size >= 1 and self.test_batch_size >= 1, "eval batch sizes must be >= 1")
        _check(self.test_clips >= 1, f"eval.test_clips must be >= 1, got {self.test_clips}")
        _check(self.test_crops in (1, 3), f"eval.test_crops must be 1 or 3, got {self.test_crops}")
        _check(self.max_views >= 0, f"eval.max_views must be >= 0, got {self.max_views}")


@dataclass
class FinetuneConfig:
    model: FTModelConfig = field(default_factory=FTModelConfig)
    data: FTDataConfig = field(default_factory=FTDataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        lr=3e-4, weight_decay=0.001, epochs=30, warmup_epochs=2.5, schedule_by_epoch=True, clip_grad=40.0,
        layer_decay=0.9))
    ema: EMAConfig = field(default_factory=EMAConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=lambda: RunConfig(out_dir="runs/finetune"))
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    label_smoothing: float = 0.0
    """Cross-entropy label smoothing (official SSv2: 0.1)."""
    recipe: str = "custom"
    """Name of the recipe this config came from (informational)."""

    def __post_init__(self):
        d, o, e = self.data, self.optim, self.eval
        _check(0 <= self.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        _check(d.batch_size % o.accum_steps == 0,
               f"data.batch_size ({d.batch_size}) must be divisible by optim.accum_steps ({o.accum_steps})")
        if e.test_crops == 3:
            _check(e.test_short_side == d.crop_size, f"ThreeCrop needs eval.test_short_side == data.crop_size "
                                                     f"(official: 224 and 224), got {e.test_short_side} and {d.crop_size}")
        else:
            _check(e.test_short_side >= d.crop_size,
                   f"eval.test_short_side ({e.test_short_side}) must be >= data.crop_size ({d.crop_size})")
        _check(e.test_short_side <= MAX_SHORT_SIDE,
               f"eval.test_short_side must be <= {MAX_SHORT_SIDE}, got {e.test_short_side}")
        if d.num_segments:
            _check(e.test_clips == 1, f"uniform segments give one clip per video (official SSv2: 1 clip x 3 crops); "
                                      f"set eval.test_clips=1, got {e.test_clips}")


# ----------------------------------------------------------------------------------------------------
# Recipes
# ----------------------------------------------------------------------------------------------------

RECIPES = Recipes("fine-tuning")


def build_config(recipe: str, overrides: list[str]) -> FinetuneConfig:
    """Fine-tuning recipe ``recipe`` with the ``section.field=value`` overrides applied."""
    return RECIPES.build(recipe, overrides)


@RECIPES
def default() -> FinetuneConfig:
    """Embedded default: nano model on the synthetic dataset, from runs/default if pretrained, CPU minutes."""
    return FinetuneConfig(
        model=FTModelConfig(name="videoswin_nano_patch244_window877", num_classes=8, init_from="runs/default",
                            init_optional=True, drop_path_rate=0.05, head_dropout=0.3),
        data=FTDataConfig(root="data/synth", synthesize_if_missing=True, num_segments=8, crop_size=96,
                          short_side=110, area_range=(0.3, 1.0), flip=True, batch_size=4, num_workers=2),
        optim=OptimConfig(lr=1e-3, weight_decay=0.05, epochs=15, warmup_epochs=1, clip_grad=5.0, layer_decay=0.9,
                          schedule_by_epoch=False),
        eval=EvalConfig(val_every=1, val_batch_size=8, test_clips=1, test_crops=3, test_short_side=96,
                        test_batch_size=4),
        run=RunConfig(out_dir="runs/finetune_default", log_every=5, keep_last=2),
    )


@RECIPES
def k400() -> FinetuneConfig:
    """Official K400: Swin-B 8x7x7, 32x2 frames, AdamW 3e-4 wd 0.001, layer decay 0.9, 60 epochs, 4x3 views."""
    return FinetuneConfig(
        model=FTModelConfig(name="videoswin_base_patch244_window877", num_classes=400, drop_path_rate=0.3,
                            head_dropout=0.5),
        data=FTDataConfig(root="", train_list="k400_train.txt", val_list="k400_val.txt", class_names="",
                          clip_len=32, frame_interval=2, crop_size=224, short_side=256, flip=True, batch_size=8,
                          num_workers=4),
        optim=OptimConfig(lr=3e-4, weight_decay=0.001, betas=(0.9, 0.999), epochs=60, warmup_epochs=2.5,
                          warmup_ratio=0.1, schedule_by_epoch=True, clip_grad=40.0, accum_steps=4, layer_decay=0.9),
        eval=EvalConfig(val_every=5, val_batch_size=8, test_clips=4, test_crops=3, test_short_side=224,
                        test_batch_size=1, max_views=4),
        run=RunConfig(out_dir="runs/finetune_k400", log_every=20, keep_last=3),
    )


@RECIPES
def ssv2() -> FinetuneConfig:
    """Official SSv2: Swin-B 16x7x7, 32 uniform segments, RandAugment(4, 7), erasing 0.25, LS 0.1, EMA, 1x3 views."""
    return FinetuneConfig(
        model=FTModelConfig(name="videoswin_base_patch244_window1677", num_classes=174, drop_path_rate=0.4,
                            head_dropout=0.5, pretrained_window=(8, 7, 7)),
        data=FTDataConfig(root="", train_list="sthv2_train_list_videos.txt", val_list="sthv2_val_list_videos.txt",
                          class_names="", num_segments=32, crop_size=224, short_side=256, flip=False, batch_size=8,
                          num_workers=4),
        aug=AugConfig(randaugment=True, randaugment_n=4, randaugment_m=7, randaugment_flip=True, erasing_p=0.25),
        optim=OptimConfig(lr=5e-4, weight_decay=0.05, betas=(0.9, 0.999), epochs=60, warmup_epochs=2.5,
                          warmup_ratio=0.1, schedule_by_epoch=True, clip_grad=0.0, accum_steps=8,
                          backbone_lr_mult=0.1),
        ema=EMAConfig(enabled=True, momentum=0.0002, warm_up=100, interval=1),
        eval=EvalConfig(val_every=5, val_batch_size=8, test_clips=1, test_crops=3, test_short_side=224,
                        test_batch_size=1, max_views=2),
        label_smoothing=0.1,
        run=RunConfig(out_dir="runs/finetune_ssv2", log_every=20, keep_last=3),
    )


@RECIPES
def diving48() -> FinetuneConfig:
    """Diving48 (no official config; bevt's choice): the SSv2 recipe with 48 classes and flips kept."""
    cfg = ssv2()
    cfg.model.num_classes = 48
    cfg.data.train_list, cfg.data.val_list = "diving48_train_list_videos.txt", "diving48_val_list_videos.txt"
    cfg.data.flip = True  # a dive's class does not change under a horizontal flip
    cfg.run.out_dir = "runs/finetune_diving48"
    return cfg


# ----------------------------------------------------------------------------------------------------
# Data, classes, initialisation
# ----------------------------------------------------------------------------------------------------

def ensure_data(cfg: FinetuneConfig, dist) -> None:
    """Check the train/val lists exist, or generate the built-in synthetic dataset when asked."""
    d = cfg.data
    needed = {f"data.train_list={d.train_list}": data_path(d.root, d.train_list)}
    if cfg.eval.val_every:
        needed[f"data.val_list={d.val_list}"] = data_path(d.root, d.val_list)
    ensure_lists(d.root, needed, synthesize=d.synthesize_if_missing, seed=cfg.run.seed, dist=dist)


_OPTIONAL_CLASS_NAMES = FTDataConfig.class_names  # the default file name, used when the dataset has it


def resolve_classes(cfg: FinetuneConfig, lists: list[str]) -> tuple[int, list[str] | None]:
    """(num_classes, class names or None) for the dataset, checked against ``model.num_classes``.

    Raises ConfigError when the class-name file, a label of a list, and ``model.num_classes`` disagree, and
    the dataset's AnnotationError for a missing or empty list.
    """
    from bevt.data.datasets import read_annotation_list, read_class_names, scan_folder

    d = cfg.data
    names = None
    names_path = data_path(d.root, d.class_names) if d.class_names else ""
    if names_path and os.path.isfile(names_path):
        names = read_class_names(names_path)
    elif names_path and d.class_names != _OPTIONAL_CLASS_NAMES:  # named by hand: a typo must not drop the names
        raise ConfigError(f"data.class_names: class-name file not found: {names_path} (set data.class_names= to "
                          f"use the label numbers as names)")
    max_label, where = -1, ""
    for lst in lists:
        p = data_path(d.root, lst)
        items = scan_folder(p)[0] if os.path.isdir(p) else read_annotation_list(p)
        top = max(it.label for it in items)
        if top > max_label:
            max_label, where = top, p
    n = cfg.model.num_classes
    if names is not None and n and len(names) != n:
        raise ConfigError(f"model.num_classes={n} but the dataset has {len(names)} classes ({names_path}); set "
                          f"model.num_classes={len(names)} (or 0 to take it from the dataset)")
    n = n or (len(names) if names is not None else max_label + 1)
    if max_label >= n:
        raise ConfigError(f"{where} has label {max_label}, but the model has {n} classes (labels 0..{n - 1}); "
                          f"set model.num_classes={max_label + 1} or fix the list")
    return n, names


def load_init(model, path: str, *, pretrained_window=(0, 0, 0)) -> list[str]:
    """Initialise a classifier from a pretraining / image / classifier checkpoint; returns notes.

    Raises FileNotFoundError for a missing file and ValueError when nothing of the checkpoint fits.
    """
    src_window = tuple(pretrained_window) if any(pretrained_window) else None
    path, adapted, notes = _inflate.checkpoint_for(model, path, src_window=src_window)
    if not [k for k in adapted if not k.startswith("head.")]:
        raise _inflate.nothing_fits(path, model, notes)
    missing, _ = model.load_state_dict(adapted, strict=False)
    missing = [k for k in missing if not k.endswith("relative_position_index")]
    head_missing = [k for k in missing if k.startswith("head.")]
    rest = [k for k in missing if not k.startswith("head.")]
    if rest:
        notes.append(f"{len(rest)} backbone tensors not in the checkpoint (kept at init): {_inflate.listing(rest)}")
    notes.append("classification head: " + ("new (random init)" if head_missing else "loaded from the checkpoint"))
    return notes


def build_classifier(cfg: FinetuneConfig, num_classes: int, *, drop_path_rate: float | None = None):
    """The Video Swin classifier of ``cfg`` (3D stream only, head = avg pool -> dropout -> linear)."""
    from bevt.models.registry import create_model

    m = cfg.model
    return create_model(m.name, num_classes=num_classes, head_dropout=m.head_dropout,
                        drop_path_rate=m.drop_path_rate if drop_path_rate is None else drop_path_rate,
                        grad_checkpointing=m.grad_checkpointing, video_stream=True, image_stream=False,
                        mask_token=False)


def optimizer_groups(model, optim: OptimConfig) -> list[dict]:
    """AdamW groups: no decay for ``no_decay_keys``, layer-wise lr decay (official K400 mapping), backbone
    lr multiplier (official SSv2); each group carries ``lr_scale`` and ``names``."""
    from bevt.train.optim import param_groups

    return param_groups(model, weight_decay=optim.weight_decay, no_decay_keys=tuple(optim.no_decay_keys),
                        layer_decay=optim.layer_decay, backbone_lr_mult=optim.backbone_lr_mult,
                        depths=tuple(model.depths))


def dataset_kwargs(cfg: FinetuneConfig, views: str) -> dict:
    """Dataset settings for ``views``: ``train``, ``val`` (1 clip, centre crop after data.short_side) or
    ``test`` (eval.test_clips x eval.test_crops after eval.test_short_side)."""
    d, e = cfg.data, cfg.eval
    kw = dict(crop=d.crop_size)
    if d.num_segments:
        kw["num_segments"] = d.num_segments
    else:
        kw.update(clip_len=d.clip_len, interval=d.frame_interval)
    if views == "train":
        kw.update(short_side=d.short_side, flip_p=0.5 if d.flip else 0.0, area_range=tuple(d.area_range),
                  aspect_ratio_range=tuple(d.aspect_ratio_range))
    elif views == "val":
        kw.update(num_clips=1, num_crops=1, short_side=d.short_side)
    elif views == "test":
        kw.update(num_clips=e.test_clips, num_crops=e.test_crops, short_side=e.test_short_side)
    else:
        raise ValueError(f"views must be train, val or test, got {views!r}")
    return kw


# ----------------------------------------------------------------------------------------------------
# The step and the per-epoch validation
# ----------------------------------------------------------------------------------------------------

class FinetuneForward(nn.Module):
    """The tensor work of one micro-batch after augmentation: ``forward(clips, labels)`` -> ``{"loss":
    label-smoothed CE, "top1": accuracy}`` (no host sync: what ``run.cuda_graph`` replays)."""

    def __init__(self, model: nn.Module, label_smoothing: float = 0.0):
        super().__init__()
        self.model, self.label_smoothing = model, label_smoothing

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing)
        return {"loss": loss, "top1": (logits.detach().argmax(-1) == y).float().mean()}


class FinetuneStep:
    """compute(batches, ctx) for the loop: device-side augmentation, then :class:`FinetuneForward`, eagerly
    or replayed from CUDA graphs (``cuda_graph``)."""

    def __init__(self, model, cfg: FinetuneConfig, device: torch.device, *, cuda_graph: bool = False,
                 amp_dtype: torch.dtype | None = None):
        from bevt.data.augment import RandAugment, RandomErasing

        self.device = device
        self.step_fn = FinetuneForward(model, cfg.label_smoothing)
        if cuda_graph:
            from bevt.train.cuda_graph import GraphedStep

            self.step_fn = GraphedStep(self.step_fn, amp_dtype=amp_dtype)
        a = cfg.aug
        self.randaug = (RandAugment(a.randaugment_n, a.randaugment_m, initial_flip=a.randaugment_flip)
                        if a.randaugment else None)
        self.erasing = RandomErasing(a.erasing_p) if a.erasing_p > 0 else None
        self.seed = cfg.run.seed

    def __call__(self, batches: dict, ctx: StepContext):
        b = batches["video"]
        idx = b["index"].tolist()  # a host tensor: no device sync
        x = b["video"].to(self.device, non_blocking=True)  # uint8 B, 3, T, S, S
        y = b["label"].to(self.device, non_blocking=True)
        # pixel arithmetic in fp32 whatever the loop's autocast (a bf16 conv would shift grey levels)
        with torch.autocast(self.device.type, enabled=False):
            if self.randaug is not None:
                x = self.randaug(x, self.seed, ctx.epoch, idx)
            x = normalize(x, channel_dim=1)
            if self.erasing is not None:
                x = self.erasing(x, self.seed, ctx.epoch, idx)
        out = self.step_fn(x, y)
        return out["loss"], {k: v.detach() for k, v in out.items()}, {"clips": x.shape[0]}


class EpochValidation:
    """``on_epoch_end`` for the loop: single-view top-1/top-5 on the val list (EMA weights if enabled)."""

    def __init__(self, cfg: FinetuneConfig, loader, model, ema, device, amp: str, dist, total_epochs: int):
        self.cfg, self.loader, self.model, self.ema = cfg, loader, model, ema
        self.device, self.amp, self.dist, self.total_epochs = device, amp, dist, total_epochs
        self.history: list[dict] = []

    def due(self, epoch: int) -> bool:
        every = self.cfg.eval.val_every
        return bool(every) and (epoch % every == 0 or epoch >= self.total_epochs)

    def run(self, epoch: int, step: int) -> dict:
        import contextlib

        from bevt.eval.evaluate import predict, topk_accuracy

        use_ema = self.ema is not None and self.cfg.ema.evaluate
        with self.ema.applied(self.model) if use_ema else contextlib.nullcontext():
            preds = predict(self.model, self.loader, device=self.device, amp=self.amp, dist=self.dist)["normal"]
        self.model.train()
        acc = topk_accuracy(preds.probs, preds.labels, (1, 5))
        row = {"val_top1": acc[1], "val_top5": acc[5]}
        self.history.append({"epoch": epoch, "step": step, **row, "weights": "ema" if use_ema else "live"})
        return row

    def __call__(self, epoch: int, trainer) -> dict | None:
        if not self.due(epoch):
            return None
        return self.run(epoch, trainer.state.step)


# ----------------------------------------------------------------------------------------------------
# Build and run
# ----------------------------------------------------------------------------------------------------

def finetune(cfg: FinetuneConfig, *, resume: str = "") -> dict:
    """Fine-tune as configured; returns the summary dict (also printed on rank 0).

    The summary holds the loop's result (steps, epochs, time, first/last logged metrics, checkpoint), the
    validation history and the last validation's top-1/top-5, the resolved number of classes, the init
    checkpoint and what loading it did.
    """
    from bevt.data.loader import build_loader
    from bevt.eval.evaluate import build_eval_loader  # validation uses `bevt eval --views val`'s loader
    from bevt.train.distributed import broadcast_from_rank0, cleanup
    from bevt.train.ema import ModelEMA
    from bevt.train.logger import format_summary
    from bevt.train.loop import LoopConfig, Trainer, steps_for
    from bevt.train.optim import CosineSchedule, build_optimizer

    device, dist, amp = setup_runtime(cfg.run, cfg.kernels)
    loaders, lock = {}, None
    val_loader = None
    try:
        lock = preflight(cfg.run, device, dist, resume)
        ensure_data(cfg, dist)
        d, o = cfg.data, cfg.optim
        lists = [d.train_list] + ([d.val_list] if cfg.eval.val_every else [])
        num_classes, class_names = resolve_classes(cfg, lists)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_classes=num_classes))

        init_path, notes = "", []
        if cfg.model.init_from:
            try:
                init_path = ckpt.resolve_checkpoint(cfg.model.init_from)
            except FileNotFoundError as e:
                if not cfg.model.init_optional:
                    raise FileNotFoundError(f"model.init_from: {e}") from None
                if dist.is_main:
                    print(f"bevt: no checkpoint at {cfg.model.init_from} (run `bevt pretrain` first to fine-tune a "
                          f"pretrained model); fine-tuning from scratch", file=sys.stderr)

        loaders["video"] = build_loader("video", list_items(d.root, d.train_list, d.train_prefix), batch_size=d.batch_size // o.accum_steps,
                                        mode="finetune", decoder=d.decoder, num_workers=d.num_workers,
                                        seed=cfg.run.seed, rank=dist.rank, world_size=dist.world_size,
                                        **dataset_kwargs(cfg, "train"))
        steps_per_epoch = len(loaders["video"]) // o.accum_steps
        if steps_per_epoch < 1:
            raise ConfigError(f"the training list is too small: {len(loaders['video'])} batches per epoch per "
                              f"process for {o.accum_steps} accumulation steps; lower data.batch_size or add data")
        if cfg.eval.val_every:
            val_loader = build_eval_loader(cfg, data_path(d.root, d.val_list), "val", rank=dist.rank,
                                           world_size=dist.world_size)
        schedule_steps = steps_for(o.epochs, steps_per_epoch)
        total_steps = steps_for(o.epochs, steps_per_epoch, o.max_steps)

        model = build_classifier(cfg, num_classes)
        if init_path:
            notes = load_init(model, init_path, pretrained_window=cfg.model.pretrained_window)
        model.to(device)
        groups = optimizer_groups(model, o)
        optimizer = build_optimizer(groups, lr=o.lr, betas=tuple(o.betas), device_type=device.type, apex=o.apex)
        schedule = CosineSchedule(optimizer, base_lr=o.lr, total_steps=schedule_steps,
                                  warmup_steps=int(round(o.warmup_epochs * steps_per_epoch)),
                                  warmup_ratio=o.warmup_ratio, min_lr=o.min_lr, steps_per_epoch=steps_per_epoch,
                                  by_epoch=o.schedule_by_epoch)
        ema = None
        if cfg.ema.enabled:
            # the EMA starts from the weights training starts from: rank 0's on every process (the new head is
            # initialized per process; DDP would sync the model only when it wraps it, after this copy)
            broadcast_from_rank0(model, dist)
            ema = ModelEMA(model, momentum=cfg.ema.momentum, warm_up=cfg.ema.warm_up, interval=cfg.ema.interval,
                           updates_per_step=o.accum_steps)
        train_model = wrap_model(model, dist, device, cfg.run)

        run_dir = cfg.run.out_dir
        validation = None
        if val_loader is not None:
            validation = EpochValidation(cfg, val_loader, train_model, ema, device, amp, dist,
                                         total_epochs=int(-(-total_steps // steps_per_epoch)))
        loop_cfg = LoopConfig(total_steps=total_steps, steps_per_epoch=steps_per_epoch, accum_steps=o.accum_steps,
                              clip_grad=o.clip_grad, amp=amp, log_every=cfg.run.log_every,
                              ckpt_every=cfg.run.ckpt_every, keep_last=cfg.run.keep_last, progress=cfg.run.progress,
                              tensorboard=cfg.run.tensorboard, seed=cfg.run.seed,
                              bar_keys=("loss", "top1", "clips_per_s", "data_wait_pct", "mem_gb"), desc="finetune")
        trainer = Trainer(model=train_model, compute=FinetuneStep(train_model, cfg, device, cuda_graph=cfg.run.cuda_graph,
                                                               amp_dtype=AMP_DTYPES.get(amp)), loaders=loaders,
                          main_loader="video", optimizer=optimizer, schedule=schedule, cfg=loop_cfg, device=device,
                          dist=dist, run_dir=run_dir, config_dict=to_dict(cfg), ema=ema, on_epoch_end=validation)
        trainer.resume_as_asked(resume)
        if dist.is_main:  # after the resume checks: a refused resume leaves the run's config.json as it was
            os.makedirs(run_dir, exist_ok=True)
            save_json(cfg, os.path.join(run_dir, "config.json"))
        result = trainer.fit()
        if (validation is not None and not result["stopped_by"]  # a stopped run exits now; validation waits
                and (not validation.history or validation.history[-1]["step"] != trainer.state.step)):
            validation.run(trainer.state.epoch, trainer.state.step)  # the run stopped mid-epoch (max_steps)
        skipped = sorted(set(loaders["video"].skipped_files) | set(val_loader.skipped_files if val_loader else ()))
        history = validation.history if validation is not None else []
        summary = dict(result, run_dir=run_dir, recipe=cfg.recipe, model=cfg.model.name, num_classes=num_classes,
                       class_names=class_names, device=str(device), world_size=dist.world_size, amp=amp,
                       init_from=init_path, init_notes=notes, steps_per_epoch=steps_per_epoch,
                       ema=cfg.ema.enabled, val_history=history, skipped_files=skipped,
                       val_top1=history[-1]["val_top1"] if history else None,
                       val_top5=history[-1]["val_top5"] if history else None)
        if dist.is_main:
            print(format_summary(summary_title("bevt finetune", summary), summary_rows(summary)), file=sys.stderr)
        return summary
    finally:
        for loader in list(loaders.values()) + ([val_loader] if val_loader is not None else []):
            loader.close()
        if lock is not None:
            lock.release()
        cleanup(dist)


def summary_rows(s: dict) -> list[tuple[str, object]]:
    first, last = s.get("first", {}), s.get("last", {})
    rows = [("run folder", s["run_dir"]), ("recipe / model", f"{s['recipe']} / {s['model']} ({s['num_classes']} classes)"),
            ("device", f"{s['device']} x{s['world_size']}, amp {s['amp']}"),
            ("initialised from", s["init_from"] or "scratch"),
            ("steps / epochs", f"{s['steps']} / {s['epochs']} ({s['steps_per_epoch']} steps per epoch)"),
            ("time", f"{s['elapsed_s']:.1f} s")]
    for note in s.get("init_notes", []):
        rows.append(("  init", note))
    if "loss" in last:
        rows.append(("train loss (first log -> last)", f"{first.get('loss', float('nan')):.4f} -> {last['loss']:.4f}"))
    if "top1" in last:
        rows.append(("train top-1 (last log)", f"{last['top1']:.4f}"))
    if s.get("val_top1") is not None:
        w = s["val_history"][-1]["weights"]
        rows.append((f"val top-1 / top-5 (1 view, {w} weights)", f"{s['val_top1']:.4f} / {s['val_top5']:.4f}"))
    if "clips_per_s" in last:
        rows.append(("clips/s", f"{last['clips_per_s']:.1f}"))
    return rows + closing_rows(s)


# ----------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------

def add_arguments(p) -> None:
    add_job_arguments(p, RECIPES, "--set model.init_from=runs/default --set data.root=/data/k400")


def run(args) -> int:
    return run_job("bevt finetune", RECIPES, finetune, args)
