"""Shifted-window attention with relative position bias at the Video Swin-B stage shapes (8 clips, bf16).

Entries: ``windows`` (q, k, v already partitioned, (BW, nh, N, d)) and ``tokens`` (the qkv projection in
token layout, as the Swin blocks call it: the reference then pays for pad, roll, window partition and their
reverses; the Triton kernel does them by index arithmetic). Providers: ``ref`` (the eager reference),
``sdpa`` (F.scaled_dot_product_attention with the bias + shift mask expanded to one (N, N) mask per window
and head), ``flex`` (FlexAttention, the table gathered in score_mod), ``triton`` (bevt's kernels); sdpa and
flex have no token layout, so the tokens entry compares ref and triton. Modes: ``fwd`` (no gradient),
``bwd`` (backward of a recorded forward), ``fwd_bwd``; gradients w.r.t. q, k, v (qkv), the bias table and
kv_pad. Blocks: ``shift`` (the shifted block: roll + mask in the boundary windows) and ``noshift``; stage 4
has one window per clip, so no shift. ``ft_stage1``: stage 1 of fine-tuning's 32-frame clips (two windows
along D, so the temporal shift is live), shifted block, tokens entry.

Before timing, each (entry, stage, provider) is checked against the reference in fp32: max and mean errors of
the output and of every gradient at most 2x / 3x those of the reference in bf16. Recorded per row:
``event_ms`` (median of CUDA events around one call), ``graph_ms`` (replays of a CUDA graph of the call,
triton only: the GPU time without the host's launch time), ``ms`` = graph_ms where there is one, else
event_ms, TFLOP/s of the attention products at ``ms`` (fwd 4*N^2*d per window and head, bwd 2.5x that),
``peak_mib`` (peak memory above the inputs, fwd_bwd) and ``work_mib`` (the same minus the output and the
gradients every provider returns).
"""
from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

try:
    from benchmarks.timing import cuda_time_ms, graph_time_ms, peak_extra_mib
    from benchmarks.shapes import SWIN_B_FINETUNE_STAGE1, SWIN_B_STAGES
except ImportError:  # benchmarks/ itself on sys.path (pytest's default import of a folder without __init__.py)
    from timing import cuda_time_ms, graph_time_ms, peak_extra_mib
    from shapes import SWIN_B_FINETUNE_STAGE1, SWIN_B_STAGES

MODES = ("fwd", "bwd", "fwd_bwd")
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}


SHAPES = {s.name: s for s in (*SWIN_B_STAGES, SWIN_B_FINETUNE_STAGE1)}


def _cases():
    out = []
    for s in SWIN_B_STAGES:
        for block in (("noshift",) if s.name == "stage4" else ("noshift", "shift")):
            out.append((s.name, block))
    # fine-tuning's 32-frame clips: two windows along D, the temporal shift live (masked tiles skipped)
    out.append((SWIN_B_FINETUNE_STAGE1.name, "shift"))
    return out


def _params():
    """windows entry: every provider on the shifted block of the pretraining stages (stage 4: its only block);
    tokens entry: ref and triton on both blocks (what the model runs)."""
    p = []
    for stage, block in _cases():
        entries = [("tokens", ("ref", "triton"))]
        if (block == "shift" and stage != SWIN_B_FINETUNE_STAGE1.name) or stage == "stage4":
            entries.insert(0, ("windows", ("ref", "sdpa", "flex", "triton")))
        for entry, providers in entries:
            for provider in providers:
                p.append(pytest.param(entry, stage, block, provider, id=f"{entry}-{stage}-{block}-{provider}"))
    return p


@functools.lru_cache(maxsize=None)
def _geometry(stage: str, block: str):
    from bevt.models.video_swin import get_window_size

    s = SHAPES[stage]
    shift = tuple(w // 2 for w in s.window) if block == "shift" else (0, 0, 0)
    ws, ss = get_window_size(s.grid, s.window, shift)
    return s, ws, ss


@functools.lru_cache(maxsize=2)
def _inputs(stage: str, block: str):
    """Token-layout inputs (qkv, table, kv_pad, do) and the windowed view of the same problem."""
    from bevt.ops.window_attention import partition_windows, table_length

    s, ws, ss = _geometry(stage, block)
    g = torch.Generator(device="cuda").manual_seed(0)
    B, (D, H, W), nh, d = s.batch, s.grid, s.heads, s.head_dim
    qkv = torch.randn(B, D, H, W, 3, nh, d, device="cuda", generator=g).to(torch.bfloat16)
    table = torch.randn(table_length(s.window), nh, device="cuda", generator=g) * 0.5
    kv_pad = torch.randn(2, nh, d, device="cuda", generator=g)
    do = torch.randn(B, D, H, W, nh, d, device="cuda", generator=g).to(torch.bfloat16)
    x = torch.roll(qkv, shifts=tuple(-v for v in ss), dims=(1, 2, 3)) if any(ss) else qkv
    q, k, v = (partition_windows(t, ws).transpose(1, 2).contiguous() for t in x.unbind(4))
    dox = torch.roll(do, shifts=tuple(-v for v in ss), dims=(1, 2, 3)) if any(ss) else do
    do_w = partition_windows(dox, ws).transpose(1, 2).contiguous()
    return dict(tokens=(qkv, table, kv_pad), do_tokens=do, windows=(q, k, v, table), do_windows=do_w)


def _sdpa(stage, block):
    from bevt.ops.window_attention import relative_position_index, window_mask

    s, ws, ss = _geometry(stage, block)
    n = math.prod(ws)
    idx = relative_position_index(ws, s.window, "cuda").view(-1)
    mask = window_mask(s.grid, ws, ss, "cuda")  # (nW, N, N) or None

    def f(q, k, v, table):
        bw, nh = q.shape[:2]
        bias = table[idx].view(n, n, nh).permute(2, 0, 1)  # nh, N, N
        m = bias.unsqueeze(0) if mask is None else bias.unsqueeze(0) + mask.unsqueeze(1)
        m = m.to(q.dtype).unsqueeze(0).expand(bw // m.shape[0], -1, -1, -1, -1).reshape(bw, nh, n, n)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m)

    return f


@functools.lru_cache(maxsize=None)
def _flex_fn():
    from torch.nn.attention.flex_attention import flex_attention

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    return torch.compile(flex_attention, dynamic=False)


def _flex(stage, block):
    from bevt.ops.window_attention import relative_position_index, window_mask

    s, ws, ss = _geometry(stage, block)
    idx = relative_position_index(ws, s.window, "cuda")
    mask = window_mask(s.grid, ws, ss, "cuda")
    flex = _flex_fn()

    def f(q, k, v, table):
        if mask is None:
            def score_mod(score, b, h, qi, ki):
                return score + table[idx[qi, ki], h]
        else:
            nw = mask.shape[0]

            def score_mod(score, b, h, qi, ki):
                return score + table[idx[qi, ki], h] + mask[b % nw, qi, ki]
        return flex(q, k, v, score_mod=score_mod)

    return f


def _fn(entry, stage, block, provider):
    """provider's function of (inputs...) -> output, for this entry."""
    from bevt.ops.window_attention import window_attention, window_attention_tokens

    s, ws, ss = _geometry(stage, block)
    if entry == "tokens":
        def f(qkv, table, kv_pad):
            return window_attention_tokens(qkv, table, window_size=ws, shift_size=ss, table_window_size=s.window,
                                           kv_pad=kv_pad, backend=provider)
        return f
    if provider in ("ref", "triton"):
        def f(q, k, v, table):
            return window_attention(q, k, v, table, window_size=ws, table_window_size=s.window, padded_grid=s.grid,
                                    mask_shift_size=ss, backend=provider)
        return f
    return _sdpa(stage, block) if provider == "sdpa" else _flex(stage, block)


def _run(f, inputs, do):
    ins = [t.detach().clone().requires_grad_(True) for t in inputs]
    o = f(*ins)
    grads = torch.autograd.grad(o, ins, do, allow_unused=True)
    return [o.detach()] + [torch.zeros_like(t) if g is None else g for t, g in zip(ins, grads)]


@functools.lru_cache(maxsize=2)
def _reference(entry, stage, block):
    data = _inputs(stage, block)
    f = _fn(entry, stage, block, "ref")
    ins, do = data[entry], data["do_" + entry]
    hi = _run(f, [t.float() for t in ins], do.float())
    lo = _run(f, list(ins), do)
    return hi, lo


def _check(entry, stage, block, provider):
    data = _inputs(stage, block)
    got = _run(_fn(entry, stage, block, provider), data[entry], data["do_" + entry])
    hi, lo = _reference(entry, stage, block)
    names = ["out"] + [f"grad{i}" for i in range(len(got) - 1)]
    for name, a, b, c in zip(names, got, hi, lo):
        a, b, c = a.double(), b.double(), c.double()
        err, elo = (a - b).abs(), (c - b).abs()
        lim = 2.0 if name == "out" else 3.0
        floor = 1e-6 * (b.abs().max().item() + 1.0)
        print(f"{entry}/{stage}/{block}/{provider} {name}: max {err.max().item():.3e} (bf16 ref "
              f"{elo.max().item():.3e}) mean {err.mean().item():.3e} (bf16 ref {elo.mean().item():.3e})")
        assert torch.isfinite(a).all(), f"{provider} {name}: non-finite"
        assert err.max().item() <= lim * elo.max().item() + floor, f"{provider} {name}: max error"
        assert err.mean().item() <= lim * elo.mean().item() + floor, f"{provider} {name}: mean error"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("entry,stage,block,provider", _params())
def test_window_attention(entry, stage, block, provider, mode, record):
    s, ws, ss = _geometry(stage, block)
    _check_once(entry, stage, block, provider)
    data = _inputs(stage, block)
    f = _fn(entry, stage, block, provider)
    ins = [t.detach().clone().requires_grad_(True) for t in data[entry]]
    do = data["do_" + entry]
    graph_ms = None
    if mode == "fwd":
        def fn():
            with torch.no_grad():
                return f(*ins)
    elif mode == "bwd":
        if provider == "flex":
            pytest.skip("a compiled FlexAttention backward cannot be replayed on a retained graph (donated "
                        "buffers); its fwd and fwd_bwd rows are measured")
        o = f(*ins)

        def fn():
            return torch.autograd.grad(o, ins, do, retain_graph=True, allow_unused=True)
    else:
        def fn():
            return torch.autograd.grad(f(*ins), ins, do, allow_unused=True)
    event_ms = cuda_time_ms(fn)
    if provider == "triton" and mode != "bwd":
        graph_ms = graph_time_ms(fn, calls=1, rep=50)
    ms = graph_ms if graph_ms is not None else event_ms
    n = math.prod(ws)
    windows = ins[0].shape[0] if entry == "windows" else s.windows
    flops = 4 * windows * s.heads * n * n * s.head_dim * FLOP_FACTOR[mode]
    row = dict(op="window_attention", entry=entry, provider=provider, mode=mode, shape=f"{stage}_{block}",
               windows=windows, heads=s.heads, tokens=n, head_dim=s.head_dim, ms=ms, event_ms=event_ms,
               graph_ms=graph_ms, tflops=flops / (ms * 1e-3) / 1e12)
    if mode == "fwd_bwd":
        out_bytes = sum(t.numel() * t.element_size() for t in ins) + do.numel() * do.element_size()
        row["peak_mib"] = peak_extra_mib(fn)
        row["work_mib"] = row["peak_mib"] - out_bytes / 2 ** 20
    record(**row)
    print(row)


_checked: set = set()


def _check_once(entry, stage, block, provider):
    key = (entry, stage, block, provider)
    if key not in _checked:
        _check(*key)
        _checked.add(key)
