"""``bevt pretrain``: parse -> build -> train.

One BEVT step (per micro-batch): decode and augment (loaders) -> tokenize every frame and image with the
frozen tokenizer -> tube / block masks made on the device -> video and image streams through the shared
backbone -> masked-token CE -> backward. The loop (:mod:`bevt.train.loop`) does the rest.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import random
import signal
import sys

import numpy as np
import torch

from bevt.config import ConfigError, PretrainConfig, Recipes, save_json, to_dict
from bevt.data.transforms import normalize
from bevt.ops import BlockMaskSpec, TubeSpec, set_default_backend, step_masks
from bevt.recipes import RECIPES
from bevt.train import checkpoint as ckpt
from bevt.train.distributed import AllReduceParallel, DistInfo, barrier, cleanup, init_distributed
from bevt.train.logger import format_summary
from bevt.train.loop import AMP_DTYPES, LoopConfig, StepContext, Trainer, TrainingDiverged, steps_for


# ----------------------------------------------------------------------------- config and environment
def build_config(recipe: str, overrides: list[str]) -> PretrainConfig:
    """Pretraining recipe ``recipe`` (:mod:`bevt.recipes`) with the ``section.field=value`` overrides applied."""
    return RECIPES.build(recipe, overrides)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device=cuda but no CUDA GPU is visible")
    return torch.device(name)


def resolve_amp(amp: str, device: torch.device) -> str:
    if amp == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "off"
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError("run.amp=fp16 needs a CUDA device (use bf16 or off on the CPU)")
    return amp


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def data_path(root: str, name: str) -> str:
    return name if os.path.isabs(name) or not root else os.path.join(root, name)


def list_items(root: str, list_setting: str, prefix_setting: str = ""):
    """What a dataset reads for a list setting and its prefix setting (both relative to ``root``): the list or
    class folder, or the list's samples joined to the prefix folder (:func:`bevt.data.datasets.list_source`)."""
    from bevt.data.datasets import list_source

    return list_source(data_path(root, list_setting), data_path(root, prefix_setting) if prefix_setting else "")


def unwritable_folder(folder: str) -> str | None:
    """Why files cannot be written into ``folder`` (created if missing), or None: checked before work whose
    result would otherwise be lost when it is saved."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        return f"{folder} is a file, not a folder"
    parent = os.path.abspath(folder)
    while not os.path.exists(parent):  # the nearest folder that exists must take the new ones
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{parent} is a file, so the folder cannot be created"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot write into {parent} (permission denied)"
    return None


def ensure_dataset(cfg: PretrainConfig, dist: DistInfo) -> None:
    """Check the annotation lists exist (or generate the built-in synthetic dataset when asked)."""
    d = cfg.data
    needed = {}
    if cfg.model.mode in ("bevt", "bevt_v"):
        needed[f"data.video_list={d.video_list}"] = data_path(d.root, d.video_list)
    if cfg.model.mode in ("bevt", "bevt_i"):
        needed[f"data.image_list={d.image_list}"] = data_path(d.root, d.image_list)
    ensure_lists(d.root, needed, synthesize=d.synthesize_if_missing, seed=cfg.run.seed, dist=dist)


def ensure_lists(root: str, needed: dict[str, str], *, synthesize: bool, seed: int, dist: DistInfo) -> None:
    """Raise FileNotFoundError naming the missing lists of ``needed`` (setting -> path), or, with
    ``synthesize``, generate the built-in synthetic dataset at ``root`` (rank 0; the others wait)."""
    missing = {k: p for k, p in needed.items() if not os.path.exists(p)}
    if not missing:
        return
    what = "; ".join(f"{k} ({p})" for k, p in missing.items())
    user_data = bool(root) and os.path.isdir(root) and bool(os.listdir(root))
    if not synthesize:
        if not root:
            fix = "set data.root=DIR, or give the lists as paths"
        elif user_data:  # a folder of the user's data: the list setting is what is off, not the dataset
            fix = f"check the list setting{'s' if len(missing) > 1 else ''} (relative to data.root={root!r})"
        else:
            fix = (f"check data.root={root!r}, or create the built-in dataset with: bevt data synth --out {root} "
                   "(or add --set data.synthesize_if_missing=true)")
        raise FileNotFoundError(f"dataset not found: {what} {'does' if len(missing) == 1 else 'do'} not exist; {fix}")
    if dist.is_main:
        from bevt.data import synth

        if user_data:
            raise FileNotFoundError(f"{root} exists but has no {what}; point data.root at an empty folder to "
                                    f"generate the synthetic dataset there")
        print(f"bevt: generating the built-in synthetic dataset in {root} ...", file=sys.stderr)
        synth.generate(root, seed=seed)
    barrier(dist)


def tokenizer_path(cfg: PretrainConfig) -> str:
    t = cfg.tokenizer
    if t.path:
        return t.path
    if t.kind == "dalle":
        raise ConfigError("tokenizer.kind=dalle needs tokenizer.path=/path/to/encoder.pkl (OpenAI's DALL-E dVAE "
                          "encoder; download it from the DALL-E release yourself)")
    return data_path(cfg.data.root, "vq_tokenizer.safetensors")


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def ensure_tokenizer(cfg: PretrainConfig, device: torch.device, dist: DistInfo, resume_dir: str | None = None):
    """Load the tokenizer, training bevt's VQ tokenizer on the dataset's frames first if asked to ->
    (tokenizer, sha256 of its file).

    When resuming, the tokenizer must be the file the checkpoint's run used (its sha256 is in the
    checkpoint's config): another one gives every masked token another target id, and the run would go on
    learning a different task without a word. A missing file is not retrained then."""
    from bevt.tokenizers import load_tokenizer

    path = tokenizer_path(cfg)
    expected = resumed_tokenizer_sha256(resume_dir) if resume_dir else None
    redo = "; to train against another tokenizer, start a new run from the checkpoint's weights: " \
           f"model.init_from={resume_dir}"
    if not os.path.exists(path) and cfg.tokenizer.kind == "vq" and cfg.tokenizer.train_if_missing:
        if expected:
            raise ConfigError(f"--resume {resume_dir}: the tokenizer that run used is gone ({path} does not exist); "
                              f"training a new one would change the targets: put that file back{redo}")
        problem = unwritable_folder(os.path.dirname(os.path.abspath(path)))
        if problem:  # found before the training, not when its result is saved
            raise ConfigError(f"the tokenizer would be trained and saved at {path}, but {problem}: set "
                              f"tokenizer.path to a file in a folder you can write")
        if dist.is_main:
            train_tokenizer_on_dataset(cfg, path, device)
        barrier(dist)
    tok = load_tokenizer(f"{cfg.tokenizer.kind}:{path}", device=device, compile=cfg.tokenizer.compile)
    if tok.vocab_size != cfg.tokenizer.vocab_size:
        raise ConfigError(f"the tokenizer at {path} has {tok.vocab_size} codes but tokenizer.vocab_size="
                          f"{cfg.tokenizer.vocab_size}: set tokenizer.vocab_size={tok.vocab_size} (the LM head is "
                          f"sized from it)")
    sha = file_sha256(path)
    if expected and sha != expected:
        raise ConfigError(f"--resume {resume_dir}: the tokenizer at {path} is not the one that run used (sha256 "
                          f"{sha[:12]}... here, {expected[:12]}... there); resuming with it would change the targets: "
                          f"use that run's tokenizer file{redo}")
    return tok, sha


def resumed_tokenizer_sha256(resume_dir: str) -> str | None:
    """The sha256 of the tokenizer file recorded in a pretraining checkpoint (None: an older checkpoint)."""
    saved = ckpt.readable_checkpoint_config(resume_dir) or {}  # unreadable: the weights' check reports it
    return saved.get(ckpt.FINGERPRINTS, {}).get("tokenizer_sha256")


def tokenizer_frames(cfg: PretrainConfig, max_frames: int = 4096) -> torch.Tensor:
    """uint8 (N, 3, s, s) tokenizer-size copies of augmented frames and images from the dataset."""
    from bevt.data.loader import build_loader

    d = cfg.data
    sources = []
    if cfg.model.mode in ("bevt", "bevt_v"):
        sources.append(("video", list_items(d.root, d.video_list, d.video_prefix), "video_tok",
                        dict(clip_len=d.clip_len, interval=d.frame_interval)))
    if cfg.model.mode in ("bevt", "bevt_i"):
        sources.append(("image", list_items(d.root, d.image_list, d.image_prefix), "images_tok", {}))
    chunks = []
    for kind, items, key, extra in sources:
        n = 0
        loader = build_loader(kind, items, batch_size=8, mode="pretrain", decoder="pyav",
                              num_workers=d.num_workers, seed=cfg.run.seed + 1, drop_last=False, crop=d.crop_size,
                              scale=tuple(d.scale_range), tok_size=d.tok_size, **extra)
        try:
            for batch in loader:
                x = batch[key]
                x = x.flatten(0, 1) if x.dim() == 5 else x  # clips: (B, T, 3, s, s) -> frames
                chunks.append(x)
                n += x.shape[0]
                if n >= max_frames // len(sources):
                    break
        finally:
            loader.close()
    return torch.cat(chunks)[:max_frames]


def train_tokenizer_on_dataset(cfg: PretrainConfig, path: str, device: torch.device) -> None:
    from bevt.tokenizers.vq import train_vq_tokenizer

    frames = tokenizer_frames(cfg)
    print(f"bevt: training the VQ tokenizer ({cfg.tokenizer.vocab_size} codes) on {frames.shape[0]} frames "
          f"for {cfg.tokenizer.train_steps} steps -> {path}", file=sys.stderr)
    tok, _ = train_vq_tokenizer(frames, vocab_size=cfg.tokenizer.vocab_size, steps=cfg.tokenizer.train_steps,
                                seed=cfg.run.seed, device=device, progress=cfg.run.progress)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tok.save(path)


# ----------------------------------------------------------------------------- the step
class PretrainForward(torch.nn.Module):
    """The tensor work of one micro-batch once its masks exist: tokenize the tokenizer-size copies,
    normalize the clips and images, run both streams and their masked-token losses.

    ``forward(video, video_tok, video_mask, video_target_mask, images, images_tok, image_mask)`` takes
    uint8 pixels and bool masks on the device (None for a stream the mode does not use) and returns the
    model's scalars (``loss``, ``loss_video``, ``acc_video``, ...). Tensors in, a dict of tensors out, no
    host sync: the shape :class:`bevt.train.cuda_graph.GraphedStep` replays.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: torch.nn.Module, grid: tuple[int, int],
                 max_masked: dict[str, int] | None = None):
        super().__init__()
        self.model, self.tokenizer, self.grid = model, tokenizer, grid
        # per-sample bounds of the masked target tokens ("video", "images"), from the mask settings: the
        # fused loss launches for that many rows instead of every token's worth
        self.max_masked = dict(max_masked or {})

    def _tokens(self, x_uint8: torch.Tensor) -> torch.Tensor:
        # the tokenizer chooses its own precision; keep the step's autocast out of it
        with torch.no_grad(), torch.autocast(x_uint8.device.type, enabled=False):
            return self.tokenizer.encode(x_uint8)

    def forward(self, video, video_tok, video_mask, video_target_mask, images, images_tok, image_mask):
        kwargs = {}
        if video is not None:
            B, T = video_tok.shape[:2]  # video_tok: (B, T, 3, s, s)
            kwargs.update(video=normalize(video, channel_dim=1), video_mask=video_mask,
                          video_target_mask=video_target_mask,
                          video_ids=self._tokens(video_tok.flatten(0, 1)).view(B, T, *self.grid),
                          video_max_masked=self.max_masked.get("video"))
        if images is not None:
            kwargs.update(images=normalize(images, channel_dim=1), image_mask=image_mask,
                          image_ids=self._tokens(images_tok), image_max_masked=self.max_masked.get("images"))
        return self.model(**kwargs).scalars()


def mask_bounds(block: BlockMaskSpec, tube: TubeSpec) -> dict[str, int]:
    """Per-sample upper bounds of the masked target tokens of masks made with these settings (what
    :class:`PretrainForward` passes to the loss)."""
    return dict(video=tube.max_masked_target(block), images=block.max_masked)


class PretrainStep:
    """compute(batches, ctx) for the loop: the masks of one micro-batch, then :class:`PretrainForward`,
    eagerly or replayed from CUDA graphs (``cuda_graph``)."""

    def __init__(self, model, tokenizer, cfg: PretrainConfig, device: torch.device, *, cuda_graph: bool = False,
                 amp_dtype: torch.dtype | None = None):
        self.device = device
        d, m = cfg.data, cfg.mask
        grid = (d.crop_size // 16, d.crop_size // 16)
        n = grid[0] * grid[1]
        self.block_spec = BlockMaskSpec(grid=grid, num_masking_patches=max(1, round(m.ratio * n)),
                                        min_num_patches=max(1, round(m.min_block_fraction * n)),
                                        min_aspect=m.min_aspect, exact=m.exact)
        self.tube_spec = TubeSpec(slots=d.clip_len // 2, tube_range=tuple(m.tube_range), temporal_scale=2)
        self.seed = cfg.run.seed
        self.step_fn = PretrainForward(model, tokenizer, grid, mask_bounds(self.block_spec, self.tube_spec))
        if cuda_graph:
            from bevt.train.cuda_graph import GraphedStep

            self.step_fn = GraphedStep(self.step_fn, amp_dtype=amp_dtype)

    def _slice(self, masks: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        # masks are drawn for the global micro-batch, then strided like the loaders shard samples, so a
        # sample gets the same mask whatever the number of processes
        return masks[ctx.dist.rank::ctx.dist.world_size]

    def __call__(self, batches: dict, ctx: StepContext):
        dev, W = self.device, ctx.dist.world_size
        vb, ib = batches.get("video"), batches.get("images")
        B = vb["video"].shape[0] if vb is not None else 0
        Bi = ib["images"].shape[0] if ib is not None else 0
        # every mask of the global micro-batch in one launch, keyed by the micro-step
        m_in, m_tgt, m_img = step_masks(B * W, Bi * W, self.block_spec, self.tube_spec, seed=self.seed,
                                        step=ctx.micro_step, device=dev)

        def to_dev(b, key):
            return None if b is None else b[key].to(dev, non_blocking=True)

        def mine(masks, b):  # this process's share of a stream's masks
            return None if b is None else self._slice(masks, ctx)

        out = self.step_fn(to_dev(vb, "video"), to_dev(vb, "video_tok"), mine(m_in, vb), mine(m_tgt, vb),
                           to_dev(ib, "images"), to_dev(ib, "images_tok"), mine(m_img, ib))
        counts = {k: n for k, n in (("clips", B), ("images", Bi)) if n}
        return out["loss"], out, counts


def describe_backends(device: torch.device, strict: bool = False) -> dict[str, str]:
    """Which backend each op's setting (``kernels.*``, else ``BEVT_KERNELS``, else auto) resolves to on this
    device (for the run summary). ``strict``: a backend asked for explicitly that cannot run here raises
    ConfigError naming the setting, instead of being reported."""
    from bevt.ops import backend as be
    from bevt.ops.masked_ce import can_run_triton as ce_ok
    from bevt.ops.masking import can_run_cuda
    from bevt.ops.window_attention import can_run_triton as attn_ok, table_length

    q = torch.zeros(1, 1, 98, 32, device=device, dtype=torch.bfloat16)
    table = torch.zeros(table_length((2, 7, 7)), 1, device=device)
    h = torch.zeros(4, 32, device=device, dtype=torch.bfloat16)
    preds = {
        "window_attention": {"triton": lambda r: attn_ok(q, table, window_size=(2, 7, 7), raise_error=r),
                             "ref": lambda r: True},
        "masked_ce": {"triton": lambda r: ce_ok(h, h, raise_error=r), "ref": lambda r: True},
        "masking": {"cuda": lambda r: can_run_cuda(device, BlockMaskSpec(), TubeSpec(), raise_error=r),
                    "ref": lambda r: True},
    }
    out = {}
    for op, p in preds.items():
        try:
            out[op] = be.choose(op, None, p)
        except be.BackendUnavailable as e:
            if strict:
                raise ConfigError(f"kernels.{op}={be.get_default_backend(op)} (from the config or BEVT_KERNELS) "
                                  f"cannot run here: {e} (set kernels.{op}=auto or ref)") from None
            out[op] = f"unavailable ({e})"
    return out


# ----------------------------------------------------------------------------- build and run
def setup_runtime(run, kernels) -> tuple[torch.device, DistInfo, str]:
    """A run's device (this process's GPU under torchrun), process group, AMP mode, seeds and kernel
    defaults, from its ``run`` and ``kernels`` config sections -> (device, dist, amp)."""
    device = resolve_device(run.device)
    dist = init_distributed(device.type)
    if device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    amp = resolve_amp(run.amp, device)
    seed_everything(run.seed + dist.rank)
    # "auto" in the config leaves the process default alone (BEVT_KERNELS, else auto); others set it
    set_default_backend({op: be for op, be in dataclasses.asdict(kernels).items() if be != "auto"})
    return device, dist, amp


def check_cuda_graph(run, device: torch.device) -> None:
    """``run.cuda_graph`` needs what a CUDA graph can replay; say which setting is in the way."""
    if not run.cuda_graph:
        return
    if device.type != "cuda":
        raise ConfigError(f"run.cuda_graph=true needs a CUDA device, this run uses {device.type} "
                          f"(set run.cuda_graph=false)")


def preflight(run, device: torch.device, dist: DistInfo, resume: str) -> ckpt.RunFolderLock:
    """What a training job checks before any data or tokenizer work: the CUDA-graph setting, the output
    folder and the --resume path (a wrong one fails at once; a fresh run never writes into an earlier run's
    checkpoints), that every kernel backend asked for explicitly can run here, and the speed hint. Last, it
    takes the run folder's lock (another job writing there fails here) -> the lock, to release at the end."""
    check_cuda_graph(run, device)
    ckpt.check_run_folder(run.out_dir, resume)
    ckpt.resolve_resume(resume, run.out_dir)
    describe_backends(device, strict=True)
    speed_hint(run, device, dist)
    lock = ckpt.RunFolderLock(run.out_dir)
    lock.acquire(dist)
    return lock


def speed_hint(run, device: torch.device, dist: DistInfo) -> str | None:
    """On CUDA with ``run.compile`` or ``run.cuda_graph`` off: the one line (printed by rank 0) that says
    what they buy. They are off by default because compiling costs minutes at the start of a run."""
    if device.type != "cuda" or (run.compile and run.cuda_graph):
        return None
    hint = ("bevt: run.compile / run.cuda_graph are off; --set run.compile=true --set run.cuda_graph=true "
            "replays each step from CUDA graphs: up to 2.5x faster per step for Swin-B when Python's kernel "
            "launches are the bottleneck (benchmarks/RESULTS.md), after a few minutes of compiling")
    if dist.is_main:
        print(hint, file=sys.stderr)
    return hint


def wrap_model(model: torch.nn.Module, dist: DistInfo, device: torch.device, run) -> torch.nn.Module:
    """The module the loop trains: ``model`` with its Swin blocks compiled (``run.compile``), and, when
    there are several processes, in DDP or :class:`AllReduceParallel` (``run.data_parallel``). Blocks, not
    the whole model: see :func:`bevt.models.compile_blocks`."""
    if run.compile:
        from bevt.models import compile_blocks

        compile_blocks(model)
    if dist.enabled:
        if run.data_parallel == "allreduce" or (run.data_parallel == "auto" and run.cuda_graph):
            model = AllReduceParallel(model, dist)
        else:
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


def pretrain(cfg: PretrainConfig, *, resume: str = "") -> dict:
    """Run BEVT pretraining as configured; returns the summary dict (also printed on rank 0)."""
    from bevt.data.loader import build_loader
    from bevt.models.bevt import create_bevt
    from bevt.models.inflate import load_pretrained
    from bevt.train.optim import CosineSchedule, build_optimizer, param_groups

    device, dist, amp = setup_runtime(cfg.run, cfg.kernels)
    loaders, lock = {}, None
    try:
        lock = preflight(cfg.run, device, dist, resume)
        init_path = ""
        if cfg.model.init_from:  # a mistyped path fails now, not after the dataset and tokenizer work
            try:
                init_path = ckpt.resolve_checkpoint(cfg.model.init_from)
            except FileNotFoundError as e:
                raise FileNotFoundError(f"model.init_from: {e}") from None
        ensure_dataset(cfg, dist)
        tokenizer, tokenizer_sha = ensure_tokenizer(cfg, device, dist, ckpt.resolve_resume(resume, cfg.run.out_dir))
        d, o = cfg.data, cfg.optim
        common = dict(mode="pretrain", decoder=d.decoder, num_workers=d.num_workers, seed=cfg.run.seed,
                      rank=dist.rank, world_size=dist.world_size, crop=d.crop_size, scale=tuple(d.scale_range),
                      tok_size=d.tok_size)
        if cfg.model.mode in ("bevt", "bevt_v"):
            loaders["video"] = build_loader("video", list_items(d.root, d.video_list, d.video_prefix), batch_size=d.video_batch // o.accum_steps,
                                            clip_len=d.clip_len, interval=d.frame_interval, **common)
        if cfg.model.mode in ("bevt", "bevt_i"):
            loaders["images"] = build_loader("image", list_items(d.root, d.image_list, d.image_prefix),
                                             batch_size=d.image_batch // o.accum_steps, **common)
        main = "video" if "video" in loaders else "images"
        for name, loader in loaders.items():
            # the main stream sets the epoch (accum_steps batches a step); the other cycles but needs one batch
            need = o.accum_steps if name == main else 1
            if len(loader) < need:
                batch = "data.video_batch" if name == "video" else "data.image_batch"
                raise ConfigError(f"the {name} dataset is too small: {len(loader)} batches of {batch} // "
                                  f"optim.accum_steps per epoch per process, {need} needed; lower {batch} or add data")
        steps_per_epoch = len(loaders[main]) // o.accum_steps
        schedule_steps = steps_for(o.epochs, steps_per_epoch)
        total_steps = steps_for(o.epochs, steps_per_epoch, o.max_steps)

        model = create_bevt(cfg.model.name, mode=cfg.model.mode, vocab_size=cfg.tokenizer.vocab_size,
                            image_loss_weight=cfg.model.image_loss_weight, drop_path_rate=cfg.model.drop_path_rate,
                            image_quirks=cfg.model.image_quirks, grad_checkpointing=cfg.model.grad_checkpointing)
        notes = load_pretrained(model.backbone, init_path) if init_path else []
        model.to(device)
        groups = param_groups(model, weight_decay=o.weight_decay, no_decay_keys=tuple(o.no_decay_keys))
        optimizer = build_optimizer(groups, lr=o.lr, betas=tuple(o.betas), device_type=device.type, apex=o.apex)
        schedule = CosineSchedule(optimizer, base_lr=o.lr, total_steps=schedule_steps,
                                  warmup_steps=int(round(o.warmup_epochs * steps_per_epoch)),
                                  warmup_ratio=o.warmup_ratio, min_lr=o.min_lr, steps_per_epoch=steps_per_epoch,
                                  by_epoch=o.schedule_by_epoch)
        train_model = wrap_model(model, dist, device, cfg.run)

        run_dir = cfg.run.out_dir
        bar_keys = tuple(k for k in ("loss", "acc_video", "acc_image", "clips_per_s", "images_per_s", "data_wait_pct", "mem_gb"))
        loop_cfg = LoopConfig(total_steps=total_steps, steps_per_epoch=steps_per_epoch, accum_steps=o.accum_steps,
                              clip_grad=o.clip_grad, amp=amp, log_every=cfg.run.log_every,
                              ckpt_every=cfg.run.ckpt_every, keep_last=cfg.run.keep_last, progress=cfg.run.progress,
                              tensorboard=cfg.run.tensorboard, seed=cfg.run.seed, bar_keys=bar_keys, desc="pretrain")
        step = PretrainStep(train_model, tokenizer, cfg, device, cuda_graph=cfg.run.cuda_graph,
                            amp_dtype=AMP_DTYPES.get(amp))
        trainer = Trainer(model=train_model, compute=step, loaders=loaders,
                          main_loader=main, optimizer=optimizer, schedule=schedule, cfg=loop_cfg, device=device,
                          dist=dist, run_dir=run_dir,
                          config_dict=dict(to_dict(cfg), **{ckpt.FINGERPRINTS: {"tokenizer_sha256": tokenizer_sha}}))
        trainer.resume_as_asked(resume)
        if dist.is_main:  # after the resume checks: a refused resume leaves the run's config.json as it was
            os.makedirs(run_dir, exist_ok=True)
            save_json(cfg, os.path.join(run_dir, "config.json"))
        result = trainer.fit()
        skipped = sorted(set().union(*[set(l.skipped_files) for l in loaders.values()]))
        summary = dict(result, run_dir=run_dir, recipe=cfg.recipe, model=cfg.model.name, mode=cfg.model.mode,
                       device=str(device), world_size=dist.world_size, amp=amp, backends=describe_backends(device),
                       skipped_files=skipped, init_from=init_path, init_notes=notes, steps_per_epoch=steps_per_epoch)
        if dist.is_main:
            print(format_summary(summary_title("bevt pretrain", summary), summary_rows(summary)), file=sys.stderr)
        return summary
    finally:
        for loader in loaders.values():  # also when the run failed: its workers end now, not at exit
            loader.close()
        if lock is not None:
            lock.release()
        cleanup(dist)


def summary_rows(s: dict) -> list[tuple[str, object]]:
    first, last = s.get("first", {}), s.get("last", {})
    rows = [("run folder", s["run_dir"]), ("recipe / model", f"{s['recipe']} / {s['model']} ({s['mode']})"),
            ("device", f"{s['device']} x{s['world_size']}, amp {s['amp']}"),
            ("kernels", ", ".join(f"{k}={v}" for k, v in s["backends"].items())),
            ("initialised from", s.get("init_from") or "scratch"),
            ("steps / epochs", f"{s['steps']} / {s['epochs']} ({s['steps_per_epoch']} steps per epoch)"),
            ("time", f"{s['elapsed_s']:.1f} s")]
    rows += [("  init", note) for note in s.get("init_notes", [])]  # what loading adapted, missed or dropped
    if "loss" in last:
        rows.append(("loss (first log -> last)", f"{first.get('loss', float('nan')):.4f} -> {last['loss']:.4f}"))
    for k in ("acc_video", "acc_image"):
        if k in last:
            rows.append((f"masked-token {k[4:]} accuracy", f"{last[k]:.4f}"))
    for k in ("clips_per_s", "images_per_s"):
        if k in last:
            rows.append((k.replace("_per_s", "/s"), f"{last[k]:.1f}"))
    return rows + closing_rows(s)


def summary_title(command: str, s: dict) -> str:
    if s.get("stopped_by"):
        return f"{command}: stopped by {s['stopped_by']} at step {s['steps']} of {s['total_steps']}"
    return f"{command}: done"


def closing_rows(s: dict) -> list[tuple[str, object]]:
    """The last summary rows of any training run (pretraining, fine-tuning): memory, skipped files,
    checkpoint, and how to continue a run that was stopped."""
    rows = []
    if "data_wait_pct" in s:  # host time blocked on the training loaders, as a share of the whole run
        rows.append(("waiting for data", f"{s['data_wait_pct']:.1f} % of the run"))
    if s.get("peak_mem_gb"):
        rows.append(("peak GPU memory", f"{s['peak_mem_gb']:.2f} GB"))
    sk = s.get("skipped_files", [])
    rows.append(("skipped files", f"{len(sk)}" + (": " + ", ".join(sk[:5]) + (" ..." if len(sk) > 5 else "") if sk else "")))
    rows.append(("checkpoint", s.get("checkpoint")))
    if s.get("stopped_by"):
        rows.append(("to continue", "the same command with --resume auto"))
    return rows


# ----------------------------------------------------------------------------- CLI
def add_job_arguments(p, recipes: Recipes, set_example: str) -> None:
    """The arguments every training command takes (pretrain, finetune)."""
    p.add_argument("--recipe", default="default",
                   help=f"named recipe ({', '.join(recipes.names())}); default: the embedded run")
    p.add_argument("--list-recipes", action="store_true", help=f"list the {recipes.job} recipes and exit")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="JSON settings over the recipe's: a config as --print-config prints it, a run folder (its "
                        "config.json), or any subset such as {\"optim\": {\"lr\": 1e-4}}; --set applies on top")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"dotted override, repeatable (a tuple as a,b), e.g. {set_example}")
    p.add_argument("--resume", default="", metavar="auto|DIR",
                   help="continue exactly from a checkpoint folder, a run folder's latest, or 'auto' (the run's own)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def print_recipes(recipes: Recipes) -> None:
    width = max(map(len, recipes.names()))
    for name, doc in recipes.describe().items():
        print(f"{name:<{width}}  {doc}")


def run_job(command: str, recipes: Recipes, job, args) -> int:
    """List the recipes, or build the config from ``args`` and print it or run ``job(cfg, resume=...)``;
    bad input -> message, exit 2; a diverged run -> message, exit 1; a run stopped by a signal after writing
    its checkpoint -> 128 + the signal's number, as a shell reports a process the signal ended (130: Ctrl-C)."""
    if args.list_recipes:
        print_recipes(recipes)
        return 0
    try:
        cfg = recipes.build(args.recipe, args.overrides, args.config)
    except (ConfigError, ValueError) as e:
        print(f"{command}: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        from bevt.config import to_json

        print(to_json(cfg))
        return 0
    try:
        summary = job(cfg, resume=args.resume)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"{command}: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"{command}: {e}", file=sys.stderr)
        return 1
    if summary.get("stopped_by"):  # a signal's name, or a phrase when another process got it (as SIGTERM)
        return 128 + getattr(signal, summary["stopped_by"], signal.SIGTERM)
    return 0


def add_arguments(p) -> None:
    add_job_arguments(p, RECIPES, "--set optim.lr=1e-4 --set data.root=/data/k400")


def run(args) -> int:
    return run_job("bevt pretrain", RECIPES, pretrain, args)
