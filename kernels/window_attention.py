"""Fused shifted-window 3D attention with relative position bias (Triton), forward and backward.

Public entry points (called by :mod:`bevt.ops.window_attention` for ``backend="triton"``):

* :func:`window_attention` (q, k, v (BW, nh, N, d) windows) -> (BW, nh, N, d)
* :func:`window_attention_tokens` (qkv (B, D, H, W, 3, nh, d) token layout) -> (B, D, H, W, nh, d): pad,
  roll and window partition happen by coordinate arithmetic inside the kernels, nothing is copied.

Both are ``torch.library.custom_op`` s (``bevt::window_attention_{windows,tokens}_{fwd,bwd}``) with fake
implementations and registered autograd, so ``torch.compile`` traces through them without graph breaks.
Differentiable w.r.t. q, k, v (qkv), the bias table and kv_pad. Every kernel writes each output once,
without atomics: outputs and all gradients (the bias-table gradient included) are bitwise deterministic.

Shape legend: B batch, D/H/W token grid, BW windows, nh heads, N tokens per window, d head dim,
L table rows. See ``_window_attention_triton`` for the kernels.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import torch

from bevt.kernels import _window_attention_triton as _k
from bevt.kernels._launch import CachedKernel
from bevt.ops import backend as _be

LOG2E = _k.LOG2E


# ----------------------------------------------------------------------------- launch configuration
@dataclasses.dataclass(frozen=True)
class Config:
    """Tile sizes and warps of the three main kernels (pinned: no autotuning, no compile-time search)."""

    fwd_bm: int = 64
    fwd_bn: int = 64
    fwd_warps: int = 4
    fwd_stages: int = 2
    dq_bm: int = 64
    dq_bn: int = 64
    dq_warps: int = 4
    dq_stages: int = 2
    db_bm: int = 64  # bias-gradient kernel: one fp32 register tile per (query tile, key tile) pair
    db_bn: int = 64
    db_warps: int = 4
    db_stages: int = 2
    kv_bm: int = 64
    kv_bn: int = 64
    kv_warps: int = 4
    kv_stages: int = 2
    # target programs per kernel: sets the windows each program loops over. Session 15 (H100, per-kernel times of
    # every Swin-B stage at targets 256-8192, benchmarks/results/window_attention_grid.json): the forward, dQ and
    # dK/dV kernels run fastest with one to four windows per program (4096), the bias-gradient kernel with as
    # few ranges as fill the GPU once (256: fewer partial planes to write and sum), the one-tile backward at 512.
    # Against the session-13 targets (1024, 1024, 2048, 1024 and 1024), same run, fwd + bwd (graph): stage 1
    # 1.615 -> 1.513 ms, stage 3 0.530 -> 0.463, stage 4 0.352 -> 0.300, image stage 3 0.124 -> 0.117
    fwd_programs: int = 4096
    dq_programs: int = 4096
    db_programs: int = 256  # (the bias-gradient kernel's ranges also set how many partials exist)
    # ... and where masked tiles are skipped along D (shifted blocks with two or more windows along D:
    # fine-tuning's 32-frame clips), the separated tile pairs have no work in the suffix of the window order
    # (the last windows along D), so two ranges leave half their programs idle. Session 17 (H100, ft_stage1
    # shifted, fwd + bwd, graph): target 256 2.76 ms, 512 2.67, 1024 2.64, 2048 2.60, 4096-16384 2.60
    # (the partials' byte cap); the pretraining stages, which have nothing to skip, keep 256 (2048: +2-7 %)
    db_programs_skipping: int = 2048
    kv_programs: int = 4096
    dbp_max_bytes: int = 64 << 20  # cap of the bias-gradient partials (fewer ranges if exceeded)
    # skip the tiles the shift mask along D leaves fully masked (``_live_tiles``): a third of the tiles of the last
    # window along D, a sixth of a shifted video block's
    skip_masked_tiles: bool = True
    # windows that fit one tile of the dQ kernel (N <= 64: the image path) get the one-pass backward kernel
    # (dQ, dK, dV and the partials from one recompute of P) instead of the three backward kernels
    one_tile_backward: bool = True
    win_warps: int = 4
    win_stages: int = 2
    win_programs: int = 512
    # it holds P, dS, the bias-gradient partial and three gradients at once. Session 7: uncapped (255 registers,
    # 2 CTAs per SM) 0.41 ms img stage 1 fwd+bwd, a cap of 168 0.54 (476 B of spills). After the session-11/12
    # instruction cuts (session 13, H100): uncapped 0.377, 168 0.366 (48 B), 128 0.364 ms (84 B, 4 CTAs).
    # Head dim > 32 and fp32 inputs keep the compiler's choice (``_register_cap``: not measured there)
    win_maxnreg: int = 128
    # register caps per thread of the four multi-tile kernels (0: the compiler's choice). A CTA is 4 warps, so
    # <= 168 registers give 3 CTAs per SM and <= 128 give 4. 168 for all four was 13 % faster than no cap in
    # session 7, when every kernel took 240-255 (2 CTAs). Since session 11 the forward fits 128 without spills
    # and dQ spills 28 bytes outside its key loop (sm_90, bf16, head dim 32), so both take 4 CTAs: fwd+bwd
    # 1.69 -> 1.60 ms at stage 1 and 0.586 -> 0.529 at stage 3 against 168 for all four (session 13, H100).
    # The bias-gradient and dK/dV kernels spill in their inner loops at 128 (dK/dV at 128 was 20 % slower in
    # session 7). A cap below 168 applies to 16-bit inputs of head dim <= 32 only (``_register_cap``)
    fwd_maxnreg: int = 128
    dq_maxnreg: int = 128
    db_maxnreg: int = 168
    kv_maxnreg: int = 168


GPU_CONFIG = Config()
# the interpreter runs programs one by one in numpy: small tiles exercise the tail logic at little cost
INTERPRETER_CONFIG = Config(fwd_programs=1, dq_programs=1, db_programs=1, db_programs_skipping=1, kv_programs=1,
                            win_programs=1)
_config_override: Config | None = None


def set_config(config: Config | None) -> None:
    """Override the launch configuration (benchmark sweeps); None restores the defaults."""
    global _config_override
    _config_override = config


def _config(device: torch.device, n_tokens: int) -> Config:
    if _config_override is not None:
        return _config_override
    return INTERPRETER_CONFIG if device.type == "cpu" else GPU_CONFIG


def _split(n: int, block: int) -> tuple[int, int]:
    """(full tiles, tail tile size or 0): n tokens as full tiles of `block` plus one power-of-2 tail >= 16."""
    full = n // block
    rem = n - full * block
    return full, (0 if rem == 0 else max(16, triton_next_pow2(rem)))


def triton_next_pow2(x: int) -> int:
    return 1 << (x - 1).bit_length()


def _windows_per_program(bw: int, programs_per_range: int, target_programs: int) -> int:
    """Windows each program loops over: a divisor of bw giving about target_programs programs."""
    ranges = max(1, min(bw, -(-target_programs // programs_per_range)))
    return _largest_divisor_at_most(bw, -(-bw // ranges))


def _largest_divisor_at_most(n: int, cap: int) -> int:
    cap = max(1, min(n, cap))
    for d in range(cap, 0, -1):
        if n % d == 0:
            return d
    return 1


# ----------------------------------------------------------------------------- geometry
@dataclasses.dataclass(frozen=True)
class _Geo:
    ws: tuple[int, int, int]
    ts: tuple[int, int, int]
    ss: tuple[int, int, int]  # roll shift (token layout only)
    ms: tuple[int, int, int]  # mask shift
    grid: tuple[int, int, int]  # real grid (D, H, W); token layout only
    nwin: tuple[int, int, int]  # windows per axis
    bw: int
    nh: int
    d: int

    @property
    def n(self) -> int:
        return math.prod(self.ws)

    def constexprs(self) -> dict:
        wd, wh, ww = self.ws
        return dict(NH=self.nh, DH=self.d, WD=wd, WH=wh, WW=ww)

    @property
    def padded(self) -> bool:
        """The token grid is not a whole number of windows (token layout: padded tokens get kv_pad)."""
        return any(nw * w != g for nw, w, g in zip(self.nwin, self.ws, self.grid))

    @property
    def table_rows(self) -> int:
        td, th, tw = self.ts
        return (2 * td - 1) * (2 * th - 1) * (2 * tw - 1)

    @property
    def skips_tiles(self) -> bool:
        """The mask along D splits the last window along D, and there are windows before it (``_live_tiles``)."""
        return self.ms[0] > 0 and self.nwin[0] > 1

    def shifts(self) -> dict:
        """The mask shift along D (the skipping of masked tiles needs it): a run-time argument (shifted and
        unshifted blocks share a kernel); the masks along H and W reach the kernels through the window types."""
        return dict(MD=self.ms[0])

    def runtime(self, tokens: bool, np_: int, device: torch.device) -> tuple:
        """The geometry arguments every kernel takes: token table, window-type table, tokens per sample, windows
        per axis, samples."""
        return (_token_table(self.ws, self.ss, self.grid, self.nwin, tokens, np_, str(device)),
                _window_types(self.nwin, self.ms, str(device)), math.prod(self.grid), *self.nwin,
                self.bw // math.prod(self.nwin))


def _padded_extent(n: int, cfg: Config) -> int:
    """Rows (= columns) of the expanded bias planes: covers every full and tail tile of all three kernels."""
    ext = 0
    for block in (cfg.fwd_bm, cfg.fwd_bn, cfg.dq_bm, cfg.dq_bn, cfg.db_bm, cfg.db_bn, cfg.kv_bm, cfg.kv_bn):
        full, tail = _split(n, block)
        ext = max(ext, full * block + tail)
    return ext


@functools.lru_cache(maxsize=64)
def _token_table(ws: tuple, ss: tuple, grid: tuple, nwin: tuple, tokens: bool, np_: int,
                 device_str: str) -> torch.Tensor:
    """(windows per sample, NP) int32: for token n of the window at raster position w within a sample, its
    source row + 1, or 0 when the token is not real.

    Source row: token layout, the token's index within its sample's (D, H, W) grid after the roll (window
    origin + n, shifted, wrapped over the padded grid); it is not real when it falls in the padding.
    Windowed layout, n itself. Columns n >= N (tile padding) are 0. The kernels read this instead of
    recomputing the coordinates.
    """
    (wd, wh, ww), (nwd, nwh, nww), (D, H, W) = ws, nwin, grid
    N = wd * wh * ww
    n = torch.arange(np_)
    nc = n.clamp(max=N - 1)[None, :]
    td, th, tw = nc // (wh * ww), (nc // ww) % wh, nc % ww
    w = torch.arange(nwd * nwh * nww)[:, None]
    wdi, whi, wwi = w // (nwh * nww), (w // nww) % nwh, w % nww
    inwin = (n < N)[None, :]
    if tokens:
        od = (wdi * wd + td + ss[0]) % (nwd * wd)
        oh = (whi * wh + th + ss[1]) % (nwh * wh)
        ow = (wwi * ww + tw + ss[2]) % (nww * ww)
        real = inwin & (od < D) & (oh < H) & (ow < W)
        src = (od * H + oh) * W + ow
    else:
        real = inwin.expand(w.shape[0], -1)
        src = nc.expand(w.shape[0], -1)
    code = torch.where(real, src + 1, 0)
    if code.max() >= 2 ** 31:
        raise ValueError(f"window attention (triton): a sample of {D}x{H}x{W} tokens is too large for the token table")
    return code.to(torch.int32).to(device_str)


@functools.lru_cache(maxsize=64)
def _window_types(nwin: tuple, ms: tuple, device_str: str) -> torch.Tensor:
    """(windows per sample,) int32: the type of the window at each raster position, which of the masked axes
    (mask shift > 0) it is the last window along, bits in (D, H, W) order with the first masked axis most
    significant (as ``_type_masks`` orders the types)."""
    nwd, nwh, nww = nwin
    w = torch.arange(nwd * nwh * nww)
    last = (w // (nwh * nww) == nwd - 1, (w // nww) % nwh == nwh - 1, w % nww == nww - 1)
    t = torch.zeros_like(w)
    for a in range(3):
        if ms[a] > 0:
            t = t * 2 + last[a].long()
    return t.to(torch.int32).to(device_str)


@functools.lru_cache(maxsize=64)
def _type_masks(ws: tuple, ms: tuple, np_: int, device_str: str) -> torch.Tensor:
    """(T, NP, NP) uint8: 1 where window type t's shift mask separates tokens i and j (both real).

    Types: which of the masked axes (mask shift > 0) a window is the last one along, bits in (D, H, W) order
    with the first masked axis most significant (as ``_win_plane`` computes them); T = 2 ** (masked axes).
    In the last window along axis a, a token is in the official (-s:) slice when its in-window coordinate
    is >= w - s, else in the (-w:-s) slice; other windows lie in one slice along a."""
    (wd, wh, ww) = ws
    N = wd * wh * ww
    n = torch.arange(N)
    coords = (n // (wh * ww), (n // ww) % wh, n % ww)
    axes = [a for a in range(3) if ms[a] > 0]
    out = torch.zeros(2 ** len(axes), np_, np_, dtype=torch.uint8)
    for t in range(2 ** len(axes)):
        sep = torch.zeros(N, N, dtype=torch.bool)
        for k, a in enumerate(axes):
            if (t >> (len(axes) - 1 - k)) & 1:
                side = coords[a] >= ws[a] - ms[a]
                sep |= side[:, None] != side[None, :]
        out[t, :N, :N] = sep.to(torch.uint8)
    return out.to(device_str)


@functools.lru_cache(maxsize=64)
def _plane_index(ws: tuple, ts: tuple, np_: int, device_str: str) -> torch.Tensor:
    """(2, NP, NP) int32 table row of each plane element: [0] bias(i, j), [1] transposed (row = key j);
    -1 in padded columns (-inf: they drop out of the softmax), -2 in padded rows of real columns (0)."""
    from bevt.ops.window_attention import relative_position_index

    n = math.prod(ws)
    idx = relative_position_index(ws, ts).to(torch.int32)
    out = torch.full((2, np_, np_), -2, dtype=torch.int32)
    out[:, :, n:] = -1
    out[0, :n, :n] = idx
    out[1, :n, :n] = idx.t()
    return out.to(device_str)


def _expand_bias(bias_table: torch.Tensor, geo: "_Geo", np_: int, dtype: torch.dtype,
                 both: bool = False) -> torch.Tensor:
    """(L, nh) table -> (T, nh, NP, NP) bias planes in the exp2 domain (x log2 e), one set per window type
    with its shift mask (-100 x log2 e) added, padded columns -inf; with ``both``, (2, T, nh, NP, NP): the
    planes and the transposed planes (plane[j, i] = bias(i, j), for the dK/dV kernel whose tiles have keys
    as rows). One launch.

    Why expand: every score needs its bias; a gather from the table per score costs one scattered load per
    element, while a plane row is contiguous (vector loads) and the planes of all heads (a few MB) stay in
    L2 for every window. Why per type: the mask then costs nothing per score. fp16 for half-precision
    inputs (3 more mantissa bits than bf16; the values are small), fp32 for fp32 inputs.
    """
    dev = bias_table.device
    planes = 2 if both else 1
    masks = _type_masks(geo.ws, geo.ms, np_, str(dev))
    types = masks.shape[0]
    out = torch.empty((planes, types, geo.nh, np_, np_), device=dev, dtype=dtype)
    rb = 4
    # the table as (nh, L): a head's gathers then fall in one contiguous row (L1-resident) instead of one
    # 32-byte sector each, nh * 4 bytes apart (session 15, H100, this kernel per fwd + bwd: stage 4, 32 heads,
    # 0.071 -> 0.045 ms; stage 3 0.040 -> 0.035)
    _launcher(_k._expand_bias_kernel)((triton_cdiv(np_, rb), geo.nh, planes), dev, bias_table.detach().t().contiguous(),
                                      _plane_index(geo.ws, geo.ts, np_, str(dev)), masks, out, bias_table.shape[0],
                                      NP=np_, T=types, RB=rb, BLOCK=triton_next_pow2(np_), num_warps=4)
    return out if both else out[0]


def _plane_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype == torch.float32 else torch.float16


def interpreter_ready() -> bool:
    """True when these kernels were defined in interpreter mode (CPU tensors can run them): TRITON_INTERPRET=1
    must be set before triton is first imported and when this module is imported."""
    from triton.runtime.interpreter import InterpretedFunction
    import triton.language as tl

    return isinstance(_k._fwd_kernel, InterpretedFunction) and isinstance(tl.zeros, InterpretedFunction)


def _ieee(dtype: torch.dtype) -> int:
    """Kernel IEEE code: 2 in the interpreter (exact dots, bf16 rounded to nearest by hand), 1 for fp32
    inputs (exact fp32 products, not tf32), 0 otherwise (tensor-core dots in the input dtype)."""
    if _be.triton_interpreting():
        return 2
    return 1 if dtype == torch.float32 else 0


@functools.lru_cache(maxsize=32)
def _pairs_by_row(ws: tuple, ts: tuple, nkp: int, device_str: str):
    """CSR of the (i, j) pairs of each table row: (order int32, offsets int32 (L+1))."""
    from bevt.ops.window_attention import relative_position_index, table_length

    idx = relative_position_index(ws, ts).view(-1)
    n = math.prod(ws)
    i = torch.arange(n).repeat_interleave(n)
    j = torch.arange(n).repeat(n)
    order = torch.argsort(idx, stable=True)
    flat = (i * nkp + j)[order].to(torch.int32)
    counts = torch.bincount(idx, minlength=table_length(ts))
    offs = torch.zeros(counts.numel() + 1, dtype=torch.int64)
    offs[1:] = torch.cumsum(counts, 0)
    return flat.to(device_str), offs.to(torch.int32).to(device_str)


# ----------------------------------------------------------------------------- launch specs + launchers
@dataclasses.dataclass(frozen=True)
class LaunchSpec:
    """How one kernel is launched for a geometry: grid, compile-time arguments, warps, stages, and the host
    facts the launcher needs (windows per program, ranges, padded tile rows). Used by the launchers and by
    the offline compile check of ``benchmarks/gpu_window_attention.py``."""

    kernel: object
    grid: tuple
    constexprs: dict
    num_warps: int
    num_stages: int
    facts: dict
    maxnreg: int = 0


@functools.lru_cache(maxsize=256)  # host time: a Swin step launches these for a few geometries, many times
def launch_specs(geo: _Geo, tokens: bool, dtype: torch.dtype, big: bool, cfg: Config) -> dict[str, LaunchSpec]:
    """Specs of the "fwd" kernel and of the backward: "dq", "db" (bias-gradient partials) and "dkdv", or
    "window" alone when a window fits one tile."""
    layout = int(tokens) + (2 if big else 0)
    common = dict(**geo.constexprs(), NP=_padded_extent(geo.n, cfg), LAYOUT=layout, IEEE=_ieee(dtype),
                  HAS_PAD=int(tokens and geo.padded))
    skip = dict(SKIP=int(cfg.skip_masked_tiles))  # the four multi-tile kernels (not the one-tile backward)
    specs = {}
    # forward: programs (query tile, head, range of windows)
    nqf, bmt = _split(geo.n, cfg.fwd_bm)
    nkf, bnt = _split(geo.n, cfg.fwd_bn)
    nqt = nqf + (1 if bmt else 0)
    wpp = _windows_per_program(geo.bw, nqt * geo.nh, cfg.fwd_programs)
    specs["fwd"] = LaunchSpec(_k._fwd_kernel, (geo.bw // wpp * geo.nh * nqt,),
                              dict(common, **skip, WPP=wpp, BM=cfg.fwd_bm, NQF=nqf, BMT=bmt, NQT=nqt,
                                   BN=cfg.fwd_bn, NKF=nkf, BNT=bnt), cfg.fwd_warps, cfg.fwd_stages, {},
                              maxnreg=_register_cap(cfg.fwd_maxnreg, geo, dtype))
    if cfg.one_tile_backward and geo.n <= min(cfg.dq_bm, cfg.dq_bn):
        # one (BT, BT) tile holds the window: one backward kernel, one bias-gradient plane per range and head
        bt = max(16, triton_next_pow2(geo.n))
        wpp = _windows_per_program(geo.bw, geo.nh, cfg.win_programs)
        window = LaunchSpec(_k._bwd_window_kernel, (geo.bw // wpp * geo.nh,), dict(common, WPP=wpp, BT=bt),
                            cfg.win_warps, cfg.win_stages, dict(ranges=geo.bw // wpp, nqp=bt, nkp=bt, nkt=1),
                            maxnreg=_register_cap(cfg.win_maxnreg, geo, dtype, wide=0))
        return {**specs, "window": window}
    # dQ + delta: programs (query tile, head, range of windows)
    nqf, bmt = _split(geo.n, cfg.dq_bm)
    nkf, bnt = _split(geo.n, cfg.dq_bn)
    nqt = nqf + (1 if bmt else 0)
    wpp = _windows_per_program(geo.bw, nqt * geo.nh, cfg.dq_programs)
    specs["dq"] = LaunchSpec(_k._bwd_dq_kernel, (geo.bw // wpp * geo.nh * nqt,),
                             dict(common, **skip, WPP=wpp, BM=cfg.dq_bm, NQF=nqf, BMT=bmt, NQT=nqt, BN=cfg.dq_bn,
                                  NKF=nkf, BNT=bnt), cfg.dq_warps, cfg.dq_stages, {},
                             maxnreg=_register_cap(cfg.dq_maxnreg, geo, dtype))
    # bias-gradient partials: programs (query tile, key tile, head, range of windows); one plane per range
    nqf, bmt = _split(geo.n, cfg.db_bm)
    nkf, bnt = _split(geo.n, cfg.db_bn)
    nqt, nkt = nqf + (1 if bmt else 0), nkf + (1 if bnt else 0)
    nqp, nkp = nqf * cfg.db_bm + bmt, nkf * cfg.db_bn + bnt
    per_range = nqt * nkt * geo.nh
    max_ranges = max(1, cfg.dbp_max_bytes // (geo.nh * nqp * nkp * 4))
    db_target = cfg.db_programs_skipping if (cfg.skip_masked_tiles and geo.skips_tiles) else cfg.db_programs
    wpp = _windows_per_program(geo.bw, per_range, min(db_target, max_ranges * per_range))
    ranges = geo.bw // wpp
    specs["db"] = LaunchSpec(_k._bwd_dbias_kernel, (ranges * per_range,),
                             dict(common, **skip, WPP=wpp, NQP=nqp, NKP=nkp, BM=cfg.db_bm, NQF=nqf, BMT=bmt, NQT=nqt,
                                  BN=cfg.db_bn, NKF=nkf, BNT=bnt, NKT=nkt), cfg.db_warps, cfg.db_stages,
                             dict(ranges=ranges, nqp=nqp, nkp=nkp), maxnreg=_register_cap(cfg.db_maxnreg, geo, dtype))
    # dK, dV (+ kv_pad partials): programs (key tile, head, range of windows)
    nqf, bmt = _split(geo.n, cfg.kv_bm)
    nkf, bnt = _split(geo.n, cfg.kv_bn)
    nkt = nkf + (1 if bnt else 0)
    wpp = _windows_per_program(geo.bw, nkt * geo.nh, cfg.kv_programs)
    specs["dkdv"] = LaunchSpec(_k._bwd_dkdv_kernel, (geo.bw // wpp * geo.nh * nkt,),
                               dict(common, **skip, WPP=wpp, BM=cfg.kv_bm, NQF=nqf, BMT=bmt, BN=cfg.kv_bn,
                                    NKF=nkf, BNT=bnt, NKT=nkt), cfg.kv_warps, cfg.kv_stages,
                               dict(ranges=geo.bw // wpp, nkt=nkt), maxnreg=_register_cap(cfg.kv_maxnreg, geo, dtype))
    return specs


_WIDE_TILE_CAP = 168  # 3 CTAs of 4 warps per SM


def _register_cap(cap: int, geo: _Geo, dtype: torch.dtype, wide: int = _WIDE_TILE_CAP) -> int:
    """A configured cap below 168 holds for 16-bit inputs of head dim <= 32 (the shapes it was chosen at):
    head dim 64 doubles the q / dO / accumulator registers and fp32 inputs their operand registers, and
    there a cap of 128 spills in the inner loops (dQ at head dim 64: 132 bytes; fp32: 800+), so they get
    ``wide`` (168; the one-tile backward, which holds three gradients at once, gets 0: no cap)."""
    if cap and cap < _WIDE_TILE_CAP and (geo.d > 32 or dtype == torch.float32):
        return wide
    return cap


def _big(q: torch.Tensor) -> bool:
    """64-bit element offsets: the storage the kernels index holds 2**31 elements or more."""
    return q.untyped_storage().nbytes() // q.element_size() >= 2 ** 31 - 1


@functools.cache
def _launcher(kernel) -> CachedKernel:
    """The cached launcher of a jitted kernel (one launch ~10 us of host time instead of ~40)."""
    return CachedKernel(kernel)


def _launch(spec: LaunchSpec, device: torch.device, *args, **runtime):
    if spec.maxnreg:
        runtime["maxnreg"] = spec.maxnreg
    _launcher(spec.kernel)(spec.grid, device, *args, **runtime, **spec.constexprs, num_warps=spec.num_warps,
                           num_stages=spec.num_stages)


def _launch_fwd(geo: _Geo, tokens: bool, q, k, v, kvp, bias_table, o, lse, scale: float):
    spec = launch_specs(geo, tokens, q.dtype, _big(q), _config(q.device, geo.n))["fwd"]
    planes = _expand_bias(bias_table, geo, spec.constexprs["NP"], _plane_dtype(q.dtype))
    _launch(spec, q.device, q, k, v, planes if kvp is None else kvp, planes, o, lse,
            *geo.runtime(tokens, spec.constexprs["NP"], q.device), scale * LOG2E, 0, **geo.shifts())


def _launch_bwd(geo: _Geo, tokens: bool, q, k, v, kvp, bias_table, o, do, lse, dq, dk, dv, scale: float):
    """Runs the backward kernels; returns (dtable (L, nh), dkv_pad (2, nh, d) fp32 or None)."""
    dev = q.device
    specs = launch_specs(geo, tokens, q.dtype, _big(q), _config(dev, geo.n))
    rt = geo.shifts()
    has_pad = bool(specs["fwd"].constexprs["HAS_PAD"])
    one_tile = "window" in specs
    np_, pdt = specs["fwd"].constexprs["NP"], _plane_dtype(q.dtype)
    gargs = geo.runtime(tokens, np_, dev)
    planes = _expand_bias(bias_table, geo, np_, pdt, both=not one_tile)
    if not one_tile:
        planes, planes_t = planes
    kvp = planes if kvp is None else kvp  # windowed layout: no kv_pad (any valid pointer)
    # bias-gradient partials: one fp32 (nqp, nkp) plane per range of windows and head; kv_pad partials: one
    # (2, d) pair per program
    f = specs["window" if one_tile else "db"].facts
    g = specs["window" if one_tile else "dkdv"].facts
    dbp = torch.empty(f["ranges"], geo.nh, f["nqp"], f["nkp"], device=dev, dtype=torch.float32)
    dkvp = torch.empty(g["ranges"] * geo.nh * g["nkt"] * 2 * geo.d if has_pad else 1, device=dev,
                       dtype=torch.float32)
    if one_tile:
        _launch(specs["window"], dev, q, k, v, kvp, planes, o, do, lse, dq, dk, dv, dbp, dkvp, *gargs,
                scale * LOG2E, scale, 0, **rt)
    else:
        delta = torch.empty_like(lse)
        # 1. dQ + delta  2. bias partials  3. dK, dV (+ kv_pad partials)
        _launch(specs["dq"], dev, q, k, v, kvp, planes, o, do, lse, delta, dq, *gargs, scale * LOG2E, scale, 0, **rt)
        _launch(specs["db"], dev, q, k, v, kvp, planes, do, lse, delta, dbp, *gargs, scale * LOG2E, 0, **rt)
        _launch(specs["dkdv"], dev, q, k, v, kvp, planes_t, do, lse, delta, dk, dv, dkvp, *gargs, scale * LOG2E,
                scale, 0, **rt)
    # 4. bias-table gradient: sum the partials over the ranges (a contiguous, deterministic reduction), then
    # gather the sum by table row, in a fixed order
    dbs = dbp.sum(0) if f["ranges"] > 1 else dbp[0]
    L = geo.table_rows
    order, offs = _pairs_by_row(geo.ws, geo.ts, f["nkp"], str(dev))
    dt = torch.empty(L, geo.nh, device=dev, dtype=torch.float32)
    bl, ch = 32, 64
    _launcher(_k._table_grad_kernel)((triton_cdiv(L, bl), geo.nh), dev, dbs, order, offs, dt, L, NH=geo.nh,
                                     PLANE=f["nqp"] * f["nkp"], BL=bl, CH=ch, num_warps=4)
    dkv_pad = None
    if has_pad:
        dkv_pad = dkvp.view(g["ranges"], geo.nh, g["nkt"], 2, geo.d).sum((0, 2)).permute(1, 0, 2)
    return dt.to(bias_table.dtype), dkv_pad


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ----------------------------------------------------------------------------- token layout: geometry + ops
def _tokens_geo(qkv: torch.Tensor, ws, ss, ts, ms) -> _Geo:
    B, D, H, W, _, nh, d = qkv.shape
    nwin = tuple(-(-g // w) for g, w in zip((D, H, W), ws))
    return _Geo(tuple(ws), tuple(ts), tuple(ss), tuple(ms), (D, H, W), nwin, B * math.prod(nwin), nh, d)


@torch.library.custom_op("bevt::window_attention_tokens_fwd", mutates_args=())
def _tokens_fwd(qkv: torch.Tensor, bias_table: torch.Tensor, kv_pad: torch.Tensor, window_size: list[int],
                shift_size: list[int], table_window_size: list[int], mask_shift_size: list[int],
                scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    geo = _tokens_geo(qkv, window_size, shift_size, table_window_size, mask_shift_size)
    qkv = qkv.contiguous()
    B, D, H, W = qkv.shape[:4]
    o = torch.empty(B, D, H, W, geo.nh, geo.d, device=qkv.device, dtype=qkv.dtype)
    lse = torch.empty(geo.bw, geo.nh, geo.n, device=qkv.device, dtype=torch.float32)
    q, k, v = qkv.unbind(4)
    _launch_fwd(geo, True, q, k, v, kv_pad.contiguous(), bias_table, o, lse, scale)
    return o, lse


@_tokens_fwd.register_fake
def _(qkv, bias_table, kv_pad, window_size, shift_size, table_window_size, mask_shift_size, scale):
    geo = _tokens_geo(qkv, window_size, shift_size, table_window_size, mask_shift_size)
    B, D, H, W = qkv.shape[:4]
    return (qkv.new_empty(B, D, H, W, geo.nh, geo.d),
            qkv.new_empty(geo.bw, geo.nh, geo.n, dtype=torch.float32))


@torch.library.custom_op("bevt::window_attention_tokens_bwd", mutates_args=())
def _tokens_bwd(do: torch.Tensor, qkv: torch.Tensor, bias_table: torch.Tensor, kv_pad: torch.Tensor,
                o: torch.Tensor, lse: torch.Tensor, window_size: list[int], shift_size: list[int],
                table_window_size: list[int], mask_shift_size: list[int],
                scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    geo = _tokens_geo(qkv, window_size, shift_size, table_window_size, mask_shift_size)
    qkv = qkv.contiguous()
    # every real token belongs to exactly one window: each dqkv element is written exactly once
    dqkv = torch.empty_like(qkv)
    q, k, v = qkv.unbind(4)
    dq, dk, dv = dqkv.unbind(4)
    dt, dkv = _launch_bwd(geo, True, q, k, v, kv_pad.contiguous(), bias_table, o.contiguous(),
                          do.contiguous(), lse, dq, dk, dv, scale)
    # contiguous outputs whatever the inputs' strides: the fake below promises exactly that to the compiler
    dkv_pad = dkv.to(kv_pad.dtype) if dkv is not None else kv_pad.new_zeros(kv_pad.shape)
    return dqkv, dt.contiguous(), dkv_pad.contiguous()


@_tokens_bwd.register_fake
def _(do, qkv, bias_table, kv_pad, o, lse, window_size, shift_size, table_window_size, mask_shift_size, scale):
    # new_empty, not empty_like: the real op returns contiguous tensors (empty_like keeps a permuted input's strides)
    return qkv.new_empty(qkv.shape), bias_table.new_empty(bias_table.shape), kv_pad.new_empty(kv_pad.shape)


def _tokens_setup(ctx, inputs, output):
    qkv, bias_table, kv_pad, ws, ss, ts, ms, scale = inputs
    o, lse = output
    ctx.save_for_backward(qkv, bias_table, kv_pad, o, lse)
    ctx.geo = (ws, ss, ts, ms, scale)


def _tokens_backward(ctx, do, _dlse):
    qkv, bias_table, kv_pad, o, lse = ctx.saved_tensors
    ws, ss, ts, ms, scale = ctx.geo
    dqkv, dt, dkv = torch.ops.bevt.window_attention_tokens_bwd(do, qkv, bias_table, kv_pad, o, lse, ws, ss, ts, ms,
                                                               scale)
    return dqkv, dt, dkv, None, None, None, None, None


_tokens_fwd.register_autograd(_tokens_backward, setup_context=_tokens_setup)


# ----------------------------------------------------------------------------- windowed layout: geometry + ops
def _windows_geo(q: torch.Tensor, ws, ts, padded_grid, ms) -> _Geo:
    bw, nh, _, d = q.shape
    if padded_grid:
        nwin = tuple(p // w for p, w in zip(padded_grid, ws))
        grid = tuple(padded_grid)
    else:
        nwin, grid = (1, 1, 1), tuple(ws)
    return _Geo(tuple(ws), tuple(ts), (0, 0, 0), tuple(ms), grid, nwin, bw, nh, d)


@torch.library.custom_op("bevt::window_attention_windows_fwd", mutates_args=())
def _windows_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_table: torch.Tensor,
                 window_size: list[int], table_window_size: list[int], padded_grid: list[int],
                 mask_shift_size: list[int], scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    geo = _windows_geo(q, window_size, table_window_size, padded_grid, mask_shift_size)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    o = torch.empty_like(q)
    lse = torch.empty(geo.bw, geo.nh, geo.n, device=q.device, dtype=torch.float32)
    _launch_fwd(geo, False, q, k, v, None, bias_table, o, lse, scale)
    return o, lse


@_windows_fwd.register_fake
def _(q, k, v, bias_table, window_size, table_window_size, padded_grid, mask_shift_size, scale):
    bw, nh, n, _ = q.shape
    return q.new_empty(q.shape), q.new_empty(bw, nh, n, dtype=torch.float32)


@torch.library.custom_op("bevt::window_attention_windows_bwd", mutates_args=())
def _windows_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_table: torch.Tensor,
                 o: torch.Tensor, lse: torch.Tensor, window_size: list[int], table_window_size: list[int],
                 padded_grid: list[int], mask_shift_size: list[int],
                 scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    geo = _windows_geo(q, window_size, table_window_size, padded_grid, mask_shift_size)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dt, _ = _launch_bwd(geo, False, q, k, v, None, bias_table, o.contiguous(), do.contiguous(), lse, dq, dk, dv,
                        scale)
    return dq, dk, dv, dt.contiguous()


@_windows_bwd.register_fake
def _(do, q, k, v, bias_table, o, lse, window_size, table_window_size, padded_grid, mask_shift_size, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), bias_table.new_empty(bias_table.shape)


def _windows_setup(ctx, inputs, output):
    q, k, v, bias_table, ws, ts, pg, ms, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, bias_table, o, lse)
    ctx.geo = (ws, ts, pg, ms, scale)


def _windows_backward(ctx, do, _dlse):
    q, k, v, bias_table, o, lse = ctx.saved_tensors
    ws, ts, pg, ms, scale = ctx.geo
    dq, dk, dv, dt = torch.ops.bevt.window_attention_windows_bwd(do, q, k, v, bias_table, o, lse, ws, ts, pg, ms,
                                                                 scale)
    return dq, dk, dv, dt, None, None, None, None, None


_windows_fwd.register_autograd(_windows_backward, setup_context=_windows_setup)


# ----------------------------------------------------------------------------- public functions
def _require_nonempty(entry: str, x: torch.Tensor) -> None:
    """The kernels need at least one window and one head (a launch grid cannot be empty); the op in
    :mod:`bevt.ops.window_attention` answers empty inputs with the reference instead of calling these."""
    if x.numel() == 0:
        raise ValueError(f"bevt.kernels.window_attention.{entry}: input of shape {tuple(x.shape)} is empty; "
                         f"use bevt.ops.window_attention.{entry}, which handles empty inputs")


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_table: torch.Tensor, *,
                     window_size: Sequence[int], table_window_size: Sequence[int],
                     padded_grid: Sequence[int] | None, mask_shift_size: Sequence[int],
                     scale: float | None) -> torch.Tensor:
    """Windowed layout: q, k, v (BW, nh, N, d), bias_table (L, nh) -> (BW, nh, N, d).

    Arguments as :func:`bevt.ops.window_attention.window_attention` (already validated there).
    """
    _require_nonempty("window_attention", q)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    ms = [int(s) for s in mask_shift_size]
    pg = [int(p) for p in padded_grid] if (padded_grid is not None and any(ms)) else []
    o, _ = _windows_fwd(q, k, v, bias_table, [int(w) for w in window_size], [int(t) for t in table_window_size],
                        pg, ms, scale)
    return o


def window_attention_tokens(qkv: torch.Tensor, bias_table: torch.Tensor, *, window_size: Sequence[int],
                            shift_size: Sequence[int], table_window_size: Sequence[int],
                            kv_pad: torch.Tensor | None, mask_shift_size: Sequence[int],
                            scale: float | None) -> torch.Tensor:
    """Token layout: qkv (B, D, H, W, 3, nh, d), bias_table (L, nh), kv_pad (2, nh, d) or None (zeros)
    -> (B, D, H, W, nh, d). Arguments as :func:`bevt.ops.window_attention.window_attention_tokens` (already
    validated there)."""
    _require_nonempty("window_attention_tokens", qkv)
    nh, d = qkv.shape[5], qkv.shape[6]
    scale = d ** -0.5 if scale is None else float(scale)
    if kv_pad is None:
        kv_pad = qkv.new_zeros(2, nh, d)
    o, _ = _tokens_fwd(qkv, bias_table, kv_pad, [int(w) for w in window_size], [int(s) for s in shift_size],
                       [int(t) for t in table_window_size], [int(s) for s in mask_shift_size], scale)
    return o
