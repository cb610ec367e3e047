"""The DALI loader on the CPU (DALI's CPU operators, ``device_id=None``) against the PyAV loader.

DALI's CPU video decoder reads VP9/VP8/MJPEG, not H.264, so these tests write VP9 files. Tolerances,
measured on the synthetic clips (DALI 2.4, PyAV 18):

* frame indices: exact (frame-id videos whose frame t is a flat grey level 16 + 5 t);
* video pixels vs PyAV: mean |diff| <= 2.5 levels, 99th percentile <= 12, max <= 64. The decoders
  convert YUV 4:2:0 to RGB differently (chroma upsampling): measured mean 1.45, p99 7, max 34, the
  large values on sharp colour edges only;
* resampling alone (DALI's resize of DALI-decoded frames vs the CPU transforms on the same frames):
  mean <= 0.5, max <= 10 (measured 0.2 / 7: PIL and DALI round and treat borders differently);
* images (JPEG, same libjpeg-style decoding): mean <= 0.5, max <= 8 (measured 0.23 / 5, with colour jitter).
"""
from __future__ import annotations

import os
import shutil
import warnings

import numpy as np
import pytest
import torch

from bevt.data import dali as D
from bevt.data.datasets import ImageDataset, Sample, SkippedFileWarning, VideoClipDataset, read_annotation_list
from bevt.data.loader import TorchLoader, build_loader

dali_missing = D._dali_version() is None
needs_dali = pytest.mark.skipif(dali_missing, reason=f"NVIDIA DALI is not installed ({D.install_command()})")

SMALL = dict(scale=(128, 160), crop=112, tok_size=56)  # the recipe's geometry at half size: faster on CPU


@pytest.fixture(scope="module")
def vp9(tmp_path_factory):
    from bevt.data import synth

    return synth.generate(tmp_path_factory.mktemp("dali") / "vp9", num_train=6, num_val=0, num_images=6,
                          num_frames=40, size=(160, 128), codec="vp9", seed=0, workers=1)


@pytest.fixture(scope="module")
def frame_id_videos(tmp_path_factory):
    """Two VP9 videos (48 and 40 frames) whose frame t is flat grey 16 + 5 t: any crop shows its index."""
    from bevt.data.synth import write_video

    root = tmp_path_factory.mktemp("frame_id")
    items = []
    for i, n in enumerate((48, 40)):
        frames = np.zeros((n, 128, 160, 3), np.uint8)
        frames[:] = (16 + 5 * np.arange(n, dtype=np.uint8))[:, None, None, None]
        path = str(root / f"id{i}.webm")
        write_video(path, frames, codec="vp9")
        items.append(Sample(path, i))
    return items


def frame_ids(x: torch.Tensor, frame_dim: int) -> np.ndarray:
    """Frame indices encoded as flat grey levels -> int (..., T)."""
    dims = tuple(d for d in range(x.dim()) if d > frame_dim)
    return torch.round((x.float().mean(dim=dims) - 16) / 5).long().numpy()


def pixel_stats(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    d = (a.int() - b.int()).abs().flatten().float().numpy()
    return float(d.mean()), float(np.percentile(d, 99)), float(d.max())


def test_status_and_install_command(monkeypatch):
    ok, why = D.dali_status()
    assert isinstance(ok, bool) and why
    if not torch.cuda.is_available():
        assert not ok and ("GPU" in why or "not installed" in why)
    assert D.install_command().startswith("pip install nvidia-dali-cuda1")
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    assert D.install_command() == "pip install nvidia-dali-cuda120"


def test_dali_missing_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(D, "_dali_version", lambda: None)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    (tmp_path / "list.txt").write_text("a.webm 0\n")
    with pytest.raises(ImportError, match=r"pip install nvidia-dali-cuda130"):
        build_loader("video", str(tmp_path / "list.txt"), batch_size=1, decoder="dali")
    assert not D.dali_status()[0] and "not installed" in D.dali_status()[1]
    # auto falls back to the CPU path
    loader = build_loader("video", [(str(tmp_path / "a.webm"), 0)], batch_size=1, decoder="auto", num_workers=0)
    assert isinstance(loader, TorchLoader)


@needs_dali
def test_frame_indices_are_the_plans(frame_id_videos):
    """Every decoded frame (clip and tokenizer copy) is the frame the dataset's plan asked for, as PyAV's."""
    for mode, kw in (("pretrain", dict(clip_len=8, interval=4, **SMALL)),
                     ("finetune", dict(num_segments=8, crop=64, short_side=128))):  # SSv2 segments
        ds = VideoClipDataset(frame_id_videos, mode, seed=1, **kw)
        dali = D.DaliLoader(ds, 2, device_id=None, num_threads=2, drop_last=False)
        cpu = TorchLoader(ds, 2, seed=1, drop_last=False)
        for epoch in range(2):
            for a, b in zip(list(dali), list(cpu)):
                want = []
                for i in a["index"].tolist():
                    info = D.probe(ds.items[i].path)
                    inds, _ = ds.plan(ds.rng(epoch, i), info.num_frames, info.height, info.width)
                    want.append(inds)
                got = frame_ids(a["video"].transpose(1, 2), 1)  # (B, T)
                np.testing.assert_array_equal(got, np.stack(want))
                np.testing.assert_array_equal(frame_ids(b["video"].transpose(1, 2), 1), np.stack(want))
                if mode == "pretrain":
                    np.testing.assert_array_equal(frame_ids(a["video_tok"], 1), np.stack(want))
        assert dali.epoch == 2
        dali.close()


@needs_dali
def test_pretrain_matches_pyav(vp9):
    """Full recipe geometry (16x8 clips, 224 crop, 112 copy) and images with colour jitter, vs the CPU loader."""
    ds = VideoClipDataset(vp9.train_list, "pretrain", seed=3)
    a = next(iter(D.DaliLoader(ds, 3, device_id=None, num_threads=2)))
    b = next(iter(TorchLoader(ds, 3, seed=3)))
    assert a["video"].shape == (3, 3, 16, 224, 224) and a["video_tok"].shape == (3, 16, 3, 112, 112)
    assert a["video"].dtype == torch.uint8 and a["label"].dtype == torch.int64
    assert torch.equal(a["index"], b["index"]) and torch.equal(a["label"], b["label"])
    for k in ("video", "video_tok"):
        mean, p99, mx = pixel_stats(a[k], b[k])
        print(f"{k}: mean {mean:.2f} p99 {p99} max {mx}")
        assert mean <= 2.5 and p99 <= 12 and mx <= 64, k

    ids = ImageDataset(vp9.images_list, "pretrain", seed=3)
    for a, b in zip(D.DaliLoader(ids, 3, device_id=None, num_threads=2), TorchLoader(ids, 3, seed=3)):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["label"], b["label"])
        for k in ("images", "images_tok"):
            assert a[k].shape == b[k].shape
            mean, p99, mx = pixel_stats(a[k], b[k])
            print(f"{k}: mean {mean:.2f} p99 {p99} max {mx}")
            assert mean <= 0.5 and mx <= 8, k


@needs_dali
def test_resampling_matches_on_the_same_frames(vp9):
    """Isolate resampling from decoding: the CPU transforms on DALI-decoded frames vs the DALI output."""
    from nvidia.dali import fn, types
    from nvidia.dali.pipeline import Pipeline

    from bevt.data import transforms as T

    ds = VideoClipDataset(vp9.train_list, "pretrain", clip_len=4, interval=3, seed=0, flip_p=0.5)
    loader = D.DaliLoader(ds, 6, device_id=None, num_threads=2, shuffle=False)
    out = next(iter(loader))
    flips = set()
    for b, item in enumerate(ds.items):
        info = D.probe(item.path)
        inds, params = ds.plan(ds.rng(0, b), info.num_frames, info.height, info.width)
        flips.add(params.flip)
        pipe = Pipeline(batch_size=1, num_threads=1, device_id=None)
        with pipe:
            enc = fn.external_source(name="enc", dtype=types.UINT8, ndim=1)
            pipe.set_outputs(fn.decoders.video(enc, frames=inds.astype(np.int32).tolist()))
        pipe.build()
        pipe.feed_input("enc", [np.fromfile(item.path, np.uint8)])
        frames = np.array(pipe.run()[0][0])
        x, tok = T.apply_params(frames, params, crop=ds.crop, tok_size=ds.tok_size)
        for got, ref in ((out["video"][b].permute(1, 2, 3, 0), x), (out["video_tok"][b].permute(0, 2, 3, 1), tok)):
            mean, _, mx = pixel_stats(got, torch.from_numpy(ref))
            assert mean <= 0.5 and mx <= 10, (b, mean, mx)
    assert flips == {True, False}  # both branches of the flipped crop window were exercised


@needs_dali
def test_finetune_and_test_modes_match_pyav(vp9):
    cases = [("video", "finetune", dict(num_segments=4, crop=96, short_side=128)),  # SSv2 uniform segments
             ("video", "test", dict(clip_len=4, interval=2, num_clips=2, num_crops=3, crop=112, short_side=112)),
             ("image", "finetune", dict(crop=96)),
             ("image", "test", dict(crop=96, short_side=112))]
    for kind, mode, kw in cases:
        cls = VideoClipDataset if kind == "video" else ImageDataset
        ds = cls(vp9.train_list if kind == "video" else vp9.images_list, mode, seed=4, **kw)
        a = next(iter(D.DaliLoader(ds, 3, device_id=None, num_threads=2, shuffle=mode != "test")))
        b = next(iter(TorchLoader(ds, 3, seed=4, shuffle=mode != "test")))
        key = "video" if kind == "video" else "images"
        assert a[key].shape == b[key].shape, (kind, mode)
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["label"], b["label"])
        mean, p99, mx = pixel_stats(a[key], b[key])
        print(f"{kind} {mode}: mean {mean:.2f} p99 {p99} max {mx}")
        assert mean <= 2.5 and p99 <= 12 and mx <= 64, (kind, mode)


def _damage(good: list[Sample], tmp_path) -> tuple[list[Sample], list[str]]:
    data = open(good[0].path, "rb").read()
    (tmp_path / "empty.webm").write_bytes(b"")
    (tmp_path / "garbage.webm").write_bytes(np.random.default_rng(0).bytes(3000))
    (tmp_path / "truncated.webm").write_bytes(data[: len(data) // 2])
    bad = [str(tmp_path / n) for n in ("truncated.webm", "garbage.webm", "empty.webm", "missing.webm")]
    items = [good[0], Sample(bad[0], 1), good[2], Sample(bad[1], 3), Sample(bad[2], 4), good[5], Sample(bad[3], 0),
             good[1]]
    return items, bad


@needs_dali
def test_unreadable_files_are_skipped_like_the_cpu_path(vp9, tmp_path):
    """A truncated, a garbage, an empty and a missing file among good ones: reported, replaced by the
    next good sample exactly as the CPU dataset does, and the epoch completes."""
    items, bad = _damage(read_annotation_list(vp9.train_list), tmp_path)
    ds = VideoClipDataset(items, "pretrain", clip_len=4, interval=2, seed=0, **SMALL)
    with pytest.warns(SkippedFileWarning):
        dali = D.DaliLoader(ds, 2, device_id=None, num_threads=2, drop_last=False)
    assert dali.skipped_files == sorted(bad)
    assert "truncated" in dali.skipped_reasons[bad[0]] and "empty" in dali.skipped_reasons[bad[2]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedFileWarning)
        cpu = list(TorchLoader(ds, 2, seed=0, drop_last=False))
        got = list(dali)
    assert len(got) == len(cpu) == 4
    for a, b in zip(got, cpu):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["label"], b["label"])
        assert pixel_stats(a["video"], b["video"])[0] <= 2.5
    assert dali.recoveries == 0 and dali.epoch == 1


@needs_dali
def test_failure_mid_run_is_skipped_and_the_run_continues(vp9, tmp_path):
    """Files that pass the probe and break afterwards (replaced by garbage, emptied, deleted)."""
    good = read_annotation_list(vp9.train_list)
    items = []
    for i, s in enumerate(good):
        dst = tmp_path / f"v{i}.webm"
        shutil.copy(s.path, dst)
        items.append(Sample(str(dst), s.label))
    ds = VideoClipDataset(items, "pretrain", clip_len=4, interval=2, seed=0, **SMALL)
    loader = D.DaliLoader(ds, 2, device_id=None, num_threads=2, shuffle=False, prefetch=2, pipelines=2)
    assert loader.skipped_files == []
    (tmp_path / "v3.webm").write_bytes(np.random.default_rng(1).bytes(4000))  # garbage: DALI raises
    (tmp_path / "v4.webm").write_bytes(b"")  # empty: caught when its bytes are read
    with pytest.warns(SkippedFileWarning):
        got = list(loader)
    assert [b["index"].tolist() for b in got] == [[0, 1], [2, 3], [4, 5]]
    assert loader.skipped_files == [str(tmp_path / "v3.webm"), str(tmp_path / "v4.webm")]
    assert "DALI failed" in loader.skipped_reasons[str(tmp_path / "v3.webm")] and loader.recoveries == 1
    # the substitutes are the CPU dataset's: the next readable index, with its own label
    assert [b["label"].tolist() for b in got] == [[items[0].label, items[1].label], [items[2].label, items[5].label],
                                                  [items[5].label, items[5].label]]
    # resumed for the next epoch after another file went missing (the running loader may already have
    # prepared the next epoch's first batches while the file was there)
    os.remove(tmp_path / "v5.webm")
    with pytest.warns(SkippedFileWarning):
        resumed = D.DaliLoader(ds, 2, device_id=None, num_threads=2, shuffle=False, prefetch=2, pipelines=2)
        resumed.load_state_dict(loader.state_dict())
        again = list(resumed)
    assert [b["label"].tolist() for b in again] == [[items[0].label, items[1].label],
                                                    [items[2].label, items[0].label],
                                                    [items[0].label, items[0].label]]
    assert resumed.epoch == 2 and len(resumed.skipped_files) == 3


@needs_dali
@pytest.mark.parametrize("pipelines", [1, 3])
def test_sharding_resume_and_epochs(frame_id_videos, vp9, pipelines):
    """Batch k goes to pipeline k % pipelines; order, resume and epochs must not depend on it."""
    items = read_annotation_list(vp9.train_list)[:5] + frame_id_videos
    ds = VideoClipDataset(items, "pretrain", clip_len=2, interval=4, seed=7, **SMALL)
    P = dict(device_id=None, num_threads=2, pipelines=pipelines)
    # sharding: same sample -> rank assignment as the CPU loader, with padding (drop_last=False)
    for rank in range(2):
        dali = D.DaliLoader(ds, 2, rank=rank, world_size=2, drop_last=False, **P)
        cpu = TorchLoader(ds, 2, seed=7, rank=rank, world_size=2, drop_last=False)
        for epoch in range(2):
            got = [b["index"].tolist() for b in dali]
            assert got == [b["index"].tolist() for b in cpu], (rank, epoch)
            assert [len(g) for g in got] == [2, 2]
        dali.close()
    # exact resume mid-epoch, a break and re-iteration, set_epoch mid-epoch
    ref = D.DaliLoader(ds, 2, prefetch=3, **P)
    full = list(ref) + list(ref)
    assert len(full) == 6 and ref.epoch == 2
    if pipelines > 1:  # the same batches as one pipeline, bit for bit
        one = D.DaliLoader(ds, 2, device_id=None, num_threads=2, pipelines=1)
        for x, y in zip(full, list(one) + list(one)):
            assert torch.equal(x["video"], y["video"]) and torch.equal(x["index"], y["index"])
    a = D.DaliLoader(ds, 2, prefetch=3, **P)
    for k, batch in enumerate(a):
        if k == 1:
            state = a.state_dict()
            break
    assert torch.equal(next(iter(a))["video"], full[2]["video"])  # re-iterating continues after a break
    b = D.DaliLoader(ds, 2, prefetch=1, **P)
    b.load_state_dict(state)
    rest = list(b)
    assert len(rest) == 1 and torch.equal(rest[0]["video"], full[2]["video"])
    assert torch.equal(rest[0]["video_tok"], full[2]["video_tok"])
    b.set_epoch(1)
    it = iter(b)
    assert torch.equal(next(it)["video"], full[3]["video"])
    b.set_epoch(1)  # restart the epoch while batches are in flight: rebuilt, still exact
    assert [x["index"].tolist() for x in b] == [x["index"].tolist() for x in full[3:]]
    with pytest.raises(RuntimeError, match="older iterator"):
        next(it)
    with pytest.raises(ValueError, match="batch_size"):
        D.DaliLoader(ds, 3, **P).load_state_dict(state)
    # a CPU loader's state resumes the DALI loader at the same place
    cpu = TorchLoader(ds, 2, seed=7)
    next(iter(cpu))
    b.load_state_dict(cpu.state_dict())
    assert next(iter(b))["index"].tolist() == full[1]["index"].tolist()


@needs_dali
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks DALI's CPU operators")
def test_h264_without_gpu_is_a_clear_error(tmp_path):
    from bevt.data.synth import write_video

    write_video(tmp_path / "a.mp4", np.zeros((4, 32, 32, 3), np.uint8), codec="h264")
    ds = VideoClipDataset([(str(tmp_path / "a.mp4"), 0)], "pretrain", clip_len=2, interval=1)
    with pytest.raises(ValueError, match="h264.*decoder='pyav'"):
        D.DaliLoader(ds, 1, device_id=None)


@needs_dali
def test_build_loader_selects_dali(vp9):
    loader = build_loader("image", vp9.images_list, batch_size=2, decoder="dali", num_workers=2, crop=96,
                          scale=(112, 128), tok_size=48)
    assert isinstance(loader, D.DaliLoader) and loader.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    batch = next(iter(loader))
    assert batch["images"].shape == (2, 3, 96, 96) and batch["images_tok"].shape == (2, 3, 48, 48)
    loader.close()
    with pytest.raises(RuntimeError, match="closed"):
        iter(loader)
    auto = build_loader("image", vp9.images_list, batch_size=2, decoder="auto", num_workers=0)
    assert isinstance(auto, D.DaliLoader if D.dali_status("image")[0] else TorchLoader)


def _reader_rows(loader) -> list[int]:
    """How many samples each of the loader's current pipelines reads from a file list (0: decodes them)."""
    return [len(s.listed) for s in loader._slots]


@needs_dali
def test_reader_and_per_sample_decoding_share_an_epoch(frame_id_videos, tmp_path):
    """Clips of evenly spaced frames come from file-list readers, clips that loop past the end of a short
    video from the per-sample decoder: same frames as the plans, same order as the CPU loader, any
    number of pipelines, exact resume."""
    from bevt.data.synth import write_video

    frames = np.zeros((20, 128, 160, 3), np.uint8)
    frames[:] = (16 + 5 * np.arange(20, dtype=np.uint8))[:, None, None, None]
    write_video(tmp_path / "short.webm", frames, codec="vp9")
    items = frame_id_videos + [Sample(str(tmp_path / "short.webm"), 2)] + frame_id_videos
    ds = VideoClipDataset(items, "pretrain", clip_len=8, interval=4, seed=2, **SMALL)  # span 32 > 20 frames
    cpu_loader = TorchLoader(ds, 1, seed=2)
    cpu, cpu1 = list(cpu_loader), list(cpu_loader)
    for pipelines in (1, 2):
        dali = D.DaliLoader(ds, 1, device_id=None, num_threads=2, pipelines=pipelines)
        got = list(dali)
        assert [b["index"].tolist() for b in got] == [b["index"].tolist() for b in cpu]
        for a in got:
            i = int(a["index"])
            info = D.probe(ds.items[i].path)
            want, _ = ds.plan(ds.rng(0, i), info.num_frames, info.height, info.width)
            np.testing.assert_array_equal(frame_ids(a["video"].transpose(1, 2), 1)[0], want)
            np.testing.assert_array_equal(frame_ids(a["video_tok"], 1)[0], want)
        it = iter(dali)  # epoch 1: the pipelines of an epoch read 4 clips from lists and decode 1 alone
        first = next(it)
        assert sorted(_reader_rows(dali), reverse=True)[:pipelines] == ([4] if pipelines == 1 else [2, 2])
        assert 0 in _reader_rows(dali)
        state = dali.state_dict()
        rest = [b["index"].tolist() for b in it]
        resumed = D.DaliLoader(ds, 1, device_id=None, num_threads=2, pipelines=pipelines)
        resumed.load_state_dict(state)
        assert [b["index"].tolist() for b in resumed] == rest and len(rest) == 4
        assert [int(first["index"])] + [r[0] for r in rest] == [b["index"].item() for b in cpu1]


@needs_dali
def test_reader_failure_falls_back_to_per_sample_decoding(vp9, monkeypatch):
    """A reader that fails with no file to blame: a warning, then every clip decoded alone, same batches."""
    ds = VideoClipDataset(vp9.train_list, "pretrain", clip_len=4, interval=2, seed=0, **SMALL)
    ref = [b["video"] for b in D.DaliLoader(ds, 2, device_id=None, num_threads=2)]

    def broken(*args, **kwargs):
        raise RuntimeError("reader exploded")

    monkeypatch.setattr(D, "_reader_op", broken)
    loader = D.DaliLoader(ds, 2, device_id=None, num_threads=2)
    with pytest.warns(UserWarning, match="reader failed.*reader exploded"):
        got = [b["video"] for b in loader]
    assert loader.recoveries == 1 and loader.skipped_files == []
    assert _reader_rows(loader) == [0] * len(loader._slots)
    assert len(got) == len(ref) and all(pixel_stats(a, b)[0] <= 2.5 for a, b in zip(got, ref))


@needs_dali
def test_only_clips_a_file_list_can_hold_go_to_the_reader(vp9):
    ds = VideoClipDataset(vp9.train_list, "pretrain", clip_len=4, interval=2, seed=0, **SMALL)
    loader = D.DaliLoader(ds, 2, device_id=None, num_threads=2)
    s = loader._plan_batch(0, 0, read=False).samples[0]
    assert loader._fits_reader(s)
    assert not loader._fits_reader(D._Planned(s.index, s.item, "/data/my videos/a.webm", s.label, s.args))
    looped = (np.array([32, 34, 36, 0], np.int32),) + s.args[1:]
    assert not loader._fits_reader(D._Planned(s.index, s.item, s.path, s.label, looped))
    loader.close()
    for mode, kw in (("finetune", dict(num_segments=4, crop=96, short_side=128)),
                     ("test", dict(clip_len=4, interval=2, crop=96, short_side=112))):
        assert not D.DaliLoader(VideoClipDataset(vp9.train_list, mode, **kw), 2, device_id=None)._use_reader


@needs_dali
def test_next_epoch_is_prepared_before_this_one_ends(vp9):
    """No rebuild stall at epoch boundaries: reader pipelines for epoch e + 1 are built once epoch e's last
    batch is with DALI; per-sample pipelines simply run on. Batches stay those of the CPU loader."""
    ds = VideoClipDataset(vp9.train_list, "pretrain", clip_len=4, interval=2, seed=0, **SMALL)
    loader = D.DaliLoader(ds, 2, device_id=None, num_threads=2, prefetch=2)
    it = iter(loader)
    next(it)  # batch 2 (the epoch's last) is handed to DALI now: epoch 1's readers exist
    assert any(key[0] == 1 for key in loader._route)
    cpu = TorchLoader(ds, 2, seed=0)
    assert [b["index"].tolist() for b in it] == [b["index"].tolist() for b in cpu][1:]
    assert [b["index"].tolist() for b in loader] == [b["index"].tolist() for b in cpu]

    ids = ImageDataset(vp9.images_list, "pretrain", seed=0, crop=96, scale=(112, 128), tok_size=48)
    images = D.DaliLoader(ids, 2, device_id=None, num_threads=2, pipelines=2)
    cpu = TorchLoader(ids, 2, seed=0)
    first = [b["index"].tolist() for b in images]
    pipes = [s.pipe for s in images._slots]
    second = [b["index"].tolist() for b in images]
    assert [s.pipe for s in images._slots] == pipes and images.epoch == 2
    assert first + second == [b["index"].tolist() for b in cpu] + [b["index"].tolist() for b in cpu]


@needs_dali
def test_file_gone_while_planned_ahead_is_warned_in_the_callers_thread(vp9, tmp_path):
    """Per-sample batches are planned in a background thread; a file that vanished is skipped there and
    the warning reaches the caller with the next batch, not a stray thread."""
    items = []
    for i, s in enumerate(read_annotation_list(vp9.images_list)):
        dst = tmp_path / f"im{i}.jpg"
        shutil.copy(s.path, dst)
        items.append(Sample(str(dst), s.label))
    ds = ImageDataset(items, "pretrain", seed=0, crop=96, scale=(112, 128), tok_size=48)
    loader = D.DaliLoader(ds, 2, device_id=None, num_threads=2, shuffle=False)
    os.remove(tmp_path / "im5.jpg")  # in the last batch, planned in the background
    with pytest.warns(SkippedFileWarning, match="im5.jpg.*not found"):
        got = [b["index"].tolist() for b in loader]
    assert got == [[0, 1], [2, 3], [4, 5]] and loader.skipped_files == [str(tmp_path / "im5.jpg")]
    assert loader._held_warnings == []


@needs_dali
def test_bad_loader_options_are_clear_errors(vp9):
    ds = VideoClipDataset(vp9.train_list, "pretrain", clip_len=4, interval=2, seed=0, **SMALL)
    for kw, msg in ((dict(pipelines=0), "pipelines must be >= 1"), (dict(prefetch=0), "prefetch"),
                    (dict(num_threads=0), "num_threads"), (dict(rank=2, world_size=2), "rank must be in")):
        with pytest.raises(ValueError, match=msg):
            D.DaliLoader(ds, 2, device_id=None, **kw)
    assert D.DaliLoader(ds, 2, device_id=None).pipelines == 2  # the default for training videos (readers)
    assert D.DaliLoader(ds, 2, device_id=None, file_lists=False).pipelines == 1
