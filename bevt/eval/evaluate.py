"""``bevt eval``: top-1 / top-5 with multi-view testing, a per-class confusion summary, JSON + table + PNG.

Shape legend: N videos, B batch, V views (clips x crops), C classes, T frames, S crop size.

Views (official test pipelines, REFERENCE_BEVT.md sections 4.2-4.3): ``test`` = ``eval.test_clips`` clips
from mmaction's ``_get_test_clips`` (or the middle frame of each uniform segment, one clip) x
``eval.test_crops`` crops (``ThreeCrop`` after resizing the short side to ``eval.test_short_side``);
``val`` = one clip, centre crop after ``data.short_side`` (the per-epoch validation). Scores are averaged
as mmaction's ``average_clips='prob'``: softmax of every view, then the mean over views.

DDP: every rank predicts its shard of the list (the loader pads it with repeated videos), the
predictions are gathered and de-duplicated by dataset index, so every video counts once.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

from bevt.config import ConfigError
from bevt.data.transforms import normalize

VIEW_KINDS = ("test", "val")
WEIGHTS = ("auto", "ema", "live")

# transform(x_uint8 (B, V, 3, T, S, S) on the device, dataset indices (B,)) -> same shape
ClipTransform = Callable[[torch.Tensor, list], torch.Tensor]


# ----------------------------------------------------------------------------------------------------
# Scores and metrics
# ----------------------------------------------------------------------------------------------------

def average_views(logits_BVC: torch.Tensor) -> torch.Tensor:
    """mmaction ``average_clips='prob'``: softmax per view, then the mean over views -> (B, C)."""
    if logits_BVC.dim() != 3:
        raise ValueError(f"expected logits (B, V, C), got shape {tuple(logits_BVC.shape)}")
    return logits_BVC.float().softmax(-1).mean(1)


def topk_accuracy(probs_NC: torch.Tensor, labels_N: torch.Tensor, ks=(1, 5)) -> dict[int, float]:
    """Fraction of videos whose label is among the k highest scores, for each k (k capped at C)."""
    if probs_NC.shape[0] == 0:
        raise ValueError("no predictions to score (empty list?)")
    top = probs_NC.topk(min(max(ks), probs_NC.shape[1]), dim=1).indices
    hit = top == labels_N[:, None]
    n = probs_NC.shape[0]
    return {k: int(hit[:, :k].any(1).sum()) / n for k in ks}  # exact fractions of videos


def confusion_matrix(pred_N: torch.Tensor, labels_N: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, C) counts, rows = true class, columns = predicted class."""
    flat = labels_N.long() * num_classes + pred_N.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def class_report(probs_NC: torch.Tensor, labels_N: torch.Tensor, class_names: list[str] | None = None,
                 top_confusions: int = 10) -> dict:
    """Top-1, top-5, mean class accuracy, per-class accuracy, the most frequent confusions, the matrix."""
    C = probs_NC.shape[1]
    names = list(class_names) if class_names else [str(i) for i in range(C)]
    if len(names) != C:
        raise ValueError(f"{len(names)} class names for {C} classes")
    acc = topk_accuracy(probs_NC, labels_N, (1, 5))
    cm = confusion_matrix(probs_NC.argmax(1), labels_N, C)
    support = cm.sum(1)
    correct = cm.diag()
    per_class = [{"class": c, "name": names[c], "videos": int(support[c]),
                  "accuracy": (float(correct[c]) / float(support[c])) if support[c] else None} for c in range(C)]
    present = [p["accuracy"] for p in per_class if p["accuracy"] is not None]
    off = cm.clone()
    off.fill_diagonal_(0)
    pairs = [(int(off[t, p]), t, p) for t in range(C) for p in range(C) if off[t, p] > 0]
    pairs.sort(key=lambda r: (-r[0], r[1], r[2]))
    confusions = [{"true": names[t], "predicted": names[p], "videos": n, "fraction_of_true": n / float(support[t])}
                  for n, t, p in pairs[:top_confusions]]
    return {"videos": int(labels_N.shape[0]), "top1": acc[1], "top5": acc[5],
            "mean_class_accuracy": sum(present) / len(present), "per_class": per_class,
            "top_confusions": confusions, "confusion_matrix": cm.tolist(), "class_names": names}


# ----------------------------------------------------------------------------------------------------
# Prediction
# ----------------------------------------------------------------------------------------------------

@dataclass
class Predictions:
    """View-averaged probabilities of every video of a list, sorted by dataset index."""

    probs: torch.Tensor  # (N, C) float32, CPU
    labels: torch.Tensor  # (N,) int64
    index: torch.Tensor  # (N,) int64


@torch.no_grad()
def predict(model, loader, *, device: torch.device, amp: str = "off", transforms: dict[str, ClipTransform | None] | None = None,
            max_views: int = 0, dist=None) -> dict[str, Predictions]:
    """Run ``model`` over every batch of a test-mode loader, once per entry of ``transforms``.

    Args:
        model: a classifier (DDP / compiled wrappers are looked through: no collective calls here).
        loader: batches with ``video`` uint8 (B, V, 3, T, S, S) or (B, 3, T, S, S), ``label``, ``index``.
        transforms: name -> transform applied to the uint8 clips on the device before normalisation
            (None: the clips as decoded); default ``{"normal": None}``. All share one decoding pass.
        max_views: views per forward pass (0: all views of the batch at once).
        dist: DistInfo; with several processes the shards are gathered and de-duplicated.

    Returns: name -> :class:`Predictions` (the model is left in the mode it was in).
    """
    from bevt.train.checkpoint import unwrap_model
    from bevt.train.distributed import all_gather_objects

    net = unwrap_model(model)
    transforms = transforms or {"normal": None}
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    was_training = net.training
    net.eval()
    probs: dict[str, list[torch.Tensor]] = {k: [] for k in transforms}
    labels, index = [], []
    try:
        for batch in loader:
            x = batch["video"]
            x = x[:, None] if x.dim() == 5 else x  # one view
            B, V = x.shape[:2]
            idx = batch["index"].tolist()
            x = x.to(device, non_blocking=True)
            for name, tf in transforms.items():
                xv = tf(x, idx) if tf is not None else x
                flat = xv.flatten(0, 1)
                chunk = max_views or flat.shape[0]
                outs = []
                for i in range(0, flat.shape[0], chunk):
                    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                        outs.append(net(normalize(flat[i:i + chunk], channel_dim=1)).float())
                probs[name].append(average_views(torch.cat(outs).view(B, V, -1)))
            labels.append(batch["label"])
            index.append(batch["index"])
    finally:
        net.train(was_training)
    if not labels:
        raise ValueError("the evaluation loader produced no batches (empty list?)")
    # an unreadable video's slot holds the next readable one (the loaders substitute, as in training): that
    # video is already counted at its own index, so the slot is dropped, not counted twice under its label
    unreadable = set(getattr(loader, "skipped_files", ()))  # (any iterable of batches is a loader here)
    bad = [i for i, item in enumerate(loader.dataset.items) if item.path in unreadable] if unreadable else []
    local = (torch.cat(index), torch.cat(labels), {k: torch.cat(v).cpu() for k, v in probs.items()}, bad)
    parts = all_gather_objects(local, dist) if dist is not None else [local]
    idx_all = torch.cat([p[0] for p in parts])
    lab_all = torch.cat([p[1] for p in parts])
    bad_all = torch.tensor(sorted(set().union(*(p[3] for p in parts))), dtype=idx_all.dtype)
    order = torch.argsort(idx_all, stable=True)
    keep = torch.ones_like(order, dtype=torch.bool)
    keep[1:] = idx_all[order][1:] != idx_all[order][:-1]  # padding repeats samples across ranks
    keep &= ~torch.isin(idx_all[order], bad_all)
    if not keep.any():
        raise ValueError(f"no video of the evaluation list could be read ({len(bad_all)} unreadable)")
    order = order[keep]
    return {k: Predictions(torch.cat([p[2][k] for p in parts])[order], lab_all[order], idx_all[order])
            for k in transforms}


# ----------------------------------------------------------------------------------------------------
# Loading a classifier and its data
# ----------------------------------------------------------------------------------------------------

def config_for(checkpoint: str, recipe: str | None = None, overrides: list[str] | None = None):
    """The FinetuneConfig to evaluate ``checkpoint`` with: the one saved with it, or a named recipe's."""
    from bevt.config import apply_overrides, from_dict
    from bevt.train.checkpoint import checkpoint_config
    from bevt.train.checkpoint import resolve_checkpoint
    from bevt.train.finetune import FinetuneConfig, build_config

    overrides = list(overrides or [])
    if recipe:
        return build_config(recipe, overrides)
    path = resolve_checkpoint(checkpoint)
    saved = checkpoint_config(path)
    if saved is None:
        raise ConfigError(f"{path} has no config.json (not a bevt checkpoint): pass --recipe NAME (and --set "
                          f"model.num_classes=... etc.) to say how to build and test the model")
    try:
        cfg = from_dict(FinetuneConfig, saved)
    except ConfigError as e:
        kind = "a pretraining checkpoint" if "tokenizer" in saved else "not a fine-tuning checkpoint"
        raise ConfigError(f"{path} is {kind}, not a fine-tuned classifier ({e}); fine-tune it first: bevt finetune "
                          f"--set model.init_from={checkpoint}") from None
    return apply_overrides(cfg, overrides)


def load_classifier(checkpoint: str, cfg, *, device: torch.device | str = "cpu", weights: str = "auto"):
    """Build ``cfg``'s classifier and load a fine-tuned checkpoint into it -> (model in eval mode, info).

    ``weights``: ``auto`` (the EMA weights when the run used EMA with ``ema.evaluate``, else the live ones),
    ``ema`` (fails if the checkpoint has none) or ``live``. ``info``: the checkpoint path, the weights used
    and the number of classes (``model.num_classes``, or the checkpoint head's when that is 0).
    """
    from bevt.models.inflate import unwrap_state_dict
    from bevt.train.checkpoint import load_trainer_state, read_model_weights
    from bevt.train.ema import ema_parameters
    from bevt.train.checkpoint import resolve_checkpoint
    from bevt.train.finetune import build_classifier

    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    path = resolve_checkpoint(checkpoint)
    sd = unwrap_state_dict(read_model_weights(path))
    head = sd.get("head.weight")
    if head is None:
        raise ValueError(f"{path} has no classification head: it is not a fine-tuned classifier (fine-tune it "
                         f"first: bevt finetune --set model.init_from={checkpoint})")
    n = cfg.model.num_classes or head.shape[0]  # 0: the checkpoint's
    if head.shape[0] != n:
        raise ConfigError(f"{path} has a head for {head.shape[0]} classes but model.num_classes={n}")
    model = build_classifier(cfg, n, drop_path_rate=0.0)
    target = model.state_dict()
    sd = {k: v for k, v in sd.items() if k in target}
    missing = [k for k in target if k not in sd and not k.endswith("relative_position_index")]
    wrong = [k for k in sd if sd[k].shape != target[k].shape]
    if missing or wrong:
        raise ValueError(f"{path} does not fit model {cfg.model.name}: missing {missing[:5]}, wrong shapes {wrong[:5]}")
    model.load_state_dict(sd, strict=False)
    used = "live"
    if weights != "live":
        folder = path if os.path.isdir(path) else os.path.dirname(path)
        ema = None
        if os.path.isfile(os.path.join(folder, "trainer.pt")):
            ema = ema_parameters(load_trainer_state(folder))
        if weights == "ema" and ema is None:
            raise ValueError(f"{path} holds no EMA weights (the run had ema.enabled=false)")
        if ema is not None and (weights == "ema" or (cfg.ema.enabled and cfg.ema.evaluate)):
            params = dict(model.named_parameters())
            with torch.no_grad():
                for k, v in ema.items():
                    params[k].copy_(v)
            used = "ema"
    return model.to(device).eval(), {"checkpoint": path, "weights": used, "num_classes": n}


def resolve_list(cfg, list_path: str | None) -> str:
    """The list to evaluate: ``list_path`` (as given if it exists, else under data.root), or the config's
    test list (empty: its val list)."""
    from bevt.train.job import data_path

    if list_path:
        return list_path if os.path.exists(list_path) else data_path(cfg.data.root, list_path)
    return data_path(cfg.data.root, cfg.data.test_list or cfg.data.val_list)


def build_eval_loader(cfg, list_path: str, views: str = "test", *, rank: int = 0, world_size: int = 1,
                      num_workers: int | None = None):
    """A test-mode loader over ``list_path`` with ``views`` (``test`` or ``val``), in list order."""
    from bevt.data.loader import build_loader
    from bevt.train.finetune import dataset_kwargs
    from bevt.train.job import data_path, list_items

    if views not in VIEW_KINDS:
        raise ValueError(f"views must be one of {VIEW_KINDS}, got {views!r}")
    bs = cfg.eval.test_batch_size if views == "test" else cfg.eval.val_batch_size
    d = cfg.data  # the config's own lists keep their prefix settings; another list's paths start at its folder
    prefixes = {data_path(d.root, lst): prefix for lst, prefix in ((d.val_list, d.val_prefix), (d.test_list, d.test_prefix))
                if lst}
    items = list_items(d.root, list_path, prefixes.get(list_path, ""))
    return build_loader("video", items, batch_size=bs, mode="test", decoder=cfg.data.decoder,
                        num_workers=cfg.data.num_workers if num_workers is None else num_workers, seed=cfg.run.seed,
                        rank=rank, world_size=world_size, **dataset_kwargs(cfg, views))


def describe_views(cfg, views: str) -> str:
    d, e = cfg.data, cfg.eval
    sampling = f"{d.num_segments} uniform segments" if d.num_segments else f"{d.clip_len}x{d.frame_interval} frames"
    if views == "val":
        return f"1 clip x 1 centre crop {d.crop_size} (short side {d.short_side}), {sampling}"
    clips = 1 if d.num_segments else e.test_clips
    crop = "ThreeCrop" if e.test_crops == 3 else "centre crop"
    return f"{clips} clip(s) x {e.test_crops} crop(s) ({crop} {d.crop_size}, short side {e.test_short_side}), {sampling}"


# ----------------------------------------------------------------------------------------------------
# The whole evaluation
# ----------------------------------------------------------------------------------------------------

def check_output_folder(out_dir: str, result_file: str = "results.json", overwrite: bool = False) -> None:
    """Before an evaluation runs (minutes to hours): ``--out`` must name a folder that can be created or
    written, so that the results are not lost at the end, and must not hold an earlier evaluation's
    ``result_file`` unless ``overwrite``: a second evaluation would replace it without a word."""
    from bevt.train.job import unwritable_folder

    problem = unwritable_folder(out_dir)
    if problem:
        raise ConfigError(f"--out {out_dir}: {problem} (the results go into a folder)")
    earlier = os.path.join(out_dir, result_file)
    if os.path.exists(earlier) and not overwrite:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(os.path.getmtime(earlier)))
        raise ConfigError(f"--out {out_dir}: holds the results of an earlier evaluation ({result_file}, written "
                          f"{when}); pass --overwrite to replace them, or --out to write these elsewhere")


def evaluate(checkpoint: str, cfg=None, *, list_path: str | None = None, views: str = "test",
             transforms: dict[str, ClipTransform | None] | None = None, weights: str = "auto",
             out_dir: str | None = None, overwrite: bool = False, plot: bool = True, quiet: bool = False) -> dict:
    """Evaluate a fine-tuned checkpoint on a list: multi-view top-1/top-5 and the confusion summary.

    Args:
        checkpoint: a fine-tuning run folder (its latest checkpoint), a checkpoint folder or a weights file.
        cfg: the FinetuneConfig (default: the one saved with the checkpoint).
        list_path: the list to test (default: the config's test list, else its val list).
        views: ``test`` (multi-view) or ``val`` (single view).
        transforms: name -> clip transform, evaluated in one decoding pass (default ``{"normal": None}``);
            the first entry is the main result.
        weights: ``auto``, ``ema`` or ``live`` (see :func:`load_classifier`).
        out_dir: where to write ``results.json`` and the plot (None: write nothing).
        overwrite: replace an earlier evaluation's results in ``out_dir`` (else refused before any work).
        plot: write the per-class / confusion PNG (needs matplotlib).
        quiet: do not print the table.

    Returns a dict: checkpoint, weights, list, views, videos, ``results`` (name -> :func:`class_report`),
    and ``files`` written.
    """
    from bevt.train.distributed import cleanup
    from bevt.train.finetune import resolve_classes
    from bevt.train.job import setup_runtime

    if cfg is None:
        cfg = config_for(checkpoint)
    if out_dir:
        check_output_folder(out_dir, "results.json", overwrite)
    was_dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    device, dist, amp = setup_runtime(cfg.run, cfg.kernels)
    loader = None
    try:
        model, info = load_classifier(checkpoint, cfg, device=device, weights=weights)  # checkpoint errors first
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_classes=info["num_classes"]))
        lst = resolve_list(cfg, list_path)
        if not os.path.exists(lst):
            raise FileNotFoundError(f"evaluation list not found: {lst}")
        num_classes, names = resolve_classes(cfg, [os.path.abspath(lst)])  # the list's labels vs the head
        loader = build_eval_loader(cfg, lst, views, rank=dist.rank, world_size=dist.world_size)
        preds = predict(model, loader, device=device, amp=amp, transforms=transforms, max_views=cfg.eval.max_views,
                        dist=dist)
        results = {k: class_report(p.probs, p.labels, names) for k, p in preds.items()}
        out = {"checkpoint": info["checkpoint"], "weights": info["weights"], "list": lst, "views": views,
               "views_desc": describe_views(cfg, views), "model": cfg.model.name, "num_classes": num_classes,
               "videos": next(iter(results.values()))["videos"], "results": results, "files": [],
               "skipped_files": loader.skipped_files}
        if dist.is_main:
            if out_dir:
                os.makedirs(out_dir, exist_ok=True)
                path = os.path.join(out_dir, "results.json")
                with open(path, "w") as f:
                    json.dump(out, f, indent=1)
                out["files"].append(path)
                png = os.path.join(out_dir, "per_class.png")
                if os.path.exists(png):  # an earlier evaluation's plot must not sit beside these results
                    os.remove(png)
                if plot:
                    msg = plot_report(next(iter(results.values())), png,
                                      title=f"{cfg.model.name} - {os.path.basename(lst)}")
                    if msg.endswith(".png"):
                        out["files"].append(msg)
                    elif not quiet:
                        print(f"bevt eval: {msg}", file=sys.stderr)
            if not quiet:
                print(format_report(out))
        return out
    finally:
        if loader is not None:
            loader.close()
        if not was_dist:
            cleanup(dist)


# ----------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------

def format_table(headers: list[str], rows: list[list], *, align: str | None = None) -> str:
    """A plain-text table: the first column left-aligned, the others right-aligned (or ``align`` per column)."""
    cells = [[str(h) for h in headers]] + [[("" if c is None else str(c)) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    align = align or "l" + "r" * (len(headers) - 1)
    def line(r):
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(r, widths, align))
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def format_report(out: dict, *, max_classes: int = 30) -> str:
    """The printed form of :func:`evaluate`'s result: headline metrics, per-class accuracy, confusions."""
    r = next(iter(out["results"].values()))
    lines = [f"== bevt eval: {out['checkpoint']} ({out['weights']} weights) ==",
             f"list {out['list']}: {out['videos']} videos; views: {out['views_desc']}; softmax averaged over views",
             *([f"not counted: {len(out['skipped_files'])} unreadable video(s) (warned above)"]
               if out.get("skipped_files") else []),
             format_table(["metric", "%"], [["top-1", pct(r["top1"])], ["top-5", pct(r["top5"])],
                                            ["mean class accuracy", pct(r["mean_class_accuracy"])]])]
    if len(out["results"]) > 1:
        lines.append(format_table(["input", "top-1 %", "top-5 %"],
                                  [[k, pct(v["top1"]), pct(v["top5"])] for k, v in out["results"].items()]))
    pc = sorted(r["per_class"], key=lambda p: (p["accuracy"] is None, p["accuracy"] if p["accuracy"] is not None else 0))
    shown = pc[:max_classes]
    title = "per-class accuracy" + (f" (the {max_classes} worst of {len(pc)})" if len(pc) > max_classes else "")
    lines.append(title)
    lines.append(format_table(["class", "videos", "top-1 %"], [[p["name"], p["videos"], pct(p["accuracy"])] for p in shown]))
    if r["top_confusions"]:
        lines.append("top confusions")
        lines.append(format_table(["true", "predicted as", "videos", "% of true"],
                                  [[c["true"], c["predicted"], c["videos"], pct(c["fraction_of_true"])]
                                   for c in r["top_confusions"]]))
    if out.get("files"):
        lines.append("written: " + ", ".join(out["files"]))
    return "\n".join(lines)


def plot_report(report: dict, path: str, *, title: str = "") -> str:
    """Per-class accuracy bars, plus the row-normalised confusion matrix when there are <= 40 classes.

    Returns ``path`` when written, else the reason it was skipped (matplotlib missing).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): skipped the plot"
    names = report["class_names"]
    C = len(names)
    acc = [p["accuracy"] if p["accuracy"] is not None else 0.0 for p in report["per_class"]]
    small = C <= 40
    fig, axes = plt.subplots(1, 2 if small else 1, figsize=(13, 5.5) if small else (max(8, C * 0.12), 4.5),
                             squeeze=False)
    ax = axes[0][0]
    order = range(C) if small else sorted(range(C), key=lambda c: acc[c])
    ax.bar(range(C), [100 * acc[c] for c in order], color="tab:blue")
    ax.set_ylim(0, 100)
    ax.set_ylabel("top-1 %")
    ax.set_title("per-class accuracy" + ("" if small else " (sorted)"))
    if small:
        ax.set_xticks(range(C))
        ax.set_xticklabels([names[c] for c in order], rotation=60, ha="right", fontsize=8)
        cm = torch.tensor(report["confusion_matrix"], dtype=torch.float32)
        cm = cm / cm.sum(1, keepdim=True).clamp(min=1)
        ax2 = axes[0][1]
        im = ax2.imshow(cm.numpy(), cmap="Blues", vmin=0, vmax=1)
        ax2.set_xticks(range(C))
        ax2.set_yticks(range(C))
        ax2.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
        ax2.set_yticklabels(names, fontsize=8)
        ax2.set_xlabel("predicted")
        ax2.set_ylabel("true")
        ax2.set_title("confusion (row-normalised)")
        fig.colorbar(im, ax=ax2, fraction=0.046)
    fig.suptitle(f"{title}  top-1 {100 * report['top1']:.1f}%  top-5 {100 * report['top5']:.1f}%")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def default_out_dir(checkpoint: str, name: str, list_path: str, views: str) -> str:
    """``<run>/<name>/<step folder>/<list>_<views>`` for a checkpoint inside a run, else
    ``<checkpoint>_<name>/<list>_<views>`` beside it: evaluations of one checkpoint on other lists or views
    get folders of their own."""
    from bevt.train.checkpoint import resolve_checkpoint

    ck = os.path.abspath(resolve_checkpoint(checkpoint))
    folder = ck if os.path.isdir(ck) else os.path.dirname(ck)
    parent = os.path.dirname(folder)
    what = f"{os.path.splitext(os.path.basename(list_path))[0]}_{views}"
    if os.path.basename(parent) == "checkpoints":
        return os.path.join(os.path.dirname(parent), name, os.path.basename(folder), what)
    stem = os.path.basename(ck) if os.path.isdir(ck) else os.path.splitext(os.path.basename(ck))[0]
    return os.path.join(os.path.dirname(ck), f"{stem}_{name}", what)


# ----------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------

def add_common_arguments(p, out_name: str = "eval") -> None:
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="fine-tuning run folder (its latest checkpoint), checkpoint folder, or weights file")
    p.add_argument("--recipe", default=None,
                   help="build the model from this fine-tuning recipe instead of the config saved with the checkpoint "
                        "(needed for checkpoints made elsewhere)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override of the config, e.g. --set eval.test_clips=2 --set run.device=cpu")
    p.add_argument("--list", default=None, help="annotation list to test (default: data.test_list, else data.val_list)")
    p.add_argument("--views", choices=VIEW_KINDS, default="test",
                   help="test: eval.test_clips x eval.test_crops views; val: 1 clip, centre crop (default: test)")
    p.add_argument("--weights", choices=WEIGHTS, default="auto",
                   help="auto: EMA weights if the run kept them for evaluation; ema; live (default: auto)")
    p.add_argument("--out", default=None,
                   help=f"output folder (default: <run>/{out_name}/<checkpoint folder>/<list>_<views>)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results of an earlier evaluation in the output folder (default: refuse)")


def add_arguments(p) -> None:
    add_common_arguments(p)
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG")


def run(args) -> int:
    try:
        cfg = config_for(args.checkpoint, args.recipe, args.overrides)
        out_dir = args.out or default_out_dir(args.checkpoint, "eval", resolve_list(cfg, args.list), args.views)
        evaluate(args.checkpoint, cfg, list_path=args.list, views=args.views, weights=args.weights, out_dir=out_dir,
                 overwrite=args.overwrite, plot=not args.no_plot)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"bevt eval: {e}", file=sys.stderr)
        return 2
    return 0
