"""Triton window attention (forward + backward) against the reference, both entry points.

On a GPU the kernels run compiled (real Swin-B shapes included); on the CPU they run in Triton's interpreter
on small shapes. The interpreter needs TRITON_INTERPRET=1 before triton is first imported: this module sets
it around its own import (the rest of the suite keeps choosing the reference on CPU); if triton was already
imported in compiled mode, one test reruns this file in a fresh process with the variable set.

Tolerance rule (CAPABILITIES["triton"].extra["tolerances"]): against the reference computed in fp32, the
kernel's max and mean errors must be at most 2x (output) / 3x (gradients) those of the reference computed
in the input dtype; fp32 inputs are compared with a float64 reference. An extended seeded sweep runs with
BEVT_EXTENDED_TESTS=1.
"""
from __future__ import annotations

import contextlib
import os
import random
import subprocess
import sys

import pytest
import torch

from bevt.ops import backend as be
from bevt.ops.window_attention import (CAPABILITIES, can_run_triton, partition_windows, reverse_windows,
                                       table_length, window_attention, window_attention_tokens)

from conftest import import_triton_kernels  # tests/conftest.py (pytest puts tests/ on sys.path)

CUDA = torch.cuda.is_available()
EXTENDED = os.environ.get("BEVT_EXTENDED_TESTS", "0") == "1"
DEV = "cuda" if CUDA else "cpu"
TOL = CAPABILITIES["triton"].extra["tolerances"]
KERN = import_triton_kernels("window_attention")
TRITON_HERE = KERN is not None and (CUDA or KERN.interpreter_ready())
needs_triton = pytest.mark.skipif(not TRITON_HERE, reason="Triton kernels cannot run in this process "
                                  "(see test_triton_in_fresh_interpreter_process)")
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _interpreter_env(monkeypatch):
    """On the CPU the kernels run only while TRITON_INTERPRET=1 (the backend status is cached per value)."""
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    be.triton_status.cache_clear()
    yield
    be.triton_status.cache_clear()


@contextlib.contextmanager
def tiles(**kw):
    """Temporarily change the interpreter's tile sizes (to exercise several full tiles plus a tail)."""
    KERN.set_config(KERN.Config(**{**vars(KERN.INTERPRETER_CONFIG if not CUDA else KERN.GPU_CONFIG), **kw}))
    try:
        yield
    finally:
        KERN.set_config(None)


# ----------------------------------------------------------------------------- helpers
def make(batch, grid, heads, d, table_window, dtype, seed=0, device=DEV):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(batch, *grid, 3, heads, d, generator=g).to(device, dtype)
    table = (torch.randn(table_length(table_window), heads, generator=g) * 0.5).to(device)
    kv_pad = torch.randn(2, heads, d, generator=g).to(device)
    do = torch.randn(batch, *grid, heads, d, generator=g).to(device, dtype)
    return qkv, table, kv_pad, do


def run_tokens(qkv, table, kv_pad, do, backend, **geo):
    qkv, table = qkv.detach().clone().requires_grad_(True), table.detach().clone().requires_grad_(True)
    kv_pad = kv_pad.detach().clone().requires_grad_(True) if kv_pad is not None else None
    o = window_attention_tokens(qkv, table, kv_pad=kv_pad, backend=backend, **geo)
    o.backward(do)
    kvg = kv_pad.grad if kv_pad is not None and kv_pad.grad is not None else torch.zeros(2, *qkv.shape[5:])
    return o.detach(), qkv.grad, table.grad, kvg.to(qkv.device)


def compare(name, got, ref_hi, ref_lo, is_out):
    """The tolerance rule; prints max/mean errors first."""
    got, ref_hi = got.double(), ref_hi.double()
    err = (got - ref_hi).abs()
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    if ref_lo is None:  # fp32 inputs: float64 reference
        scale = ref_hi.abs().max().item() + 1e-12
        print(f"{name}: max {err.max().item():.3e} mean {err.mean().item():.3e} (scale {scale:.3e})")
        assert err.max().item() <= TOL["fp32_rel"] * max(scale, 1.0), name
        return
    elo = (ref_lo.double() - ref_hi).abs()
    lim = TOL["out"] if is_out else TOL["grad"]
    print(f"{name}: kernel max {err.max().item():.3e} mean {err.mean().item():.3e} | same-dtype reference "
          f"max {elo.max().item():.3e} mean {elo.mean().item():.3e}")
    # + a floor for quantities the low-precision reference happens to get exactly (e.g. all-zero gradients)
    floor = 1e-6 * (ref_hi.abs().max().item() + 1.0)
    assert err.max().item() <= lim * elo.max().item() + floor, f"{name}: max error"
    assert err.mean().item() <= lim * elo.mean().item() + floor, f"{name}: mean error"


def check_tokens(batch, grid, heads, d, window, shift, table_window, mask=None, dtype=torch.bfloat16, seed=0,
                 kv_pad=True):
    geo = dict(window_size=window, shift_size=shift, table_window_size=table_window,
               mask_shift_size=shift if mask is None else mask)
    qkv, table, kvp, do = make(batch, grid, heads, d, table_window, dtype, seed)
    kvp = kvp if kv_pad else None
    tri = run_tokens(qkv, table, kvp, do, "triton", **geo)
    hi = torch.float64 if dtype == torch.float32 else torch.float32
    ref_hi = run_tokens(qkv.to(hi), table.to(hi), None if kvp is None else kvp.to(hi), do.to(hi), "ref", **geo)
    ref_lo = run_tokens(qkv, table, kvp, do, "ref", **geo) if dtype != torch.float32 else (None,) * 4
    for name, a, b, c in zip(("out", "dqkv", "dtable", "dkv_pad"), tri, ref_hi, ref_lo):
        compare(name, a, b, c, name == "out")
    return tri


# ----------------------------------------------------------------------------- token layout
# The interpreter's cost grows with windows x heads, not with the window size: few windows, real 7x7 planes.
TOKEN_CASES = {
    # name: (batch, grid, heads, d, window, shift, table window, mask shift or None (= shift))
    "shifted_padded": (1, (2, 9, 8), 1, 16, (2, 7, 7), (1, 3, 3), (2, 7, 7), None),
    "unshifted_two_heads": (2, (2, 7, 7), 2, 16, (2, 7, 7), (0, 0, 0), (2, 7, 7), None),
    "image_quirk_dt0_slice": (2, (1, 7, 7), 1, 16, (1, 7, 7), (0, 0, 0), (3, 7, 7), (0, 3, 3)),
    "clamped_window_smaller_than_table": (1, (2, 5, 6), 2, 16, (2, 5, 6), (0, 0, 0), (3, 7, 7), None),
    "odd_window_head_dim_32": (1, (3, 5, 10), 1, 32, (3, 5, 5), (1, 0, 2), (3, 5, 5), None),
}


@needs_triton
@pytest.mark.parametrize("case", list(TOKEN_CASES))
def test_tokens_match_reference(case):
    b, grid, nh, d, ws, ss, ts, ms = TOKEN_CASES[case]
    check_tokens(b, grid, nh, d, ws, ss, ts, ms)


@needs_triton
def test_tokens_several_tiles_and_tails():
    """16-token tiles: several full query/key tiles plus a tail tile of each (N = 30)."""
    with tiles(fwd_bm=16, fwd_bn=16, dq_bm=16, dq_bn=16, kv_bm=16, kv_bn=16):
        check_tokens(1, (2, 4, 10), 1, 16, (2, 3, 5), (1, 1, 2), (2, 3, 5))


@needs_triton
def test_tokens_real_window_8x7x7():
    """One real 8x7x7 window (N = 392) with a shift mask and padding: 6 full tiles + a tail."""
    with tiles(fwd_bm=128, fwd_bn=128, dq_bm=128, dq_bn=128, kv_bm=128, kv_bn=128):
        check_tokens(1, (8, 7, 8), 1, 16, (8, 7, 7), (0, 3, 3), (8, 7, 7))


@needs_triton
@pytest.mark.parametrize("one_tile", [True, False], ids=["one_tile_kernel", "three_kernels"])
@pytest.mark.parametrize("grid", [(1, 7, 7), (1, 9, 8)], ids=["exact", "padded"])
def test_one_tile_windows_backward(one_tile, grid):
    """49-token windows fit one tile: by default one backward kernel computes dQ, dK, dV and the partials
    (one pass); one_tile_backward=False runs the three kernels. Several ranges of windows in both (their
    partials summed before the gather); the padded grid also checks the kv_pad gradient."""
    with tiles(one_tile_backward=one_tile, dq_programs=4, db_programs=4, kv_programs=4, win_programs=4):
        qkv = torch.empty(4, *grid, 3, 2, 16, device=DEV, dtype=torch.bfloat16)
        geo = KERN._tokens_geo(qkv, (1, 7, 7), (0, 3, 3), (3, 7, 7), (0, 3, 3))
        specs = KERN.launch_specs(geo, True, qkv.dtype, False, KERN._config(qkv.device, geo.n))
        assert ("window" in specs) == one_tile and ("dq" in specs) != one_tile
        assert specs["window" if one_tile else "db"].facts["ranges"] > 1
        check_tokens(4, grid, 2, 16, (1, 7, 7), (0, 3, 3), (3, 7, 7), (0, 3, 3))


@pytest.mark.skipif(KERN is None, reason="triton is not installed")
def test_bias_partials_take_more_ranges_where_tiles_are_skipped():
    """Fine-tuning's shifted blocks (two windows along D) skip tiles in the last windows along D, which form the
    suffix of the window order, so the bias-partials kernel splits the windows into more ranges there
    (Config.db_programs_skipping) than in blocks with nothing to skip (Config.db_programs)."""
    qkv = torch.empty(8, 16, 56, 56, 3, 4, 32, dtype=torch.bfloat16, device="meta")
    cfg = KERN.Config()  # the GPU defaults
    ranges = {}
    for name, ss in (("shifted", (4, 3, 3)), ("unshifted", (0, 0, 0))):
        geo = KERN._tokens_geo(qkv, (8, 7, 7), ss, (8, 7, 7), ss)
        assert geo.skips_tiles == (name == "shifted")
        ranges[name] = KERN.launch_specs(geo, True, qkv.dtype, False, cfg)["db"].facts["ranges"]
    per_range = 7 * 7 * 4  # (query tile, key tile, head) programs per range at 64-token tiles
    assert ranges["unshifted"] == -(-cfg.db_programs // per_range)
    assert ranges["shifted"] >= cfg.db_programs_skipping // per_range > ranges["unshifted"]
    no_skip = KERN.Config(skip_masked_tiles=False)
    geo = KERN._tokens_geo(qkv, (8, 7, 7), (4, 3, 3), (8, 7, 7), (4, 3, 3))
    assert KERN.launch_specs(geo, True, qkv.dtype, False, no_skip)["db"].facts["ranges"] == ranges["unshifted"]


@needs_triton
def test_bias_gradient_over_several_ranges():
    """Two tiles per window and several ranges of windows: the partials are summed over the ranges first."""
    with tiles(dq_programs=8, db_programs=8):
        qkv = torch.empty(2, 2, 9, 8, 3, 1, 16, device=DEV, dtype=torch.bfloat16)
        geo = KERN._tokens_geo(qkv, (2, 7, 7), (1, 3, 3), (2, 7, 7), (1, 3, 3))
        specs = KERN.launch_specs(geo, True, qkv.dtype, False, KERN._config(qkv.device, geo.n))
        assert "window" not in specs and specs["db"].facts["ranges"] > 1
        check_tokens(2, (2, 9, 8), 1, 16, (2, 7, 7), (1, 3, 3), (2, 7, 7))


def test_register_caps_below_168_only_where_chosen():
    """The GPU launch caps the forward and dQ at 128 registers (4 CTAs per SM) for 16-bit inputs of head
    dim 32; head dim 64 and fp32 inputs, which spill at 128, get 168 like the other two kernels."""
    G = KERN.GPU_CONFIG

    def caps(d, dtype):
        qkv = torch.empty(2, 8, 14, 14, 3, 2, d, dtype=dtype)
        geo = KERN._tokens_geo(qkv, (8, 7, 7), (0, 3, 3), (8, 7, 7), (0, 3, 3))
        return {k: s.maxnreg for k, s in KERN.launch_specs(geo, True, dtype, False, G).items()}

    assert (G.fwd_maxnreg, G.dq_maxnreg) == (128, 128)
    assert caps(32, torch.bfloat16) == caps(32, torch.float16) == dict(fwd=128, dq=128, db=168, dkdv=168)
    assert caps(64, torch.bfloat16) == caps(32, torch.float32) == dict(fwd=168, dq=168, db=168, dkdv=168)
    uncapped = KERN.Config(**{**vars(G), "fwd_maxnreg": 0})
    qkv = torch.empty(2, 8, 14, 14, 3, 2, 64)
    geo = KERN._tokens_geo(qkv, (8, 7, 7), (0, 3, 3), (8, 7, 7), (0, 3, 3))
    assert KERN.launch_specs(geo, True, torch.float32, False, uncapped)["fwd"].maxnreg == 0

    def one_tile_cap(d, dtype):  # the image path's 7x7 windows: the one-pass backward kernel
        qkv = torch.empty(2, 1, 14, 14, 3, 2, d, dtype=dtype)
        geo = KERN._tokens_geo(qkv, (1, 7, 7), (0, 3, 3), (8, 7, 7), (0, 3, 3))
        return KERN.launch_specs(geo, True, dtype, False, G)["window"].maxnreg

    assert one_tile_cap(32, torch.bfloat16) == one_tile_cap(32, torch.float16) == G.win_maxnreg == 128
    assert one_tile_cap(64, torch.bfloat16) == one_tile_cap(32, torch.float32) == 0  # not measured: no cap


SIXTEEN = dict(fwd_bm=16, fwd_bn=16, dq_bm=16, dq_bn=16, db_bm=16, db_bn=16, kv_bm=16, kv_bn=16)


@needs_triton
@pytest.mark.filterwarnings("ignore:All-NaN slice")  # the interpreter's max over the NaN window's rows
def test_a_non_finite_token_stays_in_its_window():
    """Tile padding rows point at the sample's first token (valid memory; full tiles load unmasked): a NaN
    there must not reach the other window of the sample through a tail tile, as in the reference, where
    only the window holding it turns NaN. 98-token windows as 6 full 16-token tiles plus a tail."""
    geo = dict(window_size=(2, 7, 7), shift_size=(0, 0, 0), table_window_size=(2, 7, 7))
    qkv, table, _, do = make(1, (2, 7, 14), 1, 16, (2, 7, 7), torch.bfloat16, seed=5)
    qkv[0, 0, 0, 0] = float("nan")  # q, k and v of the first token of window 0
    with tiles(**SIXTEEN):
        tri = run_tokens(qkv, table, None, do, "triton", **geo)
    ref_hi = run_tokens(qkv.float(), table, None, do.float(), "ref", **geo)
    ref_lo = run_tokens(qkv, table, None, do, "ref", **geo)
    assert tri[0][..., :7, :, :].isnan().any()  # the NaN's own window
    for name, i in (("out", 0), ("dqkv", 1)):  # window 1: columns 7..13 of W
        compare(name, tri[i][:, :, :, 7:], ref_hi[i][:, :, :, 7:], ref_lo[i][:, :, :, 7:], name == "out")
# (grid, window, shift, db_programs): the D shift mask splits the last window along D at token
# (WD - MD) * WH * WW; with 16-token tiles some tiles lie on one side of it, and those the other side's
# tiles skip. 40 tokens = 2 full tiles + a tail, split 20: tile 0 skips the tail and vice versa;
# split 32 of 48 (MD = 2 of 6 frames): tiles 0, 1 and tile 2 skip each other; split 32 of 64 with H and W
# masks and a padded grid.
MASKED_TILE_CASES = {
    "tail_split_20": ((8, 2, 5), (4, 2, 5), (2, 0, 0), 1),
    "split_32_of_48_several_ranges": ((11, 2, 4), (6, 2, 4), (2, 0, 0), 18),  # 9 programs per range
    "split_32_with_hw_masks_padded": ((7, 5, 7), (4, 4, 4), (2, 2, 2), 3),
}


@needs_triton
@pytest.mark.parametrize("case", list(MASKED_TILE_CASES))
def test_tiles_masked_by_the_depth_shift_are_skipped(case):
    """The four kernels skip the tiles the D shift mask leaves fully masked (Config.skip_masked_tiles): the
    result matches the reference and the same kernels visiting every tile (up to subnormals)."""
    grid, ws, ss, db_programs = MASKED_TILE_CASES[case]
    qkv = torch.empty(2, *grid, 3, 1, 16, device=DEV, dtype=torch.bfloat16)
    geo = KERN._tokens_geo(qkv, ws, ss, ws, ss)
    ranges = dict(db_programs=db_programs, db_programs_skipping=db_programs)
    with tiles(**SIXTEEN, **ranges):
        specs = KERN.launch_specs(geo, True, qkv.dtype, False, KERN._config(qkv.device, geo.n))
        assert all(specs[k].constexprs["SKIP"] == 1 for k in ("fwd", "dq", "db", "dkdv"))
        assert (specs["db"].facts["ranges"] > 1) == ("several_ranges" in case)
        skipped = check_tokens(2, grid, 1, 16, ws, ss, ws, seed=11)
    with tiles(**SIXTEEN, **ranges, skip_masked_tiles=False):
        qkv, table, kvp, do = make(2, grid, 1, 16, ws, torch.bfloat16, seed=11)
        every_tile = run_tokens(qkv, table, kvp, do, "triton", window_size=ws, shift_size=ss, table_window_size=ws,
                                mask_shift_size=ss)
    # a masked score's p is 2**-144 or less: 0 after the GPU's flush to zero, a subnormal in the interpreter, where a
    # bias-table row with no other contribution (its other pairs' queries are padding) keeps such subnormals
    for name, a, b in zip(("out", "dqkv", "dtable", "dkv_pad"), skipped, every_tile):
        assert (a.double() - b.double()).abs().max().item() < 2.0 ** -126, f"{name}: skipping changed the result"


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_tokens_other_dtypes(dtype):
    check_tokens(1, (2, 6, 5), 1, 16, (2, 4, 4), (1, 2, 2), (2, 4, 4), dtype=dtype)


@needs_triton
def test_kv_pad_none_means_zeros():
    geo = dict(window_size=(2, 4, 4), shift_size=(1, 2, 2), table_window_size=(2, 4, 4), mask_shift_size=(1, 2, 2))
    qkv, table, _, do = make(1, (2, 5, 4), 1, 16, (2, 4, 4), torch.float32)
    a = run_tokens(qkv, table, None, do, "triton", **geo)
    b = run_tokens(qkv, table, torch.zeros(2, 1, 16, device=DEV), do, "triton", **geo)
    for x, y in zip(a[:3], b[:3]):
        assert torch.equal(x, y)


# ----------------------------------------------------------------------------- windowed layout
def run_windowed(qkv, table, do, backend, ws, ss, ts):
    """The windowed entry on a token-layout problem (grid a window multiple): roll + partition outside."""
    qkv, table = qkv.detach().clone().requires_grad_(True), table.detach().clone().requires_grad_(True)
    B, grid = qkv.shape[0], qkv.shape[1:4]
    x = torch.roll(qkv, shifts=tuple(-s for s in ss), dims=(1, 2, 3))
    q, k, v = (partition_windows(t, ws).transpose(1, 2) for t in x.unbind(4))
    ow = window_attention(q, k, v, table, window_size=ws, table_window_size=ts, padded_grid=grid,
                          mask_shift_size=ss, backend=backend)
    o = torch.roll(reverse_windows(ow.transpose(1, 2), ws, B, grid), shifts=tuple(ss), dims=(1, 2, 3))
    o.backward(do)
    return o.detach(), qkv.grad, table.grad


@needs_triton
def test_windowed_entry_matches_reference_and_token_entry():
    ws, ss, ts = (2, 4, 4), (1, 2, 2), (2, 4, 4)
    qkv, table, _, do = make(1, (2, 8, 8), 1, 16, ts, torch.bfloat16, seed=3)
    tri = run_windowed(qkv, table, do, "triton", ws, ss, ts)
    ref_hi = run_windowed(qkv.float(), table, do.float(), "ref", ws, ss, ts)
    ref_lo = run_windowed(qkv, table, do, "ref", ws, ss, ts)
    for name, a, b, c in zip(("out", "dqkv", "dtable"), tri, ref_hi, ref_lo):
        compare(name, a, b, c, name == "out")
    # same kernels, same order of operations: the two entry points agree bit for bit
    tok = run_tokens(qkv, table, None, do, "triton", window_size=ws, shift_size=ss, table_window_size=ts,
                     mask_shift_size=ss)
    for a, b in zip(tri, tok[:3]):
        assert torch.equal(a, b)


@needs_triton
def test_windowed_without_mask_or_grid():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(3, 2, 18, 16, generator=g).to(DEV) for _ in range(3))
    table = torch.randn(table_length((2, 3, 3)), 2, generator=g).to(DEV)
    ins = [t.clone().requires_grad_(True) for t in (q, k, v, table)]
    o = window_attention(*ins, window_size=(2, 3, 3), backend="triton")
    ref_ins = [t.double().requires_grad_(True) for t in (q, k, v, table)]
    r = window_attention(*ref_ins, window_size=(2, 3, 3), backend="ref")
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, ins, do)
    rgrads = torch.autograd.grad(r, ref_ins, do.double())
    for name, a, b in zip(("out", "dq", "dk", "dv", "dtable"), (o, *grads), (r, *rgrads)):
        compare(name, a, b, None, name == "out")


# ----------------------------------------------------------------------------- determinism, compile, registration
@needs_triton
@pytest.mark.parametrize("one_tile", [True, False], ids=["one_tile_kernel", "three_kernels"])
def test_backward_is_bitwise_deterministic(one_tile):
    """Stated in CAPABILITIES: no atomics, the bias-table gradient is reduced in a fixed order."""
    assert CAPABILITIES["triton"].extra["deterministic"]
    geo = dict(window_size=(2, 4, 4), shift_size=(1, 2, 2), table_window_size=(2, 4, 4), mask_shift_size=(1, 2, 2))
    qkv, table, kvp, do = make(1, (3, 5, 6), 1, 16, (2, 4, 4), torch.bfloat16, seed=7)
    with tiles(one_tile_backward=one_tile, dq_programs=2, db_programs=2, kv_programs=2, win_programs=2):
        a = run_tokens(qkv, table, kvp, do, "triton", **geo)
        b = run_tokens(qkv, table, kvp, do, "triton", **geo)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@needs_triton
def test_torch_compile_fullgraph_forward_and_backward():
    geo = dict(window_size=(2, 4, 4), shift_size=(1, 2, 2), table_window_size=(2, 4, 4), mask_shift_size=(1, 2, 2))
    qkv, table, kvp, do = make(1, (2, 5, 4), 1, 16, (2, 4, 4), torch.float32, seed=2)

    def f(qkv, table, kvp):  # the kernel entry: one custom op forward, one backward, nothing else
        return KERN.window_attention_tokens(qkv, table, kv_pad=kvp, scale=None, **geo) * 2.0

    eager = run_tokens(qkv, table, kvp, do * 2.0, "triton", **geo)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    ins = [t.clone().requires_grad_(True) for t in (qkv, table, kvp)]
    out = compiled(*ins)
    grads = torch.autograd.grad(out, ins, do)
    torch.testing.assert_close(out, eager[0] * 2.0)
    for g, e in zip(grads, eager[1:]):
        torch.testing.assert_close(g, e)


@needs_triton
def test_swin_block_compiles_fullgraph_through_the_backend_choice():
    """The public op (backend choice included) and a whole Swin block trace without a graph break."""
    from bevt.models.video_swin import SwinTransformerBlock3D

    torch.manual_seed(0)
    blk = SwinTransformerBlock3D(32, 2, (2, 4, 4), (1, 2, 2)).to(DEV)
    x = torch.randn(1, 2, 5, 6, 32, device=DEV, requires_grad=True)
    with be.use_backend("triton"):
        eager = blk(x)
        (gx_eager,) = torch.autograd.grad(eager.square().sum(), x)
        out = torch.compile(blk, fullgraph=True, backend="aot_eager")(x)
        (gx,) = torch.autograd.grad(out.square().sum(), x)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(gx, gx_eager)


@needs_triton
def test_custom_ops_pass_opcheck():
    geo = [[2, 3, 3], [1, 1, 1], [2, 3, 3], [1, 1, 1]]
    qkv, table, kvp, _ = make(1, (2, 3, 4), 1, 16, (2, 3, 3), torch.float32, seed=4)
    args = (qkv.requires_grad_(True), table.requires_grad_(True), kvp.requires_grad_(True), *geo, 0.25)
    torch.library.opcheck(torch.ops.bevt.window_attention_tokens_fwd.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def _permuted(t):
    """The same values with transposed strides on the first two axes (what a view of a weight gives)."""
    return t.transpose(0, 1).contiguous().transpose(0, 1)


@needs_triton
def test_backward_ops_pass_opcheck_with_permuted_inputs():
    # padded geometry (kv_pad gets a gradient) and inputs that are not contiguous: the fake kernels must give
    # the strides the real ones return, or a compiled block fails its stride assertion (seen on the GPU)
    ws, ss, ts, ms = [2, 3, 3], [1, 1, 1], [2, 3, 3], [1, 1, 1]
    qkv, table, kvp, do = make(1, (2, 3, 4), 2, 16, (2, 3, 3), torch.float32, seed=5)
    kvp = _permuted(kvp)
    assert not kvp.is_contiguous()
    o, lse = torch.ops.bevt.window_attention_tokens_fwd(qkv, table, kvp, ws, ss, ts, ms, 0.25)
    torch.library.opcheck(torch.ops.bevt.window_attention_tokens_bwd.default,
                          (do, qkv, _permuted(table), kvp, o, lse, ws, ss, ts, ms, 0.25),
                          test_utils=("test_schema", "test_faketensor"))
    q = torch.randn(6, 2, 18, 16, device=DEV)  # windowed layout: (B*nW, heads, N, d)
    k, v = _permuted(torch.randn(6, 2, 18, 16, device=DEV)), torch.randn(6, 2, 18, 16, device=DEV)
    grid = [2, 3, 6]
    o, lse = torch.ops.bevt.window_attention_windows_fwd(q, k, v, table, ws, ts, grid, ms, 0.25)
    torch.library.opcheck(torch.ops.bevt.window_attention_windows_fwd.default, (q, k, v, table, ws, ts, grid, ms, 0.25),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.bevt.window_attention_windows_bwd.default,
                          (torch.randn_like(o), q, k, v, table, o, lse, ws, ts, grid, ms, 0.25),
                          test_utils=("test_schema", "test_faketensor"))


# ----------------------------------------------------------------------------- predicate
def test_predicate_reasons():
    table = torch.randn(table_length((2, 7, 7)), 2)
    with pytest.raises(be.BackendUnavailable, match="head dim"):
        can_run_triton(torch.randn(2, 2, 98, 48), table, window_size=(2, 7, 7), raise_error=True)
    with pytest.raises(be.BackendUnavailable, match="at most"):
        can_run_triton(torch.randn(1, 2, 8 * 11 * 11, 32), torch.randn(table_length((8, 11, 11)), 2),
                       window_size=(8, 11, 11), raise_error=True)
    with pytest.raises(be.BackendUnavailable, match="dtype"):
        can_run_triton(torch.randn(2, 2, 98, 32, dtype=torch.float64), table, window_size=(2, 7, 7), raise_error=True)


# ----------------------------------------------------------------------------- empty inputs
def _outputs_and_grads(fn, inputs, backend):
    """fn(*inputs, backend) and the gradients of its sum (None for an input it does not use)."""
    ins = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*ins, backend)
    out.sum().backward()
    return out.detach(), [t.grad for t in ins]


def _assert_same(got, want):
    (out, grads), (ref_out, ref_grads) = got, want
    assert out.shape == ref_out.shape and out.dtype == ref_out.dtype and torch.equal(out, ref_out)
    for g, r in zip(grads, ref_grads):
        assert (g is None) == (r is None)
        if g is not None:
            assert g.shape == r.shape and torch.equal(g, r)


@needs_triton
@pytest.mark.parametrize("shift", [(0, 0, 0), (0, 1, 1)], ids=["unshifted", "shifted"])
@pytest.mark.parametrize("shape", [(0, 1, 3, 3, 1), (1, 0, 3, 3, 1), (1, 1, 0, 3, 1), (1, 1, 3, 0, 1),
                                   (1, 1, 3, 3, 0)], ids=["batch0", "D0", "H0", "W0", "heads0"])
def test_tokens_empty_grid_matches_reference(shape, shift):
    """An empty grid (or no heads) gives the reference's empty output and gradients, not a launch error."""
    B, D, H, W, nh = shape
    ws = (1, 2, 2)
    qkv = torch.randn(B, D, H, W, 3, nh, 16, device=DEV)
    table, kv_pad = torch.randn(table_length(ws), nh, device=DEV), torch.randn(2, nh, 16, device=DEV)

    def fn(qkv, table, kv_pad, backend):
        return window_attention_tokens(qkv, table, kv_pad=kv_pad, window_size=ws, shift_size=shift, backend=backend)

    tri = _outputs_and_grads(fn, (qkv, table, kv_pad), "triton")
    assert tri[0].shape == (B, D, H, W, nh, 16)
    _assert_same(tri, _outputs_and_grads(fn, (qkv, table, kv_pad), "ref"))


@needs_triton
@pytest.mark.parametrize("mask", [False, True], ids=["no_mask", "masked"])
@pytest.mark.parametrize("windows,heads", [(0, 1), (2, 0)], ids=["no_windows", "no_heads"])
def test_windowed_empty_input_matches_reference(windows, heads, mask):
    ws = (1, 2, 2)
    q, k, v = (torch.randn(windows, heads, 4, 16, device=DEV) for _ in range(3))
    table = torch.randn(table_length(ws), heads, device=DEV)
    geo = dict(padded_grid=(1, 2, 4), mask_shift_size=(0, 1, 1)) if mask else {}

    def fn(q, k, v, table, backend):
        return window_attention(q, k, v, table, window_size=ws, backend=backend, **geo)

    tri = _outputs_and_grads(fn, (q, k, v, table), "triton")
    assert tri[0].shape == q.shape
    _assert_same(tri, _outputs_and_grads(fn, (q, k, v, table), "ref"))


@pytest.mark.skipif(KERN is None, reason="triton is not installed")
def test_kernel_entries_refuse_empty_input_clearly():
    """Called directly (not through bevt.ops), the kernels' entries say why they cannot take an empty input."""
    ws = [1, 2, 2]
    table = torch.randn(table_length(ws), 1, device=DEV)
    with pytest.raises(ValueError, match=r"window_attention_tokens: input of shape \(0, 1, 2, 2, 3, 1, 16\) is empty"):
        KERN.window_attention_tokens(torch.randn(0, 1, 2, 2, 3, 1, 16, device=DEV), table, window_size=ws,
                                     shift_size=[0, 0, 0], table_window_size=ws, kv_pad=None,
                                     mask_shift_size=[0, 0, 0], scale=None)
    q = torch.randn(0, 1, 4, 16, device=DEV)
    with pytest.raises(ValueError, match="use bevt.ops.window_attention.window_attention, which handles empty"):
        KERN.window_attention(q, q, q, table, window_size=ws, table_window_size=ws, padded_grid=None,
                              mask_shift_size=[0, 0, 0], scale=None)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_mixed_dtypes_never_reach_the_kernels(dtype):
    """A v of another dtype than q and k was once run by the kernels as if it were q's dtype."""
    q = torch.randn(2, 1, 4, 16, device=DEV)
    table = torch.randn(table_length((1, 2, 2)), 1, device=DEV)
    with pytest.raises(ValueError, match=f"q, k, v must have one dtype, got float32, float32, "
                                         f"{str(dtype).replace('torch.', '')}"):
        window_attention(q, q, q.to(dtype), table, window_size=(1, 2, 2), backend="triton")


# ----------------------------------------------------------------------------- seeded random sweep
def _random_case(seed):
    rng = random.Random(seed)
    ws = (rng.randint(1, 3), rng.randint(2, 5), rng.randint(2, 5))
    ts = tuple(w + rng.randint(0, 1) for w in ws)
    grid = tuple(w * (2 if i == 2 else 1) - rng.randint(0, w - 1) for i, w in enumerate(ws))
    ss = tuple(rng.randint(0, w - 1) for w in ws)
    return dict(batch=1, grid=grid, heads=rng.randint(1, 2), d=rng.choice([16, 32]), window=ws, shift=ss,
                table_window=ts, dtype=rng.choice([torch.bfloat16, torch.float16]),
                tiles=SIXTEEN if rng.random() < 0.5 else {})  # 16-token tiles: several per window, skips


@needs_triton
@pytest.mark.parametrize("seed", range(24 if EXTENDED else 3))
def test_seeded_random_sweep(seed):
    c = _random_case(seed)
    print(c)
    with tiles(**c["tiles"]):
        check_tokens(c["batch"], c["grid"], c["heads"], c["d"], c["window"], c["shift"], c["table_window"],
                     dtype=c["dtype"], seed=seed)


# ----------------------------------------------------------------------------- GPU: real shapes
def _real_cases():
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    from shapes import SWIN_B_IMAGE_STAGES, SWIN_B_STAGES

    from bevt.models.video_swin import get_window_size

    out = []
    for s in SWIN_B_STAGES:
        for shifted in (False, True):
            ws, ss = get_window_size(s.grid, s.window, tuple(w // 2 for w in s.window) if shifted else (0, 0, 0))
            out.append((f"{s.name}{'_shift' * shifted}", s.batch, s.grid, s.heads, s.head_dim, ws, ss, s.window, ss))
    for s in SWIN_B_IMAGE_STAGES:
        for shifted in (False, True):
            out.append((f"{s.name}{'_shift' * shifted}", s.batch, s.grid, s.heads, s.head_dim, (1, 7, 7),
                        (0, 3, 3) if shifted else (0, 0, 0), s.window, (0, 3, 3)))
    out += [("w16x7x7", 2, (16, 28, 28), 8, 32, (16, 7, 7), (0, 3, 3), (16, 7, 7), (0, 3, 3)),
            ("padded_192px", 2, (8, 48, 48), 4, 32, (8, 7, 7), (0, 3, 3), (8, 7, 7), (0, 3, 3)),
            ("d64_3d_shift", 2, (16, 28, 28), 4, 64, (8, 7, 7), (4, 3, 3), (8, 7, 7), (4, 3, 3))]
    return out


@needs_cuda
@pytest.mark.parametrize("case", _real_cases() if CUDA else [], ids=lambda c: c[0])
def test_real_shapes_gpu(case):
    _, b, grid, nh, d, ws, ss, ts, ms = case
    check_tokens(b, grid, nh, d, ws, ss, ts, ms)


# ----------------------------------------------------------------------------- interpreter fallback
@pytest.mark.skipif(TRITON_HERE or CUDA or KERN is None, reason="the Triton tests ran in this process")
def test_triton_in_fresh_interpreter_process():
    """triton was imported in compiled mode before this module: run the Triton tests in a fresh process."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", __file__, "-k", "not fresh"],
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
