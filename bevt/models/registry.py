"""timm-style model registry: ``create_model("videoswin_base_patch244_window877", num_classes=400)``.

Names encode the settings: ``videoswin_<size>_patch<t><h><w>_window<d><h><w>``.
"""
from __future__ import annotations

import difflib
from typing import Callable

from bevt.models.video_swin import VideoSwinTransformer

# size: (embed_dim, depths, num_heads). "nano" is bevt's own: the embedded CPU default and the tests
# (head dim 32 as the real sizes, so it exercises the same kernels).
SIZES = {
    "nano": (32, (1, 1, 2, 1), (1, 2, 4, 8)),
    "tiny": (96, (2, 2, 6, 2), (3, 6, 12, 24)),
    "small": (96, (2, 2, 18, 2), (3, 6, 12, 24)),
    "base": (128, (2, 2, 18, 2), (4, 8, 16, 32)),
    "large": (192, (2, 2, 18, 2), (6, 12, 24, 48)),
}
WINDOWS = {"window877": (8, 7, 7), "window1677": (16, 7, 7)}

_REGISTRY: dict[str, Callable[..., VideoSwinTransformer]] = {}


def register_model(name: str, fn: Callable[..., VideoSwinTransformer]) -> None:
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    _REGISTRY[name] = fn


def _make(size: str, window: tuple[int, int, int]):
    embed_dim, depths, heads = SIZES[size]

    def build(**kwargs) -> VideoSwinTransformer:
        cfg = dict(patch_size=(2, 4, 4), embed_dim=embed_dim, depths=depths, num_heads=heads, window_size=window)
        cfg.update(kwargs)
        return VideoSwinTransformer(**cfg)

    return build


for _size in SIZES:
    for _wname, _win in WINDOWS.items():
        register_model(f"videoswin_{_size}_patch244_{_wname}", _make(_size, _win))


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def model_config(name: str) -> dict:
    """The architecture settings a name stands for (embed_dim, depths, num_heads, window_size)."""
    _check(name)
    size = name.split("_")[1]
    embed_dim, depths, heads = SIZES[size]
    return dict(embed_dim=embed_dim, depths=depths, num_heads=heads, window_size=WINDOWS[name.split("_")[-1]])


def _check(name: str) -> None:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}{hint} (bevt info --models lists them)")


def create_model(name: str, **kwargs) -> VideoSwinTransformer:
    """Build a registered backbone; keyword arguments override its settings (see VideoSwinTransformer)."""
    _check(name)
    return _REGISTRY[name](**kwargs)
