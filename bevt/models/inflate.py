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
* bevt's own image-only (BEVT-I) checkpoints are taken as the 2D Swin they stand for (``image_stream_as_2d``)
  and inflated as above, for pretraining and fine-tuning alike.
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
    final, reshaped, unused = {}, [], []
    for k, v in out.items():
        if k not in target:
            unused.append(k)
        elif target[k].shape != v.shape:
            reshaped.append(f"{k} {tuple(v.shape)} -> model {tuple(target[k].shape)}")
        else:
            final[k] = v
    if reshaped:
        notes.append(f"{len(reshaped)} {_RESHAPED}, not loaded: {listing(reshaped, 3)}")
    if unused:
        notes.append(f"{len(unused)} checkpoint tensors not in this model (dropped): {listing(unused)}")
    return final, notes


_RESHAPED = "checkpoint tensors of another shape than the model's"


def listing(names: list[str], limit: int = 6) -> str:
    """The first ``limit`` names, comma-separated, `` ...`` when there are more (for notes and errors)."""
    return ", ".join(names[:limit]) + (" ..." if len(names) > limit else "")


def image_stream_as_2d(sd: dict[str, torch.Tensor], src_window: tuple[int, int, int] | None,
                       spatial: tuple[int, int]) -> dict[str, torch.Tensor] | None:
    """An image-only (BEVT-I) backbone state dict in the 2D Swin checkpoint format, or None if not image-only.

    bevt's image stream stores 3D relative position tables of which only the dt = 0 slice is trained (the
    image path reads it); the official image-stream checkpoint is a 2D Swin. Taking that slice and naming
    the 2D patch embedding ``patch_embed`` lets the official inflation (2D kernel averaged over time, 2D
    table tiled over every temporal offset) run on it.
    """
    if "patch_embed.proj.weight" in sd or "patch_embed_2d.proj.weight" not in sd:
        return None
    out = {}
    n2 = (2 * spatial[0] - 1) * (2 * spatial[1] - 1)
    for k, v in sd.items():
        if k.startswith("patch_embed_2d."):
            out["patch_embed." + k[len("patch_embed_2d."):]] = v
        elif k.endswith("relative_position_bias_table") and v.shape[0] % n2 == 0 and v.shape[0] != n2:
            d = (src_window[0] if src_window else (v.shape[0] // n2 + 1) // 2)
            if (2 * d - 1) * n2 != v.shape[0]:
                raise ValueError(f"{k}: {v.shape[0]} rows do not match a window of depth {d} x {spatial}")
            out[k] = v.view(2 * d - 1, n2, -1)[d - 1]  # the dt = 0 slice
        else:
            out[k] = v
    return out


def checkpoint_for(model: VideoSwinTransformer, path: str, *, src_window=None
                   ) -> tuple[str, dict[str, torch.Tensor], list[str]]:
    """Read the checkpoint at ``path`` (a weights file, a bevt checkpoint folder or run folder: its latest) and
    adapt it to ``model``: (the file or folder read, the tensors that fit the model, notes of what was changed).

    ``src_window``: the 3D window of its tables, else the one of the bevt config saved with it, else inferred. An
    image-only (BEVT-I) checkpoint is inflated from its 2D patch embedding and dt = 0 tables.
    """
    from bevt.models.registry import model_config
    from bevt.train.checkpoint import read_model_weights, readable_checkpoint_config, resolve_checkpoint

    path = resolve_checkpoint(path)
    sd = unwrap_state_dict(read_model_weights(path))
    saved = readable_checkpoint_config(path)
    name = saved.get("model", {}).get("name") if isinstance(saved, dict) else None
    if src_window is None and name:
        try:
            src_window = tuple(model_config(name)["window_size"])
        except ValueError:
            src_window = None
    notes = []
    as_2d = image_stream_as_2d(sd, src_window, model.window_size[1:])
    if as_2d is not None:
        sd, src_window = as_2d, None  # the tables are 2D now
        notes.append("image-only (BEVT-I) checkpoint: inflated its 2D patch embedding and dt=0 position tables")
    if src_window is not None and tuple(src_window) == tuple(model.window_size):
        src_window = None
    adapted, more = adapt_state_dict(sd, model, src_window=src_window)
    return path, adapted, notes + more


def nothing_fits(path: str, model: VideoSwinTransformer, notes: list[str]) -> ValueError:
    """The error for a checkpoint of which no backbone tensor fits ``model`` (``notes`` from
    :func:`checkpoint_for`): tensors of the model's names in other shapes point to another model size."""
    reshaped = [n for n in notes if _RESHAPED in n]
    if reshaped:
        return ValueError(f"{path}: no tensor of this checkpoint matches the model (embed dim {model.embed_dim}, "
                          f"depths {list(model.depths)}): {reshaped[0]}; is it a checkpoint of another model size? "
                          f"Set model.name to its size (bevt info --models)")
    return ValueError(f"{path}: no tensor of this checkpoint matches the model (is it a Swin / BEVT checkpoint?)")


def load_pretrained(model: VideoSwinTransformer, path: str, *, src_window=None, strict_backbone: bool = False
                    ) -> list[str]:
    """Load a backbone checkpoint (bevt, official BEVT/Video Swin, or 2D Swin) into ``model``, adapting it
    (:func:`checkpoint_for`). ``path``: a weights file, a bevt checkpoint folder or a bevt run folder (its latest
    checkpoint).

    Returns notes (what was inflated, resized, missing, dropped). Raises FileNotFoundError / ValueError
    with the reason for a missing or unusable file.
    """
    path, sd, notes = checkpoint_for(model, path, src_window=src_window)
    if not sd:
        raise nothing_fits(path, model, notes)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.startswith("head.")]
    if missing:
        notes.append(f"{len(missing)} model tensors not in the checkpoint (kept at init): {listing(missing)}")
        if strict_backbone:
            raise ValueError(f"{path}: missing backbone tensors: {missing}")
    return notes
