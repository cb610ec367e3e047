"""Triton kernels of shifted-window 3D attention with a relative position bias table.

Shape legend: BW windows (all samples), NH heads, N tokens per window (WD * WH * WW), DH head dim,
L table rows, R window ranges of the bias-gradient reduction, NQP / NKP padded query / key rows of the
bias-gradient tiles.

Kernels (launched by ``bevt.kernels.window_attention``):

* ``_fwd_kernel``: one program per (query tile, head, window). Online softmax in the exp2 domain over the
  window's key tiles; the bias is read from an expanded (NP, NP) plane of the head and window type (made
  from the table once per call by the launcher: contiguous rows, -inf in padded columns, the official -100
  of the shift mask already added, shared by all windows of a type). Writes O and the row log-sum-exp
  (base 2) LSE (BW, NH, N).
* ``_bwd_dq_kernel``: one program per (query tile, head, range of WPP windows). For each window it
  computes delta = rowsum(dO * O) (stored for the next kernels), recomputes P and dS = P * (dP - delta)
  over the key tiles and accumulates dQ in registers.
* ``_bwd_dbias_kernel``: one program per (query tile, key tile, head, range of WPP windows): recomputes dS
  of its tile pair in every window of the range and sums it in registers, so the bias gradient is reduced
  over the WPP windows before anything is written: DBP[r, h] (NQP, NKP) holds one fp32 partial per range.
  (A separate kernel costs one more recompute of P, but keeps every kernel at a 64 x 64 tile: holding
  the partials of all key tiles in the dQ kernel's registers forced 16-row tiles and spills.)
* ``_bwd_dkdv_kernel``: one program per (key tile, head, window): recomputes P^T and dS^T per query
  tile, accumulates dK and dV in registers; in token layout, the rows of padded tokens are summed into
  a per-program partial of the kv_pad gradient instead of being stored.
* ``_bwd_window_kernel``: replaces the three backward kernels above when a window fits one tile (the image
  path's 49 tokens): one program per (head, range of windows) computes dQ, dK, dV and the partials at once.
* ``_table_grad_kernel``: deterministic gather of the bias-table gradient: for table row l, the sum over
  the (i, j) pairs with index(i, j) = l (a CSR list sorted by l) of DBP summed over the ranges r (the
  launcher sums the ranges first: one contiguous streaming reduction instead of R scattered loads per pair).

No kernel uses atomics: every output is written by exactly one program, in a fixed order, so all
results are bitwise reproducible for a given launch configuration.

Addressing. ``LAYOUT`` bit 0 set (token layout): q/k/v are views of one (B, D, H, W, 3, NH, DH) tensor (pointers Q, K, V
are its three components), O/dO are (B, D, H, W, NH, DH). Token t of window w sits at the padded,
rolled coordinate p = window origin + t; its source token is (p + shift) mod Lp on each axis; if that
lies outside the real (D, H, W) grid it is a padded token: k, v come from KVP (2, NH, DH), nothing is
stored for it. Bit 0 clear: q/k/v/o are (BW, NH, N, DH) contiguous windows. ``LAYOUT >= 2``: 64-bit
element offsets (tensors of 2**31 elements or more), else 32-bit. The kernels do not compute these
coordinates: the launcher's token table TOK (windows per sample, NP) int32 gives each token's source row
within its sample (DHW tokens per sample; see ``_rows``).

Shift mask. Only the last window along a masked axis (mask shift M > 0) mixes regions, and which pairs of
its tokens the mask separates depends only on their in-window coordinates. So the launcher adds the mask
to the bias planes, one set of planes per window *type* (which masked axes the window is the last one
along: 2 ** (masked axes) types), and a window reads the planes of its type (``_win_plane``, the type from
the table WT): no score pays a compare and a select (they were a fifth of the instructions of each inner
loop). The mask along D
separates two runs of whole frames of the last window along D, so tiles lying in one run skip the other
run's tiles (``_live_tiles``, constexpr SKIP): the 32-frame clips of fine-tuning save a sixth of a shifted
block's tiles.

Constexpr geometry: WD, WH, WW effective window; NP rows/columns of the bias planes TAB (T, NH, NP, NP) and
of TOK. Run-time values (shifted and unshifted blocks of a stage share one compiled kernel): the windows
per axis nWd/nWh/nWw, MD the shift of the region mask along D (0: none; which planes a window reads comes
from the launcher's per-position type table WT). Windows are visited with a (sample, position) counter
(``_first_window``, ``_next_window``), so no loop divides by a run-time value. HAS_PAD (the grid is
padded: a property of the stage, shared by its shifted and unshifted blocks) is compile-time: as a run-time
flag it cost every key tile a round trip of k and v from shared memory through registers and back (to select
kv_pad rows), with a barrier: 4-5 % of the executed instructions of the forward, dQ and bias-gradient loops.
"""
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
MASK2 = tl.constexpr(-100.0 * LOG2E)  # the official -100 additive mask, in the exp2 domain
LOG2E_K = tl.constexpr(LOG2E)  # (a kernel reads only constexpr globals)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """IEEE > 0: exact fp32 products (fp32 inputs; and in the interpreter, whose bf16/fp16 dot is wrong)."""
    if IEEE > 0:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _cvt(x, dtype: tl.constexpr, IEEE: tl.constexpr):
    """x.to(dtype), rounding to nearest even. IEEE == 2 (the interpreter) rounds bf16 by hand: the
    interpreter truncates fp32 -> bf16, which would double the low-precision error seen by the tests."""
    if IEEE == 2 and dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _first_window(j, NB):
    """The j-th window of the position-major order as (sample smp, position pos within the sample): windows
    j, j + 1, ... of a program's range sit at the same place in different samples, so they share a window
    type, hence a bias plane (at stage 3, 4 windows per sample of 4 types: in raster order every window of a
    range read another plane). The window's index among all windows is smp * NWS + pos."""
    return j % NB, j // NB


@triton.jit
def _next_window(smp, pos, NB):
    """The window after (smp, pos) in the position-major order, without a division (a division by a run-time
    value costs ~20 instructions: a program's loop over windows used to pay five per window)."""
    smp = smp + 1
    wrap = smp == NB
    return tl.where(wrap, 0, smp), pos + wrap.to(tl.int32)


@triton.jit
def _win_plane(TAB, WT, pos, h, NH: tl.constexpr, NP: tl.constexpr):
    """This head's (NP, NP) bias plane for the window at position pos of a sample. The launcher makes one plane
    per head and window *type* (which of the masked axes the window is the last one along), so the official
    -100 of the shift mask is already in the plane and no score pays a compare and a select; WT (NWS,) int32
    holds each position's type (``_window_types``)."""
    t = tl.load(WT + pos)
    return TAB + (t * NH + h) * (NP * NP)


@triton.jit
def _row_vec(P, offs, n, N: tl.constexpr, other, FULL: tl.constexpr):
    """P[offs] for the query rows n of a tile (LSE, delta); rows n >= N (tile padding) read ``other``. A full
    tile (FULL) has none, and its load is unmasked: a masked load of a vector in the scores' column layout
    costs each asynchronous copy a select and a compare (~45 instructions per tile of the dK/dV loop)."""
    if FULL:
        return tl.load(P + offs)
    else:
        return tl.load(P + offs, mask=n < N, other=other)


@triton.jit
def _rows(n, smp, pos, h, TOK, DHW, NWS, NH: tl.constexpr, DH: tl.constexpr, N: tl.constexpr, NP: tl.constexpr,
          LAYOUT: tl.constexpr):
    """Per-token facts for token indices n (a vector, n < NP; n >= N are tile padding) of the window at position
    pos of sample smp, head h.

    Returns (real, row_qkv, row_o): whether the token is real (in the window and, in token layout, inside the
    unpadded grid), and the element offsets of its q/k/v and o rows. The window's coordinates are not computed
    here: TOK (NWS, NP) int32 holds, per window position within a sample and token, the source token within
    the sample + 1 (0 when not real), made once per geometry by the launcher. One load replaces ~35 integer
    operations per token and tile.
    """
    code = tl.load(TOK + pos * NP + n)
    real = code > 0
    loc = tl.maximum(code - 1, 0)
    if LAYOUT % 2 == 1:
        tok = smp * DHW + loc
        if LAYOUT >= 2:
            tok = tok.to(tl.int64)
        row_qkv = tok * (3 * NH * DH) + h * DH
        row_o = tok * (NH * DH) + h * DH
    else:
        wh = (smp * NWS + pos) * NH + h
        if LAYOUT >= 2:
            wh = wh.to(tl.int64)
        row_qkv = (wh * N + loc) * DH
        row_o = row_qkv
    return real, row_qkv, row_o


@triton.jit
def _token_rows(P, row, dcol, real, MASKED: tl.constexpr):
    """The (tile rows, DH) block of P at element offsets row; with MASKED, rows that are not real read 0.

    Every row offset points into the tensor (``_rows`` sends tile padding and padded tokens to the sample's
    first token), so the mask is needed only where the values of such rows would matter: tile padding of a
    tail tile (a non-finite value in that first token must not reach other windows through a -inf bias
    column) and, in a padded grid, the q and dO of padded tokens (dO = 0: their outputs are dropped; q as
    in the forward, which wrote their LSE). So full tiles load k, v unmasked (padded tokens' k, v are
    replaced by kv_pad), and q, dO too in an unpadded grid: a masked load costs each asynchronous copy a
    select and a compare in the inner loops."""
    if MASKED:
        return tl.load(P + row[:, None] + dcol[None, :], mask=real[:, None], other=0.0)
    else:
        return tl.load(P + row[:, None] + dcol[None, :])


@triton.jit
def _load_kv(K, V, KVP, h, n, real, row, dcol, NH: tl.constexpr, DH: tl.constexpr, N: tl.constexpr,
             HAS_PAD: tl.constexpr, IEEE: tl.constexpr, FULL: tl.constexpr):
    """k, v rows of key tokens n (padded tokens: kv_pad). FULL: the tile holds no tile padding (see _token_rows)."""
    k = _token_rows(K, row, dcol, real, not FULL)
    v = _token_rows(V, row, dcol, real, not FULL)
    if HAS_PAD:  # the grid is padded (token layout)
        pad = (n < N) & (real == 0)
        kp = tl.load(KVP + h * DH + dcol)
        vp = tl.load(KVP + NH * DH + h * DH + dcol)
        k = tl.where(pad[:, None], _cvt(kp[None, :], k.dtype, IEEE), k)
        v = tl.where(pad[:, None], _cvt(vp[None, :], v.dtype, IEEE), v)
    return k, v


@triton.jit
def _bias_tile(bias_h, rows, c0, BC: tl.constexpr, NP: tl.constexpr):
    """Bias tile (exp2 domain, fp32) of token rows `rows` against columns c0 .. c0 + BC, read from this
    head's expanded (NP, NP) plane: contiguous rows (vector loads that stay in L1/L2 across windows), and
    padded columns hold -inf, so padded keys (or queries, in the transposed planes) drop out without a mask."""
    cols = c0 + tl.arange(0, BC)
    return tl.load(bias_h + rows[:, None] * NP + cols[None, :]).to(tl.float32)


@triton.jit
def _depth_split(MD, nWd, nWh, nWw, WD: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr):
    """The shift mask along D: (whether it is on, the token where it splits the last window along D, the first
    position of those windows within a sample). Tokens are frame-major in a window, so the two runs are the
    tokens below split = (WD - MD) * WH * WW and the rest."""
    return (MD > 0) & (MD < WD), (WD - MD) * (WH * WW), (nWd - 1) * (nWh * nWw)


@triton.jit
def _live_tiles(pos, t0, T: tl.constexpr, BO: tl.constexpr, NOF: tl.constexpr, nWd, nWh, nWw, MD, WD: tl.constexpr,
                WH: tl.constexpr, WW: tl.constexpr, SKIP: tl.constexpr):
    """Which tiles of the other side (key tiles for a query tile, query tiles for a key tile) tokens t0 .. t0 + T
    of the window at position pos must visit: (first, end) of the NOF full tiles of BO tokens, and whether the
    tail tile is live.

    The shift mask along D splits the last window along D into two runs of whole frames (``_depth_split``).
    A tile that lies in one run
    sees every token of the other run masked (-100 on the score: p = 0 in fp32, exactly so with the flush to
    zero of exp2), so those tiles are skipped (SKIP): a third of the tiles of such windows, a sixth of a shifted
    Video Swin block's. The masks along H and W interleave within every frame and leave no tile to skip."""
    if SKIP:
        on, split, pos_last = _depth_split(MD, nWd, nWh, nWw, WD, WH, WW)
        d_last = on & (pos >= pos_last)
        lo = tl.where(d_last & (t0 >= split), split, 0)
        hi = tl.where(d_last & (t0 + T <= split), split, WD * WH * WW)
        first = lo // BO
        end = tl.minimum((hi + BO - 1) // BO, NOF)
        tail = hi > NOF * BO
    else:
        first = 0
        end = NOF
        tail = True
    return first, end, tail


# runtime scalars that must not be specialized (one compiled kernel per window geometry, not per value)
_RUNTIME = ["DHW", "nWd", "nWh", "nWw", "NB", "MD", "zero"]


@triton.jit
def _key_scores(q, bias, K, V, KVP, nk, smp, pos, h, qk_scale, TOK, DHW, NWS, NH: tl.constexpr, DH: tl.constexpr,
                N: tl.constexpr, NP: tl.constexpr, LAYOUT: tl.constexpr, HAS_PAD: tl.constexpr, IEEE: tl.constexpr,
                FULL: tl.constexpr):
    """Scores of query rows q against key tokens nk of window (smp, pos), in the exp2 domain (q.k * scale * log2 e
    + the bias tile, whose planes are pre-scaled by log2 e and hold the window type's shift mask); also
    returns the keys' k and v (the forward, dQ and bias-gradient kernels). FULL: a key tile without padding."""
    dcol = tl.arange(0, DH)
    real_k, row_k, _ = _rows(nk, smp, pos, h, TOK, DHW, NWS, NH, DH, N, NP, LAYOUT)
    k, v = _load_kv(K, V, KVP, h, nk, real_k, row_k, dcol, NH, DH, N, HAS_PAD, IEEE, FULL)
    s = _dot(q, tl.trans(k), IEEE) * qk_scale + bias
    return s, k, v


# ----------------------------------------------------------------------------- forward
@triton.jit
def _fwd_kstep(q, bias, m_i, l_i, acc, K, V, KVP, k0, smp, pos, h, qk_scale, TOK, DHW, NWS, NH: tl.constexpr,
               DH: tl.constexpr, N: tl.constexpr, NP: tl.constexpr, LAYOUT: tl.constexpr, HAS_PAD: tl.constexpr,
               IEEE: tl.constexpr, BLOCK_N: tl.constexpr, FULL: tl.constexpr):
    s, k, v = _key_scores(q, bias, K, V, KVP, k0 + tl.arange(0, BLOCK_N), smp, pos, h, qk_scale, TOK, DHW, NWS, NH, DH,
                          N, NP, LAYOUT, HAS_PAD, IEEE, FULL)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(_cvt(p, v.dtype, IEEE), v, IEEE)
    return m_new, l_i, acc


@triton.jit
def _fwd_tile(Q, K, V, KVP, TAB, O, LSE, q0, r, h, TOK, WT, DHW, nWd, nWh, nWw, NB, qk_scale, zero, NH: tl.constexpr,
              DH: tl.constexpr, WD: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr, NP: tl.constexpr, MD,
              LAYOUT: tl.constexpr, HAS_PAD: tl.constexpr, IEEE: tl.constexpr, WPP: tl.constexpr, SKIP: tl.constexpr,
              BLOCK_M: tl.constexpr, BN: tl.constexpr, NKF: tl.constexpr, BNT: tl.constexpr):
    N: tl.constexpr = WD * WH * WW
    dcol = tl.arange(0, DH)
    nq = q0 + tl.arange(0, BLOCK_M)
    NWS = nWd * nWh * nWw
    smp, pos = _first_window(r * WPP, NB)
    for wl in range(WPP):
        real_q, row_q, row_o = _rows(nq, smp, pos, h, TOK, DHW, NWS, NH, DH, N, NP, LAYOUT)
        q = tl.load(Q + row_q[:, None] + dcol[None, :], mask=real_q[:, None], other=0.0)
        bias_h = _win_plane(TAB, WT, pos, h, NH, NP)
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, DH), tl.float32)
        # online softmax over the key tiles the shift mask leaves live (exp2 domain)
        a_qw = nq + wl * zero  # opaque to the compiler: the bias loads stay inside the window loop
        first, end, tail = _live_tiles(pos, q0, BLOCK_M, BN, NKF, nWd, nWh, nWw, MD, WD, WH, WW, SKIP)
        for i in range(end - first):  # from 0: a loop from `first` kept more registers live
            kt = first + i
            b = _bias_tile(bias_h, a_qw, kt * BN, BN, NP)
            m_i, l_i, acc = _fwd_kstep(q, b, m_i, l_i, acc, K, V, KVP, kt * BN, smp, pos, h, qk_scale, TOK, DHW, NWS,
                                       NH, DH, N, NP, LAYOUT, HAS_PAD, IEEE, BN, True)
        if BNT > 0:
            if tail:
                b = _bias_tile(bias_h, a_qw, NKF * BN, BNT, NP)
                m_i, l_i, acc = _fwd_kstep(q, b, m_i, l_i, acc, K, V, KVP, NKF * BN, smp, pos, h, qk_scale, TOK, DHW,
                                           NWS, NH, DH, N, NP, LAYOUT, HAS_PAD, IEEE, BNT, False)
        o = acc / l_i[:, None]
        tl.store(O + row_o[:, None] + dcol[None, :], _cvt(o, O.dtype.element_ty, IEEE), mask=real_q[:, None])
        tl.store(LSE + ((smp * NWS + pos) * NH + h).to(tl.int64) * N + nq, m_i + tl.math.log2(l_i), mask=nq < N)
        smp, pos = _next_window(smp, pos, NB)


@triton.jit(do_not_specialize=_RUNTIME)
def _fwd_kernel(Q, K, V, KVP, TAB, O, LSE, TOK, WT, DHW, nWd, nWh, nWw, NB, qk_scale, zero, NH: tl.constexpr,
                DH: tl.constexpr, WD: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr, NP: tl.constexpr, MD,
                LAYOUT: tl.constexpr, HAS_PAD: tl.constexpr, IEEE: tl.constexpr, WPP: tl.constexpr, SKIP: tl.constexpr,
                BM: tl.constexpr, NQF: tl.constexpr, BMT: tl.constexpr, NQT: tl.constexpr, BN: tl.constexpr,
                NKF: tl.constexpr, BNT: tl.constexpr):
    pid = tl.program_id(0)
    qt = pid % NQT
    h = (pid // NQT) % NH
    r = pid // (NQT * NH)
    if qt < NQF:
        _fwd_tile(Q, K, V, KVP, TAB, O, LSE, qt * BM, r, h, TOK, WT, DHW, nWd, nWh, nWw, NB, qk_scale, zero, NH, DH, WD,
                  WH, WW, NP, MD, LAYOUT, HAS_PAD, IEEE, WPP, SKIP, BM, BN, NKF, BNT)
    elif BMT > 0:  # a tail tile exists (constexpr: no dead zero-size tile is compiled)
        _fwd_tile(Q, K, V, KVP, TAB, O, LSE, NQF * BM, r, h, TOK, WT, DHW, nWd, nWh, nWw, NB, qk_scale, zero, NH, DH,
                  WD, WH, WW, NP, MD, LAYOUT, HAS_PAD, IEEE, WPP, SKIP, BMT, BN, NKF, BNT)


# ----------------------------------------------------------------------------- backward: dQ and delta
@triton.jit
def _dq_kstep(q, do, lse, delta, bias, dq, K, V, KVP, k0, smp, pos, h, qk_scale, TOK, DHW, NWS, NH: tl.constexpr,
              DH: tl.constexpr, N: tl.constexpr, NP: tl.constexpr, LAYOUT: tl.constexpr, HAS_PAD: tl.constexpr,
              IEEE: tl.constexpr, BLOCK_N: tl.constexpr, FULL: tl.constexpr):
    s, k, v = _key_scores(q, bias, K, V, KVP, k0 + tl.arange(0, BLOCK_N), smp, pos, h, qk_scale, TOK, DHW, NWS, NH, DH,
                          N, NP, LAYOUT, HAS_PAD, IEEE, FULL)
    p = tl.math.exp2(s - lse[:, None])
    dp = _dot(do, tl.trans(v), IEEE)
    ds = p * (dp - delta[:, None])  # dL/d(score), natural units
    return dq + _dot(_cvt(ds, k.dtype, IEEE), k, IEEE)


@triton.jit
def _dq_tile(Q, K, V, KVP, TAB, O, DO, LSE, DELTA, DQ, q0, r, h, TOK, WT, DHW, nWd, nWh, nWw, NB, qk_scale, sm_scale,
             zero, NH: tl.constexpr, DH: tl.constexpr, WD: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr,
             NP: tl.constexpr, MD, LAYOUT: tl.constexpr, HAS_PAD: tl.constexpr, IEEE: tl.constexpr, WPP: tl.constexpr,
             SKIP: tl.constexpr, BLOCK_M: tl.constexpr, BN: tl.constexpr, NKF: tl.constexpr, BNT: tl.constexpr):
    N: tl.constexpr = WD * WH * WW
    dcol = tl.arange(0, DH)
    nq = q0 + tl.arange(0, BLOCK_M)
    NWS = nWd * nWh * nWw
    smp, pos = _first_window(r * WPP, NB)
    for wl in range(WPP):
        real_q, row_q, row_o = _rows(nq, smp, pos, h, TOK, DHW, NWS, NH, DH, N, NP, LAYOUT)
        bias_h = _win_plane(TAB, WT, pos, h, NH, NP)
        # 1. delta = rowsum(dO * O) for this query tile, kept for the bias-gradient and dK/dV kernels
        q = tl.load(Q + row_q[:, None] + dcol[None, :], mask=real_q[:, None], other=0.0)
        do = tl.load(DO + row_o[:, None] + dcol[None, :], mask=real_q[:, None], other=0.0)
        o = tl.load(O + row_o[:, None] + dcol[None, :], mask=real_q[:, None], other=0.0)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        lrow = ((smp * NWS + pos) * NH + h).to(tl.int64) * N + nq
        tl.store(DELTA + lrow, delta, mask=nq < N)
        lse = tl.load(LSE + lrow, mask=nq < N, other=float("inf"))
        nqw = nq + wl * zero  # opaque to the compiler: the bias loads stay inside the window loop (L1 hits)
        # 2. dQ over the live key tiles, in registers
        dq = tl.zeros((BLOCK_M, DH), tl.float32)
        first, end, tail = _live_tiles(pos, q0, BLOCK_M, BN, NKF, nWd, nWh, nWw, MD, WD, WH, WW, SKIP)
        for i in range(end - first):  # from 0: a loop from `first` kept more registers live
            kt = first + i
            b = _bias_tile(bias_h, nqw, kt * BN, BN, NP)
            dq = _dq_kstep(q, do, lse, delta, b, dq, K, V, KVP, kt * BN, smp, pos, h, qk_scale, TOK, DHW, NWS, NH, DH,
                           N, NP, LAYOUT, HAS_PAD, IEEE, BN, True)
        if BNT > 0:
            if tail:
                b = _bias_tile(bias_h, nqw, NKF * BN, BNT, NP)
                dq = _dq_kstep(q, do, lse, delta, b, dq, K, V, KVP, NKF * BN, smp, pos, h, qk_scale, TOK, DHW, NWS, NH,
                               DH, N, NP, LAYOUT, HAS_PAD, IEEE, BNT, False)
        tl.store(DQ + row_q[:, None] + dcol[None, :], _cvt(dq * sm_scale, DQ.dtype.element_ty, IEEE),
                 mask=real_q[:, None])
        smp, pos = _next_window(smp, pos, NB)


@triton.jit(do_not_specialize=_RUNTIME)
def _bwd_dq_kernel(Q, K, V, KVP, TAB, O, DO, LSE, DELTA, DQ, TOK, WT, DHW, nWd, nWh, nWw, NB, qk_scale, sm_scale, zero,
                   NH: tl.constexpr, DH: tl.constexpr, WD: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr,
                   NP: tl.constexpr, MD, LAYOUT: tl.constexpr, HAS_PAD: tl.constexpr, IEEE: tl.constexpr,
                   WPP: tl.constexpr, SKIP: tl.constexpr, BM: tl.constexpr, NQF: tl.constexpr, BMT: tl.constexpr,
                   NQT: tl.constexpr, BN: tl.constexpr, NKF: tl.constexpr, BNT: tl.constexpr):
    pid = tl.program_id(0)
    qt = pid % NQT
    h = (pid // NQT) % NH
    r = pid // (NQT * NH)
    if qt < NQF:
        _dq_tile(Q, K, V, KVP, TAB, O, DO, LSE, DELTA, DQ, qt * BM, r, h, TOK, WT, DHW, nWd, nWh, nWw, NB, qk_scale,
                 sm_scale, zero, NH, DH, WD, WH, WW, NP, MD, LAYOUT, HAS_PAD, IEEE, WPP, SKIP, BM, BN, NKF, BNT)
    elif BMT > 0:  # a tail tile exists (constexpr: no dead zero-size tile is compiled)
        _dq_tile(Q, K, V, KVP, TAB, O, DO, LSE, DELTA, DQ, NQF * BM, r, h, TOK, WT, DHW, nWd, nWh, nWw, NB, qk_scale,
                 sm_scale, zero, NH, DH, WD, WH, WW, NP, MD, LAYOUT, HAS_PAD, IEEE, WPP, SKIP, BMT, BN, NKF,
                 BNT)


# ----------------------------------------------------------------------------- backward: bias-gradient partials
@triton.jit
def _dbias_tile(Q, K, V, KVP, TAB, DO, LSE, DELTA, DBP, q0, k0, r, h, TOK, WT, DHW, nWd, nWh, nWw, NB, qk_scale, zero,
                NH: tl.constexpr, DH: tl.constexpr, WD: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr,
                NP: tl.constexpr, MD, LAYOUT: tl.constexpr, HAS_PAD: tl.constexpr, IEEE: tl.constexpr,
                WPP: tl.constexpr, SKIP: tl.constexpr, NQP: tl.constexpr, NKP: tl.constexpr, BLOCK_M: tl.constexpr,
                FULL_Q: tl.constexpr, BLOCK_N: tl.constexpr, FULL_K: tl.constexpr):
    """dS of one (query tile, key tile) pair summed over the WPP windows of range r, in one fp32 register tile:
    the bias gradient is reduced over windows before anything is written (one plane per range, no atomics).
    FULL_Q / FULL_K: the query / key tile holds no tile padding (q0 + BLOCK_M <= N)."""
    N: tl.constexpr = WD * WH * WW
    dcol = tl.arange(0, DH)
    nq = q0 + tl.arange(0, BLOCK_M)
    nk = k0 + tl.arange(0, BLOCK_N)
    NWS = nWd * nWh * nWw
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    n_win = WPP
    if SKIP:
        # a pair the D shift mask separates (see _live_tiles) has dS = 0 in every last window along D; those are
        # the windows j >= j_last of the position-major order (_first_window), so the range stops there
        on, split, pos_last = _depth_split(MD, nWd, nWh, nWw, WD, WH, WW)
        sep = on & (((q0 + BLOCK_M <= split) & (k0 >= split)) | ((q0 >= split) & (k0 + BLOCK_N <= split)))
        j_last = pos_last * NB
        n_win = tl.where(sep, tl.minimum(tl.maximum(j_last - r * WPP, 0), WPP), WPP)
    smp, pos = _first_window(r * WPP, NB)
    for wl in range(n_win):
        real_q, row_q, row_o = _rows(nq, smp, pos, h, TOK, DHW, NWS, NH, DH, N, NP, LAYOUT)
        q = _token_rows(Q, row_q, dcol, real_q, HAS_PAD | (not FULL_Q))
        do = _token_rows(DO, row_o, dcol, real_q, HAS_PAD | (not FULL_Q))
        lrow = ((smp * NWS + pos) * NH + h).to(tl.int64) * N + nq
        lse = _row_vec(LSE, lrow, nq, N, float("inf"), FULL_Q)  # padded query rows: p = 0
        delta = _row_vec(DELTA, lrow, nq, N, 0.0, FULL_Q)
        # the window type's plane: the tile is reloaded per window (L1 / L2 hits; windows of one type share it)
        bias = _bias_tile(_win_plane(TAB, WT, pos, h, NH, NP), nq + wl * zero, k0, BLOCK_N, NP)
        s, k, v = _key_scores(q, bias, K, V, KVP, nk, smp, pos, h, qk_scale, TOK, DHW, NWS, NH, DH, N, NP, LAYOUT,
                              HAS_PAD, IEEE, FULL_K)
        p = tl.math.exp2(s - lse[:, None])
        dp = _dot(do, tl.trans(v), IEEE)
        acc += p * (dp - delta[:, None])
        smp, pos = _next_window(smp, pos, NB)
    base = DBP + (r * NH + h).to(tl.int64) * (NQP * NKP)
    tl.store(base + nq[:, None] * NKP + nk[None, :], acc)


@triton.jit(do_not_specialize=_RUNTIME)
def _bwd_dbias_kernel(Q, K, V, KVP, TAB, DO, LSE, DELTA, DBP, TOK, WT, DHW, nWd, nWh, nWw, NB, qk_scale, zero,
                      NH: tl.constexpr, DH: tl.constexpr, WD: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr,
                      NP: tl.constexpr, MD, LAYOUT: tl.constexpr, HAS_PAD: tl.constexpr, IEEE: tl.constexpr,
                      WPP: tl.constexpr, SKIP: tl.constexpr, NQP: tl.constexpr, NKP: tl.constexpr,
                      BM: tl.constexpr, NQF: tl.constexpr, BMT: tl.constexpr, NQT: tl.constexpr,
                      BN: tl.constexpr, NKF: tl.constexpr, BNT: tl.constexpr, NKT: tl.constexpr):
    pid = tl.program_id(0)
    qt = pid % NQT
    kt = (pid // NQT) % NKT
    h = (pid // (NQT * NKT)) % NH
    r = pid // (NQT * NKT * NH)
    if qt < NQF:
        if kt < NKF:
            _dbias_tile(Q, K, V, KVP, TAB, DO, LSE, DELTA, DBP, qt * BM, kt * BN, r, h, TOK, WT, DHW, nWd, nWh, nWw, NB,
                        qk_scale, zero, NH, DH, WD, WH, WW, NP, MD, LAYOUT, HAS_PAD, IEEE, WPP, SKIP, NQP,
                        NKP, BM, True, BN, True)
        elif BNT > 0:
            _dbias_tile(Q, K, V, KVP, TAB, DO, LSE, DELTA, DBP, qt * BM, NKF * BN, r, h, TOK, WT, DHW, nWd, nWh, nWw,
                        NB, qk_scale, zero, NH, DH, WD, WH, WW, NP, MD, LAYOUT, HAS_PAD, IEEE, WPP, SKIP, NQP, NKP, BM,
                        True, BNT, False)
    elif BMT > 0:
        if kt < NKF:
            _dbias_tile(Q, K, V, KVP, TAB, DO, LSE, DELTA, DBP, NQF * BM, kt * BN, r, h, TOK, WT, DHW, nWd, nWh, nWw,
                        NB, qk_scale, zero, NH, DH, WD, WH, WW, NP, MD, LAYOUT, HAS_PAD, IEEE, WPP, SKIP, NQP, NKP, BMT,
                        False, BN, True)
        elif BNT > 0:
            _dbias_tile(Q, K, V, KVP, TAB, DO, LSE, DELTA, DBP, NQF * BM, NKF * BN, r, h, TOK, WT, DHW, nWd, nWh, nWw,
                        NB, qk_scale, zero, NH, DH, WD, WH, WW, NP, MD, LAYOUT, HAS_PAD, IEEE, WPP, SKIP, NQP, NKP, BMT,
                        False, BNT, False)


# ----------------------------------------------------------------------------- backward: dK, dV
@triton.jit
def _kv_qstep(k, v, bias, dk, dv, Q, DO, LSE, DELTA, q0, smp, pos, h, qk_scale, TOK, DHW, NWS, NH: tl.constexpr,
              DH: tl.constexpr, N: tl.constexpr, NP: tl.constexpr, LAYOUT: tl.constexpr, HAS_PAD: tl.constexpr,
              IEEE: tl.constexpr, BLOCK_M: tl.constexpr, FULL: tl.constexpr):
    """dK, dV += the contributions of the query tile at q0 (FULL: no tile padding in it) to the key tile k, v."""
    dcol = tl.arange(0, DH)
    nq = q0 + tl.arange(0, BLOCK_M)
    real_q, row_q, row_o = _rows(nq, smp, pos, h, TOK, DHW, NWS, NH, DH, N, NP, LAYOUT)
    q = _token_rows(Q, row_q, dcol, real_q, HAS_PAD | (not FULL))
    do = _token_rows(DO, row_o, dcol, real_q, HAS_PAD | (not FULL))
    lrow = ((smp * NWS + pos) * NH + h).to(tl.int64) * N + nq
    lse = _row_vec(LSE, lrow, nq, N, 0.0, FULL)
    delta = _row_vec(DELTA, lrow, nq, N, 0.0, FULL)
    # transposed scores: rows = keys, columns = queries (padded query columns are -inf in the bias)
    st = _dot(k, tl.trans(q), IEEE) * qk_scale + bias
    pt = tl.math.exp2(st - lse[None, :])
    dv += _dot(_cvt(pt, do.dtype, IEEE), do, IEEE)
    dpt = _dot(v, tl.trans(do), IEEE)
    dst = pt * (dpt - delta[None, :])
    dk += _dot(_cvt(dst, q.dtype, IEEE), q, IEEE)
    return dk, dv


@triton.jit
def _dkdv_tile(Q, K, V, KVP, TAB, DO, LSE, DELTA, DK, DV, DKVP, k0, kt, r, h, TOK, WT, DHW, nWd, nWh, nWw, NB, qk_scale,
               sm_scale, zero, NH: tl.constexpr, DH: tl.constexpr, WD: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr,
               NP: tl.constexpr, MD, LAYOUT: tl.constexpr, HAS_PAD: tl.constexpr, IEEE: tl.constexpr,
               WPP: tl.constexpr, SKIP: tl.constexpr, NKT: tl.constexpr, BM: tl.constexpr, NQF: tl.constexpr,
               BMT: tl.constexpr, BLOCK_N: tl.constexpr, FULL_K: tl.constexpr):
    N: tl.constexpr = WD * WH * WW
    dcol = tl.arange(0, DH)
    nk = k0 + tl.arange(0, BLOCK_N)
    NWS = nWd * nWh * nWw
    dkp = tl.zeros((DH,), tl.float32)
    dvp = tl.zeros((DH,), tl.float32)
    smp, pos = _first_window(r * WPP, NB)
    for wl in range(WPP):
        real_k, row_k, _ = _rows(nk, smp, pos, h, TOK, DHW, NWS, NH, DH, N, NP, LAYOUT)
        k, v = _load_kv(K, V, KVP, h, nk, real_k, row_k, dcol, NH, DH, N, HAS_PAD, IEEE, FULL_K)
        bias_h = _win_plane(TAB, WT, pos, h, NH, NP)  # transposed planes: rows = keys
        dk = tl.zeros((BLOCK_N, DH), tl.float32)
        dv = tl.zeros((BLOCK_N, DH), tl.float32)
        # every query tile of the window the shift mask leaves live: dK, dV in registers
        a_kw = nk + wl * zero  # opaque to the compiler: the bias loads stay inside the window loop
        first, end, tail = _live_tiles(pos, k0, BLOCK_N, BM, NQF, nWd, nWh, nWw, MD, WD, WH, WW, SKIP)
        for i in range(end - first):  # from 0: a loop from `first` kept more registers live
            qt = first + i
            b = _bias_tile(bias_h, a_kw, qt * BM, BM, NP)
            dk, dv = _kv_qstep(k, v, b, dk, dv, Q, DO, LSE, DELTA, qt * BM, smp, pos, h, qk_scale, TOK, DHW, NWS, NH,
                               DH, N, NP, LAYOUT, HAS_PAD, IEEE, BM, True)
        if BMT > 0:
            if tail:
                b = _bias_tile(bias_h, a_kw, NQF * BM, BMT, NP)
                dk, dv = _kv_qstep(k, v, b, dk, dv, Q, DO, LSE, DELTA, NQF * BM, smp, pos, h, qk_scale, TOK, DHW, NWS,
                                   NH, DH, N, NP, LAYOUT, HAS_PAD, IEEE, BMT, False)
        dk = dk * sm_scale
        tl.store(DK + row_k[:, None] + dcol[None, :], _cvt(dk, DK.dtype.element_ty, IEEE), mask=real_k[:, None])
        tl.store(DV + row_k[:, None] + dcol[None, :], _cvt(dv, DV.dtype.element_ty, IEEE), mask=real_k[:, None])
        if HAS_PAD:
            # padded tokens' k, v are kv_pad: their gradients are summed into this program's partial
            pad = ((nk < N) & (real_k == 0))[:, None]
            dkp += tl.sum(tl.where(pad, dk, 0.0), 0)
            dvp += tl.sum(tl.where(pad, dv, 0.0), 0)
        smp, pos = _next_window(smp, pos, NB)
    if HAS_PAD:
        base = DKVP + ((r * NH + h).to(tl.int64) * NKT + kt) * (2 * DH)
        tl.store(base + dcol, dkp)
        tl.store(base + DH + dcol, dvp)


@triton.jit(do_not_specialize=_RUNTIME)
def _bwd_dkdv_kernel(Q, K, V, KVP, TAB, DO, LSE, DELTA, DK, DV, DKVP, TOK, WT, DHW, nWd, nWh, nWw, NB, qk_scale,
                     sm_scale, zero, NH: tl.constexpr, DH: tl.constexpr, WD: tl.constexpr, WH: tl.constexpr,
                     WW: tl.constexpr, NP: tl.constexpr, MD, LAYOUT: tl.constexpr, HAS_PAD: tl.constexpr,
                     IEEE: tl.constexpr, WPP: tl.constexpr, SKIP: tl.constexpr, BM: tl.constexpr, NQF: tl.constexpr,
                     BMT: tl.constexpr, BN: tl.constexpr, NKF: tl.constexpr, BNT: tl.constexpr, NKT: tl.constexpr):
    pid = tl.program_id(0)
    kt = pid % NKT
    h = (pid // NKT) % NH
    r = pid // (NKT * NH)
    if kt < NKF:
        _dkdv_tile(Q, K, V, KVP, TAB, DO, LSE, DELTA, DK, DV, DKVP, kt * BN, kt, r, h, TOK, WT, DHW, nWd, nWh, nWw, NB,
                   qk_scale, sm_scale, zero, NH, DH, WD, WH, WW, NP, MD, LAYOUT, HAS_PAD, IEEE, WPP, SKIP, NKT,
                   BM, NQF, BMT, BN, True)
    elif BNT > 0:  # a tail tile exists (constexpr: no dead zero-size tile is compiled)
        _dkdv_tile(Q, K, V, KVP, TAB, DO, LSE, DELTA, DK, DV, DKVP, NKF * BN, kt, r, h, TOK, WT, DHW, nWd, nWh, nWw, NB,
                   qk_scale, sm_scale, zero, NH, DH, WD, WH, WW, NP, MD, LAYOUT, HAS_PAD, IEEE, WPP, SKIP, NKT,
                   BM, NQF, BMT, BNT, False)


# ----------------------------------------------------------------------------- backward: one-tile windows
@triton.jit(do_not_specialize=_RUNTIME)
def _bwd_window_kernel(Q, K, V, KVP, TAB, O, DO, LSE, DQ, DK, DV, DBP, DKVP, TOK, WT, DHW, nWd, nWh, nWw, NB, qk_scale,
                       sm_scale, zero, NH: tl.constexpr, DH: tl.constexpr, WD: tl.constexpr, WH: tl.constexpr,
                       WW: tl.constexpr, NP: tl.constexpr, MD, LAYOUT: tl.constexpr,
                       HAS_PAD: tl.constexpr, IEEE: tl.constexpr, WPP: tl.constexpr, BT: tl.constexpr):
    """The whole backward of windows that fit one BT x BT tile (N <= BT: the 49-token image windows), one
    program per (head, range of WPP windows). With every query and key of a window in the program, dQ, dK,
    dV, the bias-gradient partial and the kv_pad partial all come from one recompute of P: one pass over the
    scores instead of the three of the dQ, bias-gradient and dK/dV kernels (and no delta round trip)."""
    N: tl.constexpr = WD * WH * WW
    pid = tl.program_id(0)
    h = pid % NH
    r = pid // NH
    dcol = tl.arange(0, DH)
    n = tl.arange(0, BT)  # the window's tokens, as queries (rows) and as keys (columns)
    NWS = nWd * nWh * nWw
    dbacc = tl.zeros((BT, BT), tl.float32)
    dkp = tl.zeros((DH,), tl.float32)
    dvp = tl.zeros((DH,), tl.float32)
    smp, pos = _first_window(r * WPP, NB)
    for wl in range(WPP):
        real, row, row_o = _rows(n, smp, pos, h, TOK, DHW, NWS, NH, DH, N, NP, LAYOUT)
        q = tl.load(Q + row[:, None] + dcol[None, :], mask=real[:, None], other=0.0)
        do = tl.load(DO + row_o[:, None] + dcol[None, :], mask=real[:, None], other=0.0)
        o = tl.load(O + row_o[:, None] + dcol[None, :], mask=real[:, None], other=0.0)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        # padded rows: p = 0
        lse = tl.load(LSE + ((smp * NWS + pos) * NH + h).to(tl.int64) * N + n, mask=n < N, other=float("inf"))
        # opaque to the compiler: the bias tile is reloaded per window (an L1 hit) instead of held in 32 more
        # registers across the loop (hoisted, the kernel spilled more)
        bias = _bias_tile(_win_plane(TAB, WT, pos, h, NH, NP), n + wl * zero, 0, BT, NP)
        s, k, v = _key_scores(q, bias, K, V, KVP, n, smp, pos, h, qk_scale, TOK, DHW, NWS, NH, DH, N, NP, LAYOUT,
                              HAS_PAD, IEEE, N == BT)
        p = tl.math.exp2(s - lse[:, None])
        ds = p * (_dot(do, tl.trans(v), IEEE) - delta[:, None])  # dL/d(score), natural units
        dbacc += ds
        ds_lo = _cvt(ds, q.dtype, IEEE)
        dq = _dot(ds_lo, k, IEEE) * sm_scale
        dk = _dot(tl.trans(ds_lo), q, IEEE) * sm_scale
        dv = _dot(tl.trans(_cvt(p, do.dtype, IEEE)), do, IEEE)
        keep = real[:, None]
        tl.store(DQ + row[:, None] + dcol[None, :], _cvt(dq, DQ.dtype.element_ty, IEEE), mask=keep)
        tl.store(DK + row[:, None] + dcol[None, :], _cvt(dk, DK.dtype.element_ty, IEEE), mask=keep)
        tl.store(DV + row[:, None] + dcol[None, :], _cvt(dv, DV.dtype.element_ty, IEEE), mask=keep)
        if HAS_PAD:  # padded tokens' k, v are kv_pad: their gradients are summed into this program's partial
            pad = ((n < N) & (real == 0))[:, None]
            dkp += tl.sum(tl.where(pad, dk, 0.0), 0)
            dvp += tl.sum(tl.where(pad, dv, 0.0), 0)
        smp, pos = _next_window(smp, pos, NB)
    base = DBP + (r * NH + h).to(tl.int64) * (BT * BT)  # one plane per range and head, as _bwd_dbias_kernel's
    tl.store(base + n[:, None] * BT + n[None, :], dbacc)
    if HAS_PAD:
        base = DKVP + (r * NH + h).to(tl.int64) * (2 * DH)
        tl.store(base + dcol, dkp)
        tl.store(base + DH + dcol, dvp)


# ----------------------------------------------------------------------------- bias planes from the table
@triton.jit
def _expand_bias_kernel(TABT, IDX, MSK, OUT, L, NP: tl.constexpr, T: tl.constexpr, RB: tl.constexpr,
                        BLOCK: tl.constexpr):
    """OUT[p, t, h, i, :] = TABT[h, IDX[p, i, :]] * log2(e), plus the official -100 (x log2 e) where MSK[t, i, :]
    is set (window type t's shift mask), in OUT's dtype; IDX -1: -inf (padded column), -2: 0 (padded row).
    TABT: the (L, NH) table transposed, (NH, L) contiguous, so that one head's gathers stay within one row.
    One program per (block of RB rows i, head h, plane p); p = 0: bias(i, j), p = 1: transposed (the mask is
    symmetric). The index rows and the table gather are shared by the T types' planes (the writes, T planes
    per head, are what the launch costs)."""
    rows = tl.program_id(0) * RB + tl.arange(0, RB)
    h = tl.program_id(1)
    NH = tl.num_programs(1)
    p = tl.program_id(2)
    cols = tl.arange(0, BLOCK)
    live = (rows[:, None] < NP) & (cols[None, :] < NP)
    off = rows[:, None] * NP + cols[None, :]
    idx = tl.load(IDX + p * (NP * NP) + off, mask=live, other=-2)
    val = tl.load(TABT + h * L + idx, mask=live & (idx >= 0), other=0.0).to(tl.float32) * LOG2E_K
    val = tl.where(idx == -1, float("-inf"), val)
    for t in tl.static_range(T):
        msk = tl.load(MSK + t * (NP * NP) + off, mask=live, other=0)
        out = tl.where(msk != 0, val + MASK2, val)
        base = ((p * T + t) * NH + h).to(tl.int64) * (NP * NP)
        tl.store(OUT + base + off, out.to(OUT.dtype.element_ty), mask=live)


# ----------------------------------------------------------------------------- bias-table gradient gather
@triton.jit
def _table_grad_kernel(DBS, ORDER, OFFS, DT, L, NH: tl.constexpr, PLANE: tl.constexpr, BL: tl.constexpr,
                       CH: tl.constexpr):
    """DT[l, h] = sum_{c < count(l)} DBS[h].flat[ORDER[OFFS[l] + c]], in a fixed order. DBS (NH, NQP, NKP):
    the bias-gradient partials already summed over the ranges of windows. A block of BL table rows loops
    only as far as its own longest row (rows the geometry never uses, e.g. every dt != 0 row on the image
    path, cost one load of their offsets)."""
    lb = tl.program_id(0)
    h = tl.program_id(1)
    rows = lb * BL + tl.arange(0, BL)
    live = rows < L
    start = tl.load(OFFS + rows, mask=live, other=0)
    end = tl.load(OFFS + rows + 1, mask=live, other=0)
    acc = tl.zeros((BL,), tl.float32)
    plane = DBS + h.to(tl.int64) * PLANE
    for c in range(0, tl.max(end - start, 0), CH):
        j = start[:, None] + c + tl.arange(0, CH)[None, :]
        m = j < end[:, None]
        pair = tl.load(ORDER + j, mask=m, other=0)
        acc += tl.sum(tl.load(plane + pair, mask=m, other=0.0), 1)
    tl.store(DT + rows * NH + h, acc, mask=live)
