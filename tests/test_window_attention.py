"""Reference window attention vs a literal restatement of the official Video Swin / BEVT semantics."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from bevt.models.video_swin import SwinTransformerBlock3D, WindowAttention3D, get_window_size
from bevt.ops import BackendUnavailable, window_attention, window_attention_tokens
from bevt.ops.window_attention import (partition_windows, relative_position_index, reverse_windows, table_length,
                                       window_attention_ref, window_mask)


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
