"""``bevt pretrain``: parse -> build -> train.

One BEVT step (per micro-batch): decode and augment (loaders) -> tokenize every frame and image with the
frozen tokenizer -> tube / block masks made on the device -> video and image streams through the shared
backbone -> masked-token CE -> backward. The loop (:mod:`bevt.train.loop`) does the rest.
"""
from __future__ import annotations

import hashlib
import os
import sys

import torch

from bevt.config import ConfigError, PretrainConfig, save_json, to_dict
from bevt.data.transforms import normalize
from bevt.ops import BlockMaskSpec, TubeSpec, step_masks
from bevt.recipes import RECIPES
from bevt.train import checkpoint as ckpt
from bevt.train.distributed import DistInfo, barrier, cleanup
from bevt.train.job import (add_job_arguments, closing_rows, data_path, describe_backends, ensure_lists, list_items,
                            preflight, run_job, setup_runtime, summary_title, unwritable_folder, wrap_model)
from bevt.train.logger import format_summary
from bevt.train.loop import AMP_DTYPES, LoopConfig, StepContext, Trainer, steps_for

# ----------------------------------------------------------------------------- config, data and tokenizer
def build_config(recipe: str, overrides: list[str]) -> PretrainConfig:
    """Pretraining recipe ``recipe`` (:mod:`bevt.recipes`) with the ``section.field=value`` overrides applied."""
    return RECIPES.build(recipe, overrides)


def ensure_dataset(cfg: PretrainConfig, dist: DistInfo) -> None:
    """Check the annotation lists exist (or generate the built-in synthetic dataset when asked)."""
    d = cfg.data
    needed = {}
    if cfg.model.mode in ("bevt", "bevt_v"):
        needed[f"data.video_list={d.video_list}"] = data_path(d.root, d.video_list)
    if cfg.model.mode in ("bevt", "bevt_i"):
        needed[f"data.image_list={d.image_list}"] = data_path(d.root, d.image_list)
    ensure_lists(d.root, needed, synthesize=d.synthesize_if_missing, seed=cfg.run.seed, dist=dist)


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


# ----------------------------------------------------------------------------- build and run
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


# ----------------------------------------------------------------------------- CLI
def add_arguments(p) -> None:
    add_job_arguments(p, RECIPES, "--set optim.lr=1e-4 --set data.root=/data/k400")


def run(args) -> int:
    return run_job("bevt pretrain", RECIPES, pretrain, args)
