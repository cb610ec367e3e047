"""Reference window attention vs a literal restatement of the official Video Swin / BEVT semantics."""
import itertools
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from bevt.models.video_swin import SwinTransformerBlock3D, WindowAttention3D, get_window_size
from bevt.ops import BackendUnavailable, window_attention, window_attention_tokens
from bevt.ops import backend as be
from bevt.ops.window_attention import (partition_windows, relative_position_index, reverse_windows, table_length,
                                       window_attention_ref, window_attention_tokens_ref, window_mask)


# ----------------------------------------------------------------------------- literal official code
def official_index(window):
    """Video Swin's relative_position_index buffer, step by step as in WindowAttention3D.__init__."""
    wd, wh, ww = window
    coords = torch.stack(torch.meshgrid(torch.arange(wd), torch.arange(wh), torch.arange(ww), indexing="ij"))
    flat = torch.flatten(coords, 1)
    rel = (flat[:, :, None] - flat[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += wd - 1
    rel[:, :, 1] += wh - 1
    rel[:, :, 2] += ww - 1
    rel[:, :, 0] *= (2 * wh - 1) * (2 * ww - 1)
    rel[:, :, 1] *= (2 * ww - 1)
    return rel.sum(-1)


def official_compute_mask(Dp, Hp, Wp, window, shift):
    """compute_mask() of the official BasicLayer: slices and region counter, then pairwise -100."""
    img_mask = torch.zeros((1, Dp, Hp, Wp, 1))
    cnt = 0
    for d in (slice(-window[0]), slice(-window[0], -shift[0]), slice(-shift[0], None)):
        for h in (slice(-window[1]), slice(-window[1], -shift[1]), slice(-shift[1], None)):
            for w in (slice(-window[2]), slice(-window[2], -shift[2]), slice(-shift[2], None)):
                img_mask[:, d, h, w, :] = cnt
                cnt += 1
    mw = partition_windows(img_mask, window).squeeze(-1)
    m = mw.unsqueeze(1) - mw.unsqueeze(2)
    return m.masked_fill(m != 0, -100.0).masked_fill(m == 0, 0.0)


def official_attention_part(x, attn: WindowAttention3D, window_size, shift_size, use_mask_of_shift=None):
    """forward_part1 of SwinTransformerBlock3D after norm1 (3D path), with the official index[:N, :N]."""
    B, D, H, W, C = x.shape
    window, shift = get_window_size((D, H, W), window_size, shift_size)
    pad_d1, pad_b, pad_r = (-D) % window[0], (-H) % window[1], (-W) % window[2]
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b, 0, pad_d1))
    _, Dp, Hp, Wp, _ = x.shape
    mshift = shift if use_mask_of_shift is None else use_mask_of_shift
    mask = official_compute_mask(Dp, Hp, Wp, window, mshift) if any(mshift) else None
    if any(shift):
        x = torch.roll(x, shifts=(-shift[0], -shift[1], -shift[2]), dims=(1, 2, 3))
    xw = partition_windows(x, window)
    B_, N, _ = xw.shape
    nh = attn.num_heads
    qkv = attn.qkv(xw).reshape(B_, N, 3, nh, C // nh).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0] * attn.scale, qkv[1], qkv[2]
    a = q @ k.transpose(-2, -1)
    idx = official_index(attn.window_size)[:N, :N].reshape(-1)
    bias = attn.relative_position_bias_table[idx].reshape(N, N, -1).permute(2, 0, 1)
    a = a + bias.unsqueeze(0)
    if mask is not None:
        nW = mask.shape[0]
        a = a.view(B_ // nW, nW, nh, N, N) + mask.unsqueeze(1).unsqueeze(0)
        a = a.view(-1, nh, N, N)
    a = a.softmax(-1)
    o = (a @ v).transpose(1, 2).reshape(B_, N, C)
    o = attn.proj(o)
    o = reverse_windows(o, window, B, (Dp, Hp, Wp))
    if any(shift):
        o = torch.roll(o, shifts=shift, dims=(1, 2, 3))
    return o[:, :D, :H, :W]


def _attn(dim=16, heads=2, window=(2, 7, 7), seed=0):
    torch.manual_seed(seed)
    m = WindowAttention3D(dim, window, heads).double()
    with torch.no_grad():
        m.qkv.bias.normal_()  # non-zero bias: padded tokens then carry real k/v, as in the official block
    return m


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("grid,window,shifted", [
    ((3, 9, 10), (2, 7, 7), True),     # padded on every axis, shifted on every axis
    ((3, 9, 10), (2, 7, 7), False),
    ((2, 14, 14), (2, 7, 7), True),    # no padding
    ((4, 9, 12), (8, 7, 7), True),     # D clamped (leading axis): official index[:N,:N] is exact here
    ((1, 8, 8), (8, 7, 7), True),      # image-like: one token-frame
])
def test_token_attention_matches_official(grid, window, shifted):
    attn = _attn(window=window)
    shift = tuple(w // 2 for w in window) if shifted else (0, 0, 0)
    x = torch.randn(2, *grid, 16, dtype=torch.float64)
    ws, ss = get_window_size(grid, window, shift)
    ours = attn(x, ws, ss)
    ref = official_attention_part(x, attn, window, shift)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


def test_mask_from_coordinates_matches_official_slices():
    for padded, window, shift in [((4, 14, 21), (2, 7, 7), (1, 3, 3)), ((8, 7, 7), (8, 7, 7), (0, 3, 3)),
                                  ((2, 14, 14), (2, 7, 7), (0, 0, 3)), ((6, 12, 9), (3, 4, 3), (1, 2, 1))]:
        ours = window_mask(padded, window, shift, dtype=torch.float64)
        ref = official_compute_mask(*padded, window, shift)
        assert torch.equal(ours, ref.double()), (padded, window, shift)
    assert window_mask((2, 14, 14), (2, 7, 7), (0, 0, 0)) is None


def test_relative_index_matches_official_and_slices_table():
    for window in [(8, 7, 7), (2, 7, 7), (16, 7, 7), (3, 4, 5)]:
        assert torch.equal(relative_position_index(window), official_index(window))
    # a leading-axis clamp equals the official [:N, :N] slice
    full = official_index((8, 7, 7))
    assert torch.equal(relative_position_index((4, 7, 7), (8, 7, 7)), full[:196, :196])
    # an image window reads exactly the dt = 0 slice of the 3D table: rows 7*169 .. 7*169+168
    img = relative_position_index((1, 7, 7), (8, 7, 7))
    assert img.min().item() == 7 * 169 and img.max().item() == 7 * 169 + 168
    # a non-leading clamp: the official slice would read wrong rows; ours reads the right offsets
    ours = relative_position_index((8, 3, 3), (8, 7, 7))
    coords = torch.tensor(list(itertools.product(range(8), range(3), range(3))))
    d = coords[:, None] - coords[None, :]
    expect = (d[..., 0] + 7) * 169 + (d[..., 1] + 6) * 13 + (d[..., 2] + 6)
    assert torch.equal(ours, expect)
    assert not torch.equal(ours, full[:72, :72])


def test_image_path_is_2d_swin_with_dt0_slice():
    """The image path through the 3D module equals 2D Swin attention with the dt=0 slice as its table."""
    attn = _attn(window=(8, 7, 7))
    x = torch.randn(2, 1, 14, 14, 16, dtype=torch.float64)
    ours = attn(x, (1, 7, 7), (0, 3, 3))
    # 2D Swin: own 13x13 table = the middle temporal slice, 2D mask, 2D index
    table2d = attn.relative_position_bias_table.view(15, 169, -1)[7]
    attn2d = _attn(window=(1, 7, 7))
    attn2d.load_state_dict({**attn.state_dict(), "relative_position_bias_table": table2d})
    ref = official_attention_part(x, attn2d, (1, 7, 7), (0, 3, 3))
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


def test_windowed_and_token_entry_points_agree():
    torch.manual_seed(1)
    B, grid, window, nh, d = 2, (4, 9, 9), (2, 7, 7), 2, 8
    qkv = torch.randn(B, *grid, 3, nh, d, dtype=torch.float64)
    table = torch.randn(table_length(window), nh, dtype=torch.float64)
    kv_pad = torch.randn(2, nh, d, dtype=torch.float64)
    shift = (1, 3, 3)
    out_tok = window_attention_tokens(qkv, table, window_size=window, shift_size=shift, kv_pad=kv_pad, backend="ref")
    # the same through the windowed entry: pad, roll, partition by hand
    padded = (4, 14, 14)
    q, k, v = qkv.unbind(4)
    q = F.pad(q, (0, 0, 0, 0, 0, 5, 0, 5))
    kv = kv_pad[:, None, None, None, None].expand(2, B, *padded, nh, d).clone()
    kv[:, :, :4, :9, :9] = torch.stack((k, v))
    k, v = kv
    q, k, v = (torch.roll(t, (-1, -3, -3), (1, 2, 3)) for t in (q, k, v))
    qw, kw, vw = (partition_windows(t, window).transpose(1, 2) for t in (q, k, v))
    ow = window_attention(qw, kw, vw, table, window_size=window, padded_grid=padded, mask_shift_size=shift,
                          backend="ref")
    o = torch.roll(reverse_windows(ow.transpose(1, 2), window, B, padded), (1, 3, 3), (1, 2, 3))[:, :4, :9, :9]
    torch.testing.assert_close(out_tok, o)


def test_padded_tokens_pass_gradient_to_qkv_bias():
    attn = _attn(window=(2, 7, 7))
    x = torch.randn(1, 2, 9, 9, 16, dtype=torch.float64)
    attn(x, (2, 7, 7), (0, 0, 0)).sum().backward()
    g_ours = attn.qkv.bias.grad.clone()
    attn.zero_grad()
    official_attention_part(x, attn, (2, 7, 7), (0, 0, 0)).sum().backward()
    torch.testing.assert_close(g_ours, attn.qkv.bias.grad)


def test_image_quirk_geometry():
    blk0 = SwinTransformerBlock3D(32, 1, (8, 7, 7), (0, 0, 0))
    blk1 = SwinTransformerBlock3D(32, 1, (8, 7, 7), (4, 3, 3))
    # corrected default: images behave as one-frame clips; stage 4 (7x7) is global attention
    assert blk1.window_geometry((1, 7, 7)) == ((1, 7, 7), (0, 0, 0), (0, 0, 0))
    assert blk0.window_geometry((1, 56, 56)) == ((1, 7, 7), (0, 0, 0), (0, 0, 0))
    # official quirks: the shifted mask in unshifted blocks too, shift kept at stage 4
    assert blk0.window_geometry((1, 56, 56), image_quirks=True) == ((1, 7, 7), (0, 0, 0), (0, 3, 3))
    assert blk1.window_geometry((1, 7, 7), image_quirks=True) == ((1, 7, 7), (0, 3, 3), (0, 3, 3))
    # the official quirk path equals the literal official code with the 2D mask in an unshifted block
    attn = _attn(window=(8, 7, 7))
    x = torch.randn(1, 1, 14, 14, 16, dtype=torch.float64)
    ours = attn(x, (1, 7, 7), (0, 0, 0), (0, 3, 3))
    ref = official_attention_part(x, attn, (1, 7, 7), (0, 0, 0), use_mask_of_shift=(0, 3, 3))
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    # stage 4 at 7x7: 74% of mask entries are -100 (REFERENCE_BEVT.md 1.5)
    m = window_mask((1, 7, 7), (1, 7, 7), (0, 3, 3))
    assert abs((m != 0).float().mean().item() - 0.74) < 0.01


def test_reference_matches_naive_softmax_in_low_precision():
    torch.manual_seed(0)
    q, k, v = (torch.randn(4, 2, 98, 16, dtype=torch.bfloat16) for _ in range(3))
    table = torch.randn(table_length((2, 7, 7)), 2) * 0.02
    out = window_attention_ref(q, k, v, table, window_size=(2, 7, 7))
    ref = window_attention_ref(q.double(), k.double(), v.double(), table.double(), window_size=(2, 7, 7))
    assert out.dtype == torch.bfloat16
    assert (out.double() - ref).abs().max() < 0.05


@pytest.mark.parametrize("bad,msg", [
    (dict(q_shape=(4, 2, 97, 16)), "tokens per window"),
    (dict(table_rows=100), "needs"),
    (dict(mask_shift=(0, 3, 3), padded_grid=None), "padded_grid is required"),
])
def test_clear_errors(bad, msg):
    q = torch.randn(*bad.get("q_shape", (4, 2, 98, 16)))
    table = torch.randn(bad.get("table_rows", table_length((2, 7, 7))), 2)
    with pytest.raises(ValueError, match=msg):
        window_attention(q, q, q, table, window_size=(2, 7, 7), mask_shift_size=bad.get("mask_shift", (0, 0, 0)),
                         padded_grid=bad.get("padded_grid"), backend="ref")


def test_unavailable_backend_raises_with_reason(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = torch.randn(4, 2, 98, 32)
    table = torch.randn(table_length((2, 7, 7)), 2)
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(BackendUnavailable, match="triton"):
        window_attention(q, q, q, table, window_size=(2, 7, 7), backend="triton")
    with pytest.raises(BackendUnavailable, match="unknown backend"):
        window_attention(q, q, q, table, window_size=(2, 7, 7), backend="cuda")
    # auto falls back to the reference on CPU
    out = window_attention(q, q, q, table, window_size=(2, 7, 7))
    assert out.shape == q.shape


# ----------------------------------------------------------------------------- input checks, both entries and backends
# check_inputs runs before a backend is chosen, so "triton" refuses the same inputs with the same message even
# where its kernels cannot run (no interpreter, no GPU): these tests need neither.
BACKENDS = ("ref", "triton")
WIN = (1, 2, 2)


def _windowed_args(dtype=torch.float32, heads=1, head_dim=16, windows=2):
    q = torch.randn(windows, heads, 4, head_dim, dtype=dtype)
    return q, q.clone(), q.clone(), torch.randn(table_length(WIN), heads)


def _run_windowed(backend, q, k, v, table, **kw):
    return window_attention(q, k, v, table, **{"window_size": WIN, **kw}, backend=backend)


def _run_tokens(backend, qkv=None, table=None, **kw):
    qkv = torch.randn(1, 1, 2, 2, 3, 1, 16) if qkv is None else qkv
    table = torch.randn(table_length(WIN), qkv.shape[5]) if table is None else table
    return window_attention_tokens(qkv, table, **{"window_size": WIN, **kw}, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32, torch.float64),
                                    (torch.float32, torch.bfloat16, torch.float32),
                                    (torch.float16, torch.float32, torch.float32)], ids=["v64", "k16", "q16"])
def test_mixed_qkv_dtypes_are_refused_naming_them(backend, dtypes):
    q, k, v, table = _windowed_args()
    q, k, v = (t.to(dt) for t, dt in zip((q, k, v), dtypes))
    names = ", ".join(str(dt).replace("torch.", "") for dt in dtypes)
    with pytest.raises(ValueError, match=f"window_attention: q, k, v must have one dtype, got {names}"):
        _run_windowed(backend, q, k, v, table)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.int32, torch.complex64, torch.float8_e4m3fn])
def test_dtype_no_backend_supports_is_refused(backend, dtype):
    q = torch.zeros(2, 1, 4, 16).to(dtype)
    table = torch.randn(table_length(WIN), 1)
    name = str(dtype).replace("torch.", "")
    with pytest.raises(ValueError, match=f"window_attention: dtype {name} of q, k, v is not supported; "
                                         f"supported: float32, float16, bfloat16, float64"):
        _run_windowed(backend, q, q, q, table)
    qkv = torch.zeros(1, 1, 2, 2, 3, 1, 16).to(dtype)
    with pytest.raises(ValueError, match=f"window_attention_tokens: dtype {name} of qkv is not supported"):
        _run_tokens(backend, qkv, table)


def test_float64_runs_on_the_reference_and_triton_says_why_not():
    """Per the capability table: float64 is the reference's (the kernels' fp32 results are checked against it);
    asking Triton for it raises BackendUnavailable with the dtypes it has, auto falls back to the reference."""
    from bevt.ops.window_attention import CAPABILITIES

    assert torch.float64 in CAPABILITIES["ref"].dtypes and torch.float64 not in CAPABILITIES["triton"].dtypes
    q, k, v, table = (t.double() for t in _windowed_args())
    ref = _run_windowed("ref", q, k, v, table)
    assert ref.dtype == torch.float64
    assert torch.equal(_run_windowed(None, q, k, v, table), ref)
    with pytest.raises(BackendUnavailable, match="dtype must be one of float16, bfloat16, float32, got float64"):
        _run_windowed("triton", q, k, v, table)
    with pytest.raises(BackendUnavailable, match="got float64"):
        _run_tokens("triton", torch.randn(1, 1, 2, 2, 3, 1, 16, dtype=torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask_shift,msg", [
    ((0, -1, 0), r"mask_shift_size must be >= 0 on every axis, got \(0, -1, 0\)"),
    ((0, 2, 0), r"mask_shift_size must be smaller than the window \(1, 2, 2\) on every axis, got \(0, 2, 0\)"),
    ((0, 5, 1), r"mask_shift_size must be smaller than the window"),
    ((1, 0, 0), r"mask_shift_size must be smaller than the window"),  # a window of 1 cannot be shifted
    ((0, 1), r"mask_shift_size must be an int or 3 ints \(d, h, w\), got \(0, 1\)"),
    ((0, 1, 1, 0), r"mask_shift_size must be an int or 3 ints"),
    ("x", r"mask_shift_size must be an int or 3 ints"),
])
def test_bad_mask_shift_is_refused_by_both_entries(backend, mask_shift, msg):
    """The windowed entry used to ignore an out-of-range mask shift; both entries now check it the same way."""
    q, k, v, table = _windowed_args()
    with pytest.raises(ValueError, match="window_attention: " + msg):
        _run_windowed(backend, q, k, v, table, padded_grid=(1, 2, 4), mask_shift_size=mask_shift)
    with pytest.raises(ValueError, match="window_attention_tokens: " + msg):
        _run_tokens(backend, mask_shift_size=mask_shift)
    with pytest.raises(ValueError, match="window_attention_tokens: " + msg.replace("mask_shift_size", "shift_size")):
        _run_tokens(backend, shift_size=mask_shift)


@pytest.mark.parametrize("backend", BACKENDS)
def test_head_dim_zero_is_refused(backend):
    q, k, v, table = _windowed_args(head_dim=0)
    with pytest.raises(ValueError, match=r"window_attention: head dim \(last axis of q, k, v\) must be >= 1, got 0"):
        _run_windowed(backend, q, k, v, table)
    with pytest.raises(ValueError, match=r"window_attention_tokens: head dim \(last axis of qkv\) must be >= 1, got 0"):
        _run_tokens(backend, torch.randn(1, 1, 2, 2, 3, 1, 0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("argument", ["window_size", "table_window_size", "padded_grid"])
@pytest.mark.parametrize("value", [(1, 0, 2), (1, -2, 2), 0])
def test_non_positive_sizes_are_refused_naming_the_argument(backend, argument, value):
    q, k, v, table = _windowed_args()
    geometry = dict(window_size=WIN, table_window_size=WIN, padded_grid=(1, 2, 4), mask_shift_size=(0, 1, 1))
    geometry[argument] = value
    shown = r"\(0, 0, 0\)" if value == 0 else str(value).replace("(", r"\(").replace(")", r"\)")
    with pytest.raises(ValueError, match=f"window_attention: {argument} must be >= 1 on every axis, got {shown}"):
        window_attention(q, k, v, table, **geometry, backend=backend)
    if argument != "padded_grid":
        with pytest.raises(ValueError, match=f"window_attention_tokens: {argument} must be >= 1 on every axis"):
            _run_tokens(backend, **{argument: value})


@pytest.mark.parametrize("backend", BACKENDS)
def test_table_kv_pad_and_devices_are_checked(backend):
    q, k, v, table = _windowed_args()
    with pytest.raises(ValueError, match="bias_table must be floating point, got int64"):
        _run_windowed(backend, q, k, v, table.long())
    with pytest.raises(ValueError, match=r"bias_table must be \(L, 1\)"):
        _run_windowed(backend, q, k, v, table[:, None])
    with pytest.raises(ValueError, match="kv_pad must be floating point, got int64"):
        _run_tokens(backend, kv_pad=torch.zeros(2, 1, 16, dtype=torch.long))
    with pytest.raises(ValueError, match=r"kv_pad must be \(2, 1, 16\), got \(2, 16\)"):
        _run_tokens(backend, kv_pad=torch.zeros(2, 16))
    with pytest.raises(ValueError, match="all tensors must be on one device, got q on cpu, k on meta, v on cpu, "
                                         "bias_table on cpu"):
        _run_windowed(backend, q, k.to("meta"), v, table)
    with pytest.raises(ValueError, match="window_attention: q, k, v must have one shape"):
        _run_windowed(backend, q, k[:1], v, table)


def test_table_and_kv_pad_may_have_another_float_dtype():
    """Under autocast the table and the qkv bias (kv_pad) stay fp32 parameters while qkv is bf16."""
    qkv = torch.randn(1, 1, 3, 3, 3, 1, 16, dtype=torch.bfloat16)
    table, kv_pad = torch.randn(table_length(WIN), 1), torch.randn(2, 1, 16)
    out = _run_tokens("ref", qkv, table, kv_pad=kv_pad)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, _run_tokens("ref", qkv, table.double(), kv_pad=kv_pad.double()))


def test_reference_functions_check_their_inputs_too():
    q, k, v, table = _windowed_args()
    with pytest.raises(ValueError, match="window_attention_ref: q, k, v must have one dtype"):
        window_attention_ref(q, k, v.double(), table, window_size=WIN)
    with pytest.raises(ValueError, match="window_attention_tokens_ref: shift_size must be >= 0"):
        window_attention_tokens_ref(torch.randn(1, 1, 2, 2, 3, 1, 16), table, window_size=WIN, shift_size=(0, -1, 0))


@pytest.mark.parametrize("shape", [(0, 1, 3, 3), (1, 0, 3, 3), (1, 1, 0, 3), (1, 1, 3, 0), (2, 1, 3, 3)],
                         ids=["batch0", "D0", "H0", "W0", "full"])
def test_reference_handles_empty_grids(shape):
    """The reference's answer for an empty grid (the Triton backend matches it: test_window_attention_triton)."""
    B, D, H, W = shape
    qkv = torch.randn(B, D, H, W, 3, 1, 16, requires_grad=True)
    table = torch.randn(table_length(WIN), 1, requires_grad=True)
    out = _run_tokens("ref", qkv, table, shift_size=(0, 1, 1))
    assert out.shape == (B, D, H, W, 1, 16)
    out.sum().backward()
    assert qkv.grad.shape == qkv.shape and table.grad.shape == table.shape
    if qkv.numel() == 0:
        assert not table.grad.any()


# ----------------------------------------------------------------------------- BEVT_KERNELS
@pytest.fixture
def kernels_env(monkeypatch):
    """set(value): BEVT_KERNELS=value, read again at the next use of a default (and again after the test)."""
    def set_value(value):
        monkeypatch.setenv("BEVT_KERNELS", value)
        be.reload_environment_setting()

    yield set_value
    be.reload_environment_setting()


BAD_SETTINGS = {
    "bogus": "unknown backend 'bogus'",
    "window_attention=nope": "op window_attention has no backend 'nope'",
    "masking=triton": "op masking has no backend 'triton'",
    "attention=ref": "unknown op 'attention'",
    "window_attention": "unknown backend 'window_attention'",
    "window_attention=ref,masked_ce": "expected op=backend, got 'masked_ce'",
}


def _tiny_windowed():
    q = torch.randn(2, 1, 4, 16)
    return (q, q, q, torch.randn(table_length(WIN), 1)), dict(window_size=WIN)


@pytest.mark.parametrize("value", list(BAD_SETTINGS))
def test_invalid_bevt_kernels_fails_at_use_naming_it(kernels_env, value):
    kernels_env(value)
    args, kw = _tiny_windowed()
    with pytest.raises(ValueError) as e:
        window_attention(*args, **kw)
    msg = str(e.value)
    assert msg.startswith(f"BEVT_KERNELS={value!r} is invalid: {BAD_SETTINGS[value]}"), msg
    # the valid forms, ops and backends are listed
    assert "auto, ref, triton, cuda" in msg
    assert "window_attention: auto, triton, ref; masked_ce: auto, triton, ref; masking: auto, cuda, ref" in msg
    assert be.environment_setting_problem() == msg
    with pytest.raises(ValueError, match="BEVT_KERNELS="):
        be.get_default_backend("masked_ce")


def test_invalid_bevt_kernels_leaves_explicit_choices_working(kernels_env):
    kernels_env("bogus")
    args, kw = _tiny_windowed()
    want = window_attention_ref(*args, **kw)
    assert torch.equal(window_attention(*args, **kw, backend="ref"), want)  # an explicit backend never reads it
    with be.use_backend("ref"):  # a default for every op set in the process (as the config's kernels.* do)
        assert torch.equal(window_attention(*args, **kw), want)
    with be.use_backend({"window_attention": "ref"}):  # one op set: the others still need BEVT_KERNELS
        assert torch.equal(window_attention(*args, **kw), want)
        with pytest.raises(ValueError, match="BEVT_KERNELS='bogus'"):
            be.get_default_backend("masked_ce")
    with pytest.raises(ValueError, match="BEVT_KERNELS='bogus'"):  # use_backend restored the process state
        window_attention(*args, **kw)
    kernels_env("ref")  # fixed: read again
    assert torch.equal(window_attention(*args, **kw), want)


@pytest.mark.parametrize("value,defaults", [
    ("", ("auto", "auto", "auto")),
    ("auto", ("auto", "auto", "auto")),
    ("ref", ("ref", "ref", "ref")),
    ("triton", ("triton", "triton", "auto")),
    ("cuda", ("auto", "auto", "cuda")),
    (" window_attention=triton, masked_ce=ref ", ("triton", "ref", "auto")),
    ("masking=cuda,", ("auto", "auto", "cuda")),
])
def test_valid_bevt_kernels_values(kernels_env, value, defaults):
    kernels_env(value)
    assert be.environment_setting_problem() == ""
    assert tuple(be.get_default_backend(op) for op in be.OPS) == defaults
    with be.use_backend("ref", op="masked_ce"):  # set in the process: wins over the variable
        assert be.get_default_backend("masked_ce") == "ref"
        assert be.get_default_backend("window_attention") == defaults[0]
    assert be.get_default_backend("masked_ce") == defaults[1]


def test_set_default_backend_names_the_bad_setting():
    with pytest.raises(ValueError, match="default backend='fast' is invalid: unknown backend 'fast'"):
        be.set_default_backend("fast")


def _bevt(*args, bevt_kernels: str, cwd):
    env = dict(os.environ, BEVT_KERNELS=bevt_kernels, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "bevt.cli", *args], capture_output=True, text=True, timeout=300,
                          env=env, cwd=cwd)


def test_info_reports_an_invalid_bevt_kernels(kernels_env, tmp_path):
    from bevt import info

    kernels_env("window_attention=nope")
    collected = info.collect()
    assert collected["BEVT_KERNELS_problem"].startswith("BEVT_KERNELS='window_attention=nope' is invalid")
    assert set(collected["kernel_defaults"].values()) == {info.INVALID_SETTING}
    assert "problem: BEVT_KERNELS='window_attention=nope' is invalid" in info.format_info(collected)
    # the command, in a fresh process: importing bevt with the bad value works, and info says what is wrong
    r = _bevt("info", bevt_kernels="bogus", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert "problem: BEVT_KERNELS='bogus' is invalid: unknown backend 'bogus'" in r.stdout
    assert "[default: invalid BEVT_KERNELS]" in r.stdout
    kernels_env("ref")
    collected = info.collect()
    assert collected["BEVT_KERNELS_problem"] == "" and set(collected["kernel_defaults"].values()) == {"ref"}


def test_a_run_with_an_invalid_bevt_kernels_stops_before_any_work(tmp_path):
    out = tmp_path / "run"
    r = _bevt("pretrain", "--set", f"run.out_dir={out}", bevt_kernels="window_attention=nope", cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert "bevt pretrain: BEVT_KERNELS='window_attention=nope' is invalid" in r.stderr
    assert not out.exists()
