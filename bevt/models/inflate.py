"""Adapt checkpoints to a Video Swin model: 2D -> 3D inflation and window-size changes.

* Wrappers ``model`` / ``module`` / ``state_dict`` are unwrapped; prefixes ``module.``, ``backbone.``,
  ``encoder.`` stripped; ``relative_position_index`` / ``attn_mask`` buffers dropped; ``fc_norm.*`` -> ``norm.*``
  (as the official ``inflate_weights``).
* A 2D patch embedding (Conv2d weight, 4-D) becomes the image stream's ``patch_embed_2d`` and, averaged
  over the temporal patch, the 3D ``patch_embed``: w3d = w2d repeated over t / t.
* A 2D relative position table ((2h-1)(2w-1), nh) is bicubic-resized when the spatial window differs
  and tiled over all 2Wd-1 temporal offsets, so at initialisation every dt slice equals the 2D bias.
* A 3D table of another window (e.g. 8x7x7 -> 16x7x7 for SSv2-style fine-tuning) is interpolated
  trilinearly ((15, 13, 13) -> (31, 13, 13)).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from bevt.models.video_swin import VideoSwinTransformer

_PREFIXES = ("module.", "backbone.", "encoder.")


def unwrap_state_dict(ckpt: dict) -> dict[str, torch.Tensor]:
    """Find the tensors in a checkpoint dict and normalise their names."""
    sd = ckpt
    for key in ("model", "module", "state_dict"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    out = {}
    for k, v in sd.items():
        if not torch.is_tensor(v):
            continue
        changed = True
        while changed:
            changed = False
            for p in _PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        if k.endswith("relative_position_index") or k.endswith("attn_mask"):
            continue
        if k.startswith("fc_norm."):
            k = "norm." + k[len("fc_norm."):]
        out[k] = v
    return out


def _side(n: int) -> int:
    s = int(round(math.sqrt(n)))
    if s * s != n:
        raise ValueError(f"a 2D relative position table must have a square number of rows, got {n}")
    return s


def _resize_2d_table(table: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(L2, nh) -> ((2wh-1)(2ww-1), nh), bicubic, as the official 2D -> 3D inflation."""
    s = _side(table.shape[0])
    if (s, s) == tuple(size):
        return table
    t = table.float().T.reshape(1, -1, s, s)
    t = F.interpolate(t, size=size, mode="bicubic", align_corners=False)
    return t.reshape(table.shape[1], -1).T.to(table.dtype)


def _resize_3d_table(table: torch.Tensor, src: tuple[int, int, int], dst: tuple[int, int, int]) -> torch.Tensor:
    """(L3, nh) of window ``src`` -> table of window ``dst``, trilinear over (2d-1, 2h-1, 2w-1)."""
    if src == dst:
        return table
    s = tuple(2 * w - 1 for w in src)
    d = tuple(2 * w - 1 for w in dst)
    t = table.float().T.reshape(1, -1, *s)
    t = F.interpolate(t, size=d, mode="trilinear", align_corners=False)
    return t.reshape(table.shape[1], -1).T.to(table.dtype)


def adapt_state_dict(ckpt: dict, model: VideoSwinTransformer, *, src_window: tuple[int, int, int] | None = None
                     ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Return (state dict loadable into ``model``, notes of what was changed).

    Args:
        ckpt: a checkpoint dict (any of the wrappers above), from a 2D (image) or 3D (video) Swin.
        model: the target backbone (its window size and streams decide what is produced).
        src_window: the 3D window the checkpoint's tables were built for, if not the model's own
            and not inferable (3D tables are inferred when the temporal extent is the only difference).
    """
    sd = unwrap_state_dict(ckpt)
    target = model.state_dict()
    notes: list[str] = []
    wd, wh, ww = model.window_size
    pt = model.patch_size[0]
    out = dict(sd)
    # patch embedding: 2D -> image stream copy + temporally averaged 3D kernel
    w = out.get("patch_embed.proj.weight")
    if w is not None and w.dim() == 4:
        twod = {k[len("patch_embed."):]: t for k, t in out.items() if k.startswith("patch_embed.")}
        for k in list(out):
            if k.startswith("patch_embed."):
                del out[k]
        if model.patch_embed_2d is not None:
            out.update({f"patch_embed_2d.{k}": t for k, t in twod.items()})
        if model.patch_embed is not None:
            out["patch_embed.proj.weight"] = w.unsqueeze(2).repeat(1, 1, pt, 1, 1) / pt
            out.update({f"patch_embed.{k}": t for k, t in twod.items() if k != "proj.weight"})
        notes.append(f"inflated the 2D patch embedding over {pt} frames (averaged)")
    elif w is None and "patch_embed_2d.proj.weight" in out and model.patch_embed is not None:
        w2 = out["patch_embed_2d.proj.weight"]
        out["patch_embed.proj.weight"] = w2.unsqueeze(2).repeat(1, 1, pt, 1, 1) / pt
        for k in [k for k in out if k.startswith("patch_embed_2d.") and k != "patch_embed_2d.proj.weight"]:
            out["patch_embed." + k[len("patch_embed_2d."):]] = out[k]
        notes.append("built the 3D patch embedding from the image stream's 2D one (averaged over time)")
    # relative position tables
    n2 = (2 * wh - 1) * (2 * ww - 1)
    n3 = (2 * wd - 1) * n2
    n_tiled = n_resized = 0
    for k in [k for k in out if k.endswith("relative_position_bias_table")]:
        t = out[k]
        if t.shape[0] == n3 and (src_window is None or tuple(src_window) == model.window_size):
            continue
        rows = t.shape[0]
        if src_window is not None:
            out[k] = _resize_3d_table(t, tuple(src_window), model.window_size)
            n_resized += 1
            continue
        side = int(round(math.sqrt(rows)))
        if side * side == rows:  # a 2D table: resize spatially, then tile over every dt
            out[k] = _resize_2d_table(t, (2 * wh - 1, 2 * ww - 1)).repeat(2 * wd - 1, 1)
            n_tiled += 1
        elif rows % n2 == 0:  # a 3D table of another temporal window
            src_d = (rows // n2 + 1) // 2
            out[k] = _resize_3d_table(t, (src_d, wh, ww), model.window_size)
            n_resized += 1
        else:
            raise ValueError(f"{k}: cannot adapt a table of {rows} rows to window {model.window_size} "
                             f"(pass src_window=)")
    if n_tiled:
        notes.append(f"tiled {n_tiled} 2D relative position tables over {2 * wd - 1} temporal offsets")
    if n_resized:
        notes.append(f"interpolated {n_resized} 3D relative position tables to window {model.window_size}")
    # keep only what the model has; report mismatches instead of failing deep inside load_state_dict
    final = {}
    for k, v in out.items():
        if k not in target:
            continue
        if target[k].shape != v.shape:
            notes.append(f"skipped {k}: shape {tuple(v.shape)} != model {tuple(target[k].shape)}")
            continue
        final[k] = v
    return final, notes


def load_pretrained(model: VideoSwinTransformer, path: str, *, src_window=None, strict_backbone: bool = False
                    ) -> list[str]:
    """Load a backbone checkpoint (bevt, official BEVT/Video Swin, or 2D Swin) into ``model``, adapting it.
    ``path``: a weights file, a bevt checkpoint folder or a bevt run folder (its latest checkpoint).

    Returns notes (what was inflated, resized, missing, ignored). Raises FileNotFoundError / ValueError
    with the reason for a missing or unusable file.
    """
    from bevt.train.checkpoint import read_model_weights, resolve_checkpoint

    ckpt = read_model_weights(resolve_checkpoint(path))
    sd, notes = adapt_state_dict(ckpt, model, src_window=src_window)
    if not sd:
        raise ValueError(f"{path}: no tensor of this checkpoint matches the model (is it a Swin checkpoint?)")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.startswith("head.")]
    if missing:
        notes.append(f"{len(missing)} model tensors not in the checkpoint (kept at init): "
                     + ", ".join(missing[:6]) + (" ..." if len(missing) > 6 else ""))
        if strict_backbone:
            raise ValueError(f"{path}: missing backbone tensors: {missing}")
    return notes
