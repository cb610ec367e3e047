"""CUDA mask generators (bevt.ops.masking, backend="cuda") against the numpy reference.

The CUDA kernel draws from Philox and the reference from PCG64, so the two agree in distribution, not in
bits. The GPU tests compare them over >= 10k masks with two-sample chi-square tests (masked counts, blocks per
mask, the (h, w) of the first and second accepted block, horizontal/vertical edge counts) and per-cell and
per-slot two-proportion z tests (Bonferroni), plus goodness of fit of tube lengths and starts to the uniform
law and of the wrap rate to its exact value. Every test passes at p > ALPHA; the same battery rejects
deliberately wrong generators (floor instead of round, <= grid bounds, a narrower aspect range, tubes without
wrap, an exclusive length range, a non-random top-up) at p < POWER_P, which shows the thresholds have teeth.
All seeds are fixed, so the outcomes are deterministic.

Block statistics need the accepted blocks: the kernel reports them on request (a trace), and the reference
side re-runs the reference algorithm instrumented (``traced_block_mask``), which the CPU tests check
reproduces ``_block_mask_np`` mask for mask.

CPU tests (run in CI): the instrumented copy, the power of the statistical battery (reference against itself
and against the wrong variants, on fewer masks), argument checks. GPU tests skip without CUDA and the
built extension.
"""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from bevt.ops import backend as _be
from bevt.ops import masking as M
from bevt.ops.masking import BlockMaskSpec, TubeSpec

ALPHA = 1e-3  # a correct generator passes every test at p > ALPHA
POWER_P = 1e-6  # a wrong one fails at least one test at p < POWER_P
N_GPU = 10240  # masks per side in the GPU comparisons


# ----------------------------------------------------------------------------- statistics (no scipy)
def chi2_sf(stat: float, df: int) -> float:
    if df <= 0:
        return 1.0
    return float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64),
                                         torch.tensor(stat / 2.0, dtype=torch.float64)))


def z_p(z: float) -> float:
    """Two-sided p-value of a standard normal statistic."""
    return math.erfc(abs(z) / math.sqrt(2.0))


def _keys(x) -> list:
    x = np.asarray(x)
    return [tuple(r) for r in x.tolist()] if x.ndim == 2 else x.tolist()


def chi2_two_sample(a, b, min_expected: float = 5.0) -> float:
    """p-value that samples a and b (1-D values, or rows as categories) come from one categorical law.

    Categories are pooled in sorted order until each pooled bin expects >= min_expected in both samples."""
    a, b = _keys(a), _keys(b)
    keys = sorted(set(a) | set(b))
    idx = {k: i for i, k in enumerate(keys)}
    ca = np.bincount([idx[k] for k in a], minlength=len(keys)).astype(float)
    cb = np.bincount([idx[k] for k in b], minlength=len(keys)).astype(float)
    na, nb = ca.sum(), cb.sum()
    bins, acc = [], np.zeros(2)
    for i in range(len(keys)):
        acc += (ca[i], cb[i])
        if acc.sum() * min(na, nb) / (na + nb) >= min_expected:
            bins.append(acc)
            acc = np.zeros(2)
    if acc.sum() > 0:
        if bins:
            bins[-1] = bins[-1] + acc
        else:
            bins.append(acc)
    obs = np.array(bins)  # (k, 2)
    exp = obs.sum(1, keepdims=True) * np.array([na, nb]) / (na + nb)
    return chi2_sf(float(((obs - exp) ** 2 / exp).sum()), len(bins) - 1)


def chi2_goodness(values, support, probs) -> float:
    """p-value that values follow the law probs on support (no pooling: callers pass well-filled laws)."""
    values = np.asarray(values)
    obs = np.array([(values == s).sum() for s in support], dtype=float)
    if obs.sum() != len(values):
        return 0.0  # values outside the support: certainly another law
    exp = np.asarray(probs, dtype=float) * len(values)
    return chi2_sf(float(((obs - exp) ** 2 / exp).sum()), len(support) - 1)


def two_proportion_p(hits_a, n_a: int, hits_b, n_b: int) -> float:
    """Bonferroni-adjusted p of the most different of several proportions (each a two-sample z test)."""
    pa, pb = np.asarray(hits_a, float) / n_a, np.asarray(hits_b, float) / n_b
    pool = (np.asarray(hits_a, float) + hits_b) / (n_a + n_b)
    se = np.sqrt(pool * (1 - pool) * (1 / n_a + 1 / n_b))
    z = np.where(se > 0, np.abs(pa - pb) / np.where(se > 0, se, 1), 0.0)
    return min(1.0, z_p(float(z.max())) * z.size)


def proportion_vs_p(hits, n: int, p) -> float:
    """Bonferroni-adjusted p of the worst of several proportions against exact probabilities p."""
    p = np.broadcast_to(np.asarray(p, float), np.shape(hits))
    hits = np.asarray(hits, float)
    sure = (p == 0) | (p == 1)  # a certain outcome: any deviation is a rejection
    if (hits[sure] != n * p[sure]).any():
        return 0.0
    if sure.all():
        return 1.0
    z = np.abs(hits[~sure] / n - p[~sure]) / np.sqrt(p[~sure] * (1 - p[~sure]) / n)
    return min(1.0, z_p(float(z.max())) * z.size)


def means_p(x, y) -> float:
    """Two-sample z test of equal means (Welch; the samples here are thousands of i.i.d. masks)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    se = math.sqrt(x.var(ddof=1) / len(x) + y.var(ddof=1) / len(y))
    return z_p((x.mean() - y.mean()) / se) if se > 0 else float(x.mean() != y.mean())


# ----------------------------------------------------------------------------- instrumented reference
def traced_block_mask(spec: BlockMaskSpec, rng: np.random.Generator, variant: str = ""):
    """bevt.ops.masking._block_mask_np, recording the accepted blocks [(h, w, new), ...].

    ``variant`` makes a deliberately wrong generator for the power checks: "floor" (int() instead of round),
    "le_bounds" (h <= H and w <= W), "first_free" (exact top-up with the first free cells, not random ones).
    """
    H, W = spec.grid
    mask = np.zeros((H, W), dtype=bool)
    blocks = []
    count = 0
    lo_a, hi_a = spec.log_aspect
    rnd = (lambda x: int(x)) if variant == "floor" else (lambda x: int(round(x)))
    while count < spec.num_masking_patches:
        max_mask = min(spec.num_masking_patches - count, spec.max_patches)
        delta = 0
        for _ in range(10):
            area = spec.min_num_patches + (max_mask - spec.min_num_patches) * rng.random()
            aspect = math.exp(lo_a + (hi_a - lo_a) * rng.random())
            h = rnd(math.sqrt(area * aspect))
            w = rnd(math.sqrt(area / aspect))
            fits = (w <= W and h <= H) if variant == "le_bounds" else (w < W and h < H)
            if fits:
                top = int(rng.integers(0, H - h + 1))
                left = int(rng.integers(0, W - w + 1))
                window = mask[top:top + h, left:left + w]
                new = h * w - int(window.sum())
                if 0 < new <= max_mask:
                    window[...] = True
                    delta += new
                    blocks.append((h, w, new))
                if delta > 0:
                    break
        if delta == 0:
            break
        count += delta
    if spec.exact and count < spec.num_masking_patches:
        free = np.flatnonzero(~mask.reshape(-1))
        k = spec.num_masking_patches - count
        pick = free[:k] if variant == "first_free" else rng.choice(free, size=k, replace=False)
        mask.reshape(-1)[pick] = True
    return mask, blocks


def ref_block_sample(n: int, spec: BlockMaskSpec, seed: int, variant: str = ""):
    """n reference masks (n, H, W) and their block lists, keys (seed, 0, i, block stream)."""
    out = [traced_block_mask(spec, M._rng(seed, 0, i, M._STREAM_BLOCK), variant) for i in range(n)]
    return np.stack([m for m, _ in out]), [b for _, b in out]


def ref_tube_sample(n: int, spec: BlockMaskSpec, tube: TubeSpec, seed: int, variant: str = ""):
    """n reference tube input masks (n, S, H, W). Variants: "no_wrap" (the tube stops at the last slot),
    "len_exclusive" (length drawn from [min, max) instead of [min, max])."""
    if not variant:
        return tube_masks_np(n, spec, tube, seed)
    lmin, lmax = tube.length_range
    inp = np.zeros((n, tube.slots, *spec.grid), dtype=bool)
    for i in range(n):
        rng = M._rng(seed, 0, i, M._STREAM_TUBE)
        m2d = M._block_mask_np(spec, rng)
        start = int(rng.integers(0, tube.slots))
        length = int(rng.integers(lmin, lmax + (0 if variant == "len_exclusive" else 1)))
        slots = [start + t for t in range(length) if start + t < tube.slots] if variant == "no_wrap" else \
            [(start + t) % tube.slots for t in range(length)]
        inp[i, slots] = m2d
    return inp


def tube_masks_np(n, spec, tube, seed):
    return M.tube_masks_ref(n, spec, tube, seed=seed)[0].numpy()


# ----------------------------------------------------------------------------- the batteries
def _edges(masks):
    m = np.asarray(masks)
    return (m[:, :, 1:] & m[:, :, :-1]).sum((1, 2)), (m[:, 1:, :] & m[:, :-1, :]).sum((1, 2))


def _nth_block(blocks, k):
    return [b[k][:2] for b in blocks if len(b) > k]


def block_battery(masks_a, blocks_a, masks_b, blocks_b) -> dict[str, float]:
    """p-values of every block-mask comparison between samples a and b (masks (n, H, W) bool)."""
    ma, mb = np.asarray(masks_a), np.asarray(masks_b)
    ha, va = _edges(ma)
    hb, vb = _edges(mb)
    p = {
        "masked count": chi2_two_sample(ma.sum((1, 2)), mb.sum((1, 2))),
        "cell marginal": two_proportion_p(ma.sum(0).ravel(), len(ma), mb.sum(0).ravel(), len(mb)),
        "horizontal edges": means_p(ha, hb),
        "vertical edges": means_p(va, vb),
    }
    if blocks_a is not None and blocks_b is not None:
        p["blocks per mask"] = chi2_two_sample([len(b) for b in blocks_a], [len(b) for b in blocks_b])
        p["first block (h, w)"] = chi2_two_sample(_nth_block(blocks_a, 0), _nth_block(blocks_b, 0))
        p["second block (h, w)"] = chi2_two_sample(_nth_block(blocks_a, 1), _nth_block(blocks_b, 1))
        p["first block new cells"] = chi2_two_sample([b[0][2] for b in blocks_a if b], [b[0][2] for b in blocks_b if b])
    return p


def tube_geometry(inp):
    """(length, start, wraps) per clip from input masks (n, S, H, W); start/wrap -1 for full-length tubes."""
    act = np.asarray(inp).any((2, 3))  # (n, S)
    n, S = act.shape
    length = act.sum(1)
    first = act & ~np.roll(act, 1, axis=1)  # active slots whose predecessor (cyclically) is not
    starts = np.where(first.sum(1) == 1, first.argmax(1), -1)
    wraps = np.where(starts >= 0, (starts + length > S).astype(int), -1)
    return length, starts, wraps, first.sum(1)


def tube_battery(inp_a, inp_b, tube: TubeSpec) -> dict[str, float]:
    """p-values of the tube comparisons: a against the exact laws and against sample b."""
    S = tube.slots
    lmin, lmax = tube.length_range
    lens = np.arange(lmin, lmax + 1)
    # a clip whose 2D mask is empty (all 10 first attempts failed: rare on small grids) shows no tube
    inp_a, inp_b = (x[x.any((1, 2, 3))] for x in (np.asarray(inp_a), np.asarray(inp_b)))
    la, sa, wa, runs_a = tube_geometry(inp_a)
    lb, _, _, _ = tube_geometry(inp_b)
    assert (runs_a[la < S] == 1).all(), "a tube must be one cyclic run of slots"
    part = la < S
    # exact laws: length uniform on [lmin, lmax]; start uniform; P(wrap | len < S) = mean_l (l - 1) / S
    p_wrap = np.mean([(l - 1) / S for l in lens if l < S]) if (lens < S).any() else 0.0
    p = {
        "length uniform": chi2_goodness(la, lens, np.full(len(lens), 1 / len(lens))),
        "length vs ref": chi2_two_sample(la, lb),
        "slot marginal": proportion_vs_p(np.asarray(inp_a).any((2, 3)).sum(0), len(la), lens.mean() / S),
    }
    if part.sum() > 0 and S > 1:
        p["start uniform"] = chi2_goodness(sa[part], np.arange(S), np.full(S, 1 / S))
        p["wrap rate"] = proportion_vs_p([wa[part].sum()], int(part.sum()), p_wrap) if 0 < p_wrap < 1 else \
            float(wa[part].sum() == p_wrap * part.sum())
    return p


def _report(name, p):
    print(f"\n{name}: " + ", ".join(f"{k} p={v:.3g}" for k, v in p.items()))


def assert_same_law(name, p):
    _report(name, p)
    bad = {k: v for k, v in p.items() if not v > ALPHA}
    assert not bad, f"{name}: rejected at ALPHA={ALPHA}: {bad}"


def assert_rejected(name, p):
    _report(name, p)
    assert min(p.values()) < POWER_P, f"{name}: a wrong generator was not rejected (min p {min(p.values()):.3g})"


# ============================================================================= CPU tests (CI)
@pytest.mark.parametrize("spec", [BlockMaskSpec(), BlockMaskSpec(exact=True), BlockMaskSpec.for_grid((6, 6)),
                                  BlockMaskSpec(grid=(7, 13), num_masking_patches=40, min_num_patches=4,
                                                max_num_patches=20, min_aspect=0.5, max_aspect=3.0, exact=True)],
                         ids=["default", "exact", "6x6", "7x13"])
def test_traced_reference_is_the_reference(spec):
    for i in range(150):
        got, blocks = traced_block_mask(spec, M._rng(3, 1, i, 0))
        want = M._block_mask_np(spec, M._rng(3, 1, i, 0))
        assert np.array_equal(got, want), f"sample {i}"
        assert sum(b[2] for b in blocks) == got.sum() or spec.exact
        assert all(1 <= b[2] <= b[0] * b[1] for b in blocks)


def test_battery_power_on_cpu():
    """The battery accepts the reference against itself and rejects each wrong variant (3000 masks a side)."""
    n, spec = 3000, BlockMaskSpec()
    ma, ba = ref_block_sample(n, spec, seed=101)
    mb, bb = ref_block_sample(n, spec, seed=202)
    assert_same_law("ref vs ref", block_battery(ma, ba, mb, bb))
    for variant in ("floor", "le_bounds"):
        mw, bw = ref_block_sample(n, spec, seed=303, variant=variant)
        assert_rejected(f"ref vs {variant}", block_battery(ma, ba, mw, bw))
    narrow = BlockMaskSpec(min_aspect=0.5)
    mw, bw = ref_block_sample(n, narrow, seed=303)
    assert_rejected("ref vs aspect 0.5..2", block_battery(ma, ba, mw, bw))


def test_tube_battery_power_on_cpu():
    n, spec, tube = 3000, BlockMaskSpec(), TubeSpec()
    a = ref_tube_sample(n, spec, tube, seed=11)
    b = ref_tube_sample(n, spec, tube, seed=12)
    assert_same_law("tube ref vs ref", tube_battery(a, b, tube))
    for variant in ("no_wrap", "len_exclusive"):
        assert_rejected(f"tube {variant} vs ref", tube_battery(ref_tube_sample(n, spec, tube, 13, variant), b, tube))


def test_cuda_backend_reasons_without_gpu():
    assert not M.can_run_cuda("cpu", BlockMaskSpec())
    with pytest.raises(_be.BackendUnavailable, match="CUDA device"):
        M.block_masks(2, device="cpu", backend="cuda")
    with pytest.raises(_be.BackendUnavailable, match="grid sides must be <= 32"):
        M.can_run_cuda("cuda", BlockMaskSpec(grid=(33, 8), num_masking_patches=10), raise_error=True)
    with pytest.raises(_be.BackendUnavailable, match="at most 64 temporal slots"):
        M.can_run_cuda("cuda", BlockMaskSpec(), TubeSpec(slots=65), raise_error=True)


@pytest.mark.parametrize("kwargs, match", [
    (dict(seed=-1), "seed must be in"), (dict(seed=2 ** 64), "seed must be in"), (dict(step=2 ** 32), "step must be in"),
    (dict(index_offset=2 ** 32 - 1), "below 2\\^32"), (dict(seed=1.5), "seed must be an int"),
    (dict(device="cpu"), "CUDA device"),
])
def test_cuda_wrapper_rejects_bad_keys(kwargs, match):
    from bevt.ops import _masking_cuda

    args = dict(seed=0, step=0, index_offset=0, device="cuda") | kwargs
    with pytest.raises((ValueError, TypeError), match=match):
        _masking_cuda.block_masks(4, BlockMaskSpec(), **args)


def test_cuda_wrapper_rejects_bad_specs():
    from bevt.ops import _masking_cuda

    key = dict(seed=0, step=0, index_offset=0, device="cuda")
    with pytest.raises(ValueError, match="grid sides up to 32"):
        _masking_cuda.block_masks(1, BlockMaskSpec(grid=(40, 4), num_masking_patches=8), **key)
    with pytest.raises(ValueError, match="max_num_patches must be >= 1"):
        _masking_cuda.block_masks(1, BlockMaskSpec(max_num_patches=0), **key)
    with pytest.raises(ValueError, match="no tube length"):
        _masking_cuda.tube_masks(1, BlockMaskSpec(), TubeSpec(slots=4, tube_range=(0.0, 0.1)), **key)
    with pytest.raises(ValueError, match="at most 64 temporal slots"):
        _masking_cuda.tube_masks(1, BlockMaskSpec(), TubeSpec(slots=65), **key)


@pytest.mark.skipif(torch.version.cuda is not None, reason="this checks the JIT build's refusal on a CPU torch")
def test_jit_build_says_why_it_cannot_run_on_cpu_torch():
    from bevt import _jit_extension

    assert os.path.isfile(os.path.join(_jit_extension.csrc_dir(), "masking.cu"))
    with pytest.raises(RuntimeError, match="CPU build"):
        _jit_extension.load()


# ============================================================================= GPU tests
def _cuda_ready() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "no CUDA GPU visible"
    ok, why = _be.cuda_extension_status()
    return ok, why


_ok, _why = _cuda_ready()
gpu = pytest.mark.skipif(not _ok, reason=f"CUDA masks need a GPU and the built extension: {_why}")


def _cuda():
    from bevt.ops import _masking_cuda

    return _masking_cuda


def cuda_block_sample(n, spec, seed=0, step=0):
    m, tr = _cuda().block_masks(n, spec, seed=seed, step=step, index_offset=0, device="cuda", return_trace=True)
    tr = tr.cpu().numpy()
    return m.cpu().numpy(), [[tuple(r) for r in t if r[0] > 0] for t in tr]


@gpu
def test_block_masks_match_reference():
    spec = BlockMaskSpec()
    mc, bc = cuda_block_sample(N_GPU, spec, seed=7)
    mr, br = ref_block_sample(N_GPU, spec, seed=7)
    assert all(sum(b[2] for b in bl) == m.sum() for m, bl in zip(mc[:500], bc[:500])), "trace and mask disagree"
    assert_same_law("cuda vs ref, 14x14", block_battery(mc, bc, mr, br))


@gpu
@pytest.mark.parametrize("variant", ["floor", "le_bounds", "aspect 0.5..2"])
def test_block_battery_rejects_wrong_generators(variant):
    spec = BlockMaskSpec()
    mc, bc = cuda_block_sample(N_GPU, spec, seed=8)
    if variant == "aspect 0.5..2":
        mw, bw = ref_block_sample(N_GPU, BlockMaskSpec(min_aspect=0.5), seed=8)
    else:
        mw, bw = ref_block_sample(N_GPU, spec, seed=8, variant=variant)
    assert_rejected(f"cuda vs {variant}", block_battery(mc, bc, mw, bw))


@gpu
@pytest.mark.parametrize("spec", [
    BlockMaskSpec.for_grid((6, 6)),
    BlockMaskSpec(grid=(7, 13), num_masking_patches=40, min_num_patches=4, max_num_patches=20, min_aspect=0.5,
                  max_aspect=3.0),
    BlockMaskSpec.for_grid((32, 32), ratio=0.4),
    BlockMaskSpec(grid=(2, 2), num_masking_patches=2, min_num_patches=1),
], ids=["6x6", "7x13", "32x32", "2x2"])
def test_other_grids_match_reference(spec):
    n = 4096
    mc, bc = cuda_block_sample(n, spec, seed=9)
    mr, br = ref_block_sample(n, spec, seed=9)
    assert_same_law(f"cuda vs ref, {spec.grid}", block_battery(mc, bc, mr, br))


@gpu
def test_exact_count_and_top_up():
    spec, exact = BlockMaskSpec(), BlockMaskSpec(exact=True)
    me = _cuda().block_masks(N_GPU, exact, seed=5, step=0, index_offset=0, device="cuda").cpu().numpy()
    mn = _cuda().block_masks(N_GPU, spec, seed=5, step=0, index_offset=0, device="cuda").cpu().numpy()
    assert (me.sum((1, 2)) == 98).all()
    assert (me | mn == me).all(), "the exact mask must extend the plain mask of the same key"
    mr_e, _ = ref_block_sample(N_GPU, exact, seed=5)
    mr_n, _ = ref_block_sample(N_GPU, spec, seed=5)
    top_c, top_r = me & ~mn, mr_e & ~mr_n  # the topped-up cells
    assert_same_law("exact: cuda vs ref", block_battery(me, None, mr_e, None)
                    | {"top-up cell marginal": two_proportion_p(top_c.sum(0).ravel(), N_GPU, top_r.sum(0).ravel(), N_GPU),
                       "top-up count": chi2_two_sample(top_c.sum((1, 2)), top_r.sum((1, 2)))})
    mw, _ = ref_block_sample(N_GPU, exact, seed=5, variant="first_free")
    top_w = mw & ~mr_n
    assert_rejected("exact: cuda vs first-free top-up",
                    {"top-up cell marginal": two_proportion_p(top_c.sum(0).ravel(), N_GPU, top_w.sum(0).ravel(), N_GPU)})


@gpu
def test_tube_masks_match_reference():
    spec, tube = BlockMaskSpec(), TubeSpec()
    inp, tgt, trace = _cuda().tube_masks(N_GPU, spec, tube, seed=3, step=2, index_offset=0, device="cuda",
                                         return_trace=True)
    assert torch.equal(tgt, inp.repeat_interleave(tube.temporal_scale, dim=1))
    ic = inp.cpu().numpy()
    ir = ref_tube_sample(N_GPU, spec, tube, seed=3)
    lc = tube_geometry(ic)[0]
    assert (lc >= 4).all() and (lc <= 8).all()
    planes_c, planes_r = ic.any(1), ir.any(1)  # the 2D mask of each clip
    assert_same_law("tube: cuda vs exact laws and ref", tube_battery(ic, ir, tube))
    blocks_c = [[tuple(r) for r in t if r[0] > 0] for t in trace.cpu().numpy()]
    _, blocks_r = ref_block_sample(4096, spec, seed=3)  # the tube's 2D mask is the block generator's
    assert_same_law("tube 2D masks: cuda vs ref", block_battery(planes_c, blocks_c, planes_r, None)
                    | {"blocks per mask": chi2_two_sample([len(b) for b in blocks_c], [len(b) for b in blocks_r]),
                       "first block (h, w)": chi2_two_sample(_nth_block(blocks_c, 0), _nth_block(blocks_r, 0))})
    for variant in ("no_wrap", "len_exclusive"):
        assert_rejected(f"tube: {variant} vs cuda", tube_battery(ref_tube_sample(N_GPU, spec, tube, 4, variant), ic, tube))


@gpu
@pytest.mark.parametrize("slots, rng, scale", [(1, (0.5, 1.0), 2), (4, (0.25, 0.75), 3), (64, (0.1, 0.9), 1),
                                              (5, (0.4, 0.4), 2)])
def test_tube_shapes(slots, rng, scale):
    spec, tube = BlockMaskSpec.for_grid((6, 6)), TubeSpec(slots=slots, tube_range=rng, temporal_scale=scale)
    n = 4096
    inp, tgt = _cuda().tube_masks(n, spec, tube, seed=1, step=0, index_offset=0, device="cuda")
    assert inp.shape == (n, slots, 6, 6) and tgt.shape == (n, slots * scale, 6, 6)
    assert inp.dtype == tgt.dtype == torch.bool
    assert torch.equal(tgt, inp.repeat_interleave(scale, dim=1))
    ic = inp.cpu().numpy()
    assert_same_law(f"tube {slots} slots", tube_battery(ic, ref_tube_sample(n, spec, tube, seed=1), tube))


@gpu
def test_bitwise_determinism_and_batch_split():
    cu = _cuda()
    spec, tube = BlockMaskSpec(), TubeSpec()
    key = dict(seed=1234, step=77, device="cuda")
    full = cu.block_masks(64, spec, index_offset=10, **key)
    assert torch.equal(full, cu.block_masks(64, spec, index_offset=10, **key))
    parts = [cu.block_masks(20, spec, index_offset=10, **key), cu.block_masks(1, spec, index_offset=30, **key),
             cu.block_masks(43, spec, index_offset=31, **key)]
    assert torch.equal(full, torch.cat(parts))
    ti, tt = cu.tube_masks(64, spec, tube, index_offset=0, **key)
    ti2, tt2 = cu.tube_masks(40, spec, tube, index_offset=24, **key)
    assert torch.equal(ti[24:], ti2) and torch.equal(tt[24:], tt2)
    # the joint launch gives the same bits as the separate ones
    ji, jt, jb = cu.tube_and_block_masks(64, 64, seed=1234, step=77, clip_offset=0, image_offset=10, device="cuda")
    assert torch.equal(ji, ti) and torch.equal(jt, tt) and torch.equal(jb, full)
    # other keys give other masks; clip and image streams differ for the same index
    assert not torch.equal(full, cu.block_masks(64, spec, index_offset=10, seed=1235, step=77, device="cuda"))
    assert not torch.equal(full, cu.block_masks(64, spec, index_offset=10, seed=1234, step=78, device="cuda"))
    assert (cu.block_masks(64, spec, index_offset=0, **key) != ti.any(1)).any((1, 2)).float().mean() > 0.9
    # the top 32 bits of the seed matter
    assert not torch.equal(full, cu.block_masks(64, spec, index_offset=10, seed=1234 + 2 ** 40, step=77, device="cuda"))
    big = cu.block_masks(4, spec, seed=2 ** 64 - 1, step=2 ** 32 - 1, index_offset=2 ** 32 - 4, device="cuda")
    assert (big.sum((1, 2)) > 0).all()


@gpu
def test_public_op_picks_cuda_and_matches():
    spec, tube = BlockMaskSpec(), TubeSpec()
    assert M.can_run_cuda("cuda", spec, tube)
    a = M.block_masks(16, spec, seed=4, step=1, index_offset=3, device="cuda")
    b = M.block_masks(16, spec, seed=4, step=1, index_offset=3, device="cuda", backend="cuda")
    assert a.is_cuda and torch.equal(a, b)
    r = M.block_masks(16, spec, seed=4, step=1, index_offset=3, device="cuda", backend="ref")
    assert r.is_cuda and r.shape == a.shape and r.dtype == a.dtype
    i, t = M.tube_masks(16, spec, tube, seed=4, device="cuda")
    ri, rt = M.tube_masks(16, spec, tube, seed=4, device="cuda", backend="ref")
    assert (i.shape, t.shape, i.dtype) == (ri.shape, rt.shape, ri.dtype)
    assert M.block_masks(0, spec, device="cuda").shape == (0, 14, 14)
    e_i, e_t = M.tube_masks(0, spec, tube, device="cuda")
    assert e_i.shape == (0, 8, 14, 14) and e_t.shape == (0, 16, 14, 14)
    ji, jt, jb = _cuda().tube_and_block_masks(0, 3, device="cuda")
    assert ji.shape == (0, 8, 14, 14) and jb.shape == (3, 14, 14) and torch.equal(jb, M.block_masks(3, device="cuda"))


@gpu
@pytest.mark.parametrize("grid, offset", [((14, 14), 0), ((14, 14), 1), ((7, 13), 0)],
                         ids=["words", "misaligned-bytes", "odd-grid-bytes"])
def test_every_output_byte_written(grid, offset):
    """Poison the outputs (all True) before the raw op; the result must equal a fresh run's."""
    cu = _cuda()
    spec, tube = BlockMaskSpec(grid=grid, num_masking_patches=40, min_num_patches=8), TubeSpec()
    n, S, T = 33, tube.slots, tube.slots * tube.temporal_scale
    H, W = grid
    want_i, want_t = cu.tube_masks(n, spec, tube, seed=2, step=0, index_offset=0, device="cuda")
    buf_i = torch.ones(offset + n * S * H * W, dtype=torch.bool, device="cuda")
    buf_t = torch.ones(offset + n * T * H * W, dtype=torch.bool, device="cuda")
    inp, tgt = buf_i[offset:].view(n, S, H, W), buf_t[offset:].view(n, T, H, W)
    lo, hi = spec.log_aspect
    lmin, lmax = tube.length_range
    torch.ops.bevt.masks_(inp, tgt, None, cu._block_job(spec, 0, M._STREAM_TUBE, 1, lmin, lmax),
                          None, None, None, cu._NO_JOB, [lo, hi, 0.0, 0.0], 2, 0)
    assert torch.equal(inp, want_i) and torch.equal(tgt, want_t)
    assert buf_i[:offset].all() and buf_t[:offset].all(), "wrote before the output"


@gpu
def test_raw_op_checks_its_inputs():
    cu = _cuda()
    spec = BlockMaskSpec()
    job = cu._block_job(spec, 0, 0)
    out = torch.empty(2, 1, 14, 14, dtype=torch.bool, device="cuda")
    call = torch.ops.bevt.masks_
    with pytest.raises(RuntimeError, match="must be bool"):
        call(out.int(), None, None, job, None, None, None, cu._NO_JOB, [0.0, 1.0, 0.0, 0.0], 0, 0)
    with pytest.raises(RuntimeError, match="sides in 2..32"):
        call(torch.empty(2, 1, 33, 4, dtype=torch.bool, device="cuda"), None, None, job, None, None, None,
             cu._NO_JOB, [0.0, 1.0, 0.0, 0.0], 0, 0)
    with pytest.raises(RuntimeError, match="num_masking must be in"):
        call(out, None, None, [0, 0, 197, 16, 197, 0, 0, 1, 1], None, None, None, cu._NO_JOB,
             [0.0, 1.0, 0.0, 0.0], 0, 0)
    with pytest.raises(RuntimeError, match="tube lengths must satisfy"):
        call(out, out, None, [0, 1, 98, 16, 98, 0, 1, 2, 3], None, None, None, cu._NO_JOB,
             [0.0, 1.0, 0.0, 0.0], 0, 0)
    with pytest.raises(RuntimeError, match="step must be in"):
        call(out, None, None, job, None, None, None, cu._NO_JOB, [0.0, 1.0, 0.0, 0.0], 0, 2 ** 32)


@gpu
def test_cuda_graph_replay():
    cu = _cuda()
    g = torch.cuda.CUDAGraph()
    cu.tube_and_block_masks(64, 64, seed=9, step=0, device="cuda")  # warm up outside the capture
    torch.cuda.synchronize()
    with torch.cuda.graph(g):
        out = cu.tube_and_block_masks(64, 64, seed=9, step=0, device="cuda")
    for t in out:
        t.zero_()
    g.replay()
    want = cu.tube_and_block_masks(64, 64, seed=9, step=0, device="cuda")
    assert all(torch.equal(a, b) for a, b in zip(out, want))


if os.environ.get("BEVT_EXTENDED_TESTS") == "1":
    @gpu
    @pytest.mark.parametrize("seed", range(8))
    def test_extended_seed_sweep(seed):
        spec = BlockMaskSpec.for_grid((10, 12), ratio=0.6, exact=bool(seed % 2))
        mc, bc = cuda_block_sample(4096, spec, seed=seed, step=seed)
        mr, br = ref_block_sample(4096, spec, seed=seed)
        assert_same_law(f"sweep {seed}", block_battery(mc, bc, mr, br))
