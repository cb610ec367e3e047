"""Triton masked-token cross-entropy fused with the LM head (``bevt.ops.masked_ce``'s ``triton`` backend).

Shape legend: N tokens (B*L), M masked tokens (known only on the device), D hidden size, V codebook size,
C rows of one chunk (C <= C_max, a host-side bound).

Design (docs/kernels/masked_ce.md has the measurements and the reasoning):

* No host sync. ``csum_N = cumsum(mask)`` stays on the device; M = csum_N[-1]. A prep kernel writes the
  compact list of masked token ids ``idx_M`` and a chunk table (first row, row count) for the chunks the
  host will launch. The host launches ``ceil(N / C_max)`` chunks, or ``ceil(max_rows / C_max)`` when the
  caller bounds the masked count (the BEVT masks have a known bound: half the chunks of the video stream's
  worst case); chunks past M find a row count of 0 in the table and return at once, but each still costs
  four launches (~14 us on an H100). More masked rows than the bound give NaN outputs (no sync to check).
* Three GEMMs, one bounded logits chunk. Per chunk of C masked rows (four launches):
    1. ``_gather_kernel``: the chunk's hidden rows H[idx] copied into a compact buffer H_chunk (the logits'
       A operand, read through a tensor descriptor, and the dW tiles' B operand).
    2. ``_logits_kernel``: logits_CV = H_chunk @ W^T + b in the head's dtype, written to one chunk buffer of
       C_max x V (the only large temporary).
    3. ``_ce_rows_kernel``: streaming, RB whole rows per program in BC-column steps: an online pass for the
       log-sum-exp and the first argmax, loss and hit per row, then (gradients wanted) a second pass that
       overwrites the chunk with ``softmax - onehot`` (dS).
    4. ``_grad_kernel``: one launch with two kinds of tiles: dH tiles (dS_CV @ W_VD, scattered to the
       token rows of grad_hidden) first, because each is 4x longer, then dW tiles (dS^T @ H_chunk,
       accumulated over chunks in fp32; the first column of tiles also sums dS into db).
  Gradients are computed during the forward, scaled by 1/max(M, 1), because the loss is a scalar; the
  backward multiplies them by grad_output in place, and skips all memory traffic when grad_output == 1
  (read on the device). Nothing of this runs when no gradient is needed.
* A final one-program kernel reduces the per-row losses and hits in a fixed order (deterministic).

Every kernel runs compiled on CUDA, or in Triton's interpreter on CPU tensors (tests; TRITON_INTERPRET=1 must be
set before triton is imported).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from bevt.kernels._launch import CachedKernel as _Kernel

__all__ = ["masked_ce", "masked_ce_forward", "default_config", "chunk_bound", "interpreter_ready",
           "config_override"]

# the logits chunk's budget: C_max * V * element size stays within this. On top come the head weight cast
# to the hidden dtype (V * D * 2 bytes: 16 MiB at 8192 x 1024) and the compact rows of the chunk (C_max * D * 2):
# about 57 MiB in all at the BEVT-B shape.
CHUNK_BUDGET_BYTES = 36 * 2 ** 20


def interpreter_ready() -> bool:
    """True when this process imported triton in interpreter mode (CPU tensors can run the kernels)."""
    return isinstance(_final.fn, InterpretedFunction) and isinstance(tl.zeros, InterpretedFunction)


# ============================================================================ kernels
def _prep_kernel(csum_ptr, idx_ptr, tab_ptr, dh_ptr, N, D, stride_dh, n_chunks, chunk_cap,
                 ZERO_DH: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr, NCB: tl.constexpr,
                 ALIGN: tl.constexpr):
    """Masked token ids, chunk table, zero grad rows of unmasked tokens.

    csum_ptr: int32 [N] inclusive cumsum of the mask. idx_ptr: int32 [N] out, idx[j] = token of the j-th
    masked row (j < M). tab_ptr: int32 [2*n_chunks] out, (first masked row, row count) per host chunk:
    ceil(M / chunk_cap) chunks of equal size rounded up to ALIGN rows, the rest empty. dh_ptr: [N, D]
    grad of hidden (ZERO_DH only): rows of unmasked tokens are set to 0 here.
    """
    pid = tl.program_id(0)
    # 1. compact list of masked rows
    rows = pid * BR + tl.arange(0, BR)
    inb = rows < N
    c = tl.load(csum_ptr + rows, mask=inb, other=0)
    cprev = tl.load(csum_ptr + rows - 1, mask=inb & (rows > 0), other=0)
    is_m = inb & (c != cprev)
    tl.store(idx_ptr + (c - 1), rows, mask=is_m)
    # 2. zero the gradient rows of unmasked tokens (masked rows are written by the dH tiles)
    if ZERO_DH:
        keep = inb & (c == cprev)
        rows64 = rows.to(tl.int64)
        for d0 in range(0, D, BD):
            cols = d0 + tl.arange(0, BD)
            ptrs = dh_ptr + rows64[:, None] * stride_dh + cols[None, :]
            tl.store(ptrs, tl.zeros((BR, BD), dtype=dh_ptr.dtype.element_ty),
                     mask=keep[:, None] & (cols[None, :] < D))
    # 3. chunk table, from M read on the device
    if pid == 0:
        m_tot = tl.load(csum_ptr + N - 1)
        n_act = (m_tot + chunk_cap - 1) // chunk_cap
        n_div = tl.maximum(n_act, 1)
        per = (m_tot + n_div - 1) // n_div
        per = (per + ALIGN - 1) // ALIGN * ALIGN
        cs = tl.arange(0, NCB)
        r0 = cs * per
        cnt = tl.minimum(tl.maximum(m_tot - r0, 0), per)
        tl.store(tab_ptr + 2 * cs, r0, mask=cs < n_chunks)
        tl.store(tab_ptr + 2 * cs + 1, cnt, mask=cs < n_chunks)


def _gather_kernel(h_ptr, stride_h, idx_ptr, tab_ptr, hc_ptr, stride_hc, lg_ptr, stride_l, c_rows, V, D, chunk,
                   ZERO_LG: tl.constexpr, GR: tl.constexpr, BD: tl.constexpr, ZB: tl.constexpr):
    """Compact rows of one chunk: hc[i] = H[idx[r0 + i]] for i < count (hc_ptr [c_rows, D]).

    Rows [count, count rounded up to ZB) of hc, and with ZERO_LG of the logits chunk lg_ptr [c_rows, *], are
    zeroed, so that the dW tiles read whole blocks of K rows without masks. GR rows per program.
    """
    pid = tl.program_id(0)
    r0 = tl.load(tab_ptr + 2 * chunk)
    rows_c = tl.load(tab_ptr + 2 * chunk + 1)
    rows = pid * GR + tl.arange(0, GR)
    r_ok = rows < rows_c
    z_ok = (rows >= rows_c) & (rows < (rows_c + ZB - 1) // ZB * ZB) & (rows < c_rows)
    if pid * GR < (rows_c + ZB - 1) // ZB * ZB:
        tok = tl.load(idx_ptr + r0 + rows, mask=r_ok, other=0).to(tl.int64)
        rows64 = rows.to(tl.int64)
        for d0 in range(0, D, BD):
            cd = d0 + tl.arange(0, BD)
            d_ok = cd[None, :] < D
            x = tl.load(h_ptr + tok[:, None] * stride_h + cd[None, :], mask=r_ok[:, None] & d_ok, other=0.0)
            tl.store(hc_ptr + rows64[:, None] * stride_hc + cd[None, :], x, mask=(r_ok[:, None] | z_ok[:, None]) & d_ok)
        if ZERO_LG:
            for v0 in range(0, V, BD):
                cv = v0 + tl.arange(0, BD)
                tl.store(lg_ptr + rows64[:, None] * stride_l + cv[None, :],
                         tl.zeros((GR, BD), dtype=lg_ptr.dtype.element_ty), mask=z_ok[:, None] & (cv[None, :] < V))


def _logits_kernel(h_ptr, stride_h, idx_ptr, tab_ptr, a_desc, w_ptr, stride_w, w_desc, b_ptr, out_ptr, stride_o,
                   V, D, chunk, HAS_BIAS: tl.constexpr, USE_TMA: tl.constexpr, EVEN_K: tl.constexpr,
                   DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                   BK: tl.constexpr):
    """logits[i, v] = sum_d H[idx[r0 + i], d] * W[v, d] + b[v], for chunk rows i < count, in H's dtype.

    h_ptr: [N, D] hidden (row stride stride_h), its rows gathered through idx; or (USE_TMA) a_desc, a tensor
    descriptor of the chunk's compact rows hc [C_max, D] with block [BM, BK]. w_ptr: [V, D] head weight
    already in H's dtype; w_desc (USE_TMA): its descriptor with block [BN, BK]. b_ptr: [V] bias (any float
    dtype; it is rounded to H's dtype first, as F.linear in that dtype does). out_ptr: [C_max, *] logits
    chunk, row stride stride_o. Grid: ceil(C_max / BM) * ceil(V / BN), row-block major (one row block's tiles
    run together). A plain GEMM epilogue: the softmax statistics are the per-row pass's job (session 16: the
    per-tile max, sum of exp, argmax and target logit here cost more than reading the rows once more there).
    """
    pid = tl.program_id(0)
    num_n = tl.cdiv(V, BN)
    pid_m = pid // num_n
    pid_n = pid % num_n
    r0 = tl.load(tab_ptr + 2 * chunk)
    rows_c = tl.load(tab_ptr + 2 * chunk + 1)
    if pid_m * BM >= rows_c:
        return
    offs_m = pid_m * BM + tl.arange(0, BM)
    m_ok = offs_m < rows_c
    # 1. gathered row pointers (invalid rows read token 0: valid memory, never stored)
    hrow = tl.load(idx_ptr + r0 + offs_m, mask=m_ok, other=0).to(tl.int64)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_nl = (offs_n % V).to(tl.int64)
    offs_k = tl.arange(0, BK)
    a_ptrs = h_ptr + hrow[:, None] * stride_h + offs_k[None, :]
    b_ptrs = w_ptr + offs_nl[None, :] * stride_w + offs_k[:, None]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    # 2. main loop over the hidden size
    for k in range(0, tl.cdiv(D, BK)):
        if USE_TMA:  # out-of-bounds parts of a block read as zeros
            a = a_desc.load([pid_m * BM, k * BK])
            b = w_desc.load([pid_n * BN, k * BK]).T
        elif EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            a = tl.load(a_ptrs, mask=offs_k[None, :] < D - k * BK, other=0.0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < D - k * BK, other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
        a_ptrs += BK
        b_ptrs += BK
    # 3. epilogue: bias in H's dtype, round to H's dtype, store the chunk rows
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_nl).to(out_ptr.dtype.element_ty).to(tl.float32)
        acc += bias[None, :]
    o_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_o + offs_n[None, :]
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & (offs_n[None, :] < V))


def _ce_rows_kernel(lg_ptr, stride_l, tgt_ptr, idx_ptr, tab_ptr, loss_ptr, hit_ptr, V, chunk,
                    WRITE_GRAD: tl.constexpr, RB: tl.constexpr, BC: tl.constexpr):
    """Loss, hit and dS = softmax - onehot for RB whole rows of the chunk per program, from the logits alone.

    Two sweeps over the row block in BC-column steps: the first keeps the running max, the sum of exp and the
    first argmax (online), the second (WRITE_GRAD) overwrites the chunk lg_ptr [C_max, *] with
    exp(x - lse) - onehot; the row block is read twice, the second time mostly from L2. The target's logit is
    one load per row. loss_ptr / hit_ptr [N] are written at the rows' masked index r0 + i (loss NaN for a
    target outside [0, V)).
    """
    pid = tl.program_id(0)
    r0 = tl.load(tab_ptr + 2 * chunk)
    rows_c = tl.load(tab_ptr + 2 * chunk + 1)
    if pid * RB < rows_c:
        rows = pid * RB + tl.arange(0, RB)
        r_ok = rows < rows_c
        base = lg_ptr + rows.to(tl.int64)[:, None] * stride_l
        m = tl.full((RB,), -float("inf"), tl.float32)
        s = tl.zeros((RB,), tl.float32)
        am = tl.zeros((RB,), tl.int32)
        for c0 in range(0, V, BC):
            cols = c0 + tl.arange(0, BC)
            x = tl.load(base + cols[None, :], mask=r_ok[:, None] & (cols[None, :] < V), other=-float("inf"))
            x = x.to(tl.float32)
            bm = tl.max(x, axis=1)
            bi = tl.min(tl.where(x == bm[:, None], cols[None, :], V), axis=1)  # first argmax of the block
            m_new = tl.maximum(m, bm)
            m_ref = tl.where(m_new > -float("inf"), m_new, 0.0)  # rows past the count: no inf - inf
            s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(x - m_ref[:, None]), axis=1)
            am = tl.where(bm > m, bi, am)  # strictly greater: an earlier block keeps a tie
            m = m_new
        lse = tl.where(r_ok, m + tl.log(s), 0.0)
        tok = tl.load(idx_ptr + r0 + rows, mask=r_ok, other=0).to(tl.int64)
        t = tl.load(tgt_ptr + tok, mask=r_ok, other=-1).to(tl.int32)
        t_ok = (t >= 0) & (t < V)
        xt = tl.load(base + tl.where(t_ok, t, 0)[:, None], mask=(r_ok & t_ok)[:, None], other=0.0)
        xt = tl.sum(xt.to(tl.float32), axis=1)
        tl.store(loss_ptr + r0 + rows, tl.where(t_ok, lse - xt, float("nan")), mask=r_ok)
        tl.store(hit_ptr + r0 + rows, (am == t).to(tl.int32), mask=r_ok)
        if WRITE_GRAD:
            for c0 in range(0, V, BC):
                cols = c0 + tl.arange(0, BC)
                ok = r_ok[:, None] & (cols[None, :] < V)
                x = tl.load(base + cols[None, :], mask=ok, other=0.0).to(tl.float32)
                g = tl.exp(x - lse[:, None]) - tl.where(cols[None, :] == t[:, None], 1.0, 0.0)
                tl.store(base + cols[None, :], g.to(lg_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _dh_tile(pid, lg_ptr, stride_l, lg_desc, w_ptr, stride_w, wt_desc, idx_ptr, r0, rows_c, inv_m, dh_ptr,
             stride_dh, V, D, H_BY_M: tl.constexpr, USE_TMA: tl.constexpr, EVEN_V: tl.constexpr,
             DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """dH[idx[r0+i], n] = sum_v dS[i, v] W[v, n] for one BM x BN tile (K = V), stored in dh's dtype."""
    num_n = tl.cdiv(D, BN)
    pid_m = pid // num_n
    pid_n = pid % num_n
    if pid_m * BM < rows_c:
        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_n = pid_n * BN + tl.arange(0, BN)
        offs_k = tl.arange(0, BK)
        offs_nl = offs_n % D
        # rows past the chunk's count hold stale values: they only reach output rows that are not stored
        a_ptrs = lg_ptr + offs_m[:, None].to(tl.int64) * stride_l + offs_k[None, :]
        b_ptrs = w_ptr + offs_k[:, None].to(tl.int64) * stride_w + offs_nl[None, :]
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, tl.cdiv(V, BK)):
            if USE_TMA:
                a = lg_desc.load([pid_m * BM, k * BK])
                b = wt_desc.load([k * BK, pid_n * BN])
            elif EVEN_V:
                a = tl.load(a_ptrs)
                b = tl.load(b_ptrs)
            else:
                a = tl.load(a_ptrs, mask=offs_k[None, :] < V - k * BK, other=0.0)
                b = tl.load(b_ptrs, mask=offs_k[:, None] < V - k * BK, other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
            a_ptrs += BK
            b_ptrs += BK * stride_w
        if H_BY_M:
            acc = acc * inv_m
        m_ok = offs_m < rows_c
        hrow = tl.load(idx_ptr + r0 + offs_m, mask=m_ok, other=0).to(tl.int64)
        d_ptrs = dh_ptr + hrow[:, None] * stride_dh + offs_n[None, :]
        tl.store(d_ptrs, acc.to(dh_ptr.dtype.element_ty), mask=m_ok[:, None] & (offs_n[None, :] < D))


@triton.jit
def _dw_tile(pid_v, pid_d, chunk, lg_ptr, stride_l, lgt_desc, hc_ptr, stride_hc, hc_desc, rows_c, inv_m, dw_ptr,
             stride_dw, db_ptr, V, D, WITH_DB: tl.constexpr, USE_TMA: tl.constexpr, DOT_PREC: tl.constexpr,
             UPCAST: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, EPI: tl.constexpr):
    """dW[v, n] (+)= sum_i dS[i, v] Hc[i, n] for one BM x BN tile (K = chunk rows, read in whole BK blocks:
    the tail rows were zeroed), fp32; with WITH_DB also db[v] (+)= sum_i dS[i, v]. The first chunk
    stores, later chunks add. lgt_desc: chunk descriptor with block [BK, BM]; hc_desc: block [BK, BN]."""
    offs_v = pid_v * BM + tl.arange(0, BM)
    offs_d = pid_d * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    offs_vl = offs_v % V
    offs_dl = offs_d % D
    a_ptrs = lg_ptr + offs_k[:, None].to(tl.int64) * stride_l + offs_vl[None, :]
    b_ptrs = hc_ptr + offs_k[:, None].to(tl.int64) * stride_hc + offs_dl[None, :]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    dbacc = tl.zeros((BM,), dtype=tl.float32)
    for k0 in range(0, rows_c, BK):
        if USE_TMA:
            a = lgt_desc.load([k0, pid_v * BM])
            b = hc_desc.load([k0, pid_d * BN])
        else:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        if UPCAST:
            acc = tl.dot(tl.trans(a.to(tl.float32)), b.to(tl.float32), acc, input_precision=DOT_PREC)
        else:
            acc = tl.dot(tl.trans(a), b, acc, input_precision=DOT_PREC)
        if WITH_DB:
            dbacc += tl.sum(a.to(tl.float32), axis=0)
        a_ptrs += BK * stride_l
        b_ptrs += BK * stride_hc
    acc = acc * inv_m
    ok = (offs_v[:, None] < V) & (offs_d[None, :] < D)
    w_out = dw_ptr + offs_v[:, None].to(tl.int64) * stride_dw + offs_d[None, :]
    # EPI 0: plain read-add-write of the whole tile (the previous tile and acc live at once: spills at
    # 128 x 256); 1: atomic add for later chunks (one add per element and launch: deterministic);
    # 2: read-add-write in two halves along D (default)
    if EPI == 0:
        if chunk > 0:
            acc += tl.load(w_out, mask=ok, other=0.0)
        tl.store(w_out, acc, mask=ok)
    elif EPI == 1:
        if chunk > 0:
            tl.atomic_add(w_out, acc, mask=ok, sem="relaxed")
        else:
            tl.store(w_out, acc, mask=ok)
    else:
        # two halves along D: only half of the previous tile is live at a time
        a0, a1 = tl.split(tl.permute(tl.reshape(acc, (BM, 2, BN // 2)), (0, 2, 1)))
        offs_d0 = pid_d * BN + tl.arange(0, BN // 2)
        for hh in tl.static_range(2):
            od = offs_d0 + hh * (BN // 2)
            okh = (offs_v[:, None] < V) & (od[None, :] < D)
            ptr = dw_ptr + offs_v[:, None].to(tl.int64) * stride_dw + od[None, :]
            part = a0 if hh == 0 else a1
            if chunk > 0:
                part += tl.load(ptr, mask=okh, other=0.0)
            tl.store(ptr, part, mask=okh)
    if WITH_DB:
        dbacc = dbacc * inv_m
        v_ok = offs_v < V
        if chunk > 0:
            dbacc += tl.load(db_ptr + offs_v, mask=v_ok, other=0.0)
        tl.store(db_ptr + offs_v, dbacc, mask=v_ok)


def _grad_kernel(lg_ptr, stride_l, lg_desc, lgt_desc, w_ptr, stride_w, wt_desc, hc_ptr, stride_hc, hc_desc, idx_ptr,
                 tab_ptr, csum_ptr, dh_ptr, stride_dh, dw_ptr, stride_dw, db_ptr, N, V, D, chunk, N_DH_TILES,
                 HAS_DH: tl.constexpr, HAS_DW: tl.constexpr, HAS_DB: tl.constexpr, H_BY_M: tl.constexpr,
                 USE_TMA: tl.constexpr, EVEN_V: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, HBM: tl.constexpr, HBN: tl.constexpr,
                 EPI: tl.constexpr):
    """Gradients of one chunk from dS = softmax - onehot (stored in the logits chunk), scaled by 1/max(M,1).

    Programs [0, N_DH_TILES): dH tiles of HBM x HBN (K = V), stored in the hidden dtype into the token rows of dh_ptr
    [N, D] (scaled by 1/M when H_BY_M). Programs past them: dW tiles of BM x BN (K = chunk rows), fp32 into dw_ptr
    [V, D] from the compact rows hc_ptr [C_max, D]; the first chunk stores (zeros when M == 0), later
    chunks add; tiles of the first D-column also write db (HAS_DB). Descriptors (USE_TMA, else None):
    lg_desc chunk block [HBM, BK], lgt_desc chunk block [BK, BM], wt_desc W [V, D] block [BK, HBN],
    hc_desc hc block [BK, BN]. HAS_DH / HAS_DW: which tile kinds this launch
    has (a launch with only dW tiles passes N_DH_TILES = 0).
    """
    pid = tl.program_id(0)
    r0 = tl.load(tab_ptr + 2 * chunk)
    rows_c = tl.load(tab_ptr + 2 * chunk + 1)
    m_tot = tl.load(csum_ptr + N - 1)
    inv_m = 1.0 / tl.maximum(m_tot, 1).to(tl.float32)
    if HAS_DH:
        if pid < N_DH_TILES:
            _dh_tile(pid, lg_ptr, stride_l, lg_desc, w_ptr, stride_w, wt_desc, idx_ptr, r0, rows_c, inv_m, dh_ptr,
                     stride_dh, V, D, H_BY_M, USE_TMA, EVEN_V, DOT_PREC, UPCAST, HBM, HBN, BK)
    if HAS_DW:
        if pid >= N_DH_TILES:
            t = pid - N_DH_TILES
            num_d = tl.cdiv(D, BN)
            pid_v = t // num_d
            pid_d = t % num_d
            if (chunk == 0) | (rows_c > 0):
                if HAS_DB:
                    if pid_d == 0:
                        _dw_tile(pid_v, pid_d, chunk, lg_ptr, stride_l, lgt_desc, hc_ptr, stride_hc, hc_desc, rows_c, inv_m,
                                 dw_ptr, stride_dw, db_ptr, V, D, True, USE_TMA, DOT_PREC, UPCAST, BM, BN, BK, EPI)
                    else:
                        _dw_tile(pid_v, pid_d, chunk, lg_ptr, stride_l, lgt_desc, hc_ptr, stride_hc, hc_desc, rows_c, inv_m,
                                 dw_ptr, stride_dw, db_ptr, V, D, False, USE_TMA, DOT_PREC, UPCAST, BM, BN, BK, EPI)
                else:
                    _dw_tile(pid_v, pid_d, chunk, lg_ptr, stride_l, lgt_desc, hc_ptr, stride_hc, hc_desc, rows_c, inv_m,
                             dw_ptr, stride_dw, db_ptr, V, D, False, USE_TMA, DOT_PREC, UPCAST, BM, BN, BK, EPI)


def _final_kernel(csum_ptr, loss_rows_ptr, hit_rows_ptr, loss_ptr, acc_ptr, hmul_ptr, N, cap,
                  H_BY_M: tl.constexpr, BLOCK: tl.constexpr):
    """One program: loss = sum(loss_rows[:M]) / max(M, 1), acc = sum(hits[:M]) / max(M, 1), in a fixed order.

    hmul_ptr: fp32 scalar out, the factor the backward still owes the hidden gradient (1 when the dH tiles
    already applied 1/M, else 1/max(M, 1)). cap: the rows the host launched chunks for (the caller's bound);
    when M exceeds it, rows were left out: loss, accuracy and hmul are NaN (the hidden gradient too, then).
    """
    m_tot = tl.load(csum_ptr + N - 1)
    m_run = tl.minimum(m_tot, cap)
    offs = tl.arange(0, BLOCK)
    s = tl.zeros((BLOCK,), dtype=tl.float32)
    h = tl.zeros((BLOCK,), dtype=tl.int32)
    for start in range(0, m_run, BLOCK):
        ok = start + offs < m_run
        s += tl.load(loss_rows_ptr + start + offs, mask=ok, other=0.0)
        h += tl.load(hit_rows_ptr + start + offs, mask=ok, other=0)
    inv = 1.0 / tl.maximum(m_tot, 1).to(tl.float32)
    bad = tl.where(m_tot > cap, float("nan"), 0.0)  # NaN + x: the overflow poisons every output it reaches
    tl.store(loss_ptr, tl.sum(s, axis=0) * inv + bad)
    tl.store(acc_ptr, tl.sum(h, axis=0).to(tl.float32) * inv + bad)
    if H_BY_M:
        tl.store(hmul_ptr, 1.0 + bad)
    else:
        tl.store(hmul_ptr, inv + bad)


def _scale_kernel(g_ptr, hmul_ptr, dh_ptr, stride_dh, mask_ptr, N, D, dw_ptr, n_dw, db_ptr, n_db, n_dh_progs,
                  n_dw_progs, HAS_DH: tl.constexpr, HAS_DW: tl.constexpr, HAS_DB: tl.constexpr,
                  BR: tl.constexpr, BD: tl.constexpr, BLOCK: tl.constexpr):
    """Backward, in place: dh[masked rows] *= g * hmul; dw *= g; db *= g. Nothing moves when the factor is 1.

    g_ptr: the loss's upstream gradient (0-dim, on the device). mask_ptr: uint8 [N]. dw_ptr / db_ptr:
    contiguous fp32 buffers of n_dw / n_db elements. Programs: n_dh_progs for dh (BR rows each),
    n_dw_progs for dw (BLOCK elements each), the rest for db.
    """
    pid = tl.program_id(0)
    g = tl.load(g_ptr).to(tl.float32)
    if pid < n_dh_progs:
        if HAS_DH:
            f = g * tl.load(hmul_ptr)
            if f != 1.0:
                rows = pid * BR + tl.arange(0, BR)
                mk = tl.load(mask_ptr + rows, mask=rows < N, other=0) != 0
                rows64 = rows.to(tl.int64)
                for d0 in range(0, D, BD):
                    cols = d0 + tl.arange(0, BD)
                    ptrs = dh_ptr + rows64[:, None] * stride_dh + cols[None, :]
                    ok = mk[:, None] & (cols[None, :] < D)
                    x = tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
                    tl.store(ptrs, (x * f).to(dh_ptr.dtype.element_ty), mask=ok)
    elif pid < n_dh_progs + n_dw_progs:
        if HAS_DW:
            if g != 1.0:
                offs = (pid - n_dh_progs).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
                ok = offs < n_dw
                tl.store(dw_ptr + offs, tl.load(dw_ptr + offs, mask=ok, other=0.0) * g, mask=ok)
    else:
        if HAS_DB:
            if g != 1.0:
                for start in range(0, n_db, BLOCK):
                    offs = start + tl.arange(0, BLOCK)
                    ok = offs < n_db
                    tl.store(db_ptr + offs, tl.load(db_ptr + offs, mask=ok, other=0.0) * g, mask=ok)


_prep = _Kernel(_prep_kernel)
_gather = _Kernel(_gather_kernel, do_not_specialize=("chunk",))
_logits = _Kernel(_logits_kernel, do_not_specialize=("chunk",))
_ce_rows = _Kernel(_ce_rows_kernel, do_not_specialize=("chunk",))
_grad = _Kernel(_grad_kernel, do_not_specialize=("chunk",))
_final = _Kernel(_final_kernel)
_scale = _Kernel(_scale_kernel)


# ============================================================================ host side
def _p2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def default_config(device: torch.device, dtype: torch.dtype, D: int, V: int) -> dict:
    """Launch settings per device kind and dtype (data; override with :func:`config_override`).

    bm/bn/bk, warps, stages: logits tiles (rows x codebook x hidden); gbm/gbn/gbk, gwarps, gstages: gradient
    tiles (dW: codebook x hidden x rows; dH: rows x hidden x codebook, hbm x hbn x gbk, 0 = gbm / gbn); ce_rows x ce_cols: rows per
    program and column step of the streaming softmax kernel; align: chunks hold a multiple of this many rows; use_tma: the logits kernel
    reads both operands through tensor descriptors (the hidden rows from the chunk's compact copy); grad_tma:
    the gradient tiles read theirs through tensor descriptors; epi: dW epilogue (see ``_dw_tile``).
    """
    if device.type == "cpu":  # interpreter: small tiles keep the tests fast and exercise the masks
        return dict(bm=16, bn=32, bk=16, gbm=16, gbn=32, gbk=16, hbm=0, hbn=0, ce_rows=4, ce_cols=32, warps=4,
                    stages=1, gwarps=4, gstages=1, use_tma=False, grad_tma=False, align=16, epi=2)
    if dtype == torch.float32:
        cfg = dict(bm=64, bn=128, bk=32, gbm=64, gbn=128, gbk=32, warps=4, stages=3, gwarps=4, gstages=3)
    else:
        cfg = dict(bm=128, bn=256, bk=64, gbm=128, gbn=256, gbk=64, warps=8, stages=3, gwarps=8, gstages=3)
    cfg["bn"] = min(cfg["bn"], max(16, _p2(V)))
    cfg["bk"] = min(cfg["bk"], max(16, _p2(D)))
    cfg["gbn"] = min(cfg["gbn"], max(16, _p2(D)))
    cfg["gbk"] = min(cfg["gbk"], max(16, _p2(V)))
    # the per-row pass: one row per program in 2048-column steps (session 16, H100, BEVT-B shape, fwd + bwd
    # 0.946-0.953 ms; 2 rows 0.956, 2 x 1024 0.951-0.963, 1 x 4096 0.953-0.957, 2 x 4096 0.969, 8 x 1024
    # 1.001; benchmarks/results/masked_ce_session16.json)
    cfg.update(hbm=0, hbn=0, ce_rows=1, ce_cols=min(2048, max(16, _p2(V))), use_tma=dtype != torch.float32, grad_tma=False,
               align=128, epi=2)
    return cfg


_OVERRIDE: dict = {}


@contextlib.contextmanager
def config_override(**cfg):
    """Temporarily override tile settings of every call (benchmarks, tests): keys of :func:`default_config`
    plus ``split_grad`` (dH and dW tiles in two launches instead of one)."""
    saved = dict(_OVERRIDE)
    _OVERRIDE.update(cfg)
    try:
        yield
    finally:
        _OVERRIDE.clear()
        _OVERRIDE.update(saved)


def chunk_bound(N: int, V: int, elem_size: int, align: int, chunk_rows: int = 0) -> int:
    """C_max: rows of the logits chunk (a multiple of ``align``), from ``chunk_rows`` or the byte budget."""
    if chunk_rows <= 0:
        chunk_rows = max(align, CHUNK_BUDGET_BYTES // max(1, V * elem_size))
    c = max(align, chunk_rows // align * align)
    return min(c, -(-N // align) * align)


def _tma_ok(*tensors) -> bool:
    for t in tensors:
        if t.data_ptr() % 16 or any((s * t.element_size()) % 16 for s in t.stride()[:-1]) or t.stride(-1) != 1:
            return False
    return True


def _poisoned(shape, device, dtype):
    """torch.empty; on CPU (the interpreter, i.e. tests) filled with NaN so that unwritten or leaking values show."""
    t = torch.empty(shape, device=device, dtype=dtype)
    if device.type == "cpu":
        t.fill_(float("nan"))
    return t


def masked_ce_forward(hidden: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      target: torch.Tensor, need_dh: bool = False, need_dw: bool = False, need_db: bool = False,
                      chunk_rows: int = 0, max_rows: int = -1, config: Optional[dict] = None):
    """Forward (and, when asked, the gradients for grad_output == 1). No autograd; see :func:`masked_ce`.

    max_rows >= 0: the caller's upper bound on the masked rows; chunks are launched for that many rows
    instead of all N (the count itself stays on the device). More masked rows than that give NaN outputs.

    Returns (loss, acc, dh, dw, db, hmul): loss/acc fp32 0-dim; dh like hidden (scaled by 1/M when
    hmul == 1, else owing the factor hmul); dw fp32 [V, D]; db fp32 [V]; absent ones are empty tensors.
    """
    dev = hidden.device
    dtype = hidden.dtype
    D = hidden.shape[-1]
    V = weight.shape[0]
    h2 = hidden.reshape(-1, D)
    if h2.stride(-1) != 1:
        h2 = h2.contiguous()
    N = h2.shape[0]
    empty = lambda: hidden.new_empty(0)  # noqa: E731 (outputs of a custom op may not alias each other)
    loss = torch.empty((), device=dev, dtype=torch.float32)
    acc = torch.empty((), device=dev, dtype=torch.float32)
    hmul = torch.empty((), device=dev, dtype=torch.float32)
    need_w = need_dw or need_db
    need_grad = need_dh or need_w
    h_by_m = dtype != torch.float16  # fp16 grads of ~1e-6 would be subnormal: the backward applies 1/M there
    if N == 0:
        loss.zero_(), acc.zero_(), hmul.fill_(1.0)
        dh = torch.zeros_like(hidden) if need_dh else empty()
        dw = torch.zeros(weight.shape, device=dev, dtype=torch.float32) if need_w else empty()
        db = torch.zeros(V, device=dev, dtype=torch.float32) if need_db else empty()
        return loss, acc, dh, dw, db, hmul
    cfg = default_config(dev, dtype, D, V)
    cfg.update(_OVERRIDE)
    if config:
        cfg.update(config)
    m1 = mask.reshape(-1)
    t1 = target.reshape(-1)
    csum = torch.cumsum(m1, 0, dtype=torch.int32)
    align = cfg["align"]
    # rows to launch chunks for: every token may be masked, unless the caller bounds the count (the BEVT
    # masks: each empty chunk would still cost four launches, ~14 us)
    m_cap = N if max_rows < 0 else min(N, max_rows)
    c_max = chunk_bound(max(m_cap, 1), V, h2.element_size(), align, chunk_rows)
    n_chunks = max(1, -(-m_cap // c_max))  # chunk 0 always runs: its dW tiles store (zeros when M = 0)
    idx = torch.empty(N, device=dev, dtype=torch.int32)
    tab = torch.empty(2 * n_chunks, device=dev, dtype=torch.int32)
    dh = _poisoned((N, D), dev, dtype) if need_dh else None
    BR = 16
    _prep((triton.cdiv(N, BR),), dev, csum, idx, tab, dh, N, D, D, n_chunks, c_max,
          ZERO_DH=need_dh, BR=BR, BD=min(256, _p2(D)), NCB=_p2(n_chunks), ALIGN=align, num_warps=4)

    w_c = weight.to(dtype)
    if w_c.stride(-1) != 1 or w_c.stride(0) != D:
        w_c = w_c.contiguous()
    v_pad = -(-V // 8) * 8
    logits = _poisoned((c_max, v_pad), dev, dtype)
    use_tma = bool(cfg["use_tma"]) and D % 8 == 0
    # compact masked rows of the chunk: the dW tiles' operand, and the logits' A operand on the TMA path
    hc = _poisoned((c_max, D), dev, dtype) if (need_w or use_tma) else None
    use_tma = use_tma and _tma_ok(w_c, hc)
    loss_rows = torch.empty(N, device=dev, dtype=torch.float32)
    hit_rows = torch.empty(N, device=dev, dtype=torch.int32)
    dw = _poisoned((V, D), dev, torch.float32) if need_w else None
    db = _poisoned((V,), dev, torch.float32) if need_db else None
    has_bias = bias is not None
    prec = None
    if dtype == torch.float32:
        prec = "tf32" if (dev.type == "cuda" and torch.backends.cuda.matmul.allow_tf32) else "ieee"
    upcast = dev.type == "cpu"  # the interpreter's dot mishandles bf16 operands; fp32 products are exact

    bm, bn, bk = cfg["bm"], cfg["bn"], cfg["bk"]
    gbm, gbn, gbk = cfg["gbm"], cfg["gbn"], cfg["gbk"]
    hbm, hbn = cfg["hbm"] or gbm, cfg["hbn"] or gbn  # dH tiles (K = V: 4x the dW tiles' K at the BEVT shape)
    grad_tma = bool(cfg["grad_tma"]) and D % 8 == 0 and _tma_ok(w_c, logits) and (hc is None or _tma_ok(hc))
    w_desc = a_desc = lg_desc = lgt_desc = wt_desc = hc_desc = None
    if use_tma or grad_tma:
        from triton.tools.tensor_descriptor import TensorDescriptor
    if use_tma:
        w_desc = TensorDescriptor.from_tensor(w_c, [bn, bk])
        a_desc = TensorDescriptor.from_tensor(hc, [bm, bk])
    if grad_tma:
        wt_desc = TensorDescriptor.from_tensor(w_c, [gbk, hbn])
        lg_desc = TensorDescriptor(logits, [c_max, V], [v_pad, 1], [hbm, gbk])
        lgt_desc = TensorDescriptor(logits, [c_max, V], [v_pad, 1], [gbk, gbm])
        if need_w:
            hc_desc = TensorDescriptor.from_tensor(hc, [gbk, gbn])
    grid1 = (triton.cdiv(c_max, bm) * triton.cdiv(V, bn),)
    RB, BC, GR = cfg["ce_rows"], cfg["ce_cols"], 16
    grid2 = (triton.cdiv(c_max, RB),)
    n_dh_tiles = triton.cdiv(c_max, hbm) * triton.cdiv(D, hbn) if need_dh else 0
    n_dw_tiles = triton.cdiv(V, gbm) * triton.cdiv(D, gbn) if need_w else 0
    grad_args = (logits, v_pad, lg_desc, lgt_desc, w_c, w_c.stride(0), wt_desc, hc, D, hc_desc, idx, tab, csum,
                 dh, D, dw, D, db, N, V, D)
    grad_kw = dict(H_BY_M=h_by_m, USE_TMA=grad_tma, EVEN_V=(V % gbk == 0), DOT_PREC=prec, UPCAST=upcast,
                   BM=gbm, BN=gbn, BK=gbk, HBM=hbm, HBN=hbn, EPI=cfg["epi"], num_warps=cfg["gwarps"], num_stages=cfg["gstages"])
    split = [((n_dh_tiles,), True, False, n_dh_tiles), ((n_dw_tiles,), False, True, 0)]
    for c in range(n_chunks):
        # 1. compact copy of the chunk's hidden rows (the dW tiles' operand; the logits' on the TMA path)
        if hc is not None:
            _gather((triton.cdiv(c_max, GR),), dev, h2, h2.stride(0), idx, tab, hc, D, logits, v_pad, c_max, V, D,
                    c, ZERO_LG=need_w, GR=GR, BD=min(256, _p2(max(D, 16))), ZB=gbk, num_warps=4)
        # 2. logits of the chunk's rows
        _logits(grid1, dev, h2, h2.stride(0), idx, tab, a_desc, w_c, w_c.stride(0), w_desc,
                bias if has_bias else None, logits, v_pad, V, D, c, HAS_BIAS=has_bias, USE_TMA=use_tma,
                EVEN_K=(D % bk == 0), DOT_PREC=prec, UPCAST=upcast, BM=bm, BN=bn, BK=bk, num_warps=cfg["warps"],
                num_stages=cfg["stages"])
        # 3. log-sum-exp, loss and hit per row; dS in place (streaming)
        _ce_rows(grid2, dev, logits, v_pad, t1, idx, tab, loss_rows, hit_rows, V, c, WRITE_GRAD=need_grad, RB=RB,
                 BC=BC, num_warps=4)
        if not need_grad:
            continue
        # 4. dH and dW tiles: one launch (dH first), or two when split
        parts = [((n_dh_tiles + n_dw_tiles,), need_dh, need_w, n_dh_tiles)]
        if (cfg.get("split_grad") or _SPLIT_FALLBACK) and need_dh and need_w:
            parts = split
        try:
            _launch_grad(parts, dev, grad_args, c, need_db, grad_kw)
        except triton.runtime.errors.OutOfResources:
            if len(parts) > 1:
                raise
            _set_split_fallback()  # both tile kinds in one kernel need more shared memory than this GPU has
            _launch_grad(split, dev, grad_args, c, need_db, grad_kw)
    _final((1,), dev, csum, loss_rows, hit_rows, loss, acc, hmul, N, m_cap, H_BY_M=h_by_m, BLOCK=1024,
           num_warps=4)
    dh = dh.view(hidden.shape) if need_dh else empty()
    return loss, acc, dh, dw if need_w else empty(), db if need_db else empty(), hmul


_SPLIT_FALLBACK = False


def _set_split_fallback():
    global _SPLIT_FALLBACK
    _SPLIT_FALLBACK = True


def _launch_grad(parts, dev, grad_args, c, need_db, grad_kw):
    for grid, has_dh, has_dw, n_dh in parts:
        _grad(grid, dev, *grad_args, c, n_dh, HAS_DH=has_dh, HAS_DW=has_dw, HAS_DB=need_db and has_dw, **grad_kw)


def scale_grads_(g: torch.Tensor, hmul: torch.Tensor, dh: torch.Tensor, mask: torch.Tensor, dw: torch.Tensor,
                 db: torch.Tensor) -> None:
    """In place: dh[mask] *= g * hmul, dw *= g, db *= g (empty tensors are skipped); free when the factor is 1."""
    dev = g.device
    has_dh, has_dw, has_db = dh.numel() > 0, dw.numel() > 0, db.numel() > 0
    if not (has_dh or has_dw or has_db):
        return
    D = dh.shape[-1] if has_dh else 1
    N = dh.numel() // D if has_dh else 0
    dh2 = dh.view(-1, D) if has_dh else None
    BR, BLOCK = 16, 4096
    n_dh = triton.cdiv(N, BR) if has_dh else 0
    n_dw = triton.cdiv(dw.numel(), BLOCK) if has_dw else 0
    grid = (n_dh + n_dw + (1 if has_db else 0),)
    _scale(grid, dev, g.reshape(()), hmul, dh2, D, mask.reshape(-1).view(torch.uint8) if has_dh else None, N, D,
           dw if has_dw else None, dw.numel(), db if has_db else None, db.numel(), n_dh, n_dw,
           HAS_DH=has_dh, HAS_DW=has_dw, HAS_DB=has_db, BR=BR, BD=min(256, _p2(D)), BLOCK=BLOCK, num_warps=4)


# ============================================================================ torch.library registration
@torch.library.custom_op("bevt::masked_ce_fwd", mutates_args=())
def _masked_ce_op(hidden: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  target: torch.Tensor, need_dh: bool, need_dw: bool, need_db: bool, chunk_rows: int,
                  max_rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                          torch.Tensor]:
    return masked_ce_forward(hidden, mask, weight, bias, target, need_dh, need_dw, need_db, chunk_rows, max_rows)


@_masked_ce_op.register_fake
def _(hidden, mask, weight, bias, target, need_dh, need_dw, need_db, chunk_rows, max_rows):
    scalar = hidden.new_empty((), dtype=torch.float32)
    V = weight.shape[0]
    dh = hidden.new_empty(hidden.shape) if need_dh else hidden.new_empty(0)
    dw = hidden.new_empty(weight.shape, dtype=torch.float32) if (need_dw or need_db) else hidden.new_empty(0)
    db = hidden.new_empty((V,), dtype=torch.float32) if need_db else hidden.new_empty(0)
    return scalar, scalar.clone(), dh, dw, db, scalar.clone()


@torch.library.custom_op("bevt::masked_ce_scale_grads_", mutates_args=("dh", "dw", "db"))
def _scale_op_(g: torch.Tensor, hmul: torch.Tensor, dh: torch.Tensor, mask: torch.Tensor, dw: torch.Tensor,
               db: torch.Tensor) -> None:
    scale_grads_(g, hmul, dh, mask, dw, db)


@_scale_op_.register_fake
def _(g, hmul, dh, mask, dw, db):
    return None


def _setup_context(ctx, inputs, output):
    hidden, mask, weight, bias, target, need_dh, need_dw, need_db, chunk_rows, max_rows = inputs
    _, _, dh, dw, db, hmul = output
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(dh, dw, db, hmul, mask)
    ctx.flags = (need_dh, need_dw, need_db)
    ctx.w_dtype = weight.dtype
    ctx.b_dtype = None if bias is None else bias.dtype


def _backward(ctx, g_loss, *_unused):
    dh, dw, db, hmul, mask = ctx.saved_tensors
    need_dh, need_dw, need_db = ctx.flags
    if g_loss is None:
        return None, None, None, None, None, None, None, None, None, None
    if not need_dw:
        dw = dw.new_empty(0)
    if torch.compiler.is_compiling():  # functional under compile (AOTAutograd does not like mutated saves)
        g = g_loss.float()
        dh = dh * (g * hmul) if need_dh else dh  # a 0-dim fp32 factor: computed in fp32, result in dh's dtype
        dw = dw * g if need_dw else dw
        db = db * g if need_db else db
    else:  # eager: scale the saved buffers in place; a second backward through the graph raises (version check)
        _scale_op_(g_loss.float(), hmul, dh, mask, dw, db)
    gh = dh if need_dh else None
    gw = dw.to(ctx.w_dtype) if need_dw else None
    gb = db.to(ctx.b_dtype) if need_db else None
    return gh, None, gw, gb, None, None, None, None, None, None


_masked_ce_op.register_autograd(_backward, setup_context=_setup_context)


def masked_ce(hidden: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
              target: torch.Tensor, *, chunk_rows: int = 0,
              max_rows: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean CE of the LM head over masked tokens and the masked-token accuracy (see bevt.ops.masked_ce).

    hidden (B, L, D) or (L, D) bf16/fp16/fp32; mask bool like hidden[..., 0]; weight (V, D); bias (V,) or None;
    target int like mask. Returns (loss, acc): fp32 0-dim, loss with gradients for hidden, weight, bias.
    chunk_rows: rows of the logits chunk (0: from the memory budget). max_rows: an upper bound on the masked
    tokens (-1: none; more masked tokens give NaN).
    """
    grad = torch.is_grad_enabled()
    need_dh = grad and hidden.requires_grad
    need_dw = grad and weight.requires_grad
    need_db = grad and bias is not None and bias.requires_grad
    loss, acc, *_ = _masked_ce_op(hidden, mask, weight, bias, target, need_dh, need_dw, need_db, int(chunk_rows),
                                  int(max_rows))
    return loss, acc.detach()
