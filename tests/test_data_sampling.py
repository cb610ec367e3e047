"""Clip sampling against numbers worked out by hand from mmaction's ``SampleFrames`` formulas."""
from __future__ import annotations

import numpy as np
import pytest

from bevt.data.sampling import train_clip_indices, train_clip_offsets, test_clip_indices, uniform_segment_indices


def test_train_clip_fits_offset_range():
    """300 frames, 16 x 8 (span 128): offset = randint(300 - 128 + 1) -> uniform on 0..172."""
    rng = np.random.default_rng(0)
    offsets = []
    for _ in range(4000):
        inds = train_clip_indices(300, 16, 8, rng)
        assert inds.shape == (16,) and inds.dtype == np.int64
        np.testing.assert_array_equal(inds, inds[0] + np.arange(16) * 8)  # no wrap when it fits
        offsets.append(inds[0])
    assert min(offsets) == 0 and max(offsets) == 172


@pytest.mark.parametrize("num_frames", [100, 127, 128])
def test_train_clip_short_video_starts_at_zero_and_loops(num_frames):
    """num_frames < span: branch 'avg <= 0' -> offset 0; 128 frames: avg 1 -> randint(1) = 0. Loop mod N."""
    inds = train_clip_indices(num_frames, 16, 8, np.random.default_rng(1))
    np.testing.assert_array_equal(inds, np.mod(np.arange(16) * 8, num_frames))
    if num_frames == 100:
        np.testing.assert_array_equal(inds[-4:], [96, 4, 12, 20])


def test_train_clip_offsets_all_official_branches():
    rng = np.random.default_rng(0)
    # avg = (20 - 16 + 1) // 3 = 1 > 0: base offsets 0, 1, 2 + randint(1) = 0
    np.testing.assert_array_equal(train_clip_offsets(20, 16, 3, rng), [0, 1, 2])
    # avg = 3 // 4 = 0 and 18 > max(4, 16): sorted randint(3) x 4
    o = train_clip_offsets(18, 16, 4, rng)
    assert o.shape == (4,) and np.all(np.diff(o) >= 0) and o.min() >= 0 and o.max() <= 2
    # avg = 0 // 2 = 0 and 15 <= 16: ratio 0 -> zeros
    np.testing.assert_array_equal(train_clip_offsets(15, 16, 2, rng), [0, 0])
    # avg < 0: zeros
    np.testing.assert_array_equal(train_clip_offsets(10, 16, 1, rng), [0])


def test_test_clips_evenly_spaced():
    """avg = (300 - 128 + 1) / 4 = 43.25; starts int(i * 43.25 + 21.625) = 21, 64, 108, 151."""
    inds = test_clip_indices(300, 16, 8, 4)
    assert inds.shape == (4, 16)
    np.testing.assert_array_equal(inds[:, 0], [21, 64, 108, 151])
    np.testing.assert_array_equal(inds[2], 108 + np.arange(16) * 8)
    # 128 frames > 127: avg = 0.5 -> starts int(0.25), int(0.75) = 0, 0
    np.testing.assert_array_equal(test_clip_indices(128, 16, 8, 2)[:, 0], [0, 0])
    # too short: all clips start at 0, indices loop
    short = test_clip_indices(100, 16, 8, 3)
    np.testing.assert_array_equal(short, np.tile(np.mod(np.arange(16) * 8, 100), (3, 1)))
    # K400 fine-tuning test: 32 x 2 from a 250-frame video, 4 clips: avg = 187 / 4 = 46.75
    np.testing.assert_array_equal(test_clip_indices(250, 32, 2, 4)[:, 0], [23, 70, 116, 163])


def test_uniform_segments():
    """50 frames, 8 segments: seg = 49 / 8 = 6.125; bounds round(6.125 i) with half-to-even
    (24.5 -> 24): 0, 6, 12, 18, 24, 31, 37, 43, 49."""
    bounds = np.array([0, 6, 12, 18, 24, 31, 37, 43, 49])
    np.testing.assert_array_equal(uniform_segment_indices(50, 8), (bounds[:-1] + bounds[1:]) // 2)
    np.testing.assert_array_equal(uniform_segment_indices(50, 8), [3, 9, 15, 21, 27, 34, 40, 46])
    rng = np.random.default_rng(0)
    draws = np.stack([uniform_segment_indices(50, 8, rng) for _ in range(2000)])
    np.testing.assert_array_equal(draws.min(0), bounds[:-1])  # both segment ends are reachable
    np.testing.assert_array_equal(draws.max(0), bounds[1:])
    # fewer frames than segments repeats frames
    np.testing.assert_array_equal(uniform_segment_indices(3, 6), [0, 0, 1, 1, 1, 2])


def test_bad_arguments():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="at least one frame"):
        train_clip_indices(0, 16, 8, rng)
    with pytest.raises(ValueError, match="interval"):
        train_clip_indices(10, 4, 0, rng)
    with pytest.raises(ValueError, match="num_clips"):
        test_clip_indices(10, 4, 1, 0)
