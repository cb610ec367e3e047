"""Shifted-window 3D attention with a relative position bias table (Video Swin's WindowAttention3D core).

Two entry points, same math:

* :func:`window_attention` takes q, k, v already partitioned into windows.
* :func:`window_attention_tokens` takes the qkv projection in token layout and returns the output in
  token layout; the pad, cyclic shift (roll), window partition and their reverses happen inside the op.
  The Swin blocks use this one, so a fast backend can skip those copies altogether.

Shape legend: B batch, D/H/W token grid (time, height, width), Dp/Hp/Wp padded grid, BW = B * windows,
nh heads, N tokens per window, d head dim, L table rows = (2Wd-1)(2Wh-1)(2Ww-1) of the table's window.

Semantics (official Video Swin / BEVT, see docs/ARCHITECTURE.md):
* bias[h, i, j] = table[index(i, j), h] with index from the coordinate difference of query i and key j,
  offset by the *table's* window (so a clamped or 2D window reads the right rows: an image window
  (1,7,7) reads the dt=0 slice of an (8,7,7) table).
* The shifted-window mask adds -100 (not -inf, as the official code) between tokens of different
  regions; regions come from each token's padded coordinate p on each shifted axis:
  p < Lp - w -> 0, Lp - w <= p < Lp - s -> 1, p >= Lp - s -> 2 (an axis with s = 0 is one region).
* In token layout, padded tokens have k, v = ``kv_pad`` (the qkv bias: the official block pads the
  normalized tokens with zeros *before* the qkv projection) and the output at padded positions is dropped.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import torch
import torch.nn.functional as F

from bevt.ops import backend as _be

OP = "window_attention"
MASK_VALUE = -100.0

Triple = tuple[int, int, int]


# ----------------------------------------------------------------------------- geometry helpers
def _triple(x: Sequence[int] | int, name: str) -> Triple:
    t = (x, x, x) if isinstance(x, int) else tuple(int(v) for v in x)
    if len(t) != 3:
        raise ValueError(f"{name} must have 3 entries (d, h, w), got {x!r}")
    return t  # type: ignore[return-value]


def table_length(table_window_size: Sequence[int]) -> int:
    wd, wh, ww = table_window_size
    return (2 * wd - 1) * (2 * wh - 1) * (2 * ww - 1)


@functools.lru_cache(maxsize=64)
def _relative_position_index_cpu(window_size: Triple, table_window_size: Triple) -> torch.Tensor:
    wd, wh, ww = window_size
    td, th, tw = table_window_size
    coords = torch.stack(torch.meshgrid(torch.arange(wd), torch.arange(wh), torch.arange(ww), indexing="ij")).flatten(1)
    rel = coords[:, :, None] - coords[:, None, :]  # 3, N, N: coordinate of query i minus key j
    return ((rel[0] + td - 1) * (2 * th - 1) * (2 * tw - 1) + (rel[1] + th - 1) * (2 * tw - 1) + (rel[2] + tw - 1))


def relative_position_index(window_size: Sequence[int], table_window_size: Sequence[int] | None = None,
                            device: torch.device | str | None = None) -> torch.Tensor:
    """(N, N) int64 row of the bias table for each (query, key) pair of a window.

    ``window_size`` is the effective (possibly clamped) window; ``table_window_size`` the window the
    table was built for (default: the same). Unlike the official ``index[:N, :N]`` slice, this is right
    for any clamped axis (the official slice is right only when the leading axis alone is clamped).
    """
    ws = _triple(window_size, "window_size")
    ts = _triple(table_window_size if table_window_size is not None else ws, "table_window_size")
    if any(w > t for w, t in zip(ws, ts)):
        raise ValueError(f"window {ws} is larger than the table's window {ts}")
    if device is None or torch.device(device).type == "cpu":
        return _relative_position_index_cpu(ws, ts)
    return _relative_position_index_on(ws, ts, str(torch.device(device)))


@functools.lru_cache(maxsize=64)
def _relative_position_index_on(window_size: Triple, table_window_size: Triple, device: str) -> torch.Tensor:
    # one copy per device: a host-to-device copy in every call is a host sync, and cannot be captured in a
    # CUDA graph (the copy would run once, at capture, into memory the graph then reuses)
    return _relative_position_index_cpu(window_size, table_window_size).to(device)


def region_ids(padded_size: Sequence[int], window_size: Sequence[int], shift_size: Sequence[int],
               device: torch.device | str | None = None) -> torch.Tensor:
    """(Dp, Hp, Wp) int64 region label of every padded token for the shifted-window mask."""
    labels = []
    for lp, w, s in zip(padded_size, window_size, shift_size):
        p = torch.arange(lp, device=device)
        lab = torch.zeros(lp, dtype=torch.long, device=device)
        if s > 0:
            lab = torch.where(p >= lp - w, 1, lab)
            lab = torch.where(p >= lp - s, 2, lab)
        labels.append(lab)
    return labels[0][:, None, None] * 9 + labels[1][None, :, None] * 3 + labels[2][None, None, :]


def window_mask(padded_size: Sequence[int], window_size: Sequence[int], shift_size: Sequence[int],
                device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """(nW, N, N) additive mask (0 / -100) of a shifted-window layer, or None when nothing is shifted."""
    if not any(shift_size):
        return None
    ids = region_ids(padded_size, window_size, shift_size, device)
    win = partition_windows(ids[None, ..., None], window_size)[..., 0]  # nW, N
    diff = win[:, None, :] != win[:, :, None]
    return torch.zeros(diff.shape, dtype=dtype, device=device).masked_fill_(diff, MASK_VALUE)


def partition_windows(x: torch.Tensor, window_size: Sequence[int]) -> torch.Tensor:
    """(B, Dp, Hp, Wp, *C) -> (B * nW, N, *C), windows in (d, h, w) raster order, tokens d-major."""
    B, D, H, W = x.shape[:4]
    wd, wh, ww = window_size
    rest = x.shape[4:]
    x = x.view(B, D // wd, wd, H // wh, wh, W // ww, ww, *rest)
    nr = len(rest)
    x = x.permute(0, 1, 3, 5, 2, 4, 6, *range(7, 7 + nr))
    return x.reshape(B * (D // wd) * (H // wh) * (W // ww), wd * wh * ww, *rest)


def reverse_windows(x: torch.Tensor, window_size: Sequence[int], B: int, padded_size: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`partition_windows`: (B * nW, N, *C) -> (B, Dp, Hp, Wp, *C)."""
    D, H, W = padded_size
    wd, wh, ww = window_size
    rest = x.shape[2:]
    nr = len(rest)
    x = x.view(B, D // wd, H // wh, W // ww, wd, wh, ww, *rest)
    x = x.permute(0, 1, 4, 2, 5, 3, 6, *range(7, 7 + nr))
    return x.reshape(B, D, H, W, *rest)


def padded_size(size: Sequence[int], window_size: Sequence[int]) -> Triple:
    return tuple(math.ceil(s / w) * w for s, w in zip(size, window_size))  # type: ignore[return-value]


# ----------------------------------------------------------------------------- reference
def window_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_table: torch.Tensor, *,
                         window_size: Sequence[int], table_window_size: Sequence[int] | None = None,
                         padded_grid: Sequence[int] | None = None, mask_shift_size: Sequence[int] = (0, 0, 0),
                         scale: float | None = None) -> torch.Tensor:
    """Reference window attention; the math of the official WindowAttention3D after the qkv projection.

    q, k, v: (BW, nh, N, d); bias_table: (L, nh). Returns (BW, nh, N, d) in q's dtype. Scores are
    formed in the input dtype (as the official code under AMP) and the softmax runs in fp32. Inputs are
    checked as by :func:`window_attention`.
    """
    ws, ts, _, ms, pg = check_inputs("window_attention_ref", (q, k, v), bias_table, window_size=window_size,
                                     table_window_size=table_window_size, mask_shift_size=mask_shift_size,
                                     padded_grid=padded_grid)
    return _windows_ref(q, k, v, bias_table, ws, ts, pg, ms, scale)


def _windows_ref(q, k, v, bias_table, ws: Triple, ts: Triple, padded_grid: Triple | None, ms: Triple,
                 scale: float | None) -> torch.Tensor:
    """:func:`window_attention_ref` on checked inputs."""
    BW, nh, N, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    idx = relative_position_index(ws, ts, q.device)
    bias = bias_table[idx.view(-1)].view(N, N, nh).permute(2, 0, 1)  # nh, N, N
    attn = (q * scale) @ k.transpose(-2, -1)
    attn = attn + bias.to(attn.dtype).unsqueeze(0)
    mask = window_mask(padded_grid, ws, ms, q.device) if padded_grid is not None else None
    if mask is not None and mask.shape[0]:  # (a grid with an axis of 0 tokens has no windows, nothing to mask)
        nW = mask.shape[0]
        attn = attn.view(BW // nW, nW, nh, N, N) + mask.to(attn.dtype)[None, :, None]
        attn = attn.view(BW, nh, N, N)
    low = attn.dtype in (torch.float16, torch.bfloat16)
    attn = attn.softmax(-1, dtype=torch.float32 if low else attn.dtype).to(v.dtype)
    return attn @ v


def window_attention_tokens_ref(qkv: torch.Tensor, bias_table: torch.Tensor, *, window_size: Sequence[int],
                                shift_size: Sequence[int] = (0, 0, 0), table_window_size: Sequence[int] | None = None,
                                kv_pad: torch.Tensor | None = None, mask_shift_size: Sequence[int] | None = None,
                                scale: float | None = None) -> torch.Tensor:
    """Reference token-layout window attention: pad, roll, partition, attend, reverse, roll back, crop.

    qkv: (B, D, H, W, 3, nh, d); kv_pad: (2, nh, d) or None (zeros). Returns (B, D, H, W, nh, d). Inputs
    are checked as by :func:`window_attention_tokens`.
    """
    ws, ts, ss, ms, _ = check_inputs("window_attention_tokens_ref", (qkv,), bias_table, window_size=window_size,
                                     table_window_size=table_window_size, shift_size=shift_size,
                                     mask_shift_size=mask_shift_size, kv_pad=kv_pad)
    return _tokens_ref(qkv, bias_table, ws, ts, ss, ms, kv_pad, scale)


def _tokens_ref(qkv, bias_table, ws: Triple, ts: Triple, ss: Triple, ms: Triple, kv_pad: torch.Tensor | None,
                scale: float | None) -> torch.Tensor:
    """:func:`window_attention_tokens_ref` on checked inputs."""
    B, D, H, W, three, nh, d = qkv.shape
    Dp, Hp, Wp = padded_size((D, H, W), ws)
    q, k, v = qkv.unbind(4)
    if (Dp, Hp, Wp) != (D, H, W):
        pad = (0, 0, 0, 0, 0, Wp - W, 0, Hp - H, 0, Dp - D)
        q = F.pad(q, pad)
        kv = torch.stack((k, v))
        fill = kv_pad if kv_pad is not None else kv.new_zeros(2, nh, d)
        full = fill.to(kv.dtype)[:, None, None, None, None].expand(2, B, Dp, Hp, Wp, nh, d).clone()
        full[:, :, :D, :H, :W] = kv
        k, v = full.unbind(0)
    if any(ss):
        dims = (1, 2, 3)
        shifts = tuple(-s for s in ss)
        q, k, v = (torch.roll(t, shifts=shifts, dims=dims) for t in (q, k, v))
    qw, kw, vw = (partition_windows(t, ws).transpose(1, 2) for t in (q, k, v))  # BW, nh, N, d
    ow = _windows_ref(qw, kw, vw, bias_table, ws, ts, (Dp, Hp, Wp), ms, scale)
    o = reverse_windows(ow.transpose(1, 2), ws, B, (Dp, Hp, Wp))
    if any(ss):
        o = torch.roll(o, shifts=tuple(ss), dims=(1, 2, 3))
    return o[:, :D, :H, :W]


# ----------------------------------------------------------------------------- capabilities
CAPABILITIES = {
    # float64 too: the reference is what the kernels' fp32 results are checked against
    "ref": _be.Capabilities(devices=("cpu", "cuda"),
                            dtypes=(torch.float32, torch.float16, torch.bfloat16, torch.float64),
                            notes=("any shape",)),
    # fp32 runs with exact fp32 products (no tf32): correct but several times slower than bf16/fp16.
    # tolerances: the kernel's max and mean error against the fp32 reference may be at most these multiples
    # of the same-dtype reference's error (fp32 inputs: against a float64 reference, relative to its scale).
    "triton": _be.Capabilities(devices=("cuda", "interpreter"), dtypes=(torch.float16, torch.bfloat16, torch.float32),
                               min_compute_capability=(8, 0),
                               notes=("forward and backward bitwise deterministic (no atomics)",
                                      "token layout: pad, roll and window partition by index arithmetic"),
                               extra={"head_dims": (16, 32, 64), "max_window_tokens": 16 * 7 * 7,
                                      "deterministic": True,
                                      "tolerances": {"out": 2.0, "grad": 3.0, "fp32_rel": 2e-5}}),
}
# dtypes some backend runs (the op refuses others outright; each backend's predicate checks its own list)
SUPPORTED_DTYPES = tuple(dict.fromkeys(dt for caps in CAPABILITIES.values() for dt in caps.dtypes))


def _dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    return ", ".join(str(dt).replace("torch.", "") for dt in dtypes)


def can_run_ref(*args, raise_error: bool = False, **kwargs) -> bool:
    return True


def _triton_reasons(dtype: torch.dtype, head_dim: int, n_tokens: int, tensors: Sequence[torch.Tensor]) -> list[str]:
    caps = CAPABILITIES["triton"]
    reasons = _be.triton_kernel_reasons("window_attention", caps, *tensors)
    if dtype not in caps.dtypes:
        reasons.append(f"dtype must be one of {_dtype_names(caps.dtypes)}, got {_dtype_names([dtype])}")
    if head_dim not in caps.extra["head_dims"]:
        reasons.append(f"head dim must be one of {caps.extra['head_dims']}, got {head_dim}")
    if n_tokens > caps.extra["max_window_tokens"]:
        reasons.append(f"window has {n_tokens} tokens, at most {caps.extra['max_window_tokens']} supported")
    return reasons


def can_run_triton(q: torch.Tensor, bias_table: torch.Tensor, *, window_size: Sequence[int],
                   table_window_size: Sequence[int] | None = None, raise_error: bool = False, **_) -> bool:
    """Can the Triton kernel run windowed-layout q (BW, nh, N, d) with this table? (NATTEN-style predicate)"""
    ws = _triple(window_size, "window_size")
    return _be.verdict(OP, "triton", _triton_reasons(q.dtype, q.shape[-1], math.prod(ws), (q, bias_table)),
                       raise_error)


# ----------------------------------------------------------------------------- input checks
def _sizes(value, name: str, entry: str, minimum: int) -> Triple:
    """A (d, h, w) argument (an int means all three axes), each entry >= ``minimum``."""
    try:
        sizes = _triple(value, name)
    except (TypeError, ValueError):
        raise ValueError(f"{entry}: {name} must be an int or 3 ints (d, h, w), got {value!r}") from None
    if any(x < minimum for x in sizes):
        raise ValueError(f"{entry}: {name} must be >= {minimum} on every axis, got {sizes}")
    return sizes


def check_inputs(entry: str, qkv: Sequence[torch.Tensor], bias_table: torch.Tensor, *, window_size: Sequence[int],
                 table_window_size: Sequence[int] | None = None, shift_size: Sequence[int] = (0, 0, 0),
                 mask_shift_size: Sequence[int] | None = None, padded_grid: Sequence[int] | None = None,
                 kv_pad: torch.Tensor | None = None) -> tuple[Triple, Triple, Triple, Triple, Triple | None]:
    """The one validation of both layouts' entry points, whatever the backend: bad input raises ValueError
    "<entry>: <argument> ..., got <value>" here, before a backend is chosen, so every backend refuses the
    same inputs with the same message (the backends' predicates only say what *they* cannot run).

    ``qkv`` is ``(q, k, v)`` (windowed layout, each (BW, nh, N, d)) or ``(qkv,)`` (token layout,
    (B, D, H, W, 3, nh, d)). Returns (window, table window, shift, mask shift, padded grid or None) as
    triples; the mask shift defaults to the shift, and the padded grid is returned only when a mask applies.
    """
    tokens = len(qkv) == 1
    names = ("qkv",) if tokens else ("q", "k", "v")
    ws = _sizes(window_size, "window_size", entry, minimum=1)
    ts = ws if table_window_size is None else _sizes(table_window_size, "table_window_size", entry, minimum=1)
    ss = _sizes(shift_size, "shift_size", entry, minimum=0)
    ms = ss if mask_shift_size is None else _sizes(mask_shift_size, "mask_shift_size", entry, minimum=0)
    for name, shift in (("shift_size", ss), ("mask_shift_size", ms)):
        if any(s >= w for s, w in zip(shift, ws)):
            raise ValueError(f"{entry}: {name} must be smaller than the window {ws} on every axis, got {shift}")
    if any(w > t for w, t in zip(ws, ts)):
        raise ValueError(f"{entry}: window_size {ws} is larger than the table's window (table_window_size) {ts}")

    first = qkv[0]
    if tokens:
        if first.dim() != 7 or first.shape[4] != 3:
            raise ValueError(f"{entry}: qkv must be (B, D, H, W, 3, heads, head_dim), got {tuple(first.shape)}")
        nh, d = first.shape[5], first.shape[6]
    else:
        if first.dim() != 4:
            raise ValueError(f"{entry}: q must be (windows, heads, tokens, head_dim), got shape {tuple(first.shape)}")
        if any(t.shape != first.shape for t in qkv):
            shapes = ", ".join(str(tuple(t.shape)) for t in qkv)
            raise ValueError(f"{entry}: q, k, v must have one shape, got {shapes}")
        nh, d = first.shape[1], first.shape[3]
        if first.shape[2] != math.prod(ws):
            raise ValueError(f"{entry}: q has {first.shape[2]} tokens per window, window {ws} has {math.prod(ws)}")
    if d < 1:  # also keeps the default scale d ** -0.5 finite
        raise ValueError(f"{entry}: head dim (last axis of {', '.join(names)}) must be >= 1, got {d}")

    dtypes = [t.dtype for t in qkv]
    if len(set(dtypes)) > 1:
        raise ValueError(f"{entry}: q, k, v must have one dtype, got {_dtype_names(dtypes)}")
    if first.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{entry}: dtype {_dtype_names([first.dtype])} of {', '.join(names)} is not supported; "
                         f"supported: {_dtype_names(SUPPORTED_DTYPES)}")

    if bias_table.dim() != 2 or bias_table.shape[1] != nh:
        raise ValueError(f"{entry}: bias_table must be (L, {nh}) (L table rows, one column per head), "
                         f"got {tuple(bias_table.shape)}")
    if bias_table.shape[0] != table_length(ts):
        raise ValueError(f"{entry}: bias_table has {bias_table.shape[0]} rows but a table for window {ts} needs "
                         f"{table_length(ts)}")
    # the table and kv_pad may differ from qkv in dtype (fp32 parameters under autocast): floating point only
    if not bias_table.is_floating_point():
        raise ValueError(f"{entry}: bias_table must be floating point, got {_dtype_names([bias_table.dtype])}")
    tensors = [*qkv, bias_table]
    if kv_pad is not None:
        if tuple(kv_pad.shape) != (2, nh, d):
            raise ValueError(f"{entry}: kv_pad must be (2, {nh}, {d}), got {tuple(kv_pad.shape)}")
        if not kv_pad.is_floating_point():
            raise ValueError(f"{entry}: kv_pad must be floating point, got {_dtype_names([kv_pad.dtype])}")
        tensors.append(kv_pad)
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        all_names = [*names, "bias_table"] + (["kv_pad"] if kv_pad is not None else [])
        raise ValueError(f"{entry}: all tensors must be on one device, got " +
                         ", ".join(f"{n} on {t.device}" for n, t in zip(all_names, tensors)))

    pg = None
    if any(ms) and not tokens:  # the token layout derives its padded grid from qkv
        if padded_grid is None:
            raise ValueError(f"{entry}: padded_grid is required when mask_shift_size is non-zero")
        pg = _sizes(padded_grid, "padded_grid", entry, minimum=1)
        nW = math.prod(p // w for p, w in zip(pg, ws))
        if any(p % w for p, w in zip(pg, ws)) or first.shape[0] % nW:
            raise ValueError(f"{entry}: padded_grid {pg} is not tiled by window {ws} into a divisor of "
                             f"{first.shape[0]} windows")
    return ws, ts, ss, ms, pg


# ----------------------------------------------------------------------------- public ops
def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_table: torch.Tensor, *,
                     window_size: Sequence[int], table_window_size: Sequence[int] | None = None,
                     padded_grid: Sequence[int] | None = None, mask_shift_size: Sequence[int] = (0, 0, 0),
                     scale: float | None = None, backend: str | None = None) -> torch.Tensor:
    """Attention inside windows with relative position bias and the shifted-window mask.

    Args:
        q, k, v: (BW, nh, N, d), windows of B samples in :func:`partition_windows` order; one dtype.
        bias_table: (L, nh) relative position bias table of ``table_window_size``.
        window_size: effective window (wd, wh, ww), N = wd * wh * ww.
        table_window_size: window the table was built for (default ``window_size``).
        padded_grid: (Dp, Hp, Wp) padded token grid the windows tile; needed when a mask is used.
        mask_shift_size: shift whose region mask applies (0 on every axis: no mask; else 0 <= shift < window).
        scale: score scale (default d ** -0.5).
        backend: None (default/auto), "ref" or "triton".
    Returns:
        (BW, nh, N, d) in the dtype of q (empty when q is).
    Raises:
        ValueError for bad input (see :func:`check_inputs`); BackendUnavailable when the requested
        backend cannot run it.
    """
    ws, ts, _, ms, pg = check_inputs("window_attention", (q, k, v), bias_table, window_size=window_size,
                                     table_window_size=table_window_size, mask_shift_size=mask_shift_size,
                                     padded_grid=padded_grid)
    name = _be.choose(OP, backend, {
        "triton": lambda r: can_run_triton(q, bias_table, window_size=ws, table_window_size=ts, raise_error=r),
        "ref": lambda r: True,
    })
    # no windows or no heads: nothing to compute, and the kernels' launch grids cannot be empty; the reference
    # gives the empty output and the zero gradients exactly
    if name == "triton" and q.numel() > 0:
        from bevt.kernels import window_attention as kern

        return kern.window_attention(q, k, v, bias_table, window_size=ws, table_window_size=ts,
                                     padded_grid=pg, mask_shift_size=ms, scale=scale)
    return _windows_ref(q, k, v, bias_table, ws, ts, pg, ms, scale)


def window_attention_tokens(qkv: torch.Tensor, bias_table: torch.Tensor, *, window_size: Sequence[int],
                            shift_size: Sequence[int] = (0, 0, 0), table_window_size: Sequence[int] | None = None,
                            kv_pad: torch.Tensor | None = None, mask_shift_size: Sequence[int] | None = None,
                            scale: float | None = None, backend: str | None = None) -> torch.Tensor:
    """Shifted-window attention in token layout (no pad/roll/partition copies on fast backends).

    Args:
        qkv: (B, D, H, W, 3, nh, d), the qkv projection of the (unpadded) tokens.
        bias_table: (L, nh).
        window_size: effective window (already clamped to the grid, as ``get_window_size`` does).
        shift_size: cyclic shift of this block (0 for unshifted blocks; else 0 <= shift < window).
        table_window_size: window the table was built for (default ``window_size``).
        kv_pad: (2, nh, d) k and v of padded tokens (the qkv bias), or None for zeros.
        mask_shift_size: shift whose region mask applies; default ``shift_size``. (Differs only in the
            official image-stream quirk, where unshifted blocks still apply the shifted mask.)
        backend: None (default/auto), "ref" or "triton".
    Returns:
        (B, D, H, W, nh, d) in qkv's dtype (empty when qkv is).
    Raises:
        ValueError for bad input (see :func:`check_inputs`); BackendUnavailable when the requested
        backend cannot run it.
    """
    ws, ts, ss, ms, _ = check_inputs("window_attention_tokens", (qkv,), bias_table, window_size=window_size,
                                     table_window_size=table_window_size, shift_size=shift_size,
                                     mask_shift_size=mask_shift_size, kv_pad=kv_pad)
    d = qkv.shape[6]
    name = _be.choose(OP, backend, {
        "triton": lambda r: _be.verdict(OP, "triton", _triton_reasons(qkv.dtype, d, math.prod(ws), (qkv, bias_table)), r),
        "ref": lambda r: True,
    })
    # an empty grid (batch, D, H or W of 0) or no heads: as in window_attention, the reference gives the result
    if name == "triton" and qkv.numel() > 0:
        from bevt.kernels import window_attention as kern

        return kern.window_attention_tokens(qkv, bias_table, window_size=ws, shift_size=ss, table_window_size=ts,
                                            kv_pad=kv_pad, mask_shift_size=ms, scale=scale)
    return _tokens_ref(qkv, bias_table, ws, ts, ss, ms, kv_pad, scale)


def backend_status() -> dict[str, tuple[bool, str]]:
    """Environment-level availability of each backend (for ``bevt info``)."""
    return {"triton": _be.triton_kernel_status("window_attention"), "ref": (True, "")}
