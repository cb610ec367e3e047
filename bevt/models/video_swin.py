"""Video Swin Transformer with a 3D path for clips and a 2D path for images through the same modules.

Shape legend: B batch, C channels, T frames, D/H/W token grid (time, height, width), nh heads, d head dim.
Tokens stay channels-last, (B, D, H, W, C), from the patch embedding to the last stage; an image is a
clip of one token-frame (D = 1), so its windows are (1, 7, 7) and its attention reads the dt = 0 slice
of each block's 3D relative position table, exactly as the official image stream does.

Faithful to the official Video Swin / BEVT backbone (REFERENCE_BEVT.md section 1) with three deliberate
choices, documented in docs/ARCHITECTURE.md:
* ``image_quirks=False`` (default) gives images the video path's window logic (clamped windows, no
  shift where the grid fits in one window, the shift mask only in shifted blocks). ``image_quirks=True``
  reproduces the official image stream: the shifted-window mask in every block, and the shift and mask
  kept at stage 4 (needed to match the released BEVT checkpoints bit for bit).
* The bias-table index of a clamped window is computed for that window (the official ``index[:N, :N]``
  slice is wrong when a non-leading axis is clamped; identical in every official setting).
* Gradient checkpointing works for both streams (the official call drops the image flag).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from bevt.ops.window_attention import table_length, window_attention_tokens


def get_window_size(x_size: Sequence[int], window_size: Sequence[int], shift_size: Sequence[int] | None = None):
    """Clamp the window to the grid on axes where the grid fits in one window, and drop the shift there."""
    ws = list(window_size)
    ss = list(shift_size) if shift_size is not None else None
    for i, (x, w) in enumerate(zip(x_size, window_size)):
        if x <= w:
            ws[i] = x
            if ss is not None:
                ss[i] = 0
    return (tuple(ws), tuple(ss)) if ss is not None else tuple(ws)


class DropPath(nn.Module):
    """Stochastic depth per sample.

    The keep probability lives in a (non-persistent) buffer, not a Python float: ``torch.compile`` treats
    a float attribute as a constant, and the linearly increasing rates would give every block a graph of
    its own (the compiled blocks of one geometry then could not share their code).
    """

    def __init__(self, p: float = 0.0):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop path rate must be in [0, 1), got {p}")
        self.p = p  # for the repr only: forward reads ``active`` (a bool: two graphs at most) and the buffer
        self.active = p > 0.0
        self.register_buffer("keep_prob", torch.tensor(1.0 - p), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.active and self.training):
            return x
        keep = self.keep_prob.float()
        mask = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), device=x.device) < keep
        return (x * (mask / keep)).to(x.dtype)  # the scale in fp32, one rounding, as x / keep_prob

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class WindowAttention3D(nn.Module):
    """qkv projection, shifted-window attention with relative position bias, output projection.

    ``relative_position_bias_table`` is (L, nh) for this module's full window; a clamped or image
    window reads its own rows of it (see :func:`bevt.ops.window_attention.relative_position_index`).
    """

    def __init__(self, dim: int, window_size: Sequence[int], num_heads: int, qkv_bias: bool = True,
                 qk_scale: float | None = None, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim, self.num_heads = dim, num_heads
        self.window_size = tuple(window_size)
        self.head_dim = dim // num_heads
        self.scale = qk_scale or self.head_dim ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros(table_length(self.window_size), num_heads))
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x_BDHWC: torch.Tensor, window_size, shift_size, mask_shift_size=None) -> torch.Tensor:
        B, D, H, W, C = x_BDHWC.shape
        qkv = self.qkv(x_BDHWC).view(B, D, H, W, 3, self.num_heads, self.head_dim)
        # The official block pads the normalized tokens with zeros before the qkv projection, so a padded
        # token's k and v equal the qkv bias (and pass gradients to it).
        kv_pad = self.qkv.bias.view(3, self.num_heads, self.head_dim)[1:] if self.qkv.bias is not None else None
        o = window_attention_tokens(qkv, self.relative_position_bias_table, window_size=window_size,
                                    shift_size=shift_size, table_window_size=self.window_size, kv_pad=kv_pad,
                                    mask_shift_size=mask_shift_size, scale=self.scale)
        return self.proj_drop(self.proj(o.reshape(B, D, H, W, C)))


class SwinTransformerBlock3D(nn.Module):
    """Pre-norm block: x + drop_path(attn(norm1(x))), then x + drop_path(mlp(norm2(x)))."""

    def __init__(self, dim: int, num_heads: int, window_size: Sequence[int], shift_size: Sequence[int],
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, qk_scale: float | None = None, drop: float = 0.0,
                 drop_path: float = 0.0):
        super().__init__()
        self.window_size = tuple(window_size)
        self.shift_size = tuple(shift_size)
        if any(s >= w for s, w in zip(self.shift_size, self.window_size) if s):
            raise ValueError(f"shift {self.shift_size} must be smaller than the window {self.window_size}")
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention3D(dim, window_size, num_heads, qkv_bias, qk_scale, drop)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def window_geometry(self, grid: Sequence[int], image_quirks: bool = False):
        """(window, roll shift, mask shift) of this block for a token grid (D, H, W)."""
        if image_quirks:
            # Official image stream: a 7x7 window never clamped, the half-window mask in *every* block and
            # the roll only in shifted blocks, also at stage 4 where one window covers the grid.
            window = (1,) + self.window_size[1:]
            mask_shift = (0,) + tuple(w // 2 for w in self.window_size[1:])
            shift = mask_shift if any(self.shift_size) else (0, 0, 0)
            return window, shift, mask_shift
        window, shift = get_window_size(grid, self.window_size, self.shift_size)
        return window, shift, shift

    def forward(self, x_BDHWC: torch.Tensor, image_quirks: bool = False) -> torch.Tensor:
        window, shift, mask_shift = self.window_geometry(x_BDHWC.shape[1:4], image_quirks)
        x = x_BDHWC + self.drop_path(self.attn(self.norm1(x_BDHWC), window, shift, mask_shift))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2 spatial merge (time kept): concat 4 neighbours (4C), LayerNorm, Linear 4C -> 2C without bias."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, D, H, W, C = x.shape
        if H % 2 or W % 2:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        x = torch.cat([x[:, :, 0::2, 0::2], x[:, :, 1::2, 0::2], x[:, :, 0::2, 1::2], x[:, :, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x))


class BasicLayer(nn.Module):
    """One stage: ``depth`` blocks alternating unshifted / half-window-shifted, then optional merging."""

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: Sequence[int], mlp_ratio: float,
                 qkv_bias: bool, qk_scale: float | None, drop: float, drop_path: Sequence[float], downsample: bool):
        super().__init__()
        shift = tuple(w // 2 for w in window_size)
        self.blocks = nn.ModuleList([
            SwinTransformerBlock3D(dim, num_heads, window_size, (0, 0, 0) if i % 2 == 0 else shift, mlp_ratio,
                                   qkv_bias, qk_scale, drop, drop_path[i])
            for i in range(depth)])
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: torch.Tensor, image_quirks: bool = False, checkpointing: bool = False):
        """Returns (stage output before merging, input of the next stage)."""
        for blk in self.blocks:
            if checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(blk, x, image_quirks, use_reentrant=False)
            else:
                x = blk(x, image_quirks)
        return x, (self.downsample(x) if self.downsample is not None else x)


class PatchEmbed(nn.Module):
    """Non-overlapping patches + LayerNorm, channels-last output (B, D, H, W, C).

    The 3D embed (Conv3d, patch (2, 4, 4)) pads T, H, W up to patch multiples as the official one; the 2D
    embed (Conv2d, patch 4) is the image stream's own weights (``patch_embed_2d``) and gives D = 1.
    """

    def __init__(self, patch_size: Sequence[int], in_chans: int, embed_dim: int, patch_norm: bool = True,
                 two_d: bool = False):
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.two_d = two_d
        conv = nn.Conv2d if two_d else nn.Conv3d
        ps = self.patch_size[1:] if two_d else self.patch_size
        self.proj = conv(in_chans, embed_dim, kernel_size=ps, stride=ps)
        self.norm = nn.LayerNorm(embed_dim) if patch_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ps = self.patch_size[1:] if self.two_d else self.patch_size
        pads = []
        for size, p in zip(reversed(x.shape[2:]), reversed(ps)):
            pads += [0, (-size) % p]
        if any(pads):
            x = F.pad(x, pads)
        x = self.proj(x)
        x = x.unsqueeze(2) if self.two_d else x  # B, C, D, H, W
        x = x.permute(0, 2, 3, 4, 1)
        return self.norm(x) if self.norm is not None else x


def _expand_mask(mask: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """Nearest-upsample a (B, Dm, Hm, Wm) mask to the token grid (as the official F.interpolate 'nearest')."""
    if tuple(mask.shape[1:]) == tuple(grid):
        return mask
    if any(g % m for g, m in zip(grid, mask.shape[1:])):
        raise ValueError(f"mask grid {tuple(mask.shape[1:])} does not divide the token grid {tuple(grid)}")
    return F.interpolate(mask[:, None].float(), size=tuple(grid), mode="nearest")[:, 0] > 0.5


class VideoSwinTransformer(nn.Module):
    """Video Swin backbone (+ optional image stream, mask token and classification head).

    Args:
        patch_size, embed_dim, depths, num_heads, window_size, mlp_ratio, qkv_bias, qk_scale, drop_rate,
        drop_path_rate, patch_norm: as Video Swin.
        video_stream / image_stream: build the 3D / 2D patch embedding.
        mask_token: learnable token substituted at masked positions (BEVT pretraining).
        image_quirks: reproduce the official image-stream window quirks (see module docstring).
        grad_checkpointing: recompute each block in backward (both streams).
        num_classes: > 0 adds the fine-tuning head (average pool, dropout ``head_dropout``, linear).
    """

    def __init__(self, *, patch_size=(2, 4, 4), in_chans: int = 3, embed_dim: int = 96, depths=(2, 2, 6, 2),
                 num_heads=(3, 6, 12, 24), window_size=(8, 7, 7), mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 qk_scale: float | None = None, drop_rate: float = 0.0, drop_path_rate: float = 0.2,
                 patch_norm: bool = True, video_stream: bool = True, image_stream: bool = False,
                 mask_token: bool = False, image_quirks: bool = False, grad_checkpointing: bool = False,
                 num_classes: int = 0, head_dropout: float = 0.5):
        super().__init__()
        if len(depths) != len(num_heads):
            raise ValueError(f"depths {depths} and num_heads {num_heads} must have the same length")
        if not (video_stream or image_stream):
            raise ValueError("at least one of video_stream / image_stream must be enabled")
        self.patch_size, self.window_size = tuple(patch_size), tuple(window_size)
        self.embed_dim, self.depths, self.num_heads = embed_dim, tuple(depths), tuple(num_heads)
        self.num_layers = len(depths)
        self.num_features = embed_dim * 2 ** (self.num_layers - 1)
        self.image_quirks = image_quirks
        self.grad_checkpointing = grad_checkpointing
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, patch_norm) if video_stream else None
        self.patch_embed_2d = PatchEmbed(patch_size, in_chans, embed_dim, patch_norm, two_d=True) if image_stream else None
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if mask_token else None
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.layers = nn.ModuleList()
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            self.layers.append(BasicLayer(embed_dim * 2 ** i, depth, heads, window_size, mlp_ratio, qkv_bias, qk_scale,
                                          drop_rate, dpr[sum(depths[:i]):sum(depths[:i + 1])],
                                          downsample=i < self.num_layers - 1))
        self.norm = nn.LayerNorm(self.num_features)
        self.num_classes = num_classes
        if num_classes > 0:
            self.head_drop = nn.Dropout(head_dropout)
            self.head = nn.Linear(self.num_features, num_classes)
        self.apply(_init_weights)
        if self.mask_token is not None:
            nn.init.trunc_normal_(self.mask_token, std=0.02)

    def embed(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Patch-embed a clip (B, 3, T, H, W) or image batch (B, 3, H, W); substitute the mask token.

        mask: (B, Dm, Hm, Wm) for clips or (B, Hm, Wm) for images, bool, at a grid dividing the token
        grid (BEVT: 8x14x14 / 14x14, nearest-upsampled to 8x56x56 / 56x56).
        """
        if x.dim() == 5:
            if self.patch_embed is None:
                raise ValueError("this model has no video stream (built with video_stream=False)")
            tokens = self.patch_embed(x)
        elif x.dim() == 4:
            if self.patch_embed_2d is None:
                raise ValueError("this model has no image stream (built with image_stream=False)")
            tokens = self.patch_embed_2d(x)
            mask = mask[:, None] if mask is not None and mask.dim() == 3 else mask
        else:
            raise ValueError(f"expected a clip (B, C, T, H, W) or images (B, C, H, W), got shape {tuple(x.shape)}")
        if mask is not None:
            if self.mask_token is None:
                raise ValueError("a mask was given but the model has no mask token (build with mask_token=True)")
            if mask.dim() != 4 or mask.shape[0] != x.shape[0]:
                raise ValueError(f"mask must be (B, D, H, W) / (B, H, W) with B={x.shape[0]}, got {tuple(mask.shape)}")
            m = _expand_mask(mask, tokens.shape[1:4])[..., None].to(tokens.dtype)
            tokens = tokens * (1 - m) + self.mask_token.to(tokens.dtype) * m
        return self.pos_drop(tokens)

    def forward_stages(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Per-stage outputs before merging, each (B, D, H_i, W_i, C_i); D = 1 for images."""
        quirks = self.image_quirks and x.dim() == 4
        h = self.embed(x, mask)
        outs = []
        for layer in self.layers:
            out, h = layer(h, quirks, self.grad_checkpointing and self.training)
            outs.append(out)
        return outs

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized last-stage tokens (B, D, H, W, C)."""
        return self.norm(self.forward_stages(x)[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (B, num_classes) when the model has a head, else pooled features (B, C)."""
        pooled = self.forward_features(x).mean(dim=(1, 2, 3))
        if self.num_classes > 0:
            return self.head(self.head_drop(pooled))
        return pooled


def compile_blocks(model: nn.Module, **compile_kwargs) -> int:
    """``torch.compile`` every Swin block and patch merging of ``model`` in place; returns how many.

    Compiling block by block rather than the whole model: the compiled code is shared by every block
    of the same geometry (one graph per stream, stage, shift and drop path on or off, instead of one
    graph per stream with every block unrolled), so compilation takes seconds per graph, and it composes with
    gradient checkpointing and DDP unchanged. The custom ops (window attention) trace without a graph
    break. Shapes are static (``dynamic=False`` unless given): each geometry gets its own kernels.
    """
    import torch._dynamo

    compile_kwargs.setdefault("dynamic", False)
    n = 0
    for m in model.modules():
        if isinstance(m, (SwinTransformerBlock3D, PatchMerging)):
            m.compile(**compile_kwargs)
            n += 1
    # Every block shares one code object, so all geometries count against one cache: make room for them.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return n


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
