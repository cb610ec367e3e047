"""Configuration: a tree of dataclasses, validated in ``__post_init__``, named recipes, dotted overrides.

A run is ``recipe -> overrides -> validate``; the resolved config is saved as JSON in the run folder and
inside every checkpoint. Pretraining recipes live in :mod:`bevt.recipes`, fine-tuning ones in
:mod:`bevt.train.finetune`; both register with :class:`Recipes`.

Batch sizes are per GPU (per process) and per *optimizer step*: with ``optim.accum_steps = 2`` a
``video_batch`` of 8 runs as two micro-batches of 4 (the official recipe's "8 clips per GPU with
update_interval 2" is ``video_batch=8, accum_steps=2`` here, and means what it says).
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import json
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

KERNEL_CHOICES = ("auto", "ref", "triton", "cuda")
# frames are resized to the short side before cropping: a 32-frame clip at 2048 px already takes ~0.7 GB
MAX_SHORT_SIDE = 2048
# decoding processes per loader and training process: more is a typo (each one is a forked Python with torch)
MAX_WORKERS = 256


class ConfigError(ValueError):
    """A bad config value or override (the message names the field)."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass
class ModelConfig:
    name: str = "videoswin_nano_patch244_window877"
    """Backbone from the registry (``bevt info --models``)."""
    mode: str = "bevt"
    """``bevt`` (image + video streams), ``bevt_i`` (images only) or ``bevt_v`` (video only)."""
    drop_path_rate: float = 0.1
    """Stochastic depth, linearly increasing over blocks (official Swin-B pretraining: 0.3)."""
    image_loss_weight: float = 1.0
    """lambda in loss = CE(video) + lambda * CE(image)."""
    image_quirks: bool = False
    """Reproduce the official image stream's window quirks (shift mask in every block, shift kept at stage 4)."""
    grad_checkpointing: bool = False
    """Recompute each Swin block in the backward pass (both streams)."""
    init_from: str = ""
    """Checkpoint to initialise the backbone from: a weights file, a bevt checkpoint folder or run folder (its
    latest checkpoint); an image checkpoint (a 2D Swin, or bevt's BEVT-I run) is inflated to 3D."""

    def __post_init__(self):
        from bevt.models.bevt import MODES
        from bevt.models.registry import list_models

        _check(self.mode in MODES, f"model.mode must be one of {MODES}, got {self.mode!r}")
        _check(self.name in list_models(), f"model.name {self.name!r} is not a registered model; "
                                           f"choose from {', '.join(list_models())}")
        _check(0 <= self.drop_path_rate < 1, f"model.drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        _check(self.image_loss_weight >= 0, f"model.image_loss_weight must be >= 0, got {self.image_loss_weight}")


@dataclass
class TokenizerConfig:
    kind: str = "vq"
    """``vq`` (bevt's built-in VQ tokenizer) or ``dalle`` (OpenAI's DALL-E dVAE encoder.pkl)."""
    path: str = ""
    """Tokenizer file. Empty with kind=vq: ``<data.root>/vq_tokenizer.safetensors``."""
    vocab_size: int = 512
    """Codebook size; must equal the tokenizer's (DALL-E: 8192)."""
    train_if_missing: bool = True
    """kind=vq only: train and save the VQ tokenizer on the dataset's frames if the file is missing."""
    train_steps: int = 300
    """Steps of VQ training when it is trained here."""
    compile: bool = True
    """On CUDA, torch.compile the tokenizer's forward (fuses its element-wise work: ~1.7x for DALL-E)."""

    def __post_init__(self):
        _check(self.kind in ("vq", "dalle"), f"tokenizer.kind must be 'vq' or 'dalle', got {self.kind!r}")
        _check(self.vocab_size >= 2, f"tokenizer.vocab_size must be >= 2, got {self.vocab_size}")
        _check(self.train_steps >= 1, f"tokenizer.train_steps must be >= 1, got {self.train_steps}")


@dataclass
class DataConfig:
    root: str = "data/synth"
    """Dataset folder; list files and relative paths below are resolved against it."""
    video_list: str = "train.txt"
    """Video annotation list (``relative/path label`` per line) or a folder of class sub-folders."""
    image_list: str = "images.txt"
    """Image annotation list or folder (image stream)."""
    video_prefix: str = ""
    """Folder the video list's relative paths start from (mmaction's ``data_prefix``, relative to ``root``);
    empty: the list's own folder."""
    image_prefix: str = ""
    """Folder the image list's relative paths start from (empty: the list's own folder)."""
    synthesize_if_missing: bool = False
    """Generate the built-in synthetic dataset at ``root`` when its lists are missing (the embedded default).
    Overriding ``data.root`` without also setting this field turns it off: the path then holds your data."""
    clip_len: int = 16
    """Frames per clip (official pretraining: 16)."""
    frame_interval: int = 8
    """Distance between sampled frames (official pretraining: 8)."""
    crop_size: int = 224
    """Random crop shared by a clip's frames."""
    scale_range: tuple[int, int] = (256, 320)
    """Random short-side rescale before the crop."""
    tok_size: int = 112
    """Side of the tokenizer's copy of the crop (lanczos); the tokenizer grid must equal the stage-3 grid."""
    video_batch: int = 8
    """Clips per process per optimizer step."""
    image_batch: int = 64
    """Images per process per optimizer step."""
    num_workers: int = 4
    """Decoding worker processes per loader (pyav)."""
    decoder: str = "auto"
    """``auto`` (DALI on a GPU when installed, else PyAV), ``pyav`` or ``dali``."""

    def __post_init__(self):
        _check(self.clip_len >= 1 and self.frame_interval >= 1, "data.clip_len and data.frame_interval must be >= 1")
        _check(self.crop_size >= 32 and self.crop_size % 32 == 0, f"data.crop_size must be a positive multiple of 32 "
               f"(4 stages of 2x merging after the 4x patch), got {self.crop_size}")
        lo, hi = self.scale_range
        _check(self.crop_size <= lo <= hi, f"data.scale_range {self.scale_range} must satisfy crop_size <= lo <= hi")
        _check(hi <= MAX_SHORT_SIDE, f"data.scale_range must stay <= {MAX_SHORT_SIDE}, got {self.scale_range} (frames "
                                     f"are resized to it before cropping)")
        _check(self.tok_size * 2 == self.crop_size, f"data.tok_size must be crop_size / 2 (an 8x tokenizer then gives "
                                                    f"the stage-3 grid), got {self.tok_size} for crop {self.crop_size}")
        _check(self.video_batch >= 0 and self.image_batch >= 0, "data batch sizes must be >= 0")
        _check(0 <= self.num_workers <= MAX_WORKERS,
               f"data.num_workers must be in [0, {MAX_WORKERS}], got {self.num_workers}")
        _check(self.decoder in ("auto", "pyav", "dali"), f"data.decoder must be auto, pyav or dali, got {self.decoder!r}")


@dataclass
class MaskConfig:
    ratio: float = 0.5
    """Fraction of the 2D grid masked per block mask (official: 98 of 196)."""
    min_block_fraction: float = 16 / 196
    """Smallest block as a fraction of the grid (official: 16 of 196)."""
    min_aspect: float = 0.3
    """Block aspect ratio range [min_aspect, 1 / min_aspect]."""
    tube_range: tuple[float, float] = (0.5, 1.0)
    """Tube length as fractions of the temporal slots (official: 4..8 of 8)."""
    exact: bool = False
    """Top masks up to exactly ``ratio`` of the grid (the official count varies 90..98)."""

    def __post_init__(self):
        _check(0 < self.ratio <= 1, f"mask.ratio must be in (0, 1], got {self.ratio}")
        _check(0 < self.min_block_fraction <= self.ratio, "mask.min_block_fraction must be in (0, ratio]")
        lo, hi = self.tube_range
        _check(0 <= lo <= hi <= 1, f"mask.tube_range must satisfy 0 <= lo <= hi <= 1, got {self.tube_range}")


@dataclass
class OptimConfig:
    lr: float = 5e-4
    """Peak learning rate (per the whole run's batch; no automatic scaling)."""
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    epochs: float = 150
    """Length of the run in epochs of the video loader (the official epoch)."""
    max_steps: int = 0
    """If > 0, stop after this many optimizer steps (the schedule still spans ``epochs``)."""
    warmup_epochs: float = 10
    """Linear warmup, per iteration, from ``warmup_ratio`` x the cosine value."""
    warmup_ratio: float = 0.1
    min_lr: float = 0.0
    schedule_by_epoch: bool = False
    """Step the cosine once per epoch (official fine-tuning) instead of per iteration (pretraining)."""
    clip_grad: float = 3.0
    """Max L2 norm of all gradients (0 disables)."""
    accum_steps: int = 1
    """Micro-batches accumulated per optimizer step (batch sizes are divided by it)."""
    no_decay_keys: tuple[str, ...] = ("absolute_pos_embed", "relative_position_bias_table", "norm")
    """Parameters whose name contains one of these get no weight decay (official custom_keys)."""
    layer_decay: float = 1.0
    """Layer-wise lr decay for fine-tuning (1.0 disables; official K400: 0.9)."""
    backbone_lr_mult: float = 1.0
    """lr multiplier of the backbone relative to the head (official SSv2: 0.1)."""
    apex: bool = False
    """Use apex's FusedAdam if installed (torch's fused AdamW otherwise)."""

    def __post_init__(self):
        _check(math.isfinite(self.lr) and self.lr > 0, f"optim.lr must be finite and > 0, got {self.lr}")
        _check(all(0 <= b < 1 for b in self.betas), f"optim.betas must each be in [0, 1), got {self.betas}")
        _check(0 <= self.min_lr <= self.lr, f"optim.min_lr must be in [0, optim.lr={self.lr}], got {self.min_lr} "
               f"(below 0 the cosine ends in gradient ascent)")
        _check(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        _check(self.epochs > 0, f"optim.epochs must be > 0, got {self.epochs}")
        _check(0 <= self.warmup_epochs <= self.epochs, f"optim.warmup_epochs must be in [0, epochs], got {self.warmup_epochs}")
        _check(0 < self.warmup_ratio <= 1, f"optim.warmup_ratio must be in (0, 1], got {self.warmup_ratio}")
        _check(self.clip_grad >= 0, f"optim.clip_grad must be >= 0, got {self.clip_grad}")
        _check(self.accum_steps >= 1, f"optim.accum_steps must be >= 1, got {self.accum_steps}")
        _check(0 < self.layer_decay <= 1, f"optim.layer_decay must be in (0, 1], got {self.layer_decay}")
        _check(self.max_steps >= 0, f"optim.max_steps must be >= 0, got {self.max_steps}")


@dataclass
class RunConfig:
    out_dir: str = "runs/pretrain"
    """Run folder: config.json, metrics.jsonl, TensorBoard events, checkpoints/."""
    seed: int = 0
    device: str = "auto"
    """``auto`` (CUDA if visible, else CPU), ``cpu`` or ``cuda``."""
    amp: str = "auto"
    """``bf16``, ``fp16`` (with a grad scaler, for V100), ``off``; ``auto``: bf16 on CUDA, off on CPU."""
    compile: bool = False
    """torch.compile every Swin block (``bevt.models.compile_blocks``): fuses the element-wise work around
    the matmuls and kernels and cuts the host time per block (benchmarks/RESULTS.md, the BEVT step). Each
    new geometry (stream, stage, batch size) compiles once; the first steps wait for it (about 2 minutes
    for Swin-B on an H100 host)."""
    cuda_graph: bool = False
    """Replay each micro-step's forward (tokenizer, both streams, losses) and backward from two CUDA graphs
    (``bevt.train.cuda_graph``): removes the host time of launching thousands of kernels, which bounds the
    fast path on an H100. A CUDA device; fixed batch shapes (another shape runs eagerly);
    best with ``run.compile=true``. The first step warms up and captures (a few eager steps' time). Under
    torchrun it takes ``run.data_parallel=allreduce`` (what ``auto`` picks)."""
    data_parallel: str = "auto"
    """Gradient averaging under torchrun: ``ddp`` (DistributedDataParallel: all-reduce from backward hooks,
    overlapped with the backward), ``allreduce`` (``bevt.train.distributed.AllReduceParallel``: one bucketed
    all-reduce after the backward; works with ``run.cuda_graph``); ``auto``: ``allreduce`` with
    ``run.cuda_graph=true``, else ``ddp``."""
    log_every: int = 10
    """Steps between log lines (the only host syncs of the loop)."""
    ckpt_every: int = 0
    """Steps between checkpoints (0: at the end of each epoch and of the run)."""
    keep_last: int = 3
    """Checkpoints kept (older ones are deleted after a new one is complete)."""
    tensorboard: bool = True
    progress: bool = True
    """Show a progress bar (rank 0)."""

    def __post_init__(self):
        _check(self.device in ("auto", "cpu", "cuda"), f"run.device must be auto, cpu or cuda, got {self.device!r}")
        _check(self.amp in ("auto", "bf16", "fp16", "off"), f"run.amp must be auto, bf16, fp16 or off, got {self.amp!r}")
        _check(self.data_parallel in ("auto", "ddp", "allreduce"),
               f"run.data_parallel must be auto, ddp or allreduce, got {self.data_parallel!r}")
        _check(not (self.cuda_graph and self.data_parallel == "ddp"),
               "run.cuda_graph=true cannot replay DDP's backward hooks: use run.data_parallel=allreduce (or auto)")
        # numpy seeds take [0, 2^32); each process adds its rank: [0, 2^31) leaves room for any world size
        _check(0 <= self.seed < 2 ** 31, f"run.seed must be an integer in [0, 2^31), got {self.seed}")
        _check(self.log_every >= 1, f"run.log_every must be >= 1, got {self.log_every}")
        _check(self.ckpt_every >= 0 and self.keep_last >= 1, "run.ckpt_every must be >= 0 and run.keep_last >= 1")


@dataclass
class KernelsConfig:
    """Backend per op: auto (fastest that can run), ref, triton, cuda (see ``bevt info``)."""

    window_attention: str = "auto"
    masked_ce: str = "auto"
    masking: str = "auto"

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            _check(v in KERNEL_CHOICES, f"kernels.{f.name} must be one of {KERNEL_CHOICES}, got {v!r}")


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    recipe: str = "custom"
    """Name of the recipe this config came from (informational)."""

    def __post_init__(self):
        validate_cross(self)


def validate_cross(cfg: PretrainConfig) -> None:
    """Checks that involve several sections."""
    d, o, m = cfg.data, cfg.optim, cfg.model
    if m.mode in ("bevt", "bevt_v"):
        _check(d.video_batch >= 1, f"mode {m.mode} needs data.video_batch >= 1")
        _check(d.video_batch % o.accum_steps == 0,
               f"data.video_batch ({d.video_batch}) must be divisible by optim.accum_steps ({o.accum_steps})")
        _check(d.clip_len % 2 == 0, f"data.clip_len must be even (temporal patch 2), got {d.clip_len}")
    if m.mode in ("bevt", "bevt_i"):
        _check(d.image_batch >= 1, f"mode {m.mode} needs data.image_batch >= 1")
        _check(d.image_batch % o.accum_steps == 0,
               f"data.image_batch ({d.image_batch}) must be divisible by optim.accum_steps ({o.accum_steps})")


# ----------------------------------------------------------------------------- generic tree helpers
def to_dict(cfg) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def to_json(cfg) -> str:
    return json.dumps(to_dict(cfg), indent=2)


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(cls, data: dict):
    """Build a config of class ``cls`` from a (possibly partial) dict, recursively; unknown keys raise."""
    hints = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"unknown field(s) {sorted(unknown)} for {cls.__name__}; fields are {sorted(names)}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(tp, value)
        else:
            kwargs[name] = _coerce(value, tp, name)
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, name: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a sequence, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], name) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{name} must have {len(args)} entries, got {value!r}")
        return tuple(_coerce(v, a, name) for v, a in zip(value, args))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name} must be true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return value
    return value


def _parse_literal(text: str, tp: Any) -> Any:
    if tp is str:  # as the key: "run.out_dir = runs/x" means "runs/x", not a folder whose name starts with a space
        return text.strip()
    low = text.strip().lower()
    if tp is bool:
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"expected true/false, got {text!r}")
    if typing.get_origin(tp) is tuple:
        return _parse_sequence(text, tp)
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ConfigError(f"cannot parse {text!r} as {getattr(tp, '__name__', tp)}") from None


def _parse_sequence(text: str, tp: Any) -> list:
    """A tuple field's override: "256,320", "[256, 320]", "(a, b)", "['a', 'b']" or "" (empty). Items are split
    on commas and each is parsed as its element type, so strings need no quotes (quotes are stripped)."""
    body = text.strip()
    if len(body) >= 2 and (body[0], body[-1]) in (("[", "]"), ("(", ")")):
        body = body[1:-1]
    items = [p.strip() for p in body.split(",")] if body.strip() else []
    if items and not items[-1]:  # a trailing comma, as in "(a,)"
        items.pop()
    args = typing.get_args(tp)
    if len(args) == 2 and args[1] is Ellipsis:
        types = [args[0]] * len(items)
    elif len(args) == len(items):
        types = list(args)
    else:  # wrong count: _coerce names the expected length
        return items
    out = []
    for item, et in zip(items, types):
        if et is str:
            quoted = len(item) >= 2 and item[0] == item[-1] and item[0] in "'\""
            out.append(item[1:-1] if quoted else item)
        else:
            out.append(_parse_literal(item, et))
    return out


# A path set by hand means that path: a mistyped one must be an error, not the recipe's fallback for its own
# default (the embedded default synthesizes data into its own root, and fine-tunes from scratch when its own
# pretraining run is absent). Overriding the key without the flag turns the fallback off.
_NAMED_MEANS_REQUIRED = {"data.root": "data.synthesize_if_missing", "model.init_from": "model.init_optional"}


def apply_overrides(cfg, overrides: list[str]):
    """Return a new config with ``section.field=value`` overrides applied and everything re-validated.

    An override of ``data.root`` or ``model.init_from`` without its fallback flag also turns that flag off
    (``_NAMED_MEANS_REQUIRED``)."""
    data = to_dict(cfg)
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} must look like section.field=value (e.g. optim.lr=1e-4)")
        key, text = ov.split("=", 1)
        path = key.strip().split(".")
        cls, node = type(cfg), data
        for i, part in enumerate(path):
            hints = _field_types(cls)
            if part not in hints:
                raise ConfigError(f"override {key!r}: " + _no_field(path[:i], part, hints))
            tp = hints[part]
            if i < len(path) - 1:
                if not dataclasses.is_dataclass(tp):
                    raise ConfigError(f"override {key!r}: {part} is not a section")
                cls, node = tp, node[part]
            else:
                if dataclasses.is_dataclass(tp):
                    raise ConfigError(f"override {key!r} names a section; set one of its fields instead")
                try:
                    node[part] = _coerce(_parse_literal(text, tp), tp, key)
                except ConfigError as e:
                    raise ConfigError(f"override {key!r}: {e}") from None
    _fallbacks_off(data, {ov.split("=", 1)[0].strip() for ov in overrides})
    return from_dict(type(cfg), data)


def _fallbacks_off(data: dict, keys: set[str]) -> None:
    """A path set by hand (``keys``: the dotted fields that were set) turns its fallback flag off, unless the
    flag was set too (``_NAMED_MEANS_REQUIRED``)."""
    for key, flag in _NAMED_MEANS_REQUIRED.items():
        section, name = flag.split(".")
        if key in keys and flag not in keys and data.get(section, {}).get(name):
            data[section][name] = False


def _no_field(section: list[str], name: str, hints: dict) -> str:
    """'optim has no field 'lrr'; did you mean optim.lr? (fields: ...)' for a field ``name`` that the section
    at path ``section`` (empty: the top level) lacks."""
    close = difflib.get_close_matches(name, hints, n=1)
    hint = f"; did you mean {'.'.join(section + close)}?" if close else ""
    return f"{'.'.join(section) or 'the config'} has no field {name!r}{hint} (fields: {', '.join(sorted(hints))})"


def read_config_file(path: str) -> tuple[str, dict]:
    """(the file read, its JSON object): a config as ``--print-config`` prints it or a run folder's
    config.json; a folder means its config.json."""
    if os.path.isdir(path):
        inner = os.path.join(path, "config.json")
        if not os.path.isfile(inner):
            raise ConfigError(f"--config {path} is a folder without a config.json (a run folder has one)")
        path = inner
    try:
        with open(path, encoding="utf-8-sig") as f:  # a byte-order mark, as some editors write, is dropped
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config {path}: cannot read it ({e})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--config {path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path} must hold a JSON object of sections, as --print-config prints; "
                          f"it holds a {type(data).__name__}")
    return path, data


def apply_config_file(cfg, path: str):
    """Return a new config with the fields a JSON file sets (all of them, as ``--print-config`` prints, or any
    subset, e.g. ``{"optim": {"lr": 1e-4}}``) over ``cfg``'s, everything re-validated. A data.root or
    model.init_from set without its fallback flag turns the flag off, as with ``--set``."""
    path, data = read_config_file(path)
    merged = to_dict(cfg)
    named: set[str] = set()

    def walk(cls, given: dict, out: dict, section: list[str]) -> None:
        hints = _field_types(cls)
        for name, value in given.items():
            dotted = ".".join(section + [name])
            if name not in hints:
                raise ConfigError(f"--config {path}: " + _no_field(section, name, hints))
            tp = hints[name]
            if dataclasses.is_dataclass(tp):
                if not isinstance(value, dict):
                    raise ConfigError(f"--config {path}: {dotted} is a section, so it must be a JSON object; "
                                      f"got {value!r}")
                walk(tp, value, out[name], section + [name])
            else:
                try:
                    out[name] = _coerce(value, tp, dotted)
                except ConfigError as e:
                    raise ConfigError(f"--config {path}: {e}") from None
                named.add(dotted)

    walk(type(cfg), data, merged, [])
    _fallbacks_off(merged, named)
    try:
        return from_dict(type(cfg), merged)
    except ConfigError as e:
        raise ConfigError(f"--config {path}: {e}") from None


class Recipes:
    """The named recipes of one job (``--recipe NAME``): functions that return a full config, registered by
    decorating them with the instance (``@RECIPES``); the function's name is the recipe's name and the first
    line of its docstring its description (``--list-recipes``, ``bevt info --recipes``)."""

    def __init__(self, job: str):
        self.job = job
        self._make: dict[str, Callable[[], Any]] = {}

    def __call__(self, fn: Callable[[], Any]) -> Callable[[], Any]:
        if fn.__name__ in self._make:
            raise ValueError(f"{self.job} recipe {fn.__name__!r} is defined twice")
        self._make[fn.__name__] = fn
        return fn

    def names(self) -> list[str]:
        return sorted(self._make)

    def describe(self) -> dict[str, str]:
        """Recipe name -> the first line of its docstring, sorted by name."""
        return {name: (self._make[name].__doc__ or "").strip().splitlines()[0] for name in self.names()}

    def get(self, name: str):
        """A fresh config of recipe ``name``, with ``recipe`` set to the name and every field re-validated
        (a recipe may edit fields after construction)."""
        if name not in self._make:
            raise ConfigError(f"unknown {self.job} recipe {name!r}; recipes: {', '.join(self.names())}")
        cfg = self._make[name]()
        cfg.recipe = name
        return from_dict(type(cfg), to_dict(cfg))

    def build(self, name: str, overrides: list[str], config_file: str | None = None):
        """Recipe ``name``, then the fields a JSON config file sets (:func:`apply_config_file`), then the
        ``section.field=value`` overrides (:func:`apply_overrides`)."""
        cfg = self.get(name)
        if config_file is not None:  # --config "" is a missing file, not no file
            cfg = apply_config_file(cfg, config_file)
        return apply_overrides(cfg, overrides)


def save_json(cfg, path: str) -> None:
    with open(path, "w") as f:
        f.write(to_json(cfg) + "\n")

