"""Reference mask generators: the official statistics (REFERENCE_BEVT.md section 3), determinism, errors."""
import numpy as np
import pytest
import torch

from bevt.ops import BackendUnavailable, BlockMaskSpec, TubeSpec, block_masks, tube_masks
from bevt.ops.masking import _block_mask_np, _rng

N = 2000


@pytest.fixture(scope="module")
def tubes():
    return tube_masks(N, seed=123, backend="ref")


def test_block_mask_counts_match_official(tubes):
    inp, _ = tubes
    count = inp.any(1).sum((1, 2)).float()
    # official, 2000 draws: mean 97.5, min 90, max 98, exactly 98 in 69% of draws
    assert abs(count.mean().item() - 97.5) < 0.3
    assert count.max().item() == 98 and count.min().item() >= 85
    assert abs((count == 98).float().mean().item() - 0.69) < 0.05


def test_tube_lengths_uniform_and_wrap_rate(tubes):
    inp, _ = tubes
    slots = inp.any(-1).any(-1)  # B, 8
    lengths = slots.sum(1)
    hist = torch.bincount(lengths, minlength=9)[4:].float() / N
    assert lengths.min() >= 4 and lengths.max() <= 8
    assert (hist - 0.2).abs().max() < 0.035, hist  # uniform on 4..8
    # a non-full tube that holds slots 7 and 0 has wrapped: 18 of 40 (start, length) pairs, about 44%
    wrapped = (slots[:, 0] & slots[:, 7] & (lengths < 8)).float().mean().item()
    assert abs(wrapped - 0.45) < 0.04
    # every masked slot holds the same 2D mask; tubes are contiguous modulo 8
    for i in range(50):
        s = slots[i].nonzero().flatten().tolist()
        first = inp[i, s[0]]
        assert all(torch.equal(inp[i, t], first) for t in s)
        gaps = sum(1 for t in range(8) if slots[i, t] and not slots[i, (t + 1) % 8])
        assert gaps <= 1


def test_target_mask_fraction_and_upsampling(tubes):
    inp, tgt = tubes
    assert tgt.shape == (N, 16, 14, 14) and tgt.dtype == torch.bool
    assert torch.equal(tgt[:, 0::2], inp) and torch.equal(tgt[:, 1::2], inp)
    assert abs(tgt.float().mean().item() - 0.373) < 0.01  # official mean 0.373


def test_block_shapes_respect_aspect_and_min_area():
    spec = BlockMaskSpec()
    # a fresh mask's first accepted block is a rectangle of area >= ~16 (rounding) with aspect in [0.3, 3.33]
    for i in range(200):
        m = _block_mask_np(BlockMaskSpec(num_masking_patches=20, min_num_patches=16, max_num_patches=20),
                           _rng(0, 0, i, 0))
        rows, cols = np.nonzero(m)
        h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        if h * w == m.sum():  # a single rectangle
            assert 12 <= h * w <= 20
            assert 0.3 / 1.6 <= h / w <= 1.6 / 0.3
    assert spec.max_patches == 98


def test_determinism_and_split_independence():
    a = tube_masks(8, seed=7, step=3)
    b = tube_masks(8, seed=7, step=3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    c = tube_masks(8, seed=7, step=4)
    assert not torch.equal(a[0], c[0])
    lo = tube_masks(3, seed=7, step=3)[0]
    hi = tube_masks(5, seed=7, step=3, index_offset=3)[0]
    assert torch.equal(torch.cat([lo, hi]), a[0])
    i1 = block_masks(6, seed=1)
    assert torch.equal(i1[2:], block_masks(4, seed=1, index_offset=2))


def test_exact_count_mode():
    m = block_masks(200, BlockMaskSpec(exact=True), seed=0)
    assert (m.sum((1, 2)) == 98).all()
    inp, _ = tube_masks(50, BlockMaskSpec(exact=True), seed=0)
    assert (inp.any(1).sum((1, 2)) == 98).all()


def test_scaled_spec_for_small_grids():
    spec = BlockMaskSpec.for_grid((6, 6))
    assert spec.num_masking_patches == 18 and spec.min_num_patches == 3
    inp, tgt = tube_masks(100, spec, TubeSpec(slots=4), seed=0)
    assert inp.shape == (100, 4, 6, 6) and tgt.shape == (100, 8, 6, 6)
    assert 0.3 < inp.any(1).float().mean() <= 0.5


def test_errors():
    with pytest.raises(ValueError, match="num_masking_patches"):
        BlockMaskSpec(grid=(4, 4), num_masking_patches=17)
    with pytest.raises(ValueError, match="tube_range"):
        TubeSpec(tube_range=(0.8, 0.5))
    with pytest.raises(ValueError, match="batch_size"):
        block_masks(-1)
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailable, match="cuda"):
            block_masks(2, backend="cuda", device="cpu")


@pytest.mark.parametrize("spec,tube", [
    (BlockMaskSpec(), TubeSpec()),
    (BlockMaskSpec(exact=True), TubeSpec(tube_range=(1.0, 1.0))),  # the bound is reached
    (BlockMaskSpec.for_grid((6, 6)), TubeSpec(slots=4, tube_range=(0.25, 0.75), temporal_scale=1)),
    (BlockMaskSpec(num_masking_patches=150, max_num_patches=40), TubeSpec(slots=8, temporal_scale=3)),
])
def test_counts_never_exceed_the_bounds_the_loss_is_given(spec, tube):
    """The pretraining step passes these bounds to the fused loss (``max_masked``), which launches only
    for that many rows: a count above them would be a NaN loss."""
    inp, tgt = tube_masks(300, spec, tube, seed=5, backend="ref")
    img = block_masks(300, spec, seed=5, backend="ref")
    vid_counts, img_counts = tgt.sum((1, 2, 3)), img.sum((1, 2))
    assert vid_counts.max().item() <= tube.max_masked_target(spec)
    assert img_counts.max().item() <= spec.max_masked
    if spec.exact and tube.length_range[0] == tube.slots:
        assert vid_counts.min().item() == tube.max_masked_target(spec)
        assert img_counts.min().item() == spec.max_masked
