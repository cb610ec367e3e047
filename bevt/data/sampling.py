"""Which frames of a video make a clip: mmaction's ``SampleFrames`` semantics, in numpy.

Shape legend: N clips, T frames per clip (``clip_len``).

* :func:`train_clip_indices`: one random clip (training; BEVT pretraining uses 16 frames, interval 8).
* :func:`test_clip_indices`: ``num_clips`` evenly spaced clips (multi-view testing).
* :func:`uniform_segment_indices`: SSv2 / SlowFast-style ``frame_uniform`` sampling, one frame per
  segment.

All randomness comes from the ``numpy.random.Generator`` passed in: the dataset seeds it per sample.
Out-of-range indices loop (``np.mod``), mmaction's default ``out_of_bound_opt='loop'``.

Known differences from the official code (mmaction 0.15 as shipped with BEVT):

* It draws from numpy's global RNG (``np.random.randint``) and Python's ``random`` for the uniform
  sampler; we draw the same ranges from a per-sample Generator (same distribution, not the same numbers).
* ``np.int`` (removed in numpy 1.24) is read as ``np.int64``.
"""
from __future__ import annotations

import numpy as np

__all__ = ["train_clip_offsets", "train_clip_indices", "test_clip_indices", "uniform_segment_indices"]


def _check(num_frames: int, clip_len: int, interval: int = 1) -> None:
    if num_frames < 1:
        raise ValueError(f"a video needs at least one frame, got num_frames={num_frames}")
    if clip_len < 1:
        raise ValueError(f"clip_len must be >= 1, got {clip_len}")
    if interval < 1:
        raise ValueError(f"frame interval must be >= 1, got {interval}")


def train_clip_offsets(num_frames: int, ori_clip_len: int, num_clips: int, rng: np.random.Generator) -> np.ndarray:
    """Start frames of ``num_clips`` training clips spanning ``ori_clip_len`` frames -> int64 (N,).

    mmaction ``SampleFrames._get_train_clips``, all four branches:

    1. ``avg = (num_frames - ori_clip_len + 1) // num_clips > 0``: one random offset in [0, avg) inside
       each of the ``num_clips`` equal segments.
    2. else if ``num_frames > max(num_clips, ori_clip_len)``: sorted random offsets in
       [0, num_frames - ori_clip_len] (only reachable with ``num_clips > 1``).
    3. else if ``avg == 0``: evenly spaced offsets ``round(i * ratio)`` with
       ``ratio = (num_frames - ori_clip_len + 1) / num_clips``.
    4. else (the video is shorter than the clip span): all zeros; the indices then loop.

    With ``num_clips=1`` this reduces to: offset uniform on [0, num_frames - ori_clip_len] when the clip
    fits, else 0.
    """
    if num_clips < 1:
        raise ValueError(f"num_clips must be >= 1, got {num_clips}")
    avg_interval = (num_frames - ori_clip_len + 1) // num_clips
    if avg_interval > 0:
        offsets = np.arange(num_clips) * avg_interval + rng.integers(0, avg_interval, size=num_clips)
    elif num_frames > max(num_clips, ori_clip_len):
        offsets = np.sort(rng.integers(0, num_frames - ori_clip_len + 1, size=num_clips))
    elif avg_interval == 0:
        ratio = (num_frames - ori_clip_len + 1.0) / num_clips
        offsets = np.around(np.arange(num_clips) * ratio)
    else:
        offsets = np.zeros(num_clips)
    return offsets.astype(np.int64)


def train_clip_indices(num_frames: int, clip_len: int, interval: int, rng: np.random.Generator) -> np.ndarray:
    """Frame indices of one random training clip -> int64 (T,), looped into [0, num_frames).

    ``inds = offset + arange(clip_len) * interval`` with the offset of :func:`train_clip_offsets`
    (``num_clips=1``): uniform on [0, num_frames - clip_len * interval] when that is >= 0, else 0, and
    indices past the end wrap around (``np.mod``), e.g. a 100-frame video with 16x8 sampling always
    starts at 0 and reads frames 0, 8, ..., 96, 4, 12, 20.
    """
    _check(num_frames, clip_len, interval)
    offset = train_clip_offsets(num_frames, clip_len * interval, 1, rng)[0]
    inds_T = offset + np.arange(clip_len, dtype=np.int64) * interval
    return np.mod(inds_T, num_frames)


def test_clip_indices(num_frames: int, clip_len: int, interval: int, num_clips: int) -> np.ndarray:
    """Frame indices of ``num_clips`` evenly spaced test clips -> int64 (N, T), looped.

    mmaction ``SampleFrames._get_test_clips``: ``avg = (num_frames - clip_len * interval + 1) / num_clips``
    (a float); clip ``i`` starts at ``int(i * avg + avg / 2)`` when ``num_frames >= clip_len * interval``,
    else every clip starts at 0. Deterministic (no RNG).
    """
    _check(num_frames, clip_len, interval)
    if num_clips < 1:
        raise ValueError(f"num_clips must be >= 1, got {num_clips}")
    ori_clip_len = clip_len * interval
    avg_interval = (num_frames - ori_clip_len + 1) / float(num_clips)
    if num_frames > ori_clip_len - 1:
        offsets_N = (np.arange(num_clips) * avg_interval + avg_interval / 2.0).astype(np.int64)
    else:
        offsets_N = np.zeros(num_clips, dtype=np.int64)
    inds_NT = offsets_N[:, None] + np.arange(clip_len, dtype=np.int64)[None, :] * interval
    return np.mod(inds_NT, num_frames)


test_clip_indices.__test__ = False  # not a pytest test, despite its name


def uniform_segment_indices(num_frames: int, num_segments: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """One frame per segment (SSv2, ``SampleFrames(frame_uniform=True)``) -> int64 (T,), T = num_segments.

    mmaction's ``get_seq_frames`` (from SlowFast's ssv2 loader): ``seg = (num_frames - 1) / num_segments``;
    segment ``i`` spans ``[round(seg * i), round(seg * (i + 1))]`` (both ends included, numpy's
    round-half-to-even); training (``rng`` given) takes a uniform random frame of the segment, testing
    (``rng=None``) the middle ``(start + end) // 2``. Short videos repeat frames.
    """
    _check(num_frames, num_segments)
    seg_size = float(num_frames - 1) / num_segments
    i = np.arange(num_segments)
    starts = np.round(seg_size * i).astype(np.int64)
    ends = np.round(seg_size * (i + 1)).astype(np.int64)
    if rng is None:
        return (starts + ends) // 2
    return rng.integers(starts, ends + 1)  # inclusive upper end, as Python's random.randint
