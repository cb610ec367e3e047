"""``bevt reproduce``: the shape of the paper's Tables 1 and 2 at small scale, on the built-in temporal data.

Stages (each a call of the public functions, nothing re-implemented; docs/reproduction.md):

1. a synthetic temporal dataset (:func:`bevt.data.synth.ensure`): train clips (pretraining videos and the
   labelled fine-tuning set), a separate val list, images for the image stream;
2. bevt's VQ tokenizer, trained once on frames of both the videos and the images, shared by every run;
3. pretraining with :func:`bevt.train.pretrain.pretrain`: **BEVT-I** (image stream only), **BEVT-V** (video
   stream only, from scratch) and **BEVT** (both streams, initialised from BEVT-I's image backbone, inflated
   to 3D as the official joint training starts from the image-stream checkpoint), BEVT-V and BEVT with the
   same number of steps (the paper's BEVT-V has BEVT's video budget);
4. fine-tuning with :func:`bevt.train.finetune.finetune`, the same recipe for every method, plus a
   **scratch** baseline (no pretraining);
5. evaluation with :func:`bevt.eval.analyze.temporal_analysis` (which runs :func:`bevt.eval.evaluate.evaluate`):
   multi-view top-1 / top-5 on the val list (Table 1) and the single-frame / shuffled drops (Table 2).

Finished stages are skipped when the command is run again with the same ``--out`` and the same settings
(``--fresh`` redoes everything; a stage an earlier run made with other settings is redone), and an interrupted pretraining or fine-tuning resumes from its last checkpoint, so an
interrupted reproduction continues where it stopped. Stages run method by method (BEVT-I, BEVT-V, BEVT,
then the scratch baseline: pretraining, fine-tuning, evaluation), not stage type by stage type.

Scales: ``cpu`` finishes in about 9 minutes on 2 cores (the same tables, far too small to show the paper's
direction); ``gpu`` takes about 10 minutes on one H100 with 16 CPU cores for decoding (every method within a
few points of chance); ``gpu_long`` about 20 minutes, where the paper's direction shows clearly
(docs/reproduction.md has both tables). Results
(``results.json``, ``results.md``) are rewritten after every evaluated method, so a run stopped early
keeps the rows it finished.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass

METHODS = ("scratch", "bevt_i", "bevt_v", "bevt")
LABELS = {"scratch": "Scratch", "bevt_i": "BEVT-I", "bevt_v": "BEVT-V", "bevt": "BEVT"}
PRETRAIN_DATA = {"scratch": "-", "bevt_i": "images", "bevt_v": "videos",
                 "bevt": "images, then images + videos (init BEVT-I)"}


@dataclass(frozen=True)
class ReproduceSettings:
    """Everything a scale decides (see :data:`SCALES`)."""

    # data: bevt.data.synth.generate arguments
    num_train: int
    num_val: int
    num_images: int
    num_frames: int
    size: tuple[int, int]  # W, H
    # model and input
    model: str
    crop: int
    scale_range: tuple[int, int]  # pretraining random rescale (short side)
    short_side: int  # fine-tuning resize before RandomResizedCrop / val centre crop
    pretrain_clip_len: int
    pretrain_interval: int
    ft_segments: int  # fine-tuning: uniform segments over the whole video (the order classes need it)
    # tokenizer
    vocab_size: int
    tokenizer_steps: int
    # pretraining
    video_batch: int
    image_batch: int
    image_steps: int  # BEVT-I
    video_steps: int  # BEVT-V and BEVT (same budget)
    pretrain_lr: float
    # fine-tuning
    ft_batch: int
    ft_epochs: float
    ft_lr: float
    layer_decay: float
    # testing
    test_crops: int
    workers: int
    amp: str = "auto"
    kernels: str = "auto"  # window attention and masked CE: auto (the fastest that can run, `bevt info`) or ref

    def describe(self) -> dict:
        return dataclasses.asdict(self)


SCALES = {
    # ~9 minutes on 2 CPU cores; every stage runs, but the models are far too small and short to learn
    # the synthetic classes well (docs/reproduction.md)
    "cpu": ReproduceSettings(
        num_train=256, num_val=64, num_images=256, num_frames=32, size=(112, 96),
        model="videoswin_nano_patch244_window877", crop=64, scale_range=(72, 88), short_side=72,
        pretrain_clip_len=8, pretrain_interval=4, ft_segments=8,
        vocab_size=64, tokenizer_steps=60,
        video_batch=8, image_batch=16, image_steps=150, video_steps=150, pretrain_lr=1.5e-3,
        ft_batch=16, ft_epochs=15, ft_lr=2e-3, layer_decay=0.9,
        test_crops=3, workers=2),
    # one GPU (H100) with 16 CPU cores: measured 611 s of stages (2026-11-23). Fine-tuning is bound by PyAV
    # decoding on the CPU (38-46 % of its time waits for data) and the tiny model is far from the GPU's
    # limit (docs/reproduction.md). At this budget every method ends within a few points of chance.
    "gpu": ReproduceSettings(
        num_train=2048, num_val=512, num_images=4096, num_frames=32, size=(112, 96),
        model="videoswin_tiny_patch244_window877", crop=64, scale_range=(72, 88), short_side=72,
        pretrain_clip_len=16, pretrain_interval=2, ft_segments=16,
        vocab_size=256, tokenizer_steps=400,
        video_batch=32, image_batch=128, image_steps=500, video_steps=600, pretrain_lr=1e-3,
        ft_batch=32, ft_epochs=8, ft_lr=1e-3, layer_decay=0.9,
        test_crops=3, workers=12,
        # Triton attention / CE: at this toy size a step is bound by host launches, and their first compilations
        # cost about a minute (benchmarks/RESULTS.md, convergence: 200 nano steps 82 s on auto, 17 s on ref)
        kernels="ref"),
}
# the gpu scale with longer pretraining and fine-tuning: measured 1222 s of stages (2026-11-22), where BEVT
# clearly beats the single-stream variants and scratch
SCALES["gpu_long"] = dataclasses.replace(SCALES["gpu"], image_steps=800, video_steps=800, ft_epochs=16)


def reproduce_settings(scale: str, **changes) -> ReproduceSettings:
    """The settings of ``scale`` (``cpu``, ``gpu`` or ``gpu_long``), with fields replaced by ``changes``."""
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; choose from {', '.join(SCALES)}")
    unknown = set(changes) - {f.name for f in dataclasses.fields(ReproduceSettings)}
    if unknown:
        raise ValueError(f"unknown reproduce setting(s) {sorted(unknown)}")
    return dataclasses.replace(SCALES[scale], **changes)


# ----------------------------------------------------------------------------------------------------
# Configs of the stages (the public recipes plus overrides)
# ----------------------------------------------------------------------------------------------------

def _run_overrides(out_dir: str, s: ReproduceSettings, seed: int, device: str) -> list[str]:
    return [f"run.out_dir={out_dir}", f"run.seed={seed}", f"run.device={device}", f"run.amp={s.amp}",
            "run.progress=false", "run.tensorboard=false", "run.log_every=25", "run.keep_last=1"] + \
        [f"kernels.{op}={s.kernels}" for op in ("window_attention", "masked_ce")]  # masks: auto (no compiling)


def pretrain_config(mode: str, data_root: str, out_dir: str, tokenizer: str, s: ReproduceSettings, *,
                    init_from: str = "", seed: int = 0, device: str = "auto"):
    """The pretraining config of one method: the ``default`` recipe with this scale's settings."""
    from bevt.train.pretrain import build_config

    steps = s.image_steps if mode == "bevt_i" else s.video_steps
    per_epoch = (s.num_images // s.image_batch) if mode == "bevt_i" else (s.num_train // s.video_batch)
    if per_epoch < 1:
        raise ValueError(f"{mode}: the dataset is smaller than one batch")
    epochs = steps / per_epoch
    ov = [f"data.root={data_root}", "data.synthesize_if_missing=false", f"data.crop_size={s.crop}",
          f"data.scale_range={s.scale_range[0]},{s.scale_range[1]}", f"data.tok_size={s.crop // 2}",
          f"data.clip_len={s.pretrain_clip_len}", f"data.frame_interval={s.pretrain_interval}",
          f"data.video_batch={s.video_batch}", f"data.image_batch={s.image_batch}", f"data.num_workers={s.workers}",
          f"tokenizer.path={tokenizer}", f"tokenizer.vocab_size={s.vocab_size}",
          f"tokenizer.train_steps={s.tokenizer_steps}", "tokenizer.compile=false",  # tiny frames: compiling costs more
          f"model.name={s.model}", f"model.mode={mode}",
          "model.drop_path_rate=0.1", f"model.init_from={init_from}", f"optim.lr={s.pretrain_lr}",
          "optim.weight_decay=0.05", f"optim.epochs={epochs}", f"optim.warmup_epochs={epochs * 0.1}",
          "optim.clip_grad=3.0"]
    return build_config("default", ov + _run_overrides(out_dir, s, seed, device))


def finetune_config(init_from: str, data_root: str, out_dir: str, s: ReproduceSettings, *, seed: int = 0,
                    device: str = "auto"):
    """The fine-tuning config, the same for every method (only ``model.init_from`` differs)."""
    from bevt.train.finetune import build_config

    ov = [f"model.name={s.model}", "model.num_classes=0", f"model.init_from={init_from}", "model.init_optional=false",
          "model.drop_path_rate=0.1", "model.head_dropout=0.3", f"data.root={data_root}",
          "data.synthesize_if_missing=false", "data.train_list=train.txt", "data.val_list=val.txt",
          f"data.num_segments={s.ft_segments}", f"data.crop_size={s.crop}", f"data.short_side={s.short_side}",
          "data.area_range=0.3,1.0", f"data.batch_size={s.ft_batch}", f"data.num_workers={s.workers}",
          f"optim.lr={s.ft_lr}", "optim.weight_decay=0.05", f"optim.epochs={s.ft_epochs}",
          f"optim.warmup_epochs={max(s.ft_epochs * 0.1, 0.5)}", "optim.clip_grad=5.0", "optim.schedule_by_epoch=false",
          f"optim.layer_decay={s.layer_decay}", f"eval.val_every={max(1, int(s.ft_epochs // 2))}",
          f"eval.val_batch_size={s.ft_batch}", "eval.test_clips=1", f"eval.test_crops={s.test_crops}",
          f"eval.test_short_side={s.crop if s.test_crops == 3 else s.short_side}", f"eval.test_batch_size={s.ft_batch}"]
    return build_config("default", ov + _run_overrides(out_dir, s, seed, device))


def export_image_backbone(checkpoint: str, path: str) -> str:
    """Write BEVT-I's backbone as a 2D Swin image checkpoint (what the official joint training starts from).

    The BEVT model's pretraining heads (fusion, LM head) are left out; the dt = 0 slice of each relative
    position table becomes the 2D table, so the joint run's inflation tiles it over every temporal offset.
    """
    from safetensors.torch import save_file

    from bevt.models.inflate import image_stream_as_2d, unwrap_state_dict
    from bevt.models.registry import model_config
    from bevt.train.checkpoint import checkpoint_config, read_model_weights, resolve_checkpoint

    ck = resolve_checkpoint(checkpoint)
    raw = read_model_weights(ck)
    backbone = {k[len("backbone."):]: v for k, v in raw.items() if k.startswith("backbone.")}
    saved = checkpoint_config(ck) or {}
    window = tuple(model_config(saved["model"]["name"])["window_size"]) if saved.get("model") else None
    sd = image_stream_as_2d(unwrap_state_dict(backbone), window, window[1:] if window else (7, 7))
    if sd is None:
        raise ValueError(f"{ck} is not an image-only (BEVT-I) checkpoint")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, path, metadata={"format": "swin-2d-image-backbone"})
    return path


# ----------------------------------------------------------------------------------------------------
# Running it
# ----------------------------------------------------------------------------------------------------

def stage_names(methods) -> list[str]:
    """The stages of a study, in the order they run: each method's pretraining, fine-tuning and evaluation
    back to back (BEVT-I first: BEVT starts from it; the scratch baseline last), so an interrupted run has
    complete rows for the methods it finished."""
    want = set(methods)
    names = ["data"] + (["tokenizer"] if want - {"scratch"} else [])
    for m in ("bevt_i", "bevt_v", "bevt", "scratch"):
        if m != "scratch" and (m in want or (m == "bevt_i" and "bevt" in want)):
            names.append(f"pretrain_{m}")
        if m in want:
            names += [f"finetune_{m}", f"eval_{m}"]
    return names


class _Stages:
    """Runs named stages with progress lines; a stage whose ``<out>/<name>.done.json`` exists and was made
    with the same settings is skipped (its saved result is returned), so a second run with the same ``--out``
    continues where one stopped. A marker of other settings (a ``--fresh`` study of other methods left it)
    is redone."""

    def __init__(self, out_dir: str, names: list[str], fresh: bool, record: dict):
        self.out_dir, self.names, self.fresh = out_dir, names, fresh
        self.record = json.loads(json.dumps(record))  # tuples -> lists, as read back
        self.t0 = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def run(self, name: str, fn, run_dir: str | None = None) -> dict:
        k = self.names.index(name) + 1
        tag = f"bevt reproduce: [{k}/{len(self.names)}] {name}"
        marker = os.path.join(self.out_dir, f"{name}.done.json")
        redo = self.fresh
        if not self.fresh and os.path.isfile(marker):
            with open(marker) as f:
                saved = json.load(f)
            if saved.get("study_settings") == self.record:
                self.seconds[name] = saved["seconds"]
                print(f"{tag}: done in an earlier run ({saved['seconds']:.0f} s), skipped", file=sys.stderr)
                return saved
            print(f"{tag}: an earlier run made it with other settings; redone", file=sys.stderr)
            redo = True
        if redo and run_dir and os.path.isdir(run_dir):
            shutil.rmtree(run_dir)  # else the stage would resume the old run's checkpoints
        print(f"{tag} ... (study time so far {time.perf_counter() - self.t0:.0f} s)", file=sys.stderr, flush=True)
        t = time.perf_counter()
        result = dict(fn(), seconds=round(time.perf_counter() - t, 1), study_settings=self.record)
        tmp = marker + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1, default=str)
        os.replace(tmp, marker)
        self.seconds[name] = result["seconds"]
        print(f"{tag}: {result['seconds']:.0f} s (study time so far {time.perf_counter() - self.t0:.0f} s)",
              file=sys.stderr, flush=True)
        return result


def _check_settings(out_dir: str, record: dict, fresh: bool) -> None:
    """Refuse to continue a study in ``out_dir`` that was started with other settings (unless ``fresh``)."""
    path = os.path.join(out_dir, "settings.json")
    record = json.loads(json.dumps(record))  # tuples -> lists, as read back
    if os.path.isfile(path) and not fresh:
        with open(path) as f:
            old = json.load(f)
        if old != record:
            changed = sorted(k for k in set(old["settings"]) | set(record["settings"])
                             if old["settings"].get(k) != record["settings"].get(k))
            changed += [k for k in ("scale", "seed") if old.get(k) != record.get(k)]
            raise ValueError(f"{out_dir} holds a study made with other settings (differs in: {', '.join(changed)}); "
                             f"pass --fresh to redo it there, or choose another --out")
    with open(path, "w") as f:
        json.dump(record, f, indent=1)


def reproduce(scale: str = "cpu", out_dir: str = "runs/reproduce", *, seed: int = 0, device: str = "auto",
              fresh: bool = False, methods=METHODS, settings: ReproduceSettings | None = None,
              quiet: bool = False) -> dict:
    """Run the whole study; returns the tables' numbers, settings and timings.

    Writes into ``out_dir``: ``data/`` (the synthetic dataset), ``tokenizer.safetensors``, one run folder per
    pretraining and fine-tuning, ``eval_<method>/`` (``temporal.json``, ``per_class.png``), one
    ``<stage>.done.json`` per finished stage, and ``results.json`` + ``results.md``, rewritten after every
    evaluated method (``"complete": false`` until the last one).
    """
    import torch

    from bevt.data import synth
    from bevt.eval.analyze import temporal_analysis
    from bevt.eval.evaluate import plot_report
    from bevt.train.finetune import finetune
    from bevt.train.job import resolve_device
    from bevt.train.pretrain import pretrain, train_tokenizer_on_dataset

    s = settings or reproduce_settings(scale)
    methods = tuple(methods)
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods or len(set(methods)) != len(methods):
        raise ValueError(f"methods must be distinct names from {', '.join(METHODS)}, got {list(methods)}")
    dev = resolve_device(device)  # fails early for --device cuda without a GPU
    device_name = str(dev) + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else "")
    os.makedirs(out_dir, exist_ok=True)
    record = {"scale": scale, "seed": seed, "settings": s.describe()}
    _check_settings(out_dir, record, fresh)
    data_root = os.path.join(out_dir, "data")
    tok_path = os.path.join(out_dir, "tokenizer.safetensors")
    names = stage_names(methods)
    stages = _Stages(out_dir, names, fresh, record)
    result = {"scale": scale, "settings": s.describe(), "seed": seed, "device": device_name,
              "methods": [m for m in METHODS if m in methods], "rows": {}, "complete": False}

    def save_results() -> None:
        result["timings_s"] = dict(stages.seconds)
        result["total_s"] = round(sum(stages.seconds.values()), 1)
        result["complete"] = all(m in result["rows"] for m in result["methods"])
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump(result, f, indent=1)
        with open(os.path.join(out_dir, "results.md"), "w") as f:
            f.write(format_markdown(result))

    def data_stage():
        ds = synth.ensure(data_root, num_train=s.num_train, num_val=s.num_val, num_images=s.num_images,
                          num_frames=s.num_frames, size=tuple(s.size), seed=seed, workers=max(1, s.workers))
        return {"root": str(ds.root), "classes": list(ds.classes)}

    stages.run("data", data_stage)

    if "tokenizer" in names:
        def tokenizer_stage():
            cfg = pretrain_config("bevt", data_root, os.path.join(out_dir, "tokenizer_run"), tok_path, s, seed=seed,
                                  device=device)
            train_tokenizer_on_dataset(cfg, tok_path, dev)
            return {"path": tok_path}

        marker = os.path.join(out_dir, "tokenizer.done.json")
        if not os.path.exists(tok_path) and os.path.exists(marker):  # the file was deleted: train it again
            os.remove(marker)
        stages.run("tokenizer", tokenizer_stage)

    pre_ckpt: dict[str, str] = {}
    for name in names:
        if name in ("data", "tokenizer"):
            continue
        kind, m = name.split("_", 1)
        if kind == "pretrain":
            run_dir = os.path.join(out_dir, name)

            def pre_stage(mode=m, run_dir=run_dir):
                init = ""
                if mode == "bevt":  # joint training starts from the image stream, inflated (official recipe)
                    init = export_image_backbone(pre_ckpt["bevt_i"],
                                                 os.path.join(out_dir, "bevt_i_image_backbone.safetensors"))
                cfg = pretrain_config(mode, data_root, run_dir, tok_path, s, init_from=init, seed=seed, device=device)
                r = pretrain(cfg, resume="auto")
                return {"checkpoint": r["checkpoint"], "steps": r["steps"], "last": r["last"],
                        "init_notes": r["init_notes"]}

            pre_ckpt[m] = stages.run(name, pre_stage, run_dir)["checkpoint"]
        elif kind == "finetune":
            run_dir = os.path.join(out_dir, name)

            def ft_stage(m=m, run_dir=run_dir):
                cfg = finetune_config(pre_ckpt.get(m, ""), data_root, run_dir, s, seed=seed, device=device)
                r = finetune(cfg, resume="auto")
                return {"checkpoint": r["checkpoint"], "steps": r["steps"], "val_history": r["val_history"],
                        "init_from": r["init_from"], "init_notes": r["init_notes"], "last": r["last"]}

            stages.run(name, ft_stage, run_dir)
        elif kind == "eval":
            def eval_stage(m=m):
                with open(os.path.join(out_dir, f"finetune_{m}.done.json")) as f:
                    ckpt = json.load(f)["checkpoint"]
                ev_dir = os.path.join(out_dir, name)
                # a stage redone (stale or unfinished) replaces its own earlier results
                out = temporal_analysis(ckpt, views="test", seed=seed, out_dir=ev_dir, overwrite=True, quiet=True)
                normal = out["results"]["normal"]
                plot_report(normal, os.path.join(ev_dir, "per_class.png"), title=f"{LABELS[m]} (scale {scale})")
                return {"top1": normal["top1"], "top5": normal["top5"],
                        "mean_class_accuracy": normal["mean_class_accuracy"], "temporal": out["temporal"],
                        "views": out["views_desc"], "videos": out["videos"],
                        "top_confusions": normal["top_confusions"][:5]}

            result["rows"][m] = stages.run(name, eval_stage)
            save_results()
    save_results()
    if not quiet:
        print(format_text(result))
    return result


# ----------------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------------

def _table_rows(result: dict):
    from bevt.eval.analyze import temporal_cells

    t1, t2 = [], []
    for m in result["methods"]:
        r = result["rows"].get(m)
        if r is None:
            continue
        t1.append([LABELS[m], PRETRAIN_DATA[m], f"{100 * r['top1']:.1f}", f"{100 * r['top5']:.1f}"])
        t2.append([LABELS[m]] + temporal_cells(r["temporal"]))
    return t1, t2


def _caption(result: dict) -> str:
    s = result["settings"]
    views = next(iter(result["rows"].values()))["views"] if result["rows"] else ""
    done = [LABELS[m] for m in result["methods"] if m in result["rows"]]
    status = "" if result["complete"] else \
        f" PARTIAL: {len(done)} of {len(result['methods'])} methods evaluated ({', '.join(done) or 'none'})."
    return (f"Scale {result['scale']} on {result['device']}: {s['model']}, crop {s['crop']}; synthetic data "
            f"({s['num_train']} train / {s['num_val']} val clips of 8 temporal classes, {s['num_images']} images); "
            f"pretraining {s['image_steps']} steps (BEVT-I) and {s['video_steps']} steps (BEVT-V, BEVT); fine-tuning "
            f"{s['ft_epochs']:g} epochs; test views: {views}; seed {result['seed']}; "
            f"{result['total_s']:.0f} s of stages.{status}")


def _timings(result: dict) -> str:
    return "Stage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in result["timings_s"].items())


def format_text(result: dict) -> str:
    from bevt.eval.analyze import TEMPORAL_HEADERS
    from bevt.eval.evaluate import format_table

    t1, t2 = _table_rows(result)
    return "\n".join([
        "== bevt reproduce ==", _caption(result), "",
        "Table 1: fine-tuned top-1 / top-5 (%) by pretraining method",
        format_table(["Method", "Pretrain", "Top-1", "Top-5"], t1, align="llrr"), "",
        "Table 2: top-1 (%) when temporal information is removed (change from normal)",
        format_table(["Method"] + TEMPORAL_HEADERS, t2), "", _timings(result)])


def format_markdown(result: dict) -> str:
    from bevt.eval.analyze import TEMPORAL_HEADERS

    t1, t2 = _table_rows(result)

    def md(headers, rows):
        out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        return "\n".join(out + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])

    return "\n\n".join([
        "# bevt reproduce", _caption(result),
        "**Table 1.** Fine-tuned top-1 / top-5 (%) on the synthetic val list, by pretraining method.",
        md(["Method", "Pretrain", "Top-1", "Top-5"], t1),
        "**Table 2.** Top-1 (%) on normal, single-frame and randomly shuffled clips (change from normal).",
        md(["Method"] + TEMPORAL_HEADERS, t2), _timings(result),
    ]) + "\n"


# ----------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------

def add_arguments(p) -> None:
    p.add_argument("--scale", choices=sorted(SCALES), default="cpu",
                   help="cpu: ~9 min on 2 cores (shape of the tables only); gpu: ~10 min on one H100 with 16 "
                        "CPU cores (methods near chance); gpu_long: ~20 min (the paper's direction shows) "
                        "(default: cpu)")
    p.add_argument("--out", default=None, help="output folder; finished stages found there are skipped "
                                               "(default: runs/reproduce_<scale>)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated subset of {','.join(METHODS)} (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, the runs and the analysis (default: 0)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: the GPU if there is one (default: auto)")
    p.add_argument("--workers", type=int, default=None, help="decoding workers per loader (default: the scale's)")
    p.add_argument("--kernels", choices=("auto", "ref"), default=None,
                   help="backend of window attention and masked CE (default: the scale's: cpu auto, gpu and gpu_long ref)")
    p.add_argument("--fresh", action="store_true", help="redo every stage (default: skip the finished ones)")


def run(args) -> int:
    from bevt.config import ConfigError

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    try:
        changes = {} if args.workers is None else {"workers": args.workers}
        if args.kernels is not None:
            changes["kernels"] = args.kernels
        if args.workers is not None and args.workers < 0:
            raise ValueError(f"--workers must be >= 0, got {args.workers}")
        s = reproduce_settings(args.scale, **changes)
        reproduce(args.scale, args.out or f"runs/reproduce_{args.scale}", seed=args.seed, device=args.device,
                  fresh=args.fresh, methods=methods, settings=s)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"bevt reproduce: {e}", file=sys.stderr)
        return 2
    return 0
