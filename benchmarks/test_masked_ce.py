"""Masked-token cross-entropy (LM head D -> V + CE over masked tokens) at the BEVT-B step shape.

Providers: ``ref`` (gather the masked rows, then linear + F.cross_entropy: bevt.ops.masked_ce_ref),
``official`` (the official code's way: the head on every token, then index the masked ones), ``triton``
(bevt's fused kernel, with no bound on the masked count: it launches for every token's worth of rows),
``triton_bound`` (the same with ``max_masked`` = the BEVT step's bound for these masks: at most 1568 target
tokens per clip, 98 cells x 8 slots x 2, i.e. 12544 rows for 8 clips). Modes: ``fwd`` (no gradient needed)
and ``fwd_bwd`` (loss.backward() for hidden, weight and bias). Each provider's loss, accuracy and gradients
are checked against an fp32 reference before it is timed. Recorded: ``event_ms`` (median of CUDA events around one eager call, synchronized
each time: bounded below by the host's launch time), ``graph_ms`` (replays of a CUDA graph of 20 calls, per
call: the GPU time; only for providers without a host sync, i.e. the triton ones: the references index with a
boolean mask), ``ms`` the headline (graph_ms where there is one, else event_ms), TFLOP/s of the products at
``ms``, the floor at 778 TFLOP/s, peak memory above the inputs, and the same minus the gradient tensors every
provider must return (``work_mib``: the temporaries).
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

try:
    from benchmarks.timing import cuda_time_ms, graph_time_ms, peak_extra_mib
    from benchmarks.shapes import CE_SHAPE
except ImportError:  # benchmarks/ itself on sys.path (pytest's default import of a folder without __init__.py)
    from timing import cuda_time_ms, graph_time_ms, peak_extra_mib
    from shapes import CE_SHAPE

PROVIDERS = ("ref", "official", "triton", "triton_bound")
MODES = ("fwd", "fwd_bwd")
MATMUL_TFLOPS = 778.0  # measured bf16 ceiling of the reference H100 (PERFORMANCE.md)
BATCH = 8


def _bevt_bound_per_clip() -> int:
    """The per-clip bound the BEVT step passes for its default masks (1568)."""
    from bevt.ops import BlockMaskSpec, TubeSpec

    return TubeSpec().max_masked_target(BlockMaskSpec())


@functools.lru_cache(maxsize=1)
def _inputs():
    """hidden (8, 3136, 1024) bf16, exactly 784 masked tokens per clip, weight fp32, bias fp32, targets."""
    rows, D, V = CE_SHAPE["rows"], CE_SHAPE["hidden"], CE_SHAPE["vocab"]
    per = rows // BATCH
    L = 4 * per  # 25% masked, as the BEVT tube masks on a 8x56x56 // (2x4x4) grid
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(BATCH, L, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    w = (torch.randn(V, D, device="cuda", generator=g) * 0.05).requires_grad_()
    b = (torch.randn(V, device="cuda", generator=g) * 0.1).requires_grad_()
    r = torch.rand(BATCH, L, device="cuda", generator=g)
    mask = r <= r.sort(dim=1).values[:, per - 1:per]
    with torch.no_grad():
        am = (h.float() @ w.t()).argmax(-1)
        t = torch.where(torch.rand(BATCH, L, device="cuda", generator=g) < 0.5, am,
                        torch.randint(0, V, (BATCH, L), device="cuda", generator=g))
    return h, mask, w, b, t


def _official(h, mask, w, b, t):
    logits = F.linear(h, w.to(h.dtype), b.to(h.dtype))  # (B, L, V): the head on every token
    sel = logits[mask].float()
    tm = t[mask]
    loss = F.cross_entropy(sel, tm, reduction="sum") / max(1, tm.numel())
    acc = (sel.detach().argmax(-1) == tm).float().sum() / max(1, tm.numel())
    return loss, acc


def _call(provider):
    from bevt.ops import masked_ce, masked_ce_ref

    if provider == "ref":
        return masked_ce_ref
    if provider == "official":
        return _official
    if provider == "triton_bound":
        return functools.partial(masked_ce, backend="triton", max_masked=BATCH * _bevt_bound_per_clip())
    return functools.partial(masked_ce, backend="triton")


@functools.lru_cache(maxsize=1)
def _reference():
    """fp32 reference (the head in fp32, TF32 off): loss, acc, grads of hidden, weight, bias."""
    from bevt.ops import masked_ce_ref

    h, mask, w, b, t = _inputs()
    hf = h.detach().float().requires_grad_()
    wf, bf = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        loss, acc = masked_ce_ref(hf, mask, wf, bf, t)
        loss.backward()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    return loss.detach(), acc, hf.grad, wf.grad, bf.grad


def _rel(a, r):
    a, r = a.double(), r.double()
    return ((a - r).norm() / r.norm().clamp_min(1e-30)).item()


def _run_with_grads(fn):
    h, mask, w, b, t = _inputs()
    h.grad = w.grad = b.grad = None
    loss, acc = fn(h, mask, w, b, t)
    loss.backward()
    out = (loss.detach(), acc, h.grad, w.grad, b.grad)
    h.grad = w.grad = b.grad = None
    return out


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_masked_ce(provider, mode, record):
    h, mask, w, b, t = _inputs()
    fn = _call(provider)
    # 1. correctness before timing: errors vs the fp32 reference within 3x the bf16 reference path's own
    ref = _reference()
    low = _run_with_grads(_call("ref"))
    got = _run_with_grads(fn)
    errs = {}
    for name, x, lo, r in zip(("loss", "acc", "dh", "dw", "db"), got, low, ref):
        errs[name] = _rel(x, r)
        tol = max(3 * _rel(lo, r), 1e-2) if name != "acc" else _rel(lo, r) + 3.0 / mask.sum().item()
        assert errs[name] <= tol, f"{provider}: {name} error {errs[name]:.3g} > {tol:.3g}"
    assert torch.isfinite(got[2]).all() and torch.isfinite(got[3]).all()

    # 2. timing and memory
    def step():
        h.grad = w.grad = b.grad = None
        if mode == "fwd":
            with torch.no_grad():
                fn(h, mask, w, b, t)
        else:
            loss, _ = fn(h, mask, w, b, t)
            loss.backward()

    event_ms = cuda_time_ms(step, warmup=10, rep=50)
    h.grad = w.grad = b.grad = None  # the baseline holds no gradients: the peak then includes the new ones
    mib = peak_extra_mib(step)
    h.grad = w.grad = b.grad = None
    graph_ms = graph_time_ms(step) if provider.startswith("triton") else None
    h.grad = w.grad = b.grad = None
    ms = graph_ms if graph_ms is not None else event_ms
    grads_mib = (h.numel() * h.element_size() + w.numel() * 4 + b.numel() * 4) / 2 ** 20 if mode == "fwd_bwd" else 0.0
    rows, D, V = CE_SHAPE["rows"], CE_SHAPE["hidden"], CE_SHAPE["vocab"]
    n_gemm = 3 if mode == "fwd_bwd" else 1
    flop = 2 * rows * D * V * n_gemm
    record(op="masked_ce", provider=provider, mode=mode,
           shape=dict(batch=BATCH, tokens=h.shape[1], masked=int(mask.sum()), hidden=D, vocab=V, dtype="bf16"),
           ms=ms, event_ms=event_ms, graph_ms=graph_ms, tflops=flop / ms / 1e9,
           floor_ms=flop / (MATMUL_TFLOPS * 1e12) * 1e3, peak_mib=mib, work_mib=mib - grads_mib, errors=errs)
