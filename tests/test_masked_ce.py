"""Masked-token cross-entropy: the reference's semantics, and the Triton backend against a float64 reference.

The Triton kernels run on a GPU when one is visible, else in Triton's CPU interpreter on small shapes. The
interpreter needs TRITON_INTERPRET=1 before triton is first imported: this module sets it for that import
only (so that the rest of the suite keeps choosing the reference on CPU); if triton was already imported in
compiled mode, one test reruns this file in a fresh process with the variable set.
An extended seeded sweep runs with BEVT_EXTENDED_TESTS=1.
"""
from __future__ import annotations

import functools
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from bevt.ops import BackendUnavailable, masked_ce, masked_ce_ref
from bevt.ops.masked_ce import CAPABILITIES

from conftest import import_triton_kernels  # tests/conftest.py (pytest puts tests/ on sys.path)

CUDA = torch.cuda.is_available()
EXTENDED = os.environ.get("BEVT_EXTENDED_TESTS", "0") == "1"
KERN = import_triton_kernels("masked_ce")
TRITON_HERE = KERN is not None and (CUDA or KERN.interpreter_ready())
DEV = "cuda" if CUDA else "cpu"
needs_triton = pytest.mark.skipif(not TRITON_HERE, reason="Triton kernels cannot run in this process "
                                  "(see test_triton_in_fresh_interpreter_process)")
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")

TOL = CAPABILITIES["triton"].extra["tolerances"]
FLOOR = TOL["floor"]


# ----------------------------------------------------------------------------- helpers
def make(B, L, D, V, p=0.3, dtype=torch.float32, bias=True, seed=0, device=DEV, two_d=False):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, L, D, generator=g).to(dtype)
    w = torch.randn(V, D, generator=g) * (1.5 / D ** 0.5)
    b = torch.randn(V, generator=g) * 0.1 if bias else None
    mask = torch.rand(B, L, generator=g) < p
    am = (h.float() @ w.t()).argmax(-1)  # half the targets are the argmax: accuracy is not trivially 0
    t = torch.where(torch.rand(B, L, generator=g) < 0.5, am, torch.randint(0, V, (B, L), generator=g))
    out = [h, mask, w, b, t]
    if two_d:
        out = [h[0], mask[0], w, b, t[0]]
    return [None if x is None else x.to(device) for x in out]


def run(fn, h, mask, w, b, t, g=1.0):
    """(loss, acc, grad h, grad w, grad b) of fn with upstream gradient g."""
    leaves = [x.detach().clone().requires_grad_() if x is not None else None for x in (h, w, b)]
    loss, acc = fn(leaves[0], mask, leaves[1], leaves[2], t)
    (loss * g).backward()
    return loss.detach(), acc, leaves[0].grad, leaves[1].grad, None if b is None else leaves[2].grad


def rel(a, r):
    a, r = a.double().cpu(), r.double().cpu()
    return ((a - r).norm() / r.norm().clamp_min(1e-30)).item()


def check_against_reference(h, mask, w, b, t, g=1.0, tri=None):
    """Kernel error vs float64 <= 2x (loss) / 3x (grads) the reference path's own error in h's dtype."""
    tri = tri or (lambda *a: KERN.masked_ce(*a))
    got = run(tri, h, mask, w, b, t, g)
    low = run(masked_ce_ref, h, mask, w, b, t, g)
    ref = run(masked_ce_ref, h.double(), mask, w.double(), None if b is None else b.double(), t, g)
    M = int(mask.sum())
    for name, x, lo, r in zip(("loss", "acc", "dh", "dw", "db"), got, low, ref):
        if r is None:
            assert x is None
            continue
        assert torch.isfinite(x).all(), f"{name} has non-finite values"
        e, el = rel(x, r), rel(lo, r)
        print(f"{name}: err {e:.3g} (reference in {h.dtype}: {el:.3g})")
        if name == "acc":  # argmax ties after rounding the logits may flip a row or two
            assert abs(x.item() - r.item()) <= abs(lo.item() - r.item()) + 2.0 / max(M, 1)
            continue
        ratio = TOL["loss_ratio"] if name == "loss" else TOL["grad_ratio"]
        assert e <= max(ratio * el, FLOOR[h.dtype]), f"{name}: {e:.3g} vs {el:.3g}"
    assert got[2].dtype == h.dtype and got[3].dtype == w.dtype
    return got


# ----------------------------------------------------------------------------- reference semantics
def test_ref_matches_manual_gather_and_cross_entropy():
    h, mask, w, b, t = make(2, 30, 16, 40, dtype=torch.float64, device="cpu")
    loss, acc = masked_ce_ref(h, mask, w.double(), b.double(), t)
    logits = (h[mask] @ w.double().t() + b.double()).float()  # the loss is taken in fp32 (module rules)
    assert torch.allclose(loss, F.cross_entropy(logits, t[mask]))
    assert torch.allclose(acc, (logits.argmax(-1) == t[mask]).float().mean())
    assert acc.requires_grad is False


def test_ref_empty_mask_gives_zero_loss_and_zero_grads():
    h, mask, w, b, t = make(2, 10, 8, 20, device="cpu")
    loss, acc, gh, gw, gb = run(masked_ce_ref, h, torch.zeros_like(mask), w, b, t)
    assert loss.item() == 0.0 and acc.item() == 0.0
    for gr in (gh, gw, gb):
        assert gr is not None and torch.isfinite(gr).all() and gr.abs().max().item() == 0.0


def test_ref_all_masked_is_plain_cross_entropy():
    h, mask, w, b, t = make(3, 7, 8, 20, device="cpu", dtype=torch.float64)
    loss, _ = masked_ce_ref(h, torch.ones_like(mask), w.double(), None, t)
    assert torch.allclose(loss, F.cross_entropy((h.reshape(-1, 8) @ w.double().t()).float(), t.reshape(-1)))


def test_ref_two_dim_hidden():
    h, mask, w, b, t = make(1, 25, 8, 30, device="cpu", two_d=True)
    loss, acc = masked_ce(h, mask, w, b, t, backend="ref")
    assert loss.dim() == 0 and torch.isfinite(loss)


@pytest.mark.parametrize("bad,msg", [
    (lambda h, m, w, b, t: (h[None], m, w, b, t), "hidden must be"),
    (lambda h, m, w, b, t: (h, m[:, :-1], w, b, t), "mask shape"),
    (lambda h, m, w, b, t: (h, m, w, b, t[:, :-1]), "target shape"),
    (lambda h, m, w, b, t: (h, m.int(), w, b, t), "mask must be bool"),
    (lambda h, m, w, b, t: (h, m, w, b, t.float()), "target must be an integer"),
    (lambda h, m, w, b, t: (h, m, w[:, :-1], b, t), "weight must be"),
    (lambda h, m, w, b, t: (h, m, w, b[:-1], t), "bias must be"),
])
def test_clear_errors(bad, msg):
    args = bad(*make(2, 10, 8, 20, device="cpu"))
    with pytest.raises(ValueError, match=msg):
        masked_ce(*args, backend="ref")


def test_explicit_triton_without_device_raises_with_reason(monkeypatch):
    if CUDA:
        pytest.skip("a GPU is visible")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    h, mask, w, b, t = make(2, 10, 8, 20, device="cpu")
    with pytest.raises(BackendUnavailable, match="triton"):
        masked_ce(h, mask, w, b, t, backend="triton")
    loss, _ = masked_ce(h, mask, w, b, t)  # auto falls back to the reference on CPU
    assert torch.isfinite(loss)


# ----------------------------------------------------------------------------- triton backend
CASES = [  # B, L, D, V, p, dtype, bias, chunk_rows, g
    (2, 37, 32, 100, 0.3, torch.float32, True, 0, 1.0),      # multi-block softmax rows (V > block)
    (2, 37, 32, 100, 0.3, torch.bfloat16, True, 16, 2.5),    # several chunks, upstream gradient != 1
    (3, 29, 48, 77, 0.4, torch.float16, False, 16, 64.0),    # odd V, no bias, fp16 (1/M applied in backward)
    (1, 50, 24, 40, 0.5, torch.bfloat16, True, 0, 1.0),      # V fits one block; D not a multiple of the tile
]
if CUDA:  # real sizes of the head on the GPU
    CASES += [(4, 500, 1024, 8192, 0.25, torch.bfloat16, True, 0, 1.0),
              (3, 333, 96, 1000, 0.3, torch.bfloat16, True, 256, 3.0),
              (2, 300, 384, 512, 0.5, torch.float16, False, 0, 1024.0),
              (2, 200, 32, 8191, 0.5, torch.float32, True, 0, 1.0)]


@needs_triton
@pytest.mark.parametrize("B,L,D,V,p,dtype,bias,chunk,g", CASES)
def test_triton_matches_reference(B, L, D, V, p, dtype, bias, chunk, g):
    h, mask, w, b, t = make(B, L, D, V, p, dtype, bias)
    check_against_reference(h, mask, w, b, t, g, tri=lambda *a: KERN.masked_ce(*a, chunk_rows=chunk))


@needs_triton
def test_triton_empty_mask_is_zero_without_nan():
    h, mask, w, b, t = make(2, 20, 16, 30, dtype=torch.bfloat16)
    loss, acc, gh, gw, gb = run(KERN.masked_ce, h, torch.zeros_like(mask), w, b, t, g=3.0)
    assert loss.item() == 0.0 and acc.item() == 0.0
    for gr in (gh, gw, gb):
        assert torch.isfinite(gr).all() and gr.abs().max().item() == 0.0


@needs_triton
@pytest.mark.parametrize("slack", [0, 5, 1000])
def test_triton_row_bound_matches_reference(slack):
    """A max_rows bound (exact, loose, or above every token) launches chunks for that many rows only and
    gives the same results; chunk_rows=16 makes the bound decide the chunk count (4 instead of 5 at slack 0)."""
    h, mask, w, b, t = make(2, 37, 32, 100, p=0.8, dtype=torch.bfloat16, seed=7)
    bound = int(mask.sum()) + slack
    check_against_reference(h, mask, w, b, t, g=2.0, tri=lambda *a: KERN.masked_ce(*a, chunk_rows=16,
                                                                                   max_rows=bound))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_more_masked_than_the_bound_gives_nan(dtype):
    h, mask, w, b, t = make(2, 37, 32, 100, p=0.5, dtype=dtype, seed=8)
    loss, acc, gh, gw, gb = run(lambda *a: KERN.masked_ce(*a, chunk_rows=16, max_rows=int(mask.sum()) - 1),
                                h, mask, w, b, t)
    assert torch.isnan(loss) and torch.isnan(acc)
    assert torch.isnan(gh[mask]).all()  # the hidden gradient of the masked rows carries the NaN


@needs_triton
def test_triton_zero_bound_with_an_empty_mask():
    h, mask, w, b, t = make(2, 20, 16, 30, dtype=torch.bfloat16)
    loss, acc, gh, gw, gb = run(lambda *a: KERN.masked_ce(*a, max_rows=0), h, torch.zeros_like(mask), w, b, t)
    assert loss.item() == 0.0 and acc.item() == 0.0
    for gr in (gh, gw, gb):  # chunk 0 still runs: the weight gradient is stored, not left unwritten
        assert torch.isfinite(gr).all() and gr.abs().max().item() == 0.0


def test_max_masked_argument():
    h, mask, w, b, t = make(2, 10, 8, 20, device="cpu")
    count = int(mask.sum())
    loss, _ = masked_ce(h, mask, w, b, t, max_masked=count, backend="ref")
    assert torch.allclose(loss, masked_ce_ref(h, mask, w, b, t)[0])
    with pytest.raises(ValueError, match=f"{count} tokens are masked, more than max_masked={count - 1}"):
        masked_ce(h, mask, w, b, t, max_masked=count - 1, backend="ref")
    for bad in (-1, 2.0, True, "3"):
        with pytest.raises(ValueError, match="max_masked must be a non-negative int"):
            masked_ce(h, mask, w, b, t, max_masked=bad, backend="ref")


@needs_triton
def test_triton_all_masked_and_two_dim_hidden():
    h, mask, w, b, t = make(2, 20, 16, 30)
    check_against_reference(h, torch.ones_like(mask), w, b, t)
    h, mask, w, b, t = make(1, 33, 16, 30, two_d=True)
    check_against_reference(h, mask, w, b, t, tri=lambda *a: KERN.masked_ce(*a, chunk_rows=16))


@needs_triton
@pytest.mark.parametrize("cfg", [dict(use_tma=True), dict(use_tma=False), dict(use_tma=True, grad_tma=True),
                                 dict(split_grad=True), dict(epi=0), dict(epi=1),
                                 dict(hbm=32, hbn=16), dict(hbn=16, grad_tma=True, use_tma=True),
                                 dict(ce_rows=2, ce_cols=128), dict(ce_rows=1, ce_cols=16)])
def test_triton_variants(cfg):
    h, mask, w, b, t = make(2, 37, 32, 100, dtype=torch.bfloat16, seed=5)
    with KERN.config_override(**cfg):
        check_against_reference(h, mask, w, b, t, g=1.5, tri=lambda *a: KERN.masked_ce(*a, chunk_rows=16))


@needs_triton
@pytest.mark.parametrize("ce_cols", [16, 128])
def test_triton_accuracy_takes_the_first_of_tied_maxima(ce_cols):
    """Codebook entries 10, 12 and 70 give every masked row the same top logit (70 in another column step of
    the streaming pass when ce_cols is 16): only a target of 10 counts as a hit, as with torch.argmax."""
    h, mask, w, b, t = make(2, 24, 16, 100, p=1.0, seed=7)
    h, w = h * 0.1, w * 0.1
    h[..., 0], w[:, 0] = 3.0, 0.0
    for v in (10, 12, 70):  # the same logit, 6, far above the rest
        w[v] = 0.0
        w[v, 0], b[v] = 2.0, 0.0
    t[0, :] = 10
    t[1, :] = torch.tensor([12, 70] * 12)
    with KERN.config_override(ce_rows=2, ce_cols=ce_cols):
        loss, acc = KERN.masked_ce(h, mask, w, b, t)
    logits = h.float() @ w.t() + b
    am = logits.argmax(-1)
    assert bool((logits.gather(-1, am[..., None]).squeeze(-1) == logits[..., 10]).all()), "setup: 10 is a top logit"
    ref_loss, ref_acc = masked_ce_ref(h, mask, w, b, t)
    assert acc.item() == pytest.approx(ref_acc.item()) and abs(loss.item() - ref_loss.item()) < 1e-4


@needs_triton
def test_triton_only_some_grads_and_no_grad():
    h, mask, w, b, t = make(2, 25, 16, 30, seed=3)
    ref_loss, _ = masked_ce_ref(h, mask, w, b, t)
    with torch.no_grad():
        loss, acc = KERN.masked_ce(h, mask, w.requires_grad_(), b, t)
    assert loss.grad_fn is None and abs(loss.item() - ref_loss.item()) < 1e-5
    w = w.detach().requires_grad_()
    loss, _ = KERN.masked_ce(h, mask, w, b, t)  # only the weight wants a gradient
    loss.backward()
    wr = w.detach().clone().requires_grad_()
    masked_ce_ref(h, mask, wr, b, t)[0].backward()
    assert rel(w.grad, wr.grad) < 1e-5


@needs_triton
def test_triton_second_backward_is_refused():
    h, mask, w, b, t = make(2, 20, 16, 30)
    w.requires_grad_()
    loss, _ = KERN.masked_ce(h, mask, w, b, t)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError):
        loss.backward()


@needs_triton
def test_triton_under_torch_compile_without_graph_breaks():
    h, mask, w, b, t = make(2, 20, 16, 30, dtype=torch.bfloat16, seed=7)
    kern = KERN
    fn = torch.compile(lambda *a: kern.masked_ce(*a), backend="aot_eager", fullgraph=True)
    got = run(fn, h, mask, w, b, t, g=2.0)
    eager = run(kern.masked_ce, h, mask, w, b, t, g=2.0)
    for x, y in zip(got, eager):
        assert torch.allclose(x.float(), y.float(), rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("backend", ["ref", pytest.param("triton", marks=needs_triton)])
def test_fp32_hidden_under_autocast_runs_the_head_in_the_autocast_dtype(backend, monkeypatch):
    """As F.linear under autocast: an fp32 hidden (a LayerNorm's output under autocast) is cast to the
    autocast dtype, so the Triton GEMMs never fall back to fp32 inside a bf16 training step."""
    from bevt.ops import backend as be

    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # the public op runs Triton on CPU only in the interpreter
    be.triton_status.cache_clear()
    h, mask, w, b, t = make(2, 40, 32, 100, seed=11)
    fn = functools.partial(masked_ce, backend=backend)
    try:
        with torch.autocast(DEV, dtype=torch.bfloat16):
            got = run(fn, h, mask, w, b, t)
        want = run(fn, h.bfloat16(), mask, w, b, t)
    finally:
        be.triton_status.cache_clear()  # the status was read with the variable set
    assert got[2].dtype == torch.float32  # the gradient flows back to the fp32 leaf through the cast
    for x, y in zip(got, want):
        assert torch.allclose(x.float(), y.float(), rtol=1e-3, atol=1e-6), backend


@needs_triton
def test_dispatch(monkeypatch):
    """Explicit backend="triton" runs the kernels (interpreter on CPU); auto picks them on CUDA only."""
    from bevt.ops import backend as be

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    be.triton_status.cache_clear()  # the status is cached per process; it depends on the variable
    try:
        h, mask, w, b, t = make(2, 20, 16, 30)
        w.requires_grad_()
        ref = masked_ce_ref(h, mask, w, b, t)[0].item()
        loss, _ = masked_ce(h, mask, w, b, t, backend="triton")
        assert abs(loss.item() - ref) < 1e-5 and "masked_ce" in type(loss.grad_fn).__name__
        loss, _ = masked_ce(h, mask, w, b, t)
        assert abs(loss.item() - ref) < 1e-5
        assert ("masked_ce" in type(loss.grad_fn).__name__) == CUDA
    finally:
        be.triton_status.cache_clear()


@needs_cuda
def test_step_shape_on_gpu():
    """BEVT-B step shape: 8 x 3136 tokens, 784 masked per clip, D=1024, V=8192, bf16."""
    h, _, w, b, t = make(8, 3136, 1024, 8192, dtype=torch.bfloat16, p=0.0)
    r = torch.rand(8, 3136, device="cuda")
    mask = r <= r.sort(dim=1).values[:, 783:784]
    check_against_reference(h, mask, w, b, t)


@pytest.mark.skipif(not EXTENDED, reason="set BEVT_EXTENDED_TESTS=1 for the seeded sweep")
@needs_triton
@pytest.mark.parametrize("seed", range(24))
def test_triton_seeded_sweep(seed):
    g = torch.Generator().manual_seed(seed)
    pick = lambda xs: xs[int(torch.randint(len(xs), (1,), generator=g))]  # noqa: E731
    B, L = pick([1, 2, 3]), pick([7, 33, 64, 100])
    D, V = pick([16, 24, 32, 48, 96]), pick([17, 64, 100, 130, 257])
    if CUDA:
        L, V = L * 20, pick([512, 1000, 8191, 8192, 16384])
    dtype = pick([torch.float32, torch.bfloat16, torch.float16])
    p, chunk, g_out = pick([0.0, 0.1, 0.5, 1.0]), pick([0, 16, 32]), pick([1.0, 0.5, 8.0])
    h, mask, w, b, t = make(B, L, D, V, p, dtype, bias=bool(seed % 2), seed=seed)
    check_against_reference(h, mask, w, b, t, g_out, tri=lambda *a: KERN.masked_ce(*a, chunk_rows=chunk))


@pytest.mark.skipif(CUDA or TRITON_HERE or KERN is None and "triton" not in sys.modules,
                    reason="the Triton tests already ran in this process")
def test_triton_in_fresh_interpreter_process():
    """triton was imported in compiled mode before this module: run the Triton tests in a fresh process."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", __file__, "-k", "triton and not fresh"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def test_ref_counts_every_masked_target_and_refuses_integer_inputs():
    """F.cross_entropy's default ignore_index (-100) would drop such a target from the sum while the mean
    still counted it (the loss silently halved here); the reference raises like for any id outside [0, V).
    Integer hidden states would have cast the head to integers."""
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(1, 4, 8, generator=g), torch.randn(16, 8, generator=g)
    t, m = torch.randint(0, 16, (1, 4), generator=g), torch.ones(1, 4, dtype=torch.bool)
    t[0, 2:] = -100
    with pytest.raises(IndexError):
        masked_ce(h, m, w, None, t, backend="ref")
    with pytest.raises(ValueError, match="floating point"):
        masked_ce(h.round().long(), m, w, None, t.clamp(min=0), backend="ref")
