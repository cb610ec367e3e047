"""``bevt analyze temporal``: the paper's temporal-dependency test (Table 2) on a fine-tuned classifier.

Shape legend: B batch, V views, T frames, S crop size.

Three inputs, evaluated in one decoding pass over the list (same views, same weights):

* ``normal``: the clips as sampled;
* ``single_frame``: one random frame of each clip repeated over all T positions (a static video);
* ``shuffled``: the clip's frames in a random order.

The random frame and order are drawn per video and view from ``(seed, dataset index)``: the same list
and seed give the same inputs on any number of processes. A model that needs temporal order loses
accuracy on both; the paper reports drops of 15 / 60 / 70 points (single frame) on K400 / SSv2 /
Diving48. On bevt's synthetic dataset every class has a time-reversed twin made of the same frames, so
a model at 100 % on normal clips cannot beat ~50 % on single-frame or shuffled ones.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch

from bevt.config import ConfigError

INPUTS = ("normal", "single_frame", "shuffled")
_SINGLE_SALT, _SHUFFLE_SALT = 0x51F7, 0x5A0F


def _rng(seed: int, index: int, salt: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(index), salt])


def _views(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    if x.dim() == 5:
        return x[:, None], True
    if x.dim() != 6:
        raise ValueError(f"expected clips (B, 3, T, H, W) or (B, V, 3, T, H, W), got shape {tuple(x.shape)}")
    return x, False


def single_frame(x: torch.Tensor, indices, seed: int = 0) -> torch.Tensor:
    """Replace every frame of each clip by one of its frames, drawn uniformly per (video, view).

    x: (B, 3, T, H, W) or (B, V, 3, T, H, W), any dtype; indices: the B dataset indices (the draws' keys).
    Returns a new tensor of the same shape in which each clip has exactly one distinct frame.
    """
    xv, squeeze = _views(x)
    B, V, _, T = xv.shape[:4]
    idx = [int(i) for i in indices]
    if len(idx) != B:
        raise ValueError(f"{len(idx)} indices for a batch of {B}")
    t = torch.tensor(np.stack([_rng(seed, i, _SINGLE_SALT).integers(0, T, size=V) for i in idx]), device=x.device)
    gather = t.view(B, V, 1, 1, 1, 1).expand(B, V, xv.shape[2], 1, *xv.shape[4:])
    out = torch.gather(xv, 3, gather).expand(-1, -1, -1, T, -1, -1).contiguous()
    return out[:, 0] if squeeze else out


def shuffle_frames(x: torch.Tensor, indices, seed: int = 0) -> torch.Tensor:
    """Permute the frames of each clip with a random permutation drawn per (video, view); same shapes."""
    xv, squeeze = _views(x)
    B, V, _, T = xv.shape[:4]
    idx = [int(i) for i in indices]
    if len(idx) != B:
        raise ValueError(f"{len(idx)} indices for a batch of {B}")
    perms = np.stack([np.stack([r.permutation(T) for _ in range(V)]) for r in (_rng(seed, i, _SHUFFLE_SALT) for i in idx)])
    p = torch.tensor(perms, device=x.device)
    gather = p.view(B, V, 1, T, 1, 1).expand(B, V, xv.shape[2], T, *xv.shape[4:])
    out = torch.gather(xv, 3, gather)
    return out[:, 0] if squeeze else out


def temporal_transforms(seed: int = 0) -> dict:
    """The three inputs of the analysis, as :func:`bevt.eval.evaluate.predict` transforms."""
    return {"normal": None,
            "single_frame": lambda x, idx: single_frame(x, idx, seed),
            "shuffled": lambda x, idx: shuffle_frames(x, idx, seed)}


def drops(results: dict) -> dict:
    """Top-1 per input and its drop from ``normal`` (fractions)."""
    base = results["normal"]["top1"]
    out = {"normal": {"top1": base, "drop": 0.0}}
    for k in INPUTS[1:]:
        out[k] = {"top1": results[k]["top1"], "drop": base - results[k]["top1"]}
    return out


def temporal_analysis(checkpoint: str, cfg=None, *, list_path: str | None = None, views: str = "test",
                      seed: int = 0, weights: str = "auto", out_dir: str | None = None, overwrite: bool = False,
                      quiet: bool = False) -> dict:
    """Top-1 on normal, single-frame and shuffled clips, and the drops (paper Table 2).

    Returns :func:`bevt.eval.evaluate.evaluate`'s dict plus ``temporal`` (input -> top1 and drop) and
    ``seed``; writes ``temporal.json`` to ``out_dir`` when given (an earlier one there only if ``overwrite``).
    """
    from bevt.eval.evaluate import check_output_folder, evaluate

    if out_dir:
        check_output_folder(out_dir, "temporal.json", overwrite)
    out = evaluate(checkpoint, cfg, list_path=list_path, views=views, transforms=temporal_transforms(seed),
                   weights=weights, out_dir=None, plot=False, quiet=True)
    out["temporal"] = drops(out["results"])
    out["seed"] = seed
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, "temporal.json")
        with open(path, "w") as f:
            json.dump({k: v for k, v in out.items() if k != "results"} |
                      {"results": {k: {m: r[m] for m in ("videos", "top1", "top5", "mean_class_accuracy")}
                                   for k, r in out["results"].items()}}, f, indent=1)
        out["files"].append(path)
    if not quiet:
        print(format_temporal(out))
    return out


def run_name(checkpoint: str) -> str:
    """A short name for a checkpoint: its run folder's name when it sits in ``<run>/checkpoints/``."""
    folder = os.path.abspath(checkpoint.rstrip("/"))
    parent = os.path.dirname(folder)
    if os.path.basename(parent) == "checkpoints":
        return os.path.basename(os.path.dirname(parent))
    return os.path.basename(folder)


def temporal_cells(temporal: dict) -> list[str]:
    """Table 2 cells from :func:`drops`: Normal, Single-frame, Random-shuffling top-1 in %, each with its
    change from normal in brackets, e.g. ``48.1 (-50.0)``."""
    base = temporal["normal"]["top1"]
    cells = [f"{100 * base:.1f}"]
    for k in INPUTS[1:]:
        v = temporal[k]["top1"]
        cells.append(f"{100 * v:.1f} ({100 * (v - base):+.1f})")
    return cells


TEMPORAL_HEADERS = ["Normal", "Single-frame", "Random-shuffling"]


def format_temporal(out: dict, name: str | None = None) -> str:
    """Table 2 layout: Normal, Single-frame (change), Random-shuffling (change), top-1 in %."""
    from bevt.eval.evaluate import format_table

    row = [name or run_name(out["checkpoint"])] + temporal_cells(out["temporal"])
    head = (f"== bevt analyze temporal: {out['checkpoint']} ({out['weights']} weights) ==\n"
            f"list {out['list']}: {out['videos']} videos; views: {out['views_desc']}; seed {out['seed']}\n")
    return head + format_table(["model"] + TEMPORAL_HEADERS, [row])


def add_arguments(p) -> None:
    from bevt.eval.evaluate import add_common_arguments

    add_common_arguments(p, "temporal")
    p.add_argument("--seed", type=int, default=0, help="seed of the random frames and permutations (default: 0)")


def run(args) -> int:
    from bevt.eval.evaluate import config_for, default_out_dir, resolve_list

    try:
        cfg = config_for(args.checkpoint, args.recipe, args.overrides)
        out_dir = args.out or default_out_dir(args.checkpoint, "temporal", resolve_list(cfg, args.list), args.views)
        temporal_analysis(args.checkpoint, cfg, list_path=args.list, views=args.views, seed=args.seed,
                          weights=args.weights, out_dir=out_dir, overwrite=args.overwrite)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"bevt analyze temporal: {e}", file=sys.stderr)
        return 2
    return 0
