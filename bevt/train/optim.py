"""Parameter groups, AdamW and the learning-rate schedule (official BEVT/mmcv semantics).

* No weight decay for parameters whose name contains a key of ``no_decay_keys`` (official custom_keys
  ``absolute_pos_embed``, ``relative_position_bias_table``, ``norm``); linear biases and the mask token
  *are* decayed, as in the official code.
* Layer-wise lr decay (fine-tuning): the final norm and the last block get decay**1, each earlier block
  or patch-merging layer one more power, the patch embedding the last (official K400 mapping: 0.9**1 ..
  0.9**28 for Swin-B). Unlike the official mmcv rules (longest matching key wins), norms inside blocks
  get no weight decay and relative-position tables follow their block's lr: the official behaviour there
  is a side effect of key matching, not a choice (docs/ARCHITECTURE.md).
* Cosine from ``lr`` to ``min_lr`` over all steps (warmup included), per step or per epoch; linear
  warmup per step from ``warmup_ratio`` x the cosine value (mmcv's ``warmup='linear'``).
"""
from __future__ import annotations

import importlib.util
import math
import re

import torch
import torch.nn as nn


def swin_layer_ids(names: list[str], depths: tuple[int, ...]) -> dict[str, int]:
    """Depth rank from the top for each parameter name: 0 = head, 1 = final norm and last block, ... .

    Names are those of a VideoSwinTransformer (optionally prefixed, e.g. ``backbone.``).
    """
    # units from the bottom: patch_embed, then per stage its blocks and its downsample
    units = ["patch_embed"]
    for i, d in enumerate(depths):
        units += [f"layers.{i}.blocks.{j}" for j in range(d)]
        if i < len(depths) - 1:
            units.append(f"layers.{i}.downsample")
    top = len(units)  # the last block gets rank 1, as the final norm
    rank_of_unit = {u: top - k for k, u in enumerate(units)}
    out = {}
    pat = re.compile(r"(?:^|\.)(layers\.\d+\.(?:blocks\.\d+|downsample))\.")
    for n in names:
        m = pat.search(n)
        if m:
            out[n] = rank_of_unit[m.group(1)]
        elif re.search(r"(?:^|\.)(patch_embed(_2d)?|mask_token)", n):
            out[n] = top
        elif re.search(r"(?:^|\.)norm\.", n) and "layers." not in n:
            out[n] = 1
        else:
            out[n] = 0  # heads: full lr
    return out


def param_groups(model: nn.Module, *, weight_decay: float, no_decay_keys: tuple[str, ...] = (),
                 layer_decay: float = 1.0, backbone_lr_mult: float = 1.0, depths: tuple[int, ...] | None = None
                 ) -> list[dict]:
    """Groups for AdamW: each group has ``lr_scale`` (applied by the schedule) and its weight decay."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    ranks = swin_layer_ids([n for n, _ in named], depths) if layer_decay < 1.0 and depths else {}
    groups: dict[tuple[float, float], dict] = {}
    for n, p in named:
        wd = 0.0 if any(k in n for k in no_decay_keys) else weight_decay
        scale = layer_decay ** ranks.get(n, 0) if ranks else 1.0
        if backbone_lr_mult != 1.0 and not n.startswith("head."):
            scale *= backbone_lr_mult
        key = (wd, round(scale, 12))
        g = groups.setdefault(key, {"params": [], "weight_decay": wd, "lr_scale": scale, "names": []})
        g["params"].append(p)
        g["names"].append(n)
    return list(groups.values())


def build_optimizer(groups: list[dict], *, lr: float, betas=(0.9, 0.999), device_type: str = "cpu",
                    apex: bool = False) -> torch.optim.Optimizer:
    """torch AdamW (fused on CUDA), or apex FusedAdam when asked for and installed."""
    clean = [{k: v for k, v in g.items() if k != "names"} for g in groups]
    if apex:
        if importlib.util.find_spec("apex") is None:
            raise RuntimeError("optim.apex=true but apex is not installed; install NVIDIA apex with its CUDA "
                               "extensions, or drop the setting to use torch's fused AdamW")
        from apex.optimizers import FusedAdam

        return FusedAdam(clean, lr=lr, betas=betas, adam_w_mode=True)
    kwargs = {"fused": True} if device_type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(clean, lr=lr, betas=betas, **kwargs)


class CosineSchedule:
    """lr(step) = warmup(step) * cosine(step); sets every group's lr = lr(step) * group['lr_scale']."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, base_lr: float, total_steps: int, warmup_steps: int,
                 warmup_ratio: float = 0.1, min_lr: float = 0.0, steps_per_epoch: int | None = None,
                 by_epoch: bool = False):
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if by_epoch and not steps_per_epoch:
            raise ValueError("a per-epoch cosine needs steps_per_epoch")
        self.optimizer = optimizer
        self.base_lr, self.min_lr = base_lr, min_lr
        self.total_steps, self.warmup_steps = total_steps, warmup_steps
        self.warmup_ratio = warmup_ratio
        self.steps_per_epoch, self.by_epoch = steps_per_epoch, by_epoch

    def lr_at(self, step: int) -> float:
        t = (step // self.steps_per_epoch) * self.steps_per_epoch if self.by_epoch else step
        lr = self.min_lr + (self.base_lr - self.min_lr) * 0.5 * (1 + math.cos(math.pi * min(t, self.total_steps) / self.total_steps))
        if step < self.warmup_steps:
            lr *= 1 - (1 - step / self.warmup_steps) * (1 - self.warmup_ratio)
        return lr

    def apply(self, step: int) -> float:
        lr = self.lr_at(step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        return lr
