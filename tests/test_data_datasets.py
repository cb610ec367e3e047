"""Annotation lists, sample dicts, per-sample determinism, skipping unreadable files."""
from __future__ import annotations

import shutil
import warnings

import pytest
import torch

from bevt.data.datasets import (AnnotationError, BrokenDatasetError, ImageDataset, Sample, SkippedFileWarning,
                                VideoClipDataset, read_annotation_list, scan_folder)

# Small sizes keep the tests fast; the recipe's sizes are only parameters.
VIDEO_KW = dict(clip_len=4, interval=4, scale=(64, 72), crop=56, tok_size=28)
IMAGE_KW = dict(scale=(64, 72), crop=56, tok_size=28)


def test_read_annotation_list(tmp_path):
    lst = tmp_path / "list.txt"
    lst.write_text("a/x.mp4 3\n\nb/with space.mp4 0\n")
    items = read_annotation_list(lst, data_prefix="/data")
    assert items == [Sample("/data/a/x.mp4", 3), Sample("/data/b/with space.mp4", 0)]
    assert read_annotation_list(lst)[0].path == str(tmp_path / "a/x.mp4")  # default prefix: the list's folder


@pytest.mark.parametrize("text,match", [("", "no entries"), ("\n\n", "no entries"),
                                        ("a.mp4 1\nb.mp4\n", r"list.txt:2: .*no label"),
                                        ("a.mp4 cat\n", r"list.txt:1: the label must be an integer, got 'cat'"),
                                        ("a.mp4 -2\n", ">= 0")])
def test_bad_annotation_lists(tmp_path, text, match):
    lst = tmp_path / "list.txt"
    lst.write_text(text)
    with pytest.raises(AnnotationError, match=match):
        read_annotation_list(lst)


def test_annotation_list_from_other_editors(tmp_path):
    """A byte-order mark and CRLF line ends (Windows editors) and comment lines are read, not turned into a
    first path that does not exist; a list in another encoding is an AnnotationError naming file and line."""
    lst = tmp_path / "list.txt"
    lst.write_bytes("\ufeff# my clips\r\na/x.mp4 3\r\n  # b/y.mp4 1\r\nc/é z.mp4 0\r\n".encode("utf-8"))
    assert read_annotation_list(lst, data_prefix="/data") == [Sample("/data/a/x.mp4", 3), Sample("/data/c/é z.mp4", 0)]
    lst.write_bytes("a/x.mp4 3\nc/é z.mp4 0\n".encode("latin-1"))
    with pytest.raises(AnnotationError, match=r"list.txt:2: the annotation list is not UTF-8 text"):
        read_annotation_list(lst)


def test_missing_list(tmp_path):
    with pytest.raises(AnnotationError, match="not found"):
        read_annotation_list(tmp_path / "nope.txt")
    with pytest.raises(AnnotationError, match="not found"):
        VideoClipDataset(tmp_path / "nope.txt")


def test_list_source_with_a_data_prefix(synth_dataset, tmp_path):
    """mmaction's layout: the list's paths start from a prefix folder (e.g. videos_train), not the list's folder."""
    from bevt.data.datasets import list_source

    lst = tmp_path / "official_train_list.txt"  # entries relative to <root>/train, as in Kinetics' lists
    lst.write_text("".join(line.split("/", 1)[1] + "\n" for line in open(synth_dataset.train_list).read().splitlines()))
    assert list_source(str(lst)) == str(lst)  # no prefix: the dataset reads the list itself
    items = list_source(str(lst), str(synth_dataset.root / "train"))
    assert [s.path for s in items] == [s.path for s in read_annotation_list(synth_dataset.train_list)]
    with pytest.raises(AnnotationError, match="is not a folder"):
        list_source(str(lst), str(tmp_path / "videos_train"))
    with pytest.raises(AnnotationError, match="applies to annotation lists only"):
        list_source(str(synth_dataset.root / "train"), str(synth_dataset.root))


def test_folder_mode(synth_dataset, tmp_path):
    items, classes = scan_folder(synth_dataset.root / "train")
    assert classes == sorted(synth_dataset.classes)
    assert len(items) == 16
    for s in items:
        assert f"/{classes[s.label]}/" in s.path
    assert len(VideoClipDataset(synth_dataset.root / "train")) == 16  # a folder works as items too
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(AnnotationError, match="no files"):
        scan_folder(tmp_path)
    images = ImageDataset(synth_dataset.root / "images")  # an image folder finds images, not videos
    assert len(images) == 16 and all(s.path.endswith(".jpg") for s in images.items)
    assert sorted({s.label for s in images.items}) == [0, 1, 2]


def test_video_pretrain_sample(synth_dataset):
    ds = VideoClipDataset(synth_dataset.train_list, "pretrain", **VIDEO_KW)
    s = ds[(0, 5)]
    assert s["video"].shape == (3, 4, 56, 56) and s["video"].dtype == torch.uint8
    assert s["video_tok"].shape == (4, 3, 28, 28) and s["video_tok"].dtype == torch.uint8
    assert s["label"].dtype == torch.int64 and int(s["label"]) == 5 and int(s["index"]) == 5
    assert s["skipped"] == []


def test_samples_are_a_function_of_seed_epoch_index(synth_dataset):
    a = VideoClipDataset(synth_dataset.train_list, **VIDEO_KW, seed=1)
    b = VideoClipDataset(synth_dataset.train_list, **VIDEO_KW, seed=1)
    c = VideoClipDataset(synth_dataset.train_list, **VIDEO_KW, seed=2)
    b[(0, 2)], b[(1, 3)]  # what was read before must not matter
    assert torch.equal(a[(0, 3)]["video"], b[(0, 3)]["video"])
    assert torch.equal(a[(0, 3)]["video_tok"], b[(0, 3)]["video_tok"])
    assert not torch.equal(a[(0, 3)]["video"], a[(1, 3)]["video"])  # another epoch, other draws
    assert not torch.equal(a[(0, 3)]["video"], c[(0, 3)]["video"])
    assert torch.equal(a[3]["video"], a[(0, 3)]["video"])  # a bare index means epoch 0


def test_plan_reproduces_a_sample(synth_dataset):
    """What another decoder must do to match this path: plan() with the sample's generator, decode those
    frames, apply the params."""
    from bevt.data import transforms as T
    from bevt.data.video_io import probe, read_frames

    ds = VideoClipDataset(synth_dataset.train_list, **VIDEO_KW, seed=4)
    path = ds.items[6].path
    info = probe(path)
    inds, params = ds.plan(ds.rng(2, 6), info.num_frames, info.height, info.width)
    assert inds.shape == (4,) and isinstance(params, T.ClipAugParams)
    video, tok = T.apply_params(read_frames(path, inds), params, crop=56, tok_size=28)
    s = ds[(2, 6)]
    assert torch.equal(s["video"], torch.from_numpy(video).permute(3, 0, 1, 2))
    assert torch.equal(s["video_tok"], torch.from_numpy(tok).permute(0, 3, 1, 2))


def test_other_modes(synth_dataset):
    ft = VideoClipDataset(synth_dataset.val_list, "finetune", clip_len=4, interval=2, short_side=64, crop=56)
    s = ft[(0, 1)]
    assert s["video"].shape == (3, 4, 56, 56) and "video_tok" not in s
    seg = VideoClipDataset(synth_dataset.val_list, "finetune", num_segments=6, short_side=64, crop=56, flip_p=0)
    assert seg[(0, 1)]["video"].shape == (3, 6, 56, 56)
    test3 = VideoClipDataset(synth_dataset.val_list, "test", clip_len=4, interval=2, num_clips=2, num_crops=3,
                             short_side=56, crop=56)
    v = test3[(0, 1)]["video"]
    assert v.shape == (6, 3, 4, 56, 56)
    assert torch.equal(v, test3[(5, 1)]["video"])  # test views are deterministic
    with pytest.raises(ValueError, match="ThreeCrop"):
        VideoClipDataset(synth_dataset.val_list, "test", num_crops=3, short_side=64, crop=56)
    with pytest.raises(ValueError, match="mode"):
        VideoClipDataset(synth_dataset.val_list, "train")


def test_image_dataset(synth_dataset):
    ds = ImageDataset(synth_dataset.images_list, "pretrain", **IMAGE_KW, seed=3)
    s = ds[(0, 2)]
    assert s["images"].shape == (3, 56, 56) and s["images_tok"].shape == (3, 28, 28)
    assert s["images"].dtype == torch.uint8 and int(s["label"]) == 2
    assert torch.equal(s["images"], ImageDataset(synth_dataset.images_list, **IMAGE_KW, seed=3)[(0, 2)]["images"])
    assert ds.jitter.order == ImageDataset(synth_dataset.images_list, seed=3).jitter.order  # fixed by the seed
    ft = ImageDataset(synth_dataset.images_list, "finetune", crop=56)[(0, 2)]
    assert ft["images"].shape == (3, 56, 56) and "images_tok" not in ft
    assert ImageDataset(synth_dataset.images_list, "test", short_side=64, crop=56)[0]["images"].shape == (3, 56, 56)


def test_broken_files_are_skipped_with_one_warning_each(broken_videos):
    items, bad = broken_videos
    ds = VideoClipDataset(items, **VIDEO_KW)
    with pytest.warns(SkippedFileWarning) as record:
        s = ds[(0, 1)]
    # index 1 (missing), 2 (empty), 3 (garbage) fail; index 4 stands in, with its own label
    assert s["skipped"] == bad[:3] and int(s["label"]) == 4 and int(s["index"]) == 1
    assert torch.equal(s["video"], ds[(0, 4)]["video"])  # the substitute is exactly sample 4
    messages = [str(w.message) for w in record]
    assert len(messages) == 3 and all("skipping unreadable file" in m for m in messages)
    assert any("missing.mp4" in m and "not found" in m for m in messages)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # already reported: no second warning
        assert ds[(1, 2)]["skipped"] == bad[1:3]
    with pytest.warns(SkippedFileWarning, match="truncated.mp4"):
        assert ds[(0, 5)]["skipped"] == [bad[3]] and int(ds[(0, 5)]["label"]) == 6


def test_all_broken_gives_a_clear_error(tmp_path):
    items = [Sample(str(tmp_path / f"missing{i}.mp4"), 0) for i in range(3)]
    ds = VideoClipDataset(items, **VIDEO_KW)
    with pytest.warns(SkippedFileWarning), pytest.raises(BrokenDatasetError, match="^3 files in a row"):
        ds[(0, 0)]


def test_broken_image_is_skipped(synth_dataset, tmp_path):
    good = read_annotation_list(synth_dataset.images_list)
    cut = tmp_path / "cut.jpg"
    shutil.copy(good[1].path, cut)
    cut.write_bytes(cut.read_bytes()[:200])
    ds = ImageDataset([good[0], Sample(str(cut), 1), good[2]], **IMAGE_KW)
    with pytest.warns(SkippedFileWarning, match="cut.jpg"):
        s = ds[(0, 1)]
    assert s["skipped"] == [str(cut)] and int(s["label"]) == good[2].label
