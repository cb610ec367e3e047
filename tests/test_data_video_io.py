"""PyAV / PIL decoding: frame counts, random access, broken files."""
from __future__ import annotations

import shutil

import av
import numpy as np
import pytest

from bevt.data.synth import write_video
from bevt.data.video_io import (ImageReadError, VideoReader, VideoReadError, clear_cache, probe, read_frames,
                                read_image)


def _reference_decode(path):
    """Every frame, decoded sequentially by PyAV directly (the ground truth for indices)."""
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


@pytest.fixture(scope="module")
def numbered_video(tmp_path_factory):
    """40 frames, each a distinct flat grey level plus a moving bar, keyframe every 16 frames."""
    t = np.arange(40)
    frames = np.zeros((40, 48, 64, 3), dtype=np.uint8)
    frames[:] = (t * 6)[:, None, None, None]
    for i in t:
        frames[i, 10:20, i:i + 8] = 255
    path = tmp_path_factory.mktemp("vid") / "numbered.mp4"
    write_video(path, frames)
    return path


def test_probe(numbered_video):
    info = probe(numbered_video)
    assert (info.num_frames, info.width, info.height, info.codec) == (40, 64, 48, "h264")
    assert info.fps == pytest.approx(25)


@pytest.mark.parametrize("indices", [[0, 1, 2], [39], [5, 5, 5], [30, 2, 17, 2], list(range(40))[::-1],
                                     [33, 34, 35], [16], [17, 32]])
def test_read_frames_matches_sequential_decode(numbered_video, indices):
    """Any order, repeats, and indices past keyframes (the seek path) give the right frames."""
    ref = _reference_decode(numbered_video)
    got = read_frames(numbered_video, indices)
    assert got.shape == (len(indices), 48, 64, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, ref[indices])


def test_reader_reuses_open_file(numbered_video):
    ref = _reference_decode(numbered_video)
    with VideoReader(numbered_video) as r:
        assert r.num_frames == 40
        np.testing.assert_array_equal(r.get([35, 1]), ref[[35, 1]])
        np.testing.assert_array_equal(r.get([3]), ref[[3]])  # backwards after a forward read


def test_late_frames_seek_to_a_keyframe(numbered_video):
    """Frames after a keyframe (every 16 frames here) are reached by seeking, not by decoding from 0."""
    ref = _reference_decode(numbered_video)
    with VideoReader(numbered_video) as r:
        np.testing.assert_array_equal(r.get([35, 33]), ref[[35, 33]])
        assert r.frames_decoded <= 35 - 32 + 1
        r.frames_decoded = 0
        np.testing.assert_array_equal(r.get([20]), ref[[20]])
        assert r.frames_decoded <= 20 - 16 + 1


def test_out_of_range_index_raises(numbered_video):
    with pytest.raises(VideoReadError, match="out of range"):
        read_frames(numbered_video, [0, 40])
    with pytest.raises(VideoReadError, match="out of range"):
        read_frames(numbered_video, [-1])


def test_vp9_without_header_frame_count(tmp_path):
    """WebM stores no frame count (stream.frames == 0): counted from the packets."""
    frames = np.random.default_rng(0).integers(0, 255, (12, 32, 32, 3), dtype=np.uint8)
    path = tmp_path / "v.webm"
    write_video(path, frames, codec="vp9")
    with av.open(str(path)) as c:
        assert c.streams.video[0].frames == 0
    assert probe(path).num_frames == 12
    np.testing.assert_array_equal(read_frames(path, [11, 0]), _reference_decode(path)[[11, 0]])


def _broken(tmp_path, good, kind):
    data = open(good, "rb").read()
    path = tmp_path / f"{kind}{good.suffix}"
    if kind == "missing":
        return path
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(np.random.default_rng(0).bytes(4000))
    elif kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "directory":
        path.mkdir()
    elif kind == "unknown_codec":  # an mp4 whose codec tag FFmpeg does not know: a stream without a decoder
        assert b"avc1" in data
        path.write_bytes(data.replace(b"avc1", b"zzzz"))
    return path


@pytest.mark.parametrize("kind,reason", [("missing", "not found"), ("empty", "empty"), ("garbage", "open"),
                                         ("truncated", "open"), ("directory", "regular file"),
                                         ("unknown_codec", "no decoder")])
def test_broken_videos_raise_clear_errors(tmp_path, numbered_video, kind, reason):
    path = _broken(tmp_path, numbered_video, kind)
    with pytest.raises(VideoReadError, match=reason) as e:
        read_frames(path, [0, 39])
    assert isinstance(e.value, RuntimeError) and e.value.path == str(path)
    assert str(path) in str(e.value)


def test_truncated_webm_is_detected(tmp_path):
    """A cut WebM still opens and would read as a shorter video: the header's duration gives it away."""
    frames = np.random.default_rng(1).integers(0, 255, (30, 32, 32, 3), dtype=np.uint8)
    good = tmp_path / "good.webm"
    write_video(good, frames, codec="vp9")
    cut = tmp_path / "cut.webm"
    data = good.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoReadError, match="truncated"):
        probe(cut)


def test_a_failing_seek_is_a_read_error():
    """A damaged index can make FFmpeg refuse the seek to the start (EPERM) on the decode-and-count path:
    a VideoReadError (the file is skipped), not av's PermissionError ending the run."""
    from bevt.data.video_io import _decode_count

    class DamagedContainer:
        def seek(self, offset):
            raise av.error.PermissionError(1, "Operation not permitted")

    with pytest.raises(VideoReadError, match="cannot seek to the first frame"):
        _decode_count("v.mp4", DamagedContainer())


def test_a_frame_size_change_is_a_read_error(tmp_path):
    """Two MPEG-TS recordings of different sizes joined into one file: no clip of one size, so a
    VideoReadError naming both sizes, not numpy's stacking error without the file's name."""
    joined = tmp_path / "joined.ts"
    for i, (h, w) in enumerate([(48, 64), (64, 96)]):
        part = tmp_path / f"part{i}.ts"
        write_video(part, np.full((16, h, w, 3), 40 * (i + 1), np.uint8))
        with open(joined, "ab") as f:
            f.write(part.read_bytes())
    with VideoReader(joined) as r:
        assert r.get([0, 1]).shape == (2, 48, 64, 3)  # frames of one size read as before
        with pytest.raises(VideoReadError, match=r"frame size changes within the video \(64x48, 96x64\)"):
            r.get(range(r.num_frames))


def test_cache_follows_file_changes(tmp_path, numbered_video):
    path = tmp_path / "v.mp4"
    shutil.copy(numbered_video, path)
    assert probe(path).num_frames == 40
    write_video(path, np.zeros((7, 16, 16, 3), np.uint8))  # other size: the cache key changes
    assert probe(path).num_frames == 7
    clear_cache()
    assert probe(path).num_frames == 7


def test_read_image(tmp_path):
    from PIL import Image

    rgb = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), rgb)
    Image.fromarray(rgb[..., 0]).save(tmp_path / "grey.png")  # grey -> RGB
    assert read_image(tmp_path / "grey.png").shape == (20, 30, 3)
    Image.fromarray(rgb).save(tmp_path / "a.jpg", quality=90)
    data = (tmp_path / "a.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    for name, reason in [("cut.jpg", "truncated"), ("empty.jpg", "empty"), ("text.jpg", "not a recognised"),
                         ("missing.jpg", "not found")]:
        with pytest.raises(ImageReadError, match=reason):
            read_image(tmp_path / name)


def test_read_image_16_bit_float_and_oversized(tmp_path, monkeypatch):
    """16-bit grey is scaled to 8 bits (PIL's convert clips it to nearly white); floating-point pixels and
    images over PIL's pixel limit are ImageReadErrors (skipped), not a clipped image or a crash."""
    from PIL import Image

    grey16 = np.random.default_rng(0).integers(0, 65536, (20, 30), dtype=np.uint16)
    Image.fromarray(grey16).save(tmp_path / "grey16.png")
    got = read_image(tmp_path / "grey16.png")
    assert got.shape == (20, 30, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got[..., 0], np.round(grey16 / 257).astype(np.uint8))
    assert (got == got[..., :1]).all()
    Image.fromarray(grey16.astype(np.float32) / 65535).save(tmp_path / "float.tif")
    with pytest.raises(ImageReadError, match="floating-point"):
        read_image(tmp_path / "float.tif")
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL raises DecompressionBombError over 2x the limit
    with pytest.raises(ImageReadError, match="too large to decode"):
        read_image(tmp_path / "big.png")
    from bevt.data.dali import _probe_image  # the GPU loader's up-front check of every image (no DALI needed)

    with pytest.raises(ImageReadError, match="too large to decode"):
        _probe_image(str(tmp_path / "big.png"))
